"""What result files record of how a loaded model computed: device, dtype and kernel path."""

from __future__ import annotations

import torch
from torch import nn

from ernieq.device import TORCH_KERNELS, Placement
from ernieq.kernels import resolve_backend
from ernieq.runtime.decode_cache import GIB, decode_cache
from ernieq.runtime.modules import QuantLinear, QuantMoEExperts


def kernel_path(model: nn.Module, device: torch.device) -> str:
    """How ``model`` computes on ``device``: 'torch' (nothing quantized), 'triton', or 'reference' with
    what the decode cache holds of its quantized modules ('reference, decode cache 0.51 GiB: 120 of 120
    modules'). Called after the model ran: the cache fills on first use."""
    quantized = [m for m in model.modules() if isinstance(m, (QuantLinear, QuantMoEExperts))]
    if not quantized:
        return TORCH_KERNELS
    backend = resolve_backend(device)
    if backend != "reference":
        return backend
    if not decode_cache().enabled:
        return "reference, decode cache off"
    held = [m.cached_bytes for m in quantized if m.cached_bytes]
    return f"reference, decode cache {sum(held) / GIB:.2f} GiB: {len(held)} of {len(quantized)} modules"


def runtime_record(placement: Placement, kernels: str) -> dict:
    """``placement.record(kernels)`` with the decode cache's budget on that device."""
    return {**placement.record(kernels), "decode_cache": decode_cache().record(placement.device)}
