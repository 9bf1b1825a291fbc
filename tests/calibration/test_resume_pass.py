"""A killed calibration pass resumes after its last finished layer: ``calibrate --out`` to the same statistics,
``quantize --method tune`` (GPTQ and tuning in the pass, then the model's scales tuned end to end) to the same
bytes, in one process and on two ranks."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from ernieq import api
from ernieq.calibration import resume
from ernieq.calibration.stats import SUMMARY_NAME
from tests.test_distributed import _torchrun
from tests.tiny import write_char_tokenizer, write_tiny_ernie

REPO = Path(__file__).resolve().parents[2]
CALIB = {"tokens": 512, "seq_len": 64}  # 8 sequences of 64 tokens
TUNE = ("--bits", "2", "--workers", "1", "--method", "tune", "--calib-tokens", "512", "--calib-seq-len", "64",
        "--tune-steps", "3", "--tune-target", "model")  # the unquantized stream is saved beside the quantized one


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume_pass")
    src = write_tiny_ernie(root / "tiny")  # 3 decoder layers
    write_char_tokenizer(src)
    words = random.Random(1)
    (root / "calib.txt").write_text(" ".join("".join(words.choices("etaoinshrdlu", k=words.randint(1, 8)))
                                             for _ in range(400)))
    return src


def _data(tiny: Path) -> str:
    return str(tiny.parent / "calib.txt")


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _killed(args: list, point: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ERNIEQ_TEST_KILL_AT": point, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "ernieq", "--quiet", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    return proc


def _tune(tiny: Path, out: Path, **extra):
    return api.quantize(tiny, out, bits=2, workers=1, method="tune", calib_data=_data(tiny), calib_tokens=512,
                        calib_seq_len=64, tune_steps=3, tune_target="model", progress=False, **extra)


@pytest.fixture(scope="module")
def tuned_reference(tiny, tmp_path_factory) -> tuple[dict[str, bytes], list[dict]]:
    """The bytes and tuning reports of an uninterrupted ``quantize --method tune``."""
    out = tmp_path_factory.mktemp("ref") / "q"
    summary = _tune(tiny, out)
    return _files(out), summary.tune_reports


READ_BACK = "calibrated by an earlier run with the same inputs and settings; read back"
# where the run is killed, and what the rerun says it takes back
KILLS = [
    ("calibration-layer:2", ["resuming the calibration pass at layer 3 of 3"]),  # layers 0 and 1 saved
    # layer 1's hidden states written, its mark not: layer 0 is what is saved
    ("calibration-states:2", ["resuming the calibration pass at layer 2 of 3"]),
    # the pass done, the end-to-end step after 2 of its 20 steps
    ("model-tuning-step:2", [READ_BACK, "model tuning: resuming after step 2 of 20"]),
    # the pass and the end-to-end step done (not run again), the checkpoint being written
    ("index:1", [READ_BACK, "model tuning: read back what an earlier run kept"]),
]


@pytest.mark.parametrize("point, says", KILLS, ids=[k[0] for k in KILLS])
def test_a_killed_tuning_pass_resumes_to_the_same_bytes(tiny, tuned_reference, tmp_path, caplog, point, says):
    reference, reports = tuned_reference
    out = tmp_path / "q"
    _killed(["quantize", tiny, "--out", out, "--calib-data", _data(tiny), *TUNE], point)
    assert not out.exists() and (tmp_path / ".q.ernieq-sequential" / resume.STATE_NAME).is_file()
    with caplog.at_level(logging.INFO, logger="ernieq"):
        summary = _tune(tiny, out)
    for line in says:
        assert line in caplog.text
    assert _files(out) == reference
    assert _without_time(summary.tune_reports) == _without_time(reports)  # layers tuned before the kill: as they did
    assert not any(p.name.startswith(".q.") for p in tmp_path.iterdir())  # nothing left beside OUT


def _without_time(reports: list[dict]) -> str:
    return json.dumps([{k: v for k, v in r.items() if k != "seconds"} for r in reports])  # NaN as a word


def _statistics(folder: Path) -> tuple[dict, dict]:
    """Every statistics tensor, and the summary without what differs between runs (run id, wall time)."""
    tensors = {f"{p.name}/{k}": t for p in sorted(folder.glob("stats-*.safetensors")) for k, t in load_file(p).items()}
    summary = json.loads((folder / SUMMARY_NAME).read_text())
    del summary["run_id"], summary["info"]["seconds"]
    return tensors, summary


def test_a_killed_calibrate_resumes_to_the_same_statistics(tiny, tmp_path, caplog):
    api.calibrate(tiny, _data(tiny), **CALIB, out=tmp_path / "ref", progress=False)
    out = tmp_path / "s"
    _killed(["calibrate", tiny, "--data", _data(tiny), "--tokens", "512", "--seq-len", "64", "--out", out],
            "calibration-layer:1")
    assert not (out / SUMMARY_NAME).exists() and len(list(out.glob("stats-*.safetensors"))) == 1
    with caplog.at_level(logging.INFO, logger="ernieq"):
        api.calibrate(tiny, _data(tiny), **CALIB, out=out, progress=False)
    assert "resuming the calibration pass at layer 2 of 3" in caplog.text
    ours, theirs = _statistics(out), _statistics(tmp_path / "ref")
    assert ours[0].keys() == theirs[0].keys() and all(ours[0][k].equal(t) for k, t in theirs[0].items())
    assert ours[1] == theirs[1]
    assert not list(out.glob(".resume-rank-*"))  # a finished pass keeps only its mark
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ernieq"):  # the same call again reads the statistics back
        again = api.calibrate(tiny, _data(tiny), **CALIB, out=out, progress=False)
    assert "read back" in caplog.text and again.sites.keys() == set(ours[1]["sites"])


def test_a_leftover_of_other_inputs_starts_the_pass_over(tiny, tmp_path, monkeypatch, caplog):
    """An interrupted pass over 8 sequences is not resumed by one over 4: that pass starts over, and an
    interrupt (not a kill) keeps what was done."""
    def interrupt(point: str) -> None:
        if point == "calibration-layer":
            raise KeyboardInterrupt

    monkeypatch.setattr(resume, "kill_point", interrupt)
    out = tmp_path / "s"
    with pytest.raises(KeyboardInterrupt):
        api.calibrate(tiny, _data(tiny), **CALIB, out=out, progress=False)
    assert (out / resume.STATE_NAME).is_file()
    monkeypatch.undo()
    with caplog.at_level(logging.INFO, logger="ernieq"):
        cset = api.calibrate(tiny, _data(tiny), tokens=256, seq_len=64, out=out, progress=False)
    assert "left by a run with other inputs or settings; the pass starts over" in caplog.text
    assert "resuming" not in caplog.text
    api.calibrate(tiny, _data(tiny), tokens=256, seq_len=64, out=tmp_path / "ref", progress=False)
    assert cset.info["n_seq"] == 4
    ours, theirs = _statistics(out), _statistics(tmp_path / "ref")
    assert all(ours[0][k].equal(t) for k, t in theirs[0].items()) and ours[1] == theirs[1]


def test_a_rank_killed_mid_pass_resumes_to_the_same_bytes_on_two_ranks(tiny, tmp_path):
    """Rank 1 dies after writing its states of layer 1, before rank 0 marks the layer: the rerun resumes
    from layer 0's states, which the other parity kept, and writes what an uninterrupted 2-rank run writes;
    the same after rank 1 dies in the end-to-end step."""
    args = ["quantize", tiny, "--calib-data", _data(tiny), *TUNE]
    done = _torchrun(*args, "--out", tmp_path / "ref")
    assert done.returncode == 0, done.stderr
    killed = _torchrun(*args, "--out", tmp_path / "q", kill="calibration-states:2@1")
    assert killed.returncode != 0 and not (tmp_path / "q").exists()
    state = json.loads((tmp_path / ".q.ernieq-sequential" / resume.STATE_NAME).read_text())
    assert state["layer"] == 0 and not state["done"]
    done = _torchrun(*args, "--out", tmp_path / "q", verbose=True)
    assert done.returncode == 0, done.stderr
    assert "resuming the calibration pass at layer 2 of 3" in done.stderr
    assert _files(tmp_path / "q") == _files(tmp_path / "ref")
    # rank 1 dies after saving the end-to-end step's second step; rank 0 saved it too, or only the first
    killed = _torchrun(*args, "--out", tmp_path / "q2", kill="model-tuning-step:2@1")
    assert killed.returncode != 0 and not (tmp_path / "q2").exists()
    done = _torchrun(*args, "--out", tmp_path / "q2", verbose=True)
    assert done.returncode == 0, done.stderr
    assert re.search(r"model tuning: resuming after step [12] of 20", done.stderr)
    assert _files(tmp_path / "q2") == _files(tmp_path / "ref")


def test_a_killed_tuning_pass_with_a_measured_mix_resumes_to_the_same_bytes(tiny, tmp_path, caplog):
    """--target-bits: a first pass over the unquantized model chooses the mix, its statistics go before the
    sequential pass; killed in that pass, the rerun measures the mix again and resumes the pass."""
    mix = {"target_bits": 4.3}
    _tune(tiny, tmp_path / "ref", **mix)
    out = tmp_path / "q"
    # arrivals 1-3: the mix's pass; 4 and 5: layers 0 and 1 of the sequential pass
    _killed(["quantize", tiny, "--out", out, "--calib-data", _data(tiny), *TUNE, "--target-bits", "4.3"],
            "calibration-layer:5")
    assert not (tmp_path / ".q.ernieq-calib").exists()  # the mix's statistics went before the sequential pass
    with caplog.at_level(logging.INFO, logger="ernieq"):
        _tune(tiny, out, **mix)
    assert "resuming the calibration pass at layer 3 of 3" in caplog.text
    assert _files(out) == _files(tmp_path / "ref")
