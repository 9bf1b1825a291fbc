"""How much each MoE layer's routed experts cost the demo's output at 2 and 4 bits: measured end to end,
beside the local estimate ``--target-bits`` chooses by (``ernieq/calibration/mixed.py``).

    python benchmarks/layer_sensitivity.py --calib STATS --out benchmarks/results/demo_layer_sensitivity.json

Per MoE layer and candidate codec of ``--bits 2``'s routed experts (ccq2; wint4 per channel), that
layer's experts alone are rounded to nearest (rotated, with the statistics' Hessian, as the recipe
does) and put back in the model's frame; the rest stays unquantized. ``kl``: the mean KL(unquantized ||
this model) of the next-token distributions over ``--tokens`` calibration tokens of ``--calib-data``.
``local``: ``mixed.measure``'s tokens * tr(D H D^T) for the same layer and codec. The two rank the
layers differently when the local output error does not say what reaches the model's output.
Needs a model transformers holds with fused 3-D experts (``gate_up_proj`` [E, 2I, H], ``down_proj``
[E, H, I]), as it holds ERNIE 4.5 MoE.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ernieq import api
from ernieq.calibration import load_stats
from ernieq.calibration.mixed import expert_candidates, measure
from ernieq.calibration.rounding import encode_weight
from ernieq.codecs import decode, get_codec
from ernieq.config import QuantizeOptions
from ernieq.provenance import git_commit
from ernieq.quantize import recipe_for
from ernieq.transforms import make_rotation


def rounded(weight: torch.Tensor, stats, name: str, codec, rotate: bool) -> torch.Tensor:
    """``weight`` [N, K] rounded to nearest by ``codec`` and returned in the model's frame."""
    rotation = make_rotation(weight.shape[1]) if rotate else None
    w_hat = decode(encode_weight(codec, weight, stats.stats(name), name, "rtn", rotation)).float()
    return rotation.apply_t(w_hat, dense=True) if rotation is not None else w_hat


def kl(base: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean KL(base || logits) over tokens; ``base``: log-probabilities [B, T, V]."""
    return float((base.exp() * (base - logits.log_softmax(-1))).sum(-1).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo")
    p.add_argument("--calib", type=Path, required=True, help="saved statistics of the model (ernieq calibrate)")
    p.add_argument("--calib-data", default="demo")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    from transformers import AutoModelForCausalLM

    path = api.resolve_model(a.model)
    commit = git_commit(short=True)  # read before the run, as the tree may change under it
    config, _ = recipe_for(path, QuantizeOptions(bits=2), default_rotate=True)
    candidates = expert_candidates(config)
    stats = load_stats(a.calib)
    local = measure(path, config, stats, candidates, torch.device("cpu"), progress=False)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = api.calibration_tokens(path, a.calib_data, a.tokens, 512)
    with torch.inference_mode():
        base = model(ids).logits.log_softmax(-1)
    rows = []
    for costs in local:
        experts = model.model.layers[costs.layer].mlp.experts
        gate_up, down = experts.gate_up_proj.data.clone(), experts.down_proj.data.clone()  # [E, 2I, H], [E, H, I]
        inter = down.shape[2]
        row = {"layer": costs.layer, "kl": {}, "local": {}, "bits_per_weight": {}}
        start = time.perf_counter()
        for choice, error, bits in zip(candidates, costs.error, costs.bits):
            codec, rotate = get_codec(choice.codec, **choice.kwargs), config.rotates(choice)
            for e in range(gate_up.shape[0]):
                base_name = f"model.layers.{costs.layer}.mlp.experts.{e}"
                for part, rows_ in (("gate_proj", slice(0, inter)), ("up_proj", slice(inter, 2 * inter))):
                    experts.gate_up_proj.data[e, rows_] = rounded(gate_up[e, rows_], stats,
                                                                  f"{base_name}.{part}.weight", codec, rotate)
                experts.down_proj.data[e] = rounded(down[e], stats, f"{base_name}.down_proj.weight", codec, rotate)
            with torch.inference_mode():
                row["kl"][choice.codec] = kl(base, model(ids).logits)
            row["local"][choice.codec] = error
            row["bits_per_weight"][choice.codec] = bits / costs.weights
            experts.gate_up_proj.data.copy_(gate_up)
            experts.down_proj.data.copy_(down)
        print(json.dumps(row), f"{time.perf_counter() - start:.1f} s", flush=True)
        rows.append(row)
    a.out.write_text(json.dumps({"command": "python benchmarks/layer_sensitivity.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items()), "commit": commit, "rows": rows},
        indent=1) + "\n")


if __name__ == "__main__":
    main()
