"""Calibration statistics on disk: ``DIR/stats.safetensors`` + ``DIR/summary.json``.

``stats.safetensors`` holds three tensors per site, ``{site}::hessian`` float32
[K, K], ``{site}::abs_mean`` and ``{site}::abs_max`` float32 [K]; its metadata
carries a run id. ``summary.json`` is :meth:`CalibrationSet.summary` (routes,
expert table, routers, token counts per site) plus the same run id.

Writes are resume-safe: the old summary is removed first, each file is written
under a temporary name and renamed into place, the summary last. A folder whose
summary is missing, or whose two files carry different run ids, is an
interrupted write and is refused by :func:`load_stats`.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ernieq.calibration.accumulate import RouterStats, SiteStats
from ernieq.calibration.calibset import SUMMARY_VERSION, CalibrationSet, ExpertRow
from ernieq.errors import ErnieqError

TENSORS_NAME = "stats.safetensors"
SUMMARY_NAME = "summary.json"
FIELDS = ("hessian", "abs_mean", "abs_max")


class StatsError(ErnieqError, ValueError):
    """Calibration statistics that cannot be read: the message names the file."""


def save_stats(cset: CalibrationSet, out_dir: str | os.PathLike) -> Path:
    """Write ``cset`` into ``out_dir`` (created if needed). Returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run_id = uuid.uuid4().hex
    (out / SUMMARY_NAME).unlink(missing_ok=True)  # from here on the folder reads as unfinished
    tensors = {
        f"{site}::{name}": getattr(s, attr).contiguous()
        for site, s in cset.sites.items()
        for name, attr in zip(FIELDS, ("hessian", "abs_mean", "abs_max"))
    }
    tmp = out / f".{TENSORS_NAME}.tmp"
    save_file(tensors, tmp, metadata={"run_id": run_id, "format": "ernieq-calibration"})
    os.replace(tmp, out / TENSORS_NAME)
    summary = {**cset.summary(), "run_id": run_id}
    tmp = out / f".{SUMMARY_NAME}.tmp"
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out / SUMMARY_NAME)
    return out


def load_stats(path: str | os.PathLike) -> CalibrationSet:
    """The :class:`CalibrationSet` saved in folder ``path`` by :func:`save_stats`."""
    folder = Path(path)
    summary_path, tensors_path = folder / SUMMARY_NAME, folder / TENSORS_NAME
    if not summary_path.exists():
        raise StatsError(f"{summary_path}: missing (not a calibration folder, or an interrupted write)")
    try:
        summary = json.loads(summary_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StatsError(f"{summary_path}: not valid JSON ({err})") from None
    if not isinstance(summary, dict):
        raise StatsError(f"{summary_path}: expected a JSON object, got {type(summary).__name__}")
    if summary.get("version") != SUMMARY_VERSION:
        raise StatsError(f"{summary_path}: version {summary.get('version')!r}, ernieq reads {SUMMARY_VERSION}")
    if not tensors_path.exists():
        raise StatsError(f"{tensors_path}: missing")
    sites = {}
    try:
        with safe_open(tensors_path, framework="pt") as f:
            run_id = (f.metadata() or {}).get("run_id")
            if run_id != summary.get("run_id"):
                raise StatsError(f"{folder}: {TENSORS_NAME} and {SUMMARY_NAME} come from different runs")
            keys = set(f.keys())
            for site, meta in summary.get("sites", {}).items():
                names = [f"{site}::{field}" for field in FIELDS]
                missing = [n for n in names if n not in keys]
                if missing:
                    raise StatsError(f"{tensors_path}: no tensor {missing[0]!r}")
                hessian, abs_mean, abs_max = (f.get_tensor(n) for n in names)
                sites[site] = SiteStats(hessian, abs_mean, abs_max, int(meta["tokens"]))
    except SafetensorError as err:
        raise StatsError(f"{tensors_path}: {err}") from None
    try:
        return _from_summary(summary, sites)
    except (KeyError, TypeError, ValueError) as err:
        raise StatsError(f"{summary_path}: malformed summary ({type(err).__name__}: {err})") from None


def _from_summary(summary: dict, sites: dict) -> CalibrationSet:
    return CalibrationSet(
        sites=sites,
        routes=dict(summary["routes"]),
        all_token_routes=dict(summary["all_token_routes"]),
        expert_of={name: tuple(key) for name, key in summary["expert_of"].items()},
        experts=[ExpertRow(**row) for row in summary["experts"]],
        routers={int(layer): RouterStats.from_json(s) for layer, s in summary["routers"].items()},
        info=dict(summary["info"]),
        cold_share=float(summary["cold_share"]),
        cold_min_tokens=int(summary["cold_min_tokens"]),
    )
