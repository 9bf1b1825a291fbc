r"""Recipe files: the YAML schema (version 1), read strictly into rules and the settings a recipe states.

::

    ernieq_recipe: 1                 # required: the schema version
    name: my-w2                      # required: the name a checkpoint records (``-rot`` added when rotated)
    description: ...                 # optional, for people
    parameters: {w4_layers: 3}       # optional: named values; "$w4_layers" anywhere in rules stands for one
    rotate: auto                     # optional: auto (on for the native format), true or false
    method: gptq                     # optional: rtn, gptq, awq or tune (default: gptq with statistics, else rtn)
    awq: false                       # optional, with gptq or tune: AWQ's scales folded in before GPTQ
    tune:                            # optional, with method tune: block-output tuning's settings
      steps: 20                      #   signed-gradient steps per decoder layer
      lr: null                       #   the first step (null: 1 / steps)
      rounding: false                #   integer grids tune each weight's rounding too
      seed: 0                        #   the order of the tuning batches
      target: local                  #   local or model
      model_steps: 20                #   then steps of every layer's scales together, end to end (0: none)
      model_lr: null                 #   their first step (null: 2 / model_steps, wint4/8 a fifth)
    calibration:                     # optional: collect statistics first, unless the command gives some
      data: demo                     #   a text source (ernieq.text)
      tokens: 32768                  #   optional, default 64 x 512
      seq_len: 512                   #   optional, default 512
      all_experts: false             #   optional
      sequential: false              #   optional
    rules:                           # required: ordered, the first rule that matches a weight decides
      - codec: wint4                 # a registered codec, or none (keep the weight as it is)
        params: {group_size: null}   # optional: the codec's parameters
        classes: [routed_experts]    # optional: attention, dense_mlp, shared_experts, routed_experts (default: all)
        pattern: 'experts\.\d+\.down_proj'   # optional: a regular expression searched in the weight's name
        layers: 0-6                  # optional: decoder layer indices: 3, "0-6", "7-", or a list of them
        moe_layers: {first: 4/51}    # optional: ordinals among the MoE layers, as layers, or {first: N or
                                     #   p/q}: the first N, or that share rounded up (at least one)
        optional: false              # optional: true lets the rule decide no weight of a model

Every key is checked; an unknown key, a wrong type, a codec or parameter the codec does not know,
or a bad regular expression is a one-line :class:`RecipeError` naming the file and the key.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import yaml

from ernieq.config import KEEP, TUNE_TARGETS, CodecChoice, Rule, Span, validate
from ernieq.errors import ErnieqError
from ernieq.model.adapters import LINEAR_CLASSES, TensorClass

SCHEMA_KEY = "ernieq_recipe"
SCHEMA_VERSION = 1
TOP_KEYS = (SCHEMA_KEY, "name", "description", "parameters", "rotate", "method", "awq", "tune", "calibration",
            "rules")
RULE_KEYS = ("codec", "params", "classes", "pattern", "layers", "moe_layers", "optional")
CALIBRATION_KEYS = ("data", "tokens", "seq_len", "all_experts", "sequential")
TUNE_KEYS = ("steps", "lr", "rounding", "seed", "target", "model_steps", "model_lr")
METHODS = ("rtn", "gptq", "awq", "tune")
ROTATE_AUTO = "auto"
_REFERENCE = re.compile(r"^\$([A-Za-z_]\w*)$")
_SPAN = re.compile(r"^(\d+)(?:-(\d*))?$")


class RecipeError(ErnieqError, ValueError):
    """A recipe file that cannot be used: unreadable, not the schema, a codec that cannot be built."""


@dataclass(frozen=True)
class Calibration:
    """The statistics a recipe asks to collect before quantizing (``ernieq calibrate``'s options)."""

    data: str
    tokens: int | None = None
    seq_len: int | None = None
    all_experts: bool = False
    sequential: bool = False


@dataclass(frozen=True)
class Tune:
    """Block-output tuning's settings a recipe states (None: left to the command); ``quantize``'s
    ``--tune-*`` options."""

    steps: int | None = None
    lr: float | None = None
    rounding: bool | None = None
    seed: int | None = None
    target: str | None = None
    model_steps: int | None = None
    model_lr: float | None = None


@dataclass(frozen=True)
class Recipe:
    """A recipe file read: its rules and what else it states (None: left to the command)."""

    name: str
    rules: tuple[Rule, ...]
    description: str = ""
    rotate: bool | None = None
    method: str | None = None
    awq: bool = False
    calibration: Calibration | None = None
    tune: Tune | None = None


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise RecipeError(f"line {key_node.start_mark.line + 1}: key {key!r} given twice")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, where: str) -> dict:
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a safe loader)
    except RecipeError as err:
        raise RecipeError(f"{where}: {err}") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"{where}: not YAML ({' '.join(str(err).split())})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: a recipe is a YAML mapping with {SCHEMA_KEY}, name and rules")
    return data


