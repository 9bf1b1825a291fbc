"""How one weight becomes codes: the rounding method, optionally after an input rotation.

Shape legend: N output features, K input features.

``encode_weight(codec, W [N, K], stats, name, method, rotation)``:

- method ``rtn``: the codec's own encoder (round to nearest on its grid, with the
  codec's search; the Hessian diagonal weights that search when there are stats);
- method ``gptq``: GPTQ's error feedback through the codec (``gptq.py``), visiting
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

from collections.abc import Callable

import torch

from ernieq.codecs import CalibrationStats, Codec, QuantizedTensor
from ernieq.errors import ErnieqError
from ernieq.transforms import Rotation


def _round_to_nearest(codec: Codec, weight: torch.Tensor, stats: CalibrationStats | None, name: str,
                      rotated: bool = False) -> QuantizedTensor:
    return codec.encode(weight, stats, name=name)


def _gptq(codec: Codec, weight: torch.Tensor, stats: CalibrationStats | None, name: str,
          rotated: bool = False) -> QuantizedTensor:
    from ernieq.calibration.gptq import gptq_encode

    return gptq_encode(codec, weight, stats, name=name, act_order=not rotated)


# How a weight is rounded: the codec's own encoder, or GPTQ's error feedback through it.
METHODS: dict[str, Callable[..., QuantizedTensor]] = {"rtn": _round_to_nearest, "gptq": _gptq, "awq": _round_to_nearest}


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
        if rotation.k != weight.shape[-1]:
            raise ErnieqError(f"{name}: a rotation for K={rotation.k} on a weight with K={weight.shape[-1]}")
        rotation = rotation.to(weight.device)
        weight = rotation.apply(weight.float())  # W R [N, K]
        stats = rotate_stats(stats, rotation)
    return METHODS[method](codec, weight, stats, name, rotated=rotation is not None)
