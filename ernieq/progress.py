"""The progress bars of long ernieq jobs, and the global ``--quiet`` switch that hides them all.

:func:`progress_bar` is the one bar of calibration and perplexity (what, bar,
done/total, elapsed, ETA). :class:`QuantizeProgress` shows two: the whole model,
counted in weights (ETA and weights per second), and the tensor group being
encoded, weight by weight (each routed expert's projections in turn).
"""

from __future__ import annotations

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


def set_quiet(quiet: bool) -> None:
    """``--quiet``: no progress bar anywhere in this process, whatever a caller asks."""
    global _quiet
    _quiet = quiet


def progress_bar(enabled: bool = True, *counts: ProgressColumn) -> Progress:
    """A transient rich progress bar; ``enabled`` False (or ``--quiet``) shows nothing.
    ``counts``: the columns after the bar (default: done / total)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        *(counts or (MofNCompleteColumn(),)),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        disable=_quiet or not enabled,
        transient=True,
    )


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
