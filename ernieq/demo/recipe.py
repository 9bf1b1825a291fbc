"""What decides the demo checkpoint's weights: the recipe, its variants and its checks."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from ernieq.errors import ErnieqError

RECIPE_VERSION = 3  # bump whenever the build changes the weights it writes (3: the float64 fit and the padded sizes)
ROUTED_SIZE_MULTIPLE = 128  # moe_intermediate_size of the routed variant: a whole number of 128-row groups
MAX_SHARED_FRACTION = 0.25  # shared experts hold at most a quarter of the dense neurons


class DemoModelError(ErnieqError, RuntimeError):
    """The demo model cannot be built: a missing package, a bad option, an occupied output folder."""


@dataclass(frozen=True)
class DemoRecipe:
    """Everything that decides the demo checkpoint's weights.

    experts: routed experts per MoE layer (E); top_k: active routed experts per token (A);
    shared: shared experts, stored as one MLP of ``shared * moe_intermediate_size`` neurons.
    calib_tokens / calib_seq_len: calibration text from the ``demo`` calib split, in windows.
    router_logit_std: the spread of the routed variant's router logits; small keeps the
    routing weights near 1/k.
    num_layers: keep only the first layers (tests); None keeps all.
    """

    variant: str
    experts: int
    top_k: int
    shared: int
    calib_tokens: int = 16384
    calib_seq_len: int = 512
    kmeans_iters: int = 12
    refine_rounds: int = 3
    router_logit_std: float = 0.01
    ridge: float = 1e-3
    seed: int = 0
    num_layers: int | None = None

    @property
    def key(self) -> str:
        """Short hash of the recipe: the cache folder changes whenever the recipe does."""
        blob = json.dumps({"version": RECIPE_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


VARIANT_DEFAULTS: dict[str, dict[str, int]] = {
    "exact": {"experts": 8, "top_k": 8, "shared": 4},
    "routed": {"experts": 9, "top_k": 7, "shared": 3},
}


def make_recipe(variant: str = "routed", **overrides) -> DemoRecipe:
    """The variant's default recipe with ``overrides`` (None values ignored)."""
    if variant not in VARIANT_DEFAULTS:
        raise DemoModelError(f"unknown demo variant {variant!r}: expected one of {', '.join(VARIANT_DEFAULTS)}")
    fields = {**VARIANT_DEFAULTS[variant], **{k: v for k, v in overrides.items() if v is not None}}
    return DemoRecipe(variant=variant, **fields)


def validate_recipe(recipe: DemoRecipe, intermediate: int, num_layers: int) -> int:
    """Check the recipe against the dense MLP; returns moe_intermediate_size (m)."""
    e, k, s = recipe.experts, recipe.top_k, recipe.shared
    if e < 1 or k < 1 or s < 0 or k > e:
        raise DemoModelError(f"need experts >= 1, 1 <= top_k <= experts, shared >= 0; got E={e}, k={k}, S={s}")
    if intermediate % (e + s):
        raise DemoModelError(f"experts + shared = {e + s} must divide the dense MLP's {intermediate} neurons")
    if not 2 <= num_layers:
        raise DemoModelError(f"num_layers must be at least 2 (a dense layer 0 and a MoE layer), got {num_layers}")
    m = intermediate // (e + s)
    if recipe.variant == "exact" and k != e:
        raise DemoModelError(f"the exact variant routes every token to all experts: top_k must be {e}, got {k}")
    if recipe.variant == "routed":
        if k == e:
            raise DemoModelError(f"the routed variant needs top_k < experts, got {k} of {e}")
        if m % ROUTED_SIZE_MULTIPLE:
            raise DemoModelError(f"moe_intermediate_size {m} is not a multiple of {ROUTED_SIZE_MULTIPLE}")
        if s * m > MAX_SHARED_FRACTION * intermediate:
            raise DemoModelError(f"{s} shared experts hold {s * m} of {intermediate} neurons, more than a quarter")
    return m
