"""A baseline for the 2-bit figures, not a product codec: round-to-nearest 2-bit, group 64, asymmetric.

Registered as ``int2g64`` when this module is imported, so that the 2-bit recipe can
be rerun with its ccq2 experts on this plain grid and compared with ``ccq2`` on the
same layers. Stored: codes packed 4 per byte along K, an fp16 scale and a uint8 zero
point per group of 64, so 2 + 24/64 = 2.375 bits per weight.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ernieq.codecs.base import QuantizedTensor, check_weight, register_codec

LEVELS = 3  # 4 codes, 3 steps


@dataclass(frozen=True)
class Int2Config:
    group_size: int = 64


def _groups(w: torch.Tensor, g: int) -> torch.Tensor:
    return torch.nn.functional.pad(w, (0, -w.shape[1] % g)).unflatten(1, (-1, g))  # [N, K/G, G]


@register_codec("int2g64", Int2Config)
class Int2Codec:
    def __init__(self, config: Int2Config):
        self.config = config

    def encode(self, weight, stats=None, *, name="weight") -> QuantizedTensor:
        w = check_weight(weight, name)  # [N, K]
        n, k = w.shape
        wg = _groups(w, self.config.group_size)
        lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
        scale = ((hi - lo) / LEVELS).clamp(min=1e-8).half()  # [N, K/G]
        zero = torch.round(-lo / scale.float()).clamp(0, LEVELS)
        codes = (torch.round(wg / scale.float()[..., None]) + zero[..., None]).clamp(0, LEVELS).to(torch.uint8)
        quads = codes.flatten(1).unflatten(1, (-1, 4))  # [N, Kpad/4, 4]
        packed = quads[..., 0] | quads[..., 1] << 2 | quads[..., 2] << 4 | quads[..., 3] << 6
        tensors = {"codes": packed, "scale": scale, "zero": zero.to(torch.uint8)}
        return QuantizedTensor("int2g64", (n, k), tensors, dataclasses.asdict(self.config))

    def decode(self, q: QuantizedTensor) -> torch.Tensor:
        n, k = q.shape
        packed = q.tensors["codes"]
        codes = torch.stack([(packed >> s) & 3 for s in (0, 2, 4, 6)], dim=-1).flatten(1).float()  # [N, Kpad]
        codes = codes.unflatten(1, (-1, self.config.group_size))
        w = (codes - q.tensors["zero"].float()[..., None]) * q.tensors["scale"].float()[..., None]
        return w.flatten(1)[:, :k]  # W_hat = (code - zero) * scale
