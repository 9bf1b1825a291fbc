"""How Paddle's weight-only int8 / int4 weights sit in memory (what FastDeploy's pre-quantized layers load).

``paddle.nn.quant.weight_quantize(x [K, N], algo="weight_only_int8" | "weight_only_int4")``
quantizes per output channel and permutes the bytes for the Cutlass mixed-input
GEMM (``weight_only_linear``, FastDeploy's fused MoE). The permutation is in
``paddle/phi/kernels/impl/weight_quantize_kernel_gpu_impl.h``
(``weight_permute_kernel_wint8``, ``weight_permute_kernel_wint4``,
``weight_interval_kernel_wint4``); it is one layout for sm75, sm80, sm86, sm89
and sm90 (sm70 has another, not written here). The functions below take ernieq's
values (torch order ``[N, K]``) and return those bytes; they match
``weight_quantize``'s output byte for byte (Paddle 3.3.1, CPU kernel, arch
80/86/89/90, checked once by hand; Paddle is not a dependency). ``paddle_int8_values`` and
``paddle_int4_values`` undo them exactly: a FastDeploy checkpoint's bytes back to values.

Both interleave 64-row tiles of K: K % 64 == 0, N % 2 == 0 (int8) or N % 4 == 0
(int4). Shape legend: N output features, K input features.
"""

from __future__ import annotations

import torch

from ernieq.errors import ErnieqError

K_TILE = 64  # rows of K that the layouts interleave as one tile
INT8_OFFSET = 128  # Paddle stores an int8 value v as the byte v + 128
INT4_OFFSET = 8  # and an int4 value v as the nibble v + 8

# Row order inside 16 rows of K: int8 takes even rows then odd ones; int4 (16 bytes = 32 rows) by fours.
_K_ORDER_INT8 = torch.tensor([0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15])
_K_ORDER_INT4 = torch.tensor([0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15])
_NIBBLE_ORDER = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])  # nibble i of a 32-bit word takes nibble order[i]
_BYTES_PER_WORD = 4


def check_layout_shape(n: int, k: int, n_multiple: int) -> str | None:
    """Why [N, K] has no Paddle weight-only layout, or None when it has one."""
    if k % K_TILE or n % n_multiple:
        return f"[N={n}, K={k}] needs K % {K_TILE} == 0 and N % {n_multiple} == 0"
    return None


def _check_values(v: torch.Tensor, n_multiple: int, what: str) -> None:
    if v.ndim != 2 or v.dtype != torch.int8:
        raise ErnieqError(f"{what}: expected int8 values [N, K], got {v.dtype} of shape {tuple(v.shape)}")
    problem = check_layout_shape(*v.shape, n_multiple)
    if problem:
        raise ErnieqError(f"{what}: {problem}")


