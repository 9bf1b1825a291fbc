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
"""

from __future__ import annotations

import dataclasses

import torch

from ernieq.calibration.gptq import register_rounder
from ernieq.codecs import CalibrationStats, QuantizedTensor
from ernieq.codecs.ccq2 import SUPER_SCALE_DTYPES, CCQ2Codec, fit, importance, pack_local_scales
from ernieq.codecs.ccq2_search import (
    GROUP,
    QUAD,
    QUADS_PER_GROUP,
    best_bytes,
    choose_nibbles,
    fit_group_scales,
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
