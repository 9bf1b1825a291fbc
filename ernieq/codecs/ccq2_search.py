"""The convolutional code behind ``ccq2`` and the encoder's search steps.

Shape legend: N output features, K input features, G groups of 64 weights along
K per output channel; a *quad* is 4 K-consecutive weights, the unit one byte
encodes (16 quads per group). Weights and targets here are float32.

The code. One byte ``b`` of output channel ``n`` expands to a 15-bit integer
``c = floor(b * code_scale[n] + code_zp[n] + 0.5)`` whose four overlapping 6-bit
windows are the four weights: ``q_j = ((c >> s_j) & 0x3F) - 32``, ``s = (9, 6, 3, 0)``.
Written in octal digits ``c = d4 d3 d2 d1 d0``, ``q_j + 32 = 8 d(4-j) + d(3-j)``:
neighbours share a digit, a rate-3-bits-per-weight trellis of which only the 256
words ``code_words(code_scale, code_zp)`` are reachable per channel.

The search (each step a function a GPTQ loop can call on its own):

1. ``choose_code_grid``: per channel, the (code_scale, code_zp) pair among a few
   candidates whose 256 words fit that channel best at the starting scales.
2. ``fit_group_scales``: per group, a continuous scale by alternating exact byte
   choice and the least-squares scale for those bytes (Lloyd iterations; the
   error never grows), started from the group RMS and from its absolute max, the
   better of the two kept: groups with an outlier keep it instead of clipping it
   when that costs less error.
3. ``choose_super_scale`` / ``choose_nibbles``: the stored scale is
   ``nibble * super_scale`` (nibble 1..15, or 0 for a group that is all zero);
   the super scale maps the largest group scale to nibble 15, and each group
   tries the nibbles around its continuous scale, keeping the one with the least
   error measured after the byte choice.
4. ``refine_super_scale``: the least-squares super scale for the chosen nibbles
   and bytes, rounded to its storage dtype, kept per channel when it lowers the error.

Every error is ``sum_k imp[k] * (W[n, k] - W_hat[n, k])^2``, ``imp`` the per-input
importance (the Hessian diagonal when calibration statistics exist, else 1).
"""

from __future__ import annotations

import torch

from ernieq.codecs.base import CodecError

CODE_SHIFTS = (9, 6, 3, 0)  # q_j = ((c >> s_j) & 0x3F) - 32
CODE_MASK = 0x3F
CODE_BIAS = 32
CODE_MAX = 2**15 - 1  # c must fit FastDeploy's int16 cast
NUM_WORDS = 256  # one byte per quad
QUAD = 4  # weights per byte
GROUP = 64  # weights per local scale
QUADS_PER_GROUP = GROUP // QUAD
NIBBLE_MAX = 15
Q_ABS_MAX = 31.0  # the largest |q| of a code word (q in [-32, 31]) used to start from amax

# float32 elements of one [rows, M, 256] score block: cache-sized on a CPU (2 MiB),
# large on an accelerator (128 MiB) where each block costs kernel launches
CPU_SCORE_BLOCK = 1 << 19
ACCELERATOR_SCORE_BLOCK = 1 << 25


def expand_codes(b: torch.Tensor, code_scale: torch.Tensor, code_zp: torch.Tensor) -> torch.Tensor:
    """The code words of stored bytes, computed in float32 as a kernel does.

    b: uint8 (or integer) [..., M]; code_scale, code_zp: float32 broadcastable to
    [..., 1] (one value per output channel). Returns int32 q [..., M, 4] in [-32, 31].
    """
    cs = torch.as_tensor(code_scale, dtype=torch.float32, device=b.device)
    zp = torch.as_tensor(code_zp, dtype=torch.float32, device=b.device)
    c = torch.floor(b.to(torch.float32) * cs + zp + 0.5).to(torch.int32)  # c = floor(b * cs + zp + 0.5)
    shifts = torch.tensor(CODE_SHIFTS, dtype=torch.int32, device=b.device)
    return ((c.unsqueeze(-1) >> shifts) & CODE_MASK) - CODE_BIAS  # q_j = ((c >> s_j) & 0x3F) - 32


def code_words(code_scale: torch.Tensor | float, code_zp: torch.Tensor | float) -> torch.Tensor:
    """The 256 reachable q-vectors of a code grid.

    code_scale, code_zp: float32 [...] (or Python floats). Returns int32 [..., 256, 4]:
    row ``b`` is what byte ``b`` decodes to before the local scale.
    """
    cs = torch.as_tensor(code_scale, dtype=torch.float32)
    zp = torch.as_tensor(code_zp, dtype=torch.float32, device=cs.device)
    b = torch.arange(NUM_WORDS, dtype=torch.int32, device=cs.device)
    return expand_codes(b, cs.unsqueeze(-1), zp.unsqueeze(-1))  # [..., 256, 4]


