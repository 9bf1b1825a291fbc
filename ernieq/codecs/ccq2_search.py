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

The unit of work is one *byte search* (``best_bytes``; ``search`` per group): the
nearest of the 256 words for every quad, one small matmul and one ``amin`` per
block of quads. The encoder (``ccq2.fit``) spends few of them, in these steps,
each a function a GPTQ loop can call on its own:

1. ``choose_code_grid``: per channel, the (code_scale, code_zp) pair among a few
   candidates whose words fit that channel best at the RMS starting scales (one
   search per candidate; the winner's bytes are kept).
2. ``retry_groups``: groups with an outlier also try the scale that keeps their
   absolute max (a search over those groups only), the better kept.
3. ``lloyd_steps`` (optional): the least-squares scale for the bytes, then the
   bytes for that scale. ``fit_group_scales`` is a search plus these steps.
4. ``choose_super_scale`` / ``closed_form_nibbles``: the stored scale is
   ``nibble * super_scale`` (nibble 1..15, or 0 for a group that decodes to 0);
   the super scale maps the largest least-squares group scale to nibble 15, and
   each group takes the nibble whose scale fits its current bytes best, in closed
   form: for fixed words the error is a parabola in the scale (``errors_at``).
   One search then re-picks the bytes for those scales, and ``repick_nibbles``
   moves the few nibbles that the new bytes prefer (a search over those groups).
   ``choose_nibbles`` is the search-per-candidate variant (GPTQ uses it).
5. ``refine_super_scale`` (optional): the least-squares super scale for the chosen
   nibbles and bytes, rounded to its storage dtype, kept per channel when it lowers the error.

Every error is ``sum_k imp[k] * (W[n, k] - W_hat[n, k])^2``, ``imp`` the per-input
importance (the Hessian diagonal when calibration statistics exist, else 1).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

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

# float32 scores in one block of the byte search: cache-sized on a CPU (2 MiB),
# large on an accelerator (128 MiB) where each block costs kernel launches
CPU_SCORE_BLOCK = 1 << 19
ACCELERATOR_SCORE_BLOCK = 1 << 25
BYTE_MASK = NUM_WORDS - 1  # the low 8 bits of a search key hold the byte

# The quarter-unit search: targets rounded to 1/4 code unit and clamped to
# +-QUARTER_LIMIT quarters, so that every key 256 * (2 |t|^2 - Y . t) + b and every
# partial sum of its matmul is an integer below 2^24, exact in float32:
# 256 * (2 * 4 * 32^2 + 4 * 440 * 32) + 255 < 2^24.
QUARTERS = 4
QUARTER_LIMIT = 440


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
    target: torch.Tensor,
    table: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    quarter_units: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For every 4-vector of ``target``, the byte whose code word is nearest (exhaustive over 256).

    target: float32 [B, M, 4] in code units (weights divided by their local scale).
    table: code words [256, 4] shared, or [B, 256, 4] one per row of ``target``.
    weights: per-weight importance, broadcastable to [B, M, 4] (e.g. [M, 4]), or None for 1.
    quarter_units: compare the words with the target rounded to 1/4 code unit
        (clamped to +-110): an exact integer search, faster; the chosen word costs
        ~0.02 % more error on average. Needs integer words in [-32, 32] in one shared
        [256, 4] table and no weights.
    Returns bytes uint8 [B, M] and err float32 [B, M] = sum_j w_j (target_j - t_j)^2,
    the error of the chosen word against the unrounded target.
    """
    if target.ndim != 3 or target.shape[-1] != QUAD:
        raise CodecError(f"ccq2 best_bytes: target must be [B, M, 4], got {tuple(target.shape)}")
    _check_table(table, target.shape[0])
    y = target.to(torch.float32)
    w = None if weights is None else torch.broadcast_to(weights.to(device=y.device, dtype=torch.float32), y.shape)
    if quarter_units:
        _check_quarter_unit_search(table, w)
        yq = torch.round(y * QUARTERS).clamp_(-QUARTER_LIMIT, QUARTER_LIMIT)  # Y = round(4 y)
        idx = _quarter_unit_bytes(yq.reshape(-1, QUAD), table.to(y.device)).reshape(y.shape[:2])
    else:
        idx = _nearest_bytes(y, w, table.to(device=y.device, dtype=torch.float32))
    d = y - _pick(table.to(device=y.device, dtype=torch.float32), idx, table.ndim == 3)  # [B, M, 4]
    err = (d * d).sum(-1) if w is None else (w * d * d).sum(-1)
    return idx.to(torch.uint8), err


def _check_table(table: torch.Tensor, rows: int) -> None:
    if table.ndim not in (2, 3) or tuple(table.shape[-2:]) != (NUM_WORDS, QUAD):
        raise CodecError(f"ccq2 byte search: table must be [256, 4] or [B, 256, 4], got {tuple(table.shape)}")
    if table.ndim == 3 and table.shape[0] != rows:
        raise CodecError(f"ccq2 byte search: {table.shape[0]} tables for {rows} rows of target")


def _check_quarter_unit_search(table: torch.Tensor, weights: torch.Tensor | None) -> None:
    if weights is not None or table.ndim != 2 or table.is_floating_point():
        raise CodecError("ccq2 byte search: quarter_units needs one integer [256, 4] table and no weights")
    if int(table.abs().max()) > CODE_BIAS:
        raise CodecError("ccq2 byte search: quarter_units needs code words in [-32, 32]")


def _score_block(device: torch.device) -> int:
    """How many scores one block of the search holds on this device."""
    return CPU_SCORE_BLOCK if device.type == "cpu" else ACCELERATOR_SCORE_BLOCK


def _integer_exact_dtype(device: torch.device) -> torch.dtype:
    """float32 where float32 matmuls are plain IEEE (integers below 2^24 stay exact), else float64."""
    backend = torch.backends.cuda.matmul if device.type == "cuda" else getattr(torch.backends.mkldnn, "matmul", None)
    ieee = torch.get_float32_matmul_precision() == "highest"
    ieee = ieee and getattr(backend, "fp32_precision", "none") in ("none", "ieee")
    return torch.float32 if ieee else torch.float64


def _quarter_unit_bytes(yq: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """yq: [Q, 4] targets in quarter code units, integer-valued, |yq| <= 440; table:
    integer words [256, 4]. Returns int64 bytes [Q].

    With Y = round(4 y), ``sum (y - t)^2 = |y|^2 + (2 |t|^2 - Y . t) / 2`` up to the
    rounding, so the byte minimises the integer ``2 |t|^2 - Y . t``; the matmul
    ``Y @ -256 t + (512 |t|^2 + b)`` gives ``256 * that + b`` exactly, and one
    ``amin`` per quad yields both the least error and its byte (ties: the lower byte).
    """
    dtype = _integer_exact_dtype(yq.device)
    t = table.to(dtype)  # [256, 4]
    coef = (-NUM_WORDS * t.T).contiguous()  # [4, 256]
    bias = 2 * NUM_WORDS * (t * t).sum(-1) + torch.arange(NUM_WORDS, dtype=dtype, device=yq.device)  # [256]
    lhs = yq.to(dtype).contiguous()
    q = lhs.shape[0]
    step = max(1, _score_block(yq.device) // NUM_WORDS)
    buf = torch.empty(min(q, step), NUM_WORDS, dtype=dtype, device=yq.device)
    key = torch.empty(q, dtype=dtype, device=yq.device)
    for lo in range(0, q, step):
        hi = min(q, lo + step)
        scores = torch.addmm(bias, lhs[lo:hi], coef, out=buf[: hi - lo])  # [R, 256]: 256 (2|t|^2 - Y.t) + b
        torch.amin(scores, -1, out=key[lo:hi])
    return (key.to(torch.int32) & BYTE_MASK).long()  # 256 * s + b has b in its low 8 bits (s may be < 0)


def _nearest_bytes(y: torch.Tensor, w: torch.Tensor | None, t: torch.Tensor) -> torch.Tensor:
    """y: float32 [B, M, 4]; w: [B, M, 4] or None; t: float32 [(B,) 256, 4]. Returns int64 bytes [B, M].

    The error of word t is one row of a matmul, ``[sum w y^2, w y, w] . [1; -2t; t^2]``
    (``[sum y^2, y, 1] . [1; -2t; |t|^2]`` unweighted), taken in blocks of quads small
    enough to stay in cache. Errors are >= 0, so their float32 bit patterns order as
    int32 do: the byte replaces the lowest 8 mantissa bits and one integer ``amin``
    yields the best byte (``argmin`` is about 10x slower on a CPU). The choice is
    exact up to 2^-15 of the error (and float32 rounding of the matmul).
    """
    tt = t.transpose(-1, -2)  # [(B,) 4, 256]
    ones = torch.ones_like(tt[..., :1, :])  # [(B,) 1, 256]
    if w is None:
        lhs = torch.cat([(y * y).sum(-1, keepdim=True), y, torch.ones_like(y[..., :1])], -1)  # [B, M, 6]
        coef = torch.cat([ones, -2.0 * tt, (tt * tt).sum(-2, keepdim=True)], -2)  # [(B,) 6, 256]
    else:
        wy = w * y
        lhs = torch.cat([(wy * y).sum(-1, keepdim=True), wy, w], -1)  # [B, M, 9]
        coef = torch.cat([ones, -2.0 * tt, tt * tt], -2)  # [(B,) 9, 256]
    rows, m = y.shape[:2]
    if t.ndim == 2:  # one table: blocks of quads
        return least_score_bytes(lhs.reshape(rows * m, -1), coef).reshape(rows, m)
    byte_ids = torch.arange(NUM_WORDS, dtype=torch.int32, device=y.device)
    step = max(1, _score_block(y.device) // max(1, m * NUM_WORDS))  # a table per row: blocks of rows
    key = torch.empty(rows, m, dtype=torch.int32, device=y.device)
    for lo in range(0, rows, step):
        key[lo : lo + step] = _least_keys(torch.bmm(lhs[lo : lo + step], coef[lo : lo + step]), byte_ids)
    return (key & BYTE_MASK).long().reshape(rows, m)


def least_score_bytes(lhs: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """lhs: float32 [R, F]; coef: float32 [F, 256], so that ``lhs @ coef`` are the errors (>= 0 up
    to rounding) of the 256 words for each row. Returns int64 bytes [R], the least error's
    (``_least_keys``: ties and errors within 2^-15 of each other go to the lower byte), in
    blocks of rows that stay in cache."""
    byte_ids = torch.arange(NUM_WORDS, dtype=torch.int32, device=lhs.device)
    rows = lhs.shape[0]
    step = max(1, _score_block(lhs.device) // NUM_WORDS)
    buf = torch.empty(min(rows, step), NUM_WORDS, dtype=lhs.dtype, device=lhs.device)  # reused: no fresh pages
    key = torch.empty(rows, dtype=torch.int32, device=lhs.device)
    for lo in range(0, rows, step):
        hi = min(rows, lo + step)
        key[lo:hi] = _least_keys(torch.mm(lhs[lo:hi], coef, out=buf[: hi - lo]), byte_ids)  # [R, 256] errors
    return (key & BYTE_MASK).long()


def _least_keys(scores: torch.Tensor, byte_ids: torch.Tensor) -> torch.Tensor:
    """scores: float32 [..., 256] errors (>= 0 up to rounding), overwritten. Returns int32 [...]:
    the least ``(bits(score) & ~0xFF) | byte``, whose low 8 bits are the best byte."""
    bits = scores.view(torch.int32)
    bits.bitwise_and_(~BYTE_MASK).bitwise_or_(byte_ids)  # error bits above, byte below
    return bits.amin(-1)


def _pick(table: torch.Tensor, idx: torch.Tensor, per_row: bool) -> torch.Tensor:
    """table: [256, ...] shared, or [R, 256, ...] when ``per_row``; idx: int64 [R, M].
    Returns the chosen entries [R, M, ...]."""
    if not per_row:
        flat = idx.reshape(-1)
        picked = torch.index_select(table, 0, flat) if table.ndim == 1 else torch.nn.functional.embedding(flat, table)
        return picked.reshape(*idx.shape, *table.shape[1:])  # a plain gather (advanced indexing is ~3x slower)
    rows = torch.arange(idx.shape[0], device=idx.device)[:, None]  # [R, 1]
    return table[rows, idx]


def round_to_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x rounded to ``dtype`` (the storage dtype of super_scales) and back to float32."""
    return x.to(dtype).to(torch.float32)


def energy(x: torch.Tensor, imp: torch.Tensor | None) -> torch.Tensor:
    """x: [N, G, 16, 4]. Returns [N, G] = sum imp * x^2 (the error of decoding to 0)."""
    xx = x * x if imp is None else imp * x * x
    return xx.sum((-1, -2))


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


@dataclass
class GroupChoice:
    """The current choice of every group of N channels, and what its error at any scale needs.

    scale: float32 [N, G] local scale (0: the group decodes to 0); codes: uint8 [N, G, 16];
    xt, tt: float32 [N, G], the imp-weighted ``<x, t>`` and ``<t, t>`` of the codes'
    words t, so that the error at scale s is ``E - 2 s xt + s^2 tt`` (E = ``energy``);
    err: float32 [N, G], that error at ``scale``.
    """

    scale: torch.Tensor
    codes: torch.Tensor
    xt: torch.Tensor
    tt: torch.Tensor
    err: torch.Tensor

    def where(self, take: torch.Tensor, other: GroupChoice) -> GroupChoice:
        """Per group (take: bool [N, G]) ``other``'s choice, else this one."""
        names = [f.name for f in dataclasses.fields(self)]
        return GroupChoice(**{k: _where_groups(take, getattr(other, k), getattr(self, k)) for k in names})

    def better_of(self, other: GroupChoice) -> GroupChoice:
        """Per group the choice with the smaller error."""
        return self.where(other.err < self.err, other)

    def rows(self, idx: torch.Tensor) -> GroupChoice:
        """The channels ``idx`` (int64 [N']) only."""
        return GroupChoice(**{f.name: getattr(self, f.name)[idx] for f in dataclasses.fields(self)})


def _where_groups(take: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """take: bool [N, G]; a, b: [N, G, ...]. Per group a where take, else b."""
    return torch.where(take.reshape(*take.shape, *([1] * (a.ndim - take.ndim))), a, b)


def errors_at(e0: torch.Tensor, xt: torch.Tensor, tt: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The error of fixed words at scale s, all [N, G]: ``E - 2 s <x,t> + s^2 <t,t>`` (>= 0)."""
    return (e0 - 2 * scale * xt + scale * scale * tt).clamp(min=0)


def search(
    x: torch.Tensor,
    imp: torch.Tensor | None,
    table: torch.Tensor,
    scale: torch.Tensor,
    e0: torch.Tensor,
    *,
    quarter_units: bool = False,
) -> GroupChoice:
    """One byte search: the best bytes of every group at the given local scales.

    x: [N, G, 16, 4] weights; imp: [G, 16, 4] importance (or [N, G, 16, 4], one per
    channel) or None; table: [256, 4] or [N, 256, 4]; scale: [N, G] local scales (0: the
    group decodes to 0, whatever its bytes); e0: [N, G] ``energy(x, imp)``;
    quarter_units: as in ``best_bytes``.
    """
    n, g = scale.shape
    zero = scale <= 0
    safe = torch.where(zero, torch.ones_like(scale), scale)[..., None, None]  # [N, G, 1, 1]
    if quarter_units:
        _check_quarter_unit_search(table, imp)
        yq = torch.mul(x, QUARTERS / safe).round_().clamp_(-QUARTER_LIMIT, QUARTER_LIMIT)  # Y = round(4 x / s)
        idx = _quarter_unit_bytes(yq.reshape(-1, QUAD), table.to(x.device)).reshape(n, -1)  # [N, G * 16]
    else:
        _check_table(table, n)
        y = (x / safe).reshape(n, g * QUADS_PER_GROUP, QUAD)  # code units
        w = None if imp is None else imp.expand(n, g, QUADS_PER_GROUP, QUAD).reshape(n, g * QUADS_PER_GROUP, QUAD)
        idx = _nearest_bytes(y, w, table.to(device=x.device, dtype=torch.float32))  # [N, G * 16]
    words, per_row = table.to(device=x.device, dtype=torch.float32), table.ndim == 3
    t = _pick(words, idx, per_row).reshape(x.shape)  # [N, G, 16, 4]
    if imp is None:
        xt = (x * t).sum((-1, -2))  # <x, t>
        tt = _pick((words * words).sum(-1), idx, per_row).reshape(n, g, QUADS_PER_GROUP).sum(-1)  # <t, t>
    else:
        it = imp * t
        xt, tt = (it * x).sum((-1, -2)), (it * t).sum((-1, -2))
    codes = idx.to(torch.uint8).reshape(n, g, QUADS_PER_GROUP)
    return GroupChoice(scale, codes, xt, tt, errors_at(e0, xt, tt, torch.where(zero, 0.0, scale)))


def group_errors(
    x: torch.Tensor,
    imp: torch.Tensor | None,
    table: torch.Tensor,
    scale: torch.Tensor,
    *,
    quarter_units: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best bytes and their error for every group at the given local scales (one byte search).

    x: [N, G, 16, 4]; imp: [G, 16, 4] or None; table: [256, 4] or [N, 256, 4];
    scale: [N, G]. Returns bytes uint8 [N, G, 16] and err float32 [N, G] in weight
    units: ``err = sum imp * (x - scale * t_b)^2``.
    """
    choice = search(x, imp, table, scale, energy(x, imp), quarter_units=quarter_units)
    return choice.codes, choice.err


def least_squares(choice: GroupChoice) -> torch.Tensor:
    """Per group the scale that fits its words best, ``s = <x, t> / <t, t>``, or its
    current scale where that is not positive. Returns [N, G]."""
    ok = (choice.tt > 0) & (choice.xt > 0)
    return torch.where(ok, choice.xt / torch.where(ok, choice.tt, torch.ones_like(choice.tt)), choice.scale)


def lloyd_steps(
    x: torch.Tensor,
    imp: torch.Tensor | None,
    table: torch.Tensor,
    e0: torch.Tensor,
    choice: GroupChoice,
    steps: int,
    *,
    quarter_units: bool = False,
) -> GroupChoice:
    """Lloyd iterations on each group's continuous scale: the least-squares scale for
    its bytes, then the bytes for that scale (one search each); the error never grows.

    x: [N, G, 16, 4]; imp: [G, 16, 4] or None; table: [256, 4] or [N, 256, 4]; e0: [N, G].
    """
    for _ in range(steps):
        new = search(x, imp, table, least_squares(choice), e0, quarter_units=quarter_units)
        choice = choice.better_of(new)
    return choice


def fit_group_scales(
    x: torch.Tensor, imp: torch.Tensor | None, table: torch.Tensor, scale: torch.Tensor, steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The bytes at ``scale`` [N, G], then ``steps`` Lloyd iterations (``lloyd_steps``).

    x: [N, G, 16, 4]; imp: [G, 16, 4] or None; table: [256, 4] or [N, 256, 4].
    Returns (scale [N, G], err [N, G]).
    """
    e0 = energy(x, imp)
    choice = lloyd_steps(x, imp, table, e0, search(x, imp, table, scale, e0), steps)
    return choice.scale, choice.err


def retry_groups(
    x: torch.Tensor,
    imp: torch.Tensor | None,
    table: torch.Tensor,
    e0: torch.Tensor,
    choice: GroupChoice,
    which: torch.Tensor,
    other: torch.Tensor,
    *,
    quarter_units: bool = False,
) -> GroupChoice:
    """Try the scale ``other`` [N, G] on the groups ``which`` (bool [N, G]) only, one
    search over those groups; keep the better. imp: [G, 16, 4] or [N, G, 16, 4] or None;
    table: [256, 4] shared (or per row when ``which`` is all true)."""
    if bool(which.all()):
        return choice.better_of(search(x, imp, table, other, e0, quarter_units=quarter_units))
    if table.ndim != 2:
        raise CodecError("ccq2 retry_groups: needs one shared [256, 4] table")
    rows, groups = which.nonzero(as_tuple=True)  # [M] each
    if rows.numel() == 0:
        return choice
    sub_imp = None if imp is None else imp[groups] if imp.ndim == 3 else imp[rows, groups]  # [M, 16, 4]
    sub_x = x[rows, groups][None]  # [1, M, 16, 4]: the groups as one channel
    new = search(sub_x, sub_imp, table, other[rows, groups][None], e0[rows, groups][None], quarter_units=quarter_units)
    better = new.err[0] < choice.err[rows, groups]  # [M]
    rows, groups = rows[better], groups[better]
    out = GroupChoice(*(getattr(choice, f.name).clone() for f in dataclasses.fields(choice)))
    for f in dataclasses.fields(choice):
        getattr(out, f.name)[rows, groups] = getattr(new, f.name)[0, better]
    return out


def choose_super_scale(group_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """group_scale: [N, G] continuous local scales. Returns the super scale [N]
    (float32 holding a ``dtype`` value): the largest group scale maps to nibble 15;
    a channel without a positive scale gets 1.0."""
    top = group_scale.amax(-1) / NIBBLE_MAX  # super = max_g s_g / 15
    return round_to_dtype(torch.where(top > 0, top, torch.ones_like(top)), dtype)


def nibble_candidates(group_scale: torch.Tensor, super_scale: torch.Tensor, window: int) -> list[torch.Tensor]:
    """The distinct nibble choices ``floor(r) + d``, ``d = 1 - window .. window``, clamped to
    1..15, around ``r = group_scale / super_scale``. group_scale: [N, G]; super_scale: [N].
    Returns a list of int64 [N, G]."""
    base = torch.floor(group_scale / super_scale[:, None])  # [N, G]
    out: list[torch.Tensor] = []
    for d in range(1 - window, window + 1):
        nib = (base + d).clamp(1, NIBBLE_MAX).to(torch.int64)  # [N, G]
        if not any(torch.equal(nib, t) for t in out):
            out.append(nib)
    return out


def closed_form_nibbles(
    e0: torch.Tensor, choice: GroupChoice, super_scale: torch.Tensor, group_scale: torch.Tensor, window: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, the nibble whose scale ``s = nibble * super`` fits the current bytes best, no search.

    For fixed words the error is a parabola in s, ``E - 2 s <x,t> + s^2 <t,t>`` (``errors_at``).
    Candidates: ``nibble_candidates`` around ``group_scale`` [N, G], and 0 (error E).
    e0: [N, G]; super_scale: [N]. Returns nibble int64 [N, G] and the error of the
    current bytes at that scale [N, G].
    """
    best_e, best_n = e0, torch.zeros_like(e0, dtype=torch.int64)  # nibble 0 decodes to 0: error E
    for nib in nibble_candidates(group_scale, super_scale, window):
        e = errors_at(e0, choice.xt, choice.tt, nib * super_scale[:, None])
        better = e < best_e
        best_n = torch.where(better, nib, best_n)
        best_e = torch.where(better, e, best_e)
    return best_n, best_e


def repick_nibbles(
    x: torch.Tensor,
    imp: torch.Tensor | None,
    table: torch.Tensor,
    e0: torch.Tensor,
    super_scale: torch.Tensor,
    nibble: torch.Tensor,
    choice: GroupChoice,
    window: int,
    *,
    quarter_units: bool = False,
) -> tuple[torch.Tensor, GroupChoice]:
    """The nibbles again in closed form for the current bytes; the groups whose nibble
    moves (a few %) take it, then a search over those groups only re-picks their bytes.

    x: [N, G, 16, 4]; e0: [N, G]; super_scale: [N]; nibble: int64 [N, G]; ``choice.scale``
    is nibble * super_scale. Returns (nibble, choice).
    """
    new_nibble, new_err = closed_form_nibbles(e0, choice, super_scale, least_squares(choice), window)
    moved = (new_nibble != nibble) & (new_err < choice.err)  # [N, G]
    scale = new_nibble * super_scale[:, None]  # [N, G]
    choice = choice.where(moved, GroupChoice(scale, choice.codes, choice.xt, choice.tt, new_err))
    choice = retry_groups(x, imp, table, e0, choice, moved, scale, quarter_units=quarter_units)
    return torch.where(moved, new_nibble, nibble), choice


def choose_nibbles(
    x: torch.Tensor,
    imp: torch.Tensor | None,
    table: torch.Tensor,
    super_scale: torch.Tensor,
    group_scale: torch.Tensor,
    window: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per group, the nibble with the least error among ``nibble_candidates`` and 0,
    each candidate measured after its own byte search.

    x: [N, G, 16, 4]; super_scale: [N]; group_scale: [N, G].
    Returns nibble int64 [N, G], bytes uint8 [N, G, 16], err [N, G].
    """
    e0 = energy(x, imp)
    best_n = torch.zeros_like(group_scale, dtype=torch.int64)
    best_b = torch.zeros(*group_scale.shape, QUADS_PER_GROUP, dtype=torch.uint8, device=x.device)
    best_e = e0  # nibble 0
    for nib in nibble_candidates(group_scale, super_scale, window):
        c = search(x, imp, table, nib * super_scale[:, None], e0)  # local scale = nibble * super
        better = c.err < best_e
        best_n, best_b = torch.where(better, nib, best_n), _where_groups(better, c.codes, best_b)
        best_e = torch.where(better, c.err, best_e)
    return best_n, best_b, best_e


def refine_super_scale(
    x: torch.Tensor,
    imp: torch.Tensor | None,
    table: torch.Tensor,
    e0: torch.Tensor,
    super_scale: torch.Tensor,
    nibble: torch.Tensor,
    choice: GroupChoice,
    dtype: torch.dtype,
    *,
    quarter_units: bool = False,
) -> tuple[torch.Tensor, GroupChoice]:
    """The least-squares super scale for fixed nibbles and bytes, rounded to ``dtype``,
    ``S = sum_g n_g <x,t>_g / sum_g n_g^2 <t,t>_g``, then the bytes again (one search);
    kept per channel only where the total error drops.

    super_scale: [N]; nibble: int64 [N, G]; ``choice.scale`` is nibble * super_scale.
    Returns (super_scale [N], choice).
    """
    nib = nibble.float()
    num, den = (nib * choice.xt).sum(-1), (nib * nib * choice.tt).sum(-1)  # [N]
    ok = (den > 0) & (num > 0)
    new = round_to_dtype(torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), super_scale), dtype)
    fresh = search(x, imp, table, nib * new[:, None], e0, quarter_units=quarter_units)
    better = fresh.err.sum(-1) < choice.err.sum(-1)  # [N], the whole channel
    return torch.where(better, new, super_scale), choice.where(better[:, None].expand_as(nib), fresh)


def choose_code_grid(
    x: torch.Tensor,
    imp: torch.Tensor | None,
    tables: torch.Tensor,
    scale: torch.Tensor,
    e0: torch.Tensor,
    *,
    quarter_units: bool = False,
) -> tuple[torch.Tensor, GroupChoice]:
    """Per channel, the candidate code grid with the least error at ``scale`` (one search per grid).

    x: [N, G, 16, 4]; tables: [C, 256, 4] candidate code words; scale, e0: [N, G].
    Returns the grid index int64 [N] in 0..C-1 and the winner's choice.
    """
    pick = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    best = search(x, imp, tables[0], scale, e0, quarter_units=quarter_units)
    for c in range(1, tables.shape[0]):
        new = search(x, imp, tables[c], scale, e0, quarter_units=quarter_units)
        better = new.err.sum(-1) < best.err.sum(-1)  # [N], the whole channel
        pick = torch.where(better, c, pick)
        best = best.where(better[:, None].expand_as(scale), new)
    return pick, best
