"""The benchmark's cases: dense GEMMs and whole MoE layers, timed, checked and swept.

Shape legend: M rows of x (tokens), N output features, K input features,
E experts, A active experts per token, H hidden size, I expert intermediate size.

One ``Plan`` says how a run measures (device, backend, timer, baselines); the
same case code serves the GPU run (Triton kernels, ``triton.testing.do_bench``),
the dry run (the kernels under the Triton interpreter, one timed call) and the
CPU run (the reference path, ``time.perf_counter`` medians).

Robust by construction: every case runs in its own try block and a failure is
written into the table (the error, not a number); past the plan's deadline no
new case starts and the rest are marked skipped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from ernieq.bench.inputs import CODECS, Model, looped_moe, route, synthetic
from ernieq.bench.report import Report, Row, rel_err, timed_row
from ernieq.bench.timing import Timer
from ernieq.kernels.args import MoEWeights
from ernieq.kernels.configs import TileConfig
from ernieq.kernels.tile_table import make_entry

log = logging.getLogger(__name__)

REL_TOL = 3e-2  # bf16 output vs fp32 reference, relative to max|ref|
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


# ---- the plan ------------------------------------------------------------------------------------


def _triton_kernels():
    from ernieq.kernels.dequant_gemm import linear
    from ernieq.kernels.fused_moe import moe

    return linear, moe


def _reference_kernels():
    from ernieq.kernels import reference

    def linear(x, q, config=None):
        return reference.linear(x, q)

    def moe(x, ids, w, weights, config=None):
        return reference.moe(x, ids, w, weights)

    return linear, moe


KERNELS = {"triton": _triton_kernels, "reference": _reference_kernels}  # backend -> () -> (linear, moe)


@dataclass
class Plan:
    """How one run measures.

    backend: "triton" (the fused kernels, taking ``config=``) or "reference" (decode + matmul).
    baselines: dense torch.matmul in these dtypes; the first is the speed-up base and the MoE baseline's dtype.
    check_max_m: compare with the reference for M <= this (0: never; the reference against itself says nothing).
    gpu: the tile table's key for sweep results; tuned: the entries the sweep found.
    """

    device: torch.device
    backend: str
    timer: Timer
    act_dtype: torch.dtype
    baselines: tuple[torch.dtype, ...]
    check_max_m: int
    bandwidth_gbps: float
    deadline: float
    gen: torch.Generator
    sweep: bool = False
    gpu: str = ""
    source: str = ""
    tuned: list[dict] = field(default_factory=list)

    def kernels(self):
        return KERNELS[self.backend]()

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline

    def randn(self, *shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen, device=self.device) * scale


def _error(model: str, kind: str, codec: str, m: int, what: str, exc: Exception) -> Row:
    log.warning("%s %s %s M=%d: %s%r", model, kind, codec, m, what, exc)
    return Row(model, kind, codec, m, note=f"ERROR{what}: {exc!r}"[:200])


def _check(err: float | None) -> str:
    return "" if err is None or err <= REL_TOL else f"FAIL: error above {REL_TOL}"


# ---- dense GEMMs ---------------------------------------------------------------------------------


def dense_sweep_configs(m: int) -> Iterator[TileConfig]:
    """Tile candidates for x [M, K] @ W.T: one BLOCK_M for M, BLOCK_N x BLOCK_K x split-K around the heuristic."""
    bm = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
    for bn in (32, 64, 128):
        for bk in (64, 128):
            for split in (1, 2, 4, 8) if m <= 64 else (1,):
                yield TileConfig(block_m=bm, block_n=bn, block_k=bk, split_k=split, num_warps=4, num_stages=4)


def dense_cases(plan: Plan, model: Model, kinds: list[str], m_list, codecs: list[str], report: Report) -> None:
    """Every (GEMM kind, M, codec) of ``model``: the baselines, then each codec; one row each."""
    linear, _ = plan.kernels()
    shapes = model.dense_shapes()
    for kind in kinds:
        n, k = shapes[kind]
        w = plan.randn(n, k)  # [N, K] float32
        base_w = {dt: w.to(dt) for dt in plan.baselines}
        del w
        weights = {}
        for codec in codecs:
            try:
                weights[codec] = synthetic(codec, CODECS[codec], (n, k), plan.device, plan.gen)
            except Exception as exc:  # noqa: BLE001 - reported in the table, see module doc
                report.rows.append(_error(model.name, kind, codec, 0, " building weight", exc))
        for m in m_list:
            x = plan.randn(m, k).to(plan.act_dtype)  # [M, K]
            base_ms = _dense_baselines(plan, model.name, kind, x, base_w, report)
            for codec, q in weights.items():
                if plan.out_of_time():
                    report.rows.append(Row(model.name, kind, codec, m, note="skipped: time budget"))
                    continue
                try:
                    report.rows.append(_dense_codec_row(plan, linear, model.name, kind, x, q, base_ms))
                except Exception as exc:  # noqa: BLE001
                    report.rows.append(_error(model.name, kind, codec, m, "", exc))
                report.write()
        del base_w, weights
        _free_cache(plan.device)


def _dense_baselines(plan: Plan, model: str, kind: str, x: torch.Tensor, base_w: dict, report: Report):
    """A row per baseline dtype (torch.matmul); returns the first one's ms (None if it did not run)."""
    (m, k), n = x.shape, base_w[plan.baselines[0]].shape[0]
    base_ms = None
    for dt in plan.baselines:
        name = f"{DTYPE_NAMES[dt]} matmul"
        if plan.out_of_time():
            report.rows.append(Row(model, kind, name, m, note="skipped: time budget"))
            continue
        try:
            xb, wb = x.to(dt), base_w[dt]  # [M, K], [N, K]
            ms = plan.timer(lambda xb=xb, wb=wb: torch.matmul(xb, wb.T))
            base_ms = ms if dt == plan.baselines[0] else base_ms
            nbytes = (n * k + m * k + m * n) * wb.element_size()  # W and x read, y written
            report.rows.append(timed_row(model, kind, name, m, ms, 2 * m * n * k, nbytes, plan.bandwidth_gbps,
                                         None, None))  # fmt: skip
        except Exception as exc:  # noqa: BLE001
            report.rows.append(_error(model, kind, name, m, "", exc))
    return base_ms


