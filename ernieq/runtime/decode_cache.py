"""The decode cache: on the reference path, quantized modules decode their weights once and keep them.

The reference path (``ernieq.kernels.reference``, the oracle every kernel is tested against)
decodes every weight on every call: at ERNIE-4.5-21B-A3B shapes one ccq2 MoE layer takes about a
second for a single token on a CPU. A ``QuantLinear`` or ``QuantMoEExperts`` that computes on the
reference path asks this cache for room instead; when it gets it, it decodes its weights once, in
the compute dtype and with its input rotations folded in, and from then on computes like an
unquantized layer. On the Triton path nothing is cached: the kernels decode inside their K loop.

``--decode-cache auto|off|GiB`` sets one process-wide budget per device: ``auto`` is
``AUTO_SHARE`` of the memory available on the device when its first module asks (the host's
MemAvailable on the CPU, free memory on a GPU), ``off`` caches nothing, a number is GiB. What is
counted is the bytes of the cached tensors; a module's bytes come back when its tensors are freed.
Which modules are cached is deterministic for a given budget: whole modules (a layer's experts
are one entry), first come first served in forward order; a module that does not fit computes
on the uncached reference path and asks again on its next call.
"""

from __future__ import annotations

import logging
import math
import weakref
from dataclasses import dataclass

import torch

from ernieq.device import available_memory
from ernieq.errors import ErnieqError

log = logging.getLogger(__name__)

AUTO, OFF = "auto", "off"
AUTO_SHARE = 0.5  # of the memory available on a device when its first module asks
GIB = 2**30


@dataclass
class DeviceBudget:
    """One device's share: the limit, the bytes held by cached tensors, and how many modules hold them."""

    limit: int
    used: int = 0
    modules: int = 0


def parse_decode_cache(spec: str | float | int | None) -> int | None:
    """``auto`` (None: decided per device on first use), ``off`` (0) or a size in GiB (bytes)."""
    if spec is None or str(spec).strip().lower() == AUTO:
        return None
    if str(spec).strip().lower() == OFF:
        return 0
    try:
        gib = float(spec)
    except ValueError:
        raise ErnieqError(f"--decode-cache {spec}: expected auto, off or a size in GiB") from None
    if not (math.isfinite(gib) and gib >= 0):
        raise ErnieqError(f"--decode-cache {spec}: a size in GiB must be finite and not negative")
    return int(gib * GIB)


class DecodeCache:
    """The process-wide budget of decoded weights, per device (see the module doc)."""

    def __init__(self, spec: str | float | None = AUTO):
        self.limit_bytes = parse_decode_cache(spec)  # None: auto
        self.budgets: dict[torch.device, DeviceBudget] = {}

    @property
    def enabled(self) -> bool:
        return self.limit_bytes != 0

    def configure(self, spec: str | float | None) -> None:
        """A new limit on every device. Bytes already cached stay counted until their tensors are freed;
        an auto limit is measured again (what is cached plus a share of what is still available)."""
        self.limit_bytes = parse_decode_cache(spec)
        self.budgets = {device: b for device, b in self.budgets.items() if b.used}
        for device, b in self.budgets.items():
            b.limit = self._limit(device, b.used)

    def _limit(self, device: torch.device, used: int = 0) -> int:
        if self.limit_bytes is not None:
            return self.limit_bytes
        return used + int(AUTO_SHARE * available_memory(device))

    def budget(self, device: torch.device) -> DeviceBudget:
        """``device``'s budget; an auto limit is measured when the device is first asked for."""
        if device not in self.budgets:
            self.budgets[device] = DeviceBudget(self._limit(device))
            if self.enabled:
                log.info("decode cache on %s: up to %.2f GiB of decoded weights", device,
                         self.budgets[device].limit / GIB)
        return self.budgets[device]

    def fits(self, device: torch.device, nbytes: int) -> bool:
        """Whether one module's ``nbytes`` of decoded weights fit in what is left of ``device``'s budget."""
        return self.enabled and self.budget(device).used + nbytes <= self.budget(device).limit

    def hold(self, device: torch.device, tensors: list[torch.Tensor]) -> None:
        """Count one module's ``tensors`` (on ``device``) against its budget until they are freed."""
        b = self.budget(device)
        b.modules += 1
        left = [len(tensors)]

        def freed(nbytes: int) -> None:
            b.used -= nbytes
            left[0] -= 1
            if left[0] == 0:
                b.modules -= 1

        for t in tensors:
            b.used += t.numel() * t.element_size()
            weakref.finalize(t, freed, t.numel() * t.element_size())

    def record(self, device: torch.device) -> dict:
        """``device``'s budget as result files store it: limit, cached bytes and modules."""
        b = self.budget(device) if self.enabled else DeviceBudget(0)
        return {"limit_bytes": b.limit, "cached_bytes": b.used, "cached_modules": b.modules}


_CACHE = DecodeCache()


def decode_cache() -> DecodeCache:
    """The process-wide decode cache."""
    return _CACHE


def set_decode_cache(spec: str | float | None) -> DecodeCache:
    """Set the process-wide budget (``--decode-cache``); returns the cache."""
    _CACHE.configure(spec)
    return _CACHE