def read_recipe(path: Path, parameters: dict | None = None, num_moe_layers: int = 0) -> Recipe:
    """The recipe file at ``path``; ``parameters`` replace its parameters' defaults; ``num_moe_layers``
    (the model's) turns ``{first: p/q}`` shares into counts."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(f"{path}: cannot read the recipe ({getattr(err, 'strerror', None) or err})") from None
    return parse_recipe(parse_yaml(text, str(path)), str(path), parameters, num_moe_layers)


def _fail(where: str, key: str, message: str):
    raise RecipeError(f"{where}: {key}: {message}")


def _check_keys(data: dict, allowed: tuple[str, ...], where: str, key: str) -> None:
    unknown = [k for k in data if k not in allowed]
    if unknown:
        _fail(where, f"{key}{unknown[0]}" if key else str(unknown[0]),
              f"unknown key (known: {', '.join(allowed)})")


def _typed(value, kinds, where: str, key: str, what: str):
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        _fail(where, key, f"expected {what}, got {value!r}")
    if not isinstance(value, kinds):
        _fail(where, key, f"expected {what}, got {value!r}")
    return value


def _substitute(value, parameters: dict, where: str, key: str):
    """``value`` with every ``"$name"`` string replaced by that parameter's value."""
    if isinstance(value, str):
        m = _REFERENCE.match(value)
        if m is None:
            return value
        if m.group(1) not in parameters:
            _fail(where, key, f"{value} names no parameter (parameters: {', '.join(parameters) or 'none'})")
        return parameters[m.group(1)]
    if isinstance(value, dict):
        return {k: _substitute(v, parameters, where, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, parameters, where, f"{key}[{i}]") for i, v in enumerate(value)]
    return value


