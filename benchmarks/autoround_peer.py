"""AutoRound (Intel's SignRound: signed gradient descent on each weight's rounding offset and the
clipping range, one decoder layer at a time) on the model, evaluated in memory: a peer row.

    PYTHON_WITH_AUTOROUND benchmarks/autoround_peer.py --bits 4 --model demo --data wiki.test.raw --max-windows 12 --out row.json

AutoRound 0.16.1 (PyPI ``auto-round``) lives in its own virtual environment that sees ernieq's
packages behind its own (a ``.pth`` file; see BENCHMARKS.md for the exact steps), like
llm-compressor. The fused routed experts are linearised first by AutoRound's own helper
(``auto_round.modeling.fused_moe.moe_experts_interface.prepare_model_for_moe_quantization``: each
expert's ``gate_proj``/``up_proj``/``down_proj`` an ``nn.Linear``, run by its ``linear_grouped``
experts forward), the step ``AutoRound`` itself takes on a transformers 5 fused-experts model
(``replace_modules.apply_replacements`` -> ``_handle_moe_modules``); called here first, so that
the expert linears have names before AutoRound starts. AutoRound's own ERNIE 4.5 block
(``modeling/unfused_moe/ernie4_5_moe.py``) is for loading per-expert checkpoints and builds
fresh, unloaded experts, so it is not used. Which linears AutoRound rounds:

- ``--bits 4``: every linear of the decoder layers (ernieq's ``--bits 4``: attention, dense MLP,
  shared and routed experts) at 4 bits, G = 64, symmetric;
- ``--bits 2``: the routed experts ernieq's ``--bits 2`` puts in ``ccq2`` (the MoE layers after the
  first, wint4 ones) at 2 bits, G = 64, asymmetric. The other linears take the codec ernieq's
  ``--bits 2`` recipe gives them (wint4 per channel, wint8), rounded to nearest by ernieq's own
  codecs after AutoRound has finished, as in the ``hqq-w2-g64`` row.

Router gates, embeddings and ``lm_head`` are kept, as in ernieq. AutoRound runs with its own
defaults (SignRound, 200 iterations unless ``--iters``, its learning rate, batch size 8, seed 42,
``torch.compile`` where it chooses) except ``amp=False``: on a CPU it would otherwise cast the whole
model to bfloat16 (``auto_round.context.model.ModelContext._set_amp_dtype``), which would round
every kept tensor too; the script checks that the kept linears come back unchanged. Calibration:
the same token windows as ernieq's (``api.calibration_tokens``, the calib split of
``--calib-data``), handed to AutoRound as a list of [1, seq_len] token tensors (its ``dataset``
takes a list of tensors; ``nsamples`` = the number of windows, ``seqlen`` = their length).
Perplexity: ernieq's own protocol on the model AutoRound returns, whose weights are its
quantize-dequantize values. Bits per weight: what AutoRound's ``auto_round`` export stores for each
quantized linear (``export_to_autoround``: codes packed at ``bits``, a float16 scale and a zero
point packed at ``bits`` per group of 64, symmetric ones included), and ernieq's codecs' own bytes
for the tensors ernieq rounds.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peer_script import load_for_peer, peer_parser, peer_perplexity

GROUP_SIZE = 64  # the G of ernieq's --bits 4 and of the other peers
SCHEMES = {  # --bits -> AutoRound's scheme for the linears it rounds
    4: {"bits": 4, "group_size": GROUP_SIZE, "sym": True},
    2: {"bits": 2, "group_size": GROUP_SIZE, "sym": False},
}
SWAPPED_CODEC = "ccq2"  # --bits 2: AutoRound takes the linears ernieq's recipe puts in this codec
LINEAR_ATTRS = ("scale", "zp", "bits", "group_size", "sym")  # what AutoRound leaves on a linear it rounded


@dataclass
class Plan:
    """Which linears (module names) AutoRound rounds, which ernieq rounds to nearest (and with what
    codec choice), and which stay as they are."""

    autoround: list[str] = field(default_factory=list)
    ernieq: dict[str, object] = field(default_factory=dict)  # name -> ernieq.config.CodecChoice
    kept: list[str] = field(default_factory=list)


def decoder_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """Every ``nn.Linear`` (exactly that class) inside the decoder layers, by module name."""
    return {n: m for n, m in model.named_modules() if type(m) is torch.nn.Linear and ".layers." in n}


def plan_linears(model: torch.nn.Module, checkpoint: Path, bits: int) -> Plan:
    """Classify every decoder linear of the linearised ``model`` by ernieq's adapter for ``checkpoint``
    (its module name + ``.weight`` is the canonical per-expert weight name) and ernieq's ``--bits``
    recipe; see the module doc for what each ``bits`` gives AutoRound."""
    from ernieq.model.adapters import adapter_for
    from ernieq.model.checkpoint import CheckpointReader
    from ernieq.quantize import moe_ordinals
    from ernieq.recipes import preset

    reader = CheckpointReader(checkpoint)
    adapter = adapter_for(reader.config, str(checkpoint / "config.json"))
    ordinals = moe_ordinals(reader, adapter)  # MoE layer index -> ordinal
    config = preset(bits=bits, num_moe_layers=len(ordinals)) if bits == 2 else None
    plan = Plan()
    for name in decoder_linears(model):
        info = adapter.classify(f"{name}.weight")
        if not info.is_linear_weight:
            plan.kept.append(name)  # e.g. a router that is an nn.Linear: kept, as ernieq keeps it
            continue
        if config is None:
            plan.autoround.append(name)
            continue
        choice = config.choose(info.name, info, ordinals.get(info.layer))
        if choice is None:
            plan.kept.append(name)
        elif choice.codec == SWAPPED_CODEC:
            plan.autoround.append(name)
        else:
            plan.ernieq[name] = choice
    if not plan.autoround:
        raise RuntimeError(f"--bits {bits}: no decoder linear of {checkpoint} for AutoRound to quantize")
    return plan


def check_linearised(model: torch.nn.Module, window: torch.Tensor, before: torch.Tensor) -> None:
    """The linearised model's logits on ``window`` [1, L] match the fused model's ``before`` [1, L, V]."""
    with torch.no_grad():
        after = model(window).logits
    err = ((after - before).norm() / before.norm()).item()
    if not err < 1e-4:  # float32, the same products summed in another order
        raise RuntimeError(f"the linearised experts change the logits: relative error {err:.2e}")


def run_autoround(model, tokenizer, plan: Plan, bits: int, calib: torch.Tensor, iters: int, device: str):
    """AutoRound's own API on ``plan.autoround``; returns the model with its quantize-dequantize weights."""
    from auto_round import AutoRound

    keep = {n: {"bits": 16} for n in decoder_linears(model) if n not in plan.autoround}  # 16: not quantized
    ar = AutoRound(model, tokenizer, **SCHEMES[bits], iters=iters, nsamples=calib.shape[0], seqlen=calib.shape[1],
                   dataset=[w[None] for w in calib], layer_config=keep, device_map=device, amp=False)
    quantized, _ = ar.quantize()
    return quantized


