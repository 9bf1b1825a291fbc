"""How 4-bit codes sit in memory: two layouts, both along K (the input features).

Codes are unsigned 4-bit integers in [0, 15], held one per uint8 before packing.
All functions take any leading dimensions (``[N, K]`` or a stack ``[E, N, K]``)
and pack along the last one; padding codes are 0 and are dropped on unpacking.

Layouts (what a kernel or a file format reads):

- ``k_major`` (ernieq native, the ``wint4`` codec's ``qweight``): uint8
  ``[..., ceil(K/2)]``; byte ``j`` holds code ``2j`` in its LOW nibble and code
  ``2j + 1`` in its HIGH nibble: ``byte = c[2j] | (c[2j+1] << 4)``.
- ``int32`` (compressed-tensors ``pack-quantized``, 4 bits): int32
  ``[..., ceil(K/8)]``; word ``j`` holds codes ``8j .. 8j+7``, code ``8j + i`` at
  bits ``4i .. 4i+3`` (little-endian nibble order). compressed-tensors stores
  the signed value ``v`` in [-8, 7] as the code ``v + 8``, so
  ``pack_int4_int32(v + 8) == compressed_tensors.pack_to_int32(v, 4)``.
  On a little-endian machine the same bits are ``k_major`` bytes viewed as int32.
"""

from __future__ import annotations

import torch

from ernieq.codecs.base import CodecError

INT4_MAX_CODE = 15
NIBBLES_PER_INT32 = 8


def _check_codes(codes: torch.Tensor, what: str) -> None:
    if codes.dtype != torch.uint8:
        raise CodecError(f"{what}: 4-bit codes must be uint8, got {codes.dtype}")
    if codes.ndim < 1:
        raise CodecError(f"{what}: codes need at least one dimension (K), got a scalar")
    if codes.numel() and int(codes.max()) > INT4_MAX_CODE:
        raise CodecError(f"{what}: 4-bit codes must lie in [0, 15], found {int(codes.max())}")


def _pad_last(codes: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad the last dimension with zero codes up to a multiple of ``multiple``."""
    pad = -codes.shape[-1] % multiple
    return torch.nn.functional.pad(codes, (0, pad)) if pad else codes


def _check_packed(packed: torch.Tensor, k: int, dtype: torch.dtype, per_word: int, what: str) -> None:
    if packed.dtype != dtype:
        raise CodecError(f"{what}: packed codes must be {dtype}, got {packed.dtype}")
    expected = -(-k // per_word)  # ceil(K / per_word)
    if packed.ndim < 1 or packed.shape[-1] != expected:
        raise CodecError(
            f"{what}: K={k} needs a last dimension of {expected} words, got shape {tuple(packed.shape)}"
        )


def pack_int4_k_major(codes: torch.Tensor) -> torch.Tensor:
    """codes: uint8 [..., K] in [0, 15]. Returns uint8 [..., ceil(K/2)], even k low nibble."""
    _check_codes(codes, "pack_int4_k_major")
    pairs = _pad_last(codes, 2).unflatten(-1, (-1, 2))  # [..., ceil(K/2), 2]
    return pairs[..., 0] | (pairs[..., 1] << 4)  # byte = c[2j] | c[2j+1] << 4


def unpack_int4_k_major(packed: torch.Tensor, k: int) -> torch.Tensor:
    """packed: uint8 [..., ceil(K/2)]. Returns the codes, uint8 [..., K] in [0, 15]."""
    _check_packed(packed, k, torch.uint8, 2, "unpack_int4_k_major")
    codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1)  # [..., ceil(K/2), 2]
    return codes.flatten(-2)[..., :k]


def pack_int4_int32(codes: torch.Tensor) -> torch.Tensor:
    """codes: uint8 [..., K] in [0, 15]. Returns int32 [..., ceil(K/8)], code 8j+i at bits 4i.

    Built in int64 and wrapped to int32 explicitly (a code >= 8 in the top nibble
    sets the sign bit), so the result does not depend on the host's byte order.
    """
    _check_codes(codes, "pack_int4_int32")
    words = _pad_last(codes, NIBBLES_PER_INT32).unflatten(-1, (-1, NIBBLES_PER_INT32)).long()  # [..., K/8, 8]
    shifts = 4 * torch.arange(NIBBLES_PER_INT32, device=codes.device)  # [8]: 0, 4, ..., 28
    unsigned = (words << shifts).sum(dim=-1)  # sum_i c_i * 2^(4i), in [0, 2^32)
    signed = torch.where(unsigned >= 2**31, unsigned - 2**32, unsigned)  # two's complement wrap
    return signed.to(torch.int32)


def unpack_int4_int32(packed: torch.Tensor, k: int) -> torch.Tensor:
    """packed: int32 [..., ceil(K/8)]. Returns the codes, uint8 [..., K] in [0, 15]."""
    _check_packed(packed, k, torch.int32, NIBBLES_PER_INT32, "unpack_int4_int32")
    unsigned = packed.long() & 0xFFFFFFFF  # [..., K/8]
    shifts = 4 * torch.arange(NIBBLES_PER_INT32, device=packed.device)  # [8]
    codes = (unsigned.unsqueeze(-1) >> shifts) & 0x0F  # [..., K/8, 8]
    return codes.flatten(-2)[..., :k].to(torch.uint8)
