"""Progress that survives a pipe: plain lines at a steady interval when stderr is not a terminal."""

from __future__ import annotations

import io
import time

from ernieq import progress


def test_plain_progress_writes_lines_while_it_runs_and_when_it_ends():
    stream = io.StringIO()
    with progress.PlainProgress(interval=0.05, stream=stream) as bar:
        task = bar.add_task("quantizing layers.3.mlp", total=200, count="group 4/9")
        for _ in range(4):
            time.sleep(0.06)
            bar.advance(task, 50)
    lines = stream.getvalue().splitlines()
    assert len(lines) >= 3  # at least two while running, one at the end
    assert lines[-1].startswith("quantizing layers.3.mlp: 100% 200/200 group 4/9, ")
    assert "elapsed, eta" in lines[0]


def test_progress_bar_is_plain_off_a_terminal_and_silent_when_quiet(monkeypatch):
    monkeypatch.setattr("sys.stderr", io.StringIO())  # not a terminal
    assert isinstance(progress.progress_bar(True), progress.PlainProgress)
    assert not isinstance(progress.progress_bar(False), progress.PlainProgress)
    progress.set_quiet(True)
    try:
        assert not isinstance(progress.progress_bar(True), progress.PlainProgress)
    finally:
        progress.set_quiet(False)


def test_a_failed_job_ends_without_a_final_progress_line():
    stream = io.StringIO()
    try:
        with progress.PlainProgress(interval=60, stream=stream) as bar:
            bar.add_task("quantizing", total=10)
            raise RuntimeError("bad weight")
    except RuntimeError:
        pass
    assert stream.getvalue() == ""
