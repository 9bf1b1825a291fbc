"""What a checkpoint holds, layer by layer and by tensor class (``ernieq inspect``).

Plain and ernieq-quantized checkpoints alike: a quantized module's stored tensors
(``<base>.qweight``, ``<base>.scale`` ...) count as the logical weight
``<base>.weight`` of the shape its ``quantization_config`` records. Other formats'
readers (``ernieq.formats``) hand :func:`summarize_stored` their tensors under
these names.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from ernieq.model.adapters import TensorClass, TensorInfo, adapter_for
from ernieq.model.checkpoint import CheckpointReader

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "F8_E4M3": 1, "F8_E5M2": 1, "BOOL": 1}


SHOWN_PROJECTIONS = ("q_proj", "gate_proj", "down_proj", "gate_up_proj")  # enough to see every shape


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
class CheckpointSummary:
    layers: list[LayerSummary]
    params_by_class: Counter
    bytes_by_class: Counter
    params_by_codec: Counter  # quantized weights only, by codec name
    bytes_by_codec: Counter

    def bits_per_weight(self, cls: str) -> float:
        return 8.0 * self.bytes_by_class[cls] / self.params_by_class[cls] if self.params_by_class[cls] else 0.0

    def codec_bits_per_weight(self, codec: str) -> float:
        """Every stored byte of ``codec``'s modules (scales included) per weight."""
        return 8.0 * self.bytes_by_codec[codec] / self.params_by_codec[codec]


@dataclass(frozen=True)
class StoredTensor:
    """What ``summarize_stored`` counts: a tensor under the name the adapter classifies.

    name: the tensor's name (``<module>.weight`` for a quantized module); shape: its logical shape;
    params: the weights it adds (0 for the second and later stored tensors of one quantized module);
    nbytes: the bytes stored for it; codec: the codec of a quantized module, None for a plain tensor.
    """

    name: str
    shape: tuple[int, ...]
    params: int
    nbytes: int
    codec: str | None = None


def summarize(reader: CheckpointReader) -> CheckpointSummary:
    """Per layer: dense or MoE, experts, shapes, codecs, parameters and bytes; totals per class."""
    adapter = adapter_for(reader.config, str(reader.path / "config.json"))
    return summarize_stored(adapter, _stored_tensors(reader))


def _stored_tensors(reader: CheckpointReader) -> Iterator[StoredTensor]:
    """Every stored tensor of a plain or ernieq-quantized checkpoint folder."""
    modules = (reader.config.get("quantization_config") or {}).get("modules", {})
    counted: set[str] = set()
    for name in reader.keys():
        base = name.rsplit(".", 1)[0]
        spec = modules.get(base)
        shape = tuple(spec["shape"]) if spec else reader.shape(name)
        size = math.prod(reader.shape(name)) * DTYPE_BYTES.get(reader.dtype(name), 4)
        yield StoredTensor(f"{base}.weight" if spec else name, shape, 0 if base in counted else math.prod(shape),
                           size, spec["codec"] if spec else None)
        if spec:
            counted.add(base)


def summarize_stored(adapter, tensors: Iterable[StoredTensor]) -> CheckpointSummary:
    """The summary of ``tensors`` (any checkpoint format's, named as ``adapter`` classifies them)."""
    layers: dict[int | None, LayerSummary] = {}
    params, nbytes, codec_params, codec_bytes = Counter(), Counter(), Counter(), Counter()
    for t in tensors:
        info: TensorInfo = adapter.classify(t.name)
        shape, n, size = t.shape, t.params, t.nbytes
        key = info.layer
        s = layers.setdefault(key, LayerSummary(f"layer {key}" if key is not None else "outside layers", key))
        if key is not None and s.kind == "other":
            s.kind = "dense"
        if info.cls is TensorClass.ROUTED_EXPERT:
            s.kind = "moe"
            s.experts.update(range(shape[0]) if info.fused else [info.expert])
        s.shared_experts |= info.cls is TensorClass.SHARED_EXPERT
        if info.is_linear_weight and info.expert in (None, 0) and info.proj in SHOWN_PROJECTIONS:
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
    ordered = sorted(layers.values(), key=lambda s: (s.layer is None, s.layer or 0))
    return CheckpointSummary(ordered, params, nbytes, codec_params, codec_bytes)
