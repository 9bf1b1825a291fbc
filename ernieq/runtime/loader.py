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
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ernieq.calibration.layerwise import MetaModel
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


def _experts_biases(adapter: Adapter, container: str, by_param: dict[str, str]) -> dict[str, str]:
    """The plain bias tensors an experts module computing expert by expert takes: {parameter: stored name}."""
    layout = adapter.layouts[container]
    if layout.kernel_ok:
        return {}
    return {p: by_param[f"{container}.{p}"] for p in (layout.gate_up_bias, layout.down_bias)
            if p is not None and f"{container}.{p}" in by_param}


class QuantizedParts:
    """What a quantized checkpoint puts into a meta-device transformers model, by transformers name: ernieq
    modules holding the packed tensors of its quantized linear layers and routed-expert blocks
    (``QuantMoEExperts``, or ``QuantExpertLoop`` where the layout is not the fused kernel's), and every other
    tensor as stored (in ``dtype``). Where each goes is the architecture adapter's answer. :meth:`place` puts
    in the parts whose names a predicate keeps, so a whole model (``load_quantized``) and one decoder layer at
    a time (``QuantizedLayerwise``) are built by the same code."""

    def __init__(self, reader: QuantizedCheckpoint, dtype: torch.dtype, adapter: Adapter | None = None):
        self.reader, self.dtype, self.path = reader, dtype, Path(reader.path)
        self.adapter = adapter or adapter_for(reader.config, str(self.path / "config.json"))
        self.experts, self.linears = _split_modules(reader, self.adapter)
        plain = set(reader.plain_names())
        by_param = {self.adapter.to_hf_name(n): n for n in plain}
        self.expert_biases = {c: _experts_biases(self.adapter, c, by_param) for c in self.experts}
        taken = {n for names in self.expert_biases.values() for n in names.values()}
        self.biases = {f"{base}.bias" for base in self.linears} & plain  # inside QuantLinear
        taken |= self.biases
        self.kept_experts: dict[str, dict] = defaultdict(dict)  # experts the recipe kept: {container: {(e, proj): name}}
        self.plain: dict[str, str] = {}  # transformers name -> stored name
        for name in plain - taken:
            found = self.adapter.expert_of(name)
            if found is not None and name.endswith(".weight"):
                self.kept_experts[found[0]][(found[1], found[2])] = name
            else:
                self.plain[self.adapter.to_hf_name(name)] = name

    def place(self, model: nn.Module, keep: Callable[[str], bool], device: torch.device) -> list[tuple[str, nn.Module]]:
        """Put into ``model`` (on the meta device) every part whose transformers name ``keep`` accepts, on
        ``device``. Returns the modules replaced by ernieq modules, (name, original), to put back later."""
        reader, adapter = self.reader, self.adapter
        replaced = []
        for base in self.linears:
            hf = adapter.to_hf_name(f"{base}.weight")[: -len(".weight")]
            if not keep(hf):
                continue
            try:
                target = model.get_submodule(hf)
            except AttributeError:
                target = None
            if not isinstance(target, nn.Linear):
                raise CheckpointError(f"{self.path}: quantized module {base} has no linear layer at {hf} in "
                                      f"{adapter.model_class}")
            bias_name = f"{base}.bias"
            bias = reader.plain(bias_name).to(self.dtype) if bias_name in self.biases else None
            model.set_submodule(hf, QuantLinear(reader.quantized(base), bias, reader.rotation(base)).to(device))
            replaced.append((hf, target))
        for container, bases in self.experts.items():
            if keep(container):
                original = model.get_submodule(container)
                model.set_submodule(container, self._experts(original, container, bases).to(device))
                replaced.append((container, original))
        state = {}
        for container, names in self.kept_experts.items():  # back into the module's own (fused) parameters
            if keep(container):
                state.update(self._kept_experts(model.get_submodule(container), container, names, device))
        state.update({hf: reader.plain(name) for hf, name in self.plain.items() if keep(hf)})
        expected = model.state_dict()
        unexpected = [k for k in state if k not in expected]
        if unexpected:
            raise CheckpointError(f"{self.path}: tensors the model has no place for: {unexpected[:5]}")
        state = {k: v.to(device, expected[k].dtype) if v.is_floating_point() else v.to(device) for k, v in state.items()}
        model.load_state_dict(state, strict=False, assign=True)
        return replaced

    def _kept_experts(self, module: nn.Module, container: str, names: dict, device: torch.device) -> dict:
        """The fused parameters of experts module ``container`` whose experts the recipe kept ({(e, proj):
        stored name}), each expert copied straight into place on ``device`` in the module's dtype, the files
        unmapped as the copy goes (``ExpertLayout.fill``, as calibration's layer loader does)."""
        layout = self.adapter.layouts[container]
        missing = [(e, p) for e in range(layout.num_experts) for p in PROJECTIONS if (e, p) not in names]
        if missing:
            e, p = missing[0]
            raise CheckpointError(f"{self.path}: {container}: expert {e} {p} is stored neither quantized nor kept "
                                  f"({len(missing)} missing tensor(s))")
        params = layout.fill(lambda e, p: self.reader.plain(names[(e, p)]), getattr(module, layout.gate_up).dtype,
                             device, after_expert=self.reader.release, where=f"{self.path}: {container}")
        return {f"{container}.{p}": t for p, t in params.items()}

    def _experts(self, original: nn.Module, container: str, bases: dict) -> nn.Module:
        """The packed stand-in for experts module ``container`` ({(e, proj): base}; ``original``: the
        transformers module it replaces, whose gate function an expert-by-expert loop uses)."""
        reader, path = self.reader, self.path
        layout = self.adapter.layouts[container]
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
            return QuantMoEExperts(*stacks, *turns)
        params = {p: reader.plain(name).to(self.dtype) for p, name in self.expert_biases[container].items()}
        per_expert = layout.biases(params)
        biases = {proj: torch.stack([per_expert[(e, proj)] for e in range(num)]) for proj in PROJECTIONS
                  if (0, proj) in per_expert}
        log.debug("%s: %s runs expert by expert (%s)", container, type(original).__name__, layout.describe())
        return QuantExpertLoop(layout, original, *stacks, biases, *turns)


