"""Build the demo checkpoint into a folder, and keep one per variant in the cache."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from ernieq.demo.cache import atomic_folder, cache_root, copy_folder
from ernieq.demo.convert import checkpoint_tensors, ernie_config, layer_index
from ernieq.demo.pad import padding_for
from ernieq.demo.plan import moe_plans
from ernieq.demo.recipe import RECIPE_VERSION, DemoModelError, DemoRecipe, make_recipe, validate_recipe
from ernieq.demo.source import SOURCE_GGUF, SOURCE_PIP_NAME, DenseSource, load_dense_source
from ernieq.model.checkpoint import CheckpointWriter, weights_sha256, write_json
from ernieq.progress import progress_bar

log = logging.getLogger(__name__)

RECIPE_FILE = "demo_recipe.json"


def _write_checkpoint(tmp: Path, source: DenseSource, recipe: DemoRecipe, calib_text: str | None) -> None:
    """The checkpoint, config, tokenizer and ``demo_recipe.json`` (the recipe, the padding and
    ``weights_sha256``: the same on every machine) into ``tmp``."""
    from transformers import GenerationConfig

    dense = source.model.config
    num_layers = recipe.num_layers or dense.num_hidden_layers
    if num_layers > dense.num_hidden_layers:
        raise DemoModelError(f"num_layers {num_layers} exceeds the source model's {dense.num_hidden_layers}")
    moe_size = validate_recipe(recipe, dense.intermediate_size, num_layers)
    padding = padding_for(dense)
    plans = moe_plans(source, recipe, num_layers, calib_text)
    state = {k: v.float() for k, v in source.model.state_dict().items() if (layer_index(k) or 0) < num_layers}
    with CheckpointWriter(tmp, max_shard_bytes=2**30) as writer, progress_bar() as bar:
        task = bar.add_task("demo model: writing tensors", total=None)
        for name, tensor in checkpoint_tensors(state, plans, padding):
            writer.add(name, tensor)
            bar.advance(task)
    config = ernie_config(dense, recipe, moe_size, num_layers, padding)
    write_json(tmp / "config.json", config)
    special = {k: getattr(dense, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    GenerationConfig(**special).save_pretrained(tmp)
    source.tokenizer.save_pretrained(tmp)
    meta = {"version": RECIPE_VERSION, "source": f"{SOURCE_PIP_NAME}/{SOURCE_GGUF}",
            "weights_sha256": weights_sha256(tmp), "padding": padding.to_json(), **dataclasses.asdict(recipe)}
    write_json(tmp / RECIPE_FILE, meta)


def build_demo_model(
    out_dir: str | os.PathLike,
    *,
    variant: str = "routed",
    experts: int | None = None,
    top_k: int | None = None,
    shared: int | None = None,
    calib_text: str | None = None,
    calib_tokens: int | None = None,
    num_layers: int | None = None,
    source: DenseSource | None = None,
) -> Path:
    """Write the demo Ernie4_5_MoeForCausalLM checkpoint to ``out_dir`` (which must not exist or be empty).

    experts/top_k/shared default to the variant's (``VARIANT_DEFAULTS``).
    calib_text: calibration text for the routed variant (default: the ``demo`` calib split).
    num_layers: keep only the first layers (a quick build for tests).
    source: an already loaded dense model (left unchanged), to save loading it again.
    The folder appears complete or not at all: the build goes to a temporary sibling first.
    """
    out = Path(out_dir)
    recipe = make_recipe(
        variant, experts=experts, top_k=top_k, shared=shared, calib_tokens=calib_tokens, num_layers=num_layers
    )
    with atomic_folder(out) as tmp:
        _write_checkpoint(tmp, source or load_dense_source(), recipe, calib_text)
    log.info("demo model (%s, E=%d, k=%d, S=%d) in %s", variant, recipe.experts, recipe.top_k, recipe.shared, out)
    return out


def demo_model_path(variant: str = "routed", **options: int | None) -> Path:
    """The cached demo checkpoint of ``variant`` (``options``: experts, top_k, shared), built on first
    use (minutes on a CPU): every later use, ``demo`` as a model name or ``demo-model --out``, is free."""
    recipe = make_recipe(variant, **options)
    path = cache_root() / f"demo-{variant}-v{RECIPE_VERSION}-{recipe.key}"
    if path.is_dir():
        return path
    log.info("building the demo model (%s) into %s", variant, path)
    try:
        return build_demo_model(path, variant=variant, **options)
    except DemoModelError:
        if path.is_dir() and any(path.iterdir()):  # another process finished the same build first
            return path
        raise


def write_demo_model(out_dir: str | os.PathLike, variant: str = "routed", **options: int | None) -> Path:
    """The demo checkpoint in ``out_dir``: the cached build (:func:`demo_model_path`, built first if
    missing), copied in seconds rather than built again."""
    src = demo_model_path(variant, **options)
    log.info("copying the cached demo model %s to %s", src, out_dir)
    return copy_folder(src, Path(out_dir))
