"""What result files record of how a loaded model computed: device, dtype, kernel path, and whether it streamed."""

from __future__ import annotations

import torch

from ernieq.device import TORCH_KERNELS, Placement
from ernieq.kernels import resolve_backend
from ernieq.runtime.decode_cache import GIB, decode_cache
from ernieq.runtime.stream import StreamedLM, quantized_use


def kernel_path(model, device: torch.device) -> str:
    """How ``model`` (a transformers model or a ``StreamedLM``) computes on ``device``: 'torch' (nothing
    quantized), 'triton', or 'reference' with what the decode cache holds of its quantized modules
    ('reference, decode cache 0.51 GiB: 120 of 120 modules'; streamed: the largest layer's bytes, one layer
    at a time). Called after the model ran: the cache fills on first use."""
    streamed = isinstance(model, StreamedLM)
    use = model.kernel_use() if streamed else quantized_use(model.modules())
    if not use.modules:
        return TORCH_KERNELS
    backend = resolve_backend(device)
    if backend != "reference":
        return backend
    if not decode_cache().enabled:
        return "reference, decode cache off"
    return (f"reference, decode cache {use.held_bytes / GIB:.2f} GiB: {use.held} of {use.modules} modules"
            + (", one layer at a time" if streamed else ""))


def runtime_record(placement: Placement, kernels: str, stream: dict | None = None) -> dict:
    """``placement.record(kernels)`` with the decode cache's budget on that device, and ``stream`` (how the
    model was held: ``StreamPlan.record``, or one per model label) when given."""
    extra = {"stream": stream} if stream is not None else {}
    return {**placement.record(kernels), "decode_cache": decode_cache().record(placement.device), **extra}
