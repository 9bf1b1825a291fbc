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

import json
import time

import torch
from peer_script import load_for_peer, peer_parser, peer_perplexity

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
    a = peer_parser(__doc__).parse_args()

    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modeling.moe.linearize import linearize_moe
    from llmcompressor.modifiers.quantization import GPTQModifier

    _, tokenizer, model, calib = load_for_peer(a)
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
    row = {"quantized": "every linear of the decoder layers, routed experts linearised (router gates and lm_head "
                        f"kept): int{WEIGHTS['num_bits']} g{GROUP_SIZE} symmetric, GPTQ",
           "bits_by_codec": {f"int4 g{GROUP_SIZE} ({scale_dtype(model)} scale)": bpw}, "bits_per_weight": bpw,
           "quantized_weights": n, "quantize_seconds": quantize_seconds, **peer_perplexity(model, tokenizer, a)}
    a.out.write_text(json.dumps(row, indent=2) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
