"""Build a transformers model from a quantized checkpoint, with packed weights.

The checkpoint is any format ``ernieq.formats`` reads (ernieq native, FastDeploy):
its reader presents native module names and each module's codec tensors. The model
is created on the meta device (no memory for weights), its quantized linear layers
and routed-expert blocks are replaced by ernieq modules holding the packed tensors,
and every other tensor is loaded from the checkpoint as stored.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import nn

from ernieq.codecs import stack_experts
from ernieq.formats.registry import QuantizedCheckpoint, open_quantized
from ernieq.model.adapters import adapter_for, hf_config
from ernieq.model.checkpoint import CheckpointError
from ernieq.runtime.modules import QuantLinear, QuantMoEExperts

log = logging.getLogger(__name__)
_EXPERT = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)$")


def _split_expert_modules(reader: QuantizedCheckpoint) -> tuple[dict, list[str]]:
    """Quantized routed experts by prefix ({prefix: {(e, proj): base}}) and the other quantized bases."""
    experts: dict[str, dict] = {}
    linears = []
    for base in reader.modules:
        m = _EXPERT.match(base)
        if m:
            experts.setdefault(m["prefix"], {})[(int(m["expert"]), m["proj"])] = base
        else:
            linears.append(base)
    return experts, linears


def _plain_expert_tensors(names: list[str]) -> dict[str, dict]:
    """Unquantized per-expert weights by prefix, to be fused into transformers' 3-D params."""
    out: dict[str, dict] = {}
    for name in names:
        m = _EXPERT.match(name[: -len(".weight")]) if name.endswith(".weight") else None
        if m:
            out.setdefault(m["prefix"], {})[(int(m["expert"]), m["proj"])] = name
    return out


def _shared_rotation(reader: QuantizedCheckpoint, path: Path, prefix: str, bases: list[str]):
    """The one input rotation of modules that share their input (an expert layer's gate and up, or its downs)."""
    keys = {reader.modules[b].rotation for b in bases}
    if len(keys) > 1:
        raise CheckpointError(f"{path}: {prefix}: experts sharing an input are stored with different rotations {sorted(map(str, keys))}")
    return reader.rotation(bases[0])


def load_quantized(path: Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> nn.Module:
    """A transformers causal LM computing with the packed weights of the quantized checkpoint at ``path``."""
    from transformers import AutoModelForCausalLM

    reader = open_quantized(Path(path))
    adapter = adapter_for(reader.config, str(Path(path) / "config.json"))
    config = hf_config(reader.config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)

    experts, linears = _split_expert_modules(reader)
    plain = reader.plain_names()
    for base in linears:
        bias_name = f"{base}.bias"
        bias = reader.plain(bias_name).to(dtype) if bias_name in plain else None
        model.set_submodule(adapter.to_hf_name(base), QuantLinear(reader.quantized(base), bias, reader.rotation(base)))
    for prefix, bases in experts.items():
        num = 1 + max(e for e, _ in bases)
        stacks = []
        for proj in ("gate_proj", "up_proj", "down_proj"):
            missing = [e for e in range(num) if (e, proj) not in bases]
            if missing:
                raise CheckpointError(f"{path}: {prefix}: expert {missing[0]} {proj} is not quantized like the others")
            stacks.append(stack_experts([reader.quantized(bases[(e, proj)]) for e in range(num)]))
        turns = [_shared_rotation(reader, path, prefix, [bases[(e, p)] for e in range(num) for p in projs])
                 for projs in (("gate_proj", "up_proj"), ("down_proj",))]
        model.set_submodule(adapter.to_hf_name(prefix), QuantMoEExperts(*stacks, *turns))

    state = {}
    plain_experts = _plain_expert_tensors(plain)
    for prefix, names in plain_experts.items():
        num = 1 + max(e for e, _ in names)
        w = {proj: torch.stack([reader.plain(names[(e, proj)]) for e in range(num)])
             for proj in ("gate_proj", "up_proj", "down_proj")}
        hf_prefix = adapter.to_hf_name(prefix)
        state[f"{hf_prefix}.gate_up_proj"] = torch.cat([w["gate_proj"], w["up_proj"]], dim=1)  # [E, 2I, H]
        state[f"{hf_prefix}.down_proj"] = w["down_proj"]  # [E, H, I]
    skip = {n for names in plain_experts.values() for n in names.values()}
    skip |= {f"{base}.bias" for base in linears}  # already inside QuantLinear
    state.update({adapter.to_hf_name(name): reader.plain(name) for name in plain if name not in skip})
    expected = model.state_dict()
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise CheckpointError(f"{path}: tensors the model has no place for: {unexpected[:5]}")
    state = {k: v.to(expected[k].dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    _materialise_buffers(model, config, device)
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise CheckpointError(f"{path}: no stored values for {leftover[:5]}")
    return model.to(device)


def _materialise_buffers(model: nn.Module, config, device: str) -> None:
    """Rebuild the modules whose buffers are computed, not stored (rotary embeddings)."""
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            if "rotary" not in type(module).__name__.lower():
                raise CheckpointError(f"module {name} ({type(module).__name__}) has computed buffers ernieq cannot rebuild")
            with torch.device(device):
                model.set_submodule(name, type(module)(config=config))
