"""GPTQ (Frantar et al., 2022): round columns left to right, feeding each one's error forward.

Shape legend: N output features, K input features, G group size.

For one weight W [N, K] and the Hessian of its inputs H = X^T X / n [K, K], GPTQ
minimises ||X W^T - X W_hat^T||^2 column by column:

1. dead inputs (H_kk = 0) get W[:, k] = 0 (GPTQ also sets H_kk = 1; here the
   damping keeps H definite, so rounders that choose several columns jointly
   give dead ones almost no weight);
2. optionally activation order: columns sorted by H_kk, largest first;
3. H += damp * mean(diag H) * I; U = chol(H^-1), upper (H^-1 = U^T U);
4. for each column k (blocks of ``block_size``, updated lazily):
   ``q = round(w_k)``, ``e = (w_k - q) / U_kk``, ``w_j -= e U_kj`` for j > k.

Rounding goes through the codec's *column rounder*, so GPTQ works for every
codec that has one (a structural protocol; codecs import nothing from here)::

    unit: int    # columns rounded together (1; 4 for ccq2, one byte per 4 weights)
    group: int   # columns sharing scales (0: fixed per channel); the loop calls
                 # start_group(col, w [N, <= group]) at each group's first column
    round(col, w [N, unit], hinv [unit, unit]) -> W_hat [N, unit]
    result() -> QuantizedTensor

A unit of several columns S is rounded jointly: its Hessian-weighted error is
``||E U_SS^-1||^2`` (E = W_S - W_hat_S [N, unit]), the exact cost of rounding S
with the rest compensating, and ``e = E U_SS^-1`` is what flows forward.

The rounder of a codec comes from :func:`register_rounder` (codecs whose file
this package may not change, e.g. ``ccq2``) or else from the codec's own
``columns`` class (``columns(codec, W, static_groups)``). Scales are chosen from the
current weights when each group starts (GPTQ's ``static_groups=False``), or
from W up front with activation order (the stored layouts keep groups in K
order). When no usable Hessian exists (no statistics, zero tokens, every input
dead, a factorisation that fails even with more damping) the weight is rounded
to nearest by the codec and a warning says so: never a NaN or Inf scale.

This file is the reference, one weight at a time. ``gptq_experts.py`` runs the same
algorithm on a layer's experts at once, in a form whose work sits in GEMMs; that is
what ``encode_weight`` and ``ernieq quantize`` use (for codecs with an expert rounder).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from ernieq.codecs import CalibrationStats, Codec, CodecError, QuantizedTensor
from ernieq.codecs.base import all_finite, check_weight, register_in

log = logging.getLogger(__name__)

DAMP_RETRIES = 3  # damping x10 per retry when the Cholesky factorisation fails

_ROUNDERS: dict[str, Callable] = {}


def register_rounder(codec_name: str):
    """Decorator: ``fn(codec, W [N, K], static_groups: bool, stats) -> column rounder`` for ``codec_name``."""
    return register_in(_ROUNDERS, codec_name, "GPTQ rounder")


def column_rounder(codec: Codec, weight: torch.Tensor, static_groups: bool, stats: CalibrationStats | None = None):
    """The column rounder of ``codec`` for weight [N, K] (float32)."""
    if codec.name in _ROUNDERS:
        return _ROUNDERS[codec.name](codec, weight, static_groups, stats)
    columns = getattr(codec, "columns", None)
    if columns is None:
        raise CodecError(f"codec {codec.name!r} has no GPTQ column rounder")
    return columns(codec, weight, static_groups)


def hessian_scale(stats: CalibrationStats | None, k: int, name: str) -> torch.Tensor | None:
    """The mean diagonal of ``stats.hessian`` [K, K] (float64, > 0), or None (logged) when there is
    nothing to use. A wrong shape or a non-finite value is an error, not a fallback."""
    if stats is None or stats.hessian is None:
        log.warning("%s: no calibration statistics; rounding to nearest", name)
        return None
    h = stats.hessian
    if tuple(h.shape) != (k, k):
        raise CodecError(f"{name}: Hessian of shape {tuple(h.shape)} for a weight with K={k}")
    if not all_finite(h):
        raise CodecError(f"{name}: the calibration Hessian has NaN or Inf values")
    if stats.tokens <= 0:
        log.warning("%s: calibration saw no token for this weight; rounding to nearest", name)
        return None
    mean_diag = h.diagonal().double().clamp(min=0).mean()
    if not mean_diag > 0:
        log.warning("%s: the calibration Hessian is zero (every input dead); rounding to nearest", name)
        return None
    return mean_diag


def usable_hessian(stats: CalibrationStats | None, k: int, name: str) -> torch.Tensor | None:
    """A float64 copy of ``stats.hessian`` [K, K] scaled to mean diagonal 1, or None (logged) when
    there is nothing to use (``hessian_scale``)."""
    mean_diag = hessian_scale(stats, k, name)
    if mean_diag is None:
        return None
    return stats.hessian.double() / mean_diag  # GPTQ is invariant to the scale of H; this keeps tiny Hessians factorable


def inverse_cholesky(h: torch.Tensor, damp: float, name: str) -> torch.Tensor | None:
    """h: float64 [K, K] (mean diagonal 1). Returns U float32 [K, K], upper, with
    (h + damp I)^-1 = U^T U; damping grows x10 per failed try; None if all fail."""
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(DAMP_RETRIES + 1):
        d = damp * 10**attempt
        lower, info = torch.linalg.cholesky_ex(h + d * eye)  # H + damp * mean(diag H) * I
        if info.item() == 0:
            hinv = torch.cholesky_solve(eye, lower)  # H^-1 (torch.cholesky_inverse is far slower on CPU)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)  # H^-1 = U^T U
            if info.item() == 0 and torch.isfinite(upper).all():
                if attempt:
                    log.warning("%s: Hessian factorised only with damping %.3g", name, d)
                return upper.float()
    log.warning("%s: the Hessian cannot be factorised even with damping %.3g; rounding to nearest", name, d)
    return None


def act_order_permutation(h: torch.Tensor, unit: int) -> torch.Tensor:
    """Columns in descending order of H_kk, units of ``unit`` columns kept together. Returns int64 [K]."""
    score = h.diagonal().reshape(-1, unit).sum(1)  # [K / unit]
    order = torch.argsort(score, descending=True, stable=True)
    return (order[:, None] * unit + torch.arange(unit, device=h.device)).flatten()  # [K]


def _forward_error(err: torch.Tensor, u_ss: torch.Tensor) -> torch.Tensor:
    """err: W - W_hat of one unit [N, unit]; u_ss: [unit, unit] upper. Returns e = err U_SS^-1."""
    if u_ss.shape[0] == 1:
        return err / u_ss[0, 0]  # e = (w - q) / U_kk
    return torch.linalg.solve_triangular(u_ss, err, upper=True, left=False)


def column_loop(w: torch.Tensor, u: torch.Tensor, rounder, perm: torch.Tensor, block_size: int, group: int) -> None:
    """GPTQ's loop over the columns of w [N, K] (in loop order), lazily updated per block.

    u: [K, K] upper Cholesky factor of H^-1 (loop order); perm: [K] loop position -> column of
    the weight; group: call ``rounder.start_group`` at columns that are multiples of it (0: never).
    The rounder records what it chose; w is consumed (updated in place).
    """
    k = w.shape[1]
    unit = rounder.unit
    cols = perm.tolist()  # plain ints: no device sync per column
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2]  # [N, B] view: updated in place
        err1 = torch.zeros_like(w1)  # [N, B]
        u1 = u[i1:i2, i1:i2]  # [B, B]
        for j in range(0, i2 - i1, unit):
            col = cols[i1 + j]
            if group and col % group == 0:
                rounder.start_group(col, w1[:, j : j + group])
            s = slice(j, j + unit)
            q = rounder.round(col, w1[:, s], u1[s, s])  # [N, unit]
            e = _forward_error(w1[:, s] - q, u1[s, s])  # [N, unit]
            w1[:, j + unit :].addmm_(e, u1[s, j + unit :], alpha=-1)  # w_j -= e U_kj inside the block
            err1[:, s] = e
        w[:, i2:].addmm_(err1, u[i1:i2, i2:], alpha=-1)  # the block's errors, applied to later columns at once


def _finite(q: QuantizedTensor) -> bool:
    return all(all_finite(t.float()) for t in q.tensors.values() if t.is_floating_point())


def gptq_encode(
    codec: Codec,
    weight: torch.Tensor,
    stats: CalibrationStats | None,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    name: str = "weight",
) -> QuantizedTensor:
    """GPTQ-encode weight [N, K] with ``codec`` and the Hessian in ``stats``; decodes with the codec's ``decode``.

    damp: fraction of the mean Hessian diagonal added to the diagonal.
    block_size: columns per lazy update (a multiple of the rounder's unit and group).
    act_order: visit columns by decreasing H_kk (scales then fixed up front).
    """
    w = check_weight(weight, name).clone()  # [N, K] float32
    n, k = w.shape
    if not damp > 0:
        raise CodecError(f"{name}: GPTQ damping must be positive, got {damp}")
    h = usable_hessian(stats, k, name)
    if h is None:
        return codec.encode(weight, stats, name=name)
    h = h.to(w.device)
    dead = h.diagonal() <= 0  # inputs that never fire: no error there matters
    w[:, dead] = 0.0  # GPTQ zeroes them; their H_kk stays 0 (damping alone keeps H definite), so a
    # joint rounder (ccq2's quads) spends no accuracy on them
    rounder = column_rounder(codec, w, act_order, stats)
    unit, group = rounder.unit, 0 if act_order else rounder.group
    if k % unit:
        raise CodecError(f"{name}: K={k} is not a multiple of the {codec.name} rounding unit {unit}")
    if block_size <= 0 or block_size % unit or (group and block_size % group):
        raise CodecError(f"{name}: block_size {block_size} must be a positive multiple of {max(unit, group)}")
    perm = act_order_permutation(h, unit) if act_order else torch.arange(k, device=w.device)
    u = inverse_cholesky(h[perm][:, perm], damp, name)
    if u is None:
        return codec.encode(weight, stats, name=name)
    column_loop(w[:, perm], u, rounder, perm, block_size, group)
    q = rounder.result()
    if not _finite(q):
        log.warning("%s: GPTQ produced non-finite values; rounding to nearest", name)
        return codec.encode(weight, stats, name=name)
    return q
