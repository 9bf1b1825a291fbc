"""The generic adapter: classes, experts and layouts derived from the transformers model, for
checkpoint names as the hub spells them (per-expert, renamed) and as transformers 5 holds them (fused)."""

import json

import pytest
import torch

from ernieq.model.adapters import WEIGHT, TensorClass, adapter_for, iter_groups
from ernieq.model.checkpoint import CheckpointError, CheckpointReader, CheckpointWriter
from ernieq.model.moe import ExpertGroup, linear_weights
from tests.archs import ARCHS, tiny_config, write_tiny_arch
from tests.tiny import TINY_ERNIE


def _config(arch: str) -> dict:
    return tiny_config(arch).to_dict()


A, D, S, R, N, E, H = (TensorClass.ATTENTION, TensorClass.DENSE_MLP, TensorClass.SHARED_EXPERT, TensorClass.ROUTER,
                       TensorClass.NORM, TensorClass.EMBEDDING, TensorClass.LM_HEAD)
X = TensorClass.ROUTED_EXPERT
# What the hand-written regex adapters said (ERNIE, Llama, Mixtral, Qwen MoE), and more architectures
CASES = [
    ("ernie4_5_moe", "model.layers.2.self_attn.k_proj.weight", A, 2, None, "k_proj"),
    ("ernie4_5_moe", "model.layers.0.mlp.up_proj.weight", D, 0, None, "up_proj"),
    ("ernie4_5_moe", "model.layers.2.mlp.experts.3.down_proj.weight", X, 2, 3, "down_proj"),
    ("ernie4_5_moe", "model.layers.2.mlp.experts.gate_up_proj", X, 2, None, "gate_up_proj"),
    ("ernie4_5_moe", "model.layers.2.mlp.shared_experts.gate_proj.weight", S, 2, None, "gate_proj"),
    ("ernie4_5_moe", "model.layers.2.mlp.gate.weight", R, 2, None, None),
    ("ernie4_5_moe", "model.layers.2.mlp.moe_statics.e_score_correction_bias", R, 2, None, None),  # Paddle's place
    ("ernie4_5_moe", "model.layers.2.mlp.gate.moe_statics.e_score_correction_bias", R, 2, None, None),
    ("ernie4_5_moe", "model.layers.2.post_attention_layernorm.weight", N, 2, None, None),
    ("ernie4_5_moe", "model.embed_tokens.weight", E, None, None, None),
    ("ernie4_5_moe", "lm_head.weight", H, None, None, None),
    ("ernie4_5_moe", "model.mtp_block.0.self_attn.q_proj.weight", TensorClass.UNUSED, None, None, None),
    ("ernie4_5_moe", "model.layers.1.mlp.mystery.weight", TensorClass.UNCLASSIFIED, 1, None, None),
    ("ernie4_5", "model.layers.1.mlp.down_proj.weight", D, 1, None, "down_proj"),
    ("llama", "model.layers.1.self_attn.o_proj.weight", A, 1, None, "o_proj"),
    ("mixtral", "model.layers.1.block_sparse_moe.experts.3.w3.weight", X, 1, 3, "up_proj"),
    ("mixtral", "model.layers.1.block_sparse_moe.experts.3.w2.weight", X, 1, 3, "down_proj"),
    ("mixtral", "model.layers.1.block_sparse_moe.gate.weight", R, 1, None, None),
    ("qwen2_moe", "model.layers.1.mlp.shared_expert.up_proj.weight", S, 1, None, "up_proj"),
    ("qwen2_moe", "model.layers.1.mlp.shared_expert_gate.weight", R, 1, None, None),
    ("qwen2_moe", "model.layers.1.self_attn.q_proj.bias", A, 1, None, "q_proj"),
    ("qwen3_moe", "model.layers.1.mlp.experts.2.gate_proj.weight", X, 1, 2, "gate_proj"),
    ("qwen3_moe", "model.layers.1.self_attn.q_norm.weight", N, 1, None, None),
    ("phi3", "model.layers.0.self_attn.qkv_proj.weight", A, 0, None, "qkv_proj"),
    ("phi3", "model.layers.0.mlp.gate_up_proj.weight", D, 0, None, "gate_up_proj"),
    ("gpt_oss", "model.layers.1.mlp.experts.gate_up_proj", X, 1, None, "gate_up_proj"),
    ("gpt_oss", "model.layers.1.mlp.experts.down_proj_bias", X, 1, None, "down_proj_bias"),
    ("gpt_oss", "model.layers.1.mlp.router.bias", R, 1, None, None),
    ("gpt_oss", "model.layers.1.self_attn.sinks", TensorClass.OTHER, 1, None, None),
    ("deepseek_v3", "model.layers.1.self_attn.kv_a_proj_with_mqa.weight", A, 1, None, "kv_a_proj_with_mqa"),
    ("deepseek_v3", "model.layers.1.self_attn.kv_a_layernorm.weight", N, 1, None, None),
    ("deepseek_v3", "model.layers.1.mlp.gate.e_score_correction_bias", R, 1, None, None),
    ("deepseek_v3", "model.layers.0.mlp.gate_proj.weight", D, 0, None, "gate_proj"),
    ("phimoe", "model.layers.1.block_sparse_moe.gate.weight", R, 1, None, None),
    ("phimoe", "model.layers.1.input_layernorm.bias", N, 1, None, None),
    ("aria_text", "model.layers.1.mlp.experts.fc1.weight", X, 1, None, "gate_up_proj"),
    ("list_moe", "model.layers.1.mlp.experts.2.down_proj.weight", X, 1, 2, "down_proj"),
    ("list_moe", "model.layers.1.mlp.gate.weight", R, 1, None, None),
]


