"""How ``ernieq bench`` times a call: ``triton.testing.do_bench`` on a GPU, ``time.perf_counter`` medians
on the CPU, one call in the dry run; the memory bandwidth every row is compared with; and the device
synchronization a wall-clock reading of queued GPU work needs (the whole-model benchmark)."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

Timer = Callable[[Callable[[], object]], float]  # median milliseconds of fn()


def gpu_median_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds by ``triton.testing.do_bench`` (CUDA only)."""
    import triton

    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def once_ms(fn: Callable[[], object]) -> float:
    """Wall-clock milliseconds of one call: the dry run checks the flow, not speed."""
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def cpu_median_ms(fn: Callable[[], object], min_reps: int = 3, max_reps: int = 25, target_s: float = 0.25) -> float:
    """Median milliseconds after one warm-up call: at least ``min_reps`` calls, more (up to ``max_reps``)
    while they take less than ``target_s`` seconds in all, so fast calls get more samples on a busy CPU."""
    fn()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < min_reps or (len(samples) < max_reps and time.perf_counter() - start < target_s):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device``: CUDA runs asynchronously, so a wall clock read without this
    times the launches, not the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth_gbps(device: torch.device, nbytes: int, timer: Timer) -> float:
    """(read + write bytes) / median time of copying ``nbytes`` bytes on ``device``."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3) / 1e9