def _dense_codec_row(plan: Plan, linear, model: str, kind: str, x: torch.Tensor, q, base_ms: float | None) -> Row:
    """Check (small M), time and, with --sweep, tune linear(x, q)."""
    (m, k), n = x.shape, q.shape[0]
    err = _dense_error(plan, linear, x, q)
    ms = plan.timer(lambda: linear(x, q))
    note = _check(err)
    if plan.sweep:
        note = (note + " " + _sweep_dense(plan, linear, x, q, ms)).strip()
    nbytes = q.nbytes + (m * k + m * n) * x.element_size()  # packed W and x read, y written
    return timed_row(model, kind, q.codec, m, ms, 2 * m * n * k, nbytes, plan.bandwidth_gbps, base_ms, err, note)


def _dense_error(plan: Plan, linear, x: torch.Tensor, q, config: TileConfig | None = None) -> float | None:
    if x.shape[0] > plan.check_max_m:
        return None
    from ernieq.kernels import reference

    return rel_err(linear(x, q, config=config), reference.linear(x, q))


def _sweep_dense(plan: Plan, linear, x: torch.Tensor, q, default_ms: float) -> str:
    """Time the default tiles and every candidate; keep the fastest as a tile-table entry. Returns a note."""
    from ernieq.kernels.configs import linear_config
    from ernieq.kernels.dequant_gemm import is_interpreted

    (m, k), n = x.shape, q.shape[0]
    default = linear_config(m, n, k, x.device, is_interpreted(), codec=q.codec)
    timed = [(default_ms, default)] + [(plan.timer(lambda c=c: linear(x, q, config=c)), c) for c in
                                       dense_sweep_configs(m) if c != default]  # fmt: skip
    best_ms, best = min(timed, key=lambda p: p[0])
    if _check(_dense_error(plan, linear, x, q, best)):
        return f"FAIL: sweep winner {best} above the error bound"
    plan.tuned.append(make_entry("linear", plan.gpu, q.codec, m, n, k, best, us=round(best_ms * 1e3, 2),
                                 default_us=round(default_ms * 1e3, 2), source=plan.source))  # fmt: skip
    return f"best sweep {best_ms * 1e3:.1f} us: {best}"


# ---- whole MoE layers ----------------------------------------------------------------------------


def moe_sweep_configs() -> Iterator[TileConfig]:
    """Tile candidates for the fused MoE (split-K does not apply)."""
    for bm in (16, 32, 64):
        for bn in (64, 128):
            for bk in (64, 128):
                yield TileConfig(block_m=bm, block_n=bn, block_k=bk, group_m=8, num_warps=4, num_stages=3)


@dataclass
class MoeInputs:
    """One batch for every codec: x [T, H], topk ids and weights [T, A], and the baseline's median ms."""

    x: torch.Tensor
    ids: torch.Tensor
    weights: torch.Tensor
    active: int  # experts that received tokens
    base_ms: float

    def act_bytes(self, inter: int) -> int:
        """x read, out written, h [T * A, I] written and read."""
        t, h = self.x.shape
        return (2 * t * h + 2 * self.ids.numel() * inter) * self.x.element_size()


