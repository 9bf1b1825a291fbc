"""Quantize the demo model with several settings, evaluate each, and print one table.

    python benchmarks/demo_accuracy.py --data ../shared/data/wikitext-2-raw/wiki.test.raw \
        --max-windows 12 --settings dense-source,unquantized,w8,fp8-w8a8,fp8-weight-only,w4,w2 \
        --out benchmarks/results/demo_accuracy.json

Block-output tuning (``--method tune``) against GPTQ with the same sequential calibration::

    python benchmarks/demo_accuracy.py --data ../shared/data/wikitext-2-raw/wiki.test.raw \
        --settings unquantized,w2-fd-tune,w2-tune,w4-tune,w2-fd-seq --out benchmarks/results/demo_tune.json

Measured mixed precision (``--target-bits``) against the fixed ``--bits 2`` recipe, from saved statistics
(``ernieq calibrate demo --data demo --out STATS``)::

    python benchmarks/demo_accuracy.py --data ../shared/data/wikitext-2-raw/wiki.test.raw --calib STATS \
        --settings unquantized,w2-gptq,w2-w4x6-gptq,w2-mix2.5,w2-mix2.54,w2-fd-gptq,w2-fd-mix2.5 \
        --out benchmarks/results/demo_mixed.json

Every row is measured in this one run on this machine: perplexity (GPTQ/AWQ
protocol), tokens scored, bits per weight over the quantized classes, the
evaluation's wall time and its ratio to the unquantized model's, and the sha256
of the evaluated weights (``LC_ALL=C sha256sum *.safetensors | sha256sum``). ``fp8-w8a8`` is ``--fp8``
(activations quantized to fp8 per token and 128-channel group at run time, what the hf-fp8 and
compressed-tensors exports declare), ``fp8-weight-only`` the same weights with activations
left in float (``--fp8-activations none``).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import int2_baseline  # noqa: F401  (registers the int2-g64 baseline codec)
from ernieq import api
from ernieq.model.checkpoint import weights_sha256
from ernieq.provenance import git_commit

SAVED = "--calib"  # stands for the statistics folder given by --calib
SETTINGS = {
    "dense-source": None,  # the dense SmolLM2 the demo MoE is made from (a Llama checkpoint)
    "unquantized": None,
    "w8": {"bits": 8},
    "fp8-w8a8": {"fp8": True},
    "fp8-weight-only": {"fp8": True, "fp8_activations": "none"},
    "w4": {"bits": 4},
    "w4-asym": {"bits": 4, "symmetric": False},
    "w4-g64": {"bits": 4, "group_size": 64},
    "w2": {"bits": 2},
    # the same recipe with its ccq2 experts (MoE layers 4..29 of the demo) on a plain
    # round-to-nearest 2-bit g64 asymmetric grid (int2_baseline.py)
    "w2-int2g64": {"bits": 2, "overrides": (r"layers\.([4-9]|[12]\d)\.mlp\.experts\.=int2g64",)},
    # calibrated on the demo split (64 x 512 tokens), each layer on the quantized layers before it: GPTQ
    # (sequential), and GPTQ then block-output tuning (--method tune); native rotates the wint4 and ccq2
    # weights (online rotations), "fd" is the FastDeploy-exportable 2-bit checkpoint (no rotation)
    "w4-seq": {"bits": 4, "method": "gptq", "sequential": True, "calib_data": "demo"},
    "w4-tune": {"bits": 4, "method": "tune", "calib_data": "demo"},
    "w2-seq": {"bits": 2, "method": "gptq", "sequential": True, "calib_data": "demo"},
    "w2-tune": {"bits": 2, "method": "tune", "calib_data": "demo"},
    "w2-fd-seq": {"bits": 2, "method": "gptq", "sequential": True, "calib_data": "demo", "rotate": False},
    "w2-fd-tune": {"bits": 2, "method": "tune", "calib_data": "demo", "rotate": False},
    # the same with the integer grids' per-weight rounding tuned too (--tune-rounding), more steps, or the
    # unquantized model's hidden states as each layer's target (--tune-target model)
    "w4-tune-round": {"bits": 4, "method": "tune", "calib_data": "demo", "tune_rounding": True},
    "w2-tune-s40": {"bits": 2, "method": "tune", "calib_data": "demo", "tune_steps": 40},
    "w2-tune-s200": {"bits": 2, "method": "tune", "calib_data": "demo", "tune_steps": 200},
    "w4-tune-s40": {"bits": 4, "method": "tune", "calib_data": "demo", "tune_steps": 40},
    "w4-tune-model": {"bits": 4, "method": "tune", "calib_data": "demo", "tune_target": "model"},
    "w4-tune-model-s40": {"bits": 4, "method": "tune", "calib_data": "demo", "tune_target": "model",
                          "tune_steps": 40},
    "w2-fd-tune-s40": {"bits": 2, "method": "tune", "calib_data": "demo", "rotate": False, "tune_steps": 40},
    "w2-tune-model": {"bits": 2, "method": "tune", "calib_data": "demo", "tune_target": "model"},
    # the FastDeploy-exportable checkpoint with more end-to-end steps (--tune-model-steps 28; the step size falls
    # with the steps, so the scales travel as far in smaller steps)
    "w2-fd-tune-m28": {"bits": 2, "method": "tune", "calib_data": "demo", "rotate": False, "tune_model_steps": 28},
    # AWQ's scales folded into the norms and up projections before GPTQ (--awq), then tuned as above
    "w2-fd-tune-awq": {"bits": 2, "method": "tune", "calib_data": "demo", "rotate": False, "awq": True},
    "w2-tune-awq": {"bits": 2, "method": "tune", "calib_data": "demo", "awq": True},
    "w4-tune-awq": {"bits": 4, "method": "tune", "calib_data": "demo", "awq": True},
    "w2-fd-gptq-awq": {"bits": 2, "rotate": False, "calib": SAVED, "awq": True},
    # --bits 4 with a fifth of the end-to-end step (--tune-model-lr 0.02, wint4's default since commit ad0534c),
    # against the unquantized model's states and on its own outputs
    "w4-tune-model-mlr": {"bits": 4, "method": "tune", "calib_data": "demo", "tune_target": "model",
                          "tune_model_lr": 0.02},
    "w4-tune-mlr": {"bits": 4, "method": "tune", "calib_data": "demo", "tune_model_lr": 0.02},
    # the same with the batches in another order (--tune-seed): how much a result owes to the seed
    "w4-tune-seed1": {"bits": 4, "method": "tune", "calib_data": "demo", "tune_seed": 1},
    "w4-tune-model-seed1": {"bits": 4, "method": "tune", "calib_data": "demo", "tune_target": "model",
                            "tune_seed": 1},
    # from the statistics given by --calib (GPTQ): the fixed recipe (wint4 experts in the first MoE layers,
    # FastDeploy's share), the same rule with more wint4 layers, and --target-bits' measured choice
    "w2-gptq": {"bits": 2, "calib": SAVED},
    "w2-w4x6-gptq": {"bits": 2, "w4_moe_layers": 6, "calib": SAVED},
    "w2-mix2.5": {"bits": 2, "target_bits": 2.5, "calib": SAVED},
    # the three wint4 layers an end-to-end measure ranks first (layers 1, 2 and the last, 29: the largest KL per
    # layer at the model's output, benchmarks/results/demo_layer_sensitivity.json) in place of the recipe's 1-3
    "w2-w4-l29-gptq": {"bits": 2, "w4_moe_layers": 2, "calib": SAVED,
                      "overrides": (r"layers\.29\.mlp\.experts\.=wint4:group_size=none,symmetric=true,clip=false",)},
    "w2-mix2.54": {"bits": 2, "target_bits": 2.54, "calib": SAVED},  # the fixed recipe's 2.536 routed expert bits
    "w2-fd-gptq": {"bits": 2, "rotate": False, "calib": SAVED},
    # --target-bits with block-output tuning: the mix chosen on a first pass, then the tuned sequential one
    "w2-mix2.54-tune": {"bits": 2, "method": "tune", "calib_data": "demo", "target_bits": 2.54},
    "w2-fd-mix2.5": {"bits": 2, "format": "fastdeploy", "target_bits": 2.5, "calib": SAVED},  # exported, read back
}


def _peak_rss() -> int:
    """This process's peak resident memory so far, in bytes (the run's settings go one after another)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--data", required=True)
    parser.add_argument("--max-windows", type=int, default=12)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--settings", default="unquantized,w8,fp8-w8a8,fp8-weight-only,w4")
    parser.add_argument("--out", type=Path, default=None, help="Write the rows as JSON here.")
    parser.add_argument("--calib", type=Path, default=None, help="Saved statistics for the settings that take them.")
    parser.add_argument("--keep", type=Path, default=None,
                        help="Keep each quantized checkpoint in KEEP/SETTING (for `ernieq report`), not in a "
                             "temporary folder.")
    args = parser.parse_args()
    saved = [n for n in args.settings.split(",") if SAVED in (SETTINGS[n] or {}).values()]
    if saved and args.calib is None:
        parser.error(f"--settings {','.join(saved)} need --calib (ernieq calibrate demo --data demo --out STATS)")

    args.commit = git_commit(short=True)  # once, before this run writes its own result file into the tree
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        for name in args.settings.split(","):
            options = {k: args.calib if v == SAVED else v for k, v in (SETTINGS[name] or {}).items()} or None
            model, bpw, routed, qseconds, tuned = args.model, 32.0, 32.0, 0.0, None  # the demo checkpoints are float32
            if name == "dense-source":
                from ernieq.demo.cache import cache_root
                from ernieq.demo.source import DENSE_CACHE_NAME, load_dense_source

                load_dense_source()  # makes sure the float32 copy is cached
                model = cache_root() / DENSE_CACHE_NAME
            elif options is not None:
                model = folder / name
                t0 = time.perf_counter()
                result = api.quantize(args.model, model, progress=False, **options)
                qseconds = time.perf_counter() - t0
                summary = result.to_json()
                bpw = summary["bits_per_weight_quantized"]
                routed = summary["classes"].get("routed_experts", {}).get("bits_per_weight", 0.0)
                if result.tune_reports:  # per layer: GPTQ's result kept, or the tuned one
                    tuned = {"layers": len(result.tune_reports),
                             "kept": {k: sum(r["kept"] == k for r in result.tune_reports)
                                      for k in ("gptq", "tuned", "experts")},
                             "tune_seconds": round(sum(r["seconds"] for r in result.tune_reports), 1),
                             "model": result.model_tune}  # the end-to-end step: held-out KL, what it kept
            start = time.perf_counter()
            r = api.evaluate(model, args.data, seq_len=args.seq_len, max_windows=args.max_windows, progress=False)
            rows.append({"setting": name, "ppl": r.ppl, "tokens": r.tokens, "bits_per_weight": bpw,
                         "routed_expert_bits_per_weight": routed,
                         "quantize_seconds": qseconds, "peak_rss_bytes": _peak_rss(), "tuning": tuned,
                         "eval_seconds": r.seconds, "total_seconds": time.perf_counter() - start,
                         "runtime": r.runtime, "weights_sha256": weights_sha256(api.resolve_model(model))})
            print(json.dumps(rows[-1]), flush=True)
            _write(args, rows)  # after every row: a long run that is stopped keeps the rows it finished