def check_code_grid(code_scale: torch.Tensor, code_zp: torch.Tensor) -> None:
    """Fail loudly on a grid whose codes a kernel could compute differently.

    code_scale, code_zp: float32 [...]. Requires ``0 <= c <= 32767`` for every byte
    (FastDeploy's Triton kernel casts c to int16) and ``b * code_scale + code_zp + 0.5``
    exact in float32 (dyadic values with few bits), so that a kernel that fuses the
    multiply-add (FMA) and one that rounds twice both get the same ``c``.
    """
    cs = torch.as_tensor(code_scale, dtype=torch.float32).reshape(-1, 1)
    zp = torch.as_tensor(code_zp, dtype=torch.float32, device=cs.device).reshape(-1, 1)
    b = torch.arange(NUM_WORDS, dtype=torch.float32, device=cs.device)
    prod, total = b * cs, b * cs + zp  # each step rounded in float32
    exact_prod = b.double() * cs.double()  # float64 holds these exactly (8 + 24 bits)
    exact_total = exact_prod + zp.double()
    exact = (
        torch.equal(prod.double(), exact_prod)
        and torch.equal(total.double(), exact_total)
        and torch.equal((total + 0.5).double(), exact_total + 0.5)
    )
    if not exact:
        raise CodecError(
            "ccq2: b * code_scale + code_zp + 0.5 is not exact in float32 for this code grid "
            "(a fused multiply-add would decode differently); use multiples of 1/64, e.g. 120.0 / 540.0"
        )
    c = torch.floor(exact_total + 0.5)
    if bool((c < 0).any()) or bool((c > CODE_MAX).any()):
        raise CodecError(f"ccq2: code_scale/code_zp give codes outside [0, {CODE_MAX}] (int16 in FastDeploy)")


