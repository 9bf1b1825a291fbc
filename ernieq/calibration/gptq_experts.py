"""GPTQ for the E experts of a layer at once: one column loop, one Hessian factor per expert.

Shape legend: E experts, N output features, K input features, G group size,
B columns per lazy block, b columns per inner block.

``gptq.py`` is the reference: one weight, column by column, as the paper writes
it. This module runs the same algorithm on E weights ``W [E, N, K]`` (each with its
own Hessian) in one loop whose Python work per column does not grow with E, and
keeps the flops in GEMMs:

1. per expert, as ``gptq.py``: the Hessian scaled to mean diagonal 1
   (``hessian_scale``), dead inputs zeroed, optionally activation order;
2. per Hessian (experts given the same statistics object share one: an expert's
   gate and up read one input), ``H + damp I = V V^T`` with V upper triangular, in
   float32 (float64 if float32 fails): ``V = J chol(J H J) J``, J the reversal. GPTQ's factor
   U (``H^-1 = U^T U``, upper) is ``V^-1``, so no inverse is needed. With
   ``D = W - Q`` (the weight before GPTQ minus what it became) GPTQ's errors are
   ``e = D U^-1 = D V``, and its updates ``w_j -= e_k U_kj`` add up to
   ``A = D_P V`` over the processed columns P:

   - column j, when it is rounded (all columns before it processed):
     ``w_j = W_j + A_j / V_jj``; this is what the loop keeps per column;
   - a set S of columns none of which is rounded yet (a group whose scales are set
     from the current weights, ccq2's quad rounded jointly):
     ``w_S = W_S + A_S V_SS^-1`` (from ``U V = I``: ``U_PS = -U_PP V_PS V_SS^-1``), which
     ``set_state`` recovers from the loop's columns;
   - a unit S rounded jointly to q_S costs ``||(w_S - q_S) V_SS||^2`` (``V_SS = U_SS^-1``);
3. the loop keeps the weights transposed, ``[E, K, N]``, so one column of every
   expert is a contiguous ``[E, N]`` slice; per unit of columns it rounds (the
   codec's *expert rounder*), stores D, and updates the rest of its inner block
   of b columns; after each inner block one batched GEMM updates the rest of the
   lazy block of B columns, after each lazy block one updates every later column.

Expert rounders (a structural protocol, like ``gptq.py``'s column rounders) are
classes built as ``cls(codec, W [E, N, K], order, stats)``, W float32 with dead
inputs zeroed (read it in the constructor, do not keep it: its memory becomes the
loop's), order int64 [E, K] (loop position -> column; None: K order, else scales
are fixed up front from W), stats the E experts' statistics::

    unit: int     # class attribute: columns rounded together (1; 4 for ccq2)
    group: int    # columns sharing scales (0: none); start_group(col, w [E, <= group, N])
                  # is called at each group's first column (K order only)
    round(j, w [E, unit, N], m [E, unit, unit] or None) -> Q [E, unit, N]
                  # j: loop position; m: V_SS, given when unit > 1
    result() -> list of E QuantizedTensor

The class comes from :func:`register_expert_rounder` or the codec's
``expert_columns`` attribute; a codec with neither goes through ``gptq.py``
expert by expert.

What equals what. Each expert's bytes do not depend on how experts are batched or
chunked, nor on whether a factor is shared (every op is per expert or per element;
tested), so ``encode_weight`` on one weight and quantize's batched experts write the
same bytes. Against the reference ``gptq.py`` (float64 U, its own order of float
operations) the arithmetic is the same up to float32 rounding: now and then a rounding
tie goes the other way and the later columns compensate it, so the tolerance is stated
on the output error ``tr(dW H dW^T)``: within 0.04 % of the reference's, with at least 99.8 %
of the code bytes the same, for every codec on the test shapes
(``tests/calibration/test_gptq_experts.py``). At ERNIE 4.5's expert shapes
(``benchmarks/gptq_speed.py``, BENCHMARKS.md) the output error stays within 0.9996x-1.0002x of the
reference's; the same code bytes are at least 99.77 % at 21B shapes and 96.2 % (wint4 g64) to
99.9 % at 300B's K = 8192 with a rank-deficient Hessian (4096 tokens).

Memory: experts are processed in chunks of :func:`experts_per_chunk` (a budget
in bytes, 2 GiB on a CPU), each expert's factor is computed one at a time.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch

from ernieq.calibration.gptq import DAMP_RETRIES, act_order_permutation, gptq_encode, hessian_scale
from ernieq.codecs import CalibrationStats, Codec, CodecError, QuantizedTensor
from ernieq.codecs.base import all_finite, check_weight, register_in

log = logging.getLogger(__name__)

INNER_BLOCK = 16  # b: columns whose updates are applied one unit at a time (then one GEMM)
CPU_CHUNK_BYTES = 2 << 30  # working set of one chunk of experts on a CPU
ACCELERATOR_CHUNK_BYTES = 16 << 30  # ... and on an accelerator (fewer, larger chunks: fewer launches per column)
_EXPERT_ROUNDERS: dict[str, type] = {}


def register_expert_rounder(codec_name: str):
    """Class decorator: the expert rounder of ``codec_name`` (for codecs whose file does not name one)."""
    return register_in(_EXPERT_ROUNDERS, codec_name, "GPTQ expert rounder")


def expert_rounder_class(codec: Codec) -> type | None:
    """The expert rounder class of ``codec``, or None when it has none."""
    return _EXPERT_ROUNDERS.get(codec.name) or getattr(codec, "expert_columns", None)


def chunk_budget(device: torch.device) -> int:
    """Bytes of one chunk of experts on ``device``."""
    return CPU_CHUNK_BYTES if device.type == "cpu" else ACCELERATOR_CHUNK_BYTES


def experts_per_chunk(n: int, k: int, budget: int) -> int:
    """How many [N, K] experts one chunk holds within ``budget`` bytes (at least 1): float32 weights
    before GPTQ, current and as given (3 N K), the Hessian as given and the factor (2 K^2), codes (N K bytes)."""
    per_expert = 4 * (3 * n * k + 2 * k * k) + n * k
    return max(1, budget // per_expert)


def upper_factor(h: torch.Tensor, scale: torch.Tensor | float, damp: float, name: str) -> torch.Tensor | None:
    """h: float32 [K, K], scale: its mean diagonal. Returns V float32 [K, K], upper, with
    h / scale + damp I = V V^T (float32 Cholesky, float64 where that fails; damping x10 per
    failed try, as ``gptq.inverse_cholesky``), or None (logged) if every try fails."""
    hr = torch.flip(h, (0, 1)).div_(scale)  # J H J, mean diagonal 1
    diag = hr.diagonal()
    base = diag.clone()
    for attempt in range(DAMP_RETRIES + 1):
        d = damp * 10**attempt
        torch.add(base, d, out=diag)  # J (H + damp * mean(diag H) * I) J
        for dtype in (torch.float32, torch.float64):
            lower, info = torch.linalg.cholesky_ex(hr.to(dtype))  # J H J = L L^T
            if info.item() == 0 and torch.isfinite(lower.diagonal()).all():
                if attempt:
                    log.warning("%s: Hessian factorised only with damping %.3g", name, d)
                return torch.flip(lower, (0, 1)).float()  # V = J L J: upper, H = V V^T
    log.warning("%s: the Hessian cannot be factorised even with damping %.3g; rounding to nearest", name, d)
    return None


def set_state(w0: torch.Tensor, w: torch.Tensor, v_inv_t: torch.Tensor, vdiag: torch.Tensor) -> torch.Tensor:
    """GPTQ's state of a set S of columns none of which is rounded yet, from the loop's.

    w0, w: [E, s, N] the columns of S before GPTQ (W_S) and as the loop keeps them
    (``W_j + A_j / V_jj``); v_inv_t: [E, s, s] V_SS^-T (lower); vdiag: [E, s] V_jj.
    Returns ``W_S + A_S V_SS^-1`` transposed, [E, s, N] (see the module docstring).
    """
    a_t = (w - w0) * vdiag[..., None]  # A_S^T = diag(V_SS) (w_S - W_S)^T
    return torch.baddbmm(w0, v_inv_t, a_t)  # W_S^T + V_SS^-T A_S^T


def diagonal_blocks(vs: torch.Tensor, vdiag: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The diagonal blocks of V of ``size`` columns (the last one padded with I).

    vs: [E, K, K] upper, ``V_lj / V_jj``; vdiag: [E, K]. Returns V_SS [E, K', size, size] and
    V_SS^-T [E, K', size, size] (lower), K' = ceil(K / size).
    """
    k = vs.shape[1]
    pad = -k % size
    idx = torch.arange(k + pad, device=vs.device).clamp(max=k - 1).reshape(-1, size)  # [K', size]
    v = vs[:, idx[:, :, None], idx[:, None, :]] * vdiag[:, idx][:, :, None, :]  # V_lj = vs_lj V_jj
    if pad:
        v[:, -1, size - pad :, :] = 0.0
        v[:, -1, :, size - pad :] = 0.0
        v[:, -1, range(size - pad, size), range(size - pad, size)] = 1.0
    eye = torch.eye(size, dtype=v.dtype, device=v.device)
    inv = torch.linalg.solve_triangular(v, eye.expand_as(v), upper=True)  # V_SS^-1
    return v, inv.transpose(-1, -2).contiguous()


