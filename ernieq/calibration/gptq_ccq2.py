"""GPTQ's rounding step for ``ccq2``: one byte per 4 consecutive columns, chosen among 256 code words.

Shape legend: N output features, K input features; a quad is 4 K-consecutive
weights; groups of 64 columns share a local scale ``nibble * super_scale``.

Up front, the codec's own search (``ernieq.codecs.ccq2.fit``, with the Hessian
diagonal as importance, as ``CCQ2Codec.encode`` does) fixes each channel's code
grid and super scale. Each 64-column group's nibble is then refit to the
current, error-updated weights when GPTQ's loop reaches the group
(``start_group``), or kept from the up-front fit with activation order.

The byte of a quad S is chosen by the exact GPTQ cost of rounding the quad
jointly, ``||(w - s t) U_SS^-1||^2`` (U_SS [4, 4] the quad's block of the
inverse-Hessian Cholesky factor, s the local scale, t a code word). Whitening
turns it into a plain nearest-word search: ``y = (w / s) M`` against the words
``t M``, ``M = U_SS^-1``, through ``ccq2_search.best_bytes``.

``CCQ2Columns`` rounds one weight for the reference loop (``gptq.py``);
``CCQ2ExpertColumns`` does the same for E experts at once (``gptq_experts.py``),
searching the channels of all experts that share a code grid together.
"""

from __future__ import annotations

import dataclasses

import torch

from ernieq.calibration.gptq import register_rounder
from ernieq.calibration.gptq_experts import register_expert_rounder
from ernieq.codecs import CalibrationStats, QuantizedTensor
from ernieq.codecs.ccq2 import (
    CODE_GRID_POOL,
    SUPER_SCALE_DTYPES,
    CCQ2Codec,
    fit,
    importance,
    pack_local_scales,
)
from ernieq.codecs.ccq2_search import (
    GROUP,
    NUM_WORDS,
    QUAD,
    QUADS_PER_GROUP,
    best_bytes,
    choose_nibbles,
    code_words,
    fit_group_scales,
    least_score_bytes,
    start_scales,
)


