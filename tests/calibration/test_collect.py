"""collect_stats on the tiny ERNIE MoE: layer-by-layer execution, counts, Hessians, cold experts."""

import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F

from ernieq.calibration import CalibrationError, collect_stats, gptq_encode
from ernieq.calibration.layerwise import LayerwiseModel, run_layers
from ernieq.codecs import decode, get_codec
from ernieq.model.checkpoint import CheckpointReader, CheckpointWriter
from tests.tiny import TINY_ERNIE, tiny_ernie_model, write_tiny_ernie

N_SEQ, SEQ_LEN = 3, 24
TOKENS = N_SEQ * SEQ_LEN
TOP_K = TINY_ERNIE["moe_k"]
COLD_LAYER, COLD_EXPERT = 1, 3


def _ids(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY_ERNIE["vocab_size"], (N_SEQ, SEQ_LEN), generator=g)


def _never_routed(src, dst):
    """A copy of checkpoint ``src`` whose layer-1 router can never pick expert 3."""
    reader = CheckpointReader(src)
    name = f"model.layers.{COLD_LAYER}.mlp.moe_statics.e_score_correction_bias"
    with CheckpointWriter(dst) as w:
        for key in reader.keys():
            t = reader.get(key).clone()
            if key == name:
                t[..., COLD_EXPERT] = -1e4  # selection uses softmax(logits) + bias: this expert never wins
            w.add(key, t)
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    paths = {layout: write_tiny_ernie(root / layout, layout) for layout in ("per_expert", "fused")}
    paths["cold"] = _never_routed(paths["per_expert"], root / "cold")
    return paths


@pytest.fixture(scope="module")
def cset(tiny):
    return collect_stats(tiny["per_expert"], _ids(), progress=False)


@pytest.fixture(scope="module")
def reference():
    return _hooked_run()


def _hooked_run(**overrides):
    """Inputs of every linear layer of the full transformers model, hooked independently."""
    model = tiny_ernie_model(**overrides)
    seen, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or name.endswith("mlp.gate") or name.endswith(".mlp"):
            def hook(mod, args, out, name=name):
                seen.setdefault(name, []).append((args[0].detach().reshape(-1, args[0].shape[-1]), out))
            handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model(_ids())
    for h in handles:
        h.remove()
    return model, {k: v[0] for k, v in seen.items()}


