"""Peak memory of one measured stretch, on the device that computes it.

On CUDA: ``torch.cuda.max_memory_allocated`` since ``reset_peak`` (tensors only, CUDA graph pools
included). On the CPU the tensors live among everything else the process holds, so the figure is
the process's peak resident set (Linux VmHWM), which ``reset_peak`` brings back to the current
RSS by writing 5 to /proc/self/clear_refs; where that file cannot be written (not Linux) the figure
is the peak since the process started, and ``memory_kind`` says so.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def _hwm_resettable() -> bool:
    return _CLEAR_REFS.exists() and _STATUS.exists()


def memory_kind(device: torch.device) -> str:
    """What ``peak_bytes`` measures on ``device``, for tables and JSON."""
    if device.type == "cuda":
        return "peak device memory (torch.cuda.max_memory_allocated)"
    return "peak RSS (VmHWM)" if _hwm_resettable() else "peak RSS since the process started (ru_maxrss)"


def reset_peak(device: torch.device) -> None:
    """Start a new peak on ``device`` from what is held now."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif _hwm_resettable():
        _CLEAR_REFS.write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def peak_bytes(device: torch.device) -> int:
    """The peak on ``device`` since ``reset_peak``, in bytes."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    if _hwm_resettable():
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, kB on Linux
