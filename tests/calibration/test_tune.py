"""Block-output tuning: tuners move only what the format stores; a tuned layer is never worse than GPTQ."""

from __future__ import annotations

import math

import pytest
import torch

from ernieq.calibration import collect_stats
from ernieq.calibration.rounding import encode_weight
from ernieq.calibration.sequential import SequentialPlan
from ernieq.calibration import tune
from ernieq.calibration.tune import TuneSettings
from ernieq.calibration.tune_model import ModelTuneSettings
from ernieq.calibration.tune_weights import make_tuner, rebyte
from ernieq.calibration.tuned_store import TunedStore
from ernieq.codecs import CalibrationStats, decode, get_codec
from ernieq.model.adapters import TensorClass
from tests.tiny import TINY_ERNIE, write_tiny_ernie

CODECS = [
    ("wint4", {"group_size": 32, "symmetric": True, "scale_dtype": "float16"}),
    ("wint4", {"group_size": 32, "symmetric": False}),
    ("wint4", {"group_size": None, "symmetric": True}),
    ("wint8", {}),
    ("ccq2", {}),
]


def _weight_and_stats(n: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    x = torch.randn(512, k, generator=g) * (1 + torch.rand(k, generator=g) * 3)  # uneven input channels
    return w, CalibrationStats(hessian=x.T @ x / x.shape[0], tokens=x.shape[0])


def _perturb(tuner, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for kind, p in tuner.kinds.items():
            p.add_((torch.rand(p.shape, generator=g) - 0.5) * (1.0 if kind in ("offset", "nibble", "zero") else 0.2))
    tuner.clamp()


@pytest.mark.parametrize("codec,params", CODECS)
@pytest.mark.parametrize("k", [128, 96])  # 96: a last group that is not full (ccq2: padded quads and groups)
def test_tuned_weights_are_exactly_what_the_format_stores(codec, params, k):
    w, stats = _weight_and_stats(48, k)
    c = get_codec(codec, **params)
    q = encode_weight(c, w, stats, "w", "gptq")
    tuner = make_tuner(q, w)
    start = tuner.weight().detach()
    same = (start == decode(q)).float().mean().item()
    # starts at GPTQ's result: exactly for ccq2 (bytes kept), else wherever GPTQ rounded to floor or ceil
    assert same == 1.0 if codec == "ccq2" else same > 0.97
    _perturb(tuner)
    out = tuner.result()
    assert out.codec == q.codec and out.params == q.params and out.shape == q.shape
    assert {key: (t.dtype, t.shape) for key, t in out.tensors.items()} == \
           {key: (t.dtype, t.shape) for key, t in q.tensors.items()}
    assert torch.equal(decode(out), tuner.weight().detach())  # decode checks the layout, too
    assert not torch.equal(decode(out), decode(q))


def test_gradients_reach_every_tuned_quantity():
    w, stats = _weight_and_stats(16, 64)
    for codec, params in CODECS:
        tuner = make_tuner(encode_weight(get_codec(codec, **params), w, stats, "w", "gptq"), w)
        (tuner.weight() * torch.randn_like(w)).sum().backward()
        for kind, p in tuner.kinds.items():
            assert p.grad is not None, (codec, kind)
            # a zero point shifts the grid's range: only weights at its ends feel it (none here)
            assert kind == "zero" or p.grad.abs().sum() > 0, (codec, kind)


def test_rounding_offsets_stay_between_floor_and_ceiling():
    w, stats = _weight_and_stats(16, 64)
    q = encode_weight(get_codec("wint4", group_size=32), w, stats, "w", "gptq")
    tuner = make_tuner(q, w)
    torch.manual_seed(0)
    for _ in range(30):  # far more than a run's worth of large steps
        (tuner.weight() * torch.randn_like(w)).sum().backward()
        tuner.step(0.2)
    scale = tuner.kinds["scale"]
    s = (tuner.s0 * (1 + scale)).to(torch.float32).repeat_interleave(32, 1)
    u = w / s.detach()
    value = decode(tuner.result()) / s.detach()
    at_ends = (value.round() == -8) | (value.round() == 7)  # clamped to the grid
    inside = (value >= torch.floor(u) - 1e-4) & (value <= torch.ceil(u) + 1e-4)
    assert (inside | at_ends).all() and inside.float().mean() > 0.9


def test_rebyte_keeps_the_tuned_scales_and_lowers_the_error_of_stale_bytes():
    w, stats = _weight_and_stats(32, 128)
    q = encode_weight(get_codec("ccq2"), w, stats, "w", "gptq")
    tuner = make_tuner(q, w)
    with torch.no_grad():
        tuner.kinds["super"].fill_(0.15)  # scales moved, bytes not: stale
    stale = tuner.result()
    fresh = rebyte(stale, w, stats, act_order=True, name="w")
    for key in ("weight_scale", "super_scales", "code_scale", "code_zp"):
        assert torch.equal(fresh.tensors[key], stale.tensors[key])

    def err(x):
        d = decode(x) - w
        return torch.einsum("nk,kl,nl->", d, stats.hessian, d).item()  # tr(dW H dW^T)

    assert err(fresh) < err(stale)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_ernie(tmp_path_factory.mktemp("tune") / "m")


def _choose(name, info):
    if info.cls is TensorClass.ROUTED_EXPERT:
        return ("ccq2", {}), False
    return ("wint4", {"group_size": 32, "symmetric": False}), False


@pytest.mark.parametrize("steps", [0, 25])
def test_a_tuned_layer_is_never_worse_than_gptq_on_held_out_tokens(tiny, tmp_path, steps):
    ids = torch.randint(0, TINY_ERNIE["vocab_size"], (8, 32), generator=torch.Generator().manual_seed(0))
    store = TunedStore(tmp_path / "tuned")
    plan = SequentialPlan(_choose, "gptq", tune=TuneSettings(steps=steps, lr=0.05), sink=store)
    collect_stats(tiny, ids, progress=False, sequential=plan)
    reports = store.reports
    assert [r["layer"] for r in reports] == [0, 1, 2]
    if steps == 0:  # nothing moved: every layer keeps GPTQ's result, unchecked
        assert all(r["kept"] == "gptq" and math.isnan(r["loss_gptq"]) for r in reports)
    else:
        for r in reports:
            assert r["loss_kept"] <= r["loss_gptq"]
            assert (r["kept"] == "gptq") == (r["loss_kept"] == r["loss_gptq"])
    name = "model.layers.1.mlp.experts.0.down_proj.weight"
    q = store.get(name)
    assert q is not None and q.codec == "ccq2" and torch.isfinite(decode(q)).all()


def test_one_expert_swaps_measure_what_a_whole_forward_does(tiny, tmp_path, monkeypatch, caplog):
    """The per-expert choice's losses, from one forward of GPTQ's layer, equal those of a whole forward of the
    layer with the expert swapped, for every expert and candidate."""
    compared = []
    real = tune._ExpertSwap.checked

    def spy(self, full, decoded):
        fn = real(self, full, decoded)
        assert self.usable == bool(self.slots.routed)  # the experts' calls were seen

        def both(names, kind):
            got = fn(names, kind)
            compared.append((got, full({**decoded[tune.GPTQ], **{n: decoded[kind][n] for n in names}}),
                             self.loss_gptq))
            return got

        return both

    monkeypatch.setattr(tune._ExpertSwap, "checked", spy)
    ids = torch.randint(0, TINY_ERNIE["vocab_size"], (8, 32), generator=torch.Generator().manual_seed(0))
    plan = SequentialPlan(_choose, "gptq", tune=TuneSettings(steps=5, lr=0.05), sink=TunedStore(tmp_path / "t"))
    with caplog.at_level("WARNING", logger="ernieq.calibration.tune"):
        collect_stats(tiny, ids, progress=False, sequential=plan)
    assert "measured by a whole forward" not in caplog.text  # the measure held against its check
    assert len(compared) >= 2 * TINY_ERNIE["moe_num_experts"]  # two MoE layers, a candidate or two per expert
    for got, want, gptq in compared:
        assert abs(got - want) <= 1e-3 * abs(want - gptq) + 1e-5 * want
    assert sum(abs(want - gptq) > 1e-4 * gptq for _, want, gptq in compared) >= len(compared) // 2  # swaps that move it


@pytest.fixture(scope="module")
def tiny128(tmp_path_factory):
    """A tiny ERNIE MoE whose K and N are multiples of 128 (what FastDeploy's wint2 takes), with a tokenizer."""
    from tests.tiny import write_char_tokenizer

    path = write_tiny_ernie(tmp_path_factory.mktemp("tune128") / "m", hidden_size=128, intermediate_size=128,
                            moe_intermediate_size=128, head_dim=32)
    write_char_tokenizer(path)
    return path


@pytest.fixture
def text(tmp_path):
    """A calibration text file."""
    path = tmp_path / "calib.txt"
    path.write_text("Calibration text about rivers, mountains, cities and the people who live there. " * 60)
    return path


@pytest.mark.parametrize("fmt", ["native", "fastdeploy"])
def test_quantize_method_tune_end_to_end(tiny128, text, tmp_path, monkeypatch, capsys, fmt):
    """``ernieq quantize --method tune`` with the 2-bit recipe (wint8, wint4 and ccq2 experts; native: with
    ``--tune-rounding``; fastdeploy: against the unquantized model's hidden states, with ``--awq``), then the checkpoint
    published and verified: it holds only what its format stores."""
    import json

    from ernieq import api
    from tests.test_cli import run

    q = tmp_path / "q"
    code, _, err = run(monkeypatch, capsys, "quantize", tiny128, "--out", q, "--bits", "2", "--method", "tune",
                       "--calib-data", text, "--calib-tokens", "512", "--calib-seq-len", "32", "--tune-steps", "5",
                       "--w4-moe-layers", "1", "--format", fmt,
                       *(["--tune-rounding"] if fmt == "native" else ["--tune-target", "model", "--awq"]))
    assert code == 0, err
    assert not list(tmp_path.glob(".q.ernieq-*")), "the tuning and calibration folders are removed"
    if fmt == "fastdeploy":
        assert any(q.glob("*.safetensors")) or any(q.glob("rank0/*.safetensors"))
        return
    config = json.loads((q / "config.json").read_text())
    assert config["quantization_config"]["method"] == "tune"
    pub = api.publish(q, tmp_path / "pub")
    code, out, err = run(monkeypatch, capsys, "verify", pub, "--no-smoke")
    assert code == 0, err + out
    r = api.verify(pub, max_ppl=float("inf"), device="cpu")  # a random tiny model is no language model
    assert r.smoke_ppl > 1.0 and r.modules > 0


def test_awq_in_the_pass_writes_what_quantize_folds_from_the_same_statistics(tiny128, text, tmp_path):
    """``--awq``: the tuning pass folds AWQ's scales before GPTQ and keeps the norms and router it changed;
    with no tuning steps its checkpoint is the bytes ``--sequential --method gptq --awq`` writes, which
    searches and folds them again in quantize from the pass's saved statistics. The folds changed the
    norms, which the checkpoint stores as they are (that the fold keeps the function: ``test_awq.py``)."""
    from safetensors.torch import load_file

    from ernieq import api

    def tensors(q):
        return {k: v for f in sorted(q.glob("*.safetensors")) for k, v in load_file(f).items()}

    common = dict(bits=4, awq=True, calib_data=str(text), calib_tokens=512, calib_seq_len=32,
                  rotate=False, progress=False)
    api.quantize(tiny128, tmp_path / "tuned", method="tune", tune_steps=0, tune_model_steps=0, **common)
    api.quantize(tiny128, tmp_path / "gptq", method="gptq", sequential=True, **common)
    api.quantize(tiny128, tmp_path / "plain", method="gptq", sequential=True,
                 **{**common, "awq": False})
    tuned, gptq, plain = (tensors(tmp_path / n) for n in ("tuned", "gptq", "plain"))
    assert tuned.keys() == gptq.keys() == plain.keys()
    for k in tuned:
        assert torch.equal(tuned[k], gptq[k]), k
    norms = [k for k in tuned if k.endswith("post_attention_layernorm.weight")]
    assert any(not torch.equal(tuned[k], plain[k]) for k in norms)  # folded, and stored so


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh runs it)")
@pytest.mark.parametrize("target", ["local", "model"])
def test_method_tune_runs_on_cuda(tiny128, text, tmp_path, target):
    """``--method tune --device cuda`` (calibration, GPTQ and tuning on the GPU), with either target."""
    from ernieq import api

    summary = api.quantize(tiny128, tmp_path / "q", bits=2, method="tune", calib_data=str(text), calib_tokens=512,
                           calib_seq_len=32, tune_steps=3, w4_moe_layers=1, tune_target=target, device="cuda",
                           progress=False)
    assert [r["layer"] for r in summary.tune_reports] == [0, 1, 2]
    assert all(r["loss_kept"] <= r["loss_gptq"] for r in summary.tune_reports if not math.isnan(r["loss_gptq"]))


def test_method_tune_needs_calibration_text(tiny, tmp_path):
    from ernieq import api
    from ernieq.errors import ErnieqError

    with pytest.raises(ErnieqError, match="--method tune .* needs --calib-data"):
        api.quantize(tiny, tmp_path / "q", bits=4, method="tune", progress=False)


@pytest.mark.parametrize("method", ["rtn", "awq"])
def test_awq_before_gptq_needs_gptq(tiny, tmp_path, method):
    from ernieq import api
    from ernieq.errors import ErnieqError

    with pytest.raises(ErnieqError, match=f"--awq folds AWQ's scales in before GPTQ .*--method {method}"):
        api.quantize(tiny, tmp_path / "q", bits=4, method=method, awq=True, progress=False)


def test_without_rounding_offsets_the_codes_stay_and_only_the_scales_move():
    w, stats = _weight_and_stats(32, 96)
    q = encode_weight(get_codec("wint4", group_size=32, symmetric=False), w, stats, "w", "gptq")
    tuner = make_tuner(q, w, round_weights=False)
    assert set(tuner.kinds) == {"scale"}
    _perturb(tuner)
    out = tuner.result()
    assert torch.equal(out.tensors["qweight"], q.tensors["qweight"]) and torch.equal(out.tensors["zero"], q.tensors["zero"])
    assert not torch.equal(out.tensors["scale"], q.tensors["scale"])
    assert torch.equal(decode(out), tuner.weight().detach())


def test_the_end_to_end_default_step_is_a_fifth_for_the_integer_grids():
    """--tune-model-lr's default: 2 / steps for ccq2's scales, a fifth of it for wint4's and wint8's (measured
    on the demo's --bits 4, where 2 / steps raised the held-out KL); a given lr is every tuner's."""
    w, stats = _weight_and_stats(16, 64)
    tuners = {codec: make_tuner(encode_weight(get_codec(codec, **params), w, stats, "w", "gptq"), w)
              for codec, params in CODECS}
    default, given = ModelTuneSettings(steps=10), ModelTuneSettings(steps=10, lr=0.03)
    assert {c: round(default.first_step(t), 9) for c, t in tuners.items()} == \
           {"wint4": 0.04, "wint8": 0.04, "ccq2": 0.2}
    assert {given.first_step(t) for t in tuners.values()} == {0.03}