def _scatter(values: torch.Tensor, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """values: uint8 [N, R]; byte (n, r) goes to flat position col[n] + row[r]. Returns uint8 [N * R]."""
    out = torch.empty(values.numel(), dtype=torch.uint8, device=values.device)
    out[(col[:, None] + row[None, :]).flatten().to(values.device)] = values.flatten()
    return out


def _gather(flat: torch.Tensor, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """The inverse of ``_scatter``: flat uint8 [N * R] back to [N, R]."""
    return flat[(col[:, None] + row[None, :]).to(flat.device)]


def _int8_positions(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row [K], col [N]): value (k, n) of weight_only_int8 sits at flat index col[n] + row[k]."""
    kk = torch.arange(k)
    kk = _K_ORDER_INT8[kk % 16] + kk // 16 * 16  # [K]
    nn = torch.arange(n)
    return kk % 64 + kk // 64 * 128, 64 * (nn % 2) + 2 * k * (nn // 2)


def _int4_positions(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row [K/2], col [N]): packed byte j of column n sits at flat index col[n] + row[j] (before the nibble swap)."""
    j = torch.arange(k // 2)
    jj = _K_ORDER_INT4[j % 16] + j // 16 * 16  # [K/2]
    nn = torch.arange(n)
    return jj % 32 + jj // 32 * 128, 32 * (nn % 4) + 2 * k * (nn // 4)


def _check_stored(q: torch.Tensor, rows_per_byte_row: int, n_multiple: int, what: str) -> tuple[int, int]:
    """(N, K) of stored int8 bytes [N / rows_per_byte_row, K]; fails on a shape no Paddle layout has."""
    if q.ndim != 2 or q.dtype not in (torch.int8, torch.uint8):
        raise ErnieqError(f"{what}: expected int8 bytes [N, K], got {q.dtype} of shape {tuple(q.shape)}")
    n, k = q.shape[0] * rows_per_byte_row, q.shape[1]
    problem = check_layout_shape(n, k, n_multiple)
    if problem:
        raise ErnieqError(f"{what}: {problem}")
    return n, k


def paddle_int8_layout(v: torch.Tensor) -> torch.Tensor:
    """v: int8 [N, K] in [-127, 127]. Returns int8 [N, K], Paddle's weight_only_int8 bytes.

    Value (k, n) is stored as v + 128 at flat index
    ``kk % 64 + kk // 64 * 128 + 64 * (n % 2) + 2K * (n // 2)``, with
    ``kk = order[k % 16] + k // 16 * 16``: column pairs share 128-byte tiles.
    """
    _check_values(v, 2, "paddle_int8_layout")
    n, k = v.shape
    row, col = _int8_positions(n, k)  # [K], [N]
    biased = (v.to(torch.int16) + INT8_OFFSET).to(torch.uint8)  # byte = v + 128  [N, K]
    return _scatter(biased, row, col).view(torch.int8).reshape(n, k)


def paddle_int8_values(q: torch.Tensor, what: str = "paddle_int8_values") -> torch.Tensor:
    """q: int8 [N, K], Paddle's weight_only_int8 bytes. Returns the int8 values [N, K] (the layout undone)."""
    n, k = _check_stored(q, 1, 2, what)
    row, col = _int8_positions(n, k)  # [K], [N]
    biased = _gather(q.contiguous().view(torch.uint8).reshape(-1), row, col)  # byte = v + 128  [N, K]
    return (biased.to(torch.int16) - INT8_OFFSET).to(torch.int8)


def paddle_int4_layout(v: torch.Tensor) -> torch.Tensor:
    """v: int8 [N, K] in [-8, 7]. Returns int8 [N/2, K], Paddle's weight_only_int4 bytes.

    Rows 2j, 2j + 1 of a column pack into byte j (two's complement nibbles, even
    row low); byte j goes to flat index
    ``jj % 32 + jj // 32 * 128 + 32 * (n % 4) + 2K * (n // 4)``, with
    ``jj = order[j % 16] + j // 16 * 16``; then inside every little-endian 32-bit
    word, nibble i becomes (nibble order[i] + 8) & 0xF.
    """
    _check_values(v, 4, "paddle_int4_layout")
    if v.numel() and not (-INT4_OFFSET <= int(v.min()) and int(v.max()) < INT4_OFFSET):
        found = f"[{int(v.min())}, {int(v.max())}]"
        raise ErnieqError(f"paddle_int4_layout: int4 values must lie in [-8, 7], found {found}")
    n, k = v.shape
    nib = (v.to(torch.int16) & 0xF).to(torch.uint8)  # two's complement nibble  [N, K]
    packed = nib[:, 0::2] | (nib[:, 1::2] << 4)  # byte j = row 2j | row 2j+1 << 4  [N, K/2]
    row, col = _int4_positions(n, k)  # [K/2], [N]
    words = _bytes_to_words(_scatter(packed, row, col))  # [W]
    nibbles = ((words[:, None] >> (4 * _NIBBLE_ORDER)) + INT4_OFFSET) & 0xF  # (nibble order[i] + 8) & 0xF  [W, 8]
    return _words_to_bytes(_join_nibbles(nibbles)).view(torch.int8).reshape(n // 2, k)


def paddle_int4_values(q: torch.Tensor, what: str = "paddle_int4_values") -> torch.Tensor:
    """q: int8 [N/2, K], Paddle's weight_only_int4 bytes. Returns the int8 values [N, K] in [-8, 7] (the layout undone)."""
    n, k = _check_stored(q, 2, 4, what)
    words = _bytes_to_words(q.contiguous().view(torch.uint8).reshape(-1))  # [W]
    stored = (words[:, None] >> (4 * torch.arange(8, device=words.device))) & 0xF  # nibble i of each word  [W, 8]
    nibbles = torch.empty_like(stored)
    nibbles[:, _NIBBLE_ORDER.to(words.device)] = (stored - INT4_OFFSET) & 0xF  # nibble i held (nibble order[i] + 8) & 0xF
    row, col = _int4_positions(n, k)  # [K/2], [N]
    packed = _gather(_words_to_bytes(_join_nibbles(nibbles)), row, col)  # byte j = row 2j | row 2j+1 << 4  [N, K/2]
    nib = torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(n, k).to(torch.int16)  # [N, K]
    return torch.where(nib >= INT4_OFFSET, nib - 16, nib).to(torch.int8)  # two's complement


def _bytes_to_words(flat: torch.Tensor) -> torch.Tensor:
    """uint8 [4W] to the little-endian 32-bit words [W] (int64)."""
    shifts = 8 * torch.arange(_BYTES_PER_WORD, device=flat.device)  # [4]: 0, 8, 16, 24
    return (flat.reshape(-1, _BYTES_PER_WORD).long() << shifts).sum(dim=1)


def _words_to_bytes(words: torch.Tensor) -> torch.Tensor:
    """int64 [W] 32-bit words to their little-endian bytes, uint8 [4W]."""
    shifts = 8 * torch.arange(_BYTES_PER_WORD, device=words.device)
    return ((words[:, None] >> shifts) & 0xFF).to(torch.uint8).reshape(-1)


def _join_nibbles(nibbles: torch.Tensor) -> torch.Tensor:
    """[W, 8] nibbles (nibble i at bits 4i) to the 32-bit words [W]."""
    return (nibbles << (4 * torch.arange(8, device=nibbles.device))).sum(dim=1)
