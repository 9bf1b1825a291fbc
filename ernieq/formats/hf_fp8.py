"""``hf-fp8``: block FP8 in transformers' fine-grained FP8 convention (DeepSeek-V3 style).

``config.json`` carries ``quantization_config = {"quant_method": "fp8",
"activation_scheme": "dynamic", "weight_block_size": [128, 128],
"modules_to_not_convert": [...]}``: W8A8, activations quantized at run time per token
and 128-channel group, which is how ernieq computes ``fp8`` with ``activations="dynamic"``.
The format has no weight-only scheme (``activation_scheme`` is ``dynamic`` or ``static``),
so weight-only fp8 (``activations="none"``) is refused. Every quantized linear ``<base>`` stores

- ``<base>.weight``: float8_e4m3fn [N, K];
- ``<base>.weight_scale_inv``: float32 [N/128, K/128], ``W = weight * weight_scale_inv``
  per 128 x 128 block (ernieq's ``fp8`` codec with ``block_size=128`` as it is).

Routed experts keep their per-expert names; transformers (5.x) fuses them on
load into ``experts.gate_up_proj [E, 2I, H]`` / ``experts.down_proj [E, H, I]``
with the per-expert scale grids concatenated the same way. Its kernels (and its
dequantizing loader) derive the blocks from the scale grid of the (fused)
weight, so only whole blocks round-trip: every quantized N and K must be a
multiple of 128. Only checkpoints whose quantized modules are all W8A8 block FP8
(128) can be written; a block's routed experts must all be quantized.
"""

from __future__ import annotations

from pathlib import Path

from ernieq.codecs.fp8 import DYNAMIC, activations_of
from ernieq.errors import ErnieqError
from ernieq.formats.exporting import (
    check_fused_layouts,
    copy_plain_tensors,
    hub_modules,
    plain_config,
    unquantized_modules,
)
from ernieq.formats.native import ModuleSpec, NativeReader, copy_side_files
from ernieq.formats.registry import register_format
from ernieq.model.checkpoint import CheckpointWriter, write_json

FORMAT_NAME = "hf-fp8"
BLOCK = 128
CODEC = "fp8"


def _check_module(module: str, spec: ModuleSpec) -> None:
    if spec.codec != CODEC or spec.params.get("block_size") != BLOCK:
        raise ErnieqError(
            f"{FORMAT_NAME}: {module} is {spec.codec} {spec.params}; this format holds only "
            f"fp8 with block_size={BLOCK} (quantize with --fp8, or export as compressed-tensors)"
        )
    if activations_of(spec.params) != DYNAMIC:
        raise ErnieqError(
            f"{FORMAT_NAME}: {module} is weight-only fp8 (activations={spec.params['activations']!r}); "
            f"transformers' fp8 format declares fp8 activations and has no weight-only scheme "
            f"(quantize with --fp8 for W8A8, or export as compressed-tensors, which can declare weight-only)"
        )
    n, k = spec.shape[-2:]
    if n % BLOCK or k % BLOCK:
        raise ErnieqError(
            f"{FORMAT_NAME}: {module} has shape [N={n}, K={k}]; transformers reads only whole "
            f"{BLOCK}x{BLOCK} blocks (N and K multiples of {BLOCK}); export as compressed-tensors instead"
        )


def hf_quantization_config(kept: list[str]) -> dict:
    """transformers' ``FineGrainedFP8Config`` fields, as DeepSeek-V3 writes them: W8A8 with
    activations quantized at run time per token and group of 128 (``activation_scheme: dynamic``)."""
    return {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "weight_block_size": [BLOCK, BLOCK],
        "modules_to_not_convert": kept,
    }


@register_format(FORMAT_NAME)
def export_hf_fp8(native_dir: Path, out: Path) -> Path:
    """Write the native block-FP8 checkpoint ``native_dir`` in transformers' FP8 convention into ``out``."""
    reader = NativeReader(native_dir)
    if not reader.modules:
        raise ErnieqError(f"{native_dir}: no quantized modules to export")
    for module, spec in sorted(reader.modules.items()):
        _check_module(module, spec)
    kept = unquantized_modules(reader)
    check_fused_layouts({m: CODEC for m in reader.modules}, kept, FORMAT_NAME)  # transformers fuses the experts
    hub = hub_modules(reader)
    fused = sorted(m for m, name in hub.items() if name is None)
    if fused:
        raise ErnieqError(
            f"{FORMAT_NAME}: {fused[0]} is a routed expert that the source checkpoint holds only inside a fused "
            f"parameter, where transformers reads it; ernieq's per-expert fp8 weights and block scales have no "
            f"place there: export as compressed-tensors instead"
        )
    with CheckpointWriter(out) as writer:
        for module in sorted(reader.modules):
            q = reader.quantized(module)
            writer.add(f"{hub[module]}.weight", q.tensors["qweight"])  # [N, K] float8_e4m3fn
            writer.add(f"{hub[module]}.weight_scale_inv", q.tensors["scale"])  # [N/128, K/128] float32
        copy_plain_tensors(reader, writer)
    config = plain_config(reader)
    config["quantization_config"] = hf_quantization_config(kept)
    write_json(out / "config.json", config)
    copy_side_files(Path(native_dir), out)
    return out
