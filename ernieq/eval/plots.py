"""The report's figures as PNG bytes (matplotlib's Agg canvas, no display, no pyplot state).

Each function takes the report dict (``report.json``'s content) and returns PNG
bytes, or None when the report holds no data for that figure.
"""

from __future__ import annotations

import base64
import io
import math

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

DPI = 110
CLASS_COLORS = {"attention": "tab:blue", "dense_mlp": "tab:green", "shared_experts": "tab:purple",
                "routed_experts": "tab:orange"}


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def _plain(axis) -> None:
    """Tick labels as plain numbers (0.01, 32), never 3.4×10¹ or an offset; minor ticks unlabelled."""
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` for an <img> that needs no file beside the HTML."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def per_layer_error(report: dict) -> bytes | None:
    """SQNR (dB) per layer and tensor class; a second panel with the relative output error when known."""
    rows = report["weight_error"]["layer_classes"]
    if not rows:
        return None
    with_output = report["weight_error"]["output_error"]
    fig = Figure(figsize=(8, 5.6 if with_output else 3.2))
    axes = fig.subplots(2 if with_output else 1, 1, sharex=True, squeeze=False)[:, 0]
    for cls in sorted({r["cls"] for r in rows}):
        pts = [r for r in rows if r["cls"] == cls and r["sqnr_db"] is not None]
        color = CLASS_COLORS.get(cls)
        axes[0].plot([r["layer"] for r in pts], [r["sqnr_db"] for r in pts], "o-", ms=3, label=cls, color=color)
        if with_output:
            out = [r for r in rows if r["cls"] == cls and r["output_rel_err"]]
            axes[1].semilogy([r["layer"] for r in out], [r["output_rel_err"] for r in out], "o-", ms=3, color=color)
    axes[0].set_ylabel("weight SQNR (dB)")
    axes[0].legend(fontsize=8)
    axes[0].grid(alpha=0.3)
    if with_output:
        axes[1].set_ylabel("relative output error (log scale)\ntr(dW H dW^T) / tr(W H W^T)")
        axes[1].grid(alpha=0.3, which="both")
        _plain(axes[1].yaxis)
    axes[-1].set_xlabel("layer")
    fig.suptitle("reconstruction error per layer")
    return _png(fig)


def _layer_expert_matrix(rows: list[dict], value: str) -> tuple[list[int], list[list[float]]]:
    """(layers, matrix [layers][experts]) of ``value`` from rows with layer and expert; gaps are NaN."""
    layers = sorted({r["layer"] for r in rows})
    experts = 1 + max(r["expert"] for r in rows)
    matrix = [[math.nan] * experts for _ in layers]
    where = {layer: i for i, layer in enumerate(layers)}
    for r in rows:
        v = r[value]
        matrix[where[r["layer"]]][r["expert"]] = math.nan if v is None else v
    return layers, matrix


def _heatmap(layers: list[int], matrix: list[list[float]], title: str, label: str, cmap: str) -> bytes:
    fig = Figure(figsize=(max(4.0, 0.45 * len(matrix[0]) + 2), max(2.5, 0.22 * len(layers) + 1.2)))
    ax = fig.subplots()
    im = ax.imshow(matrix, aspect="auto", cmap=cmap, interpolation="nearest")
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers], fontsize=7)
    ax.set_xticks(range(len(matrix[0])), [str(e) for e in range(len(matrix[0]))], fontsize=7)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label=label)
    return _png(fig)


def expert_load(report: dict) -> bytes | None:
    """Share of the layer's token-expert assignments each routed expert took in calibration."""
    calib = report.get("calibration")
    if not calib or not calib["experts"]:
        return None
    layers, matrix = _layer_expert_matrix(calib["experts"], "load_share")
    return _heatmap(layers, matrix, "expert load on the calibration text", "load share (tokens / (T A))", "viridis")


def expert_error(report: dict) -> bytes | None:
    """Weight SQNR (dB) of each routed expert (its three projections together)."""
    rows = report["weight_error"]["experts"]
    if not rows:
        return None
    layers, matrix = _layer_expert_matrix(rows, "sqnr_db")
    return _heatmap(layers, matrix, "routed-expert weight SQNR", "SQNR (dB)", "magma")


def ppl_vs_bits(report: dict) -> bytes | None:
    """Perplexity against bits per weight (linear layers) of every model in the report, one series per corpus."""
    settings = report["settings"]
    fig = Figure(figsize=(6.4, 4))
    ax = fig.subplots()
    for corpus in report["options"]["data"]:
        xs = [s["bits_per_weight"] for s in settings]
        ys = [s["ppl"][corpus] for s in settings]
        ax.plot(xs, ys, "o", label=corpus)
        for s, x, y in zip(settings, xs, ys):
            ax.annotate(s["label"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log", base=2)  # 2 .. 32 bits spread evenly; perplexity stays linear
    ax.set_xlabel("bits per weight (log scale; linear layers, every stored byte)")
    ax.set_ylabel("perplexity")
    ax.grid(alpha=0.3, which="both")
    _plain(ax.xaxis)
    _plain(ax.yaxis)
    ax.legend(fontsize=8)
    ax.set_title("perplexity against bits per weight")
    return _png(fig)


# name -> figure function; names become plots/<name>.png and the HTML's sections
PLOTS = {
    "per_layer_error": per_layer_error,
    "expert_error": expert_error,
    "expert_load": expert_load,
    "ppl_vs_bits": ppl_vs_bits,
}


def report_plots(report: dict) -> dict[str, bytes]:
    """Every figure the report has data for, as PNG bytes by name."""
    out = {}
    for name, fn in PLOTS.items():
        png = fn(report)
        if png is not None:
            out[name] = png
    return out
