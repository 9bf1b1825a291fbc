"""``ernieq bench``: the CPU reference run labelled and complete; the tile table the launchers read.

Shape legend: M rows of x, N output features, K input features.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from ernieq import api
from ernieq.cli import cli
from ernieq.errors import ErnieqError
from ernieq.kernels import configs, tile_table
from ernieq.bench.kernels import CPU_LABEL, BenchOptions, run_bench
from ernieq.bench.inputs import CODECS
from ernieq.bench.report import significant
from ernieq.kernels.args import KernelError
from ernieq.kernels.configs import TileConfig

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU reference run; a GPU runs the kernels")


def table_rows(markdown: str) -> list[dict[str, str]]:
    """The markdown table as dicts keyed by column title."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    titles = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(titles, [c.strip() for c in line.strip("|").split("|")], strict=True)) for line in lines[2:]]


@cpu_only
def test_quick_cpu_bench_labels_itself_and_times_every_codec(tmp_path):
    out = tmp_path / "bench.md"
    result = CliRunner().invoke(cli, ["bench", "--kernels", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert CPU_LABEL in result.output
    text = out.read_text()
    assert CPU_LABEL in text
    assert "command: `ernieq bench --kernels --out" in text and "--quick" in text
    assert "- runtime: cpu (" in text and "float32, kernels: reference" in text
    rows = table_rows(text)
    cases = {(r["GEMM"], r["M"]) for r in rows}
    assert cases == {(kind, m) for kind in ("attn q_proj", "expert gate/up") for m in ("1", "16")}
    speedup_col = "speed-up vs fp32 matmul"
    for kind, m in cases:
        case = {r["codec"]: r for r in rows if (r["GEMM"], r["M"]) == (kind, m)}
        assert set(case) == set(CODECS) | {"fp32 matmul", "bf16 matmul"}, (kind, m)
        for codec, r in case.items():
            assert r["note"] == "", r
            for col in ("median us", "TFLOP/s", "GB/s", "% copy bw"):
                assert math.isfinite(float(r[col])) and float(r[col]) >= 0, (codec, col, r)
            assert float(r["median us"]) > 0
            if codec in CODECS:
                assert math.isfinite(float(r[speedup_col])) and float(r[speedup_col]) > 0, r
                assert r["max rel err"] == ""  # the reference is not checked against itself


@pytest.mark.parametrize("v, text", [(0.004123, "0.00412"), (41.23, "41.2"), (4123.4, "4123"), (None, "")])
def test_figures_keep_three_significant_digits(v, text):
    assert significant(v) == text


@cpu_only
def test_cpu_bench_refuses_what_needs_a_gpu():
    with pytest.raises(ErnieqError, match="needs a CUDA GPU"):
        api.bench(sweep=True, m=(1,))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(codecs=("wint3",)), "unknown codec"),
        (dict(models=("22b",)), "unknown model"),
        (dict(m=(0,)), "M values must be >= 1"),
        (dict(save_configs=True), "add --sweep"),
    ],
)
def test_bench_rejects_bad_options(kwargs, message):
    with pytest.raises(ErnieqError, match=message):
        api.bench(**kwargs)


# ---- the tile table --------------------------------------------------------------------------------


@pytest.fixture
def table(tmp_path, monkeypatch):
    """An empty tile table at a temp path, with a pretend GPU for the launchers' lookup."""
    path = tmp_path / "tiles.json"
    monkeypatch.setenv(tile_table.TABLE_ENV, str(path))
    monkeypatch.setattr(configs, "gpu_name", lambda index: "Test GPU")
    monkeypatch.setattr(configs, "_num_sms", lambda index: 132)
    tile_table._loaded.cache_clear()
    yield path
    tile_table._loaded.cache_clear()


TUNED = TileConfig(block_m=16, block_n=32, block_k=128, split_k=8, group_m=4, num_warps=2, num_stages=5)
GPU = torch.device("cuda", 0)  # never touched: the lookup only needs the name (patched above)


@pytest.mark.parametrize("m, bucket", [(1, 1), (2, 2), (3, 4), (16, 16), (17, 32), (4096, 4096)])
def test_m_bucket_is_the_next_power_of_two(m, bucket):
    assert tile_table.m_bucket(m) == bucket


def test_linear_config_uses_the_stored_entry_for_its_key_and_falls_back_otherwise(table):
    heuristic = configs.linear_config(16, 2560, 2560, GPU, False, codec="wint4")
    assert heuristic != TUNED
    tile_table.save_entries([tile_table.make_entry("linear", "Test GPU", "wint4", 16, 2560, 2560, TUNED, us=9.5)])
    for m in (9, 12, 16):  # one bucket
        assert configs.linear_config(m, 2560, 2560, GPU, False, codec="wint4") == TUNED
    assert configs.linear_config(16, 2560, 2560, GPU, False, codec="wint4") == TUNED
    misses = [
        configs.linear_config(17, 2560, 2560, GPU, False, codec="wint4"),  # next bucket
        configs.linear_config(16, 2560, 2560, GPU, False, codec="ccq2"),
        configs.linear_config(16, 1536, 2560, GPU, False, codec="wint4"),
        configs.linear_config(16, 2560, 1536, GPU, False, codec="wint4"),
        configs.linear_config(16, 2560, 2560, GPU, False),  # no codec: heuristic only
        configs.linear_config(16, 2560, 2560, GPU, True, codec="wint4"),  # the interpreter keeps its tiles
    ]
    assert TUNED not in misses
    assert misses[1] == heuristic  # same shape, other codec: the heuristic
    assert configs.moe_config(16, 64, GPU, False, codec="wint4", n=2560, k=2560) != TUNED  # other kernel


