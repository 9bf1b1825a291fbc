"""Build a transformers model from a quantized checkpoint, with packed weights.

The checkpoint is any format ``ernieq.formats`` reads (ernieq native, FastDeploy):
its reader presents native module names and each module's codec tensors. The model
is created on the meta device (no memory for weights), its quantized linear layers
and routed-expert blocks are replaced by ernieq modules holding the packed tensors,
and every other tensor is loaded from the checkpoint as stored. Where a weight goes is
the architecture adapter's answer (``ernieq.model.adapters``): any linear layer of any
causal LM transformers builds; an experts module becomes ``QuantMoEExperts`` (the fused
kernel) when its layout computes ``silu(gate) * up`` without biases, else
``QuantExpertLoop`` (expert by expert, with the class's own gate function).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from ernieq.codecs import stack_experts
from ernieq.device import HOST
from ernieq.formats.registry import QuantizedCheckpoint, open_quantized
from ernieq.model.adapters import Adapter, adapter_for
from ernieq.model.checkpoint import CheckpointError
from ernieq.model.decoder import meta_model, rebuild_computed_buffers
from ernieq.model.expert_layout import PROJECTIONS
from ernieq.runtime.expert_loop import QuantExpertLoop
from ernieq.runtime.modules import QuantLinear, QuantMoEExperts

log = logging.getLogger(__name__)


def _split_modules(reader: QuantizedCheckpoint, adapter: Adapter) -> tuple[dict, list[str]]:
    """Quantized routed experts by experts module ({container: {(e, proj): base}}) and the other bases."""
    experts: dict[str, dict] = defaultdict(dict)
    linears = []
    for base in reader.modules:
        found = adapter.expert_of(f"{base}.weight")
        if found is not None:
            container, e, proj = found
            experts[container][(e, proj)] = base
        else:
            linears.append(base)
    return experts, linears


def _shared_rotation(reader: QuantizedCheckpoint, path: Path, prefix: str, bases: list[str]):
    """The one input rotation of modules that share their input (an expert layer's gate and up, or its downs)."""
    keys = {reader.modules[b].rotation for b in bases}
    if len(keys) > 1:
        raise CheckpointError(f"{path}: {prefix}: experts sharing an input are stored with different rotations {sorted(map(str, keys))}")
    return reader.rotation(bases[0])


def _experts_module(reader, path: Path, adapter: Adapter, model: nn.Module, container: str, bases: dict,
                    plain: set[str], dtype: torch.dtype) -> tuple[nn.Module, set[str]]:
    """The packed stand-in for experts module ``container``, and the plain tensors it took (its biases)."""
    layout = adapter.layouts[container]
    num = layout.num_experts
    stacks = []
    for proj in PROJECTIONS:
        missing = [e for e in range(num) if (e, proj) not in bases]
        if missing:
            raise CheckpointError(f"{path}: {container}: expert {missing[0]} {proj} is not quantized like the others")
        stacks.append(stack_experts([reader.quantized(bases[(e, proj)]) for e in range(num)]))
    turns = [_shared_rotation(reader, path, container, [bases[(e, p)] for e in range(num) for p in projs])
             for projs in (("gate_proj", "up_proj"), ("down_proj",))]
    if layout.kernel_ok:
        return QuantMoEExperts(*stacks, *turns), set()
    by_param = {adapter.to_hf_name(n): n for n in plain}
    params = {p: reader.plain(by_param[f"{container}.{p}"]).to(dtype) for p in (layout.gate_up_bias, layout.down_bias)
              if p is not None and f"{container}.{p}" in by_param}
    per_expert = layout.biases(params)
    biases = {proj: torch.stack([per_expert[(e, proj)] for e in range(num)]) for proj in PROJECTIONS
              if (0, proj) in per_expert}
    taken = {by_param[f"{container}.{p}"] for p in params}
    original = model.get_submodule(container)
    log.debug("%s: %s runs expert by expert (%s)", container, type(original).__name__, layout.describe())
    return QuantExpertLoop(layout, original, *stacks, biases, *turns), taken


def load_quantized(path: Path, dtype: torch.dtype = torch.float32, device: torch.device = HOST) -> nn.Module:
    """A transformers causal LM computing with the packed weights of the quantized checkpoint at ``path``,
    on ``device``, its unquantized tensors (norms, embeddings, router, head) in ``dtype``."""
    reader = open_quantized(Path(path))
    source = str(Path(path) / "config.json")
    adapter = adapter_for(reader.config, source)
    config = adapter.hf
    model = meta_model(config, source, dtype)

    experts, linears = _split_modules(reader, adapter)
    plain = set(reader.plain_names())
    taken: set[str] = set()
    for base in linears:
        hf = adapter.to_hf_name(f"{base}.weight")[: -len(".weight")]
        try:
            target = model.get_submodule(hf)
        except AttributeError:
            target = None
        if not isinstance(target, nn.Linear):
            raise CheckpointError(f"{path}: quantized module {base} has no linear layer at {hf} in {adapter.model_class}")
        bias_name = f"{base}.bias"
        bias = reader.plain(bias_name).to(dtype) if bias_name in plain else None
        taken.add(bias_name)
        model.set_submodule(hf, QuantLinear(reader.quantized(base), bias, reader.rotation(base)))
    for container, bases in experts.items():
        module, took = _experts_module(reader, Path(path), adapter, model, container, bases, plain, dtype)
        model.set_submodule(container, module)
        taken |= took

    state = {}
    kept_experts: dict[str, dict] = defaultdict(dict)
    for name in plain - taken:
        found = adapter.expert_of(name)
        if found is not None and name.endswith(".weight"):
            kept_experts[found[0]][(found[1], found[2])] = reader.plain(name)
        else:
            state[adapter.to_hf_name(name)] = reader.plain(name)
    for container, weights in kept_experts.items():  # experts the recipe kept: back into the fused parameters
        layout = adapter.layouts[container]
        state.update({f"{container}.{p}": t for p, t in layout.fuse(weights, layout.num_experts).items()})
    expected = model.state_dict()
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise CheckpointError(f"{path}: tensors the model has no place for: {unexpected[:5]}")
    state = {k: v.to(expected[k].dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    rebuild_computed_buffers(model, config, device)
    leftover = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p is not None and p.is_meta]
    if leftover:
        raise CheckpointError(f"{path}: no stored values for {leftover[:5]}")
    return model.to(device)
