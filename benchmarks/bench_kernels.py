"""GPU benchmark of ernieq's Triton kernels: correctness against the reference, then speed.

    python benchmarks/bench_kernels.py --out benchmarks/results/kernels_<gpu>.md [--quick] [--budget-s 420]
    python benchmarks/bench_kernels.py --out ... --sweep      # also try a few tile configs per dense case

Shape legend: M rows of x (tokens), N output features, K input features,
E experts, A active experts per token, H hidden size, I expert intermediate size.

For ERNIE-4.5-21B-A3B and ERNIE-4.5-300B-A47B shapes (attention q/o projections,
one expert's gate/up and down as a dense GEMM, and the whole fused MoE layer),
every codec and M in {1, 4, 16, 64} (decode) and {512, 4096} (prefill):

- median time by ``triton.testing.do_bench``;
- TFLOP/s (2 M N K per GEMM; 6 T A H I per MoE layer) and GB/s (weight bytes
  read, active experts only for MoE, plus activations in and out);
- % of the HBM bandwidth measured in the same run by a device-to-device copy;
- speed-up over bf16 ``torch.matmul`` (dense) and over a bf16 looped MoE
  (one torch GEMM per active expert, as serving without a fused kernel does);
- the largest error against ``ernieq.kernels.reference`` (decode + fp32 matmul)
  relative to the output's largest value, for M <= 64.

Weights are synthetic: random bytes in each codec's stored layout (ccq2 with
per-channel code grids from the encoder's pool), because timing depends only on
the layout and encoding a 300B layer would take hours. Correctness of the codecs
themselves is the test suite's job.

Robust by construction: every case runs in its own try block and a failure is
written into the table (the error, not a number); a time budget stops new cases
and marks the rest as skipped; the markdown file is rewritten after every case.
Without CUDA the script exits with status 2 and says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import logging
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger("bench_kernels")

M_DECODE = (1, 4, 16, 64)
M_PREFILL = (512, 4096)
CODECS = {
    "wint8": {},
    "wint4": {"group_size": 128, "symmetric": True},
    "fp8": {"block_size": 128},
    "ccq2": {},
}
CHECK_MAX_M = 64  # correctness against the reference for M <= this
REL_TOL = 3e-2  # bf16 output vs fp32 reference, relative to max|ref|


@dataclass(frozen=True)
class Model:
    name: str
    hidden: int  # H
    inter: int  # I, moe_intermediate_size
    experts: int  # E
    top_k: int  # A
    heads: int
    kv_heads: int
    head_dim: int

    def dense_shapes(self) -> dict[str, tuple[int, int]]:
        """(N, K) of the dense GEMMs benchmarked."""
        q = self.heads * self.head_dim
        return {
            "attn q_proj": (q, self.hidden),
            "attn o_proj": (self.hidden, q),
            "expert gate/up": (self.inter, self.hidden),
            "expert down": (self.hidden, self.inter),
        }


MODELS = {
    "21B-A3B": Model("ERNIE-4.5-21B-A3B", hidden=2560, inter=1536, experts=64, top_k=6,
                     heads=20, kv_heads=4, head_dim=128),
    "300B-A47B": Model("ERNIE-4.5-300B-A47B", hidden=8192, inter=3584, experts=64, top_k=8,
                       heads=64, kv_heads=8, head_dim=128),
}  # fmt: skip


@dataclass
class Row:
    model: str
    kind: str
    codec: str
    m: int
    ms: float | None = None
    tflops: float | None = None
    gbps: float | None = None
    hbm_pct: float | None = None
    speedup: float | None = None
    rel_err: float | None = None
    note: str = ""


@dataclass
class Report:
    out: Path
    header: list[str] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)

    def write(self) -> None:
        f = lambda v, p: "" if v is None else f"{v:.{p}f}"  # noqa: E731
        lines = self.header + [
            "",
            "| model | GEMM | codec | M | median us | TFLOP/s | GB/s | % HBM | speed-up vs bf16 | max rel err | note |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in self.rows:
            us = None if r.ms is None else r.ms * 1e3
            err = "" if r.rel_err is None else f"{r.rel_err:.1e}"
            lines.append(
                f"| {r.model} | {r.kind} | {r.codec} | {r.m} | {f(us, 1)} | {f(r.tflops, 2)} | {f(r.gbps, 0)} "
                f"| {f(r.hbm_pct, 1)} | {f(r.speedup, 2)} | {err} | {r.note} |"
            )
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text("\n".join(lines) + "\n")


# ---- synthetic weights in each codec's stored layout ----------------------------------------


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def synthetic(codec: str, params: dict, shape: tuple[int, ...], device: torch.device, gen: torch.Generator):
    """A QuantizedTensor of ``shape`` ((N, K) or (E, N, K)) with random stored values in the codec's layout."""
    from ernieq.codecs import QuantizedTensor, get_codec

    lead, (n, k) = tuple(shape[:-2]), shape[-2:]

    def rand(*s):
        return torch.rand(*s, generator=gen, device=device)

    def bytes_(*s, lo=0, hi=256, dtype=torch.uint8):
        return torch.randint(lo, hi, s, generator=gen, device=device, dtype=torch.int32).to(dtype)

    if codec == "wint8":
        t = {"qweight": bytes_(*lead, n, k, lo=-127, hi=128, dtype=torch.int8), "scale": rand(*lead, n) * 1e-2 + 1e-3}
    elif codec == "wint4":
        g = params["group_size"]
        t = {"qweight": bytes_(*lead, n, _cdiv(k, 2)), "scale": rand(*lead, n, _cdiv(k, g)) * 1e-2 + 1e-3}
        if not params["symmetric"]:
            t["zero"] = bytes_(*lead, n, _cdiv(k, g), hi=16)
    elif codec == "fp8":
        b = params["block_size"]
        q = (torch.randn(*lead, n, k, generator=gen, device=device) * 64).clamp_(-448, 448).to(torch.float8_e4m3fn)
        s = rand(*lead, n) if b is None else rand(*lead, _cdiv(n, b), _cdiv(k, b))
        t = {"qweight": q, "scale": s * 1e-3 + 1e-4}
    elif codec == "ccq2":
        from ernieq.codecs.ccq2 import CODE_GRID_POOL

        pool = torch.tensor(CODE_GRID_POOL, device=device)  # [P, 2]: (code_scale, code_zp)
        pick = torch.randint(0, len(CODE_GRID_POOL), (*lead, n), generator=gen, device=device)
        t = {
            "quant_weight": bytes_(*lead, _cdiv(k, 4), n),
            "weight_scale": bytes_(*lead, _cdiv(k, 128), n),
            "super_scales": (rand(*lead, n) * 1e-3 + 1e-4).to(torch.bfloat16),
            "code_scale": pool[pick, 0].contiguous(),
            "code_zp": pool[pick, 1].contiguous(),
        }
    else:
        raise ValueError(f"no synthetic layout for codec {codec!r}")
    full_params = dataclasses.asdict(get_codec(codec, **params).config)
    return QuantizedTensor(codec, tuple(shape), t, full_params)


