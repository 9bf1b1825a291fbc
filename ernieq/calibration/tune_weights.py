"""What block-output tuning may move in one weight: only what its codec stores.

Shape legend: N output features, K input features, G group size, n_groups = ceil(K / G).

A *tuner* starts from a weight's GPTQ result ``q`` and the weight the codec encoded
(``w`` [N, K], float32; ``W R`` when the weight is stored rotated) and exposes
trainable parameters whose every value decodes to something the format stores:

- ``wint4`` and ``wint8`` (integer grids, one scale per group of G columns; wint8:
  G = K, symmetric): per-weight rounding offsets V [N, K] in [-1/2, 1/2] (AutoRound's
  signed-gradient rounding: ``code = round(w / s + V)``, so each weight stays at the
  floor or the ceiling of ``w / s``; ``ROUND_RADIUS``), a scale factor per group (``s = s0 (1 + a)``,
  a in [-1/2, 1/2]) and, on the asymmetric wint4 grid, the integer zero point
  (``z = round(z0 + dz)`` in 0..15; it shifts the grid's range, so only weights at its ends
  pull on it)::

      W_hat = s (clamp(round(w / s + V) + z, lo, hi) - z)

  V starts at ``clamp(q0 - w / s0, -1/2, 1/2)``: GPTQ's own code wherever GPTQ chose
  the floor or the ceiling (the rare code GPTQ moved further starts at the nearer of the two).
- ``ccq2``: the bytes stay (their rounding is a choice among 256 words, no per-weight
  offset exists); the 4-bit local scales and the super scale move
  (``nibble = clamp(round(n0 + c), 0, 15)``, ``super = s0 (1 + a)`` rounded to its
  stored dtype)::

      W_hat = t_b * nibble * super

  after which ``rebyte`` makes the byte choice again, by GPTQ, at the tuned scales.

Rounding inside ``weight()`` is a straight-through estimate (forward: the rounded
value; backward: identity), and the scales are rounded to their stored dtype the same
way, so ``decode(tuner.result())`` equals ``tuner.weight()`` exactly. ``step(lr)``
is one signed-gradient step (``p -= lr * rel * sign(grad)``, ``rel`` per parameter
kind) followed by the clamps.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable

import torch

from ernieq.calibration.gptq_experts import gptq_encode_experts
from ernieq.codecs import CalibrationStats, CodecError, QuantizedTensor, get_codec
from ernieq.codecs.base import register_in
from ernieq.codecs.ccq2 import (
    SUPER_SCALE_DTYPES,
    pack_local_scales,
    unpack_local_scales,
)
from ernieq.codecs.ccq2_search import GROUP, NIBBLE_MAX, expand_codes
from ernieq.codecs.packing import pack_int4_k_major, unpack_int4_k_major
from ernieq.codecs.wint4 import SCALE_DTYPES, SYM_OFFSET

ROUND_RADIUS = 0.499  # |V| < 1/2: a weight's code stays at the floor or the ceiling of w / s (at exactly 1/2,
# round-half-to-even would take an integer w / s to its neighbour)
SCALE_RANGE = 0.5  # scale factors 1 + a, |a| <= 1/2
# Signed-gradient step per parameter kind, relative to the rounding offsets' (AutoRound: lr = 1 / steps
# for V, so the offsets can cross one rounding boundary over a run).
REL_LR = {"offset": 1.0, "scale": 0.1, "zero": 2.0, "nibble": 2.0, "super": 0.05}

_TUNERS: dict[str, Callable] = {}


def register_tuner(codec_name: str):
    """Decorator: ``fn(q: QuantizedTensor, w [N, K], round_weights) -> tuner`` for ``codec_name``'s weights."""
    return register_in(_TUNERS, codec_name, "tuner")


def can_tune(codec_name: str) -> bool:
    return codec_name in _TUNERS


def make_tuner(q: QuantizedTensor, weight: torch.Tensor, round_weights: bool = True):
    """The tuner of ``q`` (a GPTQ result) for the weight [N, K] it encodes (in the codec's frame).
    round_weights: integer grids tune per-weight rounding offsets (and zero points); else their codes
    stay GPTQ's and only the scales move (ccq2's bytes always stay)."""
    if q.codec not in _TUNERS:
        raise CodecError(f"block-output tuning has no tuner for codec {q.codec!r}")
    return _TUNERS[q.codec](q, weight.float(), round_weights)


