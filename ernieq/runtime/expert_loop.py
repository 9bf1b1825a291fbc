"""Routed experts the fused MoE kernel cannot express, one expert at a time through packed linears.

Shape legend: T tokens, A active experts per token, H hidden size, I expert intermediate size.

ernieq's fused MoE kernel computes ``down(silu(gate x) * up x)`` without biases. An experts
module that computes something else (GPT-OSS: biases on every projection, gate and up
interleaved, a clamped swish-GLU with ``(up + 1)``) runs here instead: for every expert that
received tokens, gate and up through ernieq's packed linear kernel, the class's own gate
function on them (laid out as the class lays out its ``gate_up`` output), down likewise.
The result is what the class's forward computes with the decoded weights.
"""

from __future__ import annotations

import torch
from torch import nn

from ernieq import kernels
from ernieq.codecs import QuantizedTensor
from ernieq.model.expert_layout import ExpertLayout, gate_function
from ernieq.runtime.modules import _Packed, _turn
from ernieq.transforms import Rotation


class QuantExpertLoop(nn.Module):
    """The routed experts of one layer, packed per projection (E, N, K), computed expert by expert.

    Same call as transformers' experts modules:
    ``forward(hidden_states [T, H], top_k_index [T, A], top_k_weights [T, A]) -> [T, H]``.
    original: the transformers experts module it stands for (its gate function is used, nothing else);
    biases: {projection: [E, N]} of the biased projections; rotation / down_rotation: R_H of gate and up,
    R_I of down (the weights are stored turned by them).
    """

    def __init__(self, layout: ExpertLayout, original: nn.Module, gate: QuantizedTensor, up: QuantizedTensor,
                 down: QuantizedTensor, biases: dict[str, torch.Tensor], rotation: Rotation | None = None,
                 down_rotation: Rotation | None = None):
        super().__init__()
        self.layout = layout
        self.num_experts = gate.shape[0]
        self.gate, self.up, self.down = _Packed(gate), _Packed(up), _Packed(down)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            self.register_buffer(f"{proj}_bias", biases.get(proj), persistent=False)
        self.turn, self.down_turn = _turn(rotation), _turn(down_rotation)
        self._gate_fn = gate_function(original)  # the class's own map from its gate_up output to [T, I]

    def _linear(self, x: torch.Tensor, packed: _Packed, bias: torch.Tensor | None, e: int) -> torch.Tensor:
        return kernels.linear(x, packed.quantized().expert(e), bias[e] if bias is not None else None)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        x = hidden_states.reshape(-1, hidden_states.shape[-1])  # [T, H]
        xg = self.turn.rotation().apply(x) if self.turn is not None else x  # x R_H for gate and up
        out = torch.zeros_like(x)  # [T, H]
        for e in torch.unique(top_k_index).tolist():
            tok, slot = torch.nonzero(top_k_index == e, as_tuple=True)  # [T_e], [T_e]
            xe = xg[tok]  # [T_e, H]
            g = self._linear(xe, self.gate, self.gate_proj_bias, e)  # [T_e, I]
            u = self._linear(xe, self.up, self.up_proj_bias, e)  # [T_e, I]
            h = self._gate_fn(self.layout.assemble(g, u))  # [T_e, I], the class's gate function
            if self.down_turn is not None:
                h = self.down_turn.rotation().apply(h)  # h R_I
            y = self._linear(h, self.down, self.down_proj_bias, e)  # [T_e, H]
            out.index_add_(0, tok, (y * top_k_weights[tok, slot, None]).to(out.dtype))
        return out.reshape(hidden_states.shape)
