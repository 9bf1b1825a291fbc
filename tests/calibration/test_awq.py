"""AWQ: the scale search lowers the Hessian-weighted error, and folding keeps the function exact."""

from __future__ import annotations

import torch

from ernieq.calibration.awq import Fold, Member, apply_awq, group_folds, output_error, scale_stats, search_scale
from ernieq.model.adapters import adapter_for
from ernieq.model.norm_fold import NormFold
from ernieq.codecs import CalibrationStats, get_codec


def _inputs(k: int, tokens: int, gen: torch.Generator) -> torch.Tensor:
    """Activations with a few loud channels, as LLM inputs have."""
    x = torch.randn(tokens, k, generator=gen)
    x[:, :4] *= 20.0
    return x


def _stats(x: torch.Tensor) -> CalibrationStats:
    return CalibrationStats(hessian=x.T @ x / x.shape[0], act_abs_mean=x.abs().mean(0), tokens=x.shape[0])


def test_search_finds_a_scale_that_beats_plain_rounding():
    gen = torch.Generator().manual_seed(0)
    x = _inputs(128, 512, gen)
    codec = get_codec("wint4", group_size=32, symmetric=True)
    members = [Member(f"w{i}", torch.randn(64, 128, generator=gen), codec, _stats(x)) for i in range(2)]
    s = search_scale(members)
    assert s is not None and s.shape == (128,)
    plain = sum(output_error(m, torch.ones(128)) for m in members)
    scaled = sum(output_error(m, s) for m in members)
    assert scaled < 0.9 * plain
    # the error is the real output error on the calibration inputs
    m = members[0]
    from ernieq.codecs import decode

    w_hat = decode(codec.encode(m.weight * s, scale_stats(m.stats, s))) / s
    direct = ((x @ (w_hat - m.weight).T) ** 2).sum() / x.shape[0]
    assert abs(output_error(m, s) - float(direct)) < 1e-3 * float(direct)


def test_the_coarse_to_fine_search_finds_the_grids_best_alpha(monkeypatch):
    """9 errors instead of the grid's 20, and the same alpha as trying every one (the error is unimodal here)."""
    from ernieq.calibration import awq

    gen = torch.Generator().manual_seed(3)
    x = _inputs(128, 512, gen)
    codec = get_codec("wint4", group_size=32, symmetric=True)
    members = [Member(f"w{i}", torch.randn(64, 128, generator=gen), codec, _stats(x)) for i in range(2)]
    every = search_scale(members, coarse=1)  # coarse 1: every alpha of the grid
    calls = []
    monkeypatch.setattr(awq, "output_error", lambda member, s: calls.append(s) or output_error(member, s))
    s = search_scale(members)
    assert len(calls) == 9 * len(members)
    assert s is not None and every is not None and torch.equal(s, every)


def test_no_statistics_means_no_scale():
    codec = get_codec("wint4", group_size=32, symmetric=True)
    assert search_scale([Member("w", torch.randn(8, 64), codec, None)]) is None


def test_fold_sets_pair_producers_with_their_readers():
    """The adapter's shape-only run of a decoder layer finds every producer and its readers."""
    from tests.tiny import TINY_ERNIE

    adapter = adapter_for(TINY_ERNIE)
    names = [n for n in adapter.shapes if n.startswith("model.layers.1.")]
    names += [adapter.canonical_name("model.layers.1.mlp.experts", e, p) for e in range(4)
              for p in ("gate_proj", "up_proj", "down_proj")]
    folds, reasons = group_folds(adapter, 1, names)
    sets = {f.producer: set(f.consumers) for f in folds}
    assert not reasons
    assert sets["model.layers.1.input_layernorm.weight"] == {f"model.layers.1.self_attn.{p}_proj.weight" for p in "qkv"}
    assert sets["model.layers.1.post_attention_layernorm.weight"] == {
        "model.layers.1.mlp.gate.weight", "model.layers.1.mlp.shared_experts.up_proj.weight",
        "model.layers.1.mlp.shared_experts.gate_proj.weight",
        *(f"model.layers.1.mlp.experts.{e}.{p}.weight" for e in range(4) for p in ("gate_proj", "up_proj"))}
    assert sets["model.layers.1.mlp.experts.0.up_proj.weight"] == {"model.layers.1.mlp.experts.0.down_proj.weight"}
    assert sets["model.layers.1.mlp.shared_experts.up_proj.weight"] == {
        "model.layers.1.mlp.shared_experts.down_proj.weight"}
    assert "model.layers.1.self_attn.o_proj.weight" not in {c for cs in sets.values() for c in cs}


def test_folding_leaves_the_unquantized_block_unchanged():
    """norm -> (gate, up) -> silu(gate) * up -> down: same output after apply_awq, before rounding."""
    gen = torch.Generator().manual_seed(1)
    k, i = 64, 32
    p = "model.layers.0"
    t = {
        f"{p}.post_attention_layernorm.weight": torch.rand(k, generator=gen) + 0.5,
        f"{p}.mlp.gate_proj.weight": torch.randn(i, k, generator=gen),
        f"{p}.mlp.up_proj.weight": torch.randn(i, k, generator=gen),
        f"{p}.mlp.down_proj.weight": torch.randn(k, i, generator=gen),
    }
    x = _inputs(k, 256, gen)

    def block(w):
        xn = x * w[f"{p}.post_attention_layernorm.weight"]
        h = torch.nn.functional.silu(xn @ w[f"{p}.mlp.gate_proj.weight"].T) * (xn @ w[f"{p}.mlp.up_proj.weight"].T)
        return h, h @ w[f"{p}.mlp.down_proj.weight"].T

    h, y = block(t)
    xn = x * t[f"{p}.post_attention_layernorm.weight"]
    stats = {f"{p}.mlp.gate_proj.weight": _stats(xn), f"{p}.mlp.up_proj.weight": _stats(xn),
             f"{p}.mlp.down_proj.weight": _stats(h)}
    codec = get_codec("wint4", group_size=32, symmetric=True)
    folds = [Fold(f"{p}.post_attention_layernorm.weight", (f"{p}.mlp.gate_proj.weight", f"{p}.mlp.up_proj.weight"),
                  norm=NormFold(0.0, False)),
             Fold(f"{p}.mlp.up_proj.weight", (f"{p}.mlp.down_proj.weight",))]
    out, new_stats = apply_awq(t, folds, lambda n, w: Member(n, w, codec, stats[n]) if "proj" in n else None, stats.get)
    assert not torch.equal(out[f"{p}.post_attention_layernorm.weight"], t[f"{p}.post_attention_layernorm.weight"])
    assert not torch.equal(out[f"{p}.mlp.down_proj.weight"], t[f"{p}.mlp.down_proj.weight"])
    h2, y2 = block(out)
    torch.testing.assert_close(y2, y, rtol=1e-4, atol=1e-5 * float(y.abs().max()))  # float32 round-off only
    # the new statistics are those of the scaled inputs
    torch.testing.assert_close(new_stats[f"{p}.mlp.down_proj.weight"].hessian, _stats(h2).hessian, rtol=1e-3, atol=1e-3)
