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


def test_generate_streams_each_token_before_the_next_is_computed(demo_routed_dir, monkeypatch, capsys):
    from ernieq import api
    from tests.test_cli import run

    forwards = []
    real_load = api.load

    def counting_load(model, **placement):
        net, tokenizer = real_load(model, **placement)
        net.register_forward_pre_hook(lambda *_: forwards.append(1))
        return net, tokenizer

    monkeypatch.setattr(api, "load", counting_load)
    prompt, pieces = "The capital of France is", []
    text = api.generate(demo_routed_dir, prompt, max_new_tokens=6, on_token=lambda t: pieces.append((t, len(forwards))))
    assert len(forwards) == 6 and pieces[0][1] == 1  # the first token's text came before the second forward
    calls = [n for _, n in pieces]
    assert calls == sorted(set(calls)) and len(calls) >= 3  # one piece per token (a partial character may wait)
    streamed = "".join(t for t, _ in pieces)
    assert streamed and text.endswith(streamed)
    code, out, err = run(monkeypatch, capsys, "generate", demo_routed_dir, "--prompt", prompt, "--max-new-tokens", 6)
    assert code == 0, err
    assert out == prompt + streamed + "\n"
