"""Peak memory and time of ``ernieq quantize`` on synthetic checkpoints with ERNIE 4.5's shapes.

    python benchmarks/scale.py --layers 2 8 --settings w2,w4 --out benchmarks/results/scale.json
    python benchmarks/scale.py --layers 2 --experts 8 --settings w4        # a quick check, not the published shapes
    python benchmarks/scale.py --model 300b --layers 1 --vocab 1024 --gptq --settings w2 \
        --out benchmarks/results/scale_300b_layer.json

``--model 300b`` takes baidu/ERNIE-4.5-300B-A47B-PT's shapes (hidden 8192, 64 heads of 128, 8 KV heads,
64 routed experts of 3584, top-8, no shared experts); a cut shorter than its 3 dense layers is all MoE
layers. ``--gptq`` quantizes with ``--method gptq --calib DIR`` from a synthetic statistics folder
(``synthetic_stats``: the folder ``ernieq calibrate`` writes for a small copy of the model, its Hessians
refilled at full size; a 300B MoE layer has 130 of them, 20 GB).

The checkpoint has baidu/ERNIE-4.5-21B-A3B-PT's configuration (transformers'
``Ernie4_5_MoeConfig`` defaults: hidden 2560, 20 heads of 128, 4 KV heads,
vocabulary 103424, dense first layer with intermediate 12288, then MoE layers of
64 routed experts of 1536 and 2 shared experts, top-6) cut to ``--layers`` decoder
layers, per-expert tensor names as published, random bf16 weights N(0, 0.02).
It is written one shard per layer, tensor by tensor, so the builder never holds
more than one tensor. Each setting runs ``ernieq quantize`` as a subprocess and
records:

- peak RSS: ``ru_maxrss`` of the quantize process from ``os.wait4`` (the largest
  single process of its tree: the main process or one encoder worker);
- peak tree PSS: the largest sum of PSS (``/proc/<pid>/smaps_rollup``) over the
  quantize process and its workers, sampled every 0.5 s (shared pages counted once);
- wall seconds, and seconds per layer from the run's ``--log`` file (each group's
  encode-and-write time, summed per decoder layer).

With ``--nproc N`` quantize runs under ``torchrun --nproc-per-node N`` (gloo on the CPU): the peak RSS is
then the largest rank's (or worker's), the tree PSS all ranks' together, the seconds per layer rank-seconds.

Settings: ``w2`` = ``--bits 2`` (the FastDeploy recipe: wint4 experts in the first
ceil(4n/51) MoE layers, ccq2 after), ``w2-ccq2`` = ``--bits 2 --w4-moe-layers 0``
(ccq2 experts in every MoE layer), ``w4`` = ``--bits 4``, ``w8`` = ``--bits 8``.
Checkpoints and outputs live under ``--workdir`` and are deleted at the end
unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
from collections import defaultdict
from datetime import date
from pathlib import Path

import torch

from ernieq.provenance import git_commit, machine

REPO = Path(__file__).resolve().parent.parent

# baidu/ERNIE-4.5-21B-A3B-PT (transformers' Ernie4_5_MoeConfig defaults document the same values)
ERNIE_21B = {
    "architectures": ["Ernie4_5_MoeForCausalLM"],
    "model_type": "ernie4_5_moe",
    "vocab_size": 103424,
    "hidden_size": 2560,
    "intermediate_size": 12288,
    "num_attention_heads": 20,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "use_bias": False,
    "tie_word_embeddings": True,
    "moe_intermediate_size": 1536,
    "moe_k": 6,
    "moe_num_experts": 64,
    "moe_num_shared_experts": 2,
    "moe_layer_start_index": 1,
    "moe_layer_end_index": -1,
    "moe_layer_interval": 1,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "dtype": "bfloat16",
}
# baidu/ERNIE-4.5-300B-A47B-PT: 54 layers, MoE from layer 3 (51 MoE layers), 64 experts of 3584, top-8, no shared
# experts, 64 heads of 128 with 8 KV heads
ERNIE_300B = {**ERNIE_21B, "hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64,
              "num_key_value_heads": 8, "moe_intermediate_size": 3584, "moe_k": 8, "moe_num_shared_experts": 0,
              "moe_layer_start_index": 3}
MODELS = {"21b": ERNIE_21B, "300b": ERNIE_300B}
# a checkpoint of the same architecture and tensor names, every dimension small: calibrated for real, so its
# statistics folder (sites, routes, expert table, routers) is what ``ernieq calibrate`` writes (synthetic_stats)
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "moe_intermediate_size": 48, "vocab_size": 1024}
SETTINGS = {
    "w2": ["--bits", "2"],
    "w2-ccq2": ["--bits", "2", "--w4-moe-layers", "0"],
    "w4": ["--bits", "4"],
    "w8": ["--bits", "8"],
}
_DTYPE_NAMES = {torch.bfloat16: "BF16", torch.float32: "F32"}


# --- the synthetic checkpoint ---------------------------------------------------------------------

def layer_tensors(cfg: dict, layer: int) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(name, shape, dtype) of decoder layer ``layer``'s tensors, as the published checkpoint names them."""
    h, d = cfg["hidden_size"], cfg["head_dim"]
    p = f"model.layers.{layer}"
    out = [
        (f"{p}.input_layernorm.weight", (h,), torch.bfloat16),
        (f"{p}.post_attention_layernorm.weight", (h,), torch.bfloat16),
        (f"{p}.self_attn.q_proj.weight", (cfg["num_attention_heads"] * d, h), torch.bfloat16),
        (f"{p}.self_attn.k_proj.weight", (cfg["num_key_value_heads"] * d, h), torch.bfloat16),
        (f"{p}.self_attn.v_proj.weight", (cfg["num_key_value_heads"] * d, h), torch.bfloat16),
        (f"{p}.self_attn.o_proj.weight", (h, cfg["num_attention_heads"] * d), torch.bfloat16),
    ]
    if layer < cfg["moe_layer_start_index"]:
        i = cfg["intermediate_size"]
        return out + [(f"{p}.mlp.gate_proj.weight", (i, h), torch.bfloat16),
                      (f"{p}.mlp.up_proj.weight", (i, h), torch.bfloat16),
                      (f"{p}.mlp.down_proj.weight", (h, i), torch.bfloat16)]
    e, i = cfg["moe_num_experts"], cfg["moe_intermediate_size"]
    s = i * cfg["moe_num_shared_experts"]
    out += [(f"{p}.mlp.gate.weight", (e, h), torch.float32),
            (f"{p}.mlp.moe_statics.e_score_correction_bias", (1, e), torch.float32)]
    if s:
        out += [(f"{p}.mlp.shared_experts.gate_proj.weight", (s, h), torch.bfloat16),
                (f"{p}.mlp.shared_experts.up_proj.weight", (s, h), torch.bfloat16),
                (f"{p}.mlp.shared_experts.down_proj.weight", (h, s), torch.bfloat16)]
    for x in range(e):
        out += [(f"{p}.mlp.experts.{x}.gate_proj.weight", (i, h), torch.bfloat16),
                (f"{p}.mlp.experts.{x}.up_proj.weight", (i, h), torch.bfloat16),
                (f"{p}.mlp.experts.{x}.down_proj.weight", (h, i), torch.bfloat16)]
    return out


