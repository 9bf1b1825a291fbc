"""One GPU check: what only a CUDA GPU can show, in one short run (under 8 minutes on one H200), and its dry run.

    bash scripts/gpu_check.sh [--device cuda:N] [--budget-s 450]      # on a GPU; writes benchmarks/results/gpu_*.json
    bash scripts/gpu_check.sh --dry-run --out DIR                     # the same flow on the CPU (CI)

Steps, most important first; a step that would start after ``--budget-s`` seconds is recorded as skipped
(and the check fails), so a slow step never loses what the earlier ones measured:

1. ``tests``: the kernel, runtime and device tests, with the Triton kernels compiled for the GPU, and
   ``--method tune`` on the GPU.
2. ``accuracy``: the demo quantized on the GPU (round to nearest: the kernels are what is checked, not the
   rounding) at ``--bits 8``, ``--bits 4``, ``--bits 2`` and ``--fp8`` (W8A8), each evaluated through the
   Triton kernels and through the reference path on the same windows of wikitext-2: perplexities within
   ``PPL_TOLERANCE``; the unquantized demo on the same windows for scale.
3. ``kernels``: the quick kernel benchmark (``ernieq.bench.kernels``) at ERNIE-4.5-21B-A3B and 300B-A47B shapes.
4. ``bench``: ``ernieq bench`` (``ernieq.bench.model``) on the demo and on a 4-layer synthetic
   ERNIE-4.5-21B-A3B checkpoint (``benchmarks/scale.py``): bf16 against ``--bits 4`` and ``--bits 2``.

Each step writes ``OUT/gpu_<step>.json`` (GPU, date, commit with every file); the end prints the rows for
BENCHMARKS.md and writes them to ``OUT/gpu_rows.md``. Exit status 0 only when every step ran and passed.

``--dry-run`` runs the same steps on the CPU: the Triton kernels under the interpreter
(``TRITON_INTERPRET=1``, ``ERNIEQ_KERNELS=triton``), one kernel test file, tiny synthetic checkpoints in
place of the demo and of the 21B shapes (no tokenizer: evaluated on random token ids), the kernel
benchmark's tiny shapes, two windows, a few tokens. It checks the flow, not the figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import scale  # benchmarks/scale.py: the synthetic checkpoints
from ernieq import api
from ernieq.bench.kernels import BenchOptions, run_bench
from ernieq.bench.model import ModelBenchOptions, run_model_bench
from ernieq.device import Placement, device_name, dtype_name
from ernieq.eval.perplexity import perplexity, tokenize_text
from ernieq.kernels.ops import BACKEND_ENV
from ernieq.model.checkpoint import read_json
from ernieq.provenance import git_commit, now_iso
from ernieq.runtime.record import kernel_path
from ernieq.text import load_text

REPO = Path(__file__).resolve().parent.parent
PPL_TOLERANCE = 0.005  # |ppl(triton) / ppl(reference) - 1|
GPU_BUDGET_S = 450.0  # no step starts later: the whole check stays under 8 minutes on one H200
SETTINGS = {"w8": {"bits": 8}, "w4": {"bits": 4}, "w2": {"bits": 2}, "fp8": {"fp8": True}}
BENCH_SETTINGS = ("w4", "w2")  # against the checkpoint itself in bf16
BENCH_FIGURES = ("batch", "prefill tok/s", "decode tok/s", "peak GiB", "weights GiB")  # ernieq.bench.model columns
# the synthetic checkpoints of the dry run: every quantized K and N a multiple of 128 (fp8 blocks)
TINY_DIMS = {"vocab_size": 1024, "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 64, "moe_intermediate_size": 128, "moe_k": 2,
             "moe_num_shared_experts": 1, "max_position_embeddings": 4096}


@dataclass(frozen=True)
class Plan:
    """How big each step is: the GPU run, or the dry run on the CPU."""

    dry: bool
    tests: tuple[str, ...]  # pytest arguments
    seq_len: int
    windows: int
    kernel_models: tuple[str, ...]
    kernel_m: tuple[int, ...] | None
    batches: tuple[int, ...]
    prompt_len: int
    new_tokens: int
    synthetic_experts: int


GPU = Plan(dry=False, tests=("tests/kernels", "tests/runtime", "tests/test_device.py",
                             "tests/calibration/test_tune.py::test_method_tune_runs_on_cuda"), seq_len=2048, windows=4,
           kernel_models=("21b", "300b"), kernel_m=None, batches=(1, 8, 32), prompt_len=512, new_tokens=64,
           synthetic_experts=64)
DRY = Plan(dry=True, tests=("tests/kernels/test_moe_align.py",), seq_len=32, windows=1, kernel_models=("21b",),
           kernel_m=(1,), batches=(1, 2), prompt_len=8, new_tokens=1, synthetic_experts=4)


class Check:
    """The run: its plan, where it writes, what it has measured, the clock against the budget."""

    def __init__(self, plan: Plan, out: Path, work: Path, device: str, budget_s: float):
        self.plan, self.out, self.work, self.budget_s = plan, out, work, budget_s
        self.placement = Placement.resolve(device)  # bfloat16 on a GPU; float32 in the dry run
        self.start = time.monotonic()
        self.meta = {"gpu": "none: DRY RUN on the CPU" if plan.dry else device_name(self.placement.device),
                     "date": now_iso(), "commit": git_commit(short=True), "dry_run": plan.dry,
                     "device": str(self.placement.device), "dtype": dtype_name(self.placement.dtype)}
        self.rows: list[list[str]] = []  # check, figures, result
        self.failed: list[str] = []

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def write(self, step: str, data: dict) -> None:
        path = self.out / f"gpu_{step}.json"
        path.write_text(json.dumps({**self.meta, "step": step, "seconds": round(self.elapsed(), 1), **data},
                                   indent=2) + "\n")
        print(f"wrote {path}", flush=True)

    def row(self, check: str, figures: str, ok: bool) -> None:
        self.rows.append([check, figures, "ok" if ok else "FAIL"])
        if not ok:
            self.failed.append(check)


@contextmanager
def kernels(backend: str):
    """Every quantized module computes through ``backend`` (``$ERNIEQ_KERNELS``, read on each call)."""
    before = os.environ.get(BACKEND_ENV)
    os.environ[BACKEND_ENV] = backend
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(BACKEND_ENV)
        else:
            os.environ[BACKEND_ENV] = before


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- the checkpoints --------------------------------------------------------------------------------


def demo(c: Check) -> Path:
    """The demo (built and cached on first use); in the dry run a tiny synthetic ERNIE MoE."""
    if c.plan.dry:
        return scale.build_checkpoint(c.work / "tiny-demo", {**scale.cut_config(scale.ERNIE_21B, 3, 4), **TINY_DIMS})
    return api.resolve_model("demo")


def synthetic_21b(c: Check) -> Path:
    """4 decoder layers of ERNIE-4.5-21B-A3B (random bf16 weights); in the dry run its tiny counterpart."""
    dims = TINY_DIMS if c.plan.dry else {}
    return scale.build_checkpoint(c.work / "synthetic-21b",
                                  {**scale.cut_config(scale.ERNIE_21B, 4, c.plan.synthetic_experts), **dims}, seed=1)


def quantized(c: Check, source: Path, setting: str) -> Path:
    """``source`` quantized at ``setting`` on the check's device (made once per run)."""
    out = c.work / f"{source.name}-{setting}"  # the work folder is the run's own: a checkpoint there is this run's
    if not (out / "config.json").exists():
        t0 = time.monotonic()
        api.quantize(source, out, progress=False, device=str(c.placement.device), **SETTINGS[setting])
        print(f"  quantized {source.name} {setting} in {time.monotonic() - t0:.0f} s", flush=True)
    return out


