"""Peak memory of ``ernieq eval`` vs model depth, on synthetic checkpoints with ERNIE-4.5-21B-A3B's shapes.

    python benchmarks/stream_eval.py --layers 2 8 --out benchmarks/results/stream_eval.json

Each depth gets the synthetic checkpoint of ``benchmarks/scale.py`` (hidden 2560, 64 experts of
1536, vocabulary 103424, random bf16 weights; 8 layers are about 11 GiB on disk) with the demo
model's tokenizer copied in (its ids fit the vocabulary), and its ``--bits 2`` checkpoint made by
``ernieq quantize`` by round-to-nearest (no calibration: the weights are random, so there is no
text to calibrate on that would change what is measured). ``ernieq eval`` then scores
``--max-windows`` windows of ``--seq-len`` tokens of ``--data`` on each, as a subprocess, with the
flags given after ``--`` (default: none, i.e. ``--stream auto``); per run the script records
``ru_maxrss`` (``os.wait4``), the peak PSS of its process tree and the wall time, and the eval's own
JSON (perplexity, runtime and stream record). Checkpoints live under ``--workdir`` and are deleted
at the end unless ``--keep``; a checkpoint already complete there is reused.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from datetime import date
from pathlib import Path

import torch
from scale import ERNIE_21B, build_checkpoint, cut_config, run_measured

from ernieq.provenance import git_commit, machine

QUANTIZE = ["--bits", "2"]  # RTN: no calibration data is given
CHECKPOINTS = ("bf16", "--bits 2")


def with_tokenizer(ckpt: Path) -> Path:
    """``ckpt`` with the demo model's tokenizer files (the synthetic checkpoint has none)."""
    from ernieq.api import TOKENIZER_FILES, resolve_model

    demo = resolve_model("demo")
    for name in TOKENIZER_FILES:
        if (demo / name).is_file():
            shutil.copy(demo / name, ckpt / name)
    return ckpt


def quantized(ckpt: Path, out: Path) -> Path:
    """The ``--bits 2`` checkpoint of ``ckpt`` at ``out`` (quantize writes OUT only when complete: reused)."""
    if not out.exists():
        cmd = [sys.executable, "-m", "ernieq.cli", "--quiet", "quantize", str(ckpt), "--out", str(out), *QUANTIZE]
        row = run_measured(cmd)
        print(f"  quantized {out.name} in {row['wall_s']:.0f} s", file=sys.stderr, flush=True)
    return out


def evaluate(model: Path, data: str, seq_len: int, windows: int, extra: list[str], json_file: Path) -> dict:
    cmd = [sys.executable, "-m", "ernieq.cli", "--quiet", "eval", str(model), "--data", data, "--seq-len", str(seq_len),
           "--max-windows", str(windows), "--json", str(json_file), *extra]
    row = run_measured(cmd)
    result = json.loads(json_file.read_text())
    return {**row, "ppl": result["ppl"], "runtime": result["runtime"], "command": " ".join(cmd[2:])}


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"- machine: {meta['machine']}; torch {meta['torch']}; {meta['date']}; commit {meta['commit']}",
             f"- command: `{meta['command']}`", "",
             "| layers | checkpoint | path | peak RSS | peak PSS (tree) | wall s | perplexity |",
             "|---:|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['layers']} | {r['checkpoint']} | {r['runtime']['stream']['path']} | "
                     f"{r['maxrss_kib'] / 2**20:.2f} GiB | {r['tree_pss_kib'] / 2**20:.2f} GiB | {r['wall_s']:.0f} | "
                     f"{r['ppl']:.1f} |")
    by_key = {(r["layers"], r["checkpoint"]): r for r in rows}
    lo, hi = min(by_key)[0], max(by_key)[0]
    for kind in CHECKPOINTS:
        if (lo, kind) in by_key and (hi, kind) in by_key and lo != hi:
            ratio = by_key[(hi, kind)]["maxrss_kib"] / by_key[(lo, kind)]["maxrss_kib"]
            lines.append(f"\n- {kind}: peak RSS {hi} / {lo} layers = **{ratio:.3f}x**")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 8], help="decoder layer counts")
    parser.add_argument("--experts", type=int, default=64, help="routed experts per MoE layer (64: the published shape)")
    parser.add_argument("--data", default="../shared/data/wikitext-2-raw/wiki.test.raw", help="text to score")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--max-windows", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ernieq-stream"), help="checkpoints")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    parser.add_argument("--prepare", action="store_true", help="only build and quantize the checkpoints")
    parser.add_argument("--checkpoints", default="bf16,w2", help="comma list: bf16 (plain), w2 (--bits 2)")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    parser.add_argument("extra", nargs="*", help="more `ernieq eval` options (after --)")
    args = parser.parse_args()
    meta = {"machine": machine(), "torch": torch.__version__, "date": date.today().isoformat(),
            "commit": git_commit(short=True), "command": "python benchmarks/stream_eval.py " + " ".join(sys.argv[1:]),
            "quantize": " ".join(QUANTIZE) + " (round-to-nearest, no calibration)", "load_before": os.getloadavg()[0]}
    kinds = dict(zip(("bf16", "w2"), CHECKPOINTS))
    names = [k.strip() for k in args.checkpoints.split(",") if k.strip()]
    if set(names) - set(kinds):
        raise SystemExit(f"--checkpoints: unknown {sorted(set(names) - set(kinds))}; known: {', '.join(kinds)}")
    wanted = [kinds[k] for k in names]
    rows = []
    for layers in args.layers:
        ckpt = with_tokenizer(build_checkpoint(args.workdir / f"ernie21b-{layers}l-{args.experts}e",
                                               cut_config(ERNIE_21B, layers, args.experts)))
        q2 = args.workdir / f"ernie21b-{layers}l-{args.experts}e-w2"
        if CHECKPOINTS[1] in wanted:
            quantized(ckpt, q2)
        if args.prepare:
            continue
        for kind, model in ((k, ckpt if k == CHECKPOINTS[0] else q2) for k in wanted):
            row = evaluate(model, args.data, args.seq_len, args.max_windows, args.extra, args.workdir / "eval.json")
            rows.append({"layers": layers, "experts": args.experts, "checkpoint": kind, **row})
            print(f"{layers} layers {kind}: peak RSS {row['maxrss_kib'] / 2**20:.2f} GiB, {row['wall_s']:.0f} s, "
                  f"ppl {row['ppl']:.2f}", file=sys.stderr, flush=True)
            if args.out is not None:
                args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        if not args.keep:
            shutil.rmtree(ckpt)
            shutil.rmtree(q2, ignore_errors=True)
    meta["load_after"] = os.getloadavg()[0]
    if args.out is not None and rows:
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        print(markdown(rows, meta))


if __name__ == "__main__":
    main()
