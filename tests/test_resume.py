"""Resume after SIGKILL, byte-identical output, the encoder pool, --quiet/--log and the quantize progress bars."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from ernieq import api, cli
from ernieq.errors import ErnieqError
from ernieq.formats.native_writer import STATE_DIR
from ernieq.progress import QuantizeProgress, WeightRateColumn
from tests.tiny import write_tiny_ernie

REPO = Path(__file__).resolve().parents[1]
ARGS = ("--bits", "2")  # wint8 attention and dense, wint4 experts of MoE layer 1, ccq2 experts of layer 2
NUM_GROUPS = 8  # embeddings, 3 x (attention, mlp), head


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    src = write_tiny_ernie(tmp_path_factory.mktemp("src") / "tiny")
    (src / "tokenizer_config.json").write_text("{}")
    return src


def _files(folder: Path) -> dict[str, bytes]:
    """Every file of a folder (hidden ones too) by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory) -> dict[str, bytes]:
    """The bytes of an uninterrupted run (one worker, in this process)."""
    out = tmp_path_factory.mktemp("ref") / "q"
    api.quantize(tiny, out, bits=2, progress=False, workers=1)
    return _files(out)


def _finished_shards(tmp: Path) -> dict[str, int]:
    """Shard name → inode of the groups a killed run finished (those with a record)."""
    import json

    state = tmp / STATE_DIR
    records = [json.loads(p.read_text()) for p in sorted(state.glob("group-*.json"))] if state.is_dir() else []
    return {r["shard"]: (tmp / r["shard"]).stat().st_ino for r in records}


def _processes_with_env(marker: str) -> list[int]:
    """Live processes whose environment holds ``marker`` (a killed run's orphaned workers would)."""
    pids = []
    for env in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker.encode() in env.read_bytes():
                pids.append(int(env.parent.name))
        except OSError:
            continue
    return pids


# point to SIGKILL at, --workers of the killed run, groups it leaves finished
KILLS = [
    ("group-written:2", 1, 2),  # between groups
    ("partial-safetensors:3", 1, 2),  # the third shard written as .partial, not yet renamed
    ("shard-written:4", 1, 3),  # the fourth shard in place, its record not yet written
    ("encode:5", 2, 2),  # mid-group, while the worker pool encodes (first weight of layers.0.mlp)
    ("index:1", 1, NUM_GROUPS),  # every group written, no index or config yet
    ("rename:1", 1, NUM_GROUPS),  # the whole checkpoint in the temporary folder, before the rename
    ("final-rename:1", 1, 0),  # resume records dropped, folder not yet renamed: the rerun starts over
]


