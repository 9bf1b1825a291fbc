"""torchrun on the tiny ERNIE MoE (gloo, CPU): 2 ranks calibrate within 1e-5 of one process, quantize from saved
statistics to the same bytes, and a killed rank stops the job in one line, the rerun resuming to the same bytes."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from ernieq import api, distributed
from ernieq.distributed import World, plan, share
from ernieq.formats.native_writer import STATE_DIR
from tests.test_cli import run
from tests.tiny import write_char_tokenizer, write_tiny_ernie

REPO = Path(__file__).resolve().parents[1]
CALIB = ("--tokens", "512", "--seq-len", "64")  # 8 sequences: 4 per rank
QUANTIZE = ("--bits", "2", "--workers", "1")  # wint8, wint4 and ccq2, GPTQ from the statistics


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist")
    src = write_tiny_ernie(root / "tiny")
    write_char_tokenizer(src)
    words = random.Random(0)
    (root / "calib.txt").write_text(" ".join("".join(words.choices("etaoinshrdlu", k=words.randint(1, 8)))
                                             for _ in range(400)))
    return src


@pytest.fixture(scope="module")
def one_process(tiny, tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    """The statistics of one process and the bytes of ``quantize --bits 2`` from them."""
    root = tmp_path_factory.mktemp("one")
    api.calibrate(tiny, str(tiny.parent / "calib.txt"), tokens=512, seq_len=64, out=root / "stats", progress=False)
    api.quantize(tiny, root / "q", bits=2, calib=root / "stats", workers=1, progress=False)
    return root / "stats", _files(root / "q")


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _torchrun(*args, kill: str | None = None, verbose: bool = False) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 -m ernieq --quiet ARGS`` (a free port: tests may run side by side);
    verbose: ``-v`` instead of ``--quiet`` (debug lines on stderr; torchrun takes ``--log`` for its own)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("ERNIEQ_TEST_KILL_AT", None)
    if kill:
        env["ERNIEQ_TEST_KILL_AT"] = kill
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "ernieq",
           "-v" if verbose else "--quiet", *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _pieces(tiny: Path) -> list[list[int]]:
    from ernieq.model.adapters import adapter_for, iter_groups
    from ernieq.model.checkpoint import CheckpointReader
    from ernieq.quantize import _pieces

    reader = CheckpointReader(tiny)
    adapter = adapter_for(reader.config, "tiny")
    return [_pieces(reader, adapter, g, False) for g in iter_groups(reader, adapter)]


def test_calibrate_on_two_ranks_matches_one_process(tiny, one_process, tmp_path):
    stats, _ = one_process
    done = _torchrun("calibrate", tiny, "--data", tiny.parent / "calib.txt", *CALIB, "--out", tmp_path / "s")
    assert done.returncode == 0, done.stderr
    files = sorted(p.name for p in stats.glob("stats-*.safetensors"))
    assert files and files == sorted(p.name for p in (tmp_path / "s").glob("stats-*.safetensors"))
    for name in files:
        ours, theirs = load_file(tmp_path / "s" / name), load_file(stats / name)
        assert ours.keys() == theirs.keys()
        for key, t in theirs.items():  # sums of 4 + 4 sequences against sums of 8
            assert (ours[key] - t).norm() <= 1e-5 * t.norm(), key
    ours, theirs = (json.loads((folder / "summary.json").read_text()) for folder in (tmp_path / "s", stats))
    assert ours["sites"] == theirs["sites"]  # token counts per site, exactly
    assert [r["tokens"] for r in ours["experts"]] == [r["tokens"] for r in theirs["experts"]]
    for layer, router in theirs["routers"].items():
        assert ours["routers"][layer]["counts"] == router["counts"]
        assert ours["routers"][layer]["entropy"] == pytest.approx(router["entropy"], rel=1e-5)


def test_quantize_on_two_ranks_gives_the_same_bytes(tiny, one_process, tmp_path):
    stats, reference = one_process
    assert any(not p.whole for rank in plan(_pieces(tiny), 2) for p in rank)  # groups are cut and joined here
    log = tmp_path / "q.log"  # --log-file: the spelling torchrun leaves to ernieq
    done = _torchrun("--log-file", log, "quantize", tiny, "--out", tmp_path / "q", *QUANTIZE, "--calib", stats)
    assert done.returncode == 0, done.stderr
    assert _files(tmp_path / "q") == reference
    assert re.search(r"layers\.\d+\.mlp \(\d+, \d+\): \d+ weights in", log.read_text())  # a part, in the shared log


def test_a_killed_rank_stops_the_job_and_the_same_command_resumes(tiny, one_process, tmp_path):
    stats, reference = one_process
    args = ("quantize", tiny, "--out", tmp_path / "q", *QUANTIZE, "--calib", stats)
    done = _torchrun(*args, kill="part-written:2@1")  # rank 1 dies after its second part of a cut group
    assert done.returncode != 0
    assert re.search(r"^error: rank 0 of 2: .*another rank", done.stderr, re.M), done.stderr  # our one line
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)\s*exitcode\s*: -9", done.stderr), done.stderr  # torchrun's
    state = tmp_path / ".q.ernieq-tmp" / STATE_DIR
    kept = sorted(p.name for p in state.glob("group-*.json"))
    assert any("-part-" in name for name in kept) and not (tmp_path / "q").exists()
    done = _torchrun(*args)
    assert done.returncode == 0, done.stderr
    assert _files(tmp_path / "q") == reference


def test_the_launchers_stop_inside_a_library_call_is_one_line(monkeypatch, capsys):
    """torchrun's SIGTERM, raised inside a library call, can come out as that library's own error (CI saw
    safetensors' ValueError in place of ours): the entry point still reports the stop in one line; any
    other error is not hidden."""
    from ernieq import cli

    library_error = "could not determine the shape of object type 'torch.storage.UntypedStorage'"

    def interrupted(**kwargs):
        try:
            distributed._stopped(15, None)
        except distributed.DistributedError:
            raise ValueError(library_error) from None

    monkeypatch.setattr(distributed, "_stop", None)
    monkeypatch.setattr(cli.cli, "main", lambda **kwargs: (_ for _ in ()).throw(ValueError(library_error)))
    with pytest.raises(ValueError, match="could not determine"):  # no stop: the error is not ours to hide
        cli.main()
    monkeypatch.setattr(cli.cli, "main", interrupted)
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_.value.code == 1 and len(lines) == 1, lines
    assert lines[0].startswith("error: ") and "stopped by the launcher: another rank ended" in lines[0]


def test_distributed_flag_without_torchrun_is_one_line(tiny, tmp_path, monkeypatch, capsys):
    for name in distributed.ENV:
        monkeypatch.delenv(name, raising=False)
    code, _, err = run(monkeypatch, capsys, "quantize", tiny, "--out", tmp_path / "q", "--distributed")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1, err
    assert lines[0].startswith("error: --distributed: RANK, WORLD_SIZE") and "torchrun" in lines[0]
    assert not (tmp_path / "q").exists()


def test_one_rank_keeps_every_item_whole_in_order():
    pieces = [[5], [1, 7, 7, 7], [40], [0, 3]]
    assert plan(pieces, 1) == [[distributed.Part(i, 0, len(p), 1, sum(p)) for i, p in enumerate(pieces)]]


@pytest.mark.parametrize("ranks", [2, 3, 8])
def test_plan_covers_every_piece_once_and_balances(ranks):
    rng = random.Random(ranks)
    pieces = [[rng.randint(0, 50)] + [rng.randint(20, 30)] * rng.choice([0, 8, 64]) for _ in range(30)]
    parts = plan(pieces, ranks)
    assert plan(pieces, ranks) == parts  # the same on every rank
    covered = sorted((p.index, lo) for rank in parts for p in rank for lo in range(p.lo, p.hi))
    assert covered == [(i, j) for i, item in enumerate(pieces) for j in range(len(item))]
    total = sum(map(sum, pieces))
    largest = max(p.weight for rank in parts for p in rank)
    assert max(sum(p.weight for p in rank) for rank in parts) <= total / ranks + largest
    assert largest <= total / (8 * ranks) + max(map(max, pieces))  # big items were cut


@pytest.mark.parametrize("n, size", [(8, 2), (7, 3), (2, 2)])
def test_share_splits_sequences_among_ranks(monkeypatch, n, size):
    shares = []
    for rank in range(size):
        monkeypatch.setattr(distributed, "_world", World(rank, size, rank))
        shares.append(range(n)[share(n)])
    assert [i for s in shares for i in s] == list(range(n))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_one_process_collectives_do_nothing():
    import torch

    t = torch.ones(3)
    distributed.all_reduce([t])
    distributed.barrier("nothing to wait for")
    assert torch.equal(t, torch.ones(3)) and distributed.world() == World()


@pytest.mark.parametrize("target, mix", [("local", ()), ("model", ("--target-bits", "4.3"))])
def test_tuning_on_two_ranks_takes_the_same_steps_on_every_rank(tiny, tmp_path, target, mix):
    """Each rank tunes on its share of the sequences with the gradients and held-out losses summed over both;
    after each layer the ranks compare hashes of what they keep (a difference is an error); with either target
    (``model``: each rank also carries the unquantized model's states for its share), and with --target-bits
    (the mix chosen on both ranks from a first pass's statistics before the tuned pass)."""
    done = _torchrun("quantize", tiny, "--out", tmp_path / "q", *QUANTIZE, "--method", "tune",
                     "--calib-data", tiny.parent / "calib.txt", "--calib-tokens", "512", "--calib-seq-len", "64",
                     "--tune-steps", "3", "--tune-target", target, *mix, verbose=True)
    assert done.returncode == 0, done.stderr
    assert ("--target-bits 4.3: routed experts per MoE layer" in done.stdout) == bool(mix)
    tuned = re.findall(r"layer (\d+): what it keeps hashes to \w+", done.stderr)
    assert tuned == ["1", "2"]  # the MoE layers (layer 0 is wint8 only: nothing to tune); compared on both ranks
    assert re.search(r"model tuning: held-out KL \S+ -> \S+ \((tuned|start) kept\)", done.stderr)  # summed over ranks
    assert "the model: what it keeps hashes to" in done.stderr  # and compared
    assert not (tmp_path / ".q.ernieq-tuned").exists()
    assert api.evaluate(tmp_path / "q", str(tiny.parent / "calib.txt"), seq_len=64, max_windows=1,
                        progress=False).ppl > 0
