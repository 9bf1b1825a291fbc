"""``ernieq bench --kernels``: how fast compressed weights are multiplied, per codec and shape, in one table.

    ernieq bench --kernels [--out FILE] [--quick] [--budget-s S] [--codecs wint4,ccq2] [--models 21b,300b] [--m 1,16]
                 [--sweep [--save-configs]] [--device auto|cpu|cuda|cuda:N] [--dtype auto|bfloat16|...]
    python benchmarks/bench_kernels.py --out FILE [--quick] [--budget-s S] [--dry-run] [--device cuda:N] ...

Shape legend: M rows of x (tokens), N output features, K input features,
E experts, A active experts per token, H hidden size, I expert intermediate size.

On a CUDA GPU (``--device``: auto picks the first), for ERNIE-4.5-21B-A3B and ERNIE-4.5-300B-A47B shapes (attention
q/o projections, one expert's gate/up and down as a dense GEMM, and the whole
fused MoE layer), every codec and M in {1, 4, 16, 64} (decode) and {512, 4096}
(prefill; ``--quick``: M in {1, 16, 4096}):

- median time of the Triton kernels by ``triton.testing.do_bench``;
- TFLOP/s (2 M N K per GEMM; 6 T A H I per MoE layer) and GB/s (weight bytes
  read, active experts only for MoE, plus activations in and out);
- % of the HBM bandwidth measured in the same run by a device-to-device copy;
- speed-up over bf16 ``torch.matmul`` (dense) and over a bf16 looped MoE;
- the largest error against ``ernieq.kernels.reference`` relative to max|ref|, for M <= 64;
- ``--sweep``: a few tile configurations per case; ``--save-configs`` writes the
  fastest into the tile table the launchers read (``ernieq.kernels.tile_table``).

Without a GPU it runs the reference path (decode + fp32 matmul) on the CPU and
says so in the table's first lines: 21B-A3B shapes, M in {1, 4, 16} (``--quick``:
M in {1, 16}, the q projection and an expert's gate/up only, no MoE layer),
``time.perf_counter`` medians against fp32 and bf16 ``torch.matmul``. Those
figures are not kernel speed. ``--dry-run`` (script only, ``TRITON_INTERPRET=1``)
runs the GPU flow on the CPU with tiny shapes under the Triton interpreter.
``--dtype`` sets the activations' dtype (auto: bfloat16 on a GPU and in the dry run, float32
on the CPU). The table's header records the device, dtype and kernel path.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ernieq.bench import cases as bench_cases
from ernieq.bench import timing as bench_timing
from ernieq.bench.inputs import CODECS, MODELS, Model, resolve_codecs, resolve_models
from ernieq.bench.report import Report, columns
from ernieq.device import HOST, Placement, describe, resolve_device, resolve_dtype
from ernieq.errors import ErnieqError
from ernieq.kernels import tile_table
from ernieq.provenance import git_commit, package_versions

log = logging.getLogger(__name__)

CPU_LABEL = "reference path on CPU — no GPU: these numbers are not kernel speed"
ALL_KINDS = tuple(next(iter(MODELS.values())).dense_shapes())
TINY = Model("tiny (dry run)", hidden=64, inter=32, experts=4, top_k=2, heads=2, kv_heads=1, head_dim=32)


@dataclass(frozen=True)
class BenchOptions:
    """What to run. models/m None: the device's default (see the module doc)."""

    out: Path | None = None
    quick: bool = False
    budget_s: float = 420.0
    codecs: tuple[str, ...] = tuple(CODECS)
    models: tuple[str, ...] | None = None
    m: tuple[int, ...] | None = None
    dense: bool = True
    moe: bool = True
    sweep: bool = False
    save_configs: bool = False
    dry_run: bool = False
    command: str = "ernieq bench --kernels"
    device: str = "auto"
    dtype: str = "auto"


@dataclass(frozen=True)
class Mode:
    """How a run measures on one kind of device (see ``bench_cases.Plan``); act_dtype is --dtype auto's."""

    backend: str
    timer: bench_timing.Timer
    act_dtype: torch.dtype
    baselines: tuple[torch.dtype, ...]
    check_max_m: int
    copy_bytes: int  # the bandwidth copy
    m_full: tuple[int, ...]
    m_quick: tuple[int, ...]
    models: tuple[str, ...]  # default MODELS keys
    quick_kinds: tuple[str, ...]  # dense GEMMs under --quick
    quick_moe: bool
    bw_col: str
    speedup_col: str
    baseline_note: str  # what the speed-up compares with, for the header
    tiny: bool = False  # every model replaced by TINY


