"""One view of a layer's routed experts, whichever layout the checkpoint uses.

Per-expert layout: ``...experts.M.{gate,up,down}_proj.weight``, 2-D each.
Fused layout (transformers 5): ``...experts.gate_up_proj [E, 2I, H]`` holding
``[gate | up]`` along its second dimension, and ``...experts.down_proj [E, H, I]``.
The view hands out per-expert weights in torch ``nn.Linear`` order ``[N, K]``:
gate and up ``[I, H]``, down ``[H, I]``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ernieq.model.adapters import TensorClass, TensorInfo
from ernieq.model.checkpoint import CheckpointError, CheckpointReader

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ExpertGroup:
    """The routed experts of one layer. ``prefix`` is e.g. ``model.layers.3.mlp.experts``."""

    layer: int
    prefix: str
    num_experts: int
    fused: bool
    infos: tuple[TensorInfo, ...]

    @classmethod
    def from_infos(cls, infos: list[TensorInfo] | tuple[TensorInfo, ...]) -> ExpertGroup | None:
        routed = [t for t in infos if t.cls is TensorClass.ROUTED_EXPERT]
        if not routed:
            return None
        layer = routed[0].layer
        fused = routed[0].fused
        if any(t.fused != fused for t in routed):
            raise CheckpointError(f"layer {layer}: routed experts mix the fused and per-expert layouts")
        first = routed[0].name
        prefix = first[: first.index(".experts.") + len(".experts")]
        if fused:
            num = -1  # read from the tensor shape by `with_reader`
        else:
            num = 1 + max(t.expert for t in routed)
            have = {(t.expert, t.proj) for t in routed}
            missing = [(e, p) for e in range(num) for p in PROJECTIONS if (e, p) not in have]
            if missing:
                e, p = missing[0]
                raise CheckpointError(f"layer {layer}: expert {e} has no {p} ({len(missing)} missing tensor(s))")
        return cls(layer, prefix, num, fused, tuple(routed))

    def with_reader(self, reader: CheckpointReader) -> ExpertGroup:
        """Fill in the expert count of a fused group from the tensor's shape."""
        if not self.fused:
            return self
        shape = reader.shape(f"{self.prefix}.gate_up_proj")
        return ExpertGroup(self.layer, self.prefix, shape[0], True, self.infos)

    def canonical_name(self, expert: int, proj: str) -> str:
        """The per-expert name, as published ERNIE checkpoints spell it."""
        return f"{self.prefix}.{expert}.{proj}.weight"

    def shapes(self, reader: CheckpointReader) -> Iterator[tuple[int, str, tuple[int, ...]]]:
        """(expert, projection, shape (N, K)) for every expert, as :meth:`weights` hands them out, from the
        headers only."""
        if not self.fused:
            for t in sorted(self.infos, key=lambda t: (t.expert, PROJECTIONS.index(t.proj))):
                yield t.expert, t.proj, tuple(reader.shape(t.name))
            return
        num, two_inter, hidden = reader.shape(f"{self.prefix}.gate_up_proj")  # [E, 2I, H]
        down = tuple(reader.shape(f"{self.prefix}.down_proj")[1:])  # [H, I]
        for e in range(num):
            yield e, "gate_proj", (two_inter // 2, hidden)
            yield e, "up_proj", (two_inter // 2, hidden)
            yield e, "down_proj", down

    def weights(self, tensors: dict[str, torch.Tensor]) -> Iterator[tuple[int, str, torch.Tensor]]:
        """(expert, projection, weight [N, K]) for every expert, from the loaded group tensors."""
        if not self.fused:
            for t in sorted(self.infos, key=lambda t: (t.expert, PROJECTIONS.index(t.proj))):
                yield t.expert, t.proj, tensors[t.name]
            return
        gate_up = tensors[f"{self.prefix}.gate_up_proj"]  # [E, 2I, H]
        down = tensors[f"{self.prefix}.down_proj"]  # [E, H, I]
        inter = gate_up.shape[1] // 2
        for e in range(gate_up.shape[0]):
            yield e, "gate_proj", gate_up[e, :inter]  # [I, H]
            yield e, "up_proj", gate_up[e, inter:]  # [I, H]
            yield e, "down_proj", down[e]  # [H, I]


def linear_weights(infos: tuple[TensorInfo, ...], tensors: dict[str, torch.Tensor]) -> Iterator[tuple[str, TensorInfo, torch.Tensor]]:
    """(name, info, weight [N, K]) of the linear weights among ``infos``; routed experts under
    their per-expert names (whichever layout the checkpoint uses), after the other weights."""
    experts = ExpertGroup.from_infos(infos)
    for info in infos:
        if info.is_linear_weight and info.cls is not TensorClass.ROUTED_EXPERT:
            yield info.name, info, tensors[info.name]
    if experts is not None:
        proto = next(t for t in infos if t.cls is TensorClass.ROUTED_EXPERT)
        for e, proj, weight in experts.weights(tensors):
            name = experts.canonical_name(e, proj)
            yield name, type(proto)(name, TensorClass.ROUTED_EXPERT, proto.layer, e, proj, False), weight


def linear_weight_shapes(reader: CheckpointReader, infos: tuple[TensorInfo, ...]
                         ) -> Iterator[tuple[str, TensorInfo, tuple[int, ...]]]:
    """(name, info, shape) of what :func:`linear_weights` hands out, from the headers only."""
    experts = ExpertGroup.from_infos(infos)
    for info in infos:
        if info.is_linear_weight and info.cls is not TensorClass.ROUTED_EXPERT:
            yield info.name, info, tuple(reader.shape(info.name))
    if experts is not None:
        proto = next(t for t in infos if t.cls is TensorClass.ROUTED_EXPERT)
        for e, proj, shape in experts.shapes(reader):
            name = experts.canonical_name(e, proj)
            yield name, type(proto)(name, TensorClass.ROUTED_EXPERT, proto.layer, e, proj, False), shape