# ---- the steps --------------------------------------------------------------------------------------


def step_tests(c: Check) -> None:
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *c.plan.tests]
    env = {k: v for k, v in os.environ.items() if k != BACKEND_ENV}  # the tests choose their kernels themselves
    t0 = time.monotonic()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    tail = (done.stdout + done.stderr).strip().splitlines()[-1:] or [""]
    print(f"  {' '.join(cmd[1:])}: {tail[0]}", flush=True)
    c.write("tests", {"command": " ".join(cmd[1:]), "returncode": done.returncode, "summary": tail[0],
                      "seconds_step": round(time.monotonic() - t0, 1)})
    c.row("tests: " + " ".join(c.plan.tests), tail[0], done.returncode == 0)


def _eval_ids(c: Check, path: Path) -> torch.Tensor:
    """Token ids [1, L]: wikitext-2 through the checkpoint's tokenizer; random ids where it has none
    (the dry run's synthetic checkpoints)."""
    if any((path / name).is_file() for name in api.TOKENIZER_FILES):
        return tokenize_text(api.load_tokenizer(path), load_text("wikitext2", split="eval"))
    vocab = read_json(path / "config.json")["vocab_size"]
    return torch.randint(vocab, (1, c.plan.seq_len * c.plan.windows), generator=torch.Generator().manual_seed(0))


