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
SUMMARY_BEGIN, SUMMARY_END = "<!-- peers-summary:begin -->", "<!-- peers-summary:end -->"
BASELINE = "unquantized"
# the README's short table: setting -> (command, method), in this order
SUMMARY = {
    "unquantized": ("demo MoE, unquantized", "-"),
    "ernieq-w4-rtn": ("`--bits 4`", "RTN"),
    "ernieq-w4-awq": ("`--bits 4`", "AWQ"),
    "ernieq-w4-gptq": ("`--bits 4`", "GPTQ"),
    "ernieq-w4-gptq-rot": ("`--bits 4`", "GPTQ + rotations (default)"),
    "ernieq-w4-gptq-rot-seq": ("`--bits 4 --sequential`", "GPTQ + rotations, sequential"),
    "ernieq-w4-gptq-rot-f32": ("`--bits 4`, float32 scales", "GPTQ + rotations"),
    "ernieq-w4-gptq-rot-g128": ("`--bits 4 --group-size 128`", "GPTQ + rotations"),
    "hqq-w4-g64": ("`--bits 4`'s tensors, HQQ 4-bit g64 (peer)", "HQQ"),
    "llmcompressor-w4a16": ("`--bits 4`'s tensors, llm-compressor W4A16 g64 (peer)", "GPTQ"),
    "autoround-w4-g64": ("`--bits 4`'s tensors, AutoRound 4-bit g64 (peer)", "SignRound"),
    "autoround-w4-g64-i20": ("`--bits 4`'s tensors, AutoRound 4-bit g64, 20 steps (peer)", "SignRound"),
    "ernieq-w2-rtn": ("`--bits 2`", "RTN"),
    "ernieq-w2-awq": ("`--bits 2`", "AWQ"),
    "ernieq-w2-gptq": ("`--bits 2`", "GPTQ (FastDeploy-exportable)"),
    "ernieq-w2-gptq-rot": ("`--bits 2`", "GPTQ + rotations (default)"),
    "ernieq-w2-gptq-rot-seq": ("`--bits 2 --sequential`", "GPTQ + rotations, sequential"),
    "gptq-int2-g64": ("`--bits 2`'s ccq2 tensors on a plain 2-bit g64 grid, 2.5 bits (peer baseline)", "GPTQ"),
    "hqq-w2-g64": ("`--bits 2`'s ccq2 tensors, HQQ 2-bit g64 (peer)", "HQQ"),
    "autoround-w2-g64": ("`--bits 2`'s ccq2 tensors, AutoRound 2-bit g64 (peer)", "SignRound"),
    "autoround-w2-g64-i20": ("`--bits 2`'s ccq2 tensors, AutoRound 2-bit g64, 20 steps (peer)", "SignRound"),
    "ernieq-w2-experts-at-w4": ("`--bits 2` with those experts at wint4 g128 instead (a bound check)", "GPTQ + rotations"),
}


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


def summary_table(merged: dict) -> str:
    """The README's short table: the ``SUMMARY`` settings measured, with bits, perplexity and the change."""
    rows = {r["setting"]: r for r in merged["rows"]}
    base = rows.get(BASELINE)
    lines = ["| setting | method | bits per quantized weight | perplexity | vs unquantized |", "|---|---|---|---|---|"]
    for name, (command, method) in SUMMARY.items():
        r = rows.get(name)
        if r is None:
            continue
        change = f"{(r['ppl'] / base['ppl'] - 1) * 100:+.1f} %" if base and _comparable(r, base) and r is not base else ""
        lines.append(f"| {command} | {method} | {r['bits_per_weight']:.3f} | {r['ppl']:,.3f} | {change} |")
    return "\n".join(lines)


def write_markdown(path: Path, merged: dict, summary: bool = False) -> None:
    """Replace the text between the peers markers in ``path`` (the full table; with ``summary`` the
    short one between the summary markers). The full table is appended with markers when absent."""
    begin, end = (SUMMARY_BEGIN, SUMMARY_END) if summary else (BEGIN, END)
    text = path.read_text() if path.exists() else ""
    body = f"{begin}\n{summary_table(merged) if summary else table(merged)}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + body + tail
    elif begin in text or end in text or summary:
        raise ReportError(f"{path}: needs both markers {begin} / {end}")
    else:
        text = text.rstrip("\n") + "\n\n## ernieq beside its peers\n\n" + body + "\n"
    path.write_text(text)
