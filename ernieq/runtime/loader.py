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
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ernieq.calibration.layerwise import MetaModel
from ernieq.codecs import stack_experts
from ernieq.device import HOST
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


class QuantizedParts:
    """What a quantized checkpoint puts into a meta-device transformers model, by transformers name: ernieq
    modules holding the packed tensors of its quantized linear layers and routed-expert blocks, and every
    other tensor as stored (in ``dtype``). :meth:`place` puts in the parts whose names a predicate keeps, so
    a whole model (``load_quantized``) and one decoder layer at a time (``QuantizedLayerwise``) are built by
    the same code."""

    def __init__(self, reader: QuantizedCheckpoint, dtype: torch.dtype):
        self.reader, self.dtype, self.path = reader, dtype, Path(reader.path)
        self.adapter = adapter_for(reader.config, str(self.path / "config.json"))
        self.experts, self.linears = _split_expert_modules(reader)
        plain = reader.plain_names()
        self.plain_experts = _plain_expert_tensors(plain)
        skip = {n for names in self.plain_experts.values() for n in names.values()}
        skip |= {f"{base}.bias" for base in self.linears}  # inside QuantLinear
        self.plain, self.biases = [n for n in plain if n not in skip], set(plain) & skip

    def place(self, model: nn.Module, keep: Callable[[str], bool], device: torch.device) -> None:
        """Put into ``model`` (on the meta device) every part whose transformers name ``keep`` accepts, on ``device``."""
        reader = self.reader
        for base in self.linears:
            hf = self.adapter.to_hf_name(base)
            if keep(hf):
                bias_name = f"{base}.bias"
                bias = reader.plain(bias_name).to(self.dtype) if bias_name in self.biases else None
                model.set_submodule(hf, QuantLinear(reader.quantized(base), bias, reader.rotation(base)).to(device))
        for prefix, bases in self.experts.items():
            hf = self.adapter.to_hf_name(prefix)
            if keep(hf):
                model.set_submodule(hf, self._experts(prefix, bases).to(device))
        state = {}
        for prefix, names in self.plain_experts.items():
            hf_prefix = self.adapter.to_hf_name(prefix)
            if keep(hf_prefix):
                num = 1 + max(e for e, _ in names)
                w = {proj: torch.stack([reader.plain(names[(e, proj)]) for e in range(num)])
                     for proj in ("gate_proj", "up_proj", "down_proj")}
                state[f"{hf_prefix}.gate_up_proj"] = torch.cat([w["gate_proj"], w["up_proj"]], dim=1)  # [E, 2I, H]
                state[f"{hf_prefix}.down_proj"] = w["down_proj"]  # [E, H, I]
        names = {self.adapter.to_hf_name(name): name for name in self.plain}
        state.update({hf: reader.plain(name) for hf, name in names.items() if keep(hf)})
        expected = model.state_dict()
        unexpected = [k for k in state if k not in expected]
        if unexpected:
            raise CheckpointError(f"{self.path}: tensors the model has no place for: {unexpected[:5]}")
        state = {k: v.to(device, expected[k].dtype) if v.is_floating_point() else v.to(device) for k, v in state.items()}
        model.load_state_dict(state, strict=False, assign=True)

    def _experts(self, prefix: str, bases: dict) -> QuantMoEExperts:
        """The routed experts of one layer, stacked: {(e, proj): base} -> QuantMoEExperts."""
        num = 1 + max(e for e, _ in bases)
        stacks = []
        for proj in ("gate_proj", "up_proj", "down_proj"):
            missing = [e for e in range(num) if (e, proj) not in bases]
            if missing:
                raise CheckpointError(f"{self.path}: {prefix}: expert {missing[0]} {proj} is not quantized like the others")
            stacks.append(stack_experts([self.reader.quantized(bases[(e, proj)]) for e in range(num)]))
        turns = [_shared_rotation(self.reader, self.path, prefix, [bases[(e, p)] for e in range(num) for p in projs])
                 for projs in (("gate_proj", "up_proj"), ("down_proj",))]
        return QuantMoEExperts(*stacks, *turns)


def load_quantized(path: Path, dtype: torch.dtype = torch.float32, device: torch.device = HOST) -> nn.Module:
    """A transformers causal LM computing with the packed weights of the quantized checkpoint at ``path``,
    on ``device``, its unquantized tensors (norms, embeddings, router, head) in ``dtype``."""
    from transformers import AutoModelForCausalLM

    parts = QuantizedParts(open_quantized(Path(path)), dtype)
    config = hf_config(parts.reader.config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    parts.place(model, lambda name: True, device)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    _materialise_buffers(model, config, device)
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise CheckpointError(f"{path}: no stored values for {leftover[:5]}")
    return model.to(device)


class QuantizedLayerwise(MetaModel):
    """A quantized checkpoint's model with one decoder layer materialised at a time (``ernieq.runtime.stream``):
    the layer's ernieq modules and plain tensors are built from the reader on ``device``, and dropped again."""

    def __init__(self, path: Path, dtype: torch.dtype = torch.float32, device: torch.device = HOST):
        super().__init__(open_quantized(Path(path)), dtype, device)
        self.parts = QuantizedParts(self.reader, dtype)

    def place_outer(self) -> None:
        self.parts.place(self.model, lambda name: not name.startswith(self.layers_prefix), self.device)

    def load_layer(self, i: int) -> nn.Module:
        prefix = self.layer_prefix(i) + "."
        self.parts.place(self.model, lambda name: name.startswith(prefix), self.device)
        leftover = [n for n, p in self.layers[i].named_parameters() if p.is_meta]
        if leftover:
            raise CheckpointError(f"{self.path}: no stored values for {prefix}{leftover[0]}")
        return self.layers[i]

    def release_layer(self, i: int) -> None:
        for module in self.layers[i].modules():
            if isinstance(module, (QuantLinear, QuantMoEExperts)):
                module.drop_decoded()
        super().release_layer(i)


def _materialise_buffers(model: nn.Module, config, device: torch.device) -> None:
    """Rebuild the modules whose buffers are computed, not stored (rotary embeddings)."""
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            if "rotary" not in type(module).__name__.lower():
                raise CheckpointError(f"module {name} ({type(module).__name__}) has computed buffers ernieq cannot rebuild")
            with torch.device(device):
                model.set_submodule(name, type(module)(config=config))
