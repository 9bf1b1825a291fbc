"""The numbers behind docs/SCALE_OUT.md: memory per rank, bytes communicated per layer and projected GPTQ
time for ERNIE-4.5-21B-A3B and ERNIE-4.5-300B-A47B on 1 GPU, 8 GPUs and 2 nodes of 8.

    python benchmarks/scale_plan.py [--rates benchmarks/results/gptq_speed.json]
        [--out benchmarks/results/scale_plan.json]

Everything is arithmetic on the published configs (``MODELS``) except the GPTQ rates, read from
``gptq_speed.json`` (the batched loop's weights per CPU second, one thread: the row of each codec at the
model's expert shapes), and the assumptions ``ASSUMED`` states (calibration tokens, the GPU rate, link
bandwidths), each printed with the result. Per decoder layer, one Hessian ``X^T X / T`` (float32 [K, K])
per distinct input (a *site*: q/k/v share one, gate/up share one, every routed expert has two):

- calibration is data-parallel: every rank runs T / R of the tokens through the layer and holds the whole
  layer (bf16 weights, float32 Hessian sums); the sums are then reduced. A ring all-reduce sends
  2 (R - 1) / R x S bytes per rank for S bytes of sums; ``add_upper_gram`` accumulates only the upper
  triangle, so S can be K (K + 1) / 2 x 4 per site; with weight-parallel GPTQ a reduce-scatter to the
  owner of each site (half an all-reduce) is all that is needed;
- GPTQ is weight-parallel: the layer's tensors, balanced by weight count, are split over the R ranks; each
  encodes its share in chunks of ``ACCELERATOR_CHUNK_BYTES`` (``gptq_experts.experts_per_chunk``).

The projected wall time is encoding only (weights / rate / R, the plan balanced) plus the reduction at the
assumed bandwidth; the calibration forward passes are not projected (not measured yet).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from ernieq.calibration.gptq_experts import ACCELERATOR_CHUNK_BYTES, experts_per_chunk
from ernieq.provenance import git_commit

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Model:
    """The shapes that matter here, from the published config.json (baidu/ERNIE-4.5-*-PT)."""

    name: str
    layers: int
    first_moe: int  # moe_layer_start_index: layers before it have a dense MLP
    hidden: int  # H
    dense_inter: int  # intermediate_size of the dense MLP layers
    moe_inter: int  # I, one routed expert's width
    experts: int  # E
    shared: int  # shared experts (each of width I)
    heads: int
    kv_heads: int
    head_dim: int


MODELS = [
    Model("ERNIE-4.5-21B-A3B", 28, 1, 2560, 12288, 1536, 64, 2, 20, 4, 128),
    Model("ERNIE-4.5-300B-A47B", 54, 3, 8192, 28672, 3584, 64, 0, 64, 8, 128),
]
SETUPS = {"1 GPU": (1, 1), "8 GPUs": (1, 8), "2 nodes of 8": (2, 8)}  # name -> (nodes, GPUs per node)
ASSUMED = {
    "calibration_tokens": 64 * 512,  # ernieq calibrate's default --tokens
    "gpu_gptq_weights_per_s": 100e6,  # issue 15's GPU target: NOT measured (no GPU lent yet)
    "intra_node_bus_gb_s": 300.0,  # NCCL all-reduce bus bandwidth within an NVLink node (assumed)
    "inter_node_bus_gb_s": 40.0,  # ... across nodes, one 400 Gb/s NIC per GPU (assumed)
    "w4_moe_share": 4 / 51,  # --bits 2: wint4 experts in the first ceil(4/51 x MoE layers), ccq2 after
}
BF16, F32 = 2, 4


def sites(m: Model, moe: bool) -> list[int]:
    """K of every Hessian of one decoder layer (one per distinct input)."""
    attn = [m.hidden, m.heads * m.head_dim]  # q/k/v read x, o reads the heads
    if not moe:
        return attn + [m.hidden, m.dense_inter]  # gate/up, down
    shared = [m.hidden, m.shared * m.moe_inter] if m.shared else []
    return attn + shared + [m.hidden, m.moe_inter] * m.experts


def weights(m: Model, moe: bool) -> dict[str, int]:
    """Linear weights of one decoder layer by class (routed experts apart: their codec differs)."""
    q, kv = m.heads * m.head_dim, m.kv_heads * m.head_dim
    other = m.hidden * (2 * q + 2 * kv)
    if not moe:
        return {"other": other + 3 * m.hidden * m.dense_inter}
    return {"other": other + 3 * m.hidden * m.shared * m.moe_inter, "experts": 3 * m.hidden * m.moe_inter * m.experts}


def hessian_bytes(ks: list[int]) -> dict[str, int]:
    return {"full": sum(F32 * k * k for k in ks), "upper": sum(F32 * k * (k + 1) // 2 for k in ks)}


def rates(path: Path, m: Model) -> dict[str, float]:
    """Measured batched GPTQ weights per CPU second by codec at ``m``'s expert shapes: the mean over its rows
    (gate/up, gate+up sharing a Hessian, down), weighted as a layer has them."""
    rows = json.loads(path.read_text())["rows"]
    out = {}
    for codec in ("ccq2", "wint4", "wint8"):
        mine = [r for r in rows if r["codec"] == codec and {r["n"], r["k"]} == {m.hidden, m.moe_inter}]
        gate = [r for r in mine if r["k"] == m.hidden and "gate+up" in r["shape"]] or \
               [r for r in mine if r["k"] == m.hidden]
        down = [r for r in mine if r["k"] == m.moe_inter]
        if gate and down:  # 2 gate/up weights at the gate+up rate, 1 down
            per = lambda r: 1 / r["batched"]["weights_per_cpu_s"]
            out[codec] = 3 / (2 * per(gate[0]) + per(down[0]))
    return out


def plan(m: Model, rate_file: Path) -> dict:
    moe_layers = m.layers - m.first_moe
    w4_layers = math.ceil(ASSUMED["w4_moe_share"] * moe_layers)
    dense_w, moe_w = weights(m, False), weights(m, True)
    by_codec = {
        "wint8": m.first_moe * dense_w["other"] + moe_layers * moe_w["other"],
        "wint4": w4_layers * moe_w["experts"],
        "ccq2": (moe_layers - w4_layers) * moe_w["experts"],
    }
    layer_h = hessian_bytes(sites(m, True))
    model_h = {k: m.first_moe * hessian_bytes(sites(m, False))[k] + moe_layers * layer_h[k] for k in layer_h}
    cpu = rates(rate_file, m)
    cpu_s = {c: by_codec[c] / cpu[c] for c in by_codec if c in cpu}
    tokens = ASSUMED["calibration_tokens"]
    per_chunk = experts_per_chunk(m.moe_inter, m.hidden, ACCELERATOR_CHUNK_BYTES)
    setups = {}
    for name, (nodes, per_node) in SETUPS.items():
        r = nodes * per_node
        ring = 2 * (r - 1) / r  # all-reduce bytes sent per rank, per byte reduced
        bus = ASSUMED["intra_node_bus_gb_s"] if nodes == 1 else ASSUMED["inter_node_bus_gb_s"]
        reduce_s = ring * model_h["upper"] / (bus * 1e9) if r > 1 else 0.0
        gptq_s = sum(by_codec.values()) / ASSUMED["gpu_gptq_weights_per_s"] / r
        chunk = min(per_chunk, math.ceil(2 * m.experts / r))  # a rank's gate and up weights of one layer at most
        setups[name] = {
            "ranks": r,
            "calibration_memory_per_rank_bytes": {  # the whole MoE layer on every rank, and its tokens' states
                "layer_weights_bf16": BF16 * sum(moe_w.values()),
                "hessian_sums_f32": layer_h["full"],
                "hidden_states_bf16": 2 * BF16 * math.ceil(tokens / r) * m.hidden,  # input and output of the layer
            },
            "gptq_memory_per_rank_bytes": {
                "experts_chunk": chunk * (F32 * (3 * m.moe_inter * m.hidden + 2 * m.hidden ** 2)
                                          + m.moe_inter * m.hidden),
                "experts_per_chunk": chunk,
                "layer_share_bf16": math.ceil(BF16 * sum(moe_w.values()) / r),
            },
            "allreduce_bytes_sent_per_rank_per_moe_layer": {k: ring * v for k, v in layer_h.items()},
            "reduce_scatter_bytes_sent_per_rank_per_moe_layer": {k: ring / 2 * v for k, v in layer_h.items()},
            "allreduce_bytes_sent_per_rank_model_upper": ring * model_h["upper"],
            "projected_hessian_reduce_s": reduce_s,
            "projected_gptq_s_at_gpu_rate": gptq_s,
            "projected_gptq_cpu_thread_hours_over_ranks": sum(cpu_s.values()) / 3600 / r,
        }
    return {
        "model": asdict(m), "moe_layers": moe_layers, "wint4_moe_layers": w4_layers,
        "weights_by_codec": by_codec, "hessian_bytes_per_moe_layer": layer_h, "hessian_bytes_model": model_h,
        "sites_per_moe_layer": len(sites(m, True)),
        "measured_cpu_weights_per_s_one_thread": cpu, "gptq_cpu_thread_hours": {c: s / 3600 for c, s in cpu_s.items()},
        "setups": setups,
    }


def gb(x: float) -> str:
    return f"{x / 1e9:.2f} GB"


def markdown(result: dict) -> str:
    lines = []
    for p in result["plans"]:
        m = p["model"]
        lines += [f"### {m['name']}", "",
                  f"- {p['moe_layers']} MoE layers ({p['wint4_moe_layers']} wint4, the rest ccq2) of "
                  f"{m['experts']} experts; {p['sites_per_moe_layer']} Hessians per MoE layer: "
                  f"{gb(p['hessian_bytes_per_moe_layer']['full'])} float32 "
                  f"({gb(p['hessian_bytes_per_moe_layer']['upper'])} as upper triangles); the model's "
                  f"{gb(p['hessian_bytes_model']['upper'])} (upper)",
                  "- weights by codec (`--bits 2`): " + ", ".join(f"{c} {n / 1e9:.2f} B"
                                                               for c, n in p["weights_by_codec"].items()),
                  "- measured batched GPTQ, one CPU thread: " + ", ".join(
                      f"{c} {r / 1e6:.2f} M weights/s -> {p['gptq_cpu_thread_hours'][c]:.1f} thread-hours"
                      for c, r in p["measured_cpu_weights_per_s_one_thread"].items()),
                  "",
                  "| setup | ranks | calibration memory per rank (layer bf16 + Hessian sums + hidden states) "
                  "| GPTQ chunk per rank | all-reduce sent per rank per MoE layer (full / upper) "
                  "| Hessian reduce, whole model (assumed bandwidth) | GPTQ at the GPU target "
                  "| hours on R CPU threads instead |",
                  "|---|---:|---|---:|---:|---:|---:|---:|"]
        for name, s in p["setups"].items():
            c, g, a = (s["calibration_memory_per_rank_bytes"], s["gptq_memory_per_rank_bytes"],
                       s["allreduce_bytes_sent_per_rank_per_moe_layer"])
            lines.append(
                f"| {name} | {s['ranks']} | {gb(sum(c.values()))} ({gb(c['layer_weights_bf16'])} + "
                f"{gb(c['hessian_sums_f32'])} + {gb(c['hidden_states_bf16'])}) | {gb(g['experts_chunk'])} "
                f"({g['experts_per_chunk']} experts) | {gb(a['full'])} / {gb(a['upper'])} "
                f"| {s['projected_hessian_reduce_s']:.1f} s | {s['projected_gptq_s_at_gpu_rate'] / 60:.1f} min "
                f"| {s['projected_gptq_cpu_thread_hours_over_ranks']:.1f} h |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", type=Path, default=REPO / "benchmarks/results/gptq_speed.json")
    parser.add_argument("--out", type=Path, default=None, help="e.g. benchmarks/results/scale_plan.json")
    args = parser.parse_args()
    rate_meta = json.loads(args.rates.read_text())["meta"]
    result = {
        "meta": {"command": "python benchmarks/scale_plan.py " + " ".join(sys.argv[1:]),
                 "commit": git_commit(short=True),
                 "rates_from": {"file": str(args.rates.relative_to(REPO)) if args.rates.is_relative_to(REPO)
                                else str(args.rates), **{k: rate_meta[k] for k in ("commit", "date", "machine")}},
                 "assumed": ASSUMED},
        "plans": [plan(m, args.rates) for m in MODELS],
    }
    result["markdown"] = markdown(result)
    print(result["markdown"])
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
