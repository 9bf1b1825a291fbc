import json

import pytest
import torch

from ernieq.model.adapters import TensorClass, adapter_for, iter_groups
from ernieq.model.checkpoint import CheckpointError, CheckpointReader, CheckpointWriter
from ernieq.model.moe import ExpertGroup

ERNIE = {"architectures": ["Ernie4_5_MoeForCausalLM"], "model_type": "ernie4_5_moe"}

CASES = [
    (ERNIE, "model.layers.3.self_attn.k_proj.weight", TensorClass.ATTENTION, 3, None, "k_proj"),
    (ERNIE, "model.layers.0.mlp.up_proj.weight", TensorClass.DENSE_MLP, 0, None, "up_proj"),
    (ERNIE, "model.layers.2.mlp.experts.17.down_proj.weight", TensorClass.ROUTED_EXPERT, 2, 17, "down_proj"),
    (ERNIE, "model.layers.2.mlp.experts.gate_up_proj", TensorClass.ROUTED_EXPERT, 2, None, "gate_up_proj"),
    (ERNIE, "model.layers.2.mlp.shared_experts.gate_proj.weight", TensorClass.SHARED_EXPERT, 2, None, "gate_proj"),
    (ERNIE, "model.layers.2.mlp.gate.weight", TensorClass.ROUTER, 2, None, None),
    (ERNIE, "model.layers.2.mlp.moe_statics.e_score_correction_bias", TensorClass.ROUTER, 2, None, None),
    (ERNIE, "model.layers.2.mlp.gate.moe_statics.e_score_correction_bias", TensorClass.ROUTER, 2, None, None),
    (ERNIE, "model.layers.2.post_attention_layernorm.weight", TensorClass.NORM, 2, None, None),
    (ERNIE, "model.embed_tokens.weight", TensorClass.EMBEDDING, None, None, None),
    (ERNIE, "lm_head.weight", TensorClass.LM_HEAD, None, None, None),
    ({"architectures": ["Ernie4_5_ForCausalLM"]}, "model.layers.1.mlp.down_proj.weight", TensorClass.DENSE_MLP, 1, None, "down_proj"),
    ({"architectures": ["LlamaForCausalLM"]}, "model.layers.1.self_attn.o_proj.weight", TensorClass.ATTENTION, 1, None, "o_proj"),
    ({"architectures": ["MixtralForCausalLM"]}, "model.layers.4.block_sparse_moe.experts.3.w3.weight", TensorClass.ROUTED_EXPERT, 4, 3, "up_proj"),
    ({"architectures": ["MixtralForCausalLM"]}, "model.layers.4.block_sparse_moe.gate.weight", TensorClass.ROUTER, 4, None, None),
    ({"model_type": "qwen2_moe"}, "model.layers.1.mlp.shared_expert.up_proj.weight", TensorClass.SHARED_EXPERT, 1, None, "up_proj"),
    ({"model_type": "qwen2_moe"}, "model.layers.1.mlp.shared_expert_gate.weight", TensorClass.ROUTER, 1, None, None),
    ({"architectures": ["Qwen3MoeForCausalLM"]}, "model.layers.1.mlp.experts.5.gate_proj.weight", TensorClass.ROUTED_EXPERT, 1, 5, "gate_proj"),
    ({"architectures": ["Qwen3MoeForCausalLM"]}, "model.layers.1.self_attn.q_norm.weight", TensorClass.NORM, 1, None, None),
]


@pytest.mark.parametrize("config,name,cls,layer,expert,proj", CASES)
def test_classify(config, name, cls, layer, expert, proj):
    info = adapter_for(config).classify(name)
    assert (info.cls, info.layer, info.expert, info.proj) == (cls, layer, expert, proj)


def test_unknown_architecture_is_named():
    with pytest.raises(CheckpointError, match="unknown architecture.*GPTNeoX"):
        adapter_for({"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox"})


def _checkpoint(tmp_path, tensors):
    (tmp_path / "config.json").write_text(json.dumps(ERNIE))
    with CheckpointWriter(tmp_path) as w:
        for k, v in tensors.items():
            w.add(k, v)
    return CheckpointReader(tmp_path)


def test_both_expert_layouts_give_the_same_per_expert_weights(tmp_path):
    E, H, I = 3, 8, 4
    gate, up, down = torch.randn(E, I, H), torch.randn(E, I, H), torch.randn(E, H, I)
    p = "model.layers.1.mlp.experts"
    per_expert = {}
    for e in range(E):
        per_expert[f"{p}.{e}.gate_proj.weight"] = gate[e]
        per_expert[f"{p}.{e}.up_proj.weight"] = up[e]
        per_expert[f"{p}.{e}.down_proj.weight"] = down[e]
    fused = {f"{p}.gate_up_proj": torch.cat([gate, up], dim=1), f"{p}.down_proj": down}
    views = []
    for sub, tensors in (("a", per_expert), ("b", fused)):
        (tmp_path / sub).mkdir()
        reader = _checkpoint(tmp_path / sub, tensors)
        (group,) = [g for g in iter_groups(reader) if g.key == "layers.1.mlp"]
        experts = ExpertGroup.from_infos(group.tensors).with_reader(reader)
        assert experts.num_experts == E
        views.append({(e, proj): w for e, proj, w in experts.weights(group.load(reader))})
    assert views[0].keys() == views[1].keys()
    for key in views[0]:
        assert torch.equal(views[0][key], views[1][key]), key


def test_incomplete_per_expert_group_is_named():
    adapter = adapter_for(ERNIE)
    infos = [adapter.classify(f"model.layers.1.mlp.experts.0.{p}.weight") for p in ("gate_proj", "up_proj")]
    with pytest.raises(CheckpointError, match="expert 0 has no down_proj"):
        ExpertGroup.from_infos(infos)
