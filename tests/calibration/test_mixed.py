"""--target-bits: measured sensitivity per MoE layer, a choice within the budget, a recipe that says it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ernieq import api
from ernieq.calibration import collect_stats, save_stats
from ernieq.calibration.mixed import LayerCosts, choose, turn, weight_cost
from ernieq.codecs import CalibrationStats
from ernieq.config import CodecChoice
from ernieq.errors import ErnieqError
from ernieq.formats.native import NativeReader
from ernieq.transforms import make_rotation
from tests.tiny import write_char_tokenizer, write_tiny_ernie

WINT4 = CodecChoice("wint4", (("group_size", None), ("symmetric", True)))
CCQ2 = CodecChoice("ccq2")


@pytest.fixture(scope="module")
def tiny_calibrated(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    src = write_tiny_ernie(root / "src", num_hidden_layers=4)  # MoE layers 1, 2, 3
    write_char_tokenizer(src)  # for the tests that calibrate on text
    ids = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(1))
    save_stats(collect_stats(src, ids, progress=False), root / "calib")
    return src, root / "calib"


def test_weight_cost_measures_bits_and_the_hessian_weighted_error_on_sampled_rows():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 128, generator=g) * 0.05  # 300 rows: sampled (SAMPLE_ROWS = 128), scaled to N
    x = torch.randn(256, 128, generator=g)
    stats = CalibrationStats(hessian=x.T @ x / 256, tokens=256)
    from ernieq.calibration.rounding import encode_weight
    from ernieq.codecs import decode, get_codec

    full = encode_weight(get_codec("ccq2"), w, stats, "w", "rtn")
    d = w - decode(full).float()
    exact = 256 * float(((d @ stats.hessian) * d).sum())
    cpu = torch.device("cpu")
    bits, err = weight_cost(w, turn(stats, 128, False, cpu), CCQ2, False, "w")
    assert bits == pytest.approx(8 * full.nbytes, rel=0.02)
    assert err == pytest.approx(exact, rel=0.25)  # an estimate from 128 of 300 rows
    bits4, err4 = weight_cost(w, turn(stats, 128, False, cpu), WINT4, False, "w")
    assert bits4 > bits and err4 < err  # 4 bits cost more and lose less
    _, rotated = weight_cost(w, turn(stats, 128, True, cpu), CCQ2, True, "w")
    rotation = make_rotation(128)
    q = encode_weight(get_codec("ccq2"), w, stats, "w", "rtn", rotation)
    d = w - rotation.apply_t(decode(q).float(), dense=True)  # the same error, in the model's frame
    assert rotated == pytest.approx(256 * float(((d @ stats.hessian) * d).sum()), rel=0.25)
    assert rotated != pytest.approx(err, rel=1e-3)
    assert weight_cost(w, CalibrationStats(tokens=0), CCQ2, False, "w")[1] == 0.0  # no statistics: no error


def test_choose_upgrades_the_most_error_per_bit_within_the_budget():
    layers = [LayerCosts(1, 100, [200.0, 400.0], [5.0, 1.0]),  # gains 4 for 200 bits
              LayerCosts(2, 100, [200.0, 400.0], [9.0, 1.0]),  # gains 8 for 200 bits: first
              LayerCosts(3, 100, [200.0, 400.0], [2.0, 1.9])]
    assert choose(layers, 2.0) == {1: 0, 2: 0, 3: 0}
    assert choose(layers, 2.7) == {1: 0, 2: 1, 3: 0}
    assert choose(layers, 3.4) == {1: 1, 2: 1, 3: 0}
    assert choose(layers, 4.0) == {1: 1, 2: 1, 3: 1}
    with pytest.raises(ErnieqError, match="cheapest codecs already store 2.000 bits"):
        choose(layers, 1.5)


def test_choose_wider_first_keeps_the_wide_codec_in_the_leading_layers():
    layers = [LayerCosts(1, 100, [200.0, 400.0], [2.0, 1.9]),
              LayerCosts(2, 100, [200.0, 400.0], [9.0, 1.0]),  # the layer worth upgrading
              LayerCosts(3, 100, [200.0, 400.0], [5.0, 1.0])]
    assert choose(layers, 2.7) == {1: 0, 2: 1, 3: 0}  # free choice
    assert choose(layers, 2.7, wider_first=True) == {1: 1, 2: 0, 3: 0}  # layer 2 cannot lead: 1 goes instead
    assert choose(layers, 3.4, wider_first=True) == {1: 1, 2: 1, 3: 0}
    three = [LayerCosts(1, 100, [200.0, 400.0, 800.0], [20.0, 10.0, 0.0]),
             LayerCosts(2, 100, [200.0, 400.0, 800.0], [9.0, 1.0, 0.0]),
             LayerCosts(3, 100, [200.0, 400.0, 800.0], [5.0, 1.0, 0.0])]
    assert choose(three, 4.7, wider_first=True) == {1: 2, 2: 1, 3: 0}  # 1400 of 1410 bits, error 6 (4 bits everywhere: 12)


def test_target_bits_mixes_wint4_and_ccq2_per_layer_and_records_the_rules(tiny_calibrated, tmp_path):
    src, calib = tiny_calibrated
    # on the tiny model's K (64, 32) ccq2's 10 bytes per output channel make it 3.83 bits, wint4 per channel 4.67
    summary = api.quantize(src, tmp_path / "q", bits=2, calib=calib, target_bits=4.3, progress=False, workers=1)
    mix = summary.mix.to_json()
    assert mix["bits_per_weight"] <= 4.3 and [row["layer"] for row in mix["layers"]] == [1, 2, 3]
    chosen = {row["layer"]: row["chosen"].split(":")[0] for row in mix["layers"]}
    assert set(chosen.values()) == {"wint4", "ccq2"}  # some layers at each
    reader = NativeReader(tmp_path / "q")
    for base, q in ((b, reader.quantized(b)) for b in reader.modules if ".experts." in b):
        layer = int(base.split(".layers.")[1].split(".")[0])
        assert q.codec == chosen[layer], base
    spec = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert "-mix4.3" in spec["recipe"]
    mixed = [r for r in spec["recipe_spec"]["rules"] if r.get("classes") == ["routed_experts"] and "layers" in r]
    assert {r["codec"] for r in mixed} == {"wint4", "ccq2"}  # the choice, as rules naming their layers
    routed = summary.to_json()["classes"]["routed_experts"]
    assert routed["bits_per_weight"] == pytest.approx(mix["bits_per_weight"], rel=0.02)  # the estimate is the count


def test_target_bits_needs_statistics_and_a_recipe_with_two_expert_codecs(tiny_calibrated, tmp_path):
    src, calib = tiny_calibrated
    with pytest.raises(ErnieqError, match="calibration statistics"):
        api.quantize(src, tmp_path / "a", bits=2, target_bits=3.0, progress=False, workers=1)
    with pytest.raises(ErnieqError, match="gives them 0"):
        api.quantize(src, tmp_path / "b", bits=4, calib=calib, target_bits=3.0, progress=False, workers=1)


@pytest.mark.parametrize("method", ["gptq", "tune"])
def test_target_bits_chooses_before_a_sequential_pass(tiny_calibrated, tmp_path, method):
    """With --sequential or --method tune the mix is chosen on the unquantized model's statistics first; the
    sequential pass then quantizes (and tunes) each layer by the mixed recipe."""
    src, _ = tiny_calibrated
    summary = api.quantize(src, tmp_path / "q", bits=2, calib_data="demo", calib_tokens=256, calib_seq_len=64,
                           method=method, sequential=True, target_bits=4.3, tune_steps=2, progress=False, workers=1)
    chosen = {row["layer"]: row["chosen"].split(":")[0] for row in summary.mix.to_json()["layers"]}
    assert set(chosen.values()) == {"wint4", "ccq2"}, chosen
    reader = NativeReader(tmp_path / "q")
    for base, q in ((b, reader.quantized(b)) for b in reader.modules if ".experts." in b):
        assert q.codec == chosen[int(base.split(".layers.")[1].split(".")[0])], base
    if method == "tune":
        assert [r["layer"] for r in summary.tune_reports] == [0, 1, 2, 3]  # every layer tuned (or kept at GPTQ)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no statistics or tuning left


def test_quantize_cli_prints_the_choice_per_layer(tiny_calibrated, tmp_path):
    from click.testing import CliRunner

    from ernieq.cli import cli

    src, calib = tiny_calibrated
    result = CliRunner().invoke(cli, ["quantize", str(src), "--out", str(tmp_path / "q"), "--bits", "2", "--calib",
                                      str(calib), "--target-bits", "4.3", "--workers", "1", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "--target-bits 4.3: routed experts per MoE layer" in result.output
    assert "error ccq2" in result.output and "error wint4" in result.output
    bad = CliRunner().invoke(cli, ["quantize", str(src), "--out", str(tmp_path / "b"), "--target-bits", "0"])
    assert bad.exit_code == 2 and "--target-bits" in bad.output


def test_target_bits_for_fastdeploy_keeps_wint4_in_the_leading_layers(tmp_path):
    """FastDeploy's w4w2 runs wint4 experts only before its wint2 ones: the mix obeys, and the export takes it."""
    src = write_tiny_ernie(tmp_path / "src", num_hidden_layers=5, hidden_size=128, intermediate_size=128,
                           moe_intermediate_size=128, head_dim=32)  # MoE layers 1-4, K % 128 == 0
    for file in src.glob("*.safetensors"):  # layer 1's experts made to cost least: a free mix skips them
        tensors = load_file(file)
        if any(".layers.1.mlp.experts." in n for n in tensors):
            save_file({n: t * 1e-3 if ".layers.1.mlp.experts." in n else t for n, t in tensors.items()}, file)
    ids = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(2))
    save_stats(collect_stats(src, ids, progress=False), tmp_path / "calib")
    summary = api.quantize(src, tmp_path / "fd", bits=2, calib=tmp_path / "calib", target_bits=3.3,
                           format="fastdeploy", progress=False, workers=1)
    chosen = [row["chosen"].split(":")[0] for row in summary.mix.to_json()["layers"]]
    assert "ccq2" in chosen and "wint4" in chosen, chosen  # 3.3 bits: some layers at each
    assert chosen == sorted(chosen, key=lambda codec: codec != "wint4"), chosen  # wint4 first, then ccq2
    moe = json.loads((tmp_path / "fd" / "config.json").read_text())["quantization_config"]["moe_quant_config"]
    assert moe["moe_w4_quant_config"]["quant_end_layer"] == chosen.count("wint4")  # MoE layers 1..n at wint4
    assert moe["moe_w2_quant_config"]["quant_start_layer"] == chosen.count("wint4") + 1
