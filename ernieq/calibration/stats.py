"""Calibration statistics on disk: ``DIR/stats-NNNNN.safetensors`` files + ``DIR/summary.json``.

Each ``stats-NNNNN.safetensors`` holds three tensors per site of one decoder
layer (``site_store.py``): ``{site}::hessian`` float32 [K, K], ``{site}::abs_mean``
and ``{site}::abs_max`` float32 [K]; its metadata carries the run id. The
calibration pass writes one such file per layer as it goes
(``collect_stats(out=DIR)``), so its memory follows one layer. ``summary.json``
is :meth:`CalibrationSet.summary` (routes, expert table, routers, token counts
and K per site) plus the run id and which file holds each site; it is written
last. Folders written before this layout, with one ``stats.safetensors`` and no
file table, are read as well.

Writes are resume-safe: the old summary is removed first, each file is written
under a temporary name and renamed into place, the summary last. A folder whose
summary is missing, or whose files carry another run id than its summary, is
an interrupted write and is refused by :func:`load_stats`. Loading reads the
headers only; each site's tensors are read when quantization asks for them.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from ernieq.calibration.accumulate import RouterStats
from ernieq.calibration.calibset import SUMMARY_VERSION, CalibrationSet, ExpertRow
from ernieq.calibration.site_store import FILE_GLOB, LazySiteStats, SiteStore, StatsError
from ernieq.model.checkpoint import CheckpointError, read_json

TENSORS_NAME = "stats.safetensors"  # the single file of the first layout (read only)
SUMMARY_NAME = "summary.json"

__all__ = ["SUMMARY_NAME", "StatsError", "begin_stats", "from_summary", "load_stats", "save_stats"]


def begin_stats(out_dir: str | os.PathLike) -> SiteStore:
    """An empty :class:`SiteStore` writing into ``out_dir`` (created) under a new run id.

    The folder's old summary and statistics files are removed first: from here on it
    reads as unfinished until :func:`save_stats` writes the summary.
    """
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / SUMMARY_NAME).unlink(missing_ok=True)
        for old in [out / TENSORS_NAME, *out.glob(FILE_GLOB), *out.glob(".stats-*.tmp")]:
            old.unlink(missing_ok=True)
    except OSError as err:
        raise StatsError(f"{out}: cannot prepare the statistics folder ({err.strerror or err})") from None
    return SiteStore(out, uuid.uuid4().hex)


def save_stats(cset: CalibrationSet, out_dir: str | os.PathLike) -> Path:
    """Write ``cset`` into ``out_dir`` (created if needed). Returns the folder.

    When ``cset``'s sites were streamed into ``out_dir`` already (``collect_stats(out=...)``),
    only what is pending and the summary are written.
    """
    out = Path(out_dir)
    store = cset.sites
    if not (isinstance(store, SiteStore) and _same_folder(store.folder, out)):
        store = begin_stats(out)
        by_file: dict[str | None, list[str]] = {}  # one file per source file; one for an in-memory set
        for site in sorted(cset.sites):
            by_file.setdefault(getattr(cset.sites[site], "file", None), []).append(site)
        for sites in by_file.values():
            for site in sites:
                s = cset.sites[site]
                store[site] = s.load() if isinstance(s, LazySiteStats) else s
            store.flush()
    store.flush()
    summary = summary_of(cset, store)
    tmp = out / f".{SUMMARY_NAME}.tmp"
    try:
        tmp.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, out / SUMMARY_NAME)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise StatsError(f"{out / SUMMARY_NAME}: cannot write ({err.strerror or err})") from None
    return out


def summary_of(cset: CalibrationSet, store: SiteStore) -> dict:
    """What summary.json holds for ``cset``, whose written sites are in ``store``."""
    return {**cset.summary(), "run_id": store.run_id, "files": store.file_of()}


def _same_folder(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def load_stats(path: str | os.PathLike) -> CalibrationSet:
    """The :class:`CalibrationSet` saved in folder ``path``; its site tensors are read lazily."""
    folder = Path(path)
    summary_path = folder / SUMMARY_NAME
    if not summary_path.is_file():
        raise StatsError(f"{summary_path}: missing (not a calibration folder, or an interrupted write)")
    try:
        summary = read_json(summary_path)  # a JSON object, or one line naming the file
    except CheckpointError as err:
        raise StatsError(str(err)) from None
    return from_summary(folder, summary, summary_path)


def from_summary(folder: Path, summary: dict, where: Path) -> CalibrationSet:
    """The :class:`CalibrationSet` of ``folder`` that ``summary`` describes (``where``: the file it came from,
    for messages), its files checked and no tensor read; sites added later go to the next file (a pass
    that resumes, ``resume.py``)."""
    if summary.get("version") != SUMMARY_VERSION:
        raise StatsError(f"{where}: version {summary.get('version')!r}, ernieq reads {SUMMARY_VERSION}")
    _check_summary(summary, where)
    sites = summary["sites"]
    files = summary.get("files", {site: TENSORS_NAME for site in sites})  # the first layout: one file
    missing = sorted(set(sites) - set(files))
    if missing:
        raise StatsError(f"{where}: no file listed for site {missing[0]!r}")
    store = SiteStore(folder, summary["run_id"])
    for name in sorted(set(files.values())):
        if not (folder / name).is_file():
            raise StatsError(f"{folder / name}: missing (an interrupted write?)")
        store.add_file(name, {site: sites[site] for site, f in files.items() if f == name and site in sites})
    try:
        return _from_summary(summary, store)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise StatsError(f"{where}: malformed summary ({type(err).__name__}: {err})") from None


def _check_summary(summary: dict, where: Path) -> None:
    """The types every field of summary.json must have, checked before anything is built from it."""

    def fail(field: str, want: str):
        raise StatsError(f"{where}: field {field!r} must be {want}")

    def is_int(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    def is_num(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    def str_map(field: str, optional: bool = False) -> None:
        value = summary.get(field)
        if optional and value is None:
            return
        if not (isinstance(value, dict) and all(isinstance(v, str) for v in value.values())):
            fail(field, "an object of strings")

    if not isinstance(summary.get("run_id"), str):
        fail("run_id", "a string")
    sites = summary.get("sites")
    if not (isinstance(sites, dict) and all(isinstance(m, dict) and is_int(m.get("tokens")) and m["tokens"] >= 0
                                            and is_int(m.get("k")) and m["k"] > 0 for m in sites.values())):
        fail("sites", "an object of {tokens: int >= 0, k: int > 0}")
    str_map("routes")
    str_map("all_token_routes")
    str_map("files", optional=True)
    if any(Path(f).name != f for f in (summary.get("files") or {}).values()):
        fail("files", "file names inside the folder")
    expert_of = summary.get("expert_of")
    if not (isinstance(expert_of, dict) and all(isinstance(k, list) and len(k) == 2 and all(map(is_int, k))
                                                for k in expert_of.values())):
        fail("expert_of", "an object of [layer, expert] pairs")
    experts = summary.get("experts")
    row_fields = {"layer": is_int, "expert": is_int, "tokens": is_int, "share": is_num, "load_share": is_num,
                  "mean_prob": is_num}
    if not (isinstance(experts, list) and all(isinstance(r, dict) and set(r) == set(row_fields)
                                              and all(ok(r[f]) for f, ok in row_fields.items()) for r in experts)):
        fail("experts", f"a list of {{{', '.join(row_fields)}}} rows")
    routers = summary.get("routers")
    if not (isinstance(routers, dict) and all(isinstance(r, dict) for r in routers.values())):
        fail("routers", "an object of router statistics")
    if not isinstance(summary.get("info"), dict):
        fail("info", "an object")
    if not is_num(summary.get("cold_share")) or not is_int(summary.get("cold_min_tokens")):
        fail("cold_share/cold_min_tokens", "numbers")


def _from_summary(summary: dict, sites: SiteStore) -> CalibrationSet:
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