# ---- measurements ------------------------------------------------------------------------------


DRY_RUN = False  # --dry-run: the whole flow on the CPU, tiny shapes, one timed call per case


def bench_ms(fn) -> float:
    """Median milliseconds of fn() by triton.testing.do_bench (dry run: one call, wall clock)."""
    if DRY_RUN:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton

    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def measure_hbm_gbps(device: torch.device) -> float:
    """Device-to-device copy of 2 GiB (dry run: 64 MiB): (read + write bytes) / median time."""
    n = 2**26 if DRY_RUN else 2**31
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    del src, dst
    return 2 * n / (ms * 1e-3) / 1e9


def free_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()


def bf16_looped_moe(x, topk_ids, topk_weights, w_gate, w_up, w_down):
    """The baseline: one bf16 torch GEMM per active expert (w_*: bf16 [E, I, H] / [E, H, I])."""
    out = torch.zeros_like(x, dtype=torch.float32)
    for e in torch.unique(topk_ids).tolist():
        t_idx, a_idx = torch.nonzero(topk_ids == e, as_tuple=True)
        xe = x[t_idx]
        h = torch.nn.functional.silu(xe @ w_gate[e].T) * (xe @ w_up[e].T)
        out.index_add_(0, t_idx, (h @ w_down[e].T).float() * topk_weights[t_idx, a_idx, None])
    return out.to(x.dtype)


def route(t: int, e: int, a: int, device: torch.device, gen: torch.Generator):
    """Random top-A routing: A distinct experts per token, softmax-like weights."""
    ids = torch.rand(t, e, generator=gen, device=device).argsort(dim=1)[:, :a]  # [T, A]
    w = torch.rand(t, a, generator=gen, device=device)
    return ids, w / w.sum(dim=1, keepdim=True)


# ---- the cases -----------------------------------------------------------------------------------


