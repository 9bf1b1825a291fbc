"""benchmarks/peers.py and its peer codecs: the 2.5-bit int2 grid inside GPTQ, HQQ's codes
decoded in plain torch, the swapped recipes, and one cheap run through the child processes."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from ernieq.codecs import decode, get_codec
from ernieq.codecs.base import CalibrationStats

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))  # the scripts import each other by plain name, as when run from there

import peer_settings  # noqa: E402
import peers  # noqa: E402
import peers_report  # noqa: E402
from hqq_peer import hqq_available  # noqa: E402


def _correlated_inputs(k: int, tokens: int = 2048, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=gen) / math.sqrt(k) + torch.eye(k)
    return torch.randn(tokens, k, generator=gen) @ mix  # [T, K], correlated channels: GPTQ has work to do


def _output_error(x: torch.Tensor, w: torch.Tensor, q) -> float:
    return ((x @ (decode(q) - w).T).norm() / (x @ w.T).norm()).item()


@pytest.mark.parametrize("fp16_zero, bits", [(False, 2 + 24 / 64), (True, 2 + 32 / 64)])
@pytest.mark.parametrize("k", [256, 200])  # 200: a partial last group
def test_int2_grid_bits_and_gptq_beats_round_to_nearest(fp16_zero, bits, k):
    from ernieq.calibration import gptq_encode

    gen = torch.Generator().manual_seed(k)
    w = torch.randn(48, k, generator=gen)
    x = _correlated_inputs(k)
    codec = get_codec("int2g64", fp16_zero=fp16_zero)
    rtn = codec.encode(w)
    gptq = gptq_encode(codec, w, CalibrationStats(hessian=x.T @ x / x.shape[0], tokens=x.shape[0]))
    pad = -k % 64
    assert rtn.bits_per_weight == pytest.approx(bits * (k + pad) / k)  # stored per padded group
    assert gptq.tensors.keys() == rtn.tensors.keys()
    assert all(gptq.tensors[n].dtype == rtn.tensors[n].dtype for n in rtn.tensors)
    assert _output_error(x, w, rtn) < 0.6  # 2 bits: coarse, but a grid, not noise
    assert _output_error(x, w, gptq) < 0.9 * _output_error(x, w, rtn)


def test_int2_fp16_zero_spans_the_group_range():
    w = torch.linspace(-0.5, 2.5, 64).repeat(3, 1)  # every group spans [-0.5, 2.5]: scale 1, zero 0.5
    q = get_codec("int2g64", fp16_zero=True).encode(w)
    w_hat = decode(q)
    assert torch.equal(q.tensors["zero"], torch.full((3, 1), 0.5, dtype=torch.float16))
    assert w_hat.min().item() == -0.5 and w_hat.max().item() == 2.5  # an integer zero point cannot reach both


@pytest.mark.skipif(not hqq_available(), reason="hqq is a benchmark-only dependency (pip install hqq)")
@pytest.mark.parametrize("nbits", [4, 2])
def test_hqq_codec_decodes_what_hqq_dequantizes(nbits):
    from hqq.core.quantize import BaseQuantizeConfig, Quantizer

    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(nbits))
    q = get_codec("hqq", nbits=nbits, group_size=64).encode(w)
    assert q.bits_per_weight == nbits + 32 / 64  # codes + float16 scale and zero per 64
    codes, meta = Quantizer.quantize(w, device="cpu", **BaseQuantizeConfig(nbits, 64)["weight_quant_params"])
    meta["compute_dtype"] = torch.float32
    reference = Quantizer.dequantize(codes, meta)
    step = float(meta["scale"].abs().max())
    assert (decode(q) - reference).abs().max().item() < 0.01 * step  # only scale/zero rounded to float16
    assert ((decode(q) - w).norm() / w.norm()).item() < (0.15 if nbits == 4 else 0.6)


@pytest.mark.parametrize("codec", ["int2g64", "hqq"])
def test_peer_codecs_run_in_ernieqs_runtime(codec, tmp_path):
    """A checkpoint with a peer codec's experts loads and computes through ernieq's runtime (as peers.py
    evaluates it): the runtime asks every codec how it rounds activations (``CodecBase``)."""
    if codec == "hqq" and not hqq_available():
        pytest.skip("hqq is a benchmark-only dependency (pip install hqq)")
    from ernieq import api
    from ernieq.runtime.loader import load_quantized
    from tests.tiny import write_tiny_ernie

    src = write_tiny_ernie(tmp_path / "src")
    override = r"experts\.\d+\.(gate|up)_proj=" + codec + (":nbits=2,group_size=64" if codec == "hqq" else "")
    api.quantize(src, tmp_path / "q", bits=4, group_size=32, overrides=(override,), progress=False, workers=1)
    ids = torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = load_quantized(tmp_path / "q")(input_ids=ids).logits
    assert logits.shape == (1, 16, 96) and torch.isfinite(logits).all()


def test_a_codec_must_derive_from_codec_base():
    from dataclasses import dataclass

    from ernieq.codecs.base import register_codec

    @dataclass(frozen=True)
    class Config:
        pass

    with pytest.raises(TypeError, match="must derive from ernieq.codecs.base.CodecBase"):
        register_codec("not-a-codec", Config)(type("Plain", (), {}))


def test_swapped_recipe_changes_only_the_swapped_codec(demo_routed_dir):
    from ernieq.recipes import preset as recipe
    from ernieq.model.adapters import adapter_for, stream_groups
    from ernieq.model.checkpoint import CheckpointReader
    from ernieq.model.moe import linear_weights
    from ernieq.quantize import moe_ordinals

    layers = peer_settings.moe_layers(demo_routed_dir)
    base = recipe(bits=2, num_moe_layers=len(layers))
    swapped = peer_settings.swapped_recipe(demo_routed_dir, {"ccq2": peer_settings.HQQ_W2}, bits=2)
    reader = CheckpointReader(demo_routed_dir)
    adapter = adapter_for(reader.config, "config.json")
    ordinals = moe_ordinals(reader, adapter)
    seen = set()
    for group, tensors in stream_groups(reader, adapter):
        for name, info, _ in linear_weights(group.tensors, tensors, adapter):
            before, after = base.choose(name, info, ordinals.get(info.layer)), swapped.choose(
                name, info, ordinals.get(info.layer))
            assert after == (peer_settings.HQQ_W2 if before.codec == "ccq2" else before), name
            seen.add(before.codec)
    assert {"ccq2", "wint8"} <= seen
    text = peer_settings.describe_config(swapped, layers)
    assert "; routed_experts: hqq:nbits=2,group_size=64; " in text  # the routed experts the wint4 rule leaves
    with pytest.raises(Exception, match="no rule with codec"):
        peer_settings.swapped_recipe(demo_routed_dir, {"fp8": peer_settings.HQQ_W2}, bits=2)


def test_peers_script_runs_a_setting_in_a_child(tmp_path, demo_routed_dir, wikitext2_path):
    out, md = tmp_path / "peers.json", tmp_path / "B.md"
    md.write_text("# title\n\nbefore\n\n<!-- peers:begin -->\nold table\n<!-- peers:end -->\n\nafter\n")
    peers.main(["--model", str(demo_routed_dir), "--data", str(wikitext2_path), "--max-windows", "1",
                "--seq-len", "128", "--settings", "ernieq-w4-rtn", "--out", str(out), "--markdown", str(md)])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["setting"] == "ernieq-w4-rtn" and row["method"] == "RTN"
    assert row["tokens"] == 127 and math.isfinite(row["ppl"]) and row["ppl"] > 1
    assert row["bits_by_codec"] == {"wint4": 4.25}  # a float16 scale per 64 weights; every K of the demo divides
    assert row["quantized"] == "every linear: wint4:group_size=64,symmetric=True,clip=False,scale_dtype=float16"
    assert row["wall_seconds"] >= row["quantize_seconds"] + row["eval_seconds"] > 0
    assert row["peak_rss_bytes"] > 100 * 2**20  # the child's own ru_maxrss, in bytes (torch alone is more)
    text = md.read_text()
    assert text.startswith("# title\n\nbefore\n\n<!-- peers:begin -->")
    assert text.endswith("<!-- peers:end -->\n\nafter\n")
    assert "old table" not in text and "| ernieq-w4-rtn | RTN |" in text


@pytest.mark.parametrize("name, bits, iters", [("autoround-w4-g64", "4", {}), ("autoround-w2-g64", "2", {}),
                                               ("autoround-w2-g64-i20", "2", {"--iters": "20"})])
def test_autoround_settings_run_in_their_own_environment(monkeypatch, tmp_path, name, bits, iters):
    setting = peer_settings.SETTINGS[name]
    monkeypatch.delenv(peer_settings.AUTOROUND_PYTHON_ENV, raising=False)
    assert setting.build is None and setting.missing() == ["$ERNIEQ_AUTOROUND_PYTHON"]
    with pytest.raises(peers.PeersError, match="ERNIEQ_AUTOROUND_PYTHON"):  # refused before any child starts
        peers.run(peers.parse_args(["--data", "d.txt", "--settings", name]))
    monkeypatch.setenv(peer_settings.AUTOROUND_PYTHON_ENV, "/venv/bin/python")
    a = peers.parse_args(["--model", "m", "--data", "d.txt", "--max-windows", "3", "--calib-tokens", "64",
                          "--settings", name])
    argv = setting.external(a, tmp_path / "row.json")
    assert argv[:2] == ["/venv/bin/python", str(BENCH / "autoround_peer.py")]
    options = dict(zip(argv[2::2], argv[3::2]))
    assert options == {"--bits": bits, **iters, "--model": "m", "--data": "d.txt", "--seq-len": "2048",
                       "--calib-data": "demo", "--calib-tokens": "64", "--calib-seq-len": "512", "--out": str(tmp_path / "row.json"),
                       "--max-windows": "3"}


def test_a_later_run_replaces_its_rows_and_keeps_the_others(tmp_path):
    def result(date, names, ppl):
        rows = [{"setting": n, "method": "-", "quantized": "x", "bits_per_weight": 32.0, "bits_by_codec": {},
                 "ppl": ppl, "tokens": 10, "windows": 1, "seq_len": 11, "data": "d", "model": "m",
                 "quantize_seconds": 0.0, "eval_seconds": 1.0, "wall_seconds": 2.0, "peak_rss_bytes": 2**30}
                for n in names]
        return {"run": {"date": date, "commit": "c", "machine": "x", "load_before": 1.0, "load_after": 1.0,
                        "command": "cmd", "calib_reused": None}, "rows": rows, "calibration": None}

    path = tmp_path / "p.json"
    peers_report.merge_rows(path, result("d1", ["hqq-w2-g64", "unquantized", "a-retired-setting"], 20.0))
    merged = peers_report.merge_rows(path, result("d2", ["ernieq-w2-gptq", "unquantized"], 10.0))
    assert [r["setting"] for r in merged["rows"]] == ["unquantized", "ernieq-w2-gptq", "hqq-w2-g64"]
    assert {r["setting"]: r["run"] for r in merged["rows"]}["hqq-w2-g64"] == "d1 c"
    assert set(merged["runs"]) == {"d1 c", "d2 c"}
    assert "| hqq-w2-g64 | - | x | 32.000 | - | 20.000 | 2.00x |" in peers_report.table(merged)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{peers_report.SUMMARY_BEGIN}\nold\n{peers_report.SUMMARY_END}\nrest\n")
    peers_report.write_markdown(readme, merged, summary=True)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("rest\n") and "old" not in text
    assert "| demo MoE, unquantized | - | 32.000 | 10.000 |  |" in text
    assert "| `--bits 2` | GPTQ (FastDeploy-exportable) | 32.000 | 10.000 | +0.0 % |" in text
    assert "HQQ 2-bit" in text  # the older run's row stays
    with pytest.raises(peers_report.ReportError, match="needs both markers"):
        peers_report.write_markdown(tmp_path / "other.md", merged, summary=True)
