"""Tensor shapes against config.json: every supported architecture passes as transformers writes it,
and a tensor or a config field that disagrees fails naming the file and tensor (or field)."""

import json

import pytest
import torch

from ernieq.model.adapters import iter_groups
from ernieq.model.checkpoint import CheckpointError, CheckpointReader, CheckpointWriter

SMALL = {"hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4, "num_key_value_heads": 2,
         "num_hidden_layers": 2, "vocab_size": 64, "max_position_embeddings": 64}
ARCHITECTURES = {
    "ernie4_5_moe": {"moe_intermediate_size": 16, "moe_num_experts": 4, "moe_k": 2, "moe_num_shared_experts": 1,
                     "moe_layer_start_index": 1, "head_dim": 8},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {"moe_intermediate_size": 16, "shared_expert_intermediate_size": 24, "num_experts": 4,
                  "num_experts_per_tok": 2, "qkv_bias": True},
    "qwen3_moe": {"moe_intermediate_size": 16, "num_experts": 4, "num_experts_per_tok": 2, "head_dim": 16},
    "llama": {},
}


def _write_transformers_model(folder, model_type, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **SMALL, **ARCHITECTURES[model_type], **extra)
    model = AutoModelForCausalLM.from_config(config)
    folder.mkdir(parents=True)
    with CheckpointWriter(folder) as w:
        for name, t in model.state_dict().items():
            if not (name == "lm_head.weight" and config.tie_word_embeddings):
                w.add(name, t.detach().clone())
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    return folder


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_transformers_checkpoints_of_every_adapter_pass(tmp_path, model_type):
    reader = CheckpointReader(_write_transformers_model(tmp_path / model_type, model_type))
    groups = list(iter_groups(reader))
    assert sum(len(g.tensors) for g in groups) == len(reader.keys())


def test_a_config_that_disagrees_with_a_tensor_names_both(tmp_path):
    folder = _write_transformers_model(tmp_path / "m", "qwen3_moe")
    config = json.loads((folder / "config.json").read_text())
    config["moe_intermediate_size"] = 24
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.experts\.down_proj' "
                                              r"has shape \[4, 32, 16\], .*config\.json implies \[4, 32, 24\]"):
        list(iter_groups(CheckpointReader(folder)))


@pytest.mark.parametrize("value", ["32", 0, -4, 2.5, True])
def test_a_config_field_of_the_wrong_type_is_named(tmp_path, value):
    folder = _write_transformers_model(tmp_path / "m", "llama")
    config = json.loads((folder / "config.json").read_text())
    config["hidden_size"] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json: hidden_size must be a positive integer"):
        list(iter_groups(CheckpointReader(folder)))


def test_an_expert_beyond_the_configured_count_is_named(tmp_path):
    from tests.tiny import TINY_ERNIE  # 4 routed experts of [32, 64]

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY_ERNIE))
    with CheckpointWriter(folder) as w:
        for e in range(5):
            w.add(f"model.layers.1.mlp.experts.{e}.gate_proj.weight", torch.zeros(32, 64))
    with pytest.raises(CheckpointError, match=r"experts\.4\.gate_proj\.weight' is expert 4, .* says 4 experts"):
        list(iter_groups(CheckpointReader(folder)))
