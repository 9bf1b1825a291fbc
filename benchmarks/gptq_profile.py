"""Where batched GPTQ's CPU time goes, per codec: the phases of ``gptq_experts.gptq_encode_experts``.

    python benchmarks/gptq_profile.py [--shape 21b-gateup] [--codecs ccq2 wint4] [--experts 16]
        [--out benchmarks/results/gptq_profile.json]

The same synthetic experts as ``gptq_speed.py`` (its shapes, codec settings and Hessians), one torch
thread, the batched call run under ``cProfile`` with the process's CPU clock (so other jobs on a shared
machine do not count), split into:

- ``hessian factor``: ``upper_factor`` (the damped Cholesky per distinct Hessian);
- ``codec set-up``: the expert rounder's constructor (ccq2: the codec's whole search per channel,
  code grid and super scale; wint4 with activation order: the scales), ``_batched_loop`` minus the loop;
- ``group scales``: ``start_group`` (ccq2: each group's nibble refit; wint4: its scale);
- ``rounding``: the rounders' ``round`` (ccq2: the quad byte search against 256 whitened words);
- ``GEMM updates``: ``baddbmm_`` (GPTQ's error feedback: ~N K^2 multiply-adds per expert);
- ``loop, rest`` and ``set-up, rest`` (checks, copies, transposes, the per-column Python).

It also times one float32 GEMM of the lazy-block update's shape, so the GEMM phase can be read against
what this core does at best.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gptq_speed import CODECS, SHAPES, experts, hessian  # the same experts, codecs and Hessians

from ernieq.calibration.gptq_experts import gptq_encode_experts
from ernieq.codecs import get_codec
from ernieq.provenance import git_commit, machine


def cumulative(stats: dict, name: str, file: str | None = None) -> float:
    """CPU seconds in functions called ``name`` (in ``file``), callees included."""
    return sum(v[3] for (f, _, fn), v in stats.items() if fn == name and (file is None or f.endswith(file)))


def own(stats: dict, name: str) -> float:
    """CPU seconds in the builtins called ``name`` themselves."""
    return sum(v[2] for (_, _, fn), v in stats.items() if name in fn)


def phases(codec, ws, stats, act_order: bool) -> dict:
    prof = cProfile.Profile(time.process_time)
    start = time.process_time()
    prof.runcall(gptq_encode_experts, codec, ws, stats, act_order=act_order)
    total = time.process_time() - start
    st = pstats.Stats(prof).stats
    factor = cumulative(st, "upper_factor")
    batched, loop = cumulative(st, "_batched_loop"), cumulative(st, "expert_column_loop")
    groups, rounding = cumulative(st, "start_group"), cumulative(st, "round")
    gemm = own(st, "baddbmm_")  # the in-place updates of the loop (set_state's baddbmm counts in its phase)
    return {"total": total, "hessian factor": factor, "codec set-up": batched - loop, "group scales": groups,
            "rounding": rounding, "GEMM updates": gemm, "loop, rest": loop - groups - rounding - gemm,
            "set-up, rest": total - batched - factor}


def gemm_gflops(n: int, k: int, block: int = 128) -> float:
    """GFLOP/s of one [K - B, B] x [B, N] float32 update (best of 3, CPU clock)."""
    a, b, c = torch.randn(1, k - block, block), torch.randn(1, block, n), torch.zeros(1, k - block, n)
    best = float("inf")
    for _ in range(3):
        t = time.process_time()
        c.baddbmm_(a, b)
        best = min(best, time.process_time() - t)
    return 2 * (k - block) * block * n / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="21b-gateup", choices=list(SHAPES))
    parser.add_argument("--codecs", nargs="+", default=["ccq2", "wint4"], choices=list(CODECS))
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    label, n, k, pairs = SHAPES[args.shape]
    device = torch.device("cpu")
    torch.set_num_threads(1)
    hs = [hessian(k, seed, device) for seed in range(2)]
    ws, stats = experts(n, k, args.experts, hs, device, pairs)
    meta = {"machine": machine(), "torch": torch.__version__, "date": date.today().isoformat(),
            "commit": git_commit(short=True), "command": "python benchmarks/gptq_profile.py " + " ".join(sys.argv[1:]),
            "shape": label, "n": n, "k": k, "experts": args.experts, "load_1_5_15_min_before": os.getloadavg()}
    rows = {}
    for name in args.codecs:
        params, act_order = CODECS[name]
        row = phases(get_codec(name, **params), ws, stats, act_order)
        row["weights_per_cpu_s"] = n * k * args.experts / row["total"]
        rows[name] = row
        shares = [f"{p} {100 * s / row['total']:.0f} % ({s:.2f} s)" for p, s in row.items()
                  if p not in ("total", "weights_per_cpu_s")]
        print(f"{name}: {row['weights_per_cpu_s'] / 1e6:.2f} M weights per CPU s; " + ", ".join(shares),
              file=sys.stderr, flush=True)
    meta["gemm_gflops_one_thread"] = gemm_gflops(n, k)
    meta["load_1_5_15_min_after"] = os.getloadavg()
    print(f"one [K - 128, 128] x [128, N] float32 GEMM: {meta['gemm_gflops_one_thread']:.1f} GFLOP/s", file=sys.stderr)
    if args.out is not None:
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
