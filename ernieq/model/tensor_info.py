"""What one tensor of a checkpoint is: its class, layer, expert and projection."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class TensorClass(str, Enum):
    ATTENTION = "attention"
    DENSE_MLP = "dense_mlp"
    SHARED_EXPERT = "shared_experts"
    ROUTED_EXPERT = "routed_experts"
    ROUTER = "router"
    NORM = "norm"
    EMBEDDING = "embedding"
    LM_HEAD = "lm_head"
    OTHER = "other"  # a model parameter that multiplies nothing along K (attention sinks, scalars): kept
    UNUSED = "unused"  # a checkpoint tensor the model class declares it does not load (e.g. ERNIE's mtp)
    UNCLASSIFIED = "unclassified"  # a matrix ernieq cannot place: an error unless the recipe names it


LINEAR_CLASSES = (TensorClass.ATTENTION, TensorClass.DENSE_MLP, TensorClass.SHARED_EXPERT, TensorClass.ROUTED_EXPERT)

WEIGHT, BIAS, PARAM = "weight", "bias", "param"  # TensorInfo.kind


@dataclass(frozen=True)
class TensorInfo:
    """What one tensor is. ``proj`` is the projection's name (the linear layer's own, ``q_proj``,
    ``qkv_proj`` ...; ``gate_proj``, ``up_proj``, ``down_proj`` for a routed expert; the fused
    parameter's for a fused one); ``expert`` is set for per-expert routed tensors; ``fused`` for
    [E, ...] ones. ``kind``: ``weight`` for a matrix a linear layer multiplies by, ``bias``, or
    ``param`` for anything else. ``part``: ``attention`` or ``mlp``, the half of its decoder layer
    it is processed with (norms go with the weights they feed)."""

    name: str
    cls: TensorClass
    layer: int | None = None
    expert: int | None = None
    proj: str | None = None
    fused: bool = False
    kind: str = PARAM
    part: str | None = None

    @property
    def is_linear_weight(self) -> bool:
        return self.cls in LINEAR_CLASSES and self.kind == WEIGHT


KEPT_BY_RECIPE = "kept by the recipe (an override 'REGEX=none')"
_KEPT = {
    TensorClass.EMBEDDING: "embedding",
    TensorClass.LM_HEAD: "lm_head",
    TensorClass.NORM: "norm",
    TensorClass.ROUTER: "router or gate (selects experts; never quantized)",
    TensorClass.OTHER: "not a matrix (a 1-D parameter: attention sinks, scalars ...)",
    TensorClass.UNUSED: "not loaded by transformers (the model class ignores it)",
    TensorClass.UNCLASSIFIED: "unclassified matrix, kept because the recipe names it",
}


def kept_reason(info: TensorInfo) -> str:
    """Why a tensor stays as it is when the recipe does not quantize it."""
    if info.cls in LINEAR_CLASSES:
        return "bias of a linear layer" if info.kind == BIAS else KEPT_BY_RECIPE if info.kind == WEIGHT else _KEPT[
            TensorClass.OTHER]
    return _KEPT[info.cls]