def check_autoround(model: torch.nn.Module, plan: Plan, kept_before: dict[str, torch.Tensor]) -> None:
    """AutoRound rounded exactly ``plan.autoround`` and left every other decoder linear as it was."""
    linears = decoder_linears(model)
    rounded = sorted(n for n, m in linears.items() if getattr(m, "scale", None) is not None)
    if rounded != sorted(plan.autoround):
        extra, missing = set(rounded) - set(plan.autoround), set(plan.autoround) - set(rounded)
        raise RuntimeError(f"AutoRound rounded other linears than asked: extra {sorted(extra)[:4]}, "
                           f"missing {sorted(missing)[:4]}")
    if next(model.parameters()).dtype != torch.float32:
        raise RuntimeError(f"AutoRound returned a {next(model.parameters()).dtype} model (amp=False keeps float32)")
    changed = [n for n, w in kept_before.items() if not torch.equal(linears[n].weight, w)]
    if changed:
        raise RuntimeError(f"AutoRound changed linears it was told to keep: {changed[:4]}")


def autoround_bits(model: torch.nn.Module, names: list[str]) -> tuple[int, int, str]:
    """(stored bits, weights, scale dtype) of the linears AutoRound rounded, as its ``auto_round``
    export stores them: codes at ``bits`` each, per group a scale (its dtype) and a zero point
    packed at ``bits`` (qzeros, also for symmetric schemes)."""
    linears = decoder_linears(model)
    stored = weights = 0
    for name in names:
        m = linears[name]
        n = m.weight.numel()
        groups = m.scale.numel()  # scale [N, K / G]; zp the same, or one int for a symmetric scheme
        stored += m.bits * n + groups * (m.scale.element_size() * 8 + m.bits)
        weights += n
    dtype = str(linears[names[0]].scale.dtype).removeprefix("torch.")
    return stored, weights, dtype


