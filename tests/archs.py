"""Tiny random causal LMs of many architectures, built from transformers' own config classes.

Each entry is a model_type and the fields that make it tiny (2-3 layers, hidden 64, a few
experts); :func:`write_tiny_arch` instantiates it with transformers' own initialisation
(seeded), saves it with ``save_pretrained`` (the checkpoint layout the hub uses: per-expert
tensors where the class's conversion writes them) and adds the tests' character tokenizer.

Shape legend: H 64; dense I 128 (a multiple of --bits 4's G = 64, so compressed-tensors'
group strategy holds it); routed-expert I 64 (one group: vLLM runs a block's experts as one layer, so gate, up and down need one scheme).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from tests import list_moe  # noqa: F401  (registers the ModuleList MoE with transformers' Auto classes)
from tests.tiny import write_char_tokenizer

COMMON = {"vocab_size": 96, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256, "intermediate_size": 128,
          "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


@dataclass(frozen=True)
class Arch:
    """One architecture of the matrix: its model_type, the fields that make it tiny, and what it shows.

    layout: how its routed experts are held ("" for a dense model); notes: what it exercises.
    """

    model_type: str
    fields: dict = field(default_factory=dict)
    layout: str = ""
    notes: str = ""

    @property
    def moe(self) -> bool:
        return bool(self.layout)


FUSED_NK = "fused [E, 2I, H], gate | up"
ARCHS = {
    "llama": Arch("llama", notes="the reference dense layout"),
    "qwen2": Arch("qwen2", notes="biases on q/k/v"),
    "qwen3": Arch("qwen3", notes="q/k norms inside attention"),
    "gemma3": Arch("gemma3_text", {"sliding_window": 16, "tie_word_embeddings": True},
                   notes="RMSNorm (1 + w), sandwich norms, GELU, sliding layers, tied embeddings"),
    "phi3": Arch("phi3", notes="fused qkv_proj and gate_up_proj linear layers"),
    "ernie4_5": Arch("ernie4_5", {"tie_word_embeddings": True}, notes="ERNIE 4.5 dense"),
    "ernie4_5_moe": Arch("ernie4_5_moe", {"num_hidden_layers": 3, "moe_intermediate_size": 64, "moe_num_experts": 4,
                                          "moe_k": 2, "moe_num_shared_experts": 1, "moe_layer_start_index": 1,
                                          "tie_word_embeddings": True},
                         FUSED_NK + " (per-expert in the checkpoint)", "dense layer 0, shared experts, moe_statics"),
    "mixtral": Arch("mixtral", {"intermediate_size": 64, "num_local_experts": 4, "num_experts_per_tok": 2},
                    FUSED_NK + " (per-expert w1/w3/w2 in the checkpoint)", "block_sparse_moe renamed to mlp"),
    "qwen2_moe": Arch("qwen2_moe", {"moe_intermediate_size": 64, "shared_expert_intermediate_size": 64,
                                    "num_experts": 4, "num_experts_per_tok": 2},
                      FUSED_NK + " (per-expert in the checkpoint)", "a shared expert behind a sigmoid gate"),
    "qwen3_moe": Arch("qwen3_moe", {"moe_intermediate_size": 64, "num_experts": 4, "num_experts_per_tok": 2},
                      FUSED_NK + " (per-expert in the checkpoint)"),
    "olmoe": Arch("olmoe", {"intermediate_size": 64, "num_experts": 4, "num_experts_per_tok": 2},
                  FUSED_NK + " (per-expert in the checkpoint)", "q/k norms over the whole projection"),
    "gpt_oss": Arch("gpt_oss", {"intermediate_size": 64, "num_local_experts": 4, "num_experts_per_tok": 2,
                                "sliding_window": 16},
                    "fused [E, H, 2I], gate and up interleaved, biases (fused in the checkpoint)",
                    "clamped swish-GLU with (up + 1): runs expert by expert; attention sinks"),
    "deepseek_v3": Arch("deepseek_v3", {"num_hidden_layers": 3, "num_key_value_heads": 4, "head_dim": 8,
                                        "moe_intermediate_size": 64, "n_routed_experts": 4, "num_experts_per_tok": 2,
                                        "n_shared_experts": 1, "first_k_dense_replace": 1, "kv_lora_rank": 16,
                                        "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16,
                                        "v_head_dim": 16, "n_group": 2, "topk_group": 1},
                        FUSED_NK + " (per-expert in the checkpoint)",
                        "multi-head latent attention, group-limited sigmoid routing, correction bias buffer"),
    "glm4_moe": Arch("glm4_moe", {"num_hidden_layers": 3, "moe_intermediate_size": 64, "n_routed_experts": 4,
                                  "num_experts_per_tok": 2, "n_shared_experts": 1, "first_k_dense_replace": 1,
                                  "n_group": 1, "topk_group": 1},
                     FUSED_NK + " (per-expert in the checkpoint)", "partial rotary, shared experts"),
    # router_jitter_noise 0: sparsemixer's jitter threshold turns last-bit differences (between ernieq's
    # runtime and the decoded model, summation order) into different routing on a random tiny model
    "phimoe": Arch("phimoe", {"intermediate_size": 64, "num_local_experts": 4, "num_experts_per_tok": 2,
                              "router_jitter_noise": 0.0},
                   FUSED_NK + " (per-expert w1/w3/w2 in the checkpoint)", "LayerNorm with biases, router renamed"),
    "list_moe": Arch(list_moe.MODEL_TYPE, {"intermediate_size": 64, "num_local_experts": 4},
                     "per expert: an nn.ModuleList of MLPs (custom code, registered)",
                     "no adapter and no transformers class: experts found by structure; AWQ off (its routing "
                     "loop does not run on the meta device)"),
    "aria_text": Arch("aria_text", {"intermediate_size": 64, "moe_num_experts": 4, "moe_topk": 2,
                                    "moe_num_shared_experts": 1},
                      "fused [E, H, 2I], gate | up (fused fc1/fc2 in the checkpoint)", "K-major experts, shared experts"),
}


def tiny_config(arch: str, **fields):
    """``arch``'s tiny config; ``fields`` replace the matrix's (wider layers for a format that needs them)."""
    from transformers import AutoConfig

    spec = ARCHS[arch]
    return AutoConfig.for_model(spec.model_type, **{**COMMON, **spec.fields, **fields})


def write_tiny_arch(arch: str, out: Path, seed: int = 0, **fields) -> Path:
    """A tiny random ``arch`` checkpoint (save_pretrained, safetensors) with a tokenizer, in ``out``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **fields), dtype=torch.float32).eval()
    with torch.no_grad():  # routers away from their zero init, so that routing depends on the input
        for name, p in model.named_parameters():
            if p.dim() == 2 and ("gate" in name or "router" in name) and p.abs().max() == 0:
                p.normal_(0.0, 0.5)
    model.save_pretrained(out, safe_serialization=True)
    write_char_tokenizer(out)
    return out
