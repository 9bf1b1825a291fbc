"""ernieq beside its peers (HQQ, a plain 2-bit GPTQ grid, ...) on one model and one text, in one run.

    python benchmarks/peers.py --data ../shared/data/wikitext-2-raw/wiki.test.raw --max-windows 12 \
        --settings unquantized,hqq-w4-g64,hqq-w2-g64,gptq-int2-g64 --out benchmarks/results/peers.json --markdown

Each setting (``benchmarks/peer_settings.py``) runs in its own child process: build
the checkpoint, then evaluate perplexity (GPTQ/AWQ protocol: non-overlapping windows,
``api.evaluate``). The parent times the child (wall seconds, process start to exit)
and reads its peak resident set size from ``os.wait4`` (the child's own ``ru_maxrss``,
so each row's memory is that setting's alone). Settings that need calibration share
one pass over the calibration split of ``--calib-data`` (default ``demo``; never the
evaluation text), run once in its own child and saved, or reused from ``--calib DIR``.
Rows merge into ``--out`` by setting name, so a later run of some settings updates
those rows and keeps the others; every row names the run (date, commit, command) it
came from. ``--markdown`` rewrites the marked section of ``benchmarks/BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from peer_settings import SETTINGS, Context
from peers_report import merge_rows, write_markdown

from ernieq.provenance import git_commit, machine

log = logging.getLogger("peers")
HERE = Path(__file__).resolve().parent
BENCHMARKS_MD = HERE / "BENCHMARKS.md"
README_MD = HERE.parent / "README.md"
CALIBRATION = "calibration"  # the pseudo-setting of the shared calibration pass


class PeersError(RuntimeError):
    """A setting's child process failed, or the arguments name something unknown."""


