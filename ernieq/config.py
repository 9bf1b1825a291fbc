"""Recipes in memory: which codec, with which parameters, for which linear weight.

A :class:`QuantConfig` is an ordered list of rules; the first rule that matches
a tensor decides. Rules match by tensor class (attention, dense MLP, shared or
routed experts), by decoder layer index, by the ordinal of the MoE layer, and by
a regular expression over the canonical tensor name. ``--override`` rules come
first. Router gates, norms, embeddings and ``lm_head`` are never quantized: only
linear weights of decoder layers reach the rules. Recipe files, the ``--bits``
presets among them, are read into a QuantConfig by ``ernieq.recipes``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

from ernieq.codecs import CodecError, get_codec
from ernieq.codecs.fp8 import DYNAMIC as FP8_DYNAMIC
from ernieq.errors import ErnieqError
from ernieq.model.adapters import LINEAR_CLASSES, TensorClass, TensorInfo

# --bits 4's wint4 groups: 64 weights share a float16 scale, 4.25 bits per weight
W4_GROUP_SIZE = 64
NATIVE_FORMAT = "native"
KEEP = "none"  # an override's codec name that leaves the weight as it is
# --rotate turns the inputs of the low-bit codecs' weights; a sorted tuple, not a set, so that
# the recipe's repr (part of the resume fingerprint) is the same in every process
ROTATED_CODECS = ("ccq2", "wint4")


TUNE_TARGETS = ("local", "model")  # --method tune: what each layer is tuned against (ernieq.calibration.tune)


@dataclass(frozen=True)
class CodecChoice:
    """A codec name and its parameters (a tuple of items, so that it is hashable)."""

    codec: str
    params: tuple[tuple[str, object], ...] = ()

    @property
    def kwargs(self) -> dict:
        return dict(self.params)

    def describe(self) -> str:
        args = ",".join(f"{k}={v}" for k, v in self.params)
        return f"{self.codec}:{args}" if args else self.codec


Span = tuple[int, "int | None"]  # first and last index, both included; last None: to the end


def in_spans(index: int | None, spans: tuple[Span, ...]) -> bool:
    """Whether ``index`` lies in one of ``spans`` (None lies in none)."""
    return index is not None and any(first <= index and (last is None or index <= last) for first, last in spans)


@dataclass(frozen=True)
class Rule:
    """Matches when every given condition holds. ``choice`` None keeps the weight.

    layers: decoder layer indices; moe_layers: ordinals among the layers with routed experts (both
    as spans). optional: the rule may decide no weight of a model (else that is an error before any
    work). origin: where the rule was written, for messages (not part of the rule's identity).
    """

    choice: CodecChoice | None
    classes: tuple[TensorClass, ...] = LINEAR_CLASSES
    pattern: str | None = None
    layers: tuple[Span, ...] | None = None
    moe_layers: tuple[Span, ...] | None = None
    optional: bool = False
    origin: str = field(default="", compare=False, repr=False)

    def matches(self, name: str, info: TensorInfo, moe_ordinal: int | None) -> bool:
        if info.cls not in self.classes:
            return False
        if self.pattern is not None and not re.search(self.pattern, name):
            return False
        if self.layers is not None and not in_spans(info.layer, self.layers):
            return False
        if self.moe_layers is not None and not in_spans(moe_ordinal, self.moe_layers):
            return False
        return True


@dataclass(frozen=True)
class QuantConfig:
    """An ordered list of rules and the recipe's name; the first rule that matches a weight decides.

    rotate: the codecs whose weights are stored turned by an input rotation
    (``ernieq.transforms``; the runtime turns their inputs online). ``recipe``, the name a
    checkpoint records, says so with ``-rot``. description: the recipe file's, for people.
    """

    name: str
    rules: tuple[Rule, ...] = field(default_factory=tuple)
    rotate: tuple[str, ...] = ()
    description: str = field(default="", compare=False, repr=False)

    @property
    def recipe(self) -> str:
        return f"{self.name}-rot" if self.rotate else self.name

    def names_kept(self, name: str) -> bool:
        """Whether a rule that keeps weights (``--override 'REGEX=none'``) names tensor ``name``: how a
        tensor ernieq cannot classify is let through, as it is."""
        return any(r.choice is None and r.pattern is not None and re.search(r.pattern, name) for r in self.rules)

    def rotates(self, choice: CodecChoice | None) -> bool:
        return choice is not None and choice.codec in self.rotate

    def rule_for(self, name: str, info: TensorInfo, moe_ordinal: int | None = None) -> Rule | None:
        """The rule that decides the linear weight ``name`` (its canonical per-expert name), or None."""
        if info.cls not in LINEAR_CLASSES:
            return None
        return next((rule for rule in self.rules if rule.matches(name, info, moe_ordinal)), None)

    def choose(self, name: str, info: TensorInfo, moe_ordinal: int | None = None) -> CodecChoice | None:
        """The codec for the linear weight ``name`` (its canonical per-expert name), or None to keep it."""
        rule = self.rule_for(name, info, moe_ordinal)
        return None if rule is None else rule.choice


def _parse_value(text: str) -> object:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


_OVERRIDE = re.compile(r"^(?P<pattern>.+?)=(?P<codec>\w+)(?::(?P<args>.*))?$")


def parse_override(spec: str) -> Rule:
    """``'REGEX=CODEC[:key=value,...]'`` → a rule; CODEC ``none`` keeps the weight unquantized."""
    m = _OVERRIDE.match(spec)
    if not m:
        raise ErnieqError(f"override {spec!r}: expected 'REGEX=CODEC[:key=value,...]'")
    pattern, codec, args = m.group("pattern"), m.group("codec"), m.group("args") or ""
    try:
        re.compile(pattern)
    except re.error as err:
        raise ErnieqError(f"override {spec!r}: bad regular expression ({err})") from None
    if codec == KEEP:
        return Rule(choice=None, pattern=pattern, origin=f"override {spec!r}")
    params = []
    for item in filter(None, args.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ErnieqError(f"override {spec!r}: parameter {item!r} is not key=value")
        params.append((key.strip(), _parse_value(value.strip())))
    choice = CodecChoice(codec, tuple(params))
    validate(choice, f"override {spec!r}")
    return Rule(choice=choice, pattern=pattern, origin=f"override {spec!r}")


def validate(choice: CodecChoice, where: str) -> None:
    """Build the codec once so that a bad name or parameter fails before any work."""
    try:
        get_codec(choice.codec, **choice.kwargs)
    except (CodecError, TypeError, ValueError) as err:
        raise ErnieqError(f"{where}: {err}") from None


@dataclass(frozen=True)
class QuantizeOptions:
    """Everything ``ernieq quantize`` takes besides MODEL, OUT and an explicit :class:`QuantConfig`.

    recipe: a recipe file or a shipped recipe's name (``ernieq.recipes``); without it the preset
    (bits .. w4_moe_layers) picks a shipped recipe and its parameters (``ernieq.recipes.preset``).
    fp8_activations: with fp8, ``"dynamic"`` (W8A8: activations quantized per token and 128-channel
    group at run time, as the hf-fp8 and compressed-tensors exports declare) or ``"none"``
    (weight-only). rotate None means the recipe's choice, else on for the native format, which alone
    can carry rotations. method None: GPTQ with statistics, round to nearest without; awq: with GPTQ
    (method gptq or tune), AWQ's per-input-channel scales searched and folded in first. calib_data
    collects statistics first, calib reuses saved ones; sequential calibrates each layer on the
    quantized layers before it; method "tune" adds block-output tuning to that pass
    (``ernieq.calibration.tune``: tune_steps signed-gradient steps per layer, first step tune_lr,
    None: 1 / tune_steps; tune_rounding: the integer grids' per-weight rounding offsets tuned too, not
    only their scales; tune_seed: the order of the tuning batches; tune_target: ``"local"`` or ``"model"``, the unquantized layer's outputs on the
    quantized model's inputs or on the unquantized model's own; tune_model_steps: then every layer's scales tuned
    together against the unquantized model's output distribution, ``ernieq.calibration.tune_model``, 0: not; tune_model_lr:
    their first step, None: 2 / tune_model_steps for ccq2's, a fifth of it for the integer grids'). target_bits: the routed experts'
    codecs mixed per MoE layer, among those the recipe gives them, by measured sensitivity to that many bits per routed expert weight
    (``ernieq.calibration.mixed``; needs statistics). tp: the fastdeploy format's split for that many GPUs. workers:
    encoder processes on the CPU (None: every usable core). device: where calibration, GPTQ/AWQ,
    rotations and encoding run (``ernieq.device``: auto, cpu, cuda, cuda:N); dtype: the calibration
    pass's compute dtype (the weights are always rounded in float32).
    """

    recipe: str | Path | None = None
    bits: int = 4
    fp8: bool = False
    fp8_activations: str = FP8_DYNAMIC
    group_size: int | None = W4_GROUP_SIZE
    symmetric: bool = True
    w4_moe_layers: int | None = None
    overrides: tuple[str, ...] = ()
    rotate: bool | None = None
    method: str | None = None
    awq: bool = False
    calib_data: str | None = None
    calib: str | Path | None = None
    calib_tokens: int = 64 * 512
    calib_seq_len: int = 512
    all_experts: bool = False
    sequential: bool = False
    tune_steps: int = 20
    tune_lr: float | None = None
    tune_rounding: bool = False
    tune_seed: int = 0
    tune_target: str = "local"
    tune_model_steps: int = 20
    tune_model_lr: float | None = None
    target_bits: float | None = None
    format: str = NATIVE_FORMAT
    tp: int = 1
    overwrite: bool = False
    progress: bool = True
    workers: int | None = None
    device: str = "auto"
    dtype: str = "auto"


def with_fields(options: QuantizeOptions | None, fields: dict) -> QuantizeOptions:
    """``options`` (default: the defaults) with some fields replaced; an unknown field is a TypeError."""
    return dataclasses.replace(options or QuantizeOptions(), **fields)
