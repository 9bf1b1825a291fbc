"""Where each tensor of an ERNIE 4.5 MoE checkpoint sits in FastDeploy's checkpoint, both ways.

Shape legend: H hidden size, V vocabulary, N output features, K input features;
the dimension names of ``Slot.shape`` are ``ernieq.model.shapes``' (``Q*D``
attention width, ``KV*D`` key/value width, ``I`` dense intermediate size, ``M``
routed-expert intermediate size) plus ``S*M``, the shared experts' width.

FastDeploy reads a Paddle checkpoint (``fastdeploy/model_executor/models/ernie4_5_moe.py``):
names under ``ernie.``, q | k | v fused along N into ``self_attn.qkv_proj``, gate | up
fused into ``up_gate_proj`` (dense MLPs, shared and routed experts), the router
``mlp.gate.weight`` as ``[H, E]`` float32, ``lm_head.weight`` as ``[H, V]``. One
table serves the writer (native name → FastDeploy name) and the reader (back).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ernieq.model.shapes import expected_dims

PREFIX = "ernie"
MODEL_TYPE = "ernie4_5_moe"
ARCHITECTURE = "Ernie4_5_MoeForCausalLM"
DENSE, ROUTED = "dense", "routed"  # FastDeploy's WINT2Config: dense_quant_type vs the MoE plan


def template_pattern(template: str) -> re.Pattern:
    """``model.layers.{layer}.mlp.experts.{expert}.up_proj`` → a full-match regex with groups layer, expert."""
    parts = re.split(r"\{(\w+)\}", template)
    body = "".join(re.escape(p) if i % 2 == 0 else rf"(?P<{p}>\d+)" for i, p in enumerate(parts))
    return re.compile(f"^{body}$")


@dataclass(frozen=True)
class Slot:
    """One native linear module's place in FastDeploy's checkpoint.

    module: the native module name template (fields ``layer``, ``expert``).
    target: the FastDeploy module it goes into, a template over the same fields.
    part, parts: the module is part ``part`` of ``parts`` concatenated along N into ``target``.
    role: DENSE or ROUTED, which decides the codecs FastDeploy runs there.
    shape: the module's logical (N, K) in dimension names.
    """

    module: str
    target: str
    part: int
    parts: int
    role: str
    shape: tuple[str, str]
    pattern: re.Pattern = field(init=False, repr=False, compare=False)
    target_pattern: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "pattern", template_pattern(self.module))
        object.__setattr__(self, "target_pattern", template_pattern(self.target))


_N = "model.layers.{layer}."
_T = PREFIX + ".layers.{layer}."
_NE = _N + "mlp.experts.{expert}."
_TE = _T + "mlp.experts.{expert}."
SLOTS = (
    Slot(_N + "self_attn.q_proj", _T + "self_attn.qkv_proj", 0, 3, DENSE, ("Q*D", "H")),
    Slot(_N + "self_attn.k_proj", _T + "self_attn.qkv_proj", 1, 3, DENSE, ("KV*D", "H")),
    Slot(_N + "self_attn.v_proj", _T + "self_attn.qkv_proj", 2, 3, DENSE, ("KV*D", "H")),
    Slot(_N + "self_attn.o_proj", _T + "self_attn.o_proj", 0, 1, DENSE, ("H", "Q*D")),
    Slot(_N + "mlp.gate_proj", _T + "mlp.up_gate_proj", 0, 2, DENSE, ("I", "H")),
    Slot(_N + "mlp.up_proj", _T + "mlp.up_gate_proj", 1, 2, DENSE, ("I", "H")),
    Slot(_N + "mlp.down_proj", _T + "mlp.down_proj", 0, 1, DENSE, ("H", "I")),
    Slot(_N + "mlp.shared_experts.gate_proj", _T + "mlp.shared_experts.up_gate_proj", 0, 2, DENSE, ("S*M", "H")),
    Slot(_N + "mlp.shared_experts.up_proj", _T + "mlp.shared_experts.up_gate_proj", 1, 2, DENSE, ("S*M", "H")),
    Slot(_N + "mlp.shared_experts.down_proj", _T + "mlp.shared_experts.down_proj", 0, 1, DENSE, ("H", "S*M")),
    Slot(_NE + "gate_proj", _TE + "up_gate_proj", 0, 2, ROUTED, ("M", "H")),
    Slot(_NE + "up_proj", _TE + "up_gate_proj", 1, 2, ROUTED, ("M", "H")),
    Slot(_NE + "down_proj", _TE + "down_proj", 0, 1, ROUTED, ("H", "M")),
)


def slot_of(module: str) -> tuple[Slot, dict] | None:
    """The slot of a native module name and its fields, None when it has none."""
    for slot in SLOTS:
        m = slot.pattern.match(module)
        if m:
            return slot, m.groupdict()
    return None


def target_slots(target: str) -> tuple[list[Slot], dict] | None:
    """The slots fused into the FastDeploy module ``target`` (by part) and its fields; None when it is none."""
    for slot in SLOTS:
        m = slot.target_pattern.match(target)
        if m:
            slots = sorted((s for s in SLOTS if s.target == slot.target), key=lambda s: s.part)
            return slots, m.groupdict()
    return None


def model_dims(config: dict) -> dict[str, int | None]:
    """The dimensions ``Slot.shape`` names, from an ERNIE 4.5 MoE ``config.json``."""
    dims = expected_dims(config)
    shared = config.get("moe_num_shared_experts") or 0
    dims["S*M"] = shared * dims["M"] if dims["M"] else None
    return dims


# ---------------------------------------------------------------- unquantized tensors


def _as_stored(t: torch.Tensor) -> torch.Tensor:
    return t


def _transposed(t: torch.Tensor) -> torch.Tensor:
    return t.t().contiguous()  # torch [N, K] ↔ Paddle [K, N]


def _router_to_paddle(t: torch.Tensor) -> torch.Tensor:
    return t.float().t().contiguous()  # [E, H] → [H, E] float32: FastDeploy computes x @ gate_weight


def _float32(t: torch.Tensor) -> torch.Tensor:
    return t.float()


@dataclass(frozen=True)
class Plain:
    """An unquantized tensor: its native and FastDeploy name templates and the conversions between them."""

    native: str
    target: str
    to_target: Callable[[torch.Tensor], torch.Tensor] = _as_stored
    to_native: Callable[[torch.Tensor], torch.Tensor] = _as_stored
    pattern: re.Pattern = field(init=False, repr=False, compare=False)
    target_pattern: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "pattern", template_pattern(self.native))
        object.__setattr__(self, "target_pattern", template_pattern(self.target))


# Read back, a FastDeploy name takes the first rule whose target matches (the published native name).
PLAINS = (
    Plain("model.embed_tokens.weight", PREFIX + ".embed_tokens.weight"),
    Plain("model.norm.weight", PREFIX + ".norm.weight"),
    Plain(_N + "input_layernorm.weight", _T + "input_layernorm.weight"),
    Plain(_N + "post_attention_layernorm.weight", _T + "post_attention_layernorm.weight"),
    Plain(_N + "mlp.gate.weight", _T + "mlp.gate.weight", _router_to_paddle, _transposed),
    Plain(_N + "mlp.moe_statics.e_score_correction_bias", _T + "mlp.moe_statics.e_score_correction_bias", _float32),
    Plain(_N + "mlp.gate.moe_statics.e_score_correction_bias", _T + "mlp.moe_statics.e_score_correction_bias",
          _float32),  # transformers 5 keeps the statistics inside the gate
    Plain("lm_head.weight", "lm_head.weight", _transposed, _transposed),
)

# Unquantized tensors FastDeploy's ERNIE 4.5 model does not read and the writer leaves out: the
# multi-token-prediction head (FastDeploy loads it as a separate speculative-decoding model).
DROPPED = re.compile(r"^model\.mtp[._]")


def plain_rule(name: str) -> tuple[Plain, dict] | None:
    """The rule of a native unquantized tensor name and its fields, None when there is none."""
    for rule in PLAINS:
        m = rule.pattern.match(name)
        if m:
            return rule, m.groupdict()
    return None


def plain_rule_of_target(name: str) -> tuple[Plain, dict] | None:
    """The rule of a FastDeploy unquantized tensor name and its fields, None when there is none."""
    for rule in PLAINS:
        m = rule.target_pattern.match(name)
        if m:
            return rule, m.groupdict()
    return None


def moe_layers(config: dict) -> list[int]:
    """The decoder layers FastDeploy builds as MoE: ``layer_id >= moe_layer_start_index`` when the
    config has routed experts (``Ernie4_5_DecoderLayer``)."""
    if not config.get("moe_num_experts"):
        return []
    start = int(config.get("moe_layer_start_index", 1))  # absent: transformers' default, as the runtime builds it
    return list(range(start, int(config["num_hidden_layers"])))


def expected_targets(config: dict) -> list[str]:
    """Every FastDeploy linear module an ERNIE 4.5 MoE of ``config`` has, in layer order."""
    moe = set(moe_layers(config))
    shared = bool(config.get("moe_num_shared_experts"))
    experts = int(config.get("moe_num_experts") or 0)
    names = []
    for layer in range(int(config["num_hidden_layers"])):
        for target in dict.fromkeys(s.target for s in SLOTS):  # unique, in SLOTS order
            if ".experts.{expert}." in target:
                names += [target.format(layer=layer, expert=e) for e in range(experts)] if layer in moe else []
            elif ".shared_experts." in target:
                names += [target.format(layer=layer)] if layer in moe and shared else []
            elif ".mlp." in target:
                names += [target.format(layer=layer)] if layer not in moe else []
            else:
                names.append(target.format(layer=layer))
    return names


def required_plains(config: dict) -> list[str]:
    """The unquantized FastDeploy tensors an ERNIE 4.5 MoE of ``config`` cannot run without."""
    names = [PREFIX + ".embed_tokens.weight", PREFIX + ".norm.weight"]
    if not config.get("tie_word_embeddings"):
        names.append("lm_head.weight")
    for layer in range(int(config["num_hidden_layers"])):
        names += [_T.format(layer=layer) + n for n in ("input_layernorm.weight", "post_attention_layernorm.weight")]
    names += [_T.format(layer=layer) + "mlp.gate.weight" for layer in moe_layers(config)]
    return names