def best_bytes(
    target: torch.Tensor, table: torch.Tensor, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """For every 4-vector of ``target``, the byte whose code word is nearest (exhaustive over 256).

    target: float32 [B, M, 4] in code units (weights divided by their local scale).
    table: code words [256, 4] shared, or [B, 256, 4] one per row of ``target``.
    weights: per-weight importance, broadcastable to [B, M, 4] (e.g. [M, 4]), or None for 1.
    Returns bytes uint8 [B, M] and err float32 [B, M] = sum_j w_j (target_j - t_j)^2.

    The score of word t is ``sum_j w_j t_j^2 - 2 w_j y_j t_j`` (the error less the
    constant ``sum w y^2``), one matmul of ``[w, w y]`` with ``[t^2; -2 t]``, taken in
    blocks of rows small enough to stay in cache.
    """
    if target.ndim != 3 or target.shape[-1] != QUAD:
        raise CodecError(f"ccq2 best_bytes: target must be [B, M, 4], got {tuple(target.shape)}")
    if table.ndim not in (2, 3) or tuple(table.shape[-2:]) != (NUM_WORDS, QUAD):
        raise CodecError(f"ccq2 best_bytes: table must be [256, 4] or [B, 256, 4], got {tuple(table.shape)}")
    rows, m = target.shape[:2]
    t = table.to(device=target.device, dtype=torch.float32)
    if t.ndim == 3 and t.shape[0] != rows:
        raise CodecError(f"ccq2 best_bytes: {t.shape[0]} tables for {rows} rows of target")
    tt = t.transpose(-1, -2)  # [(B,) 4, 256]
    if weights is None:
        w = None
        coef = torch.cat([(tt * tt).sum(-2, keepdim=True), -2.0 * tt], -2)  # [(B,) 5, 256]: |t|^2, -2t
    else:
        w = torch.broadcast_to(weights.to(device=target.device, dtype=torch.float32), target.shape)
        coef = torch.cat([tt * tt, -2.0 * tt], -2)  # [(B,) 8, 256]: t^2, -2t
    budget = CPU_SCORE_BLOCK if target.device.type == "cpu" else ACCELERATOR_SCORE_BLOCK
    step = max(1, budget // max(1, m * NUM_WORDS))
    out_b = torch.empty(rows, m, dtype=torch.uint8, device=target.device)
    out_e = torch.empty(rows, m, dtype=torch.float32, device=target.device)
    for lo in range(0, rows, step):
        hi = min(rows, lo + step)
        y = target[lo:hi]  # [R, M, 4]
        if w is None:
            lhs = torch.cat([torch.ones_like(y[..., :1]), y], -1)  # [R, M, 5]: 1, y
        else:
            lhs = torch.cat([w[lo:hi], w[lo:hi] * y], -1)  # [R, M, 8]: w, w y
        c = coef if coef.ndim == 2 else coef[lo:hi]
        idx = (lhs @ c).argmin(-1)  # [R, M]
        d = y - _pick(t if t.ndim == 2 else t[lo:hi], idx)  # [R, M, 4]
        out_e[lo:hi] = (d * d).sum(-1) if w is None else (w[lo:hi] * d * d).sum(-1)
        out_b[lo:hi] = idx.to(torch.uint8)
    return out_b, out_e


def _pick(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """table: [256, 4] or [R, 256, 4]; idx: int64 [R, M]. Returns the chosen words [R, M, 4]."""
    if table.ndim == 2:
        return table[idx]
    return torch.gather(table, 1, idx.unsqueeze(-1).expand(-1, -1, QUAD))


def round_to_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x rounded to ``dtype`` (the storage dtype of super_scales) and back to float32."""
    return x.to(dtype).to(torch.float32)


def group_errors(
    x: torch.Tensor, imp: torch.Tensor | None, table: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best bytes and their error for every group at the given local scales.

    x: [N, G, 16, 4] weights; imp: [G, 16, 4] importance or None; table: [256, 4]
    or [N, 256, 4]; scale: [N, G] local scales (0 means the group decodes to 0).
    Returns bytes uint8 [N, G, 16] and err float32 [N, G] in weight units:
    ``err = sum imp * (x - scale * t_b)^2``.
    """
    n, g = scale.shape
    zero = scale <= 0
    safe = torch.where(zero, torch.ones_like(scale), scale)  # [N, G]
    y = (x / safe[..., None, None]).reshape(n, g * QUADS_PER_GROUP, QUAD)  # code units
    w = None if imp is None else imp.reshape(g * QUADS_PER_GROUP, QUAD)
    b, e = best_bytes(y, table, w)
    err = e.reshape(n, g, QUADS_PER_GROUP).sum(-1) * safe * safe  # [N, G]
    err = torch.where(zero, energy(x, imp), err)  # a zero scale decodes to 0
    return b.reshape(n, g, QUADS_PER_GROUP), err


def energy(x: torch.Tensor, imp: torch.Tensor | None) -> torch.Tensor:
    """x: [N, G, 16, 4]. Returns [N, G] = sum imp * x^2 (the error of decoding to 0)."""
    xx = x * x if imp is None else imp * x * x
    return xx.sum((-1, -2))


def words_of(table: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """table: [256, 4] or [N, 256, 4]; b: uint8 [N, G, 16]. Returns float32 words [N, G, 16, 4]."""
    n = b.shape[0]
    t = _pick(table.float(), b.reshape(n, -1).long()) if table.ndim == 3 else table.float()[b.long()]
    return t.reshape(*b.shape, QUAD)


def start_scales(x: torch.Tensor, imp: torch.Tensor | None, units_per_std: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Two starting local scales per group. x: [N, G, 16, 4]; imp: [G, 16, 4] or None.

    Returns (rms_scale, amax_scale), each [N, G]: the (importance-weighted) group
    RMS over ``units_per_std`` code units, and the group's absolute max over 31
    (nothing clipped). A group whose importance is all zero gets scale 0.
    """
    if imp is None:
        ms = (x * x).mean((-1, -2))
        amax = x.abs().amax((-1, -2))
    else:
        mass = imp.sum((-1, -2))  # [G]
        ms = energy(x, imp) / torch.where(mass > 0, mass, torch.ones_like(mass))
        amax = (x.abs() * (imp > 0)).amax((-1, -2))  # weights without importance do not count
    return ms.sqrt() / units_per_std, amax / Q_ABS_MAX


def least_squares_scale(x: torch.Tensor, imp: torch.Tensor | None, t: torch.Tensor, dims) -> tuple:
    """(num, den) of the least-squares scale ``s = sum imp x t / sum imp t^2`` over ``dims``."""
    xt, tt = x * t, t * t
    if imp is not None:
        xt, tt = imp * xt, imp * tt
    return xt.sum(dims), tt.sum(dims)


def fit_group_scales(
    x: torch.Tensor, imp: torch.Tensor | None, table: torch.Tensor, scale: torch.Tensor, steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd iterations on each group's continuous scale: bytes for the scale, then
    the least-squares scale for the bytes. The error never grows.

    x: [N, G, 16, 4]; imp: [G, 16, 4] or None; table: [256, 4] or [N, 256, 4];
    scale: [N, G] start. Returns (scale [N, G], err [N, G]) after ``steps`` updates.
    """
    b, err = group_errors(x, imp, table, scale)
    for _ in range(steps):
        num, den = least_squares_scale(x, imp, words_of(table, b), (-1, -2))  # [N, G]
        ok = (den > 0) & (num > 0)
        new = torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), scale)  # s = sum xt / sum t^2
        b_new, err_new = group_errors(x, imp, table, new)
        better = err_new < err
        scale = torch.where(better, new, scale)
        err = torch.where(better, err_new, err)
        b = torch.where(better[..., None], b_new, b)
    return scale, err


def choose_super_scale(group_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """group_scale: [N, G] continuous local scales. Returns the super scale [N]
    (float32 holding a ``dtype`` value): the largest group scale maps to nibble 15;
    a channel without a positive scale gets 1.0."""
    top = group_scale.amax(-1) / NIBBLE_MAX  # super = max_g s_g / 15
    return round_to_dtype(torch.where(top > 0, top, torch.ones_like(top)), dtype)


def choose_nibbles(
    x: torch.Tensor,
    imp: torch.Tensor | None,
    table: torch.Tensor,
    super_scale: torch.Tensor,
    group_scale: torch.Tensor,
    window: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per group, the nibble with the least error among those around ``group_scale / super_scale``.

    Candidates: ``floor(r) + d`` for ``d = 1 - window .. window`` clamped to 1..15,
    and 0 (the group decodes to 0). x: [N, G, 16, 4]; super_scale: [N];
    group_scale: [N, G]. Returns nibble int64 [N, G], bytes uint8 [N, G, 16], err [N, G].
    """
    base = torch.floor(group_scale / super_scale[:, None])  # [N, G]
    best_n = torch.zeros_like(base, dtype=torch.int64)
    best_e = energy(x, imp)  # nibble 0
    best_b = torch.zeros(*base.shape, QUADS_PER_GROUP, dtype=torch.uint8, device=x.device)
    tried: list[torch.Tensor] = []
    for d in range(1 - window, window + 1):
        nib = (base + d).clamp(1, NIBBLE_MAX).to(torch.int64)  # [N, G]
        if any(torch.equal(nib, t) for t in tried):
            continue
        tried.append(nib)
        b, e = group_errors(x, imp, table, nib * super_scale[:, None])  # local scale = nibble * super
        better = e < best_e
        best_n = torch.where(better, nib, best_n)
        best_e = torch.where(better, e, best_e)
        best_b = torch.where(better[..., None], b, best_b)
    return best_n, best_b, best_e


def refine_super_scale(
    x: torch.Tensor,
    imp: torch.Tensor | None,
    table: torch.Tensor,
    super_scale: torch.Tensor,
    nibble: torch.Tensor,
    b: torch.Tensor,
    err: torch.Tensor,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The least-squares super scale for fixed nibbles and bytes, rounded to ``dtype``,
    then the bytes again; kept per channel only where the total error drops.

    x: [N, G, 16, 4]; super_scale: [N]; nibble: [N, G]; b: [N, G, 16]; err: [N, G].
    Returns (super_scale [N], bytes [N, G, 16], err [N, G]).
    """
    t = words_of(table, b) * nibble[..., None, None].float()  # nibble * t  [N, G, 16, 4]
    num, den = least_squares_scale(x, imp, t, (1, 2, 3))  # [N]
    ok = (den > 0) & (num > 0)
    new = torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), super_scale)
    new = round_to_dtype(new, dtype)
    b_new, e_new = group_errors(x, imp, table, nibble * new[:, None])
    better = e_new.sum(-1) < err.sum(-1)  # [N]
    return (
        torch.where(better, new, super_scale),
        torch.where(better[:, None, None], b_new, b),
        torch.where(better[:, None], e_new, err),
    )


def choose_code_grid(
    x: torch.Tensor, imp: torch.Tensor | None, tables: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """Per channel, the index of the candidate code grid with the least error at ``scale``.

    x: [N, G, 16, 4]; tables: [C, 256, 4] candidate code words; scale: [N, G].
    Returns int64 [N] in 0..C-1.
    """
    totals = torch.stack([group_errors(x, imp, tables[c], scale)[1].sum(-1) for c in range(tables.shape[0])])
    return totals.argmin(0)  # [N]
