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


def test_demo_model_out_copies_the_cached_build(monkeypatch, tmp_path, capsys):
    """``demo-model --out`` builds into the cache once; every folder it writes is a copy of that build."""
    from tests.test_cli import run
    from tests.tiny import write_tiny_ernie

    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(build, "load_dense_source", lambda cache=True: "dense")
    builds = []

    def write(folder, source, recipe, calib_text):  # a tiny model stands in for the demo's minutes of build
        builds.append(recipe)
        write_tiny_ernie(folder / "tiny")
        for file in (folder / "tiny").iterdir():
            file.rename(folder / file.name)
        (folder / "tiny").rmdir()

    monkeypatch.setattr(build, "_write_checkpoint", write)
    for out in ("d1", "d2"):
        code, stdout, err = run(monkeypatch, capsys, "demo-model", "--out", tmp_path / out)
        assert code == 0, err
        assert "weights sha256" in stdout
    assert builds == [make_recipe("routed")]
    cached = build.demo_model_path("routed")
    names = sorted(p.name for p in cached.iterdir())
    assert "config.json" in names and any(n.endswith(".safetensors") for n in names)
    for out in ("d1", "d2"):
        assert sorted(p.name for p in (tmp_path / out).iterdir()) == names
        for name in names:
            assert (tmp_path / out / name).read_bytes() == (cached / name).read_bytes(), name
    shard = next(n for n in names if n.endswith(".safetensors"))
    assert (tmp_path / "d1" / shard).stat().st_ino == (cached / shard).stat().st_ino  # a link, not a copy
    assert (tmp_path / "d1" / "config.json").stat().st_ino != (cached / "config.json").stat().st_ino


def test_a_local_folder_named_demo_wins_and_the_log_says_so(monkeypatch, tmp_path, caplog):
    from ernieq import api
    from tests.tiny import write_tiny_ernie

    write_tiny_ernie(tmp_path / "demo")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(build, "build_demo_model", lambda *a, **k: pytest.fail("the cached demo was used"))
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    with caplog.at_level("INFO", logger="ernieq"):
        path = api.resolve_model("demo")
    assert path.resolve() == (tmp_path / "demo").resolve()
    assert f"using the local folder {(tmp_path / 'demo').resolve()}, not the built-in demo model" in caplog.text


def test_the_build_shows_progress_off_a_terminal(tmp_path, dense_source, capsys):
    """Into a pipe (pytest's captured stderr) each long step of the build writes plain progress lines."""
    build_demo_model(tmp_path / "m", variant="routed", num_layers=3, calib_tokens=1024, source=dense_source)
    err = capsys.readouterr().err
    assert "demo model: experts and router per layer: 100% 2/2, " in err
    assert "demo model: writing tensors: " in err and "elapsed" in err