def _ppl(c: Check, path: Path, backend: str, ids: torch.Tensor) -> tuple[float, str]:
    """(perplexity, kernel path) of ``path`` computed through ``backend`` on the check's device."""
    with kernels(backend), torch.inference_mode():
        net = api.load_model(path, device=c.placement.device, dtype=c.placement.dtype)
        r = perplexity(net, ids, seq_len=c.plan.seq_len, max_windows=c.plan.windows, progress=False)
        path_used = kernel_path(net, c.placement.device)
    del net
    _free()
    return r.ppl, path_used


def step_accuracy(c: Check) -> None:
    source = demo(c)
    ids = _eval_ids(c, source)
    base, _ = _ppl(c, source, "reference", ids)
    rows = [{"setting": "unquantized", "ppl": base}]
    c.row(f"{source.name} unquantized", f"ppl {base:.4g}", True)
    for setting in SETTINGS:
        path = quantized(c, source, setting)
        (triton, triton_path), (ref, ref_path) = (_ppl(c, path, b, ids) for b in ("triton", "reference"))
        rel = triton / ref - 1
        ok = abs(rel) <= PPL_TOLERANCE and triton_path == "triton" and ref_path.startswith("reference")
        rows.append({"setting": setting, "ppl_triton": triton, "ppl_reference": ref, "rel_diff": rel,
                     "kernels": [triton_path, ref_path], "ok": ok})
        c.row(f"{source.name} {setting}: Triton vs reference", f"ppl {triton:.4g} vs {ref:.4g} ({rel:+.3%}; "
              f"tolerance {PPL_TOLERANCE:.1%})", ok)
        print(f"  {setting}: ppl triton {triton:.4f}, reference {ref:.4f} ({rel:+.3%})", flush=True)
    c.write("accuracy", {"model": str(source), "seq_len": c.plan.seq_len, "windows": c.plan.windows,
                         "tolerance": PPL_TOLERANCE, "rows": rows})


def step_kernels(c: Check) -> None:
    md = c.out / "gpu_kernels.md"
    budget_s = min((c.budget_s - c.elapsed()) / 3, 150.0)  # leave the rest to the whole-model benchmark
    options = BenchOptions(out=md, quick=True, budget_s=max(budget_s, 0.0), m=c.plan.kernel_m,
                           models=c.plan.kernel_models, dry_run=c.plan.dry, device=str(c.placement.device),
                           command="python benchmarks/gpu_check.py" + (" --dry-run" if c.plan.dry else ""))
    report = run_bench(options)
    c.write("kernels", {"header": report.header, "columns": list(report.columns),
                        "rows": [asdict(r) for r in report.rows], "markdown": md.name})
    c.row("kernel benchmark " + ",".join(c.plan.kernel_models), f"{len(report.rows)} rows in {md.name}",
          not report.failures and bool(report.rows))