def round_rest_with_ernieq(model: torch.nn.Module, choices: dict) -> dict[str, tuple[int, int]]:
    """Round ``choices`` (module name -> CodecChoice) to nearest with ernieq's codecs, in place
    (weight <- decode(encode(weight))); returns {codec: (stored bits, weights)}."""
    from ernieq.calibration.rounding import encode_weight
    from ernieq.codecs import decode
    from ernieq.encode import codec_of

    linears = decoder_linears(model)
    sizes: dict[str, list[int]] = {}
    with torch.no_grad():
        for name, choice in choices.items():
            w = linears[name].weight  # [N, K]
            q = encode_weight(codec_of(choice), w.detach(), None, name, "rtn")
            w.copy_(decode(q).to(w.dtype))
            acc = sizes.setdefault(choice.codec, [0, 0])
            acc[0] += 8 * q.nbytes
            acc[1] += q.num_weights
    return {codec: (b, n) for codec, (b, n) in sorted(sizes.items())}


def describe(plan: Plan, bits: int, layers: list[int]) -> str:
    scheme = SCHEMES[bits]
    rounding = f"AutoRound int{bits} g{GROUP_SIZE} {'symmetric' if scheme['sym'] else 'asymmetric'}"
    if bits == 4:
        return f"every linear of the decoder layers, routed experts linearised (router gates and lm_head kept): {rounding}"
    rest = sorted({c.describe() for c in plan.ernieq.values()})
    span = f"{layers[0]}" if len(layers) == 1 else f"{layers[0]}-{layers[-1]}"
    return (f"routed experts of layers {span} (--bits 2's ccq2 ones): {rounding}; other linears "
            f"as --bits 2's recipe, rounded to nearest by ernieq ({', '.join(rest) or 'none'}); router gates and lm_head kept")


def expert_layers(names: list[str]) -> list[int]:
    return sorted({int(n.split(".layers.")[1].split(".")[0]) for n in names if ".experts." in n})


def main() -> None:
    p = peer_parser(__doc__)
    p.add_argument("--bits", type=int, choices=sorted(SCHEMES), required=True)
    p.add_argument("--iters", type=int, default=200, help="SignRound steps per decoder layer (AutoRound's default).")
    p.add_argument("--device", default="cpu", help="AutoRound's device_map.")
    a = p.parse_args()

    from auto_round.modeling.fused_moe.moe_experts_interface import prepare_model_for_moe_quantization

    path, tokenizer, model, calib = load_for_peer(a)
    with torch.no_grad():
        fused_logits = model(calib[:1]).logits  # [1, seq_len, V]
    start = time.perf_counter()
    prepare_model_for_moe_quantization(model)
    check_linearised(model, calib[:1], fused_logits)
    del fused_logits
    plan = plan_linears(model, path, a.bits)
    kept_before = {n: m.weight.detach().clone() for n, m in decoder_linears(model).items()
                   if n in plan.kept or n in plan.ernieq}
    model = run_autoround(model, tokenizer, plan, a.bits, calib, a.iters, a.device)
    check_autoround(model, plan, kept_before)
    del kept_before
    stored, weights, scale_dtype = autoround_bits(model, plan.autoround)
    by_codec = {f"autoround int{a.bits} g{GROUP_SIZE} ({scale_dtype} scale)": (stored, weights),
                **round_rest_with_ernieq(model, plan.ernieq)}
    quantize_seconds = time.perf_counter() - start
    evaluated = peer_perplexity(model, tokenizer, a)
    total_bits, total_weights = (sum(x) for x in zip(*by_codec.values()))
    row = {"quantized": describe(plan, a.bits, expert_layers(plan.autoround)),
           "bits_by_codec": {codec: b / n for codec, (b, n) in by_codec.items()},
           "bits_per_weight": total_bits / total_weights, "quantized_weights": total_weights,
           "autoround_weights": weights, "quantize_seconds": quantize_seconds, **evaluated}
    a.out.write_text(json.dumps(row, indent=2) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
