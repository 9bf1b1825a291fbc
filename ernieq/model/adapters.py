"""Architecture adapters: what each tensor of a checkpoint is, derived from the transformers model.

There is one adapter for every causal LM transformers can build. :class:`Adapter` builds the
model ``config.json`` describes on the meta device and reads it:

- its module tree says what every parameter is (``tree.py``: attention, dense MLP, shared
  and routed experts, router, norm, embedding, head; ``unclassified`` for a matrix it cannot
  place);
- transformers' own conversion tables map checkpoint names onto the model's
  (``names.py``: renamings such as Mixtral's ``block_sparse_moe`` → ``mlp``, and per-expert
  tensors stacked into fused 3-D parameters);
- each experts module's layout comes from running it (``expert_layout.py``), each norm's
  fold rule likewise (``norm_fold.py``), and one shape-only run of every decoder layer says
  which weights read which tensors (``dataflow.py``: AWQ's fold sets, shared inputs).

Routed experts are handed out per expert under canonical names in the model's namespace,
``<experts module>.<e>.{gate_proj,up_proj,down_proj}.weight`` ([N, K] each), whichever layout
the checkpoint and the class use. Checkpoint tensors keep their own names everywhere else.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace

import torch

from ernieq.model.checkpoint import CheckpointError, CheckpointReader
from ernieq.model.dataflow import LayerFlow, trace_layer
from ernieq.model.decoder import decoder_stack, hf_config, layer_calls, meta_model
from ernieq.model.expert_layout import PROJECTIONS, ExpertLayout, probe_layout
from ernieq.model.names import Mapped, NameMap
from ernieq.model.norm_fold import NormFold, probe_norm_fold
from ernieq.model.shapes import expected_dims
from ernieq.model.tensor_info import (  # noqa: F401  (re-exported: the package's one import for these)
    BIAS,
    LINEAR_CLASSES,
    PARAM,
    WEIGHT,
    TensorClass,
    TensorInfo,
)
from ernieq.model.tree import ATTENTION, MLP, classify_model

log = logging.getLogger(__name__)

_CANONICAL = re.compile(r"^(?P<container>.+)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.(?P<kind>weight|bias)$")
_TRACE_TOKENS = 8  # sequence length of the shape-only run


@dataclass(frozen=True)
class FoldSet:
    """Weights that read one tensor, and the weight that produces it (transformers or canonical names):
    a norm's (``fold``: its rule) or rows ``lo:hi`` of a linear layer's (an up projection; ``rows``
    None: all of them). ``bias``: the producer's bias, scaled with it. ``consumers``: linear weights,
    router weights and canonical per-expert gate/up weights, all scaled along K."""

    producer: str
    consumers: tuple[str, ...]
    bias: str | None = None
    rows: tuple[int, int] | None = None
    fold: NormFold | None = None


class Adapter:
    """What every tensor of one architecture's checkpoints is (see the module doc)."""

    def __init__(self, config: dict, source: str = "config.json"):
        expected_dims(config, source)  # config fields of the wrong type fail here, named
        self.source = source
        self.hf = hf_config(config, source)
        model = meta_model(self.hf, source)
        self.model_class = type(model).__name__
        self.stack = decoder_stack(model, source)
        self.tree = classify_model(model, self.stack)
        self.names = NameMap(model)
        self.shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        self.param_count = sum(p.numel() for p in model.parameters()) + sum(
            b.numel() for k, b in model.named_buffers() if k in self.shapes)
        self.ignored = tuple(re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
        hidden = self.hf.get_text_config().hidden_size
        self.layouts: dict[str, ExpertLayout] = {
            path: _probe_cached(model.get_submodule(path), hidden, path) for path in self.tree.containers}
        self.norm_folds = {path: _norm_fold_cached(model.get_submodule(path)) for path in self.tree.norms}
        self.flows, self.untraced = _trace(model, self)
        self._place_norms()
        self._memo: dict[str, TensorInfo] = {}
        self._hub_names: dict[str, dict[str, str]] = {}  # experts module -> {canonical name: hub name}

    @property
    def name(self) -> str:
        return self.model_class

    # ------------------------------------------------------------------ names

    def to_hf_name(self, name: str) -> str:
        """The model's name for checkpoint (or canonical) name ``name``."""
        return name if self.expert_of(name) is not None else self.names.rename(name)

    def expert_of(self, name: str) -> tuple[str, int, str] | None:
        """(experts module, expert, projection) of a canonical per-expert name, else None."""
        m = _CANONICAL.match(name)
        if m is None or m["container"] not in self.layouts:
            return None
        return m["container"], int(m["expert"]), m["proj"]

    def checkpoint_name(self, name: str) -> str | None:
        """The name the hub's checkpoint gives canonical per-expert tensor ``name`` (what ``save_pretrained``
        writes: Mixtral's ``block_sparse_moe.experts.M.w1.weight``), which runtimes reading that layout look
        for; ``name`` itself for any other tensor; None where the checkpoint holds the experts only fused
        (GPT-OSS, Aria: no per-expert name exists)."""
        expert = self.expert_of(name)
        if expert is None:
            return name
        container = expert[0]
        if container not in self._hub_names:
            layout = self.layouts[container]
            hub = {}
            for param in layout.params:
                hf = f"{container}.{param}"
                for source in self.names.reverted(hf, self.shapes[hf]):
                    if self.names.map(source).pattern is not None:  # a per-expert piece of the fused parameter
                        info = self.classify(source)
                        hub[self.canonical_name(container, info.expert, info.proj, info.kind)] = source
            self._hub_names[container] = hub
        return self._hub_names[container].get(name)

    @staticmethod
    def canonical_name(container: str, expert: int, proj: str, kind: str = WEIGHT) -> str:
        return f"{container}.{expert}.{proj}.{kind}"

    # ------------------------------------------------------------------ classification

    def classify(self, name: str) -> TensorInfo:
        if name not in self._memo:
            self._memo[name] = self._classify(name)
        return self._memo[name]

    def _classify(self, name: str) -> TensorInfo:
        mapped = self.names.map(name)
        if mapped.pattern is not None and mapped.hf in self.tree.roles:
            return self._per_expert(name, mapped)
        expert = self.expert_of(name)
        if expert is not None:
            container, e, proj = expert
            kind = BIAS if name.endswith(".bias") else WEIGHT
            return TensorInfo(name, TensorClass.ROUTED_EXPERT, self.tree.containers[container], e, proj, False, kind, MLP)
        role = self.tree.roles.get(mapped.hf)
        if role is not None:
            fused = role.container in self.layouts and role.kind != PARAM
            return TensorInfo(name, role.cls, role.layer, role.expert, role.proj, fused, role.kind, role.part)
        layer = _layer_of(name)
        if any(p.search(name) for p in self.ignored):
            return TensorInfo(name, TensorClass.UNUSED, layer)
        return TensorInfo(name, TensorClass.UNCLASSIFIED, layer)

    def _per_expert(self, name: str, mapped: Mapped) -> TensorInfo:
        """A per-expert checkpoint tensor (stacked into a fused parameter by transformers' converter)."""
        container, _, param = mapped.hf.rpartition(".")
        layout = self.layouts[container]
        converter = self.names.converter_of(mapped.pattern)
        ops = [type(op).__name__ for op in converter.operations]
        proj = None
        if param == layout.down and ops == ["MergeModulelist"]:
            proj = "down_proj"
        elif param == layout.gate_up and ops == ["MergeModulelist", "Concatenate"] and len(converter.source_patterns) == 2:
            axis = 2 if layout.gate_up_k_major else 1
            if converter.operations[1].dim in (axis, axis - 3) and not layout.interleaved:
                part = converter.source_patterns.index(mapped.pattern)
                proj = ("gate_proj", "up_proj")[part if layout.gate_first else 1 - part]
        if proj is None:
            raise CheckpointError(f"{self.source}: tensor {name!r} goes into {mapped.hf} by {ops}, which ernieq "
                                  f"cannot map onto per-expert projections ({layout.describe()})")
        kind = BIAS if name.endswith(".bias") else WEIGHT
        return TensorInfo(name, TensorClass.ROUTED_EXPERT, self.tree.containers[container], mapped.expert, proj,
                          False, kind, MLP)

    def in_model(self, name: str) -> bool:
        """Whether checkpoint (or canonical) tensor ``name`` has a place in the model."""
        return self.expert_of(name) is not None or self.names.map(name).hf in self.tree.roles

    def fused_expert(self, name: str) -> bool:
        """Whether tensor ``name`` belongs to a fused experts module (handed out per expert by its layout);
        a per-expert list's linear layers are ordinary linear layers of class routed_experts."""
        return self.container_of(name) in self.layouts

    def container_of(self, name: str) -> str | None:
        """The experts module a routed-expert tensor (checkpoint or canonical name) belongs to."""
        expert = self.expert_of(name)
        if expert is not None:
            return expert[0]
        role = self.tree.roles.get(self.names.map(name).hf)
        return role.container if role is not None else None

    # ------------------------------------------------------------------ shapes

    def expected_shape(self, name: str) -> tuple[int, ...] | None:
        """The shape checkpoint (or canonical) tensor ``name`` must have; None when nothing is known."""
        expert = self.expert_of(name)
        if expert is not None:
            layout = self.layouts[expert[0]]
            n_k = (layout.hidden, layout.inter) if expert[2] == "down_proj" else (layout.inter, layout.hidden)
            return n_k[:1] if name.endswith(".bias") else n_k
        mapped = self.names.map(name)
        if mapped.hf not in self.shapes:
            return None
        if mapped.pattern is None:
            return self.shapes[mapped.hf]
        return self.names.piece_shapes(mapped.hf, self.shapes[mapped.hf]).get(mapped.pattern)

    def check_shapes(self, reader: CheckpointReader, infos) -> None:
        """Every tensor in ``infos`` has the shape the config implies, and routed experts an index below E."""
        for info in infos:
            want = self.expected_shape(info.name)
            got = reader.shape(info.name)
            if want is not None and tuple(got) != tuple(want):
                raise CheckpointError(f"{reader.file_of(info.name)}: tensor {info.name!r} has shape {list(got)}, "
                                      f"{self.source} implies {list(want)}")
            if info.expert is not None and self.fused_expert(info.name):  # a list's experts are its entries
                num = self.layouts[self.container_of(info.name)].num_experts
                if info.expert >= num:
                    raise CheckpointError(f"{reader.file_of(info.name)}: tensor {info.name!r} is expert {info.expert},"
                                          f" {self.source} says {num} experts")

    # ------------------------------------------------------------------ dataflow

    def _place_norms(self) -> None:
        """A layer's norms go with the attention when they feed it, else with the MLP (``TensorInfo.part``)."""
        attention = {r.module for r in self.tree.roles.values() if r.cls is TensorClass.ATTENTION}
        for flow in self.flows.values():
            for norm, readers in flow.feeds.items():
                if any(r in attention for r in readers):
                    for full, role in self.tree.roles.items():
                        if role.module == norm:
                            self.tree.roles[full] = replace(role, part=ATTENTION)

    def fold_sets(self, layer: int) -> tuple[list[FoldSet], list[str]]:
        """AWQ's fold sets of decoder ``layer`` (transformers names), and why any weights are left out."""
        if layer in self.untraced:
            return [], [self.untraced[layer]]
        flow: LayerFlow = self.flows[layer]
        sets, skipped = [], []
        for norm, readers in flow.feeds.items():
            fold = self.norm_folds.get(norm)
            if norm in flow.escaped:
                skipped.append(f"{norm}: its output also feeds something other than linear layers")
            elif not isinstance(fold, NormFold):
                skipped.append(f"{norm}: {fold}")
            else:
                sets.append(FoldSet(f"{norm}.weight", self._consumer_weights(readers), self._bias(norm), None, fold))
        for up in flow.up_folds:
            sets.append(FoldSet(f"{up.producer}.weight", (f"{up.consumer}.weight",), self._bias(up.producer),
                                (up.lo, up.hi)))
        for container, layout in self.layouts.items():
            if self.tree.containers[container] != layer:
                continue
            if layout.up_linear and not layout.has_bias:
                for e in range(layout.num_experts):
                    sets.append(FoldSet(self.canonical_name(container, e, "up_proj"),
                                        (self.canonical_name(container, e, "down_proj"),)))
            else:
                skipped.append(f"{container}: its hidden state is not linear in up (down_proj's scale cannot fold)")
        return sets, skipped

    def _bias(self, module: str) -> str | None:
        return f"{module}.bias" if f"{module}.bias" in self.shapes else None

    def _consumer_weights(self, readers: list[str]) -> tuple[str, ...]:
        out = []
        for module in readers:
            if module in self.layouts:
                layout = self.layouts[module]
                out += [self.canonical_name(module, e, p) for e in range(layout.num_experts) for p in PROJECTIONS[:2]]
            else:
                out += [n for n, r in self.tree.roles.items() if r.module == module and n.endswith(".weight")
                        and len(self.shapes.get(n, ())) == 2]
        return tuple(out)

    def shared_inputs(self, layer: int) -> list[list[str]]:
        """Linear layers (module paths) of ``layer`` that read one and the same tensor."""
        return self.flows[layer].shared if layer in self.flows else []


_LAYOUTS: dict[tuple, ExpertLayout] = {}
_NORM_FOLDS: dict[tuple, NormFold | str] = {}


def _own_shapes(module) -> tuple:
    return tuple((n, tuple(p.shape)) for n, p in module.named_parameters(recurse=False))


def _probe_cached(module, hidden: int, where: str) -> ExpertLayout:
    """probe_layout, once per class and shapes (every MoE layer of a model shares them)."""
    key = (type(module), _own_shapes(module), hidden)
    if key not in _LAYOUTS:
        _LAYOUTS[key] = probe_layout(module, hidden, where)
    return _LAYOUTS[key]


def _norm_fold_cached(module) -> NormFold | str:
    key = (type(module), _own_shapes(module))
    if key not in _NORM_FOLDS:
        _NORM_FOLDS[key] = probe_norm_fold(module)
    return _NORM_FOLDS[key]


def _trace(model, adapter: Adapter) -> tuple[dict[int, LayerFlow], dict[int, str]]:
    """One shape-only run of every decoder layer: {layer: flow}, and {layer: why it did not run} for the
    layers that did not (a MoE block routing by values, as a per-expert list's loop does)."""
    hidden = adapter.hf.get_text_config().hidden_size
    layers = model.get_submodule(adapter.stack.layers)
    flows, untraced = {}, {}
    with torch.device("meta"):
        try:
            calls = layer_calls(model, adapter.stack, torch.empty(1, _TRACE_TOKENS, hidden))
        except Exception as err:  # noqa: BLE001 - any failure of a foreign forward means: no dataflow, said once
            reason = f"a shape-only run of {adapter.model_class} failed ({type(err).__name__}: {err})"
            return {}, {i: reason for i in range(len(layers))}
        for i, layer in enumerate(layers):
            prefix = adapter.stack.layer(i)
            inside = lambda paths: {p for p in paths if p.startswith(prefix + ".")}  # noqa: E731
            try:
                flows[i] = trace_layer(layer, prefix, calls[i], inside(adapter.tree.containers),
                                       inside(adapter.tree.routers.values()), inside(adapter.tree.norms))
            except Exception as err:  # noqa: BLE001 - as above, for this layer
                untraced[i] = f"a shape-only run of decoder layer {i} failed ({type(err).__name__}: {err})"
    if untraced:
        log.info("%s: %d decoder layer(s) did not run on the meta device (%s); AWQ leaves them unscaled",
                 adapter.source, len(untraced), next(iter(untraced.values())))
    return flows, untraced


def _layer_of(name: str) -> int | None:
    m = re.search(r"layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


_ADAPTERS: dict[str, Adapter] = {}


def adapter_for(config: dict, source: str = "config.json") -> Adapter:
    """The adapter for a checkpoint's ``config.json`` (built once per distinct config)."""
    archs = config.get("architectures") or []
    model_type = config.get("model_type")
    if not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise CheckpointError(f"{source}: 'architectures' must be a list of strings, got {archs!r}")
    if model_type is not None and not isinstance(model_type, str):
        raise CheckpointError(f"{source}: 'model_type' must be a string, got {model_type!r}")
    key = json.dumps({k: v for k, v in config.items() if k != "quantization_config"}, sort_keys=True, default=str)
    if key not in _ADAPTERS:
        _ADAPTERS[key] = Adapter(config, source)
    return _ADAPTERS[key]


@dataclass(frozen=True)
class TensorGroup:
    """The tensors that are processed together: one layer's attention, one layer's
    MLP or MoE block (router, shared and all routed experts), or the rest."""

    key: str
    layer: int | None
    tensors: tuple[TensorInfo, ...]

    def load(self, reader: CheckpointReader, lazy: bool = False) -> Mapping[str, torch.Tensor]:
        """The group's tensors; a NaN or Inf in any of them fails when it is read, naming file and tensor.
        ``lazy``: each is read when first asked for (a rank quantizing a few experts of a layer reads only those)."""
        tensors = LazyTensors(reader, tuple(t.name for t in self.tensors))
        return tensors if lazy else dict(tensors)


class LazyTensors(Mapping):
    """Named tensors of a checkpoint, each read (and checked for NaN and Inf) the first time it is asked for."""

    def __init__(self, reader: CheckpointReader, names: tuple[str, ...]):
        self._reader, self._names, self._read = reader, names, {}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._read:
            if name not in self._names:
                raise KeyError(name)
            t = self._reader.get(name)
            bad = non_finite_count(t)
            if bad:
                raise CheckpointError(f"{self._reader.file_of(name)}: tensor {name!r} has {bad} non-finite "
                                      f"value(s) (NaN or Inf)")
            self._read[name] = t
        return self._read[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def non_finite_count(t: torch.Tensor) -> int:
    """NaN and Inf values in ``t`` (0 for integer tensors); float8, which torch cannot test, is widened first."""
    if not t.is_floating_point():
        return 0
    wide = t.float() if t.element_size() == 1 else t  # float8: isfinite is not implemented for every kind
    finite = wide.isfinite()
    return 0 if bool(finite.all()) else int((~finite).sum())


def _group_key(info: TensorInfo) -> tuple[int, int, str]:
    """(layer, order, part): a layer's attention (with the norms that feed it), then its MLP or MoE
    block (with the norms that feed it, so a scale folded into a norm stays in the group)."""
    if info.layer is None:
        return (-1 if info.cls is TensorClass.EMBEDDING else 1 << 30, 0, "other")
    part = ATTENTION if info.part == ATTENTION else MLP
    return (info.layer, 0 if part == ATTENTION else 1, part)


def iter_groups(reader: CheckpointReader, adapter: Adapter | None = None) -> Iterator[TensorGroup]:
    """The checkpoint's tensors in groups, in layer order; nothing is loaded yet.

    Every tensor's shape is checked against config.json first.
    """
    adapter = adapter or adapter_for(reader.config, str(reader.path / "config.json"))
    groups: dict[tuple[int, int, str], list[TensorInfo]] = {}
    for name in reader.keys():
        info = adapter.classify(name)
        groups.setdefault(_group_key(info), []).append(info)
    adapter.check_shapes(reader, (i for g in groups.values() for i in g))
    for key in sorted(groups):
        layer, _, part = key
        real_layer = layer if 0 <= layer < 1 << 30 else None
        label = f"layers.{layer}.{part}" if real_layer is not None else ("embeddings" if layer < 0 else "head")
        yield TensorGroup(label, real_layer, tuple(sorted(groups[key], key=lambda t: t.name)))


def stream_groups(reader: CheckpointReader, adapter: Adapter | None = None):
    """(group, {name: tensor}) in layer order, loading one group at a time.

    The generator drops its reference to a group's tensors when the next group
    is asked for, so at most the current group and the one being loaded are in
    memory (plus whatever the caller keeps).
    """
    for group in iter_groups(reader, adapter):
        tensors = group.load(reader)
        yield group, tensors
        del tensors