def _xtx(x):
    return x.T @ x / x.shape[0]  # H = X^T X / n


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_layer_by_layer_hidden_states_equal_the_full_model(tiny, layout):
    model = tiny_ernie_model()
    want = {}
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_hook(lambda mod, args, out, i=i: want.__setitem__(i, out))
    ids = _ids()
    with torch.no_grad():
        model(ids)
    got = {}
    run_layers(LayerwiseModel(tiny[layout]), ids, batch_size=2, on_output=lambda i, h: got.__setitem__(i, h))
    assert sorted(got) == sorted(want) == list(range(TINY_ERNIE["num_hidden_layers"]))
    for i in got:
        torch.testing.assert_close(got[i], want[i], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("targets", [None, "local", "model"])
def test_an_adjusting_pass_feeds_each_layer_the_adjusted_outputs_of_the_one_before(tiny, targets):
    """With an adjust that keeps each layer as it is, every layer's inputs, outputs and targets are the
    full model's (the tuning pass once fed every layer the embeddings: its inputs were never advanced)."""
    model = tiny_ernie_model()
    want_in, want_out = {}, {}
    def record(i):
        def hook(mod, args, out):
            want_in[i], want_out[i] = args[0], out
        return hook

    for i, layer in enumerate(model.model.layers):
        layer.register_forward_hook(record(i))
    ids = _ids()
    with torch.no_grad():
        model(ids)
    seen, got = {}, {}

    def adjust(i, layer, inputs=None, target=None):
        seen[i] = (inputs, target)
        return layer

    run_layers(LayerwiseModel(tiny["fused"]), ids, batch_size=2, adjust=adjust, targets=targets,
               on_output=lambda i, h: got.__setitem__(i, h))
    for i in range(TINY_ERNIE["num_hidden_layers"]):
        torch.testing.assert_close(got[i], want_out[i], rtol=1e-5, atol=1e-5)
        if targets is not None:
            torch.testing.assert_close(seen[i][0], want_in[i], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(seen[i][1], want_out[i], rtol=1e-5, atol=1e-5)


def test_counts_sum_to_tokens_times_top_k(cset):
    moe_layers = range(TINY_ERNIE["moe_layer_start_index"], TINY_ERNIE["num_hidden_layers"])
    assert sorted(cset.routers) == list(moe_layers)
    for layer in moe_layers:
        router = cset.routers[layer]
        rows = [r for r in cset.experts if r.layer == layer]
        assert router.tokens == TOKENS
        assert sum(router.counts) == TOKENS * TOP_K
        assert [r.tokens for r in rows] == router.counts
        assert math.isclose(sum(r.share for r in rows), TOP_K, rel_tol=1e-9)
        assert math.isclose(sum(router.load_share), 1.0, rel_tol=1e-9)
        assert math.isclose(sum(router.mean_prob), 1.0, rel_tol=1e-6)
        assert 0.0 <= router.entropy <= router.max_entropy
        assert 0.0 <= router.topk_margin_min <= router.topk_margin_mean <= 1.0
        for r in rows:  # the site's own token count agrees with the router's
            assert cset.stats(f"model.layers.{layer}.mlp.experts.{r.expert}.down_proj.weight").tokens == r.tokens


@pytest.mark.parametrize(
    "weight,module",
    [
        ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj"),
        ("model.layers.0.self_attn.v_proj.weight", "model.layers.0.self_attn.v_proj"),
        ("model.layers.0.self_attn.o_proj.weight", "model.layers.0.self_attn.o_proj"),
        ("model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.up_proj"),
        ("model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.down_proj"),
        ("model.layers.2.self_attn.k_proj.weight", "model.layers.2.self_attn.k_proj"),
        ("model.layers.1.mlp.shared_experts.gate_proj.weight", "model.layers.1.mlp.shared_experts.gate_proj"),
        ("model.layers.1.mlp.shared_experts.down_proj.weight", "model.layers.1.mlp.shared_experts.down_proj"),
    ],
)
def test_hessian_and_activation_stats_of_linear_layers(cset, reference, weight, module):
    _, seen = reference
    x = seen[module][0]  # [T, K]
    s = cset.stats(weight)
    assert s.tokens == TOKENS
    torch.testing.assert_close(s.hessian, _xtx(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s.act_abs_mean, x.abs().mean(0), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(cset.site_stats(weight).abs_max, x.abs().amax(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layer", [1, 2])
def test_routed_expert_hessians(cset, reference, layer):
    _check_routed_hessians(cset, reference, layer)


def test_routed_expert_hessians_when_most_tokens_pick_each_expert(tmp_path):
    """top-3 of 4: every expert takes most tokens, and its gate Hessian comes from X^T X - X_r^T X_r."""
    path = write_tiny_ernie(tmp_path / "k3", "fused", moe_k=3)
    cset = collect_stats(path, _ids(), progress=False)
    assert all(r.tokens > TOKENS // 2 for r in cset.experts)
    for layer in (1, 2):
        _check_routed_hessians(cset, _hooked_run(moe_k=3), layer)


def _check_routed_hessians(cset, reference, layer):
    model, seen = reference
    x = seen[f"model.layers.{layer}.mlp"][0]  # MoE block input [T, H]
    selected = seen[f"model.layers.{layer}.mlp.gate"][1][2]  # the router's choice [T, A]
    experts = model.model.layers[layer].mlp.experts
    inter = experts.gate_up_proj.shape[1] // 2
    for e in range(TINY_ERNIE["moe_num_experts"]):
        xe = x[(selected == e).any(-1)]  # [T_e, H]
        gate, up = experts.gate_up_proj[e, :inter].detach(), experts.gate_up_proj[e, inter:].detach()
        he = F.silu(xe @ gate.T) * (xe @ up.T)  # down_proj's input [T_e, I]
        prefix = f"model.layers.{layer}.mlp.experts.{e}"
        torch.testing.assert_close(cset.stats(f"{prefix}.gate_proj.weight").hessian, _xtx(xe), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(cset.stats(f"{prefix}.down_proj.weight").hessian, _xtx(he), rtol=1e-4, atol=1e-6)


def test_weights_reading_one_input_share_one_hessian(cset):
    q = cset.stats("model.layers.1.self_attn.q_proj.weight")
    for proj in ("k_proj", "v_proj"):
        assert cset.stats(f"model.layers.1.self_attn.{proj}.weight").hessian is q.hessian
    gate = cset.stats("model.layers.2.mlp.experts.1.gate_proj.weight")
    assert cset.stats("model.layers.2.mlp.experts.1.up_proj.weight").hessian is gate.hessian
    assert cset.stats("model.layers.1.self_attn.o_proj.weight").hessian is not q.hessian


def test_summary_is_json(cset):
    summary = json.loads(json.dumps(cset.summary()))
    assert summary["info"]["tokens"] == TOKENS
    assert len(summary["experts"]) == 2 * TINY_ERNIE["moe_num_experts"]
    assert set(summary["routes"]) >= {"model.layers.0.self_attn.k_proj.weight", "model.layers.2.mlp.experts.3.up_proj.weight"}


def test_never_routed_expert_is_cold_and_all_experts_gives_it_statistics(tiny, caplog):
    prefix = f"model.layers.{COLD_LAYER}.mlp.experts.{COLD_EXPERT}"
    plain = collect_stats(tiny["cold"], _ids(), progress=False)
    row = next(r for r in plain.experts if (r.layer, r.expert) == (COLD_LAYER, COLD_EXPERT))
    assert row.tokens == 0 and row.share == 0.0
    assert (COLD_LAYER, COLD_EXPERT) in {(r.layer, r.expert) for r in plain.cold_experts(min_tokens=1)}
    assert plain.stats(f"{prefix}.down_proj.weight") is None
    assert {"layer": COLD_LAYER, "expert": COLD_EXPERT} in [
        {k: c[k] for k in ("layer", "expert")} for c in plain.summary()["cold_experts"]
    ]

    full = collect_stats(tiny["cold"], _ids(), all_experts=True, progress=False)
    assert [r.tokens for r in full.experts] == [r.tokens for r in plain.experts]  # routing unchanged
    # the layer's output is unchanged: the next layer saw the same inputs
    torch.testing.assert_close(
        full.stats("model.layers.2.self_attn.q_proj.weight").hessian,
        plain.stats("model.layers.2.self_attn.q_proj.weight").hessian, rtol=0, atol=0,
    )
    for proj in ("gate_proj", "up_proj", "down_proj"):
        s = full.stats(f"{prefix}.{proj}.weight")
        assert s is not None and s.tokens == TOKENS and torch.isfinite(s.hessian).all()
    shared_input = full.stats(f"model.layers.{COLD_LAYER}.mlp.shared_experts.gate_proj.weight").hessian
    torch.testing.assert_close(full.stats(f"{prefix}.gate_proj.weight").hessian, shared_input)
    # a warm expert keeps its routed statistics
    warm = max((r for r in full.experts if r.layer == COLD_LAYER), key=lambda r: r.tokens)
    full.cold_min_tokens = 1
    assert full.stats(f"model.layers.{COLD_LAYER}.mlp.experts.{warm.expert}.gate_proj.weight").tokens == warm.tokens

    # the cold expert is quantized with finite scales both ways
    w = CheckpointReader(tiny["cold"]).get(f"{prefix}.down_proj.weight")
    codec = get_codec("wint4", group_size=32)
    with caplog.at_level(logging.WARNING, logger="ernieq.calibration.gptq"):
        rtn = gptq_encode(codec, w, plain.stats(f"{prefix}.down_proj.weight"), name=f"{prefix}.down_proj.weight")
    assert "rounding to nearest" in caplog.text and prefix in caplog.text
    calibrated = gptq_encode(codec, w, full.stats(f"{prefix}.down_proj.weight"))
    for q in (rtn, calibrated):
        assert torch.isfinite(q.tensors["scale"]).all() and (q.tensors["scale"] > 0).all()
        assert torch.isfinite(decode(q)).all()


def test_bad_tokens_fail_loudly(tiny):
    with pytest.raises(CalibrationError, match="vocabulary"):
        collect_stats(tiny["per_expert"], torch.full((1, 4), TINY_ERNIE["vocab_size"]), progress=False)
    with pytest.raises(CalibrationError, match=r"\[n_seq, seq_len\]"):
        collect_stats(tiny["per_expert"], torch.zeros(8, dtype=torch.long), progress=False)


def _same_stats(a, b) -> None:
    assert sorted(a.sites) == sorted(b.sites)
    for site in a.sites:
        sa, sb = a.sites[site], b.sites[site]
        assert sa.tokens == sb.tokens, site
        for field in ("hessian", "abs_mean", "abs_max"):
            assert torch.equal(getattr(sa, field), getattr(sb, field)), (site, field)
    assert {k: r.to_json() for k, r in a.routers.items()} == {k: r.to_json() for k, r in b.routers.items()}


def test_hidden_states_offloaded_to_host_memory_give_the_same_statistics(tiny, cset, monkeypatch, caplog):
    """A device too small for the hidden states: they wait in host memory, one batch on the device at a time."""
    from ernieq.calibration import layerwise

    monkeypatch.setattr(layerwise, "HIDDEN_SHARE", 0.0)
    with caplog.at_level(logging.INFO, logger="ernieq.calibration.layerwise"):
        offloaded = collect_stats(tiny["per_expert"], _ids(), progress=False)
    assert "do not fit in 0.00 GiB of cpu memory; they wait in host memory" in caplog.text
    _same_stats(offloaded, cset)


def test_placement_is_the_callers_and_is_recorded(tiny, cset):
    from ernieq.device import HOST

    assert cset.info["runtime"]["device"] == "cpu" and cset.info["runtime"]["dtype"] == "float32"
    explicit = collect_stats(tiny["per_expert"], _ids(), progress=False, device=HOST, dtype=torch.float32)
    _same_stats(explicit, cset)
    half = collect_stats(tiny["per_expert"], _ids(), progress=False, device=HOST, dtype=torch.bfloat16)
    assert half.info["runtime"] == {**cset.info["runtime"], "dtype": "bfloat16"}
    for site, s in cset.sites.items():  # accumulated in float32 from bfloat16 activations
        h = half.sites[site].hessian
        assert h.dtype is torch.float32 and h.device == HOST
        assert (h - s.hessian).norm() <= 0.05 * s.hessian.norm(), site
