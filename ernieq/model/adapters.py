"""Architecture adapters: what each tensor of a checkpoint is.

An adapter names, by regular expression over tensor names, which tensors are
attention, dense MLP, shared experts, routed experts, router, norms and
embeddings. Routed experts come in two layouts: per-expert 2-D tensors
(``...experts.M.gate_proj.weight``) and fused 3-D tensors
(``...experts.gate_up_proj [E, 2I, H]``, ``...experts.down_proj [E, H, I]``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum

from ernieq.model.checkpoint import CheckpointError, CheckpointReader


class TensorClass(str, Enum):
    ATTENTION = "attention"
    DENSE_MLP = "dense_mlp"
    SHARED_EXPERT = "shared_experts"
    ROUTED_EXPERT = "routed_experts"
    ROUTER = "router"
    NORM = "norm"
    EMBEDDING = "embedding"
    LM_HEAD = "lm_head"
    OTHER = "other"


LINEAR_CLASSES = (TensorClass.ATTENTION, TensorClass.DENSE_MLP, TensorClass.SHARED_EXPERT, TensorClass.ROUTED_EXPERT)


@dataclass(frozen=True)
class TensorInfo:
    """What one tensor is. ``proj`` is the projection's canonical name
    (``q_proj``, ``gate_proj``, ``up_proj``, ``down_proj``, ``gate_up_proj`` ...);
    ``expert`` is set for per-expert routed tensors; ``fused`` for [E, ...] ones."""

    name: str
    cls: TensorClass
    layer: int | None = None
    expert: int | None = None
    proj: str | None = None
    fused: bool = False

    @property
    def is_linear_weight(self) -> bool:
        return self.cls in LINEAR_CLASSES and not self.name.endswith("bias")


# Rules are tried in order; named groups: layer, expert, proj.
_L = r"^(?:model\.)?layers\.(?P<layer>\d+)\."
_COMMON = [
    (r"^(?:model\.)?embed_tokens\.weight$", TensorClass.EMBEDDING),
    (r"^lm_head\.weight$", TensorClass.LM_HEAD),
    (r"^(?:model\.)?norm\.weight$", TensorClass.NORM),
    (_L + r".*norm\.weight$", TensorClass.NORM),
    (_L + r"self_attn\.(?P<proj>[qkvo]_proj)\.(weight|bias)$", TensorClass.ATTENTION),
]
_FUSED_EXPERTS = (_L + r"mlp\.experts\.(?P<proj>gate_up_proj|down_proj)$", TensorClass.ROUTED_EXPERT)
_PER_EXPERT = (
    _L + r"mlp\.experts\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$",
    TensorClass.ROUTED_EXPERT,
)
_DENSE = (_L + r"mlp\.(?P<proj>gate_proj|up_proj|down_proj)\.(weight|bias)$", TensorClass.DENSE_MLP)


@dataclass(frozen=True)
class Adapter:
    """Tensor-name rules for one family of architectures."""

    name: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    rules: tuple[tuple[str, TensorClass], ...]
    # checkpoint name → transformers 5 module/parameter name (what its loader renames)
    hf_renames: tuple[tuple[str, str], ...] = ()

    def to_hf_name(self, name: str) -> str:
        for pattern, repl in self.hf_renames:
            name = re.sub(pattern, repl, name)
        return name

    def classify(self, name: str) -> TensorInfo:
        for pattern, cls in self.rules:
            m = re.search(pattern, name)
            if m:
                groups = m.groupdict()
                layer = groups.get("layer")
                expert = groups.get("expert")
                return TensorInfo(
                    name=name,
                    cls=cls,
                    layer=int(layer) if layer is not None else None,
                    expert=int(expert) if expert is not None else None,
                    proj=_canonical_proj(groups.get("proj")),
                    fused=cls is TensorClass.ROUTED_EXPERT and expert is None,
                )
        return TensorInfo(name=name, cls=TensorClass.OTHER, layer=_layer_of(name))


def _canonical_proj(proj: str | None) -> str | None:
    """Mixtral's w1/w3/w2 are gate/up/down."""
    return {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}.get(proj, proj) if proj else None


