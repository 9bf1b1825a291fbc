"""Recipes as files: the ones ernieq ships, the user's, and the one a checkpoint stores.

Shipped (YAML beside this module, ``ernieq recipes`` lists them): ``w8``, ``w4``, ``w2`` and ``fp8``,
which ``--bits 8/4/2`` and ``--fp8`` load (their options set the files' parameters), and
``fastdeploy-300b``, FastDeploy's published 2-bit ERNIE-4.5-300B layout. ``--recipe`` takes a file
or a shipped name. The schema is ``ernieq.recipes.schema``'s.

A checkpoint stores the recipe it was made with in ``quantization_config.recipe_spec``: the
resolved content (parameters filled in, shares counted for that model, ``--override`` rules in
front, the rounding, rotations and calibration the run used) as a recipe of the same schema, so
that ``ernieq inspect`` prints a file that makes the same checkpoint again.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from ernieq.config import (
    KEEP,
    ROTATED_CODECS,
    QuantConfig,
    QuantizeOptions,
    Rule,
    Span,
    parse_override,
    with_fields,
)
from ernieq.codecs.fp8 import DYNAMIC as FP8_DYNAMIC
from ernieq.errors import ErnieqError
from ernieq.model.adapters import LINEAR_CLASSES
from ernieq.recipes.schema import SCHEMA_KEY, SCHEMA_VERSION, Recipe, RecipeError, first_count, read_recipe

__all__ = ["Recipe", "RecipeError", "configure", "dump", "load_recipe", "preset", "recipe_spec", "shipped_names",
           "shipped_text"]

SHIPPED_DIR = Path(__file__).resolve().parent
SUFFIX = ".yaml"
SPEC_KEY = "recipe_spec"  # quantization_config's key for the stored recipe
FASTDEPLOY_W4_SHARE = "4/51"  # w2's wint4 MoE layers: FastDeploy's 300B runs 4 of its 51 MoE layers at wint4


def shipped_names() -> list[str]:
    return sorted(p.stem for p in SHIPPED_DIR.glob(f"*{SUFFIX}"))


def _shipped_path(name: str) -> Path:
    path = SHIPPED_DIR / f"{name}{SUFFIX}"
    if not path.is_file():
        raise RecipeError(f"recipe {name!r}: not a file, nor a shipped recipe ({', '.join(shipped_names())})")
    return path


def recipe_path(source: str | Path) -> Path:
    """A recipe file: ``source`` itself when it is a file, else the shipped recipe of that name."""
    path = Path(source)
    return path if path.is_file() else _shipped_path(str(source))


def shipped_text(name: str) -> str:
    """The shipped recipe file ``name`` as it is, comments included."""
    return _shipped_path(name).read_text(encoding="utf-8")


def load_recipe(source: str | Path, parameters: dict | None = None, num_moe_layers: int = 0) -> Recipe:
    """The recipe file (or shipped recipe) ``source`` for a model with ``num_moe_layers`` MoE layers."""
    return read_recipe(recipe_path(source), parameters, num_moe_layers)


def _preset(options: QuantizeOptions, num_moe_layers: int) -> tuple[str, str, dict]:
    """(shipped recipe, the name the checkpoint records, its parameters) for ``--bits``/``--fp8``; ``rotate``
    lets symmetric ``wint4`` clip (rotated weights look Gaussian, where clipping pays)."""
    if not options.fp8 and options.fp8_activations != FP8_DYNAMIC:
        raise ErnieqError(f"--fp8-activations {options.fp8_activations}: applies to --fp8 only")
    if options.fp8:  # W8A8 (the default) or weight-only block FP8; reports name which
        name = "fp8-w8a8" if options.fp8_activations == FP8_DYNAMIC else "fp8-weight-only"
        return "fp8", name, {"activations": options.fp8_activations}
    if options.bits == 8:
        return "w8", "w8", {}
    if options.bits == 4:
        g, symmetric = options.group_size, options.symmetric
        # grouped wint4 stores float16 scales, as GPTQ checkpoints do: 4.25 bits per weight at G = 64
        params = {"group_size": g, "symmetric": symmetric, "clip": bool(options.rotate) and symmetric,
                  "scale_dtype": "float16" if g else "float32"}
        return "w4", f"w4g{g or 'channel'}{'' if symmetric else 'a'}", params
    if options.bits == 2:
        share = FASTDEPLOY_W4_SHARE if options.w4_moe_layers is None else options.w4_moe_layers
        params = {"w4_moe_layers": share, "clip": bool(options.rotate)}
        return "w2", f"w2-w4x{first_count(share, num_moe_layers)}", params
    raise ErnieqError(f"--bits {options.bits}: expected 2, 4 or 8 (or --fp8)")


def _config(name: str, recipe: Recipe, overrides: tuple[str, ...], rotate: bool) -> QuantConfig:
    rules = tuple(parse_override(o) for o in overrides) + recipe.rules
    return QuantConfig(name, rules, ROTATED_CODECS if rotate else (), recipe.description)


def preset(options: QuantizeOptions | None = None, num_moe_layers: int = 0, **fields) -> QuantConfig:
    """The recipe of ``--bits``/``--fp8`` (``options`` with ``fields`` replaced; ``rotate`` None is off),
    with the ``--override`` rules in front, for a model with ``num_moe_layers`` MoE layers."""
    options = with_fields(options, fields)
    shipped, name, params = _preset(options, num_moe_layers)
    return _config(name, load_recipe(shipped, params, num_moe_layers), options.overrides, bool(options.rotate))


def configure(options: QuantizeOptions, num_moe_layers: int,
              default_rotate: bool = False) -> tuple[QuantConfig, QuantizeOptions]:
    """The recipe of a quantize run and its options completed from the recipe.

    ``options.recipe`` (a file or a shipped name) or else the ``--bits`` preset. What the options leave
    open (rotate None, method None, no calibration given, a ``--tune-*`` setting at its default) the recipe
    file decides where it says so;
    rotate then defaults to ``default_rotate``.
    """
    if options.recipe is None:
        options = dataclasses.replace(options, rotate=default_rotate if options.rotate is None else options.rotate)
        return preset(options, num_moe_layers), options
    recipe = load_recipe(options.recipe, num_moe_layers=num_moe_layers)
    fill: dict = {"rotate": next(r for r in (options.rotate, recipe.rotate, default_rotate) if r is not None),
                  "method": options.method or recipe.method, "awq": options.awq or recipe.awq}
    cal = recipe.calibration
    if cal is not None and options.calib_data is None and options.calib is None:
        fill.update(calib_data=cal.data, all_experts=options.all_experts or cal.all_experts,
                    sequential=options.sequential or cal.sequential)
        fill.update({k: v for k, v in (("calib_tokens", cal.tokens), ("calib_seq_len", cal.seq_len)) if v})
    if recipe.tune is not None and fill["method"] == "tune":  # where the command leaves a --tune-* at its default
        defaults = QuantizeOptions()
        for field, value in dataclasses.asdict(recipe.tune).items():
            name = f"tune_{field}"
            if value is not None and getattr(options, name) == getattr(defaults, name):
                fill[name] = value
    options = dataclasses.replace(options, **fill)
    return _config(recipe.name, recipe, options.overrides, options.rotate), options


def _span_text(spans: tuple[Span, ...]) -> str | list:
    """Spans as the schema writes them ("0-6,9", "7-"); an empty tuple as an empty list."""
    if not spans:
        return []
    return ",".join(str(a) if a == b else f"{a}-" if b is None else f"{a}-{b}" for a, b in spans)


def _rule_spec(rule: Rule) -> dict:
    spec: dict = {"codec": KEEP if rule.choice is None else rule.choice.codec}
    if rule.choice is not None and rule.choice.params:
        spec["params"] = dict(rule.choice.params)
    if rule.classes != LINEAR_CLASSES:
        spec["classes"] = [c.value for c in rule.classes]
    if rule.pattern is not None:
        spec["pattern"] = rule.pattern
    if rule.layers is not None:
        spec["layers"] = _span_text(rule.layers)
    if rule.moe_layers is not None:
        spec["moe_layers"] = _span_text(rule.moe_layers)
    if rule.optional:
        spec["optional"] = True
    return spec


def recipe_spec(config: QuantConfig, options: QuantizeOptions) -> dict:
    """What a checkpoint stores: ``config`` (rules in order, ``--override`` rules included) and the
    rounding, rotations and calibration of ``options`` (resolved), as a recipe file of the schema."""
    spec: dict = {SCHEMA_KEY: SCHEMA_VERSION, "name": config.name}
    if config.description:
        spec["description"] = config.description
    spec["rotate"] = bool(config.rotate)
    spec["method"] = options.method or "rtn"
    if options.awq:
        spec["awq"] = True
    if spec["method"] == "tune":
        spec["tune"] = {"steps": options.tune_steps, "lr": options.tune_lr, "rounding": options.tune_rounding,
                        "seed": options.tune_seed, "target": options.tune_target,
                        "model_steps": options.tune_model_steps, "model_lr": options.tune_model_lr}
    if options.calib_data is not None:
        spec["calibration"] = {"data": options.calib_data, "tokens": options.calib_tokens,
                               "seq_len": options.calib_seq_len, "all_experts": options.all_experts,
                               "sequential": options.sequential}
    spec["rules"] = [_rule_spec(r) for r in config.rules]
    return spec


def dump(spec: dict) -> str:
    """A recipe dict as YAML, keys in the schema's order."""
    return yaml.safe_dump(spec, sort_keys=False, allow_unicode=True, width=100, default_flow_style=None)