def _write(args: argparse.Namespace, rows: list[dict]) -> None:
    """Print the table of ``rows`` and write them (with the table) to ``args.out``."""
    base = next((r for r in rows if r["setting"] == "unquantized"), None)
    header = (f"Measured {date.today()} on {platform.machine()} CPU ({platform.node()}), commit {args.commit}, "
              f"`{args.model}` on `{Path(args.data).name}`, {args.max_windows} windows of {args.seq_len} tokens:\n")
    lines = [header, "| setting | bits/weight (quantized classes) | routed experts | perplexity | vs unquantized | tokens | eval time | "
                     "time vs unquantized | quantize time | peak RSS so far |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rel = f"{(r['ppl'] / base['ppl'] - 1) * 100:+.2f} %" if base else "n/a"
        trel = f"{r['eval_seconds'] / base['eval_seconds']:.2f}x" if base else "n/a"
        lines.append(f"| {r['setting']} | {r['bits_per_weight']:.3f} | {r.get('routed_expert_bits_per_weight', 0):.3f} | "
                     f"{r['ppl']:.3f} | {rel} | {r['tokens']:,} | "
                     f"{r['eval_seconds']:.1f} s | {trel} | {r['quantize_seconds']:.0f} s | "
                     f"{r['peak_rss_bytes'] / 2**30:.2f} GiB |")
    print("\n".join(lines))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"header": header, "command": "python benchmarks/demo_accuracy.py "
                                        + " ".join(sys.argv[1:]), "rows": rows, "table": "\n".join(lines)},
                                       indent=2) + "\n")


if __name__ == "__main__":
    main()
