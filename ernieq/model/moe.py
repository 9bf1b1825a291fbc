"""One view of a layer's routed experts, whichever layout the checkpoint and the class use.

A checkpoint holds a layer's experts either as the model's own fused parameters
(``...experts.gate_up_proj`` ...) or per expert (``...experts.M.w1.weight`` ...), which
transformers' converter stacks into them (``names.py``). The view hands out the model's
parameters, and per-expert weights in torch ``nn.Linear`` order [N, K] (gate and up [I, H],
down [H, I]) under canonical names (``Adapter.canonical_name``), by the experts module's
layout (``expert_layout.py``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch

from ernieq.model.adapters import BIAS, WEIGHT, Adapter, TensorClass, TensorInfo
from ernieq.model.checkpoint import CheckpointError, CheckpointReader
from ernieq.model.expert_layout import PROJECTIONS, ExpertLayout


@dataclass(frozen=True, eq=False)
class ExpertGroup:
    """The routed experts of one layer: ``container`` is the experts module (``model.layers.3.mlp.experts``)."""

    layer: int
    container: str
    infos: tuple[TensorInfo, ...]
    adapter: Adapter

    @classmethod
    def from_infos(cls, infos, adapter: Adapter) -> ExpertGroup | None:
        """The fused experts among ``infos`` (per-expert lists' linear layers are no group: see linear_weights)."""
        routed = [t for t in infos if t.cls is TensorClass.ROUTED_EXPERT and adapter.fused_expert(t.name)]
        if not routed:
            return None
        containers = {adapter.container_of(t.name) for t in routed}
        if len(containers) != 1:
            raise CheckpointError(f"layer {routed[0].layer}: routed experts of {len(containers)} experts modules "
                                  f"in one group ({sorted(map(str, containers))})")
        return cls(routed[0].layer, containers.pop(), tuple(routed), adapter)

    @property
    def layout(self) -> ExpertLayout:
        return self.adapter.layouts[self.container]

    @property
    def num_experts(self) -> int:
        return self.layout.num_experts

    @property
    def prefix(self) -> str:
        return self.container

    def canonical_name(self, expert: int, proj: str) -> str:
        return self.adapter.canonical_name(self.container, expert, proj)

    def params(self, tensors: dict[str, torch.Tensor], kinds: tuple[str, ...] = (WEIGHT, BIAS)) -> dict[str, torch.Tensor]:
        """The experts module's parameters (by their own names) of ``kinds`` from the group's loaded tensors
        (the weights alone need no biases: a caller quantizing weights loads only those)."""
        out: dict[str, torch.Tensor] = {}
        stacked: dict[str, dict[str, dict[int, str]]] = defaultdict(lambda: defaultdict(dict))
        canonical: dict[tuple[int, str], torch.Tensor] = {}
        for info in (t for t in self.infos if t.kind in kinds):
            mapped = self.adapter.names.map(info.name)
            if info.fused:
                out[mapped.hf.rpartition(".")[2]] = tensors[info.name]
            elif mapped.pattern is not None:
                stacked[mapped.hf.rpartition(".")[2]][mapped.pattern][mapped.expert] = info.name
            else:
                canonical[(info.expert, info.proj)] = tensors[info.name]
        for param, patterns in stacked.items():
            lists = {}
            for pattern, by_expert in patterns.items():
                missing = [e for e in range(self.num_experts) if e not in by_expert]
                if missing:
                    raise CheckpointError(f"layer {self.layer}: expert {missing[0]} has no {pattern.strip('.')} "
                                          f"({len(missing)} missing tensor(s))")
                lists[pattern] = [tensors[by_expert[e]] for e in range(self.num_experts)]
            out[param] = self.adapter.names.fuse(lists)
        if canonical:
            missing = [(e, p) for e in range(self.num_experts) for p in PROJECTIONS if (e, p) not in canonical]
            if missing:
                e, p = missing[0]
                raise CheckpointError(f"layer {self.layer}: expert {e} has no {p} ({len(missing)} missing tensor(s))")
            out.update(self.layout.fuse(canonical, self.num_experts))
        return out

    @property
    def stored_fused(self) -> bool:
        """Whether the checkpoint holds every weight of the group as the module's own fused parameters."""
        return all(t.fused for t in self.infos if t.kind == WEIGHT)

    def expert_weights(self, get: Callable[[str], torch.Tensor]) -> Callable[[int, str], torch.Tensor]:
        """(expert, projection) -> W [N, K] from the checkpoint through ``get(name)``, reading only that expert's
        tensor where the checkpoint stores experts apart (a fused parameter is read once and sliced):
        what :meth:`ExpertLayout.fill` copies into place."""
        layout = self.layout
        apart: dict[tuple[int, str], tuple[str, bool]] = {}  # (e, proj) -> (stored name, stored [K, N])
        fused: dict[str, str] = {}  # the module's parameter -> stored name
        for info in (t for t in self.infos if t.kind == WEIGHT):
            if info.fused:
                fused[self.adapter.names.map(info.name).hf.rpartition(".")[2]] = info.name
                continue
            # a converter's per-expert piece lies as the parameter does (k-major parameters stack [K, N] pieces);
            # a canonical per-expert name is always [N, K]
            piece = self.adapter.names.map(info.name).pattern is not None
            k_major = layout.down_k_major if info.proj == "down_proj" else layout.gate_up_k_major
            apart[(info.expert, info.proj)] = (info.name, piece and k_major)
        views: dict[str, torch.Tensor] = {}  # the module's parameter -> the stored tensor as [E, N, K]
        g_idx, u_idx = layout.split()

        def weight(e: int, proj: str) -> torch.Tensor:
            if (e, proj) in apart:
                name, k_n = apart[(e, proj)]
                w = get(name)
                return w.T if k_n else w
            down = proj == "down_proj"
            param = layout.down if down else layout.gate_up
            if param not in fused:
                raise CheckpointError(f"layer {self.layer}: expert {e} has no {proj}")
            if param not in views:  # read once, sliced per expert
                stored = get(fused[param])
                views[param] = layout.down_nk(stored) if down else layout.gate_up_nk(stored)
            nk = views[param]
            return nk[e] if down else nk[e, g_idx if proj == "gate_proj" else u_idx]

        return weight

    def weights(self, tensors: Mapping[str, torch.Tensor], experts: Iterable[int] | None = None
                ) -> Iterator[tuple[int, str, torch.Tensor]]:
        """(expert, projection, weight [N, K]) for every expert (or those of ``experts``), from the group's
        tensors: views of the stored tensors (per-expert pieces are not stacked into the module's parameters
        first, which would hold a second copy of the layer's experts); only those experts' tensors are read."""
        weight = self.expert_weights(tensors.__getitem__)
        for e in range(self.num_experts) if experts is None else experts:
            for proj in PROJECTIONS:
                yield e, proj, weight(e, proj)

    def shapes(self) -> Iterator[tuple[int, str, tuple[int, int]]]:
        """(expert, projection, shape (N, K)) for every expert, as :meth:`weights` hands them out (the layout
        knows them: nothing is read)."""
        lay = self.layout
        for e in range(lay.num_experts):
            yield e, "gate_proj", (lay.inter, lay.hidden)
            yield e, "up_proj", (lay.inter, lay.hidden)
            yield e, "down_proj", (lay.hidden, lay.inter)


def linear_weights(infos: tuple[TensorInfo, ...], tensors: Mapping[str, torch.Tensor], adapter: Adapter,
                   keep: Callable[[TensorInfo], bool] | None = None) -> Iterator[tuple[str, TensorInfo, torch.Tensor]]:
    """(name, info, weight [N, K]) of the linear weights among ``infos`` (those ``keep(info)`` takes, and only
    theirs are read from ``tensors``); routed experts under their canonical per-expert names (whichever layout
    the checkpoint uses), after the other weights."""
    keep = keep or (lambda info: True)
    experts = ExpertGroup.from_infos(infos, adapter)
    for info in infos:
        if (info.is_linear_weight and keep(info)
                and not (info.cls is TensorClass.ROUTED_EXPERT and adapter.fused_expert(info.name))):
            yield info.name, info, tensors[info.name]
    if experts is not None:
        mine = [e for e in range(experts.num_experts)
                if keep(adapter.classify(experts.canonical_name(e, PROJECTIONS[0])))]
        for e, proj, weight in experts.weights(tensors, mine):
            name = experts.canonical_name(e, proj)
            yield name, adapter.classify(name), weight


def linear_weight_shapes(reader: CheckpointReader, infos: tuple[TensorInfo, ...],
                         adapter: Adapter) -> Iterator[tuple[str, TensorInfo, tuple[int, ...]]]:
    """(name, info, shape) of what :func:`linear_weights` hands out, from the headers only."""
    experts = ExpertGroup.from_infos(infos, adapter)
    for info in infos:
        if info.is_linear_weight and not (info.cls is TensorClass.ROUTED_EXPERT and adapter.fused_expert(info.name)):
            yield info.name, info, tuple(reader.shape(info.name))
    if experts is not None:
        for e, proj, shape in experts.shapes():
            name = experts.canonical_name(e, proj)
            yield name, adapter.classify(name), shape