def step_bench(c: Check) -> None:
    options = ModelBenchOptions(c.plan.batches, c.plan.prompt_len, c.plan.new_tokens)
    results = []
    for source in (demo(c), synthetic_21b(c)):
        models = [("model", setting, quantized(c, source, setting)) for setting in BENCH_SETTINGS]
        models.append(("baseline", "bf16", source))
        loads = [(role, name, lambda p=path: api.load_model(p, device=c.placement.device, dtype=c.placement.dtype))
                 for role, name, path in models]
        result = run_model_bench(loads, c.placement, options, f"gpu_check bench {source.name}")
        results.append({"checkpoint": source.name, **result.to_json()})
        for r in result.report.rows:
            cells = dict(zip(result.report.columns, r.cells(), strict=True))
            figures = ", ".join(f"{k} {cells[k]}" for k in BENCH_FIGURES)
            c.row(f"bench {source.name} {cells['model']}", figures, not cells["note"].startswith("torch.compile"))
        _free()
    c.write("bench", {"results": results})


STEPS = {"tests": step_tests, "accuracy": step_accuracy, "kernels": step_kernels, "bench": step_bench}


def benchmarks_rows(c: Check) -> str:
    head = "| GPU | date | commit | check | figures | result |\n|---|---|---|---|---|---|\n"
    date = c.meta["date"][:10]
    return head + "".join(f"| {c.meta['gpu']} | {date} | {c.meta['commit']} | {' | '.join(r)} |\n" for r in c.rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="One GPU check (see the module doc)")
    p.add_argument("--dry-run", action="store_true", help="the whole flow on the CPU, tiny shapes (CI)")
    p.add_argument("--device", default="auto", help="the GPU (auto: the first)")
    p.add_argument("--out", type=Path, default=None, help="where gpu_*.json go (default: benchmarks/results; "
                                                          "the dry run: a temporary folder)")
    p.add_argument("--budget-s", type=float, default=None,
                   help=f"start no step after this many seconds (default: {GPU_BUDGET_S:.0f}; the dry run: none)")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma list of {list(STEPS)}")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="  %(message)s")  # the benchmark's per-batch lines
    steps = [s for s in args.steps.split(",") if s]
    if unknown := set(steps) - set(STEPS):
        p.error(f"unknown steps {sorted(unknown)}; choose from {list(STEPS)}")
    if args.dry_run:
        if args.device not in ("auto", "cpu"):
            p.error("--dry-run runs on the CPU")
        os.environ["TRITON_INTERPRET"] = "1"  # before any Triton kernel is defined
        os.environ.setdefault(BACKEND_ENV, "triton")  # the GPU's path, interpreted
        args.device = "cpu"
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; run it where one is, or with --dry-run", file=sys.stderr)
        return 2
    budget_s = args.budget_s if args.budget_s is not None else math.inf if args.dry_run else GPU_BUDGET_S
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        out = args.out or (Path(tmp) / "results" if args.dry_run else REPO / "benchmarks" / "results")
        out.mkdir(parents=True, exist_ok=True)
        c = Check(DRY if args.dry_run else GPU, out, Path(tmp), args.device, budget_s)
        for name in steps:
            if c.elapsed() > budget_s:
                c.row(name, f"skipped: {c.elapsed():.0f} s past --budget-s {budget_s:.0f}", False)
                continue
            print(f"== {time.strftime('%H:%M:%S')} {name} ({c.elapsed():.0f} s in)", flush=True)
            STEPS[name](c)
        rows = benchmarks_rows(c)
        (out / "gpu_rows.md").write_text(rows)
    print(f"\n{rows}\ngpu_check: {len(steps)} steps in {c.elapsed():.0f} s on {c.meta['gpu']}; "
          + (f"FAILED: {', '.join(c.failed)}" if c.failed else "all passed"), flush=True)
    return 1 if c.failed else 0


if __name__ == "__main__":
    sys.exit(main())
