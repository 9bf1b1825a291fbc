"""llm-compressor's GPTQ (``GPTQModifier``, W4A16 with group 64) on the model, evaluated in memory: a peer row.

    PYTHON_WITH_LLMCOMPRESSOR benchmarks/llmc_peer.py --model demo --data wiki.test.raw --max-windows 12 --out row.json

llm-compressor 0.14 pins ``compressed-tensors==0.19.0`` and ``transformers<=5.17``
(ernieq uses compressed-tensors 0.20 and transformers 5.24), so it lives in its own
virtual environment that sees ernieq's packages behind its own (a ``.pth`` file
naming ernieq's site-packages; see BENCHMARKS.md for the exact steps). The fused
routed experts are linearised first (``llmcompressor.modeling.moe.linearize_moe``),
so every expert projection is an ``nn.Linear`` GPTQ can quantize; router gates and
``lm_head`` are left alone, as in ernieq. Calibration: the same token windows as
ernieq's (``api.calibration_tokens``: the calib split of ``--calib-data``).
Perplexity: ernieq's own protocol on the model llm-compressor returns (fake-quantized
weights, i.e. dequantized values).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

GROUP_SIZE = 64  # the G of ernieq's --bits 4 and of the other peers (W4A16's preset has 128)
# scheme W4A16 (int4 weights, symmetric, per group; activations unquantized) with G = 64
WEIGHTS = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": GROUP_SIZE}


def quantized_bits(model: torch.nn.Module) -> tuple[float, int]:
    """(bits per weight, weights) over the modules llm-compressor quantized: 4-bit codes plus the
    stored scales and zero points as they would be saved (their element sizes)."""
    bits = weights = 0
    for module in model.modules():
        scale = getattr(module, "weight_scale", None)
        if scale is None:
            continue
        n = module.weight.numel()
        zero = getattr(module, "weight_zero_point", None)
        stored = scale.numel() * scale.element_size() * 8
        stored += 0 if zero is None else zero.numel() * zero.element_size() * 8
        bits += 4 * n + stored  # codes: 4 bits each
        weights += n
    return bits / max(weights, 1), weights


def scale_dtype(model: torch.nn.Module) -> str:
    scales = (m.weight_scale for m in model.modules() if hasattr(m, "weight_scale"))
    return str(next(scales).dtype).removeprefix("torch.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo")
    p.add_argument("--data", required=True)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--calib-data", default="demo")
    p.add_argument("--calib-tokens", type=int, default=64 * 512)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()

    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modeling.moe.linearize import linearize_moe
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ernieq import api
    from ernieq.eval.perplexity import perplexity, tokenize_text
    from ernieq.text import load_text

    path = api.resolve_model(a.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    calib = api.calibration_tokens(path, a.calib_data, a.calib_tokens, a.calib_seq_len)  # [n_seq, seq_len]
    dataset = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    start = time.perf_counter()
    linearize_moe(model)
    recipe = GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": WEIGHTS}},
                          ignore=["lm_head", "re:.*mlp\\.gate$"])
    model = oneshot(model=model, dataset=dataset, recipe=recipe, max_seq_length=a.calib_seq_len,
                    num_calibration_samples=calib.shape[0]) or model
    quantize_seconds = time.perf_counter() - start
    bpw, n = quantized_bits(model)
    if n == 0:
        raise RuntimeError("llm-compressor quantized no linear layer")
    ids = tokenize_text(tokenizer, load_text(a.data, split="eval"))
    start = time.perf_counter()
    with torch.inference_mode():
        r = perplexity(model.eval(), ids, seq_len=a.seq_len, max_windows=a.max_windows, progress=False)
    row = {"quantized": "every linear of the decoder layers, routed experts linearised (router gates and lm_head "
                        f"kept): int{WEIGHTS['num_bits']} g{GROUP_SIZE} symmetric, GPTQ",
           "bits_by_codec": {f"int4 g{GROUP_SIZE} ({scale_dtype(model)} scale)": bpw}, "ppl": r.ppl, "tokens": r.tokens, "windows": r.windows, "seq_len": r.seq_len, "bits_per_weight": bpw,
           "quantized_weights": n, "quantize_seconds": quantize_seconds, "eval_seconds": time.perf_counter() - start}
    a.out.write_text(json.dumps(row, indent=2) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