def _random(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    if name.endswith("e_score_correction_bias"):
        return torch.zeros(shape, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.02).to(dtype)


def write_shard(path: Path, specs: list[tuple[str, tuple[int, ...], torch.dtype]], seed: int) -> int:
    """A safetensors file written tensor by tensor (header first, then each tensor's bytes); returns its bytes."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dtype in specs:
        n = math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for i, (name, shape, dtype) in enumerate(specs):
            f.write(_random(name, shape, dtype, seed * 100_003 + i).contiguous().view(torch.uint8).numpy())
    return offset


def cut_config(model: dict, layers: int, experts: int) -> dict:
    """``model``'s config cut to ``layers`` decoder layers and ``experts`` routed experts; a cut too short to
    reach the first MoE layer has MoE from its last layer on; top-k at most the experts."""
    start = min(model["moe_layer_start_index"], layers - 1)
    return {**model, "num_hidden_layers": layers, "moe_num_experts": experts, "moe_layer_start_index": start,
            "moe_k": min(model["moe_k"], experts)}


def build_checkpoint(out: Path, cfg: dict, seed: int = 0) -> Path:
    """A synthetic checkpoint of config ``cfg`` (reused when complete)."""
    done = out / ".complete"
    if done.exists():
        return out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    layers = cfg["num_hidden_layers"]
    shards = [[("model.embed_tokens.weight", (cfg["vocab_size"], cfg["hidden_size"]), torch.bfloat16)]]
    shards += [layer_tensors(cfg, i) for i in range(layers)]
    shards[-1].append(("model.norm.weight", (cfg["hidden_size"],), torch.bfloat16))
    weight_map, total = {}, 0
    for i, specs in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        total += write_shard(out / name, specs, seed * 1000 + i)
        weight_map.update({n: name for n, _, _ in specs})
        print(f"  built {name} ({len(specs)} tensors)", file=sys.stderr, flush=True)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    done.write_text("")
    return out


def synthetic_hessian(k: int, seed: int, rank: int = 16) -> torch.Tensor:
    """An SPD float32 [K, K] like a layer input's: ``diag(s) (I + B^T B / r) diag(s)``, s log-normal per
    channel, B [r, K] a rank-r correlation (cheap at K = 8192, unlike X^T X of real tokens)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.exp(0.5 * torch.randn(k, generator=g))
    b = torch.randn(rank, k, generator=g)
    h = torch.addmm(torch.eye(k), b.T, b, alpha=1.0 / rank)
    return h.mul_(s[:, None]).mul_(s[None, :])


def synthetic_stats(out: Path, cfg: dict, workdir: Path, tokens: int = 4096) -> Path:
    """A calibration folder for the checkpoint of ``cfg`` (reused when complete): ``ernieq calibrate``'s
    own folder for a copy of ``cfg`` with every dimension small (``TINY``), its sites (the same names: one
    per distinct input) refilled at ``cfg``'s K with ``synthetic_hessian``, one file per site, so
    the builder holds one Hessian at a time (a 300B MoE layer's are 20 GB)."""
    from ernieq.calibration import CalibrationSet, SiteStats, collect_stats, load_stats, save_stats
    from ernieq.calibration.stats import begin_stats

    done = out / ".complete"
    if done.exists():
        return out
    tiny_cfg = {**cfg, **TINY}
    tiny = build_checkpoint(workdir / "tiny", tiny_cfg)
    ids = torch.randint(0, TINY["vocab_size"], (tokens // 256, 256), generator=torch.Generator().manual_seed(0))
    small = collect_stats(tiny, ids, progress=False, out=workdir / "tiny-stats")
    big_k = {TINY["hidden_size"]: cfg["hidden_size"], TINY["moe_intermediate_size"]: cfg["moe_intermediate_size"],
             TINY["intermediate_size"]: cfg["intermediate_size"]}
    store = begin_stats(out)
    for i, site in enumerate(sorted(small.sites)):
        k, g = big_k[small.sites[site].k], torch.Generator().manual_seed(i)
        scale = torch.exp(0.5 * torch.randn(k, generator=g))
        store[site] = SiteStats(synthetic_hessian(k, i), 0.8 * scale, 4 * scale, small.sites[site].tokens)
        store.flush()
        print(f"  statistics {i + 1}/{len(small.sites)}: {site} K={k}", file=sys.stderr, flush=True)
    save_stats(CalibrationSet(store, small.routes, small.all_token_routes, small.expert_of, small.experts,
                              small.routers, {**small.info, "synthetic": "benchmarks/scale.py synthetic_stats"}), out)
    load_stats(out)  # reads back
    shutil.rmtree(tiny)
    shutil.rmtree(workdir / "tiny-stats")
    done.write_text("")
    return out


# --- measuring a run ----------------------------------------------------------------------------

def _children(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc/<pid>/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            try:
                todo += [int(c) for c in task.read_text().split()]
            except OSError:
                continue
    return out


def _pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        return 0
    return 0


def run_measured(cmd: list[str]) -> dict:
    """Run ``cmd``; its wall time, ``ru_maxrss`` (KiB) and the peak PSS sum of its process tree (KiB)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)  # the summary table; errors go to stderr
    peak = {"pss": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.5):
            peak["pss"] = max(peak["pss"], sum(_pss_kib(p) for p in _children(proc.pid)))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    stop.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}: exit code {proc.returncode}")
    return {"wall_s": time.perf_counter() - start, "maxrss_kib": usage.ru_maxrss, "tree_pss_kib": peak["pss"]}


_GROUP_LINE = re.compile(r"(layers\.(\d+)\.\w+|embeddings|head)(?: \(\d+, \d+\))?: (\d+) weights in ([\d.]+) s")


def seconds_per_layer(log_file: Path) -> dict[int, float]:
    """Decoder layer → seconds its groups took, from the quantize log (``ernieq.quantize`` debug lines; under
    torchrun every rank's lines, a cut group's parts included: rank-seconds)."""
    per_layer: dict[int, float] = defaultdict(float)
    for m in _GROUP_LINE.finditer(log_file.read_text()):
        if m.group(2) is not None:
            per_layer[int(m.group(2))] += float(m.group(4))
    return dict(per_layer)


def quantize(ckpt: Path, setting: str, out: Path, log_file: Path, workers: int | None, first_moe: int,
             calib: Path | None = None, nproc: int = 1) -> dict:
    launcher = ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc)] if nproc > 1 else []
    cmd = [sys.executable, *launcher, "-m", "ernieq.cli", "--quiet", "--log-file", str(log_file), "quantize", str(ckpt),
           "--out", str(out), "--overwrite", *SETTINGS[setting]]
    if calib is not None:
        cmd += ["--calib", str(calib), "--method", "gptq"]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    log_file.unlink(missing_ok=True)
    row = run_measured(cmd)
    layers = seconds_per_layer(log_file)
    moe = [s for layer, s in layers.items() if layer >= first_moe]
    row.update({"seconds_by_layer": layers, "moe_layer_s_mean": sum(moe) / len(moe) if moe else None,
                "out_bytes": sum(p.stat().st_size for p in out.iterdir()), "command": " ".join(cmd[1:])})
    return row


# --- report -------------------------------------------------------------------------------------

def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"- machine: {meta['machine']}; torch {meta['torch']}; {meta['date']}; commit {meta['commit']}",
             f"- command: `{meta['command']}`",
             f"- load average (1 min) before / after: {meta['load_before']:.1f} / {meta['load_after']:.1f}", "",
             "| layers | experts | setting | ranks | workers | peak RSS (largest process) | peak PSS (process tree) "
             "| wall s | s per MoE layer (mean) | output |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        per = f"{r['moe_layer_s_mean']:.1f}" if r["moe_layer_s_mean"] is not None else "n/a"
        lines.append(f"| {r['layers']} | {r['experts']} | {r['setting']} | {r.get('nproc', 1)} | {r['workers']} | "
                     f"{r['maxrss_kib'] / 2**20:.2f} GiB | {r['tree_pss_kib'] / 2**20:.2f} GiB | {r['wall_s']:.0f} | "
                     f"{per} | {r['out_bytes'] / 2**30:.2f} GiB |")
    by_key = {(r["layers"], r["setting"], r["workers"]): r for r in rows}
    layer_counts = sorted({r["layers"] for r in rows})
    if len(layer_counts) >= 2:
        lo, hi = layer_counts[0], layer_counts[-1]
        lines.append("")
        for (layers, setting, workers), r in sorted(by_key.items(), key=str):
            base = by_key.get((lo, setting, workers))
            if layers == hi and base is not None:
                lines.append(f"- {setting}, {workers} workers: peak RSS {hi} / {lo} layers = "
                             f"{r['maxrss_kib'] / base['maxrss_kib']:.3f}x; tree PSS "
                             f"{r['tree_pss_kib'] / base['tree_pss_kib']:.3f}x")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 8], help="decoder layer counts")
    parser.add_argument("--model", choices=list(MODELS), default="21b", help="whose shapes")
    parser.add_argument("--experts", type=int, default=64,
                        help="routed experts per MoE layer (64 is the published shape; fewer for a quick check)")
    parser.add_argument("--vocab", type=int, default=None,
                        help="vocabulary size (default the model's; smaller to measure the decoder layers alone)")
    parser.add_argument("--gptq", action="store_true",
                        help="GPTQ from statistics: --method gptq --calib with a synthetic folder (synthetic_stats)")
    parser.add_argument("--settings", default="w2,w4", help=f"comma list of {', '.join(SETTINGS)}")
    parser.add_argument("--workers", default="default", help="comma list of --workers values ('default': not given)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ernieq-scale"), help="checkpoints and outputs")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints (outputs are always deleted)")
    parser.add_argument("--nproc", type=int, default=1,
                        help="run quantize under torchrun with this many processes (gloo on the CPU): the largest "
                             "process is then the largest rank, the tree PSS all ranks together")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        raise SystemExit(f"--settings: unknown {unknown}; known: {', '.join(SETTINGS)}")
    workers = [None if w == "default" else int(w) for w in args.workers.split(",")]
    meta = {"machine": machine(), "torch": torch.__version__, "date": date.today().isoformat(), "commit": git_commit(short=True),
            "command": "python benchmarks/scale.py " + " ".join(sys.argv[1:]), "load_before": os.getloadavg()[0]}
    rows = []
    for layers in args.layers:
        cfg = cut_config(MODELS[args.model], layers, args.experts)
        cfg["vocab_size"] = args.vocab or cfg["vocab_size"]
        name = f"ernie{args.model}-{layers}l-{args.experts}e-v{cfg['vocab_size']}"
        ckpt = build_checkpoint(args.workdir / name, cfg)
        calib = synthetic_stats(args.workdir / f"{name}-stats", cfg, args.workdir) if args.gptq else None
        for setting in settings:
            for w in workers:
                out, log_file = args.workdir / "q", args.workdir / "quantize.log"
                row = quantize(ckpt, setting, out, log_file, w, cfg["moe_layer_start_index"], calib, args.nproc)
                shutil.rmtree(out)
                row.update({"model": args.model, "gptq": args.gptq, "layers": layers, "experts": args.experts,
                            "setting": setting, "nproc": args.nproc,
                            "workers": w if w is not None else len(os.sched_getaffinity(0))})
                rows.append(row)
                print(f"{layers} layers {setting} workers {row['workers']}: peak RSS {row['maxrss_kib'] / 2**20:.2f} "
                      f"GiB, tree PSS {row['tree_pss_kib'] / 2**20:.2f} GiB, {row['wall_s']:.0f} s", file=sys.stderr,
                      flush=True)
                if args.out is not None:
                    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        if not args.keep:
            shutil.rmtree(ckpt)
            if calib is not None:
                shutil.rmtree(calib)
    meta["load_after"] = os.getloadavg()[0]
    if args.out is not None:
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