MODES = {
    "gpu": Mode(
        backend="triton", timer=bench_timing.gpu_median_ms, act_dtype=torch.bfloat16,
        baselines=(torch.bfloat16,), check_max_m=64, copy_bytes=2**31,
        m_full=(1, 4, 16, 64, 512, 4096), m_quick=(1, 16, 4096), models=tuple(MODELS),
        quick_kinds=ALL_KINDS, quick_moe=True, bw_col="% HBM", speedup_col="speed-up vs bf16",
        baseline_note="bf16 torch.matmul (dense) or a bf16 looped MoE (MoE layer)",
    ),
    "cpu": Mode(
        backend="reference", timer=bench_timing.cpu_median_ms, act_dtype=torch.float32,
        baselines=(torch.float32, torch.bfloat16), check_max_m=0, copy_bytes=2**26,
        m_full=(1, 4, 16), m_quick=(1, 16), models=("21B-A3B",),
        quick_kinds=("attn q_proj", "expert gate/up"), quick_moe=False, bw_col="% copy bw",
        speedup_col="speed-up vs fp32 matmul",
        baseline_note="fp32 torch.matmul on the CPU (dense; bf16 listed) or an fp32 looped MoE (MoE layer)",
    ),
    "dry": Mode(
        backend="triton", timer=bench_timing.once_ms, act_dtype=torch.bfloat16,
        baselines=(torch.bfloat16,), check_max_m=64, copy_bytes=2**26,
        m_full=(1, 3), m_quick=(1, 3), models=tuple(MODELS),
        quick_kinds=ALL_KINDS, quick_moe=True, bw_col="% copy bw", speedup_col="speed-up vs bf16",
        baseline_note="bf16 torch.matmul or a bf16 looped MoE (one call each: not speed)", tiny=True,
    ),
}  # fmt: skip


def pick_mode(options: BenchOptions) -> tuple[str, torch.device]:
    """The mode name and the device: "dry" (in host memory) when asked, else "gpu" for a CUDA --device,
    else "cpu"."""
    if options.dry_run:
        if options.device not in ("auto", "cpu"):
            raise ErnieqError(f"bench: the dry run runs on the CPU under the Triton interpreter, not --device "
                              f"{options.device}")
        return "dry", HOST
    device = resolve_device(options.device)
    return ("gpu" if device.type == "cuda" else "cpu"), device


def _check_options(options: BenchOptions, mode: str) -> None:
    if any(m < 1 for m in options.m or ()):
        raise ErnieqError(f"bench: M values must be >= 1, got {list(options.m)}")
    if not options.codecs:
        raise ErnieqError("bench: no codec selected")
    if options.save_configs and not options.sweep:
        raise ErnieqError("bench: --save-configs stores what --sweep finds; add --sweep")
    if options.sweep and MODES[mode].backend != "triton":
        raise ErnieqError("bench: --sweep tunes the Triton kernels' tiles and needs a CUDA GPU")
    if mode == "dry" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ErnieqError("bench: the dry run runs the kernels on the CPU: set TRITON_INTERPRET=1 before python starts")
    if mode == "dry" and options.save_configs and not os.environ.get(tile_table.TABLE_ENV):
        raise ErnieqError(f"bench: a dry run saves tile configs only to ${tile_table.TABLE_ENV} "
                          "(the repo's table holds GPU measurements)")  # fmt: skip


def run_bench(options: BenchOptions) -> Report:
    """Every case of ``options`` on this machine; the report (also written to ``options.out`` after each case)."""
    mode_name, device = pick_mode(options)
    _check_options(options, mode_name)
    mode = MODES[mode_name]
    act_dtype = mode.act_dtype if options.dtype == "auto" else resolve_dtype(options.dtype, device)
    codecs = resolve_codecs(options.codecs)
    models = resolve_models(options.models or mode.models)
    m_list = tuple(options.m or (mode.m_quick if options.quick else mode.m_full))
    kinds = list(mode.quick_kinds if options.quick else ALL_KINDS) if options.dense else []
    run_moe = options.moe and (mode.quick_moe or not options.quick)

    start = time.monotonic()
    gpu = _device_name(device, mode_name)
    bandwidth = bench_timing.copy_bandwidth_gbps(device, mode.copy_bytes, mode.timer)
    source = f"{options.command}; {_today()}; commit {git_commit()}"  # recorded with every saved tile config
    plan = bench_cases.Plan(device, mode.backend, mode.timer, act_dtype, mode.baselines, mode.check_max_m,
                            bandwidth, start + options.budget_s, torch.Generator(device=device).manual_seed(0),
                            sweep=options.sweep, gpu=gpu, source=source)  # fmt: skip
    runtime = Placement(device, act_dtype).record(mode.backend)
    report = Report(options.out, _header(options, mode_name, gpu, bandwidth, codecs, mode, runtime),
                    columns=columns(mode.bw_col, mode.speedup_col), banner=CPU_LABEL if mode_name == "cpu" else "")
    report.write()
    for key in models:
        model = TINY if mode.tiny else MODELS[key]
        if kinds:
            bench_cases.dense_cases(plan, model, kinds, m_list, codecs, report)
        if run_moe:
            bench_cases.moe_cases(plan, model, m_list, codecs, report)
    if options.save_configs and plan.tuned:
        path = tile_table.save_entries(plan.tuned)
        report.header.append(f"- tile configurations: {len(plan.tuned)} sweep winners saved to {path}")
    report.header.append(f"- wall time {time.monotonic() - start:.0f} s")
    report.write()
    log.info("bench: %d rows, %d errors/failures%s", len(report.rows), len(report.failures),
             f"; wrote {options.out}" if options.out else "")  # fmt: skip
    return report


