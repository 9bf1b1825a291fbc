"""The benchmarks' tables: header lines, rows, markdown output; the kernel table's rows (one per
(model, GEMM, codec, M)) and their derived figures.

Shape legend: M rows of x (tokens), N output features, K input features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch


def columns(bw_col: str, speedup_col: str) -> tuple[str, ...]:
    """The kernel table's column titles; the bandwidth and speed-up columns name what they compare with."""
    return ("model", "GEMM", "codec", "M", "median us", "TFLOP/s", "GB/s", bw_col, speedup_col, "max rel err", "note")


KERNEL_TEXT_COLUMNS = ("model", "GEMM", "codec", "note")  # left-aligned; the figures are right-aligned


@dataclass
class Row:
    model: str
    kind: str  # the GEMM: "attn q_proj", ..., "MoE layer"
    codec: str  # a codec, or a baseline such as "bf16 matmul"
    m: int
    ms: float | None = None  # median milliseconds
    tflops: float | None = None
    gbps: float | None = None  # bytes moved / time
    bw_pct: float | None = None  # % of the memory bandwidth measured in the same run
    speedup: float | None = None  # baseline ms / ms
    rel_err: float | None = None  # max |y - ref| / max |ref|
    note: str = ""

    @property
    def failed(self) -> bool:
        return self.note.startswith("ERROR") or "FAIL" in self.note

    def cells(self) -> list[str]:
        """The row as the table's strings (blank where a figure does not apply)."""

        err = "" if self.rel_err is None else f"{self.rel_err:.1e}"
        us = "" if self.ms is None else f"{self.ms * 1e3:.1f}"
        return [self.model, self.kind, self.codec, str(self.m), us, significant(self.tflops), significant(self.gbps),
                significant(self.bw_pct), significant(self.speedup), err, self.note]  # fmt: skip


def significant(v: float | None, digits: int = 3) -> str:
    """``v`` to ``digits`` significant digits without an exponent (0.00412, 41.2, 4120); "" for None."""
    if v is None:
        return ""
    if v == 0 or not math.isfinite(v):
        return str(v)
    decimals = digits - 1 - math.floor(math.log10(abs(v)))  # digits after the point for `digits` significant
    return f"{v:.{min(max(decimals, 0), 8)}f}"


def timed_row(model: str, kind: str, codec: str, m: int, ms: float, flops: float, nbytes: float, bandwidth_gbps: float,
              base_ms: float | None, err: float | None, note: str = "") -> Row:  # fmt: skip
    """A row from a median time: TFLOP/s = flops / s, GB/s = bytes / s, % of ``bandwidth_gbps``, base_ms / ms."""
    if not (ms > 0 and math.isfinite(ms)):
        return Row(model, kind, codec, m, note=f"ERROR: timing gave {ms} ms")
    seconds = ms * 1e-3
    gbps = nbytes / seconds / 1e9
    return Row(model, kind, codec, m, ms, flops / seconds / 1e12, gbps, 100 * gbps / bandwidth_gbps,
               None if base_ms is None else base_ms / ms, err, note)  # fmt: skip


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max |y - ref| / max |ref|, in float32."""
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()


@dataclass
class Report:
    """The header lines and rows of one run; ``write`` rewrites the markdown file (if any) after every case.
    Rows are anything with ``cells()`` (strings, one per column) and ``failed``."""

    out: Path | None = None
    header: list[str] = field(default_factory=list)
    banner: str = ""  # a warning shown above everything, in bold (the CPU run's "not kernel speed")
    rows: list = field(default_factory=list)
    columns: tuple[str, ...] = columns("% HBM", "speed-up vs bf16")
    text_columns: tuple[str, ...] = KERNEL_TEXT_COLUMNS  # left-aligned

    @property
    def failures(self) -> list:
        return [r for r in self.rows if r.failed]

    def markdown(self) -> str:
        banner = ["", f"**{self.banner}**"] if self.banner else []
        rule = "|" + "".join("---|" if c in self.text_columns else "---:|" for c in self.columns)
        titles = ["", "| " + " | ".join(self.columns) + " |", rule]
        lines = self.header[:1] + banner + self.header[1:] + titles
        lines += ["| " + " | ".join(r.cells()) + " |" for r in self.rows]
        return "\n".join(lines) + "\n"

    def write(self) -> None:
        if self.out is None:
            return
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(self.markdown())
