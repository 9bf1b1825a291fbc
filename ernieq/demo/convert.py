"""The dense Llama state dict as an ERNIE 4.5 MoE checkpoint: rotary layout, MoE tensors, config.

ERNIE's rotary embedding pairs dimensions (2i, 2i+1) where Llama pairs
(i, i + D/2), so the rows of ``q_proj``/``k_proj`` are permuted within each head.
Every tensor is then grown to the padded sizes (``ernieq.demo.pad``). The checkpoint
is written in the per-expert layout of published ERNIE 4.5 checkpoints, in float32
(bfloat16 would make the exact variant inexact).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ernieq.demo.pad import Padding, pad_tensor
from ernieq.demo.plan import MoePlan
from ernieq.demo.recipe import DemoRecipe


def layer_index(name: str) -> int | None:
    """N of a ``model.layers.N....`` tensor name, else None."""
    parts = name.split(".")
    return int(parts[2]) if len(parts) > 3 and parts[:2] == ["model", "layers"] else None


def rope_interleave_permutation(head_dim: int) -> torch.Tensor:
    """LongTensor [D]: new row j of a head takes old row perm[j].

    Llama rotates the pairs (i, i + D/2); ERNIE the pairs (2i, 2i+1), both at
    frequency i. So new row 2i = old row i, new row 2i+1 = old row i + D/2.
    """
    half = torch.arange(head_dim // 2)
    return torch.stack([half, half + head_dim // 2], dim=1).flatten()  # [D]: 0, D/2, 1, D/2+1, ...


def permute_rope_rows(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """q_proj/k_proj weight [heads * D, K] from Llama's rotary layout to ERNIE's."""
    rows, k = weight.shape
    perm = rope_interleave_permutation(head_dim)
    return weight.reshape(rows // head_dim, head_dim, k)[:, perm].reshape(rows, k)


def ernie_config(dense, recipe: DemoRecipe, moe_size: int, num_layers: int, padding: Padding) -> dict:
    """config.json of the Ernie4_5_MoeForCausalLM checkpoint, from the dense Llama config and the padding.

    head_dim is explicit: H' / Q' (640 / 12) is not the head size.
    """
    from transformers import Ernie4_5_MoeConfig

    cfg = Ernie4_5_MoeConfig(
        architectures=["Ernie4_5_MoeForCausalLM"],
        vocab_size=dense.vocab_size,
        hidden_size=padding.padded_hidden,
        intermediate_size=dense.intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=padding.padded_heads,
        num_key_value_heads=padding.padded_kv_heads,
        head_dim=padding.head_dim,
        hidden_act=dense.hidden_act,
        max_position_embeddings=dense.max_position_embeddings,
        rms_norm_eps=dense.rms_norm_eps * padding.eps_scale,
        rope_parameters={"rope_type": "default", "rope_theta": dense.rope_parameters["rope_theta"]},
        tie_word_embeddings=dense.tie_word_embeddings,
        use_bias=False,
        bos_token_id=dense.bos_token_id,
        eos_token_id=dense.eos_token_id,
        pad_token_id=dense.pad_token_id,
        moe_num_experts=recipe.experts,
        moe_k=recipe.top_k,
        moe_num_shared_experts=recipe.shared,
        moe_intermediate_size=moe_size,
        moe_layer_start_index=1,
        moe_layer_end_index=num_layers - 1,
        moe_layer_interval=1,
        dtype="float32",
    )
    return cfg.to_dict()


def moe_tensors(prefix: str, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, plan: MoePlan) -> Iterator:
    """(name, tensor) of one MoE layer in the per-expert checkpoint layout; gate/up [I, H], down [H, I]."""
    yield f"{prefix}.gate.weight", plan.router.float().clone()  # [E, H]
    yield f"{prefix}.moe_statics.e_score_correction_bias", plan.bias.float()[None].clone()  # [1, E]
    for e, ix in enumerate(plan.experts):
        yield f"{prefix}.experts.{e}.gate_proj.weight", gate[ix].contiguous()  # [m, H]
        yield f"{prefix}.experts.{e}.up_proj.weight", up[ix].contiguous()  # [m, H]
        yield f"{prefix}.experts.{e}.down_proj.weight", (down[:, ix] * plan.down_scale).contiguous()  # [H, m]
    if len(plan.shared):
        yield f"{prefix}.shared_experts.gate_proj.weight", gate[plan.shared].contiguous()  # [S*m, H]
        yield f"{prefix}.shared_experts.up_proj.weight", up[plan.shared].contiguous()  # [S*m, H]
        yield f"{prefix}.shared_experts.down_proj.weight", down[:, plan.shared].contiguous()  # [H, S*m]


def checkpoint_tensors(state: dict[str, torch.Tensor], plans: dict[int, MoePlan], padding: Padding) -> Iterator:
    """(name, tensor) of the whole padded ERNIE checkpoint from the dense Llama state dict."""
    for name, tensor in _ernie_tensors(state, plans, padding.head_dim):
        yield name, pad_tensor(name, tensor, padding)


def _ernie_tensors(state: dict[str, torch.Tensor], plans: dict[int, MoePlan], head_dim: int) -> Iterator:
    """(name, tensor) of the ERNIE checkpoint at the source sizes."""
    for name, tensor in state.items():
        if name == "lm_head.weight":
            continue  # tied to model.embed_tokens.weight
        layer = layer_index(name)
        if name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            yield name, permute_rope_rows(tensor, head_dim)
        elif layer in plans and name.endswith("mlp.gate_proj.weight"):  # the whole MoE layer, once
            prefix = name.removesuffix(".gate_proj.weight")
            up, down = state[f"{prefix}.up_proj.weight"], state[f"{prefix}.down_proj.weight"]
            yield from moe_tensors(prefix, tensor, up, down, plans[layer])
        elif layer in plans and ".mlp." in name:
            continue  # up_proj / down_proj: written with gate_proj
        else:
            yield name, tensor
