"""Where ernieq computes: ``--device auto|cpu|cuda|cuda:N`` and ``--dtype auto|bfloat16|float16|float32``.

The one place that resolves them (STYLE 13): every other module takes the device from its caller
or from its inputs, so the same code runs on a GPU and, in the tests, on the CPU.

- device ``auto``: the first CUDA GPU when there is one, else the CPU; ``cuda``: the current CUDA
  device; ``cuda:N``: GPU N. Asking for CUDA where there is none, or for a GPU index that does not
  exist, is a one-line :class:`DeviceError`.
- dtype ``auto``: bfloat16 on a GPU (float16 where the GPU has no bfloat16), float32 on the CPU.

A :class:`Placement` (device + compute dtype) is what commands pass down, and ``record`` is what
every result file stores of where and how it was computed, next to the kernel path it names.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ernieq.errors import ErnieqError

HOST = torch.device("cpu")  # where files are read and written, and where offloaded tensors wait
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DTYPE_CHOICES = ("auto", *DTYPES)
TORCH_KERNELS = "torch"  # the kernel path of plain torch layers: calibration, encoding, an unquantized model
_CUDA = re.compile(r"^cuda(?::(?P<index>\d+))?$")


class DeviceError(ErnieqError, ValueError):
    """A device or dtype that cannot be used here (no CUDA, no such GPU, an unknown name)."""


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """The torch device ``spec`` names: auto, cpu, cuda or cuda:N (a torch.device passes through the same checks)."""
    text = str(spec).strip().lower()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return HOST
    m = _CUDA.match(text)
    if m is None:
        raise DeviceError(f"--device {spec}: expected one of {', '.join(DEVICE_CHOICES)}")
    if not torch.cuda.is_available():
        build = "a CPU-only torch build" if torch.version.cuda is None else "no CUDA device visible"
        raise DeviceError(f"--device {spec}: no CUDA GPU on this machine ({build}, torch {torch.__version__}); "
                          f"use --device cpu or auto")
    index = int(m["index"]) if m["index"] is not None else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(f"--device {spec}: there is no CUDA device {index} ({count} visible: 0..{count - 1})")
    return torch.device("cuda", index)


def resolve_dtype(spec: str | torch.dtype, device: torch.device) -> torch.dtype:
    """The compute dtype ``spec`` names on ``device``; auto: bfloat16 on a GPU (float16 without bf16), float32 else."""
    if isinstance(spec, torch.dtype):
        if spec not in DTYPES.values():
            raise DeviceError(f"--dtype {spec}: expected one of {', '.join(DTYPE_CHOICES)}")
        return spec
    text = str(spec).strip().lower()
    if text == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if text not in DTYPES:
        raise DeviceError(f"--dtype {spec}: expected one of {', '.join(DTYPE_CHOICES)}")
    return DTYPES[text]


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16 (the names --dtype takes)."""
    return str(dtype).removeprefix("torch.")


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), or what ``platform`` knows of it."""
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """The GPU's or the CPU's name."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def available_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on ``device``: free GPU memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # kB
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@functools.cache
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None


def trim_host_memory() -> None:
    """Give the host memory freed so far back to the OS (glibc's ``malloc_trim``; nothing elsewhere). Freed
    blocks of a few MiB otherwise stay in the heap, and the peak of a process that loads and drops one
    layer after another (streamed models) would grow with the layers it has read."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@dataclass(frozen=True)
class Placement:
    """Where a command computes and in which floating-point dtype."""

    device: torch.device
    dtype: torch.dtype

    @classmethod
    def resolve(cls, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto") -> Placement:
        d = resolve_device(device)
        return cls(d, resolve_dtype(dtype, d))

    def record(self, kernels: str) -> dict:
        """What result files store: device, its name, dtype, and the kernel path ``kernels`` used."""
        return {"device": str(self.device), "device_name": device_name(self.device), "dtype": dtype_name(self.dtype),
                "kernels": kernels}



def describe(record: dict) -> str:
    """A ``Placement.record`` on one line: 'cuda:0 (NVIDIA H200), bfloat16, kernels: triton'."""
    return f"{record['device']} ({record['device_name']}), {record['dtype']}, kernels: {record['kernels']}"