class CCQ2Columns:
    """ccq2's column rounder: ``unit = 4`` (a quad, one byte), ``group = 64`` (one local scale)."""

    unit = QUAD
    group = GROUP

    def __init__(self, codec: CCQ2Codec, weight: torch.Tensor, static_groups: bool, stats: CalibrationStats | None):
        self.codec = codec
        self.config = codec.config
        w = weight.float()
        self.n, self.k = w.shape
        self.imp = importance(stats, self.k, self.config.hessian_damp, w.device, "ccq2 GPTQ")  # [K] or None
        self.fit = fit(w, self.imp, self.config)  # grids, super scales, nibbles from W
        self.table = self.fit.table.float()  # [N, 256, 4]
        self.nibble = self.fit.nibble.clone()  # [N, G]
        self.codes = torch.zeros(self.n, -(-self.k // QUAD), dtype=torch.uint8, device=w.device)  # [N, K4]

    def start_group(self, col: int, w: torch.Tensor) -> None:
        """col: the group's first column; w: [N, <= 64] its current values. Refits the group's nibble."""
        g, span = col // GROUP, w.shape[1]
        pad = GROUP - span
        x = torch.nn.functional.pad(w.float(), (0, pad)).reshape(self.n, 1, QUADS_PER_GROUP, QUAD)  # [N, 1, 16, 4]
        imp = None
        if self.imp is not None or pad:
            imp = self.imp[col : col + span] if self.imp is not None else torch.ones(span, device=w.device)
            imp = torch.nn.functional.pad(imp, (0, pad)).reshape(1, QUADS_PER_GROUP, QUAD)  # [1, 16, 4]
        s_rms, s_amax = start_scales(x, imp, self.config.units_per_std)  # [N, 1]
        scale, err = fit_group_scales(x, imp, self.table, s_rms, self.config.scale_steps)
        s2, e2 = fit_group_scales(x, imp, self.table, s_amax, self.config.scale_steps)
        scale = torch.where(e2 < err, s2, scale)
        nib, _, _ = choose_nibbles(x, imp, self.table, self.fit.super_scale, scale, self.config.nibble_window)
        self.nibble[:, g] = nib[:, 0]

    def round(self, col: int, w: torch.Tensor, hinv: torch.Tensor) -> torch.Tensor:
        """w: [N, 4] the current quad starting at column ``col``; hinv: U_SS [4, 4]. Returns W_hat [N, 4]."""
        s = self.nibble[:, col // GROUP].float() * self.fit.super_scale  # local scale = nibble * super  [N]
        live = s > 0
        safe = torch.where(live, s, torch.ones_like(s))
        m = torch.linalg.inv(hinv.float())  # M = U_SS^-1 (upper)  [4, 4]
        y = ((w.float() / safe[:, None]) @ m).unsqueeze(1)  # whitened target, code units  [N, 1, 4]
        b, _ = best_bytes(y, self.table @ m)  # nearest whitened word  [N, 1]
        b = torch.where(live[:, None], b, torch.zeros_like(b))  # a zero scale decodes to 0 whatever the byte
        self.codes[:, col // QUAD] = b[:, 0]
        word = torch.gather(self.table, 1, b.long().unsqueeze(-1).expand(-1, -1, QUAD))[:, 0]  # [N, 4]
        return word * s[:, None]  # W_hat = s * t_b

    def result(self) -> QuantizedTensor:
        tensors = {
            "quant_weight": self.codes.t().contiguous(),  # [K4, N]
            "weight_scale": pack_local_scales(self.nibble),  # [ceil(K/128), N]
            "super_scales": self.fit.super_scale.to(SUPER_SCALE_DTYPES[self.config.super_scale_dtype]),
            "code_scale": self.fit.code_scale.float(),
            "code_zp": self.fit.code_zp.float(),
        }
        return QuantizedTensor(self.codec.name, (self.n, self.k), tensors, dataclasses.asdict(self.config))


@register_rounder("ccq2")
def ccq2_columns(codec: CCQ2Codec, weight: torch.Tensor, static_groups: bool, stats: CalibrationStats | None):
    return CCQ2Columns(codec, weight, static_groups, stats)


# The whitened search of CCQ2ExpertColumns: the cost of word t for a target y (code units) is
# (y - t) A (y - t)^T with A = M M^T [4, 4], M = V_SS. Expanded, it is one row of a matmul
# lhs(y, A) [15] . feat(t) [15] with the words' side fixed per code grid:
#   lhs  = [y A y^T, -2 (y A)_i (4), A_ii (4), 2 A_ij for i < j (6)]
#   feat = [1,       t_i        (4), t_i^2 (4), t_i t_j          (6)]
# so channels of every expert that share a grid are searched by one GEMM, whatever their A.
_PAIRS = [(i, j) for i in range(QUAD) for j in range(i + 1, QUAD)]
# Experts per call of the codec's up-front search: one at a time on a CPU (no gain from more, and
# its temporaries grow with them); all of a chunk on an accelerator, where each call costs launches.
FIT_EXPERTS = {"cpu": 1}


def whitened_features(words: torch.Tensor) -> torch.Tensor:
    """words: [C, 256, 4] float32. Returns feat [C, 15, 256] (see above)."""
    t = words.transpose(1, 2)  # [C, 4, 256]
    cross = torch.stack([t[:, i] * t[:, j] for i, j in _PAIRS], 1)  # [C, 6, 256]
    return torch.cat([torch.ones_like(t[:, :1]), t, t * t, cross], 1)


def whitened_lhs(y: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """y: [E, N, 4] targets; a: [E, 4, 4] symmetric. Returns lhs [E, N, 15] (see above)."""
    e, n, _ = y.shape
    ya = torch.bmm(y, a)  # y A  [E, N, 4]
    yay = (ya * y).sum(-1, keepdim=True)  # y A y^T  [E, N, 1]
    pairs = torch.stack([2 * a[:, i, j] for i, j in _PAIRS], 1)  # [E, 6]
    consts = torch.cat([a.diagonal(dim1=1, dim2=2), pairs], 1)  # [E, 10]
    return torch.cat([yay, -2 * ya, consts[:, None, :].expand(e, n, -1)], -1)


@register_expert_rounder("ccq2")
class CCQ2ExpertColumns:
    """ccq2's rounding step for E experts at once (``ernieq.calibration.gptq_experts``): one quad
    of columns (``unit = 4``, one byte) of all experts per call, the weights transposed
    (w [E, 4, N]); ``group = 64`` (one local scale).

    As :class:`CCQ2Columns`, per expert: the codec's search fixes each channel's code grid and
    super scale up front (``fit(..., scales_only=True)``: the nibbles come next), each group's
    nibble is refit to the current weights when the loop reaches it (or kept from the full
    fit with activation order), and a quad's byte minimises ``||(w - s t) V_SS||^2``. The
    searches go by code grid: the channels of every expert that picked grid c are searched
    together against its 256 words, importance per expert in the nibble refit, A = V_SS V_SS^T
    per expert in the quad search (``whitened_lhs``). Bytes are kept as stored, [E, K / 4, N].
    """

    unit = QUAD
    group = GROUP

    def __init__(self, codec: CCQ2Codec, weight: torch.Tensor, order: torch.Tensor | None, stats: list):
        """weight: float32 [E, N, K]; order: int64 [E, K] (loop position -> column) or None."""
        self.codec, self.config = codec, codec.config
        e, n, self.k = weight.shape
        dev = weight.device
        imps = [importance(st, self.k, self.config.hessian_damp, dev, "ccq2 GPTQ") for st in stats]
        self.imp = torch.stack([torch.ones(self.k, device=dev) if i is None else i for i in imps])  # [E, K]
        fits = self._fits(weight, imps, order is None)
        self.super_scale = torch.cat([f.super_scale for f in fits]).reshape(e, n)  # [E, N]
        self.nibble = torch.cat([f.nibble for f in fits]).reshape(e, n, -1).transpose(1, 2).contiguous()  # [E, G, N]
        self.code_scale = torch.cat([f.code_scale for f in fits]).reshape(e, n)  # [E, N]
        self.code_zp = torch.cat([f.code_zp for f in fits]).reshape(e, n)
        if self.config.code_scale is not None:
            grids = torch.tensor([[self.config.code_scale, self.config.code_zp]], device=dev)  # [1, 2]
        else:
            grids = torch.tensor(CODE_GRID_POOL[: self.config.grid_candidates], device=dev)  # [C, 2]
        pick = ((self.code_scale[..., None] == grids[:, 0]) & (self.code_zp[..., None] == grids[:, 1])).int()
        self.pick = pick.argmax(-1).reshape(-1)  # [E * N]: each channel's grid
        self.tables = code_words(grids[:, 0], grids[:, 1])  # int32 [C, 256, 4]
        self.words = self.tables.float().reshape(-1, QUAD)  # [C * 256, 4]
        self.feat = whitened_features(self.tables.float())  # [C, 15, 256]
        used = [c for c in range(grids.shape[0]) if bool((self.pick == c).any())]
        # rows (e * N + n) of each used grid; None: every row
        self.rows = {c: None if len(used) == 1 else (self.pick == c).nonzero()[:, 0] for c in used}
        self.codes = torch.zeros(e, self.k // QUAD, n, dtype=torch.uint8, device=dev)  # [E, K4, N]
        self.order = order
        self.experts = torch.arange(e, device=dev)

    def _fits(self, weight: torch.Tensor, imps: list, scales_only: bool) -> list:
        """The codec's search on the experts' weights [E, N, K], ``FIT_EXPERTS`` experts per call (their
        channels stacked, each with its expert's importance: the same choices as one by one)."""
        e, n, k = weight.shape
        step = FIT_EXPERTS.get(weight.device.type, e)
        if step == 1 or any(i is None for i in imps):
            return [fit(weight[i], imps[i], self.config, scales_only=scales_only) for i in range(e)]
        imp_rows = self.imp[:, None, :].expand(e, n, k)  # [E, N, K]
        return [fit(weight[a : a + step].reshape(-1, k), imp_rows[a : a + step].reshape(-1, k), self.config,
                    scales_only=scales_only) for a in range(0, e, step)]

    def start_group(self, col: int, w: torch.Tensor) -> None:
        """col: the group's first column; w: [E, <= 64, N] its current values. Refits the group's nibble."""
        e, span, n = w.shape
        pad = GROUP - span
        x = torch.nn.functional.pad(w.transpose(1, 2), (0, pad)).reshape(e * n, 1, QUADS_PER_GROUP, QUAD)
        imp = torch.nn.functional.pad(self.imp[:, col : col + span], (0, pad)).reshape(e, 1, 1, QUADS_PER_GROUP, QUAD)
        imp = imp.expand(e, n, 1, QUADS_PER_GROUP, QUAD).reshape(e * n, 1, QUADS_PER_GROUP, QUAD)  # per row
        s_rms, s_amax = start_scales(x, imp, self.config.units_per_std)  # [E * N, 1]
        supers = self.super_scale.reshape(-1)
        nibble = torch.empty(e * n, dtype=torch.int64, device=w.device)
        for c, rows in self.rows.items():
            xc, ic, table = (x, imp, self.tables[c]) if rows is None else (x[rows], imp[rows], self.tables[c])
            sr, sa = (s_rms, s_amax) if rows is None else (s_rms[rows], s_amax[rows])
            scale, err = fit_group_scales(xc, ic, table, sr, self.config.scale_steps)
            s2, e2 = fit_group_scales(xc, ic, table, sa, self.config.scale_steps)
            scale = torch.where(e2 < err, s2, scale)
            sup = supers if rows is None else supers[rows]
            nib, _, _ = choose_nibbles(xc, ic, table, sup, scale, self.config.nibble_window)
            nibble[slice(None) if rows is None else rows] = nib[:, 0]
        self.nibble[:, col // GROUP] = nibble.reshape(e, n)

    def round(self, j: int, w: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """w: [E, 4, N] the quad at loop position j; m: V_SS [E, 4, 4]. Returns W_hat [E, 4, N]."""
        e, _, n = w.shape
        if self.order is None:
            nib, quad = self.nibble[:, j // GROUP], j // QUAD  # [E, N]
        else:
            cols = self.order[:, j]  # [E]: each expert's quad starts at its own column
            nib, quad = self.nibble[self.experts, cols // GROUP], cols // QUAD
        s = nib.float() * self.super_scale  # local scale = nibble * super  [E, N]
        live = s > 0
        safe = torch.where(live, s, torch.ones_like(s))
        y = w.transpose(1, 2) / safe[..., None]  # code units  [E, N, 4]
        lhs = whitened_lhs(y, torch.bmm(m, m.transpose(1, 2))).reshape(e * n, -1)  # A = M M^T
        b = torch.empty(e * n, dtype=torch.int64, device=w.device)
        for c, rows in self.rows.items():  # nearest whitened word, grid by grid
            if rows is None:
                b = least_score_bytes(lhs, self.feat[c])
            else:
                b[rows] = least_score_bytes(lhs[rows], self.feat[c])
        b = torch.where(live.reshape(-1), b, torch.zeros_like(b))  # a zero scale decodes to 0 whatever the byte
        if self.order is None:
            self.codes[:, quad] = b.reshape(e, n)
        else:
            self.codes[self.experts, quad] = b.reshape(e, n).to(torch.uint8)
        word = torch.nn.functional.embedding(self.pick * NUM_WORDS + b, self.words).reshape(e, n, QUAD)  # t_b
        return (word * s[..., None]).transpose(1, 2)  # W_hat = s * t_b  [E, 4, N]

    def result(self) -> list[QuantizedTensor]:
        dtype = SUPER_SCALE_DTYPES[self.config.super_scale_dtype]
        params = dataclasses.asdict(self.config)
        out = []
        for i in range(self.codes.shape[0]):
            tensors = {
                "quant_weight": self.codes[i].clone(),  # [K4, N]
                "weight_scale": pack_local_scales(self.nibble[i].t()),  # [ceil(K/128), N]
                "super_scales": self.super_scale[i].to(dtype),
                "code_scale": self.code_scale[i].float(),
                "code_zp": self.code_zp[i].float(),
            }
            out.append(QuantizedTensor(self.codec.name, (self.codes.shape[2], self.k), tensors, params))
        return out
