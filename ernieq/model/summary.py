"""What a checkpoint holds, layer by layer and by tensor class, and where every parameter went
(``ernieq inspect``).

Plain and quantized checkpoints alike: a quantized module's stored tensors
(``<base>.qweight``, ``<base>.scale`` ...) count as the logical weight ``<base>.weight``
of the shape its ``quantization_config`` records; the format readers (``ernieq.formats``)
hand :func:`summarize_stored` their tensors under these names.

The accounting puts every parameter of the checkpoint in one row: ``quantized`` (by codec),
``kept`` (with the reason: norm, router, embedding, bias, kept by the recipe ...), ``tied``
(a stored copy of a tied weight), ``extra`` (a tensor the model class does not load) or
``unclassified`` (a matrix ernieq cannot place and the recipe does not name: ``quantize``
refuses it). Quantized, kept and unclassified add up to the model's own parameter count (from
the meta-device model, tied weights once) for a complete checkpoint. For a plain checkpoint the
split is the one a recipe would make (:class:`RecipeView`).
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from ernieq.model.adapters import Adapter, TensorClass, TensorInfo, adapter_for
from ernieq.model.checkpoint import CheckpointReader
from ernieq.model.tensor_info import WEIGHT, kept_reason

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "F8_E4M3": 1, "F8_E5M2": 1, "BOOL": 1}

SHOWN_PROJECTIONS = ("q_proj", "qkv_proj", "q_a_proj", "gate_proj", "gate_up_proj", "down_proj")  # enough to see every shape
QUANTIZED, KEPT, TIED, EXTRA, UNCLASSIFIED = "quantized", "kept", "tied", "extra", "unclassified"


@dataclass(frozen=True)
class RecipeView:
    """What a recipe would do to a plain checkpoint: ``choose(canonical weight name, info)`` is the codec
    name or None (kept); ``keeps(name)`` whether the recipe names a tensor to keep as it is."""

    choose: Callable[[str, TensorInfo], str | None]
    keeps: Callable[[str], bool]


@dataclass
class LayerSummary:
    """One decoder layer, or the tensors outside the layers (``layer`` None)."""

    label: str
    layer: int | None
    kind: str = "other"  # "dense", "moe" or "other"
    experts: set = field(default_factory=set)
    shared_experts: bool = False
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    codecs: Counter = field(default_factory=Counter)
    params: int = 0
    bytes: int = 0


@dataclass
class AccountRow:
    """Parameters of one (status, reason): how many tensors, weights, and their names (layer and expert
    indices collapsed, see :func:`name_patterns`)."""

    tensors: int = 0
    params: int = 0
    names: list[str] = field(default_factory=list)


@dataclass
class CheckpointSummary:
    layers: list[LayerSummary]
    params_by_class: Counter
    bytes_by_class: Counter
    params_by_codec: Counter  # quantized weights only, by codec name
    bytes_by_codec: Counter
    accounting: dict[tuple[str, str], AccountRow] = field(default_factory=dict)
    model_params: int = 0  # the model's parameters and persistent buffers, tied weights once
    model_class: str = ""
    overhead_bytes: int = 0  # stored bytes that are no model parameter (ernieq's rotations)

    def bits_per_weight(self, cls: str) -> float:
        return 8.0 * self.bytes_by_class[cls] / self.params_by_class[cls] if self.params_by_class[cls] else 0.0

    def codec_bits_per_weight(self, codec: str) -> float:
        """Every stored byte of ``codec``'s modules (scales included) per weight."""
        return 8.0 * self.bytes_by_codec[codec] / self.params_by_codec[codec]

    @property
    def stored_bytes(self) -> int:
        """Every stored byte: the tensor classes' and the overhead (bytes that are no model parameter)."""
        return sum(self.bytes_by_class.values()) + self.overhead_bytes

    def accounted(self, *statuses: str) -> int:
        return sum(row.params for (status, _), row in self.accounting.items() if status in statuses)


@dataclass(frozen=True)
class StoredTensor:
    """What ``summarize_stored`` counts: a tensor under the name the adapter classifies.

    name: the tensor's name (``<module>.weight`` for a quantized module); shape: its logical shape;
    params: the weights it adds (0 for the second and later stored tensors of one quantized module);
    nbytes: the bytes stored for it; codec: the codec of a quantized module, None for a plain tensor;
    overhead: stored bytes that belong to no model parameter (counted in bytes only).
    """

    name: str
    shape: tuple[int, ...]
    params: int
    nbytes: int
    codec: str | None = None
    overhead: bool = False


def summarize(reader: CheckpointReader, recipe: RecipeView | None = None) -> CheckpointSummary:
    """Per layer: dense or MoE, experts, shapes, codecs, parameters and bytes; totals per class; the
    accounting, by what ``recipe`` would do to this plain checkpoint."""
    adapter = adapter_for(reader.config, str(reader.path / "config.json"))
    return summarize_stored(adapter, _stored_tensors(reader), recipe)


def _stored_tensors(reader: CheckpointReader) -> Iterator[StoredTensor]:
    """Every stored tensor of a plain checkpoint folder."""
    for name in reader.keys():
        shape = reader.shape(name)
        yield StoredTensor(name, shape, math.prod(shape), math.prod(shape) * DTYPE_BYTES.get(reader.dtype(name), 4))


_INDEX = re.compile(r"(?:(?<=\blayers\.)|(?<=\bexperts\.))\d+(?=\.)")


