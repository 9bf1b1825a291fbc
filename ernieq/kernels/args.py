"""What the kernels take, and the argument checks shared by the reference path and the Triton launchers.

Shape legend: T tokens, E experts, A active experts per token, K input features,
N output features, H hidden size, I expert intermediate size, M rows of x.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ernieq.codecs import QuantizedTensor
from ernieq.errors import ErnieqError
from ernieq.transforms import Rotation

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class KernelError(ErnieqError, ValueError):
    """Arguments a kernel cannot take (shape, dtype, device, backend)."""


def _check_float(t: torch.Tensor, name: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise KernelError(f"{name}: dtype must be one of {FLOAT_DTYPES}, got {t.dtype}")


def check_linear_args(x: torch.Tensor, q: QuantizedTensor, bias: torch.Tensor | None) -> None:
    """x: [M, K]; q: shape (N, K); bias: [N] or None."""
    _check_float(x, "x")
    if len(q.shape) != 2:
        raise KernelError(f"linear: weight must have shape (N, K), got {q.shape} (codec {q.codec})")
    n, k = q.shape
    if x.ndim != 2 or x.shape[1] != k:
        raise KernelError(f"linear: x must be [M, K={k}] for a weight of shape {q.shape}, got {tuple(x.shape)}")
    if bias is not None:
        _check_float(bias, "bias")
        if tuple(bias.shape) != (n,):
            raise KernelError(f"linear: bias must be [N={n}], got {tuple(bias.shape)}")


@dataclass(frozen=True)
class MoEWeights:
    """The routed experts of one layer, as every MoE path takes them.

    gate, up: shape (E, I, H); down: shape (E, H, I), each a stack of E encoded weights.
    down_rotation: R [I, I] that down was stored turned by (down_e R), or None; the MoE turns
    h = silu(gate x) * up x by R between its two GEMMs.
    """

    gate: QuantizedTensor
    up: QuantizedTensor
    down: QuantizedTensor
    down_rotation: Rotation | None = None

    @property
    def projections(self) -> tuple[QuantizedTensor, QuantizedTensor, QuantizedTensor]:
        return self.gate, self.up, self.down


def check_moe_args(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, weights: MoEWeights) -> None:
    """x: [T, H]; topk_ids: int [T, A]; topk_weights: float [T, A]; gate, up: (E, I, H); down: (E, H, I)."""
    gate, up, down = weights.projections
    _check_float(x, "x")
    _check_float(topk_weights, "topk_weights")
    if x.ndim != 2:
        raise KernelError(f"moe: x must be [T, H], got {tuple(x.shape)}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise KernelError(f"moe: topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if topk_ids.ndim != 2 or topk_ids.shape[0] != x.shape[0] or topk_weights.shape != topk_ids.shape:
        raise KernelError(
            f"moe: topk_ids and topk_weights must both be [T={x.shape[0]}, A], "
            f"got {tuple(topk_ids.shape)} and {tuple(topk_weights.shape)}"
        )
    if len(gate.shape) != 3 or gate.shape != up.shape:
        raise KernelError(f"moe: gate and up must share a shape (E, I, H), got {gate.shape} and {up.shape}")
    e, i, h = gate.shape
    if tuple(down.shape) != (e, h, i):
        raise KernelError(f"moe: down must have shape (E={e}, H={h}, I={i}), got {down.shape}")
    if x.shape[1] != h:
        raise KernelError(f"moe: x must be [T, H={h}], got {tuple(x.shape)}")
    rot = weights.down_rotation
    if rot is not None and rot.k != i:
        raise KernelError(f"moe: down_rotation turns K={rot.k} inputs, down takes I={i}")