def load_quantized(path: Path, dtype: torch.dtype = torch.float32, device: torch.device = HOST) -> nn.Module:
    """A transformers causal LM computing with the packed weights of the quantized checkpoint at ``path``,
    on ``device``, its unquantized tensors (norms, embeddings, router, head) in ``dtype``."""
    reader = open_quantized(Path(path))
    source = str(Path(path) / "config.json")
    parts = QuantizedParts(reader, dtype, adapter_for(reader.config, source))
    config = parts.adapter.hf
    model = meta_model(config, source, dtype)
    parts.place(model, lambda name: True, device)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    rebuild_computed_buffers(model, config, device)
    leftover = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p is not None and p.is_meta]
    if leftover:
        raise CheckpointError(f"{path}: no stored values for {leftover[:5]}")
    return model.to(device)


class QuantizedLayerwise(MetaModel):
    """A quantized checkpoint's model with one decoder layer materialised at a time (``ernieq.runtime.stream``):
    the layer's ernieq modules and plain tensors are built from the reader on ``device``, and dropped again
    (the transformers modules they replaced are put back, on the meta device)."""

    def __init__(self, path: Path, dtype: torch.dtype = torch.float32, device: torch.device = HOST):
        super().__init__(open_quantized(Path(path)), dtype, device)
        self.parts = QuantizedParts(self.reader, dtype, self.adapter)
        self._replaced: dict[int, list[tuple[str, nn.Module]]] = {}

    def place_outer(self) -> None:
        self.parts.place(self.model, lambda name: not name.startswith(self.layers_prefix), self.device)

    def load_layer(self, i: int) -> nn.Module:
        prefix = self.layer_prefix(i) + "."
        self._replaced[i] = self.parts.place(self.model, lambda name: name.startswith(prefix), self.device)
        rebuild_computed_buffers(self.model, self.config, self.device)  # a layer sent back to meta lost its own
        leftover = [n for n, p in self.layers[i].named_parameters() if p.is_meta]
        if leftover:
            raise CheckpointError(f"{self.path}: no stored values for {prefix}{leftover[0]}")
        return self.layers[i]

    def release_layer(self, i: int) -> None:
        for module in self.layers[i].modules():
            if isinstance(module, (QuantLinear, QuantMoEExperts)):
                module.drop_decoded()
        for name, original in self._replaced.pop(i, []):
            self.model.set_submodule(name, original)
        super().release_layer(i)