def _device_name(device: torch.device, mode: str) -> str:
    if mode == "gpu":
        from ernieq.kernels.configs import gpu_name

        return gpu_name(device.index if device.index is not None else torch.cuda.current_device())
    if mode == "dry":
        return "none: DRY RUN on the CPU"
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def _header(options: BenchOptions, mode_name: str, gpu: str, bandwidth: float, codecs: list[str],
            mode: Mode, runtime: dict) -> list[str]:  # fmt: skip
    lines = ["# ernieq kernel benchmark", ""]
    if mode_name == "cpu":
        lines.append(f"- device: {gpu}, no GPU: ernieq.kernels.reference (decode + fp32 matmul) timed by "
                     f"time.perf_counter medians; measured memory copy bandwidth {bandwidth:.0f} GB/s")  # fmt: skip
    else:
        memory = "HBM" if mode_name == "gpu" else "memory"
        lines.append(f"- GPU: {gpu}; measured {memory} copy bandwidth {bandwidth:.0f} GB/s")
    checked = " (not checked on the CPU)" if mode.check_max_m == 0 else f", M <= {mode.check_max_m}"
    return lines + [
        f"- runtime: {describe(runtime)}",
        f"- date: {_today()}; commit: {git_commit()}",
        f"- torch {torch.__version__}, triton {package_versions()['triton']}, python {platform.python_version()}",
        f"- command: `{options.command}`",
        "- weights synthetic in each codec's layout: " + ", ".join(f"{c} {CODECS[c]}" for c in codecs),
        f"- speed-up: over {mode.baseline_note}; GB/s counts weight bytes read (active experts only) plus "
        f"activations; max rel err: vs the fp32 reference, / max|ref|{checked}",
    ]


def _today() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# ---- the GPU script's command line (benchmarks/bench_kernels.py) ---------------------------------


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


def main(argv: list[str] | None = None) -> int:
    """The script: 0 when every case ran and matched the reference, 1 on failures, 2 without a GPU or on bad input."""
    p = argparse.ArgumentParser(description="GPU benchmark of ernieq's Triton kernels (see ernieq.bench.kernels)")
    p.add_argument("--out", type=Path, required=True, help="markdown file to write")
    p.add_argument("--quick", action="store_true", help="M in {1, 16, 4096} only")
    p.add_argument("--budget-s", type=float, default=420.0, help="start no new case after this many seconds")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {list(MODELS)}")
    p.add_argument("--codecs", default=",".join(CODECS), help=f"comma list of {list(CODECS)}")
    p.add_argument("--m", default=None, help="comma list of M (tokens) instead of the default")
    p.add_argument("--no-moe", action="store_true")
    p.add_argument("--no-dense", action="store_true")
    p.add_argument("--sweep", action="store_true", help="also try a few tile configs per case")
    p.add_argument("--save-configs", action="store_true", help="write the sweep's winners into the tile table")
    p.add_argument(
        "--dry-run", action="store_true", help="check the script on the CPU (TRITON_INTERPRET=1, tiny shapes)"
    )
    p.add_argument("--device", default="auto", help="cuda or cuda:N (auto: the first CUDA GPU)")
    p.add_argument("--dtype", default="auto", help="activations: bfloat16 (auto), float16 or float32")
    args = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if not args.dry_run and (not torch.cuda.is_available() or args.device == "cpu"):
        log.error("bench_kernels: no CUDA GPU here; this script times the Triton kernels on a GPU only "
                  "(`ernieq bench --kernels` runs the reference path on the CPU, labelled as such)")  # fmt: skip
        return 2
    try:
        m = tuple(int(v) for v in _comma_list(args.m)) if args.m else None
    except ValueError:
        log.error("bench_kernels: --m takes a comma list of integers, got %r", args.m)
        return 2
    try:
        options = BenchOptions(out=args.out, quick=args.quick, budget_s=args.budget_s, codecs=_comma_list(args.codecs),
                               models=_comma_list(args.models), m=m, dense=not args.no_dense, moe=not args.no_moe,
                               sweep=args.sweep, save_configs=args.save_configs, dry_run=args.dry_run,
                               command=" ".join(["python benchmarks/bench_kernels.py", *argv]), device=args.device,
                               dtype=args.dtype)  # fmt: skip
        report = run_bench(options)
    except ErnieqError as err:
        log.error("bench_kernels: %s", err)
        return 2
    return 1 if report.failures else 0
