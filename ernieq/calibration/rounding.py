"""How weights become codes: the rounding method, optionally after an input rotation.

Shape legend: E experts, N output features, K input features.

``encode_weight(codec, W [N, K], stats, name, method, rotation)`` encodes one weight;
``encode_experts(codec, [W_e [N, K]] * E, [stats_e] * E, names, method, rotation)`` encodes
E weights of one shape (a layer's experts) at once, each exactly as ``encode_weight``
would (GPTQ runs them through one batched loop, ``gptq_experts.py``):

- method ``rtn``: the codec's own encoder (round to nearest on its grid, with the
  codec's search; the Hessian diagonal weights that search when there are stats);
- method ``gptq``: GPTQ's error feedback through the codec (``gptq_experts.py``, the
  batched form of the reference ``gptq.py``), visiting
  columns by activation order (decreasing H_kk) when the weight is not rotated
  (README: on the demo it took unrotated ``--bits 4`` from +53.5 % to +31.9 %); a
  rotation makes the Hessian's diagonal nearly flat, so rotated weights keep K order;
- method ``awq``: round to nearest, after AWQ's per-input-channel scales were
  searched and folded into the weights of the whole tensor group (``awq.py``,
  applied by ``ernieq.quantize``): per weight it is ``rtn``.

With a rotation R (``ernieq.transforms``) the codec encodes W R and the
statistics are turned with it (Hessian R^T H R; mean |x| no longer applies), so
the runtime computes (x R) (W R)^T = x W^T.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ernieq.codecs import CalibrationStats, Codec, QuantizedTensor
from ernieq.errors import ErnieqError
from ernieq.transforms import Rotation


def _round_to_nearest(codec: Codec, weight: torch.Tensor, stats: CalibrationStats | None, name: str,
                      rotated: bool = False) -> QuantizedTensor:
    return codec.encode(weight, stats, name=name)


def _gptq_experts(codec: Codec, weights: Sequence[torch.Tensor], stats: Sequence[CalibrationStats | None],
                  names: Sequence[str], rotated: bool = False) -> list[QuantizedTensor]:
    from ernieq.calibration.gptq_experts import gptq_encode_experts

    return gptq_encode_experts(codec, weights, stats, names=names, act_order=not rotated)


def _gptq(codec: Codec, weight: torch.Tensor, stats: CalibrationStats | None, name: str,
          rotated: bool = False) -> QuantizedTensor:
    return _gptq_experts(codec, [weight], [stats], [name], rotated)[0]


# How a weight is rounded: the codec's own encoder, or GPTQ's error feedback through it.
# ``tune``: GPTQ, then block-output tuning (``tune.py``) during the sequential calibration pass; a weight
# tuning left no result for is GPTQ's.
METHODS: dict[str, Callable[..., QuantizedTensor]] = {"rtn": _round_to_nearest, "gptq": _gptq, "awq": _round_to_nearest,
                                                      "tune": _gptq}
# Methods that encode several weights of one shape at once (others go weight by weight).
BATCHED_METHODS: dict[str, Callable[..., list[QuantizedTensor]]] = {"gptq": _gptq_experts, "tune": _gptq_experts}


def rotate_stats(stats: CalibrationStats | None, rotation: Rotation) -> CalibrationStats | None:
    """What the codec sees of inputs turned by R: Hessian R^T H R [K, K]; mean |x| dropped."""
    if stats is None:
        return None
    h = stats.hessian
    hessian = rotation.to(h.device).conjugate(h.double()).float() if h is not None else None
    return CalibrationStats(hessian=hessian, act_abs_mean=None, tokens=stats.tokens)


def encode_weight(
    codec: Codec,
    weight: torch.Tensor,
    stats: CalibrationStats | None,
    name: str,
    method: str = "rtn",
    rotation: Rotation | None = None,
) -> QuantizedTensor:
    """Encode weight [N, K] by ``method`` on its device; with ``rotation``, encode W R (the runtime turns x by R)."""
    if method not in METHODS:
        raise ErnieqError(f"--method {method}: expected one of {', '.join(METHODS)}")
    stats = stats.to(weight.device) if stats is not None else None  # the codec searches where W is
    if rotation is not None:
        weight, stats = _rotate(weight, name, rotation), rotate_stats(stats, rotation)
    return METHODS[method](codec, weight, stats, name, rotated=rotation is not None)


def _rotate(weight: torch.Tensor, name: str, rotation: Rotation) -> torch.Tensor:
    """W R [N, K], turned on the weight's device."""
    if rotation.k != weight.shape[-1]:
        raise ErnieqError(f"{name}: a rotation for K={rotation.k} on a weight with K={weight.shape[-1]}")
    return rotation.to(weight.device).apply(weight.float())


def encode_experts(
    codec: Codec,
    weights: Sequence[torch.Tensor],
    stats: Sequence[CalibrationStats | None],
    names: Sequence[str],
    method: str = "rtn",
    rotation: Rotation | None = None,
) -> list[QuantizedTensor]:
    """``encode_weight`` of E weights [N, K] of one shape, each with its statistics and name: the
    same bytes, with GPTQ's column loop run once for all of them. Weights given the same statistics
    object (an expert's gate and up read one input) share its rotation and Hessian factor."""
    if method not in METHODS:
        raise ErnieqError(f"--method {method}: expected one of {', '.join(METHODS)}")
    if method not in BATCHED_METHODS:
        return [encode_weight(codec, w, st, n, method, rotation) for w, st, n in zip(weights, stats, names)]
    if rotation is not None:
        weights = [_rotate(w, n, rotation) for w, n in zip(weights, names)]  # W R [N, K]
        turned: dict[int, CalibrationStats | None] = {}  # weights that share statistics (gate, up) share R^T H R
        stats = [turned[id(st)] if id(st) in turned else turned.setdefault(id(st), rotate_stats(st, rotation))
                 for st in stats]
    return BATCHED_METHODS[method](codec, weights, stats, names, rotated=rotation is not None)
