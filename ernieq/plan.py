"""A quantize run's plan checked from the checkpoint's headers, before any work.

Every linear weight of the model (routed experts under their per-expert names, whichever layout
the checkpoint uses) is put through the recipe: a rule that decides no weight is an error unless
it is marked optional (a pattern that names modules the model does not have, a layer range past
its depth, a rule that earlier rules shadow), and every (weight, codec) pair the recipe makes must
be one the codec can take (``ernieq.codecs.base.check_shape``: every codec pads K and N as it needs).
Nothing is loaded; the message is one line.
"""

from __future__ import annotations

import re
from pathlib import Path

from ernieq.codecs import CodecError
from ernieq.codecs.base import check_shape
from ernieq.config import QuantConfig
from ernieq.encode import codec_of
from ernieq.errors import ErnieqError
from ernieq.model.adapters import TensorClass, adapter_for, iter_groups
from ernieq.model.checkpoint import CheckpointReader
from ernieq.model.moe import linear_weight_shapes
from ernieq.quantize import moe_ordinals


class PlanError(ErnieqError, ValueError):
    """A recipe that does not fit the model it is given."""


def check_plan(source: Path, config: QuantConfig) -> None:
    """Fail before any work when ``config`` does not fit the checkpoint at ``source`` (see the module)."""
    reader = CheckpointReader(Path(source))
    adapter = adapter_for(reader.config, str(Path(source) / "config.json"))
    groups = list(iter_groups(reader, adapter))
    ordinals = moe_ordinals(reader, adapter, groups)
    decided = [0] * len(config.rules)
    matched = [0] * len(config.rules)
    for group in groups:
        for info in group.tensors:  # a rule keeping a tensor ernieq cannot classify decides it
            if info.cls is TensorClass.UNCLASSIFIED:
                for i, r in enumerate(config.rules):
                    if r.choice is None and r.pattern is not None and re.search(r.pattern, info.name):
                        decided[i] += 1
                        matched[i] += 1
        for name, info, shape in linear_weight_shapes(reader, group.tensors, adapter):
            ordinal = ordinals.get(info.layer)
            rule = config.rule_for(name, info, ordinal)
            for i, r in enumerate(config.rules):
                matched[i] += r.matches(name, info, ordinal)
            if rule is None:
                continue
            decided[config.rules.index(rule)] += 1
            if rule.choice is None:
                continue
            try:
                codec_of(rule.choice)  # a rule read from a file or an override was built once already
                check_shape(shape, name)
            except CodecError as err:
                raise PlanError(f"{_file_of(reader, group, info)}: {err} ({rule.choice.describe()}, "
                                f"{rule.origin or 'the recipe'})") from None
    for i, rule in enumerate(config.rules):
        if decided[i] or rule.optional:
            continue
        where = rule.origin or f"recipe {config.name} rule {i}"
        why = (f"every weight it matches ({matched[i]}) is taken by an earlier rule" if matched[i] else
               "it matches no linear weight of the model")
        raise PlanError(f"{where}: the rule decides no weight of {source}: {why} (mark it optional: true "
                        f"if that is meant)")


def _file_of(reader: CheckpointReader, group, info) -> str:
    """The shard a weight comes from (a fused expert tensor for a per-expert name)."""
    source = info.name if info.name in reader else next(t.name for t in group.tensors if t.cls is info.cls)
    return str(reader.file_of(source))
