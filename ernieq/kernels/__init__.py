"""How compressed weights are multiplied: the torch reference and the fused Triton kernels.

``linear(x, q, bias=None, backend=None)`` and ``moe(x, topk_ids, topk_weights, MoEWeights(gate, up, down), backend=None)``
pick a backend (see ``ernieq.kernels.ops``): the Triton kernels on CUDA, the
reference elsewhere, ``ERNIEQ_KERNELS=reference|triton`` to force one. Importing
this package does not import triton's kernels; the first triton call does.
"""

from ernieq.kernels.args import KernelError, MoEWeights
from ernieq.kernels.ops import BACKENDS, linear, moe, resolve_backend

__all__ = ["BACKENDS", "KernelError", "MoEWeights", "linear", "moe", "resolve_backend"]