def expert_column_loop(w0: torch.Tensor, w: torch.Tensor, vs: torch.Tensor, vdiag: torch.Tensor,
                       rounder, block: int, inner: int, group: int) -> None:
    """GPTQ's loop over the K columns of E experts, transposed, in loop order.

    w0: [E, K, N] the weights before GPTQ (W); w: [E, K, N] a copy, consumed (column j holds
    ``W_j + A_j / V_jj``); vs: [E, K, K] upper, ``vs[:, l, j] = V_lj / V_jj``; vdiag: [E, K]
    V_jj; block, inner: B, b; group: call ``rounder.start_group`` at columns that are multiples
    of it (0: never), with GPTQ's state of the group (``set_state``). A unit of several columns
    is handed to the rounder as GPTQ's state, with m = V_SS.
    """
    e, k, n = w.shape
    unit = rounder.unit
    d = torch.empty(e, min(block, k), n, dtype=w.dtype, device=w.device)  # D = W - Q of one lazy block
    vs_t = vs.transpose(1, 2)  # [E, K, K] lower, a view: vs_t[:, j, l] = V_lj / V_jj
    groups = diagonal_blocks(vs, vdiag, group)[1] if group else None  # V_SS^-T per group
    units = diagonal_blocks(vs, vdiag, unit) if unit > 1 else None  # V_SS, V_SS^-T per unit
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        for j1 in range(i1, i2, inner):
            j2 = min(j1 + inner, i2)
            for j in range(j1, j2, unit):
                if group and j % group == 0:
                    g, span = slice(j, min(j + group, k)), min(group, k - j)
                    v_inv = groups[:, j // group, :span, :span]
                    rounder.start_group(j, set_state(w0[:, g], w[:, g], v_inv, vdiag[:, g]))
                s = slice(j, j + unit)
                if units is None:
                    q = rounder.round(j, w[:, s], None)  # [E, 1, N]
                else:
                    state = set_state(w0[:, s], w[:, s], units[1][:, j // unit], vdiag[:, s])
                    q = rounder.round(j, state, units[0][:, j // unit])  # [E, unit, N]
                dj = d[:, j - i1 : j - i1 + unit]
                torch.sub(w0[:, s], q, out=dj)  # D_S = W_S - Q_S
                if j + unit < j2:  # w_c += sum_{l in S} D_l V_lc / V_cc inside the inner block
                    w[:, j + unit : j2].baddbmm_(vs_t[:, j + unit : j2, s], dj)
            if j2 < i2:  # the inner block's D, applied to the rest of the lazy block
                w[:, j2:i2].baddbmm_(vs_t[:, j2:i2, j1:j2], d[:, j1 - i1 : j2 - i1])
        if i2 < k:  # the lazy block's D, applied to every later column at once
            w[:, i2:].baddbmm_(vs_t[:, i2:, i1:i2], d[:, : i2 - i1])


def inner_block(unit: int, group: int) -> int:
    """b: a multiple of the unit that divides the group (so a group starts at an inner block)."""
    b = math.gcd(INNER_BLOCK, group) if group else INNER_BLOCK
    return b if b % unit == 0 else unit


def _finite(q: QuantizedTensor) -> bool:
    return all(all_finite(t.float()) for t in q.tensors.values() if t.is_floating_point())


def gptq_encode_experts(
    codec: Codec,
    weights: torch.Tensor | Sequence[torch.Tensor],
    stats: Sequence[CalibrationStats | None],
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    names: Sequence[str] | None = None,
    budget: int | None = None,
    rounder: type | None = None,
) -> list[QuantizedTensor]:
    """GPTQ-encode E weights ``weights`` [E, N, K] (or E tensors [N, K]), expert e with ``stats[e]``.

    Options as ``gptq.gptq_encode``; an expert without a usable Hessian is rounded to
    nearest by the codec, as there. ``budget``: bytes of one chunk of experts
    (``experts_per_chunk``; default ``chunk_budget`` of the weights' device). ``rounder``: an expert
    rounder class instead of the codec's (block-output tuning's ccq2 rounder with fixed scales).
    Returns E QuantizedTensors, in order.
    """
    e_all = len(weights)
    names = list(names) if names is not None else [f"expert {e}" for e in range(e_all)]
    if len(stats) != e_all or len(names) != e_all:
        raise CodecError(f"{e_all} expert weights with {len(stats)} statistics and {len(names)} names")
    if not damp > 0:
        raise CodecError(f"{names[0]}: GPTQ damping must be positive, got {damp}")
    shapes = {tuple(w.shape) for w in weights}
    if len(shapes) != 1:
        raise CodecError(f"{names[0]}: experts batched together must share one shape, got {sorted(shapes)}")
    cls = rounder or expert_rounder_class(codec)
    if cls is None:  # a codec with per-column rounding only: the reference, expert by expert
        return [gptq_encode(codec, weights[e], stats[e], damp=damp, block_size=block_size, act_order=act_order,
                            name=names[e]) for e in range(e_all)]
    n, k = next(iter(shapes))
    out: list[QuantizedTensor] = []
    chunk = experts_per_chunk(n, k, budget or chunk_budget(weights[0].device))
    for c0 in range(0, e_all, chunk):
        c1 = min(c0 + chunk, e_all)
        out += _encode_chunk(codec, cls, weights[c0:c1], stats[c0:c1], names[c0:c1], damp, block_size, act_order)
    return out


def _encode_chunk(codec, cls, weights, stats, names, damp, block_size, act_order) -> list[QuantizedTensor]:
    """One chunk of experts: per expert the factor (or the fallback), then one batched loop."""
    e_all = len(weights)
    out: list[QuantizedTensor | None] = [None] * e_all
    live: list[int] = []
    unit = cls.unit
    w_nk = w0 = vs = vdiag = order = None
    factored: dict[int, tuple[int, torch.Tensor, torch.Tensor | None]] = {}  # id(Hessian) -> (slot, dead, perm)
    for e in range(e_all):
        weight = check_weight(weights[e], names[e])  # [N, K] float32 (the caller's tensor if it is one)
        n, k = weight.shape
        scale = hessian_scale(stats[e], k, names[e])
        if scale is None:
            out[e] = codec.encode(weights[e], stats[e], name=names[e])
            continue
        if k % unit:
            raise CodecError(f"{names[e]}: K={k} is not a multiple of the {codec.name} rounding unit {unit}")
        i, v = len(live), None
        shared = factored.get(id(stats[e].hessian))  # gate and up of an expert read one input: one factor
        if shared is None:
            h = stats[e].hessian.to(device=weight.device, dtype=torch.float32)
            dead = h.diagonal() <= 0  # inputs that never fire: GPTQ zeroes them (see gptq.py)
            perm = act_order_permutation(h, unit) if act_order else None
            v = upper_factor(h if perm is None else h[perm][:, perm], scale, damp, names[e])  # [K, K] upper, loop order
            del h
            if v is None:
                out[e] = codec.encode(weights[e], stats[e], name=names[e])
                continue
        else:
            dead, perm = shared[1], shared[2]
        if w_nk is None:  # the chunk's buffers, filled expert by expert
            w_nk = weight.new_empty(e_all, n, k)  # W, dead inputs zeroed, K order
            w0 = weight.new_empty(e_all, k, n)  # W^T, loop order
            vs = weight.new_empty(e_all, k, k)  # V_lj / V_jj
            vdiag = weight.new_empty(e_all, k)  # V_jj
            order = torch.empty(e_all, k, dtype=torch.int64, device=weight.device) if act_order else None
        w_nk[i] = weight
        w_nk[i][:, dead] = 0.0
        w0[i] = (w_nk[i] if perm is None else w_nk[i][:, perm]).t()
        if v is None:  # the factor of an earlier slot, computed from the same Hessian
            vdiag[i], vs[i] = vdiag[shared[0]], vs[shared[0]]
        else:
            vdiag[i] = v.diagonal()
            torch.div(v, vdiag[i][None, :], out=vs[i])
            factored[id(stats[e].hessian)] = (i, dead, perm)
        if order is not None:
            order[i] = perm
        live.append(e)
        del v
    if live:
        m = len(live)
        qs = _batched_loop(codec, cls, w_nk[:m], w0[:m], vs[:m], vdiag[:m], None if order is None else order[:m],
                           [stats[e] for e in live], block_size, act_order, names[live[0]])
        for e, q in zip(live, qs):
            if not _finite(q):
                log.warning("%s: GPTQ produced non-finite values; rounding to nearest", names[e])
                q = codec.encode(weights[e], stats[e], name=names[e])
            out[e] = q
    return out


def _batched_loop(codec, cls, w_nk, w0, vs, vdiag, order, stats, block_size, act_order, name):
    """w_nk: [E, N, K] dead inputs zeroed; w0: [E, K, N] the same, transposed, loop order;
    vs: [E, K, K]; vdiag: [E, K]; order: [E, K] or None."""
    rounder = cls(codec, w_nk, order, stats)  # keeps what it needs of W (scales, grids), not W
    unit, group = rounder.unit, 0 if act_order else rounder.group
    if block_size <= 0 or block_size % unit or (group and block_size % group):
        raise CodecError(f"{name}: block_size {block_size} must be a positive multiple of {max(unit, group)}")
    w = w_nk.view(w0.shape).copy_(w0)  # the current weights, in W's memory (touching fresh pages is slow)
    expert_column_loop(w0, w, vs, vdiag, rounder, block_size, inner_block(unit, group), group)
    return rounder.result()
