"""The reference path decodes once: one MoE layer and a whole evaluation, with and without the decode cache.

    python benchmarks/decode_once.py --data ../shared/data/wikitext-2-raw/wiki.test.raw \
        --out benchmarks/results/decode_once.json --markdown

Measured in one run, on this machine's CPU (the reference path; on a GPU the Triton kernels
decode inside their loop and nothing is cached):

(a) one MoE layer at ERNIE-4.5-21B-A3B shapes (H 2560, I 1536, 64 routed experts, top-6) with
    ``ccq2`` experts stored turned by rotations (the native ``--bits 2`` layout), through
    ``ernieq.runtime.QuantMoEExperts`` for 1 token: ``--decode-cache off`` (today's path: the
    six chosen experts' three projections decoded on every call, and both rotations applied
    online) against the cached path (every expert decoded once, rotations folded; the one-time
    decode is timed apart). The weights are random bytes in the ccq2 layout
    (``ernieq.bench.inputs.synthetic``): decoding costs the same whatever the bytes are, and
    encoding 192 weights of 3.9 M takes minutes here. Median of ``--layer-reps`` calls each.
(b) ``ernieq eval`` (``ernieq.api.evaluate``) of the demo model unquantized and of its
    ``--bits 2`` checkpoint (round to nearest; ``--q2 DIR`` reuses one) with the decode
    cache off and on, on the first ``--max-windows`` windows of ``--seq-len`` tokens of
    ``--data``: the perplexity loop's wall time (the cached path's one-time decode included),
    and its ratio to the unquantized model's. The unquantized and the cached runs go twice, in
    the order A B B A, so that a load that drifts during the run (this CPU is shared) weighs on
    both alike; each setting's time is the mean of its runs.

Writes ``--out`` (JSON, with ``ernieq.provenance``'s commit and machine) and, with ``--markdown``,
the section "Decode once" of benchmarks/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from ernieq import api
from ernieq.bench.inputs import MODELS, route, synthetic
from ernieq.device import HOST
from ernieq.provenance import now_iso, provenance
from ernieq.runtime.decode_cache import GIB, set_decode_cache
from ernieq.runtime.modules import QuantMoEExperts
from ernieq.transforms import make_rotation

REPO = Path(__file__).resolve().parent.parent
SECTION = "## Decode once: the reference path with the decode cache (CPU)"


def _median_s(reps: int, fn, *args) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def moe_layer(reps_off: int, reps_on: int) -> dict:
    """(a): one ccq2 MoE layer at 21B-A3B shapes, 1 token, decode cache off vs on."""
    model = MODELS["21B-A3B"]
    e, h, i, a = model.experts, model.hidden, model.inter, model.top_k
    gen = torch.Generator(device=HOST).manual_seed(0)
    stacks = [synthetic("ccq2", {}, shape, HOST, gen) for shape in ((e, i, h), (e, i, h), (e, h, i))]
    layer = QuantMoEExperts(*stacks, make_rotation(h, 1), make_rotation(i, 2))
    x = torch.randn(1, h, generator=gen)  # [T, H]
    ids, weights = route(1, e, a, HOST, gen)  # [T, A]
    with torch.no_grad():
        set_decode_cache("off")
        want = layer(x, ids, weights)
        off = _median_s(reps_off, layer, x, ids, weights)
        set_decode_cache("auto")
        t0 = time.perf_counter()
        got = layer(x, ids, weights)  # decodes every expert once
        first = time.perf_counter() - t0
        on = _median_s(reps_on, layer, x, ids, weights)
    rel = float((got - want).abs().max() / want.abs().max())
    row = {"shape": f"H {h}, I {i}, {e} experts, top-{a}, ccq2, rotated", "experts": e, "tokens": 1,
           "uncached_s": off, "cached_s": on, "speedup": off / on, "first_call_s": first,
           "cached_gib": layer.cached_bytes / GIB, "max_rel_diff": rel, "reps": [reps_off, reps_on]}
    print(json.dumps(row), flush=True)
    del layer
    return row


def evals(data: str, q2: Path | None, seq_len: int, max_windows: int, tmp: Path) -> list[dict]:
    """(b): the demo unquantized, and its --bits 2 checkpoint with the decode cache off and on."""
    if q2 is None:
        q2 = tmp / "q2"
        t0 = time.perf_counter()
        api.quantize("demo", q2, bits=2, progress=False)
        print(f"quantized demo --bits 2 in {time.perf_counter() - t0:.0f} s", flush=True)
    plain, off, cached = "demo, unquantized", "demo --bits 2, decode cache off", "demo --bits 2, decode cache auto"
    settings = {plain: ("demo", "auto"), off: (q2, "off"), cached: (q2, "auto")}
    rows = {label: {"setting": label, "runs_s": []} for label in settings}
    for label in (off, plain, cached, cached, plain):  # the uncached path once; then A B B A
        model, cache = settings[label]
        r = api.evaluate(model, data, seq_len=seq_len, max_windows=max_windows, progress=False, device="cpu",
                         decode_cache=cache)
        rows[label].update(ppl=r.ppl, tokens=r.tokens, runtime=r.runtime)
        rows[label]["runs_s"].append(r.seconds)
        print(json.dumps({"setting": label, "ppl": r.ppl, "eval_s": r.seconds}), flush=True)
    base = statistics.mean(rows[plain]["runs_s"])
    for row in rows.values():
        row["eval_s"] = statistics.mean(row["runs_s"])
        row["vs_unquantized"] = row["eval_s"] / base
    return list(rows.values())


def markdown(result: dict) -> str:
    prov, layer, rows = result["provenance"], result["moe_layer"], result["eval"]
    lines = [SECTION, "",
             f"`{prov['command']}` on {prov['machine']}, {prov['started'][:10]}, commit {prov['commit'][:12]}, "
             f"one run, float32, {result['threads']} torch threads; load average {result['load'][0]:.1f} before, "
             f"{result['load'][1]:.1f} after (other jobs shared the CPU: read the ratios, not the seconds). "
             f"Demo model: `{result['demo']}`.", "",
             f"(a) One MoE layer, {layer['shape']}, 1 token, `ernieq.runtime.QuantMoEExperts` "
             "(`benchmarks/results/decode_once.json`):", "",
             "| path | median per call | vs decode every call |", "|---|---:|---:|",
             f"| decode every call (`--decode-cache off`, today's reference path) | {layer['uncached_s'] * 1e3:.0f} ms | 1.00x |",
             f"| decoded once (`--decode-cache auto`) | {layer['cached_s'] * 1e3:.2f} ms | "
             f"{layer['speedup']:.0f}x faster |", "",
             f"The cached path decoded all {layer['experts']} experts once on its first call "
             f"({layer['first_call_s']:.1f} s, {layer['cached_gib']:.2f} GiB of float32 weights); its output "
             f"differs from the uncached path's by {layer['max_rel_diff']:.1e} of max |y| (rotations folded).", "",
             f"(b) `ernieq eval` on {rows[0]['tokens']:,} tokens ({result['max_windows']} windows of "
             f"{result['seq_len']}) of WikiText-2, perplexity loop only (the cached path's one-time decode "
             "included); the runs went in the order: decode cache off, then unquantized, cached, cached, "
             "unquantized, and each time is the mean of its runs:", "",
             "| model | perplexity | eval time (runs) | vs unquantized | kernel path |", "|---|---:|---:|---:|---|"]
    for r in rows:
        runs = " + ".join(f"{s:.0f}" for s in r["runs_s"])
        lines.append(f"| {r['setting']} | {r['ppl']:.3f} | {r['eval_s']:.1f} s ({runs} s) | "
                     f"{r['vs_unquantized']:.2f}x | {r['runtime']['kernels']} |")
    return "\n".join(lines) + "\n"


def write_section(path: Path, text: str) -> None:
    """Replace (or append) the SECTION of BENCHMARKS.md with ``text``."""
    doc = path.read_text()
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    doc = pattern.sub(lambda m: text + "\n", doc) if pattern.search(doc) else doc.rstrip("\n") + "\n\n" + text
    path.write_text(doc)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="WikiText-2 raw test (wiki.test.raw) or another text source")
    p.add_argument("--q2", type=Path, default=None, help="an existing `ernieq quantize demo --bits 2` checkpoint")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=4)
    p.add_argument("--layer-reps", type=int, nargs=2, default=(5, 50), metavar=("OFF", "ON"),
                   help="calls timed per path in (a)")
    p.add_argument("--out", type=Path, required=True, help="the JSON to write")
    p.add_argument("--markdown", action="store_true", help="rewrite the 'Decode once' section of BENCHMARKS.md")
    args = p.parse_args()

    started, load_before = now_iso(), os.getloadavg()[0]
    layer = moe_layer(*args.layer_reps)
    with tempfile.TemporaryDirectory() as tmp:
        rows = evals(args.data, args.q2, args.seq_len, args.max_windows, Path(tmp))
    result = {"provenance": provenance(started), "threads": torch.get_num_threads(),
              "load": [load_before, os.getloadavg()[0]], "demo": str(api.resolve_model("demo").name),
              "seq_len": args.seq_len, "max_windows": args.max_windows, "moe_layer": layer, "eval": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    print(text)
    if args.markdown:
        write_section(REPO / "benchmarks" / "BENCHMARKS.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
