"""The build: atomic folders, the cache entry per variant, errors before any file appears."""

from __future__ import annotations

import pytest

from ernieq.demo import build, cache
from ernieq.demo.build import build_demo_model
from ernieq.demo.recipe import RECIPE_VERSION, DemoModelError, make_recipe


def test_demo_model_path_builds_once_atomically(monkeypatch, tmp_path):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(build, "load_dense_source", lambda cache=True: "dense")
    calls = []

    def failing_write(folder, source, recipe, calib_text):
        (folder / "config.json").write_text("{}")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(build, "_write_checkpoint", failing_write)
    with pytest.raises(RuntimeError, match="interrupted"):
        build.demo_model_path("routed")
    assert list(tmp_path.iterdir()) == []  # no half model, no temp folder left

    def write(folder, source, recipe, calib_text):
        calls.append((source, recipe))
        (folder / "config.json").write_text("{}")

    monkeypatch.setattr(build, "_write_checkpoint", write)
    path = build.demo_model_path("routed")
    assert path.parent == tmp_path and (path / "config.json").is_file()
    assert f"v{RECIPE_VERSION}" in path.name and make_recipe("routed").key in path.name
    assert build.demo_model_path("routed") == path and len(calls) == 1
    assert calls[0][1] == make_recipe("routed")
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_build_refuses_an_occupied_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(DemoModelError, match="already exists"):
        build_demo_model(tmp_path, variant="exact", source="unused")
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_too_short_calibration_text_fails_clearly(tmp_path, dense_source):
    with pytest.raises(DemoModelError, match="fewer than one window"):
        build_demo_model(tmp_path / "m", variant="routed", num_layers=2, calib_text="Too short.", source=dense_source)
    assert not (tmp_path / "m").exists()
