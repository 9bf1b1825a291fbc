"""Tiny random checkpoints for tests: ERNIE 4.5 MoE in both expert layouts."""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

from ernieq.model.checkpoint import CheckpointWriter

TINY_ERNIE = {
    "architectures": ["Ernie4_5_MoeForCausalLM"],
    "model_type": "ernie4_5_moe",
    "vocab_size": 96,
    "hidden_size": 64,
    "intermediate_size": 96,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "moe_num_experts": 4,
    "moe_k": 2,
    "moe_num_shared_experts": 1,
    "moe_layer_start_index": 1,
    "max_position_embeddings": 256,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "use_bias": False,
}


def tiny_ernie_model(seed: int = 0, **overrides):
    """A random transformers Ernie4_5_MoeForCausalLM (float32) with non-zero router weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {**TINY_ERNIE, **overrides}
    config = AutoConfig.for_model(cfg["model_type"], **{k: v for k, v in cfg.items() if k != "model_type"})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.5)
    return model.eval()


def write_tiny_ernie(out: Path, layout: str = "per_expert", seed: int = 0, **overrides) -> Path:
    """Write a tiny ERNIE MoE checkpoint; ``layout`` 'per_expert' (published) or 'fused' (transformers 5)."""
    model = tiny_ernie_model(seed, **overrides)
    out.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    with CheckpointWriter(out, max_shard_bytes=64 * 1024) as w:
        for name, t in state.items():
            if name == "lm_head.weight" and model.config.tie_word_embeddings:
                continue
            if layout == "per_expert" and name.endswith("experts.gate_up_proj"):
                prefix = name[: -len(".gate_up_proj")]
                inter = t.shape[1] // 2
                for e in range(t.shape[0]):
                    w.add(f"{prefix}.{e}.gate_proj.weight", t[e, :inter].clone())
                    w.add(f"{prefix}.{e}.up_proj.weight", t[e, inter:].clone())
            elif layout == "per_expert" and name.endswith("experts.down_proj"):
                prefix = name[: -len(".down_proj")]
                for e in range(t.shape[0]):
                    w.add(f"{prefix}.{e}.down_proj.weight", t[e].clone())
            elif layout == "per_expert":  # published checkpoints keep moe_statics beside the gate
                w.add(name.replace(".mlp.gate.moe_statics.", ".mlp.moe_statics."), t.clone())
            else:
                w.add(name, t.clone())
    config = model.config.to_dict()
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def write_char_tokenizer(folder: Path) -> None:
    """A character-level tokenizer of 96 tokens (the tiny models' vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate(string.printable[:94])}, " ": 95}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                              "unk_token": "<unk>"}))


def reload_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits
