"""What a checkpoint holds, layer by layer (``ernieq inspect``)."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from ernieq.model.adapters import TensorClass, adapter_for, iter_groups
from ernieq.model.checkpoint import CheckpointReader
from ernieq.model.moe import ExpertGroup

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "F8_E4M3": 1, "F8_E5M2": 1, "BOOL": 1}


@dataclass
class LayerSummary:
    """One decoder layer (or the embeddings / head: ``layer`` None)."""

    label: str
    layer: int | None
    kind: str  # "dense", "moe" or "other"
    experts: int = 0
    shared_experts: bool = False
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    params: int = 0
    bytes: int = 0
    params_by_class: Counter = field(default_factory=Counter)


def summarize(reader: CheckpointReader) -> list[LayerSummary]:
    """Per layer: dense or MoE, experts, representative shapes, parameters and bytes."""
    adapter = adapter_for(reader.config, str(reader.path / "config.json"))
    by_layer: dict[str, LayerSummary] = {}
    for group in iter_groups(reader, adapter):
        label = f"layer {group.layer}" if group.layer is not None else group.key
        s = by_layer.setdefault(label, LayerSummary(label, group.layer, "other" if group.layer is None else "dense"))
        experts = ExpertGroup.from_infos(group.tensors)
        if experts is not None:
            s.kind = "moe"
            s.experts = experts.with_reader(reader).num_experts
        for info in group.tensors:
            shape = reader.shape(info.name)
            n = math.prod(shape)
            s.params += n
            s.bytes += n * DTYPE_BYTES.get(reader.dtype(info.name), 4)
            s.params_by_class[info.cls.value] += n
            if info.cls is TensorClass.SHARED_EXPERT:
                s.shared_experts = True
            if info.is_linear_weight and (info.expert in (None, 0)):
                key = f"{info.cls.value}.{info.proj}" if info.cls is not TensorClass.ATTENTION else info.proj
                s.shapes.setdefault(key, shape)
    return list(by_layer.values())
