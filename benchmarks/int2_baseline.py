"""A baseline for the 2-bit figures, not a product codec: a plain 2-bit grid, group 64, asymmetric.

Registered as ``int2g64`` when this module is imported, so that the 2-bit recipe can
be rerun with its ccq2 experts on this plain grid and compared with ``ccq2`` on the
same layers. Stored (G = 64 consecutive weights along K share a grid):

- ``codes``: uint8 [N, Kpad / 4], four 2-bit codes per byte along K (code ``4j + i``
  at bits ``2i .. 2i+1``); Kpad = K rounded up to a multiple of G, padding codes 0;
- ``scale``: float16 [N, K/G]; ``zero``: [N, K/G], either
  uint8, the integer zero point of round to nearest (default: 2 + 24/64 = 2.375 bits
  per weight), or float16 (``fp16_zero=True``: 2 + 32/64 = 2.5 bits per weight, the
  usual accounting of a GPTQ/HQQ 2-bit g64 grid), then unrounded, so that the four
  levels span exactly [min, max] of the group (widened to hold 0).

``W_hat = (code - zero) * scale``. The codec also gives GPTQ a column rounder
(``Int2Codec.columns``), so ``--method gptq`` runs through it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ernieq.codecs.base import CodecBase, CodecError, QuantizedTensor, check_weight, register_codec

LEVELS = 3  # 4 codes, 3 steps
CODES_PER_BYTE = 4


@dataclass(frozen=True)
class Int2Config:
    group_size: int = 64
    fp16_zero: bool = False  # store the zero point as float16 (unrounded) instead of uint8

    def __post_init__(self):
        if self.group_size <= 0 or self.group_size % CODES_PER_BYTE:
            raise CodecError(f"int2g64: group_size must be a positive multiple of 4, got {self.group_size}")


def _groups(w: torch.Tensor, g: int) -> torch.Tensor:
    return torch.nn.functional.pad(w, (0, -w.shape[1] % g)).unflatten(1, (-1, g))  # [N, K/G, G]


def _pack(codes: torch.Tensor) -> torch.Tensor:
    """codes: uint8 [N, Kpad] in [0, 3]. Returns uint8 [N, Kpad / 4]."""
    quads = codes.unflatten(1, (-1, CODES_PER_BYTE))  # [N, Kpad/4, 4]
    return quads[..., 0] | quads[..., 1] << 2 | quads[..., 2] << 4 | quads[..., 3] << 6


def _unpack(packed: torch.Tensor) -> torch.Tensor:
    """packed: uint8 [N, Kpad / 4]. Returns uint8 codes [N, Kpad]."""
    return torch.stack([(packed >> s) & 3 for s in (0, 2, 4, 6)], dim=-1).flatten(1)


@register_codec("int2g64", Int2Config)
class Int2Codec(CodecBase):
    def grid(self, wg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """wg: [N, n_groups, G]. Returns scale (float16) and zero (float32, integer-valued unless
        fp16_zero, then the float16 value) [N, n_groups], exactly as stored."""
        lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)  # the range, widened to hold 0
        scale = ((hi - lo) / LEVELS).half()  # scale = (max - min) / 3
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group: scale 1, decodes to 0
        if self.config.fp16_zero:
            return scale, (-lo / scale.float()).clamp(0, LEVELS).half().float()  # zero = -min / scale
        return scale, torch.round(-lo / scale.float()).clamp(0, LEVELS)  # zero = round(-min / scale)

    def round_codes(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """w: [..., G] with scale, zero [..., 1] (float32 values). Returns float codes in [0, 3]."""
        if self.config.fp16_zero:
            return torch.round(w / scale + zero).clamp(0, LEVELS)  # code = round(w / s + z)
        return (torch.round(w / scale) + zero).clamp(0, LEVELS)  # code = round(w / s) + z

    def pack(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, shape: tuple[int, int]):
        """codes: float/uint8 [N, Kpad]; scale, zero: [N, K/G]. Returns the QuantizedTensor."""
        zero = zero.half() if self.config.fp16_zero else zero.to(torch.uint8)
        tensors = {"codes": _pack(codes.to(torch.uint8)), "scale": scale.half(), "zero": zero}
        return QuantizedTensor(self.name, shape, tensors, dataclasses.asdict(self.config))

    def encode(self, weight, stats=None, *, name="weight") -> QuantizedTensor:
        w = check_weight(weight, name)  # [N, K]
        wg = _groups(w, self.config.group_size)  # [N, K/G, G]
        scale, zero = self.grid(wg)
        codes = self.round_codes(wg, scale.float()[..., None], zero[..., None])  # [N, K/G, G]
        return self.pack(codes.flatten(1), scale, zero, tuple(w.shape))

    def decode(self, q: QuantizedTensor) -> torch.Tensor:
        n, k = q.shape
        codes = _unpack(q.tensors["codes"]).float().unflatten(1, (-1, self.config.group_size))  # [N, K/G, G]
        w = (codes - q.tensors["zero"].float()[..., None]) * q.tensors["scale"].float()[..., None]
        return w.flatten(1)[:, :k]  # W_hat = (code - zero) * scale



class Int2Columns:
    """int2g64's rounding step inside GPTQ's column loop, one column at a time (``unit = 1``).

    The grid of a group is set as round to nearest sets it, from the current (error-updated)
    weights when the loop reaches the group's first column (``start_group``), or from the
    weight as given when ``static_groups`` (activation order).
    """

    unit = 1

    def __init__(self, codec: Int2Codec, weight: torch.Tensor, static_groups: bool):
        self.codec = codec
        n, self.k = weight.shape
        self.group = codec.config.group_size
        n_groups = -(-self.k // self.group)
        self.codes = torch.zeros(n, n_groups * self.group, dtype=torch.uint8, device=weight.device)  # [N, Kpad]
        if static_groups:
            self.scale, self.zero = codec.grid(_groups(weight.float(), self.group))  # [N, K/G]
        else:
            self.scale = torch.ones(n, n_groups, dtype=torch.float16, device=weight.device)
            self.zero = torch.zeros(n, n_groups, device=weight.device)

    def start_group(self, col: int, w: torch.Tensor) -> None:
        """col: the group's first column; w: [N, <= G] its current values."""
        scale, zero = self.codec.grid(w.float().unsqueeze(1))  # [N, 1]
        self.scale[:, col // self.group] = scale[:, 0]
        self.zero[:, col // self.group] = zero[:, 0]

    def round(self, col: int, w: torch.Tensor, hinv: torch.Tensor | None = None) -> torch.Tensor:
        """w: [N, 1] the current column ``col``. Returns its dequantized value [N, 1]."""
        g = col // self.group
        scale, zero = self.scale[:, g : g + 1].float(), self.zero[:, g : g + 1]  # [N, 1]
        code = self.codec.round_codes(w, scale, zero)
        self.codes[:, col : col + 1] = code.to(torch.uint8)
        return (code - zero) * scale  # W_hat = (code - zero) * scale

    def result(self) -> QuantizedTensor:
        return self.codec.pack(self.codes, self.scale, self.zero, (self.codes.shape[0], self.k))


Int2Codec.columns = Int2Columns
