"""benchmarks/bench_kernels.py: its synthetic weights are valid codec layouts the kernels read right,
and without a GPU it stops with a clear message (the GPU run itself happens where a GPU is lent)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from ernieq.codecs import decode
from ernieq.kernels import MoEWeights, reference
from ernieq.kernels.dequant_gemm import linear
from ernieq.kernels.fused_moe import moe
from tests.kernels.cases import DEVICE, MOE_TOLERANCES, TOLERANCES, assert_close, seeded

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # interpreter sigmoid

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_kernels.py"
_spec = importlib.util.spec_from_file_location("bench_kernels", _PATH)
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_kernels"] = bench  # dataclasses look their module up while the file executes
_spec.loader.exec_module(bench)


@pytest.mark.parametrize("codec", list(bench.CODECS))
def test_synthetic_weights_decode_and_match_the_kernels(codec):
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    q = bench.synthetic(codec, bench.CODECS[codec], (24, 200), DEVICE, gen)
    assert torch.isfinite(decode(q)).all()
    x = torch.randn(3, 200, generator=seeded(codec)).to(DEVICE, torch.bfloat16)
    assert_close(linear(x, q), reference.linear(x, q), TOLERANCES[torch.bfloat16])

    shapes = ((4, 32, 64), (4, 32, 64), (4, 64, 32))  # gate, up (E, I, H); down (E, H, I)
    gate, up, down = (bench.synthetic(codec, bench.CODECS[codec], s, DEVICE, gen) for s in shapes)
    x = torch.randn(3, 64, generator=seeded(codec, "moe")).to(DEVICE, torch.bfloat16)
    ids, w = bench.route(3, 4, 2, DEVICE, gen)
    experts = MoEWeights(gate, up, down)
    want = reference.moe(x, ids, w, experts)
    assert_close(moe(x, ids, w, experts), want, MOE_TOLERANCES[torch.bfloat16])


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_exits_with_status_2_without_a_gpu(tmp_path, caplog):
    assert bench.main(["--out", str(tmp_path / "b.md")]) == 2
    assert "no CUDA GPU" in caplog.text
    assert not (tmp_path / "b.md").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU stand-in for the GPU run")
def test_dry_run_writes_a_full_table(tmp_path):
    out = tmp_path / "bench.md"
    assert bench.main(["--out", str(out), "--dry-run", "--models", "21B-A3B", "--codecs", "wint4,ccq2"]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| tiny")]
    # 4 dense GEMMs x 2 M x (bf16 + 2 codecs) + MoE 2 T x (bf16 looped + 2 codecs)
    assert len(rows) == 4 * 2 * 3 + 2 * 3
    assert not any("ERROR" in r or "FAIL" in r for r in rows)
