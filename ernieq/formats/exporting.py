"""What every export format shares: the unquantized parts, and the modules runtimes fuse.

An export format (``ernieq.formats.registry``) turns a native checkpoint into
another layout. The quantized weights are each format's business; the rest is
the same everywhere: the plain tensors are copied as stored, ``config.json``
loses ernieq's ``quantization_config``, and the modules left unquantized
(router gates, embeddings, ``lm_head``, anything an override kept) are listed
so that the target runtime does not look for quantized tensors there.
"""

from __future__ import annotations

import re

import torch

from ernieq.errors import ErnieqError
from ernieq.formats.native import NativeReader, base_name
from ernieq.model.adapters import adapter_for
from ernieq.model.checkpoint import CheckpointWriter

LM_HEAD = "lm_head"
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Modules that runtimes fuse: (pattern with a ``prefix`` group, the fused module's name after it).
ROUTED_EXPERTS = ((re.compile(r"^(?P<prefix>.+\.experts)\.\d+\.(?:gate_proj|up_proj|down_proj)$"), ""),)
QKV_AND_GATE_UP = (
    (re.compile(r"^(?P<prefix>.+)\.(?:q_proj|k_proj|v_proj)$"), ".qkv_proj"),
    (re.compile(r"^(?P<prefix>.+)\.(?:gate_proj|up_proj)$"), ".gate_up_proj"),
)


def plain_config(reader: NativeReader) -> dict:
    """The model's ``config.json`` without ernieq's ``quantization_config``."""
    return {k: v for k, v in reader.config.items() if k != "quantization_config"}


def model_dtype(reader: NativeReader) -> torch.dtype:
    """The dtype the model computes in (``dtype``, or ``torch_dtype`` before transformers 5); bf16 if unset."""
    name = reader.config.get("dtype") or reader.config.get("torch_dtype") or "bfloat16"
    if name not in _DTYPES:
        raise ErnieqError(f"{reader.reader.path / 'config.json'}: unsupported model dtype {name!r}; "
                          f"known: {', '.join(_DTYPES)}")
    return _DTYPES[name]


def hub_modules(reader: NativeReader) -> dict[str, str | None]:
    """{quantized module: its name in the exported checkpoint}. ernieq stores routed experts under
    canonical per-expert names in the model's namespace (``mlp.experts.M.gate_proj``); an export names
    them as ``save_pretrained`` does, the hub's layout (Mixtral's ``block_sparse_moe.experts.M.w1``),
    beside the plain tensors it copies under their source names, so a loader of that layout finds both.
    None: a routed expert the hub holds only fused (GPT-OSS, Aria), which has no per-expert name."""
    adapter = adapter_for(reader.config)
    hub = {m: adapter.checkpoint_name(f"{m}.weight") for m in reader.modules}
    return {m: None if name is None else base_name(name) for m, name in hub.items()}


def unquantized_modules(reader: NativeReader) -> list[str]:
    """Modules whose 2-D ``<module>.weight`` is stored unquantized (router gates, embeddings,
    kept linears), plus ``lm_head``.

    ``lm_head`` is listed even when tied to the embeddings (and so absent from
    the files): runtimes build it as a linear layer all the same. Embeddings are
    listed because model-free readers (compressed-tensors' dequantizer) take any
    ``*.weight`` not ignored for a quantized one.
    """
    kept = {LM_HEAD}
    for name in reader.plain_names():
        if name.endswith(".weight") and len(reader.reader.shape(name)) == 2:
            kept.add(base_name(name))
    return sorted(kept)


def fused_module(module: str, fusions: tuple[tuple[re.Pattern, str], ...]) -> str | None:
    """The fused module ``module`` runs in (e.g. ``...mlp.experts.7.up_proj`` → ``...mlp.experts``), else None."""
    for pattern, fused in fusions:
        m = pattern.match(module)
        if m:
            return m["prefix"] + fused
    return None


def check_fused_layouts(layouts: dict[str, object], kept: list[str], fmt: str, fusions=ROUTED_EXPERTS) -> None:
    """Fail unless the modules a runtime fuses into one share one layout.

    ``layouts``: module name → a hashable description of how it is stored; the
    ``kept`` modules count as unquantized. ``fusions``: (pattern with a
    ``prefix`` group, fused name suffix) pairs, e.g. vLLM's FusedMoE and
    transformers' fused experts hold a block's experts as one tensor.
    """
    seen: dict[str, tuple[str, object]] = {}
    for module, layout in [*layouts.items(), *((k, None) for k in kept)]:
        fused = fused_module(module, fusions)
        if fused is None:
            continue
        first = seen.setdefault(fused, (module, layout))
        if first[1] != layout:
            raise ErnieqError(
                f"{fmt}: {fused} runs as one fused module and needs one layout, "
                f"but {first[0]} is {first[1] or 'unquantized'} and {module} is {layout or 'unquantized'}"
            )


def copy_plain_tensors(reader: NativeReader, writer: CheckpointWriter) -> None:
    """Every tensor that is not part of a quantized module, under its own name, as stored."""
    for name in reader.plain_names():
        writer.add(name, reader.reader.get(name))
