"""GPTQ throughput over experts: the batched loop beside the per-expert reference loop, in one run.

    python benchmarks/gptq_speed.py [--shapes 21b-gate 21b-gateup 21b-down 300b-gate 300b-gateup 300b-down]
        [--codecs ccq2 wint4 wint8 fp8] [--experts 16] [--experts-300b 2] [--reference 2]
        [--reference-300b 1] [--device cpu] [--out benchmarks/results/gptq_speed.json]

For each expert shape (torch order ``W [N, K]``: ERNIE-4.5-21B-A3B gate/up ``[1536, 2560]``
and down ``[2560, 1536]``, ERNIE-4.5-300B-A47B gate/up ``[3584, 8192]`` and down
``[8192, 3584]``; gate/up each with its own Hessian, and as gate+up pairs sharing one) and each codec as the recipes set it (``ccq2``; ``wint4`` g64 symmetric
with float16 scales and clipping, ``--bits 4`` with its default rotations; ``wint8``; ``fp8``
128 x 128 blocks), it GPTQ-encodes synthetic experts, each with its own Hessian, three ways:

- ``batched``: ``gptq_experts.gptq_encode_experts`` on ``--experts`` weights at once (the
  path ``ernieq quantize`` takes for a layer's experts, in chunks of the CPU budget); in the
  ``gate+up`` rows the weights are the gate and up projections of half as many experts,
  each pair with one statistics object (one Hessian factor), as quantize gives them;
- ``one at a time``: the same function, one expert per call (what E = 1 costs);
- ``reference``: ``gptq.gptq_encode`` (the per-column reference loop, what quantize ran
  before the batched loop), one expert per call, on the first ``--reference`` experts;

and reports weights per second (wall and CPU), the ratio batched / reference, the share
of codes the batched and reference loops chose alike on the same experts, and the
output error ``tr(dW H dW^T)`` of the batched loop over the reference's (the worst expert). Column
order as quantize uses it: K order for the rotated codecs (ccq2, wint4), activation order
for wint8 and fp8. The rotation itself (W R, R^T H R) is not timed: this is GPTQ.

Synthetic inputs: weights ``N(0, 0.02^2)`` with log-normal row scales (sigma 0.5); Hessians
``X^T X / T`` of T = 4096 activations ``X = (Z + Z_r B) diag(s)``, s log-normal per channel
(sigma 1), Z_r B a rank-32 correlation; ``--hessians`` distinct Hessians per K, cycled
over the experts, each expert given its own copy (so each expert's factor is computed, as
with real statistics; the gate+up rows share one per pair, as quantize does). 300B shapes run
fewer experts (``--experts-300b``, ``--reference-300b``): a
reference ccq2 expert there takes minutes on a CPU.

One torch thread on a CPU (``--threads``); on a shared machine the CPU seconds are the
fairer figure, and the load average before and after each row is recorded. Writes JSON
(machine, date, commit, command, load) to ``--out`` and prints a markdown table.
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

import ernieq.calibration  # noqa: F401  (registers ccq2's rounders)
from ernieq.calibration.gptq import gptq_encode
from ernieq.calibration.gptq_experts import gptq_encode_experts
from ernieq.codecs import CalibrationStats, decode, get_codec
from ernieq.provenance import git_commit, machine

SHAPES = {  # name -> (label, N, K, whether an expert's gate and up share one statistics object)
    "21b-gate": ("21B gate/up", 1536, 2560, False),
    "21b-gateup": ("21B gate+up, one Hessian per expert", 1536, 2560, True),
    "21b-down": ("21B down", 2560, 1536, False),
    "300b-gate": ("300B gate/up", 3584, 8192, False),
    "300b-gateup": ("300B gate+up, one Hessian per expert", 3584, 8192, True),
    "300b-down": ("300B down", 8192, 3584, False),
}
CODECS = {  # name -> (codec parameters as the recipes set them, activation order as quantize uses it)
    "ccq2": ({}, False),
    "wint4": (dict(group_size=64, symmetric=True, clip=True, scale_dtype="float16"), False),
    "wint8": ({}, True),
    "fp8": (dict(block_size=128), True),
}
CODE_TENSOR = {"ccq2": "quant_weight", "wint4": "qweight", "wint8": "qweight", "fp8": "qweight"}
TOKENS = 4096


def load() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak resident set size of this process (Linux: VmHWM); False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_gib() -> float | None:
    """VmHWM of this process in GiB (Linux), or None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hessian(k: int, seed: int, device: torch.device) -> torch.Tensor:
    """X^T X / T of T synthetic activations with uneven, correlated channels. float32 [K, K]."""
    g = torch.Generator().manual_seed(seed)
    s = torch.exp(torch.randn(k, generator=g))  # log-normal channel scales
    basis = torch.randn(32, k, generator=g) * 0.5  # a rank-32 correlation
    x = (torch.randn(TOKENS, k, generator=g) + torch.randn(TOKENS, 32, generator=g) @ basis) * s
    x = x.to(device)
    return x.T @ x / TOKENS


