"""Throughput of the ``ccq2`` encoder on ERNIE-4.5-21B-A3B expert shapes, with its quality in the same run.

    python benchmarks/encode_speed.py [--threads 1 2] [--repeats 3] [--with-stats] [--set grid_candidates=3]
        [--out benchmarks/results/encode_speed.json]

For each torch thread count and each expert weight (torch order ``W [N, K]``):
gate/up ``[1536, 2560]`` (K = hidden 2560, N = moe_intermediate 1536) and down
``[2560, 1536]``, it encodes seeded unit Gaussian weights without calibration
statistics (and, with ``--with-stats``, with a Hessian diagonal, which takes the
float32 weighted search) and reports the best of ``--repeats`` runs: wall seconds,
weights per second, the process CPU seconds of that run (all threads together),
and the relative squared error of the decoded result (importance-weighted with
statistics; without, the weights have unit variance, so it is the MSE per
weight). A markdown snippet with the machine, date, commit, load average and
the command goes to stdout, progress to stderr; ``--out`` writes the rows and that
provenance as JSON (the file BENCHMARKS.md's figures come from).

On a shared machine the wall clock counts other jobs' time too: compare the
CPU seconds, and the thread counts within one run (with more runnable jobs than
cores, OpenMP threads that spin at each op's barrier can make 2 threads far slower
than 1; ``OMP_WAIT_POLICY=PASSIVE`` avoids that). ``--device cuda`` times the same
encode on a GPU (threads do not apply there).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import date
from pathlib import Path

import torch

from ernieq.codecs import CalibrationStats, decode, get_codec
from ernieq.provenance import git_commit, machine

SHAPES = {"gate/up [1536, 2560]": (1536, 2560), "down [2560, 1536]": (2560, 1536)}  # [N, K]
REPO = Path(__file__).resolve().parent.parent


def parse_settings(items: list[str]) -> dict:
    """``key=value`` pairs for ``get_codec("ccq2", ...)``; values as Python literals (3, 0.5, True)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set takes key=value, got {item!r}")
        for cast in (int, float):
            try:
                out[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            out[key] = {"True": True, "False": False}.get(value, value)
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_encode(codec, w: torch.Tensor, stats: CalibrationStats | None, repeats: int) -> dict:
    """Best-of-``repeats`` wall time of one encode; its CPU time; the relative error of the
    decode, ``sum d (W - W_hat)^2 / sum d W^2`` with d the Hessian diagonal, or 1 without stats."""
    codec.encode(w[:64], stats)  # warm-up (thread pools, allocator); the statistics describe K, which it keeps
    best = None
    for _ in range(repeats):
        sync(w.device)
        wall0, cpu0 = time.perf_counter(), time.process_time()
        q = codec.encode(w, stats)
        sync(w.device)
        run = (time.perf_counter() - wall0, time.process_time() - cpu0)
        if best is None or run[0] < best[0]:
            best = run
    d = torch.ones(w.shape[1], device=w.device) if stats is None else torch.diagonal(stats.hessian)  # [K]
    rel = ((w - decode(q)).pow(2) * d).sum().item() / (w.pow(2) * d).sum().item()
    return {"wall_s": best[0], "cpu_s": best[1], "weights_per_s": w.numel() / best[0], "rel_err": rel}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts to time (CPU)")
    parser.add_argument("--repeats", type=int, default=3, help="encodes per case; the fastest counts")
    parser.add_argument("--with-stats", action="store_true", help="also time with a Hessian diagonal (importance)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="ccq2 config overrides")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda to time the encoder on a GPU")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows and provenance to this JSON file")
    args = parser.parse_args()
    device = torch.device(args.device)
    settings = parse_settings(args.set)
    codec = get_codec("ccq2", **settings)
    threads = args.threads if device.type == "cpu" else [torch.get_num_threads()]
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None

    rows = []
    for name, (n, k) in SHAPES.items():
        g = torch.Generator().manual_seed(n * 10000 + k)
        w = torch.randn(n, k, generator=g).to(device)  # unit Gaussian [N, K]
        d = torch.exp(torch.randn(k, generator=g)).to(device)  # an uneven Hessian diagonal [K]
        cases = {"none": None}
        if args.with_stats:
            cases["Hessian diagonal"] = CalibrationStats(hessian=torch.diag(d))
        for t in threads:
            if device.type == "cpu":
                torch.set_num_threads(t)
            for stats_name, stats in cases.items():
                row = time_encode(codec, w, stats, args.repeats)
                rows.append({"shape": name, "threads": t, "stats": stats_name, **row})
                print(
                    f"{name} threads {t} stats {stats_name}: {row['wall_s']:.3f} s wall, {row['cpu_s']:.3f} s CPU, "
                    f"{row['weights_per_s'] / 1e6:.2f} M weights/s, relative error {row['rel_err']:.4f}",
                    file=sys.stderr,
                    flush=True,
                )
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None

    base = {(r["shape"], r["stats"]): r["wall_s"] for r in rows if r["threads"] == threads[0]}
    command = "python benchmarks/encode_speed.py " + " ".join(sys.argv[1:])
    print(f"### ccq2 encoder throughput ({'default config' if not settings else settings})\n")
    where = machine() if device.type == "cpu" else torch.cuda.get_device_name(device)
    meta = {"machine": where, "torch": torch.__version__, "date": date.today().isoformat(),
            "commit": git_commit(short=True), "command": command.strip(), "settings": settings,
            "load_before": load_before and load_before[0], "load_after": load_after and load_after[0]}
    if args.out is not None:
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"- machine: {where}; torch {torch.__version__}; {meta['date']}; commit {meta['commit']}")
    if load_before is not None:
        print(f"- load average (1 min) before / after: {load_before[0]:.1f} / {load_after[0]:.1f}")
    print(f"- command: `{command.strip()}`\n")
    print(f"| weight | threads | statistics | wall s | M weights/s | CPU s | vs {threads[0]} thread(s) | rel. error |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = base[(r["shape"], r["stats"])] / r["wall_s"]
        print(
            f"| {r['shape']} | {r['threads']} | {r['stats']} | {r['wall_s']:.3f} | {r['weights_per_s'] / 1e6:.2f} "
            f"| {r['cpu_s']:.3f} | {ratio:.2f}x | {r['rel_err']:.4f} |"
        )


if __name__ == "__main__":
    main()