def ste_round(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def ste_cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x rounded to ``dtype`` (and back to float32) forward, identity backward."""
    return x + (x.to(dtype).float() - x).detach()


class _Tuner:
    """Shared by the tuners: parameters by kind, the signed-gradient step, the clamps."""

    kinds: dict[str, torch.Tensor]
    # The end-to-end tuning's default first step, relative to 2 / steps (``tune_model.ModelTuneSettings``).
    model_step = 1.0

    def parameters(self) -> list[torch.Tensor]:
        return list(self.kinds.values())

    @torch.no_grad()
    def step(self, lr: float) -> None:
        for kind, p in self.kinds.items():
            if p.grad is not None:
                p.sub_(lr * REL_LR[kind] * torch.sign(p.grad))
                p.grad = None
        self.clamp()

    def clamp(self) -> None:
        raise NotImplementedError


class GridTuner(_Tuner):
    """An integer grid: ``W_hat = s (clamp(round(w / s + V) + z, lo, hi) - z)``, scales per group of ``g``.

    w: [N, K]; codes0: float32 [N, K] GPTQ's stored codes; s0, z0: float32 [N, n_groups];
    lo, hi: the code range; tune_zero: the zero point moves (asymmetric grids);
    scale_dtype: how the scale is stored; pack(codes [N, K], s [N, n_groups], z) -> QuantizedTensor.
    """

    # A fifth: on the demo's --bits 4, 2 / steps raised the held-out KL (0.1441 -> 0.1684) and
    # 0.4 / steps lowered it (-> 0.1346), benchmarks/results/demo_tune_w4_model_{e2e,mlr}.json.
    model_step = 0.2

    def __init__(self, w, codes0, s0, z0, g, lo, hi, tune_zero, scale_dtype, pack, round_weights=True):
        k = w.shape[1]
        self.w, self.g, self.k, self.lo, self.hi = w, g, k, lo, hi
        self.s0, self.z0, self.dtype, self.pack = s0, z0, scale_dtype, pack
        self.codes0 = None if round_weights else codes0  # codes kept: only the grid moves
        self.kinds = {"scale": torch.zeros_like(s0).requires_grad_()}
        if round_weights:
            v0 = (codes0 - self._expand(z0)) - w / self._expand(s0)  # GPTQ's value minus w / s0
            self.kinds["offset"] = v0.clamp(-ROUND_RADIUS, ROUND_RADIUS).requires_grad_()
            if tune_zero:
                self.kinds["zero"] = torch.zeros_like(z0).requires_grad_()

    def _expand(self, per_group: torch.Tensor) -> torch.Tensor:
        """[N, n_groups] -> [N, K]: each group's value over its columns."""
        return per_group.repeat_interleave(self.g, dim=1)[:, : self.k]

    def _grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The scale as stored and the integer zero point, [N, n_groups] each (straight-through)."""
        s = ste_cast(self.s0 * (1 + self.kinds["scale"]), self.dtype)  # s = s0 (1 + a), as stored
        z = self.z0
        if "zero" in self.kinds:
            z = ste_round(self.z0 + self.kinds["zero"]).clamp(self.lo, self.hi)  # z = round(z0 + dz)
        return s, z

    def _codes(self, s, z) -> torch.Tensor:
        """code = clamp(round(w / s + V) + z, lo, hi)  [N, K] (straight-through); GPTQ's with codes kept."""
        if self.codes0 is not None:
            return self.codes0
        return (ste_round(self.w / self._expand(s) + self.kinds["offset"]) + self._expand(z)).clamp(self.lo, self.hi)

    def weight(self) -> torch.Tensor:
        s, z = self._grid()
        return (self._codes(s, z) - self._expand(z)) * self._expand(s)  # W_hat = (code - z) s

    @torch.no_grad()
    def clamp(self) -> None:
        if "offset" in self.kinds:
            self.kinds["offset"].clamp_(-ROUND_RADIUS, ROUND_RADIUS)
        self.kinds["scale"].clamp_(-SCALE_RANGE, SCALE_RANGE)
        if "zero" in self.kinds:
            self.kinds["zero"].clamp_(-self.z0 - 0.49, self.hi - self.z0 + 0.49)

    @torch.no_grad()
    def result(self) -> QuantizedTensor:
        s, z = self._grid()
        return self.pack(self._codes(s, z), s, z)


@register_tuner("wint4")
def _wint4_tuner(q: QuantizedTensor, w: torch.Tensor, round_weights: bool) -> GridTuner:
    n, k = q.shape
    cfg = q.params
    g = cfg["group_size"] or k
    dtype = SCALE_DTYPES[cfg["scale_dtype"]]
    codes = unpack_int4_k_major(q.tensors["qweight"], k).float()  # [N, K] in 0..15
    s0 = q.tensors["scale"].float()  # [N, n_groups]
    z0 = torch.full_like(s0, SYM_OFFSET) if cfg["symmetric"] else q.tensors["zero"].float()

    def pack(c, s, z):
        tensors = {"qweight": pack_int4_k_major(c.to(torch.uint8)), "scale": s.to(dtype).contiguous()}
        if not cfg["symmetric"]:
            tensors["zero"] = z.to(torch.uint8)
        return QuantizedTensor("wint4", (n, k), tensors, dict(cfg))

    return GridTuner(w, codes, s0, z0, g, 0, 15, not cfg["symmetric"], dtype, pack, round_weights)


@register_tuner("wint8")
def _wint8_tuner(q: QuantizedTensor, w: torch.Tensor, round_weights: bool) -> GridTuner:
    n, k = q.shape
    codes = q.tensors["qweight"].float()  # [N, K] in -127..127
    s0 = q.tensors["scale"].float()[:, None]  # [N, 1]

    def pack(c, s, z):
        return QuantizedTensor("wint8", (n, k), {"qweight": c.to(torch.int8), "scale": s[:, 0].contiguous()},
                               dict(q.params))

    return GridTuner(w, codes, s0, torch.zeros_like(s0), k, -127, 127, False, torch.float32, pack, round_weights)


@register_tuner("ccq2")
class CCQ2Tuner(_Tuner):
    """ccq2 with its bytes fixed: ``W_hat = t_b * clamp(round(n0 + c), 0, 15) * s0 (1 + a)``."""

    def __init__(self, q: QuantizedTensor, w: torch.Tensor, round_weights: bool = True):
        self.k = q.shape[1]
        self.q = q
        t = q.tensors
        g = -(-self.k // GROUP)
        self.words = expand_codes(t["quant_weight"].t(), t["code_scale"][:, None], t["code_zp"][:, None])
        self.words = self.words.flatten(1)[:, : self.k].float()  # t_b per weight  [N, K]
        self.n0 = unpack_local_scales(t["weight_scale"], g).float()  # [N, G]
        self.s0 = t["super_scales"].float()  # [N]
        self.dtype = SUPER_SCALE_DTYPES[q.params["super_scale_dtype"]]
        self.kinds = {"nibble": torch.zeros_like(self.n0).requires_grad_(),
                      "super": torch.zeros_like(self.s0).requires_grad_()}

    def _scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        nib = ste_round(self.n0 + self.kinds["nibble"]).clamp(0, NIBBLE_MAX)  # [N, G]
        sup = ste_cast(self.s0 * (1 + self.kinds["super"]), self.dtype)  # [N], as stored
        return nib, sup

    def weight(self) -> torch.Tensor:
        nib, sup = self._scales()
        scale = nib * sup[:, None]  # local scale = nibble * super  [N, G]
        return self.words * scale.repeat_interleave(GROUP, dim=1)[:, : self.k]  # W_hat = q * nibble * super

    @torch.no_grad()
    def clamp(self) -> None:
        self.kinds["nibble"].clamp_(-self.n0 - 0.49, NIBBLE_MAX - self.n0 + 0.49)
        self.kinds["super"].clamp_(-SCALE_RANGE, SCALE_RANGE)

    @torch.no_grad()
    def result(self) -> QuantizedTensor:
        nib, sup = self._scales()
        tensors = {**self.q.tensors, "weight_scale": pack_local_scales(nib.long()), "super_scales": sup.to(self.dtype)}
        return dataclasses.replace(self.q, tensors=tensors)


def rebyte(q: QuantizedTensor, weight: torch.Tensor, stats: CalibrationStats | None, act_order: bool,
           name: str) -> QuantizedTensor:
    """ccq2 ``q``'s bytes chosen again by GPTQ for ``weight`` [N, K] (the codec's frame), its code grids,
    super scales and local scales kept as they are (tuned). Without a usable Hessian ``q`` is returned."""
    if q.codec != "ccq2" or stats is None or stats.hessian is None or stats.tokens <= 0:
        return q
    from ernieq.calibration.gptq_ccq2 import CCQ2ExpertColumns

    k = q.shape[1]
    t = q.tensors
    fitted = types.SimpleNamespace(super_scale=t["super_scales"].float(), code_scale=t["code_scale"],
                                   code_zp=t["code_zp"],
                                   nibble=unpack_local_scales(t["weight_scale"], -(-k // GROUP)).long())

    class FixedScales(CCQ2ExpertColumns):
        """GPTQ's ccq2 rounder with the scales given: no search up front, no nibble refit per group."""

        def _fits(self, weight, imps, scales_only):
            return [fitted]

        def start_group(self, col, w):
            pass

    codec = get_codec("ccq2", **q.params)
    return gptq_encode_experts(codec, [weight], [stats], act_order=act_order, names=[name], rounder=FixedScales)[0]
