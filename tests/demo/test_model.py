"""The reduced demo builds: per-expert ERNIE layout, exact reproduction of the dense logits, real routing."""

from __future__ import annotations

import contextlib
import math
import shutil

import pytest
import torch

from ernieq.demo import demo_model_path
from ernieq.demo.build import build_demo_model
from ernieq.eval.perplexity import next_token_divergence, perplexity, tokenize_text
from ernieq.model.checkpoint import CheckpointReader
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


@contextlib.contextmanager
def first_layers(model: torch.nn.Module, num_layers: int):
    """Run ``model`` with only its first ``num_layers`` decoder layers (then restore them)."""
    layers, count = model.model.layers, model.config.num_hidden_layers
    model.model.layers, model.config.num_hidden_layers = layers[:num_layers], num_layers
    try:
        yield model
    finally:
        model.model.layers, model.config.num_hidden_layers = layers, count


@pytest.fixture(scope="module")
def dense_logits(dense_source, eval_ids):
    """float32 [T, V] logits of the dense model cut to the same layers as the reduced demo builds."""
    with torch.inference_mode(), first_layers(dense_source.model, DEMO_TEST_LAYERS) as model:
        return model(input_ids=eval_ids).logits[0]



def test_checkpoint_layout_is_per_expert_ernie(demo_exact_dir):
    reader = CheckpointReader(demo_exact_dir)
    cfg = reader.config
    assert cfg["architectures"] == ["Ernie4_5_MoeForCausalLM"] and cfg["model_type"] == "ernie4_5_moe"
    e, m, s = cfg["moe_num_experts"], cfg["moe_intermediate_size"], cfg["moe_num_shared_experts"]
    assert cfg["moe_k"] == e and cfg["moe_layer_start_index"] == 1 and cfg["num_hidden_layers"] == DEMO_TEST_LAYERS
    # padded: 576 -> 640 and 9 (3 KV) -> 12 (4 KV) heads of 64, so every K and N is a multiple of 128
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (640, 12, 4, 64)
    assert reader.shape("model.layers.0.self_attn.q_proj.weight") == (768, 640)
    assert reader.shape("model.layers.0.self_attn.o_proj.weight") == (640, 768)
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
    model, info = _load(demo_model_path("routed"))
    assert not (info["missing_keys"] or info["unexpected_keys"]), info
    routed = perplexity(model, ids, seq_len=2048, max_windows=12, progress=False)
    assert routed.tokens == dense.tokens == 12 * 2047
    assert math.isfinite(routed.ppl) and routed.ppl <= 1.25 * dense.ppl, (routed, dense)