@pytest.mark.parametrize("point, workers, kept", KILLS, ids=[k[0] for k in KILLS])
def test_killed_quantize_resumes_to_the_same_bytes(tiny, reference, tmp_path, point, workers, kept):
    out, tmp = tmp_path / "q", tmp_path / ".q.ernieq-tmp"
    marker = f"ERNIEQ_TEST_RUN={tmp_path}"
    env = {**os.environ, "ERNIEQ_TEST_KILL_AT": point, "ERNIEQ_TEST_RUN": str(tmp_path), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "ernieq.cli", "--quiet", "quantize", str(tiny), "--out", str(out), *ARGS,
           "--workers", str(workers)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not out.exists()  # nothing that looks like a checkpoint
    assert tmp.is_dir()
    finished = _finished_shards(tmp)
    assert len(finished) == kept
    deadline = time.monotonic() + 30
    while _processes_with_env(marker) and time.monotonic() < deadline:  # the workers leave with their parent
        time.sleep(0.2)
    assert _processes_with_env(marker) == []

    api.quantize(tiny, out, bits=2, progress=False, workers=1)  # the same arguments, no hook
    assert _files(out) == reference
    assert not tmp.exists()
    # finished groups were kept (renamed with the folder), not written again
    assert {name: (out / name).stat().st_ino for name in finished} == finished


def test_fingerprint_is_the_same_in_every_process(tiny):
    """A resumed run is a new process: its fingerprint must not depend on hash randomisation."""
    code = ("import json, sys, torch; from pathlib import Path; "
            "from ernieq.model.adapters import adapter_for, iter_groups; "
            "from ernieq.model.checkpoint import CheckpointReader; from ernieq.config import QuantizeOptions; from ernieq.quantize import fingerprint, recipe_for; "
            "src = Path(sys.argv[1]); r = CheckpointReader(src); g = list(iter_groups(r, adapter_for(r.config, 'c'))); "
            "print(json.dumps(fingerprint(src, recipe_for(src, QuantizeOptions(bits=2, rotate=True))[0], 'gptq', False, None, torch.device('cpu'), g)))")
    prints = {subprocess.run([sys.executable, "-c", code, str(tiny)], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": str(seed), "PYTHONPATH": str(REPO)}).stdout
              for seed in range(4)}
    assert len(prints) == 1 and "w2" in prints.pop()


def test_same_input_same_bytes_with_a_worker_pool(tiny, reference, tmp_path):
    out = tmp_path / "q"
    summary = api.quantize(tiny, out, bits=2, progress=False, workers=2)
    assert _files(out) == reference
    assert summary.seconds > 0
    assert b"seconds" not in reference["quantize_summary.json"]


def test_leftover_of_other_arguments_is_discarded(tiny, reference, tmp_path, monkeypatch, caplog):
    """An interrupted --bits 4 run leaves its groups; a --bits 2 run must not reuse them."""
    import ernieq.formats.native_writer as native_writer

    def interrupt(point: str) -> None:
        if point == "group-written" and len(list((tmp_path / ".q.ernieq-tmp" / STATE_DIR).glob("group-*"))) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(native_writer, "kill_point", interrupt)
    out = tmp_path / "q"
    with pytest.raises(KeyboardInterrupt):
        api.quantize(tiny, out, bits=4, progress=False, workers=1)
    assert len(_finished_shards(tmp_path / ".q.ernieq-tmp")) == 3  # an interrupt keeps the work done
    monkeypatch.undo()
    with caplog.at_level(logging.INFO, logger="ernieq"):
        api.quantize(tiny, out, bits=2, progress=False, workers=1)
    assert "starting over" in caplog.text
    assert _files(out) == reference


def test_failure_on_bad_input_leaves_no_temporary_folder(tiny, tmp_path):
    """A NaN in the last MoE layer fails after several groups were written: nothing is left behind."""
    import json

    import torch
    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    src.mkdir()
    for p in tiny.iterdir():
        (src / p.name).write_bytes(p.read_bytes())
    name = "model.layers.2.mlp.experts.3.up_proj.weight"
    shard = src / json.loads((src / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_file(shard)
    tensors[name][0, 0] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(ErnieqError, match=r"experts\.3\.up_proj.*(NaN|non-finite)"):
        api.quantize(src, tmp_path / "q", bits=2, progress=False, workers=1)
    assert not (tmp_path / "q").exists() and not (tmp_path / ".q.ernieq-tmp").exists()
    assert torch.isnan(tensors[name][0, 0])


def test_quiet_and_log_file(tiny, tmp_path):
    log = tmp_path / "run.log"
    result = CliRunner().invoke(cli.cli, ["--quiet", "--log", str(log), "quantize", str(tiny), "--out",
                                          str(tmp_path / "q"), "--bits", "4", "--workers", "1"])
    try:
        assert result.exit_code == 0, result.output
        text = log.read_text()
        assert "layers.2.mlp: " in text and " weights in " in text  # one timing line per group
        assert "quantizing" not in result.output  # no progress bar
    finally:
        logging.getLogger("ernieq").removeHandler(cli._file_handler)
        cli._file_handler.close()
        cli._file_handler = None
        logging.getLogger("ernieq").setLevel(logging.NOTSET)
        from ernieq.progress import set_quiet

        set_quiet(False)


def test_quantize_progress_counts_weights_and_skipped_groups():
    with QuantizeProgress(True, total_weights=1000, num_groups=3) as p:
        p.skip_group(0, 400)  # finished by an earlier run: leaves the total
        p.start_group(1, "layers.1.mlp", items=2)
        p.weights_done(100, "model.layers.1.mlp.experts.7.up_proj.weight")
        p.weights_done(50)  # a plain tensor
        model, group = p.bar.tasks
        assert (model.total, model.completed) == (600, 150)
        assert group.completed == 1 and group.fields["count"] == "1/2 expert 7.up_proj"
        assert model.fields["count"] == "group 2/3"
        assert WeightRateColumn().render(group).plain == ""  # only the model bar shows a rate
