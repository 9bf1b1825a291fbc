"""HQQ (Badri & Shaji, 2023; PyPI ``hqq``) as a peer codec ``hqq`` for the benchmarks, not a product codec.

Encoding calls HQQ's own quantizer, ``hqq.core.quantize.Quantizer.quantize``, with the
weight parameters of ``hqq.core.quantize.BaseQuantizeConfig(nbits, group_size)``
(axis 1: groups of G consecutive weights along K; zero point rounded at 4 bits,
float at 2 bits; the proximal half-quadratic optimisation of scale and zero on).
Only the encoder needs ``hqq``; the stored values decode in plain torch, so a
checkpoint made with it evaluates through ernieq's reference path anywhere.

Stored (as HQQ's ``HQQLinear`` keeps them with a float16 compute dtype):

- ``codes``: uint8 [N, K * nbits / 8], 8 / nbits codes per byte along K (code
  ``j * (8 / nbits) + i`` at bits ``i * nbits ..``);
- ``scale``, ``zero``: float16 [N, K / G].

``W_hat = (code - zero) * scale``, so nbits + 32 / G bits per weight (4.5 and 2.5 at G = 64).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass

import torch

from ernieq.codecs.base import CodecBase, CodecError, QuantizedTensor, check_weight, register_codec

NBITS = (2, 4)


def hqq_available() -> bool:
    return importlib.util.find_spec("hqq") is not None


@dataclass(frozen=True)
class HqqConfig:
    nbits: int = 4
    group_size: int = 64

    def __post_init__(self):
        if self.nbits not in NBITS:
            raise CodecError(f"hqq: nbits must be one of {NBITS}, got {self.nbits}")
        if self.group_size <= 0 or self.group_size % 8:
            raise CodecError(f"hqq: group_size must be a positive multiple of 8, got {self.group_size}")


def _pack(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    """codes: uint8 [N, K] in [0, 2^nbits). Returns uint8 [N, K * nbits / 8]."""
    per_byte = 8 // nbits
    lanes = codes.unflatten(1, (-1, per_byte))  # [N, K/per_byte, per_byte]
    packed = torch.zeros_like(lanes[..., 0])
    for i in range(per_byte):
        packed |= lanes[..., i] << (i * nbits)
    return packed


def _unpack(packed: torch.Tensor, nbits: int) -> torch.Tensor:
    """packed: uint8 [N, K * nbits / 8]. Returns uint8 codes [N, K]."""
    mask = (1 << nbits) - 1
    return torch.stack([(packed >> (i * nbits)) & mask for i in range(8 // nbits)], dim=-1).flatten(1)


def _hqq_quantize(w: torch.Tensor, nbits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w: float32 [N, K], K a multiple of G. Returns HQQ's codes, scale and zero, [N, K/G, G] / [N, K/G]."""
    if not hqq_available():
        raise CodecError("the hqq codec needs the PyPI package hqq (benchmark-only: pip install hqq)")
    from hqq.core.quantize import BaseQuantizeConfig, Quantizer

    params = dict(BaseQuantizeConfig(nbits=nbits, group_size=group_size)["weight_quant_params"])
    params.pop("view_as_float", None)
    if params.get("axis") != 1:
        raise CodecError(f"hqq: expected its default axis 1 (groups along K), got {params.get('axis')}")
    n, k = w.shape
    codes, meta = Quantizer.quantize(w, bitpack=False, device=str(w.device), **params)  # codes [N*K/G, G]
    groups = (n, k // group_size)
    return codes.reshape(*groups, group_size), meta["scale"].reshape(groups), meta["zero"].reshape(groups)


@register_codec("hqq", HqqConfig)
class HqqCodec(CodecBase):
    def encode(self, weight, stats=None, *, name="weight") -> QuantizedTensor:
        """weight: [N, K] with K a multiple of G (HQQ groups the flattened weight). stats: unused."""
        w = check_weight(weight, name)  # [N, K]
        n, k = w.shape
        g, nbits = self.config.group_size, self.config.nbits
        if k % g:
            raise CodecError(f"{name}: hqq needs K={k} to be a multiple of the group size {g}")
        codes, scale, zero = _hqq_quantize(w, nbits, g)  # [N, K/G, G], [N, K/G] x 2
        tensors = {"codes": _pack(codes.flatten(1).to(torch.uint8), nbits), "scale": scale.half(), "zero": zero.half()}
        return QuantizedTensor(self.name, (n, k), tensors, dataclasses.asdict(self.config))

    def decode(self, q: QuantizedTensor) -> torch.Tensor:
        n, k = q.shape
        codes = _unpack(q.tensors["codes"], self.config.nbits).float().unflatten(1, (-1, self.config.group_size))
        w = (codes - q.tensors["zero"].float()[..., None]) * q.tensors["scale"].float()[..., None]
        return w.flatten(1)  # W_hat = (code - zero) * scale  [N, K]
