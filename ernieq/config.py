"""Recipes: which codec, with which parameters, for which linear weight.

A :class:`QuantConfig` is an ordered list of rules; the first rule that matches
a tensor decides. Rules match by tensor class (attention, dense MLP, shared or
routed experts), by the ordinal of the MoE layer, and by a regular expression
over the canonical tensor name. ``--override`` rules come first. Router gates,
norms, embeddings and ``lm_head`` are never quantized: only linear weights of
decoder layers reach the rules.
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


@dataclass(frozen=True)
class Rule:
    """Matches when every given condition holds. ``choice`` None keeps the weight."""

    choice: CodecChoice | None
    classes: tuple[TensorClass, ...] = LINEAR_CLASSES
    pattern: str | None = None
    moe_layers_below: int | None = None  # only the first n MoE layers (by ordinal)
    moe_layers_from: int | None = None  # only MoE layers from ordinal n on

    def matches(self, name: str, info: TensorInfo, moe_ordinal: int | None) -> bool:
        if info.cls not in self.classes:
            return False
        if self.pattern is not None and not re.search(self.pattern, name):
            return False
        if self.moe_layers_below is not None and (moe_ordinal is None or moe_ordinal >= self.moe_layers_below):
            return False
        if self.moe_layers_from is not None and (moe_ordinal is None or moe_ordinal < self.moe_layers_from):
            return False
        return True


@dataclass(frozen=True)
class QuantConfig:
    """An ordered list of rules and the recipe's name (recorded in the checkpoint).

    rotate: the codecs whose weights are stored turned by an input rotation
    (``ernieq.transforms``; the runtime turns their inputs online).
    """

    recipe: str
    rules: tuple[Rule, ...] = field(default_factory=tuple)
    rotate: tuple[str, ...] = ()

    def rotates(self, choice: CodecChoice | None) -> bool:
        return choice is not None and choice.codec in self.rotate

    def choose(self, name: str, info: TensorInfo, moe_ordinal: int | None = None) -> CodecChoice | None:
        """The codec for the linear weight ``name`` (its canonical per-expert name), or None to keep it."""
        if info.cls not in LINEAR_CLASSES:
            return None
        for rule in self.rules:
            if rule.matches(name, info, moe_ordinal):
                return rule.choice
        return None


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
        return Rule(choice=None, pattern=pattern)
    params = []
    for item in filter(None, args.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ErnieqError(f"override {spec!r}: parameter {item!r} is not key=value")
        params.append((key.strip(), _parse_value(value.strip())))
    choice = CodecChoice(codec, tuple(params))
    validate(choice, f"override {spec!r}")
    return Rule(choice=choice, pattern=pattern)


def validate(choice: CodecChoice, where: str) -> None:
    """Build the codec once so that a bad name or parameter fails before any work."""
    try:
        get_codec(choice.codec, **choice.kwargs)
    except (CodecError, TypeError, ValueError) as err:
        raise ErnieqError(f"{where}: {err}") from None


def default_w4_moe_layers(num_moe_layers: int) -> int:
    """How many leading MoE layers keep ``wint4`` experts in the 2-bit recipe.

    FastDeploy's published ERNIE-4.5-300B-A47B 2-bit config runs MoE layers up to
    ``moe_w4_quant_end_layer: 6`` at wint4; its MoE layers are 3..53, so 4 of 51.
    ernieq keeps the same share, rounded up: ceil(4 n / 51), at least one.
    """
    return min(num_moe_layers, max(1, -(-4 * num_moe_layers // 51)))


@dataclass(frozen=True)
class QuantizeOptions:
    """Everything ``ernieq quantize`` takes besides MODEL, OUT and an explicit :class:`QuantConfig`.

    The preset (bits .. rotate) builds the recipe (:func:`recipe`); fp8_activations: with fp8,
    ``"dynamic"`` (W8A8: activations quantized per token and 128-channel group at run time, as
    the hf-fp8 and compressed-tensors exports declare) or ``"none"`` (weight-only). rotate None
    means on for the native format, which alone can carry rotations. method None: GPTQ with
    statistics, round to nearest without. calib_data collects statistics first, calib reuses saved
    ones; sequential calibrates each layer on the quantized layers before it. tp: the fastdeploy
    format's split for that many GPUs. workers: encoder processes on the CPU (None: every usable core).
    """

    bits: int = 4
    fp8: bool = False
    fp8_activations: str = FP8_DYNAMIC
    group_size: int | None = W4_GROUP_SIZE
    symmetric: bool = True
    w4_moe_layers: int | None = None
    overrides: tuple[str, ...] = ()
    rotate: bool | None = None
    method: str | None = None
    calib_data: str | None = None
    calib: str | Path | None = None
    calib_tokens: int = 64 * 512
    calib_seq_len: int = 512
    all_experts: bool = False
    sequential: bool = False
    format: str = NATIVE_FORMAT
    tp: int = 1
    overwrite: bool = False
    progress: bool = True
    workers: int | None = None


def with_fields(options: QuantizeOptions | None, fields: dict) -> QuantizeOptions:
    """``options`` (default: the defaults) with some fields replaced; an unknown field is a TypeError."""
    return dataclasses.replace(options or QuantizeOptions(), **fields)


def recipe(options: QuantizeOptions | None = None, num_moe_layers: int = 0, **fields) -> QuantConfig:
    """The recipe for ``--bits``/``--fp8`` (``options`` with ``fields`` replaced), with ``--override`` rules in front; ``rotate``
    stores the ``wint4`` and ``ccq2`` weights turned by input rotations, and lets symmetric
    ``wint4`` clip (rotated weights look Gaussian, where clipping pays). Grouped ``wint4`` stores
    float16 scales, as GPTQ checkpoints do: 4.25 bits per weight at G = 64, 4.125 at G = 128."""
    options = with_fields(options, fields)
    bits, fp8, group_size, symmetric = options.bits, options.fp8, options.group_size, options.symmetric
    w4_moe_layers, rotate = options.w4_moe_layers, bool(options.rotate)
    clip = (("clip", True),) if rotate and symmetric else ()
    half = (("scale_dtype", "float16"),) if group_size else ()
    wint4 = CodecChoice("wint4", (("group_size", group_size), ("symmetric", symmetric)) + clip + half)
    # FastDeploy's w4w2 runs the leading MoE layers' experts as symmetric per-channel int4
    wint4_per_channel = CodecChoice("wint4", (("group_size", None), ("symmetric", True)) + (("clip", True),) * rotate)
    if not fp8 and options.fp8_activations != FP8_DYNAMIC:
        raise ErnieqError(f"--fp8-activations {options.fp8_activations}: applies to --fp8 only")
    if fp8:  # W8A8 (the default) or weight-only block FP8
        fp8_choice = CodecChoice("fp8", (("block_size", 128), ("activations", options.fp8_activations)))
        name = "fp8-w8a8" if options.fp8_activations == FP8_DYNAMIC else "fp8-weight-only"  # reports name it
        base = [Rule(fp8_choice)]
    elif bits == 8:
        name, base = "w8", [Rule(CodecChoice("wint8"))]
    elif bits == 4:
        name, base = f"w4g{group_size or 'channel'}{'' if symmetric else 'a'}", [Rule(wint4)]
    elif bits == 2:
        n4 = default_w4_moe_layers(num_moe_layers) if w4_moe_layers is None else w4_moe_layers
        name = f"w2-w4x{n4}"
        base = [
            Rule(wint4_per_channel, classes=(TensorClass.ROUTED_EXPERT,), moe_layers_below=n4),
            Rule(CodecChoice("ccq2"), classes=(TensorClass.ROUTED_EXPERT,), moe_layers_from=n4),
            Rule(CodecChoice("wint8")),
        ]
    else:
        raise ErnieqError(f"--bits {bits}: expected 2, 4 or 8 (or --fp8)")
    for rule in base:
        if rule.choice is not None:
            validate(rule.choice, f"recipe {name}")
    rules = tuple(parse_override(o) for o in options.overrides) + tuple(base)
    if rotate:
        return QuantConfig(f"{name}-rot", rules, ROTATED_CODECS)
    return QuantConfig(name, rules)
