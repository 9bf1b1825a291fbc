"""Tile configurations: which BLOCK sizes, split-K and warps a launch uses.

Shape legend: M rows of x (tokens, or token-expert pairs for MoE), N output
features, K input features, E experts.

Heuristics in the spirit of vLLM's ``get_default_config``: small M is
memory-bound (one 16-row tile, wide K tiles, split-K until every SM has work),
large M is compute-bound (128 x 128 tiles). Under ``TRITON_INTERPRET`` the
tiles stay small and split-K off: the interpreter's cost is per program and per
element, and no SM needs filling. Tuned values for a GPU can be passed as
``config=`` to the launchers; on a GPU the launchers first look their key
(GPU name, codec, M bucket, N, K) up in the repo's table of tuned configurations
(``ernieq.kernels.tile_table``, written by ``ernieq bench --sweep --save-configs``)
and fall back to these heuristics.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ernieq.kernels import tile_table


@dataclass(frozen=True)
class TileConfig:
    """block_m/n/k: tile sizes (powers of two, >= 16); split_k: K slices summed afterwards (dense GEMM only);
    group_m: tile rows swept together for L2 reuse; num_warps/num_stages: Triton launch options."""

    block_m: int = 16
    block_n: int = 64
    block_k: int = 64
    split_k: int = 1
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"TileConfig.{name} must be a power of two >= 16, got {v}")
        if self.split_k < 1 or self.group_m < 1:
            raise ValueError(f"TileConfig: split_k and group_m must be >= 1, got {self.split_k}, {self.group_m}")


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=8)
def gpu_name(device_index: int) -> str:
    """The CUDA device's name as the tile table keys it, e.g. "NVIDIA H200"."""
    return torch.cuda.get_device_name(device_index)


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def linear_config(
    m: int, n: int, k: int, device: torch.device, interpreted: bool, codec: str | None = None
) -> TileConfig:
    """The dense dequant-GEMM configuration for x [M, K] @ W_hat[N, K].T: the tile table's, else the heuristic."""
    if interpreted or device.type != "cuda":
        return TileConfig(block_m=16 if m <= 16 else 32, block_n=64, block_k=64, split_k=1, num_warps=1, num_stages=1)
    if codec is not None:
        stored = tile_table.lookup("linear", gpu_name(_device_index(device)), codec, m, n, k)
        if stored is not None:
            return stored
    if m <= 16:
        cfg = dict(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=4)
    elif m <= 64:
        cfg = dict(block_m=32 if m <= 32 else 64, block_n=64, block_k=64, num_warps=4, num_stages=4)
    elif m <= 256:
        cfg = dict(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=4)
    else:
        cfg = dict(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)
    tiles = _cdiv(m, cfg["block_m"]) * _cdiv(n, cfg["block_n"])
    k_tiles = _cdiv(k, cfg["block_k"])
    target = 2 * _num_sms(_device_index(device))
    split_k = 1
    while m <= 64 and tiles * split_k < target and k_tiles // (2 * split_k) >= 2:
        split_k *= 2  # fill the SMs: each slice keeps >= 2 K tiles
    return TileConfig(split_k=split_k, **cfg)


def moe_config(
    pairs: int, num_experts: int, device: torch.device, interpreted: bool,
    codec: str | None = None, n: int = 0, k: int = 0,
) -> TileConfig:  # fmt: skip
    """The fused-MoE configuration for ``pairs`` = T * A token-expert pairs over E experts.

    The tile table is keyed by the gate/up codec, M = pairs, N = I and K = H; else the heuristic.
    """
    if interpreted or device.type != "cuda":
        return TileConfig(block_m=16, block_n=64, block_k=64, group_m=1, num_warps=1, num_stages=1)
    if codec is not None:
        stored = tile_table.lookup("moe", gpu_name(_device_index(device)), codec, pairs, n, k)
        if stored is not None:
            return stored
    per_expert = pairs / num_experts  # mean rows per expert block
    if per_expert <= 16:
        return TileConfig(block_m=16, block_n=64, block_k=128, group_m=1, num_warps=4, num_stages=4)
    if per_expert <= 64:
        return TileConfig(block_m=32, block_n=64, block_k=64, group_m=8, num_warps=4, num_stages=4)
    return TileConfig(block_m=64, block_n=128, block_k=64, group_m=8, num_warps=8, num_stages=3)