def run_child(argv: list[str]) -> tuple[float, int, int]:
    """Run the command ``argv`` and wait for it. Returns (wall seconds, exit status, peak RSS bytes)."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # already reaped: keep Popen from waiting again
    return time.perf_counter() - start, proc.returncode, usage.ru_maxrss * 1024  # ru_maxrss: KiB on Linux


# ---- the child: one setting, or the calibration pass ------------------------------------


def child_setting(a: argparse.Namespace) -> dict:
    """Build setting ``a.child`` and evaluate it; returns the row (without wall time and RSS)."""
    from ernieq import api

    setting = SETTINGS[a.child]
    ctx = Context(api.resolve_model(a.model), Path(a.work), a.calib, a.calib_data, a.calib_tokens, a.calib_seq_len)
    built = setting.build(ctx)
    r = api.evaluate(built.model, a.data, seq_len=a.seq_len, max_windows=a.max_windows, progress=False)
    return {"setting": setting.name, "method": setting.method, "quantized": built.quantized,
            "bits_per_weight": built.bits_per_weight, "bits_by_codec": built.by_codec, "ppl": r.ppl,
            "tokens": r.tokens, "windows": r.windows, "seq_len": r.seq_len, "data": Path(a.data).name,
            "model": str(a.model), "quantize_seconds": built.quantize_seconds, "eval_seconds": r.seconds}


def child_calibration(a: argparse.Namespace) -> dict:
    from ernieq import api

    cset = api.calibrate(a.model, a.calib_data, tokens=a.calib_tokens, seq_len=a.calib_seq_len, out=a.calib,
                         progress=False)
    return {"setting": CALIBRATION, "data": a.calib_data, "tokens": a.calib_tokens, "seq_len": a.calib_seq_len,
            "info": {k: v for k, v in cset.info.items() if isinstance(v, (int, float, str, bool))}}


# ---- the parent ---------------------------------------------------------------------------


def _common_args(a: argparse.Namespace, work: Path) -> list[str]:
    out = ["--model", a.model, "--data", str(a.data), "--seq-len", str(a.seq_len), "--work", str(work),
           "--calib-data", a.calib_data, "--calib-tokens", str(a.calib_tokens), "--calib-seq-len", str(a.calib_seq_len)]
    if a.max_windows is not None:
        out += ["--max-windows", str(a.max_windows)]
    if a.calib is not None:
        out += ["--calib", str(a.calib)]
    return out


def _measure(child: str, a: argparse.Namespace, work: Path) -> dict:
    result = work / f"{child}.json"
    setting = SETTINGS.get(child)
    if setting is not None and setting.external is not None:
        argv = setting.external(a, result)
    else:
        argv = [sys.executable, str(Path(__file__).resolve()), "--child", child, "--result", str(result),
                *_common_args(a, work)]
    wall, code, rss = run_child(argv)
    if code != 0 or not result.exists():
        raise PeersError(f"setting {child}: child process exited with status {code} (its log is above)")
    row = json.loads(result.read_text())
    if setting is not None:  # what an external child does not know
        row = {"setting": child, "method": setting.method, "data": Path(a.data).name, "model": str(a.model), **row}
    row.update(wall_seconds=wall, peak_rss_bytes=rss)
    print(json.dumps(row), flush=True)
    return row


def run(a: argparse.Namespace, publish=None) -> dict:
    """Run the settings named in ``a.settings``; returns {"run": ..., "rows": [...], "calibration": ...}.
    publish(result so far) is called after each setting, so a long run keeps what it finished."""
    names = [n for n in a.settings.split(",") if n]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        raise PeersError(f"unknown setting(s) {unknown}; known: {', '.join(SETTINGS)}")
    missing = {n: SETTINGS[n].missing() for n in names if SETTINGS[n].missing()}
    if missing:
        raise PeersError(f"settings need uninstalled module(s): {missing} (benchmark-only: pip install them)")
    run_info = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": git_commit(short=True),
                "machine": machine(),
                "load_before": os.getloadavg()[0],
                "command": "python benchmarks/peers.py " + " ".join(shlex.quote(x) for x in sys.argv[1:]),
                "calib_reused": None if a.calib is None else str(a.calib)}
    calibration = None
    rows = []
    with tempfile.TemporaryDirectory(prefix="peers-") as tmp:
        work = Path(tmp)
        if any(SETTINGS[n].needs_calib for n in names) and not (a.calib is not None and a.calib.exists()):
            a.calib = a.calib or work / "calib"  # a named folder that does not exist yet is kept for reuse
            run_info["calib_reused"] = None
            calibration = _measure(CALIBRATION, a, work)
        for name in names:
            rows.append(_measure(name, a, work))
            shutil.rmtree(work / name, ignore_errors=True)  # its checkpoint: the disk holds one at a time
            run_info["load_after"] = os.getloadavg()[0]
            if publish is not None:
                publish({"run": run_info, "rows": rows, "calibration": calibration})
    return {"run": run_info, "rows": rows, "calibration": calibration}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo", help="A checkpoint folder or 'demo'.")
    p.add_argument("--data", required=True, help="Evaluation text (e.g. the WikiText-2 raw test file).")
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--settings", default="unquantized,hqq-w4-g64,hqq-w2-g64,gptq-int2-g64",
                   help=f"Comma-separated, from: {', '.join(SETTINGS)}. Empty: only rewrite --markdown from --out.")
    p.add_argument("--calib", type=Path, default=None,
                   help="Saved statistics (ernieq calibrate --out DIR) to reuse; if DIR does not exist, the "
                        "calibration pass writes it there and keeps it.")
    p.add_argument("--calib-data", default="demo", help="Calibration text source (its calib split).")
    p.add_argument("--calib-tokens", type=int, default=64 * 512)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--out", type=Path, default=None, help="Merge the rows into this JSON file.")
    p.add_argument("--markdown", nargs="?", const=BENCHMARKS_MD, default=None, type=Path,
                   help=f"Rewrite the peers section of this file (default {BENCHMARKS_MD.name}) from --out.")
    p.add_argument("--readme", nargs="?", const=README_MD, default=None, type=Path,
                   help=f"Rewrite the short table of this file (default {README_MD.name}) from --out.")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict | None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    a = parse_args(argv)
    if a.child is not None:
        row = child_calibration(a) if a.child == CALIBRATION else child_setting(a)
        a.result.write_text(json.dumps(row, indent=2) + "\n")
        return None
    wanted = a.markdown is not None or a.readme is not None
    if wanted and a.out is None:
        raise PeersError("--markdown/--readme write tables from the merged --out file: give --out too")

    def rewrite(merged: dict) -> None:
        if a.markdown is not None:
            write_markdown(a.markdown, merged)
        if a.readme is not None:
            write_markdown(a.readme, merged, summary=True)

    if not a.settings:
        if not wanted or not a.out.exists():
            raise PeersError("--settings '' only rewrites the tables: give --markdown or --readme and an existing --out")
        rewrite(json.loads(a.out.read_text()))
        return None

    def publish(result: dict) -> None:
        rewrite(merge_rows(a.out, result))

    return run(a, publish if a.out is not None else None)


if __name__ == "__main__":
    try:
        main()
    except PeersError as err:
        log.error("%s", err)
        sys.exit(1)