def dense_cases(model: Model, m_list, codecs, device, gen, report, deadline, hbm, sweep):
    from ernieq.kernels import reference
    from ernieq.kernels.dequant_gemm import linear

    for kind, (n, k) in model.dense_shapes().items():
        w_bf16 = torch.randn(n, k, generator=gen, device=device).to(torch.bfloat16)
        weights = {}
        for codec in codecs:
            try:
                weights[codec] = synthetic(codec, CODECS[codec], (n, k), device, gen)
            except Exception as exc:  # noqa: BLE001 - reported in the table, see module doc
                report.rows.append(Row(model.name, kind, codec, 0, note=f"ERROR building weight: {exc!r}"[:200]))
        for m in m_list:
            x = torch.randn(m, k, generator=gen, device=device).to(torch.bfloat16)
            base_ms = None
            if time.monotonic() < deadline:
                try:
                    base_ms = bench_ms(lambda: torch.matmul(x, w_bf16.T))
                    report.rows.append(_row(model.name, kind, "bf16 matmul", m, base_ms, 2 * m * n * k,
                                            n * k * 2 + (m * k + m * n) * 2, hbm, None, None))  # fmt: skip
                except Exception as exc:  # noqa: BLE001
                    report.rows.append(Row(model.name, kind, "bf16 matmul", m, note=f"ERROR: {exc!r}"[:200]))
            for codec, q in weights.items():
                if time.monotonic() > deadline:
                    report.rows.append(Row(model.name, kind, codec, m, note="skipped: time budget"))
                    continue
                try:
                    err = rel_err(linear(x, q), reference.linear(x, q)) if m <= CHECK_MAX_M else None
                    ms = bench_ms(lambda: linear(x, q))
                    note = "" if err is None or err <= REL_TOL else f"FAIL: error above {REL_TOL}"
                    if sweep:
                        best = min(
                            ((bench_ms(lambda c=c: linear(x, q, config=c)), c) for c in _sweep_configs(m)),
                            key=lambda p: p[0],
                        )
                        note += f" best sweep {best[0] * 1e3:.1f} us: {best[1]}"
                    report.rows.append(_row(model.name, kind, codec, m, ms, 2 * m * n * k,
                                            q.nbytes + (m * k + m * n) * 2, hbm, base_ms, err, note))  # fmt: skip
                except Exception as exc:  # noqa: BLE001
                    report.rows.append(Row(model.name, kind, codec, m, note=f"ERROR: {exc!r}"[:200]))
                report.write()
        del w_bf16, weights
        free_cache()


def _sweep_configs(m: int):
    from ernieq.kernels.configs import TileConfig

    bm = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
    for bn in (32, 64, 128):
        for bk in (64, 128):
            for split in ((1, 2, 4, 8) if m <= 64 else (1,)):
                yield TileConfig(block_m=bm, block_n=bn, block_k=bk, split_k=split, num_warps=4, num_stages=4)


def moe_cases(model: Model, m_list, codecs, device, gen, report, deadline, hbm):
    from ernieq.kernels import reference
    from ernieq.kernels.fused_moe import moe

    e, h, i, a = model.experts, model.hidden, model.inter, model.top_k
    shapes = ((i, h), (i, h), (h, i))  # gate, up (E, I, H); down (E, H, I)
    bf16 = [torch.randn(e, *s, generator=gen, device=device).to(torch.bfloat16) * 0.02 for s in shapes]
    per_expert_bf16 = 3 * h * i * 2
    inputs: dict[int, tuple] = {}  # T -> (x, ids, w, active experts, bf16 looped ms): the same for every codec
    for codec in codecs:
        try:
            gate, up, down = (synthetic(codec, CODECS[codec], (e, *s), device, gen) for s in shapes)
        except Exception as exc:  # noqa: BLE001
            report.rows.append(Row(model.name, "MoE layer", codec, 0, note=f"ERROR building weights: {exc!r}"[:200]))
            continue
        per_expert = (gate.nbytes + up.nbytes + down.nbytes) / e
        for t in m_list:
            if time.monotonic() > deadline:
                report.rows.append(Row(model.name, "MoE layer", codec, t, note="skipped: time budget"))
                continue
            try:
                act_bytes = (t * h * 2) * 2 + t * a * i * 2 * 2  # x in, out, h written and read
                if t not in inputs:
                    x = torch.randn(t, h, generator=gen, device=device).to(torch.bfloat16)
                    ids, w = route(t, e, a, device, gen)
                    active = torch.unique(ids).numel()
                    base_ms = bench_ms(lambda: bf16_looped_moe(x, ids, w, *bf16))
                    inputs[t] = (x, ids, w, active, base_ms)
                    report.rows.append(_row(model.name, "MoE layer", "bf16 looped", t, base_ms, 6 * t * a * h * i,
                                            active * per_expert_bf16 + act_bytes, hbm, None, None))  # fmt: skip
                x, ids, w, active, base_ms = inputs[t]
                err = None
                if t <= CHECK_MAX_M:
                    err = rel_err(moe(x, ids, w, gate, up, down), reference.moe(x, ids, w, gate, up, down))
                ms = bench_ms(lambda: moe(x, ids, w, gate, up, down))
                note = f"{active} experts active"
                if err is not None and err > REL_TOL:
                    note += f"; FAIL: error above {REL_TOL}"
                report.rows.append(_row(model.name, "MoE layer", codec, t, ms, 6 * t * a * h * i,
                                        active * per_expert + act_bytes, hbm, base_ms, err, note))  # fmt: skip
            except Exception as exc:  # noqa: BLE001
                report.rows.append(Row(model.name, "MoE layer", codec, t, note=f"ERROR: {exc!r}"[:200]))
            report.write()
        del gate, up, down
        free_cache()