def test_moe_config_uses_the_stored_entry_keyed_by_pairs(table):
    tile_table.save_entries([tile_table.make_entry("moe", "Test GPU", "ccq2", 6 * 16, 1536, 2560, TUNED)])
    assert configs.moe_config(6 * 16, 64, GPU, False, codec="ccq2", n=1536, k=2560) == TUNED
    assert configs.moe_config(6 * 16, 64, GPU, False, codec="ccq2", n=2560, k=1536) != TUNED
    assert configs.moe_config(6 * 64, 64, GPU, False, codec="ccq2", n=1536, k=2560) != TUNED


def test_other_gpus_do_not_see_the_entry(table, monkeypatch):
    tile_table.save_entries([tile_table.make_entry("linear", "Test GPU", "fp8", 1, 64, 64, TUNED)])
    monkeypatch.setattr(configs, "gpu_name", lambda index: "Other GPU")
    assert configs.linear_config(1, 64, 64, GPU, False, codec="fp8") != TUNED


def test_save_entries_merges_by_key(table):
    first = tile_table.make_entry("linear", "Test GPU", "wint8", 4, 64, 128, TileConfig(), us=3.0)
    other = tile_table.make_entry("linear", "Test GPU", "wint8", 64, 64, 128, TileConfig(block_m=64), us=5.0)
    tile_table.save_entries([first, other])
    replaced = tile_table.make_entry("linear", "Test GPU", "wint8", 3, 64, 128, TUNED, us=2.0)  # bucket 4 again
    tile_table.save_entries([replaced])
    entries = json.loads(table.read_text())["entries"]
    assert len(entries) == 2
    assert {e["m_bucket"]: e["us"] for e in entries} == {4: 2.0, 64: 5.0}
    assert tile_table.lookup("linear", "Test GPU", "wint8", 4, 64, 128) == TUNED


def test_a_bad_table_fails_loudly(table):
    table.write_text('{"version": 1, "entries": [{"kernel": "linear", "gpu": "Test GPU"}]}')
    with pytest.raises(KernelError, match="entry 0 lacks"):
        tile_table.lookup("linear", "Test GPU", "wint8", 1, 64, 64)
    table.write_text("{not json")
    tile_table._loaded.cache_clear()
    with pytest.raises(KernelError, match="not valid JSON"):
        tile_table.lookup("linear", "Test GPU", "wint8", 1, 64, 64)


def test_the_shipped_table_loads_and_the_loader_refuses_bad_entries(tmp_path):
    """Every shipped entry builds a TileConfig (empty until a GPU sweep fills it); the loader reads a
    written entry back by its key and names the file for a bad config or an unknown kernel."""
    assert all(isinstance(c, TileConfig) for c in tile_table._loaded(str(tile_table.DEFAULT_TABLE)).values())
    path = tmp_path / "tiles.json"
    cfg = TileConfig(block_m=16, block_n=32, block_k=64, group_m=4)
    tile_table.save_entries([tile_table.make_entry("linear", "Test GPU", "wint8", 3, 64, 128, cfg)], path)
    assert tile_table.lookup("linear", "Test GPU", "wint8", 4, 64, 128, path) == cfg  # m = 3 and 4: bucket 4
    assert tile_table.lookup("linear", "Test GPU", "wint8", 5, 64, 128, path) is None
    data = json.loads(path.read_text())
    data["entries"][0]["config"]["block_m"] = "sixteen"
    path.write_text(json.dumps(data))
    tile_table._loaded.cache_clear()
    with pytest.raises(KernelError, match="tiles.json: bad tile config"):
        tile_table.lookup("linear", "Test GPU", "wint8", 4, 64, 128, path)
    data["entries"][0]["kernel"] = "conv"
    path.write_text(json.dumps(data))
    with pytest.raises(KernelError, match="unknown kernel"):
        tile_table.read_table(path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU stand-in for the GPU sweep")
def test_dry_run_sweep_saves_winners_the_lookup_returns(table):
    report = run_bench(BenchOptions(dry_run=True, sweep=True, save_configs=True, codecs=("wint8",), models=("21b",),
                                    m=(3,), dense=True, moe=True))  # fmt: skip
    assert not report.failures, [r.note for r in report.failures]
    entries = json.loads(table.read_text())["entries"]
    kinds = {(e["kernel"], e["n"], e["k"]) for e in entries}
    # the tiny model: q_proj (64, 64), o_proj (64, 64), gate/up (32, 64), down (64, 32); MoE N = I, K = H
    assert kinds == {("linear", 64, 64), ("linear", 32, 64), ("linear", 64, 32), ("moe", 32, 64)}
    for e in entries:
        assert e["gpu"] == "none: DRY RUN on the CPU" and e["codec"] == "wint8" and e["us"] > 0
        assert e["m_bucket"] == (4 if e["kernel"] == "linear" else 8)  # M = 3; MoE pairs T * A = 6
        stored = tile_table.lookup(e["kernel"], e["gpu"], "wint8", 3 if e["kernel"] == "linear" else 6, e["n"], e["k"])
        assert stored == TileConfig(**e["config"])
    assert any("best sweep" in r.note for r in report.rows if r.codec == "wint8")
