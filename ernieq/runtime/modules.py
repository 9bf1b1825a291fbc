"""Compressed modules that stand in for transformers' linear layers and expert blocks.

They keep the packed tensors of a :class:`QuantizedTensor` as buffers and compute
through ``ernieq.kernels`` (the Triton kernels on CUDA, the reference path elsewhere).
"""

from __future__ import annotations

import torch
from torch import nn

from ernieq import kernels
from ernieq.codecs import QuantizedTensor
from ernieq.transforms import Rotation


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


class _Turn(nn.Module):
    """An input rotation's tensors as buffers (see ``ernieq.transforms``)."""

    def __init__(self, rotation: Rotation):
        super().__init__()
        self.register_buffer("signs", rotation.signs, persistent=False)
        self.register_buffer("q", rotation.q, persistent=False)

    def rotation(self) -> Rotation:
        return Rotation(self.signs, self.q)


def _turn(rotation: Rotation | None) -> _Turn | None:
    return _Turn(rotation) if rotation is not None else None


class QuantLinear(nn.Module):
    """y = x @ W_hat.T (+ bias) with W_hat [N, K] kept packed; with a rotation R, W_hat is
    stored turned (W R) and y = (x R) @ (W R)^T."""

    def __init__(self, q: QuantizedTensor, bias: torch.Tensor | None = None, rotation: Rotation | None = None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.packed = _Packed(q)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.turn = _turn(rotation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)  # [M, K]
        if self.turn is not None:
            x = self.turn.rotation().apply(x)  # x R
        y = kernels.linear(x, self.packed.quantized(), self.bias)  # [M, N]
        return y.reshape(*lead, self.out_features)


class QuantMoEExperts(nn.Module):
    """The routed experts of one layer, packed: gate and up (E, I, H), down (E, H, I).

    Same call as transformers' fused expert modules:
    ``forward(hidden_states [T, H], top_k_index [T, A], top_k_weights [T, A]) -> [T, H]``.
    rotation: R_H that gate and up were stored turned by (hidden states turned once for all
    experts); down_rotation: R_I for down (applied inside the MoE op, between the two GEMMs).
    """

    def __init__(self, gate: QuantizedTensor, up: QuantizedTensor, down: QuantizedTensor,
                 rotation: Rotation | None = None, down_rotation: Rotation | None = None):
        super().__init__()
        self.num_experts = gate.shape[0]
        self.gate, self.up, self.down = _Packed(gate), _Packed(up), _Packed(down)
        self.turn, self.down_turn = _turn(rotation), _turn(down_rotation)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if self.turn is not None:
            hidden_states = self.turn.rotation().apply(hidden_states)  # x R_H
        weights = kernels.MoEWeights(self.gate.quantized(), self.up.quantized(), self.down.quantized(),
                                     self.down_turn.rotation() if self.down_turn is not None else None)
        return kernels.moe(hidden_states, top_k_index, top_k_weights, weights)  # [T, H], [T, A], [T, A] -> [T, H]
