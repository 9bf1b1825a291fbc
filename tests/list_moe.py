"""A causal LM from outside transformers whose routed experts are an ``nn.ModuleList`` of MLPs.

transformers 5 fuses every MoE it ships into 3-D parameters; checkpoints with remote code (and
older transformers) still keep one module per expert. This registers such a class with
transformers' Auto classes (model_type ``ernieq_list_moe``): Llama's attention and norms, a MoE
block of a linear router and a list of Llama MLPs, the routing loop in plain torch. ernieq has
no adapter for it; the generic one has to find its experts.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP

MODEL_TYPE = "ernieq_list_moe"


class ListMoeConfig(LlamaConfig):
    model_type = MODEL_TYPE

    def __init__(self, num_local_experts: int = 4, num_experts_per_tok: int = 2, **kwargs):
        self.num_local_experts = num_local_experts
        self.num_experts_per_tok = num_experts_per_tok
        super().__init__(**kwargs)


class ListMoeBlock(nn.Module):
    """softmax router, top-k renormalised, experts looped over: [B, L, H] -> [B, L, H]."""

    def __init__(self, config: ListMoeConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.gate = nn.Linear(config.hidden_size, config.num_local_experts, bias=False)
        self.experts = nn.ModuleList(LlamaMLP(config) for _ in range(config.num_local_experts))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.reshape(-1, hidden_states.shape[-1])  # [T, H]
        weights, index = torch.softmax(self.gate(x), dim=-1).topk(self.top_k, dim=-1)  # [T, A]
        weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(index == e)
            if tok.numel():
                out.index_add_(0, tok, expert(x[tok]) * weights[tok, slot, None])
        return out.reshape(hidden_states.shape)


class ListMoeForCausalLM(LlamaForCausalLM):
    config_class = ListMoeConfig

    def __init__(self, config: ListMoeConfig):
        super().__init__(config)
        for layer in self.model.layers:
            layer.mlp = ListMoeBlock(config)
        self.post_init()


AutoConfig.register(MODEL_TYPE, ListMoeConfig, exist_ok=True)
AutoModelForCausalLM.register(ListMoeConfig, ListMoeForCausalLM, exist_ok=True)
