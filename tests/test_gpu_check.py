"""scripts/gpu_check.sh: its dry run goes through every step of the GPU check on the CPU (Triton interpreter,
tiny synthetic checkpoints) and writes what the GPU run writes; without a GPU the real run stops at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
STEPS = ("tests", "accuracy", "kernels", "bench")


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable,
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run(["bash", "scripts/gpu_check.sh", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=3600)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    done = _run("--dry-run", "--out", str(out))
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return out, done.stdout


def test_every_step_writes_its_json_with_provenance(dry_run):
    out, stdout = dry_run
    for step in STEPS:
        data = json.loads((out / f"gpu_{step}.json").read_text())
        assert data["step"] == step and data["dry_run"] is True and data["gpu"].startswith("none: DRY RUN")
        assert data["commit"] and data["date"] and data["device"] == "cpu"
    assert "all passed" in stdout


def test_accuracy_compares_triton_with_the_reference_path_per_setting(dry_run):
    rows = json.loads((dry_run[0] / "gpu_accuracy.json").read_text())["rows"]
    assert [r["setting"] for r in rows] == ["unquantized", "w8", "w4", "w2", "fp8"]
    for r in rows[1:]:
        assert r["kernels"][0] == "triton" and r["kernels"][1].startswith("reference"), r
        assert r["ok"] and abs(r["ppl_triton"] / r["ppl_reference"] - 1) <= 0.005, r


def test_bench_measures_bf16_against_w4_and_w2_on_both_checkpoints(dry_run):
    results = json.loads((dry_run[0] / "gpu_bench.json").read_text())["results"]
    assert [r["checkpoint"] for r in results] == ["tiny-demo", "synthetic-21b"]
    for r in results:
        assert [(m["role"], m["name"]) for m in r["models"]] == [("model", "w4"), ("model", "w2"), ("baseline", "bf16")]
        assert all(m["runtime"]["kernels"] == ("torch" if m["name"] == "bf16" else "triton") for m in r["models"])
        assert [(x["model"], x["batch"]) for x in r["ratios"]] == [(m, b) for m in ("w4", "w2") for b in (1, 2)]
        assert all(x["weight_bytes"] < 1 for x in r["ratios"])


def test_the_rows_for_benchmarks_md_name_gpu_date_and_commit(dry_run):
    out, stdout = dry_run
    lines = (out / "gpu_rows.md").read_text().splitlines()
    assert lines[0] == "| GPU | date | commit | check | figures | result |"
    commit = json.loads((out / "gpu_tests.json").read_text())["commit"]
    body = lines[2:]
    assert len(body) == 1 + 5 + 1 + 2 * 3 * 2 + 2 * 2 * 2  # tests, accuracy, kernels, bench rows and ratios
    assert all("| none: DRY RUN on the CPU | " in line and f" | {commit} | " in line and line.endswith("| ok |")
               for line in body)
    assert "\n".join(lines) in stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_the_gpu_run_without_a_gpu_stops_at_once():
    done = _run("--steps", "tests")
    assert done.returncode == 2 and "no CUDA GPU here" in done.stderr