@pytest.mark.parametrize("arch,name,cls,layer,expert,proj", CASES)
def test_classify(arch, name, cls, layer, expert, proj):
    info = adapter_for(_config(arch)).classify(name)
    assert (info.cls, info.layer, info.expert, info.proj) == (cls, layer, expert, proj)


def test_norms_go_with_the_weights_they_feed():
    adapter = adapter_for(_config("gemma3"))
    parts = {n: adapter.classify(f"model.layers.1.{n}.weight").part
             for n in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm")}
    assert parts == {"input_layernorm": "attention", "post_attention_layernorm": "mlp",
                     "pre_feedforward_layernorm": "mlp"}


@pytest.mark.parametrize("model_type", ["not_a_model", "bert"])
def test_unknown_architecture_is_named(model_type):
    with pytest.raises(CheckpointError, match=f"unknown architecture.*{model_type}|unknown architecture"):
        adapter_for({"architectures": ["X"], "model_type": model_type, "hidden_size": 8})


LAYOUTS = {  # architecture -> (gate_up [E, H, 2I]?, interleaved, biases, silu(gate) * up)
    "gpt_oss": (True, True, True, False),
    "aria_text": (True, False, False, True),
}


@pytest.mark.parametrize("arch", [a for a in ARCHS if ARCHS[a].moe and a != "list_moe"])
def test_expert_layouts_come_from_running_the_class(arch):
    layouts = set(adapter_for(_config(arch)).layouts.values())
    assert len(layouts) == 1
    (layout,) = layouts
    got = (layout.gate_up_k_major, layout.interleaved, layout.has_bias, layout.silu_gate)
    assert got == LAYOUTS.get(arch, (False, False, False, True))
    assert layout.gate_first and layout.down_k_major == layout.gate_up_k_major
    assert layout.kernel_ok == (arch != "gpt_oss")


def _checkpoint(folder, config, tensors):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    with CheckpointWriter(folder) as w:
        for k, v in tensors.items():
            w.add(k, v)
    return CheckpointReader(folder)


def test_both_expert_layouts_give_the_same_per_expert_weights(tmp_path):
    E, H, I = 4, 64, 32  # TINY_ERNIE's
    gen = torch.Generator().manual_seed(0)
    gate, up, down = (torch.randn(E, I, H, generator=gen), torch.randn(E, I, H, generator=gen),
                      torch.randn(E, H, I, generator=gen))
    p = "model.layers.1.mlp.experts"
    per_expert = {}
    for e in range(E):
        per_expert[f"{p}.{e}.gate_proj.weight"] = gate[e]
        per_expert[f"{p}.{e}.up_proj.weight"] = up[e]
        per_expert[f"{p}.{e}.down_proj.weight"] = down[e]
    fused = {f"{p}.gate_up_proj": torch.cat([gate, up], dim=1), f"{p}.down_proj": down}
    views = []
    for sub, tensors in (("a", per_expert), ("b", fused)):
        reader = _checkpoint(tmp_path / sub, TINY_ERNIE, tensors)
        (group,) = [g for g in iter_groups(reader) if g.key == "layers.1.mlp"]
        experts = ExpertGroup.from_infos(group.tensors, adapter_for(TINY_ERNIE))
        assert experts.num_experts == E
        loaded = group.load(reader)
        views.append({(e, proj): w for e, proj, w in experts.weights(loaded)})
        stored = {t.untyped_storage().data_ptr() for t in loaded.values()}
        assert all(w.untyped_storage().data_ptr() in stored for w in views[-1].values())  # views: no second copy
        weight = experts.expert_weights(reader.get)  # one expert's tensors at a time: the same weights
        assert all(torch.equal(weight(e, proj), w) for (e, proj), w in views[-1].items())
    assert views[0].keys() == views[1].keys()
    for key in views[0]:
        assert torch.equal(views[0][key], views[1][key]), key
    assert torch.equal(views[0][(2, "up_proj")], up[2])


def test_a_part_of_a_group_reads_only_its_experts(tmp_path):
    """What a rank quantizing experts 1 and 2 of a layer reads (ernieq.quantize's lazy load and keep): their
    tensors where experts are stored apart, the one fused tensor otherwise, and never the rest of the group."""
    E, H, I = 4, 64, 32
    p = "model.layers.1.mlp"
    rest = {f"{p}.gate.weight": torch.randn(E, H), f"{p}.shared_experts.up_proj.weight": torch.randn(I, H)}
    per_expert = {f"{p}.experts.{e}.{proj}.weight": torch.randn(H, I) if proj == "down_proj" else torch.randn(I, H)
                  for e in range(E) for proj in ("gate_proj", "up_proj", "down_proj")}
    fused = {f"{p}.experts.gate_up_proj": torch.randn(E, 2 * I, H), f"{p}.experts.down_proj": torch.randn(E, H, I)}
    adapter = adapter_for(TINY_ERNIE)
    for sub, experts, want in (("a", per_expert, {n for n in per_expert if ".experts.1." in n or ".experts.2." in n}),
                               ("b", fused, set(fused))):
        reader = _checkpoint(tmp_path / sub, TINY_ERNIE, {**rest, **experts})
        (group,) = [g for g in iter_groups(reader) if g.key == "layers.1.mlp"]
        read = []
        get = reader.get
        reader.get = lambda name: read.append(name) or get(name)
        tensors = group.load(reader, lazy=True)
        assert read == [] and set(tensors) == {t.name for t in group.tensors}
        got = list(linear_weights(group.tensors, tensors, adapter, keep=lambda info: info.expert in (1, 2)))
        assert sorted({info.expert for _, info, _ in got}) == [1, 2] and len(got) == 6
        assert set(read) == want, sub
        assert sub == "b" or all(torch.equal(w, per_expert[n]) for n, _, w in got)


@pytest.mark.parametrize("arch", [a for a in ARCHS if ARCHS[a].moe and a != "list_moe"])
def test_experts_are_copied_into_place_one_expert_at_a_time(arch, tmp_path):
    """ExpertLayout.fill, from the checkpoint as the hub holds it (per-expert pieces, fused, K-major,
    interleaved), builds the parameters transformers' converter builds, in the dtype asked for."""
    reader = CheckpointReader(write_tiny_arch(arch, tmp_path / "src"))
    adapter = adapter_for(reader.config)
    checked = 0
    for group in iter_groups(reader, adapter):
        experts = ExpertGroup.from_infos(group.tensors, adapter)
        if experts is None:
            continue
        want = experts.params(group.load(reader), (WEIGHT,))
        released = []
        got = experts.layout.fill(experts.expert_weights(reader.get), torch.bfloat16, torch.device("cpu"),
                                  after_expert=lambda: released.append(1))
        assert len(released) == experts.num_experts
        assert got.keys() == want.keys()
        for p, t in got.items():
            assert t.dtype == torch.bfloat16 and t.is_contiguous() and torch.equal(t, want[p].to(torch.bfloat16)), p
        checked += 1
    assert checked >= 1


def test_incomplete_per_expert_group_is_named(tmp_path):
    p = "model.layers.1.mlp.experts"
    tensors = {f"{p}.{e}.{proj}.weight": torch.zeros(32, 64) for e in range(4) for proj in ("gate_proj", "up_proj")}
    tensors.update({f"{p}.{e}.down_proj.weight": torch.zeros(64, 32) for e in range(1, 4)})
    reader = _checkpoint(tmp_path / "m", TINY_ERNIE, tensors)
    (group,) = list(iter_groups(reader))
    experts = ExpertGroup.from_infos(group.tensors, adapter_for(TINY_ERNIE))
    with pytest.raises(CheckpointError, match="expert 0 has no"):
        list(experts.weights(group.load(reader)))