def experts(n: int, k: int, count: int, hessians: list[torch.Tensor], device: torch.device, pairs: bool):
    """``count`` weights [N, K] and their statistics (Hessians cycled; with ``pairs``, weights 2i and
    2i + 1 are an expert's gate and up: one statistics object, as quantize gives them)."""
    g = torch.Generator().manual_seed(n * 7 + k)
    ws = [(torch.randn(n, k, generator=g) * 0.02 * torch.exp(0.5 * torch.randn(n, 1, generator=g))).to(device)
          for _ in range(count)]
    # a copy per expert: the batched loop factors each Hessian tensor once, so shared tensors would share a factor
    stats = [CalibrationStats(hessian=hessians[e % len(hessians)].clone(), tokens=TOKENS) for e in range(count)]
    if pairs:
        stats = [stats[e - e % 2] for e in range(count)]
    return ws, stats


def timed(fn, device: torch.device):
    """(result, wall seconds, CPU seconds of this process)."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    sync(device)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def rate(weights: int, wall: float, cpu: float) -> dict:
    return {"weights": weights, "wall_s": wall, "cpu_s": cpu, "weights_per_s": weights / wall,
            "weights_per_cpu_s": weights / cpu if cpu > 0 else None}


def output_error(w: torch.Tensor, q, h: torch.Tensor) -> float:
    """tr((W - W_hat) H (W - W_hat)^T), the error GPTQ minimises (up to the token count)."""
    d = w - decode(q).to(w.device)
    return ((d @ h) * d).sum().item()


def same_codes(a, b, key: str) -> float:
    x, y = a.tensors[key].view(torch.uint8), b.tensors[key].view(torch.uint8)
    return (x == y).float().mean().item()


def run_case(shape: str, codec_name: str, n_batched: int, n_reference: int, hessians, device) -> dict:
    label, n, k, pairs = SHAPES[shape]
    params, act_order = CODECS[codec_name]
    codec = get_codec(codec_name, **params)
    ws, stats = experts(n, k, max(n_batched, n_reference), hessians, device, pairs)
    load_before = load()
    print(f"{label} {codec_name}: reference loop on {n_reference}, batched on {n_batched} experts ...",
          file=sys.stderr, flush=True)

    def reference(e):
        return gptq_encode(codec, ws[e], stats[e], act_order=act_order)

    # the reference brackets the batched run: expert 0 before, the others after
    ref, ref_wall, ref_cpu = {}, 0.0, 0.0
    ref[0], wall, cpu = timed(lambda: reference(0), device)
    ref_wall, ref_cpu = ref_wall + wall, ref_cpu + cpu
    peak_ok = reset_peak_rss()
    batched, b_wall, b_cpu = timed(lambda: gptq_encode_experts(codec, ws[:n_batched], stats[:n_batched],
                                                               act_order=act_order), device)
    peak = peak_rss_gib() if peak_ok else None  # inputs (weights, Hessians) included
    for e in range(1, n_reference):
        ref[e], wall, cpu = timed(lambda e=e: reference(e), device)
        ref_wall, ref_cpu = ref_wall + wall, ref_cpu + cpu
    single, s_wall, s_cpu = [], 0.0, 0.0
    for e in range(n_reference):
        q, wall, cpu = timed(lambda e=e: gptq_encode_experts(codec, ws[e : e + 1], stats[e : e + 1],
                                                             act_order=act_order)[0], device)
        single.append(q)
        s_wall, s_cpu = s_wall + wall, s_cpu + cpu
    key = CODE_TENSOR[codec_name]
    row = {
        "shape": label, "n": n, "k": k, "codec": codec_name, "params": params, "act_order": act_order,
        "experts_batched": n_batched, "experts_reference": n_reference,
        "batched": rate(n * k * n_batched, b_wall, b_cpu),
        "one_at_a_time": rate(n * k * n_reference, s_wall, s_cpu),
        "reference": rate(n * k * n_reference, ref_wall, ref_cpu),
        "same_codes_vs_reference": min(same_codes(batched[e], ref[e], key) for e in ref),
        "output_error_vs_reference": max(output_error(ws[e], batched[e], stats[e].hessian)
                                         / output_error(ws[e], ref[e], stats[e].hessian) for e in ref),
        "batched_equals_one_at_a_time": all(
            all(torch.equal(batched[e].tensors[t], single[e].tensors[t]) for t in batched[e].tensors)
            for e in range(n_reference)),
        "peak_rss_gib_batched": peak,
        "load_before": load_before, "load_after": load(),
    }
    row["ratio_wall"] = row["batched"]["weights_per_s"] / row["reference"]["weights_per_s"]
    row["ratio_cpu"] = row["batched"]["weights_per_cpu_s"] / row["reference"]["weights_per_cpu_s"]
    print(f"  batched {row['batched']['weights_per_s'] / 1e6:.2f} M/s, one at a time "
          f"{row['one_at_a_time']['weights_per_s'] / 1e6:.2f} M/s, reference {row['reference']['weights_per_s'] / 1e6:.2f}"
          f" M/s: {row['ratio_wall']:.1f}x (CPU time {row['ratio_cpu']:.1f}x); same codes "
          f"{100 * row['same_codes_vs_reference']:.2f} %, output error {row['output_error_vs_reference']:.4f}x; "
          f"peak RSS {gib(peak)} GiB; "
          f"load {load_before:.1f} -> {row['load_after']:.1f}",
          file=sys.stderr, flush=True)
    return row


def gib(x: float | None) -> str:
    return "" if x is None else f"{x:.1f}"


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        f"- machine: {meta['machine']}; torch {meta['torch']}; {meta['date']}; commit {meta['commit']}; "
        f"{meta['threads']}",
        f"- load average (1 min) before / after: {meta['load_before']:.1f} / {meta['load_after']:.1f}",
        f"- command: `{meta['command']}`",
        "",
        "| weight [N, K] | codec | column order | experts batched / reference | batched M weights/s (per CPU s) "
        "| one at a time | reference loop | batched / reference (CPU) | same codes as reference "
        "| output error vs reference | peak RSS GiB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        m = lambda d: f"{d['weights_per_s'] / 1e6:.2f}"
        lines.append(
            f"| {r['shape']} [{r['n']}, {r['k']}] | {r['codec']} | {'activation' if r['act_order'] else 'K'} "
            f"| {r['experts_batched']} / {r['experts_reference']} "
            f"| {m(r['batched'])} ({r['batched']['weights_per_cpu_s'] / 1e6:.2f}) | {m(r['one_at_a_time'])} "
            f"| {m(r['reference'])} | {r['ratio_wall']:.1f}x ({r['ratio_cpu']:.1f}x) "
            f"| {100 * r['same_codes_vs_reference']:.2f} % | {r['output_error_vs_reference']:.4f}x "
            f"| {gib(r['peak_rss_gib_batched'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--codecs", nargs="+", default=list(CODECS), choices=list(CODECS))
    parser.add_argument("--experts", type=int, default=16, help="experts batched, 21B shapes")
    parser.add_argument("--experts-300b", type=int, default=2, help="experts batched, 300B shapes")
    parser.add_argument("--reference", type=int, default=2, help="experts through the reference loop, 21B shapes")
    parser.add_argument("--reference-300b", type=int, default=1, help="... and 300B shapes")
    parser.add_argument("--hessians", type=int, default=2, help="distinct Hessians per K, cycled over the experts")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on a CPU")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON file to write (e.g. benchmarks/results/gptq_speed.json)")
    args = parser.parse_args()
    device = torch.device(args.device)
    meta = {
        "machine": machine() if device.type == "cpu" else torch.cuda.get_device_name(device),
        "torch": torch.__version__, "date": date.today().isoformat(), "commit": git_commit(short=True),
        "command": "python benchmarks/gptq_speed.py " + " ".join(sys.argv[1:]),
        "threads": f"{args.threads} torch thread(s)" if device.type == "cpu" else "GPU",
        "load_before": load(), "load_1_5_15_min_before": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    rows = []
    hessians: dict[int, list[torch.Tensor]] = {}
    for shape in args.shapes:
        k = SHAPES[shape][2]
        if k not in hessians:
            torch.set_num_threads(os.cpu_count() or 1)  # the synthetic statistics are not timed
            hessians[k] = [hessian(k, seed, device) for seed in range(args.hessians)]
        if device.type == "cpu":
            torch.set_num_threads(args.threads)
        big = shape.startswith("300b")
        for codec_name in args.codecs:
            rows.append(run_case(shape, codec_name, args.experts_300b if big else args.experts,
                                 args.reference_300b if big else args.reference, hessians[k], device))
            write(args.out, meta, rows, complete=False)  # a run cut short keeps the rows it finished
    print(write(args.out, meta, rows, complete=True))


def write(out: Path | None, meta: dict, rows: list[dict], complete: bool) -> str:
    """The markdown table; with ``out``, the JSON (meta, rows, table) written there too."""
    meta.update(complete=complete, load_after=load(),
                load_1_5_15_min_after=os.getloadavg() if hasattr(os, "getloadavg") else None)
    table = markdown(meta, rows)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"meta": meta, "rows": rows, "markdown": table}, indent=2) + "\n")
    return table


if __name__ == "__main__":
    main()