def _row(model, kind, codec, m, ms, flops, nbytes, hbm, base_ms, err, note=""):
    gbps = nbytes / (ms * 1e-3) / 1e9
    return Row(model, kind, codec, m, ms, flops / (ms * 1e-3) / 1e12, gbps, 100 * gbps / hbm,
               None if base_ms is None else base_ms / ms, err, note)  # fmt: skip


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="markdown file to write")
    p.add_argument("--quick", action="store_true", help="M in {1, 16, 4096} only")
    p.add_argument("--budget-s", type=float, default=420.0, help="start no new case after this many seconds")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {list(MODELS)}")
    p.add_argument("--codecs", default=",".join(CODECS), help=f"comma list of {list(CODECS)}")
    p.add_argument("--no-moe", action="store_true")
    p.add_argument("--no-dense", action="store_true")
    p.add_argument("--sweep", action="store_true", help="also try a few tile configs per dense case")
    p.add_argument("--dry-run", action="store_true", help="check the script on the CPU (TRITON_INTERPRET=1, tiny shapes)")
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.dry_run:
        return dry_run(args)
    if not torch.cuda.is_available():
        log.error(
            "bench_kernels: no CUDA GPU here; this benchmark times the Triton kernels on a GPU only "
            "(the CPU runs them under TRITON_INTERPRET in the tests, which says nothing about speed)"
        )
        return 2
    return run(args, torch.device("cuda"), MODELS, (1, 16, 4096) if args.quick else M_DECODE + M_PREFILL)


def dry_run(args) -> int:
    """The same flow on the CPU under the Triton interpreter, tiny shapes: checks the script, not speed."""
    global DRY_RUN
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        log.error("--dry-run runs the kernels on the CPU: set TRITON_INTERPRET=1 before starting python")
        return 2
    DRY_RUN = True
    tiny = Model("tiny (dry run)", hidden=64, inter=32, experts=4, top_k=2, heads=2, kv_heads=1, head_dim=32)
    try:
        return run(args, torch.device("cpu"), {key: tiny for key in MODELS}, (1, 3))
    finally:
        DRY_RUN = False


def run(args, device: torch.device, model_table: dict[str, Model], m_list) -> int:
    """Every case on ``device``; writes the report; 0 when all ran and matched the reference, else 1."""
    import triton

    start = time.monotonic()
    deadline = start + args.budget_s
    gen = torch.Generator(device=device).manual_seed(0)
    codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(codecs) - set(CODECS)) + sorted(set(models) - set(MODELS))
    if unknown:
        log.error("unknown codec(s)/model(s) %s; known: %s, %s", unknown, list(CODECS), list(MODELS))
        return 2

    hbm = measure_hbm_gbps(device)
    report = Report(args.out, header=[
        "# ernieq kernel benchmark",
        "",
        f"- GPU: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'none: DRY RUN on the CPU'}; "
        f"measured HBM copy bandwidth {hbm:.0f} GB/s",
        f"- date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; commit: {_commit()}",
        f"- torch {torch.__version__}, triton {triton.__version__}, python {platform.python_version()}",
        f"- command: `python benchmarks/bench_kernels.py {' '.join(args.argv)}`",
        "- activations bf16; weights synthetic in each codec's layout: "
        + ", ".join(f"{c} {CODECS[c]}" for c in codecs),
        "- speed-up: over bf16 torch.matmul (dense) or a bf16 looped MoE (MoE layer); GB/s counts weight bytes "
        "read (active experts only) plus activations; max rel err: vs the fp32 reference, / max|ref|, M <= 64",
    ])  # fmt: skip
    report.write()
    for key in models:
        model = model_table[key]
        if not args.no_dense:
            dense_cases(model, m_list, codecs, device, gen, report, deadline, hbm, args.sweep)
        if not args.no_moe:
            moe_cases(model, m_list, codecs, device, gen, report, deadline, hbm)
    report.header.append(f"- wall time {time.monotonic() - start:.0f} s")
    report.write()
    failures = [r for r in report.rows if r.note.startswith(("ERROR", "FAIL")) or "FAIL" in r.note]
    log.info("wrote %s: %d rows, %d errors/failures", args.out, len(report.rows), len(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