def first_count(value, num_moe_layers: int, where: str = "recipe", key: str = "first") -> int:
    """``{first: N}`` (an int) or ``{first: p/q}`` (a share of the MoE layers, rounded up, at least one
    when there are any) as a number of leading MoE layers."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    m = re.fullmatch(r"(\d+)/(\d+)", value) if isinstance(value, str) else None
    if m and 0 < int(m.group(2)) and int(m.group(1)) <= int(m.group(2)):
        share = Fraction(int(m.group(1)), int(m.group(2)))
        return min(num_moe_layers, max(1, math.ceil(share * num_moe_layers))) if num_moe_layers else 0
    _fail(where, key, f"expected a count or a share p/q of at most 1, got {value!r}")


def _spans(value, where: str, key: str, num_moe_layers: int | None) -> tuple[Span, ...]:
    """Layer indices as spans: an int, "a-b", "a-", a list of them, or (MoE ordinals) {first: ...}."""
    if isinstance(value, dict):
        if num_moe_layers is None:
            _fail(where, key, "{first: ...} counts MoE layers: use it under moe_layers")
        _check_keys(value, ("first",), where, f"{key}.")
        if "first" not in value:
            _fail(where, key, "expected {first: N or p/q}")
        n = first_count(value["first"], num_moe_layers, where, f"{key}.first")
        return ((0, n - 1),) if n else ()
    items = value if isinstance(value, list) else [value]
    spans = []
    for i, item in enumerate(items):
        at = f"{key}[{i}]" if isinstance(value, list) else key
        if isinstance(item, int) and not isinstance(item, bool) and item >= 0:
            spans.append((item, item))
            continue
        for part in str(item).split(",") if isinstance(item, str) else [None]:
            m = _SPAN.match(part.strip()) if part is not None else None
            if m is None:
                _fail(where, at, f"expected a layer index, a range a-b or a-, or a list of them, got {item!r}")
            first, last = int(m.group(1)), m.group(2)
            last = first if last is None else (int(last) if last else None)
            if last is not None and last < first:
                _fail(where, at, f"range {part.strip()} ends before it starts")
            spans.append((first, last))
    return tuple(spans)


def _classes(value, where: str, key: str) -> tuple[TensorClass, ...]:
    names = {c.value: c for c in LINEAR_CLASSES}
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if item not in names:
            _fail(where, key, f"{item!r} is not a class of linear weights ({', '.join(names)})")
        out.append(names[item])
    if not out:
        _fail(where, key, "an empty list matches no weight")
    return tuple(out)


def parse_rule(data, where: str, key: str, num_moe_layers: int) -> Rule:
    """One entry of ``rules``."""
    _typed(data, dict, where, key, "a mapping with codec (and params, classes, pattern, layers, moe_layers)")
    _check_keys(data, RULE_KEYS, where, f"{key}.")
    codec = _typed(data.get("codec"), str, where, f"{key}.codec", "a codec name or none")
    params = _typed(data.get("params", {}), dict, where, f"{key}.params", "a mapping of codec parameters")
    if codec == KEEP:
        if params:
            _fail(where, f"{key}.params", "codec none keeps the weight: it takes no parameters")
        choice = None
    else:
        choice = CodecChoice(codec, tuple(params.items()))
        try:
            validate(choice, f"{key}")
        except ErnieqError as err:
            raise RecipeError(f"{where}: {err}") from None
    pattern = data.get("pattern")
    if pattern is not None:
        _typed(pattern, str, where, f"{key}.pattern", "a regular expression")
        try:
            re.compile(pattern)
        except re.error as err:
            _fail(where, f"{key}.pattern", f"bad regular expression ({err})")
    return Rule(
        choice=choice,
        classes=_classes(data["classes"], where, f"{key}.classes") if "classes" in data else LINEAR_CLASSES,
        pattern=pattern,
        layers=_spans(data["layers"], where, f"{key}.layers", None) if "layers" in data else None,
        moe_layers=(_spans(data["moe_layers"], where, f"{key}.moe_layers", num_moe_layers)
                    if "moe_layers" in data else None),
        optional=_typed(data.get("optional", False), bool, where, f"{key}.optional", "true or false"),
        origin=f"{where}: {key}",
    )


def _count(data: dict, name: str, where: str) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        _fail(where, f"calibration.{name}", f"expected a positive integer, got {value!r}")
    return value


def _calibration(data, where: str) -> Calibration | None:
    if data is None:
        return None
    _typed(data, dict, where, "calibration", "a mapping with data (and tokens, seq_len, all_experts, sequential)")
    _check_keys(data, CALIBRATION_KEYS, where, "calibration.")
    source = _typed(data.get("data"), str, where, "calibration.data", "a text source (e.g. demo or a file)")
    flags = {k: _typed(data.get(k, False), bool, where, f"calibration.{k}", "true or false")
             for k in ("all_experts", "sequential")}
    return Calibration(source, _count(data, "tokens", where), _count(data, "seq_len", where), **flags)


def _tune(data, method: str | None, where: str) -> Tune | None:
    if data is None:
        return None
    if method != "tune":
        _fail(where, "tune", f"applies to method: tune, not {method or 'the default method'}")
    _typed(data, dict, where, "tune", f"a mapping with any of {', '.join(TUNE_KEYS)}")
    _check_keys(data, TUNE_KEYS, where, "tune.")
    steps, seed, lr = data.get("steps"), data.get("seed"), data.get("lr")
    for key in ("steps", "model_steps"):
        n = data.get(key)
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            _fail(where, f"tune.{key}", f"expected a non-negative integer, got {n!r}")
    if seed is not None:
        _typed(seed, int, where, "tune.seed", "an integer")
    for key in ("lr", "model_lr"):
        x = data.get(key)
        if x is not None and (isinstance(x, bool) or not isinstance(x, (int, float)) or not x > 0):
            _fail(where, f"tune.{key}", f"expected a positive number or null, got {x!r}")
    rounding = data.get("rounding")
    if rounding is not None:
        _typed(rounding, bool, where, "tune.rounding", "true or false")
    target = data.get("target")
    if target is not None and target not in TUNE_TARGETS:
        _fail(where, "tune.target", f"expected one of {', '.join(TUNE_TARGETS)}, got {target!r}")
    model_lr = data.get("model_lr")
    return Tune(steps, None if lr is None else float(lr), rounding, seed, target, data.get("model_steps"),
                None if model_lr is None else float(model_lr))


def parse_recipe(data: dict, where: str, parameters: dict | None = None, num_moe_layers: int = 0) -> Recipe:
    """A recipe from its parsed YAML (``where`` names it in errors); see the module docstring."""
    _check_keys(data, TOP_KEYS, where, "")
    if data.get(SCHEMA_KEY) != SCHEMA_VERSION:
        _fail(where, SCHEMA_KEY, f"expected {SCHEMA_VERSION} (the schema this ernieq reads), got "
                                 f"{data.get(SCHEMA_KEY)!r}")
    name = _typed(data.get("name"), str, where, "name", "the recipe's name")
    if not name.strip():
        _fail(where, "name", "is empty")
    description = _typed(data.get("description", ""), str, where, "description", "text")
    defaults = _typed(data.get("parameters", {}), dict, where, "parameters", "a mapping of names to values")
    given = dict(parameters or {})
    unknown = [k for k in given if k not in defaults]
    if unknown:
        raise RecipeError(f"{where}: parameter {unknown[0]!r} is not one of the recipe's "
                          f"({', '.join(defaults) or 'none'})")
    values = {**defaults, **given}
    rules = _substitute(data.get("rules"), values, where, "rules")
    if not isinstance(rules, list) or not rules:
        _fail(where, "rules", "expected a list of at least one rule")
    rotate = data.get("rotate", ROTATE_AUTO)
    if rotate != ROTATE_AUTO and not isinstance(rotate, bool):
        _fail(where, "rotate", f"expected auto, true or false, got {rotate!r}")
    method = data.get("method")
    if method is not None and method not in METHODS:
        _fail(where, "method", f"expected one of {', '.join(METHODS)}, got {method!r}")
    awq = data.get("awq", False)
    _typed(awq, bool, where, "awq", "true or false")
    if awq and method in ("rtn", "awq"):
        _fail(where, "awq", f"folds AWQ's scales in before GPTQ (method gptq or tune), not with method {method}")
    return Recipe(
        name=name,
        rules=tuple(parse_rule(r, where, f"rules[{i}]", num_moe_layers) for i, r in enumerate(rules)),
        description=description.strip(),
        rotate=None if rotate == ROTATE_AUTO else rotate,
        method=method,
        awq=awq,
        calibration=_calibration(data.get("calibration"), where),
        tune=_tune(data.get("tune"), method, where),
    )
