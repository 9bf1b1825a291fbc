"""The results file of ``benchmarks/peers.py`` and its table in ``BENCHMARKS.md``.

``peers.json``::

    {"runs": {RUN_ID: {"date", "commit", "machine", "load_before", "load_after", "command",
                       "calibration": row of the shared calibration pass or null}},
     "rows": [{"setting", "method", "quantized", "bits_per_weight", "bits_by_codec", "ppl", "tokens",
               "windows", "seq_len", "data", "model", "quantize_seconds", "eval_seconds",
               "wall_seconds", "peak_rss_bytes", "run": RUN_ID}, ...]}

Rows are kept one per setting, in the registry's order; a new run replaces the rows
it measured and leaves the others (and the runs they came from) as they were, except
rows of settings no longer registered, which it drops.
"""

from __future__ import annotations

import json
from pathlib import Path

from peer_settings import SETTINGS

BEGIN, END = "<!-- peers:begin -->", "<!-- peers:end -->"
BASELINE = "unquantized"


class ReportError(RuntimeError):
    """A results file or markdown file that cannot be read as expected."""


def _order(name: str) -> tuple[int, str]:
    names = list(SETTINGS)
    return (names.index(name), name) if name in names else (len(names), name)


def merge_rows(path: Path, result: dict) -> dict:
    """Merge one run's ``result`` ({"run", "rows", "calibration"}) into the JSON file at ``path``; returns it."""
    merged = {"runs": {}, "rows": []}
    if path.exists():
        try:
            merged = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ReportError(f"{path}: not valid JSON ({err})") from None
    run_id = f"{result['run']['date']} {result['run']['commit']}"
    merged["runs"][run_id] = {**result["run"], "calibration": result.get("calibration")}
    fresh = {r["setting"]: {**r, "run": run_id} for r in result["rows"]}
    kept = [r for r in merged["rows"] if r["setting"] not in fresh and r["setting"] in SETTINGS]  # not retired
    rows = kept + list(fresh.values())
    merged["rows"] = sorted(rows, key=lambda r: _order(r["setting"]))
    used = {r["run"] for r in merged["rows"]}
    merged["runs"] = {k: v for k, v in merged["runs"].items() if k in used}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merged, indent=2) + "\n")
    return merged


def _comparable(a: dict, b: dict) -> bool:
    return all(a[k] == b[k] for k in ("model", "data", "tokens", "seq_len"))


def table(merged: dict) -> str:
    """The markdown section (without the markers) for the merged results."""
    rows, runs = merged["rows"], list(merged["runs"])
    base = next((r for r in rows if r["setting"] == BASELINE), None)
    first = rows[0] if rows else None
    lines = []
    if first:
        lines.append(f"Model `{first['model']}`, `{first['data']}`, {first['windows']} windows of {first['seq_len']} "
                     f"tokens ({first['tokens']:,} scored tokens); written by `benchmarks/peers.py`.\n")
    lines += ["| setting | method | what is quantized (first matching rule wins) "
              "| bits/weight (quantized classes) | bits/weight by codec | perplexity | vs unquantized "
              "| wall s (quantize / eval) | peak RSS | run |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['ppl'] / base['ppl']:.2f}x" if base and _comparable(r, base) else "n/a"
        codecs = ", ".join(f"{c} {b:.3f}" for c, b in r["bits_by_codec"].items()) or "-"
        lines.append(
            f"| {r['setting']} | {r['method']} | {r['quantized']} | {r['bits_per_weight']:.3f} | {codecs} "
            f"| {r['ppl']:,.3f} | {ratio} | {r['wall_seconds']:.0f} ({r['quantize_seconds']:.0f} / "
            f"{r['eval_seconds']:.0f}) | {r['peak_rss_bytes'] / 2**30:.2f} GiB | [{runs.index(r['run']) + 1}] |")
    lines.append("\nWall time is the setting's whole child process (start, build, evaluation); peak RSS is that "
                 "process's `ru_maxrss`. Settings with calibration reuse one saved pass (below), not counted "
                 "in their rows.\n")
    for i, (run_id, info) in enumerate(merged["runs"].items(), start=1):
        lines.append(f"- [{i}] {info['date']}, commit {info['commit']}, {info['machine']}, load average "
                     f"{info['load_before']:.1f} before / {info['load_after']:.1f} after: `{info['command']}`")
        cal = info.get("calibration")
        if cal:
            lines.append(f"  - calibration: `{cal['data']}` calib split, {cal['tokens']:,} tokens in windows of "
                         f"{cal['seq_len']}, {cal['wall_seconds']:.0f} s, peak RSS "
                         f"{cal['peak_rss_bytes'] / 2**30:.2f} GiB")
        elif info.get("calib_reused"):
            lines.append(f"  - calibration: statistics reused from `{info['calib_reused']}`")
    return "\n".join(lines)


def write_markdown(path: Path, merged: dict) -> None:
    """Replace the text between the peers markers in ``path`` (appended, with markers, when absent)."""
    text = path.read_text() if path.exists() else ""
    body = f"{BEGIN}\n{table(merged)}\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        text = head + body + tail
    elif BEGIN in text or END in text:
        raise ReportError(f"{path}: only one of the markers {BEGIN} / {END} is present")
    else:
        text = text.rstrip("\n") + "\n\n## ernieq beside its peers\n\n" + body + "\n"
    path.write_text(text)