def _layer_of(name: str) -> int | None:
    m = re.search(r"layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


_ADAPTERS: list[Adapter] = []


def register_adapter(adapter: Adapter) -> Adapter:
    _ADAPTERS.append(adapter)
    return adapter


register_adapter(
    Adapter(
        name="ernie4_5_moe",
        architectures=("Ernie4_5_MoeForCausalLM",),
        model_types=("ernie4_5_moe",),
        rules=(
            *_COMMON,
            (_L + r"mlp\.gate\.weight$", TensorClass.ROUTER),
            (_L + r"mlp\.(?:gate\.)?moe_statics\.e_score_correction_bias$", TensorClass.ROUTER),
            (_L + r"mlp\.shared_experts\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$", TensorClass.SHARED_EXPERT),
            _FUSED_EXPERTS,
            _PER_EXPERT,
            _DENSE,
        ),
        hf_renames=((r"\.mlp\.moe_statics\.", ".mlp.gate.moe_statics."),),
    )
)
register_adapter(
    Adapter(
        name="dense",
        architectures=("Ernie4_5_ForCausalLM", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"),
        model_types=("ernie4_5", "llama", "mistral", "qwen2"),
        rules=(*_COMMON, _DENSE),
    )
)
register_adapter(
    Adapter(
        name="mixtral",
        architectures=("MixtralForCausalLM",),
        model_types=("mixtral",),
        rules=(
            *_COMMON,
            (_L + r"block_sparse_moe\.gate\.weight$", TensorClass.ROUTER),
            (_L + r"mlp\.gate\.weight$", TensorClass.ROUTER),
            (
                _L + r"block_sparse_moe\.experts\.(?P<expert>\d+)\.(?P<proj>w1|w2|w3)\.weight$",
                TensorClass.ROUTED_EXPERT,
            ),
            _FUSED_EXPERTS,
            _PER_EXPERT,
        ),
        hf_renames=((r"\.block_sparse_moe\.", ".mlp."), (r"\.w1\.", ".gate_proj."), (r"\.w3\.", ".up_proj."),
                    (r"\.w2\.", ".down_proj.")),
    )
)
register_adapter(
    Adapter(
        name="qwen_moe",
        architectures=("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"),
        model_types=("qwen2_moe", "qwen3_moe"),
        rules=(
            *_COMMON,
            (_L + r"self_attn\.[qk]_norm\.weight$", TensorClass.NORM),
            (_L + r"mlp\.gate\.weight$", TensorClass.ROUTER),
            (_L + r"mlp\.shared_expert_gate\.weight$", TensorClass.ROUTER),
            (_L + r"mlp\.shared_experts?\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$", TensorClass.SHARED_EXPERT),
            _FUSED_EXPERTS,
            _PER_EXPERT,
            _DENSE,
        ),
    )
)


def hf_config(config: dict, source: str = "config.json"):
    """The transformers config object of a checkpoint's ``config.json`` (its quantization_config left out)."""
    from transformers import AutoConfig

    if not isinstance(config.get("model_type"), str):
        raise CheckpointError(f"{source}: no model_type string")
    cfg = {k: v for k, v in config.items() if k not in ("quantization_config", "model_type")}
    try:
        return AutoConfig.for_model(config["model_type"], **cfg)
    except (ValueError, TypeError) as err:  # an unknown model_type, or a field transformers refuses
        raise CheckpointError(f"{source}: transformers cannot build its config ({err})") from None


def adapter_for(config: dict, source: str = "config.json") -> Adapter:
    """The adapter for a checkpoint's ``config.json`` (by architecture, then model_type)."""
    archs = config.get("architectures") or []
    model_type = config.get("model_type")
    if not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise CheckpointError(f"{source}: 'architectures' must be a list of strings, got {archs!r}")
    if model_type is not None and not isinstance(model_type, str):
        raise CheckpointError(f"{source}: 'model_type' must be a string, got {model_type!r}")
    for adapter in _ADAPTERS:
        if any(a in adapter.architectures for a in archs) or model_type in adapter.model_types:
            return adapter
    known = sorted(a for ad in _ADAPTERS for a in ad.architectures)
    raise CheckpointError(
        f"{source}: unknown architecture {archs or model_type!r}; ernieq knows {', '.join(known)}"
    )


@dataclass(frozen=True)
class TensorGroup:
    """The tensors that are processed together: one layer's attention, one layer's
    MLP or MoE block (router, shared and all routed experts), or the rest."""

    key: str
    layer: int | None
    tensors: tuple[TensorInfo, ...]

    def load(self, reader: CheckpointReader) -> dict[str, "torch.Tensor"]:  # noqa: F821
        """The group's tensors; a NaN or Inf in any of them fails here, naming file and tensor."""
        tensors = {t.name: reader.get(t.name) for t in self.tensors}
        for name, t in tensors.items():
            bad = non_finite_count(t)
            if bad:
                raise CheckpointError(f"{reader.file_of(name)}: tensor {name!r} has {bad} non-finite "
                                      f"value(s) (NaN or Inf)")
        return tensors


def non_finite_count(t: "torch.Tensor") -> int:  # noqa: F821
    """NaN and Inf values in ``t`` (0 for integer tensors); float8, which torch cannot test, is widened first."""
    if not t.is_floating_point():
        return 0
    wide = t.float() if t.element_size() == 1 else t  # float8: isfinite is not implemented for every kind
    finite = wide.isfinite()
    return 0 if bool(finite.all()) else int((~finite).sum())


def _group_key(info: TensorInfo) -> tuple[int, int, str]:
    """(layer, order, part): a layer's attention (with its input norm), then its MLP or MoE block
    (with the post-attention norm that feeds it, so a scale folded into that norm stays in the group)."""
    if info.layer is None:
        return (-1 if info.cls is TensorClass.EMBEDDING else 1 << 30, 0, "other")
    part = "attention" if info.cls in (TensorClass.ATTENTION, TensorClass.NORM) else "mlp"
    if info.cls is TensorClass.NORM and "post_attention" in info.name:
        part = "mlp"
    return (info.layer, 0 if part == "attention" else 1, part)


def iter_groups(reader: CheckpointReader, adapter: Adapter | None = None) -> Iterator[TensorGroup]:
    """The checkpoint's tensors in groups, in layer order; nothing is loaded yet.

    Every tensor's shape is checked against config.json first (``shapes.py``).
    """
    from ernieq.model.shapes import check_shapes  # shapes.py reads TensorInfo from here

    source = str(reader.path / "config.json")
    adapter = adapter or adapter_for(reader.config, source)
    groups: dict[tuple[int, int, str], list[TensorInfo]] = {}
    for name in reader.keys():
        info = adapter.classify(name)
        groups.setdefault(_group_key(info), []).append(info)
    check_shapes(reader, (i for g in groups.values() for i in g), reader.config, source)
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
