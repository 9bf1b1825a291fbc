"""Compressed modules that stand in for transformers' linear layers and expert blocks.

They keep the packed tensors of a :class:`QuantizedTensor` as buffers and compute
through ``ernieq.kernels`` (the Triton kernels on CUDA, the reference path elsewhere).
"""

from __future__ import annotations

import torch
from torch import nn

from ernieq import kernels
from ernieq.codecs import QuantizedTensor


class _Packed(nn.Module):
    """Holds one QuantizedTensor's stored tensors as buffers, so ``.to()`` moves them."""

    def __init__(self, q: QuantizedTensor):
        super().__init__()
        self.codec, self.shape, self.params = q.codec, tuple(q.shape), dict(q.params)
        self._names = tuple(q.tensors)
        for name, t in q.tensors.items():
            self.register_buffer(name, t, persistent=False)

    def quantized(self) -> QuantizedTensor:
        return QuantizedTensor(self.codec, self.shape, {n: getattr(self, n) for n in self._names}, self.params)

    def extra_repr(self) -> str:
        return f"codec={self.codec}, shape={self.shape}, params={self.params}"


class QuantLinear(nn.Module):
    """y = x @ W_hat.T (+ bias) with W_hat [N, K] kept packed."""

    def __init__(self, q: QuantizedTensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.packed = _Packed(q)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = kernels.linear(x.reshape(-1, self.in_features), self.packed.quantized(), self.bias)  # [M, N]
        return y.reshape(*lead, self.out_features)


class QuantMoEExperts(nn.Module):
    """The routed experts of one layer, packed: gate and up (E, I, H), down (E, H, I).

    Same call as transformers' fused expert modules:
    ``forward(hidden_states [T, H], top_k_index [T, A], top_k_weights [T, A]) -> [T, H]``.
    """

    def __init__(self, gate: QuantizedTensor, up: QuantizedTensor, down: QuantizedTensor):
        super().__init__()
        self.num_experts = gate.shape[0]
        self.gate, self.up, self.down = _Packed(gate), _Packed(up), _Packed(down)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        return kernels.moe(
            hidden_states,  # [T, H]
            top_k_index,  # [T, A]
            top_k_weights,  # [T, A]
            self.gate.quantized(),
            self.up.quantized(),
            self.down.quantized(),
        )
