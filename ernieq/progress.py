"""The progress bars of long ernieq jobs, and the global ``--quiet`` switch that hides them all.

:func:`progress_bar` is the one bar of calibration and perplexity (what, bar,
done/total, elapsed, ETA). :class:`QuantizeProgress` shows two: the whole model,
counted in weights (ETA and weights per second), and the tensor group being
encoded, weight by weight (each routed expert's projections in turn).

On a terminal the bars redraw in place. When stderr is not a terminal (a pipe, a
log file, CI) a bar would draw nothing until it ends, so it writes a plain line
instead every ``PLAIN_INTERVAL_S`` seconds and when it finishes:
``quantizing layers.3.mlp: 41% 12,345,678/30,000,000, 0:01:02 elapsed, eta 0:01:29``.

:class:`TokenStream` is generation's progress: the text of each token as soon as it is produced.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

_quiet = False
PLAIN_INTERVAL_S = 10.0  # a plain progress line this often when stderr is not a terminal


def set_quiet(quiet: bool) -> None:
    """``--quiet``: no progress bar anywhere in this process, whatever a caller asks."""
    global _quiet
    _quiet = quiet


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "-:--:--"
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class PlainProgress(Progress):
    """A rich ``Progress`` that draws nothing and writes one plain line per visible task every
    ``interval`` seconds, and once more when it stops: for output that is not a terminal."""

    def __init__(self, *columns: ProgressColumn, interval: float | None = None, stream=None):
        super().__init__(*columns, disable=True)  # the tasks are tracked; the live display is off
        self.interval = interval or PLAIN_INTERVAL_S
        self.stream = stream or sys.stderr
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def lines(self) -> list[str]:
        """One line per visible task: description, percent, done/total, elapsed, eta (and fields)."""
        out = []
        for task in self.tasks:
            if not task.visible or not task.description.strip():
                continue
            pct = f"{task.percentage:.0f}% " if task.total else ""
            total = f"/{task.total:,.0f}" if task.total is not None else ""
            extra = " ".join(str(v) for k, v in task.fields.items() if k == "count" and v)
            eta = _clock(task.time_remaining) if task.total else "-"
            out.append(f"{task.description.strip()}: {pct}{task.completed:,.0f}{total}{' ' + extra if extra else ''}, "
                       f"{_clock(task.elapsed)} elapsed, eta {eta}")
        return out

    def _write(self) -> None:
        for line in self.lines():
            print(line, file=self.stream, flush=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._write()

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="plain-progress", daemon=True)
        self._thread.start()

    def stop(self, finished: bool = True) -> None:
        """Stop the timer; one last line per task when the job ``finished`` (not when it failed)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            if finished:
                self._write()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop(finished=exc_type is None)


def progress_bar(enabled: bool = True, *counts: ProgressColumn) -> Progress:
    """A transient rich progress bar; ``enabled`` False (or ``--quiet``) shows nothing.
    ``counts``: the columns after the bar (default: done / total). Plain lines instead
    when stderr is not a terminal (:class:`PlainProgress`)."""
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), *(counts or (MofNCompleteColumn(),)),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
    if enabled and not _quiet and not sys.stderr.isatty():
        return PlainProgress(*columns)
    return Progress(*columns, disable=_quiet or not enabled, transient=True)


class WeightRateColumn(ProgressColumn):
    """Weights per second of a task counted in weights (blank for other tasks)."""

    def render(self, task) -> Text:
        if not task.fields.get("rate") or task.speed is None:
            return Text("")
        return Text(f"{task.speed / 1e6:.2f} M weights/s")


class QuantizeProgress:
    """Two bars: the model in weights (ETA, weights/s) and the current group weight by weight.

    ``total_weights``: every weight the run will encode or copy. A group found
    finished by a resumed run leaves the total instead of completing at once, so
    the rate and ETA count only this run's work.
    """

    def __init__(self, enabled: bool, total_weights: int, num_groups: int):
        self.num_groups = num_groups
        self.bar = progress_bar(enabled, TextColumn("{task.fields[count]}"), WeightRateColumn())
        self.model = self.bar.add_task("quantizing", total=total_weights, count="", rate=True)
        self.group = self.bar.add_task("", total=1, count="", rate=False, visible=False)
        self._group_total = 0
        self._group_done = 0

    def __enter__(self) -> QuantizeProgress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def skip_group(self, index: int, weights: int) -> None:
        """Group ``index`` was finished by an earlier run: its ``weights`` leave the total."""
        total = self.bar.tasks[self.model].total
        self.bar.update(self.model, total=total - weights, count=f"group {index + 1}/{self.num_groups}")

    def start_group(self, index: int, key: str, items: int) -> None:
        """Group ``index`` (``key``) starts; ``items`` weights will be encoded one by one."""
        self._group_total, self._group_done = items, 0
        self.bar.update(self.model, description=f"quantizing {key}", count=f"group {index + 1}/{self.num_groups}")
        self.bar.reset(self.group, total=max(items, 1), description=f"  {key}", count=f"0/{items}", visible=items > 0)

    def weights_done(self, weights: int, name: str | None = None) -> None:
        """``weights`` more weights of the model are done; ``name`` is an encoded weight of the group."""
        self.bar.advance(self.model, weights)
        if name is not None:
            self._group_done += 1
            label = name.split(".experts.", 1)[-1].removesuffix(".weight") if ".experts." in name else ""
            label = f"expert {label}" if label else name.rsplit(".", 2)[-2]
            self.bar.update(self.group, advance=1, count=f"{self._group_done}/{self._group_total} {label}")


class TokenStream:
    """A transformers streamer (``generate(streamer=...)`` puts the prompt's ids, then each new token's,
    then calls ``end``) that hands ``emit`` the text of every new token as soon as it is produced.

    transformers' ``TextStreamer`` holds text back to the last space, so a word shows only once the next
    token is computed; here only a partial UTF-8 character (decoded as U+FFFD) waits for the next token.
    """

    def __init__(self, tokenizer, emit: Callable[[str], None]):
        self.tokenizer, self.emit = tokenizer, emit
        self.ids: list[int] = []
        self.shown = 0  # characters of the decoded new text already emitted
        self.prompt = True  # the first put is the prompt

    def _flush(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if len(text) > self.shown and (final or not text.endswith("\ufffd")):
            self.emit(text[self.shown:])
            self.shown = len(text)

    def put(self, value) -> None:
        if self.prompt:
            self.prompt = False
            return
        self.ids.extend(value.reshape(-1).tolist())
        self._flush(final=False)

    def end(self) -> None:
        self._flush(final=True)
        self.ids, self.shown, self.prompt = [], 0, True