def _moe_inputs(plan: Plan, model: Model, t: int, base_cache: dict, report: Report) -> MoeInputs:
    """Random x and routing for T tokens, and the looped baseline timed on them (a row)."""
    e, h, i, a = model.experts, model.hidden, model.inter, model.top_k
    base_dtype = plan.baselines[0]
    x = plan.randn(t, h).to(plan.act_dtype)  # [T, H]
    ids, w = route(t, e, a, plan.device, plan.gen)  # [T, A], [T, A]
    for expert in torch.unique(ids).tolist():  # the baseline's (gate, up, down), made for active experts only
        if expert not in base_cache:
            base_cache[expert] = tuple(plan.randn(*s, scale=0.02).to(base_dtype) for s in ((i, h), (i, h), (h, i)))
    xb = x.to(base_dtype)
    base_ms = plan.timer(lambda: looped_moe(xb, ids, w, base_cache))
    batch = MoeInputs(x, ids, w, torch.unique(ids).numel(), base_ms)
    nbytes = batch.active * 3 * h * i * xb.element_size() + batch.act_bytes(i)
    report.rows.append(timed_row(model.name, "MoE layer", f"{DTYPE_NAMES[base_dtype]} looped", t, base_ms,
                                 6 * t * a * h * i, nbytes, plan.bandwidth_gbps, None, None))  # fmt: skip
    return batch


def moe_cases(plan: Plan, model: Model, m_list, codecs: list[str], report: Report) -> None:
    """The routed experts of one layer for every (codec, T): fused (or reference) vs a looped torch MoE."""
    _, moe = plan.kernels()
    e, h, i = model.experts, model.hidden, model.inter
    base_cache: dict = {}  # expert -> the baseline's (gate, up, down)
    batches: dict[int, MoeInputs] = {}  # T -> the same inputs for every codec
    for codec in codecs:
        try:
            gate, up, down = (synthetic(codec, CODECS[codec], (e, *s), plan.device, plan.gen)
                              for s in ((i, h), (i, h), (h, i)))  # fmt: skip
        except Exception as exc:  # noqa: BLE001
            report.rows.append(_error(model.name, "MoE layer", codec, 0, " building weights", exc))
            continue
        for t in m_list:
            if plan.out_of_time():
                report.rows.append(Row(model.name, "MoE layer", codec, t, note="skipped: time budget"))
                continue
            try:
                if t not in batches:
                    batches[t] = _moe_inputs(plan, model, t, base_cache, report)
                report.rows.append(_moe_codec_row(plan, moe, model, batches[t], MoEWeights(gate, up, down)))
            except Exception as exc:  # noqa: BLE001
                report.rows.append(_error(model.name, "MoE layer", codec, t, "", exc))
            report.write()
        del gate, up, down
        _free_cache(plan.device)


def _moe_codec_row(plan: Plan, moe, model: Model, batch: MoeInputs, weights: MoEWeights) -> Row:
    """Check (small T), time and, with --sweep, tune the MoE layer on ``batch``."""
    x, ids, w = batch.x, batch.ids, batch.weights
    gate, up, down = weights.projections
    t, (e, i, h), a = x.shape[0], gate.shape, ids.shape[1]
    err = _moe_error(plan, moe, x, ids, w, weights)
    ms = plan.timer(lambda: moe(x, ids, w, weights))
    notes = [f"{batch.active} experts active", _check(err)]
    if plan.sweep:
        notes.append(_sweep_moe(plan, moe, x, ids, w, weights, ms))
    nbytes = batch.active * (gate.nbytes + up.nbytes + down.nbytes) / e + batch.act_bytes(i)  # active experts only
    return timed_row(model.name, "MoE layer", gate.codec, t, ms, 6 * t * a * h * i, nbytes, plan.bandwidth_gbps,
                     batch.base_ms, err, "; ".join(n for n in notes if n))  # fmt: skip


def _moe_error(plan: Plan, moe, x, ids, w, weights: MoEWeights, config: TileConfig | None = None) -> float | None:
    if x.shape[0] > plan.check_max_m:
        return None
    from ernieq.kernels import reference

    return rel_err(moe(x, ids, w, weights, config=config), reference.moe(x, ids, w, weights))


def _sweep_moe(plan: Plan, moe, x, ids, w, weights: MoEWeights, default_ms: float) -> str:
    """As ``_sweep_dense`` for the fused MoE, keyed by M = T * A pairs, N = I, K = H."""
    from ernieq.kernels.configs import moe_config
    from ernieq.kernels.dequant_gemm import is_interpreted

    gate = weights.gate
    e, inter, hidden = gate.shape
    pairs = ids.numel()
    default = moe_config(pairs, e, x.device, is_interpreted(), codec=gate.codec, n=inter, k=hidden)
    timed = [(default_ms, default)] + [(plan.timer(lambda c=c: moe(x, ids, w, weights, config=c)), c)
                                       for c in moe_sweep_configs() if c != default]  # fmt: skip
    best_ms, best = min(timed, key=lambda p: p[0])
    if _check(_moe_error(plan, moe, x, ids, w, weights, best)):
        return f"FAIL: sweep winner {best} above the error bound"
    plan.tuned.append(make_entry("moe", plan.gpu, gate.codec, pairs, inter, hidden, best,
                                 us=round(best_ms * 1e3, 2), default_us=round(default_ms * 1e3, 2),
                                 source=plan.source))  # fmt: skip
    return f"best sweep {best_ms * 1e3:.1f} us: {best}"


def _free_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