def name_patterns(names: Iterable[str]) -> list[str]:
    """Names with their layer and expert indices collapsed: ``model.layers.{0-27}.input_layernorm.weight``."""
    groups: dict[str, list[list[int]]] = defaultdict(list)
    for name in names:
        groups[_INDEX.sub("#", name)].append([int(m.group()) for m in _INDEX.finditer(name)])
    out = []
    for pattern, indices in sorted(groups.items()):
        for slot in range(pattern.count("#")):
            values = sorted({ix[slot] for ix in indices})
            span = f"{values[0]}-{values[-1]}" if len(values) > 1 and values == list(range(values[0], values[-1] + 1)) \
                else ",".join(map(str, values))
            pattern = pattern.replace("#", "{" + span + "}" if len(values) > 1 else span, 1)
        out.append(pattern)
    return out


def _expert_pieces(adapter: Adapter, info: TensorInfo, shape: tuple[int, ...]) -> Iterator[tuple[str, int]]:
    """(canonical per-expert name, weights) of a routed-expert weight as stored (fused or per expert)."""
    container = adapter.container_of(info.name)
    layout = adapter.layouts[container]
    if not info.fused:
        yield adapter.canonical_name(container, info.expert, info.proj), math.prod(shape)
        return
    projs = ("down_proj",) if info.proj == layout.down else ("gate_proj", "up_proj")
    for e in range(shape[0]):
        for proj in projs:
            yield adapter.canonical_name(container, e, proj), math.prod(shape[1:]) // len(projs)


def _account(adapter: Adapter, t: StoredTensor, info: TensorInfo, stored_hf: set[str],
             recipe: RecipeView | None) -> Iterator[tuple[str, str, str, int]]:
    """(status, reason, name, params) pieces of one stored tensor."""
    hf = adapter.to_hf_name(t.name)
    unclassified = info.cls is TensorClass.UNCLASSIFIED
    if t.codec is not None:
        yield QUANTIZED, t.codec, t.name, t.params
    elif info.cls is TensorClass.UNUSED or (unclassified and not adapter.in_model(t.name)):
        yield EXTRA, kept_reason(info) if info.cls is TensorClass.UNUSED else "no place in the model", t.name, t.params
    elif hf in adapter.tree.aliases and adapter.tree.aliases[hf] in stored_hf:
        yield TIED, f"tied to {adapter.tree.aliases[hf]}", t.name, t.params
    elif unclassified and recipe is not None and not recipe.keeps(t.name):
        yield UNCLASSIFIED, "quantize refuses it unless the recipe names it (--override 'REGEX=none')", t.name, t.params
    elif info.is_linear_weight and recipe is not None:
        pieces = _expert_pieces(adapter, info, t.shape) if adapter.fused_expert(t.name) else [(t.name, t.params)]
        for name, n in pieces:
            codec = recipe.choose(name, adapter.classify(name))
            yield (QUANTIZED, codec, name, n) if codec else (KEPT, kept_reason(info), name, n)
    else:
        yield KEPT, kept_reason(info), t.name, t.params


def summarize_stored(adapter: Adapter, tensors: Iterable[StoredTensor], recipe: RecipeView | None = None) -> CheckpointSummary:
    """The summary of ``tensors`` (any checkpoint format's, named as ``adapter`` classifies them)."""
    layers: dict[int | None, LayerSummary] = {}
    params, nbytes, codec_params, codec_bytes = Counter(), Counter(), Counter(), Counter()
    tensors = list(tensors)
    stored_hf = {adapter.to_hf_name(t.name) for t in tensors if not t.overhead}
    accounting: dict[tuple[str, str], AccountRow] = defaultdict(AccountRow)
    names: dict[tuple[str, str], list[str]] = defaultdict(list)
    overhead = 0
    for t in tensors:
        if t.overhead:
            overhead += t.nbytes
            continue
        info: TensorInfo = adapter.classify(t.name)
        shape, n, size = t.shape, t.params, t.nbytes
        key = info.layer
        s = layers.setdefault(key, LayerSummary(f"layer {key}" if key is not None else "outside layers", key))
        if key is not None and s.kind == "other":
            s.kind = "dense"
        if info.cls is TensorClass.ROUTED_EXPERT and info.kind == WEIGHT:
            s.kind = "moe"
            s.experts.update(range(shape[0]) if info.fused else [info.expert])
        s.shared_experts |= info.cls is TensorClass.SHARED_EXPERT
        if info.kind == WEIGHT and info.expert in (None, 0) and info.proj in SHOWN_PROJECTIONS:
            label = info.proj if info.cls is TensorClass.ATTENTION else f"{info.cls.value}.{info.proj}"
            s.shapes.setdefault(label, shape)
        if t.codec:
            s.codecs[t.codec] += n
            codec_params[t.codec] += n
            codec_bytes[t.codec] += size
        s.params += n
        s.bytes += size
        params[info.cls.value] += n
        nbytes[info.cls.value] += size
        if n:
            for status, reason, name, count in _account(adapter, t, info, stored_hf, recipe):
                row = accounting[(status, reason)]
                row.tensors += 1
                row.params += count
                names[(status, reason)].append(name)
    for key, row in accounting.items():
        row.names = name_patterns(names[key])
    ordered = sorted(layers.values(), key=lambda s: (s.layer is None, s.layer or 0))
    return CheckpointSummary(ordered, params, nbytes, codec_params, codec_bytes, dict(accounting),
                             adapter.param_count, adapter.model_class, overhead)

