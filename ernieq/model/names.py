"""Checkpoint names → transformers names, through transformers' own conversion tables.

transformers 5 loads a checkpoint by renaming its keys (``WeightRenaming``: Mixtral's
``block_sparse_moe`` → ``mlp``, ERNIE's ``mlp.moe_statics`` → ``mlp.gate.moe_statics``)
and by converting groups of keys into one parameter (``WeightConverter``: every expert's
``experts.M.w1.weight`` / ``experts.M.w3.weight`` stacked and concatenated into the fused
``experts.gate_up_proj``). ``save_pretrained`` writes the original names back. ernieq reads
both: a key that is already the model's name maps to itself; a per-expert key maps to its
fused parameter, its expert and its part, and the converter's own operations fuse the
per-expert tensors of a layer into the parameter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Mapped:
    """Where one checkpoint tensor goes in the model.

    hf: the model's parameter or buffer name. For a per-expert tensor (``pattern`` set): the fused
    parameter it is stacked into, its ``expert`` index and its ``pattern``, the converter's source
    pattern it matched (one per concatenated part).
    """

    hf: str
    expert: int | None = None
    pattern: str | None = None


class NameMap:
    """The conversion tables of one transformers model (``get_model_conversion_mapping``)."""

    def __init__(self, model: torch.nn.Module):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming

        conversions = get_model_conversion_mapping(model)
        self.renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
        self.converters = [c for c in conversions if isinstance(c, WeightConverter)]
        self.prefix = model.base_model_prefix
        self.state = {k: None for k in model.state_dict()}  # rename_source_key only asks membership
        self.config = model.config
        self._reverted: dict[str, dict[str, tuple[int, ...]]] = {}

    def rename(self, name: str) -> str:
        """``name`` after every renaming (no converter): the model's name for a tensor that has one."""
        from transformers.core_model_loading import rename_source_key

        return rename_source_key(name, self.renamings, [], self.prefix, self.state)[0]

    def map(self, name: str) -> Mapped:
        """Where checkpoint tensor ``name`` goes (its ``hf`` may name nothing in the model: the caller checks)."""
        from transformers.core_model_loading import rename_source_key

        hf, pattern = rename_source_key(name, self.renamings, self.converters, self.prefix, self.state)
        if pattern is None:
            return Mapped(hf)
        renamed = self.rename(name)
        index = re.escape(pattern).replace(r"\*", r"(\d+)")
        m = re.search(index, renamed)
        expert = int(m.group(1)) if m and m.groups() else None
        return Mapped(hf, expert, pattern)

    def converter_of(self, pattern: str):
        return next(c for c in self.converters if pattern in c.source_patterns)

    def fuse(self, pattern_tensors: dict[str, list[torch.Tensor]]) -> torch.Tensor:
        """One fused parameter from its per-expert tensors ({source pattern: [tensor per expert]}),
        by the converter's own operations (stack the experts, concatenate the parts ...)."""
        converter = self.converter_of(next(iter(pattern_tensors)))
        collected = {p: list(pattern_tensors[p]) for p in converter.source_patterns if p in pattern_tensors}
        for op in converter.operations:
            collected = op.convert(collected, source_patterns=converter.source_patterns,
                                   target_patterns=converter.target_patterns, config=self.config)
        (fused,) = collected.values()
        return fused[0] if isinstance(fused, list) else fused

    def reverted(self, hf: str, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        """{checkpoint name: shape} that ``save_pretrained`` writes for parameter ``hf`` of ``shape``, by
        transformers' reverse conversion (meta device): the per-expert tensors of a fused parameter under
        the hub's names (Mixtral's ``block_sparse_moe.experts.M.w1.weight``), else ``hf`` itself."""
        from transformers.core_model_loading import revert_weight_conversion

        if hf not in self._reverted:
            holder = _Holder(self.config)
            holder._weight_conversions = [*self.renamings, *self.converters]
            out = revert_weight_conversion(holder, {hf: torch.empty(shape, device="meta")})
            self._reverted[hf] = {name: tuple(t.shape) for name, t in out.items()}
        return self._reverted[hf]

    def piece_shapes(self, hf: str, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        """{converter source pattern: the shape of each per-expert tensor} of fused parameter ``hf`` of ``shape``."""
        pieces = {}
        for name, piece in self.reverted(hf, shape).items():
            mapped = self.map(name)
            if mapped.pattern is not None:
                pieces.setdefault(mapped.pattern, piece)
        return pieces


class _Holder(torch.nn.Module):
    """What ``revert_weight_conversion`` reads of a model: its conversions and config."""

    def __init__(self, config):
        super().__init__()
        self.config = config
