"""Hub ids as MODEL: resolved offline from a hub-cache layout the test builds; a clean error on a miss."""

from __future__ import annotations

import json
import shutil

import pytest

from ernieq import api
from ernieq.errors import ErnieqError
from ernieq.model.hub import ALLOW_PATTERNS, parse_hub_id
from tests.tiny import write_tiny_ernie

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _hub_cache(root, repo: str, source, extra=("pytorch_model.bin",)):
    """``root`` laid out as huggingface_hub's cache holding ``repo`` at main = COMMIT, files copied from
    ``source`` (plus ``extra`` files a snapshot may hold but ernieq must never ask for)."""
    folder = root / f"models--{repo.replace('/', '--')}"
    snap = folder / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    for f in source.iterdir():
        shutil.copy2(f, snap / f.name)
    for name in extra:
        (snap / name).write_bytes(b"not a pickle ernieq would read")
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(COMMIT)
    return snap


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_parse_hub_id():
    assert parse_hub_id("baidu/ERNIE-4.5-21B-A3B-PT") == ("baidu/ERNIE-4.5-21B-A3B-PT", None)
    assert parse_hub_id("baidu/ERNIE-4.5-21B-A3B-PT@v1.0") == ("baidu/ERNIE-4.5-21B-A3B-PT", "v1.0")
    assert parse_hub_id("demo") is None and parse_hub_id("q2/") is None and parse_hub_id("/abs/path") is None


def test_a_cached_hub_id_resolves_offline_to_its_snapshot(offline_cache, tmp_path, monkeypatch):
    source = write_tiny_ernie(tmp_path / "src")
    snap = _hub_cache(offline_cache, "acme/tiny-ernie", source)
    monkeypatch.chdir(tmp_path)
    assert api.resolve_model("acme/tiny-ernie") == snap
    assert api.resolve_model(f"acme/tiny-ernie@{COMMIT}") == snap
    summary = api.inspect("acme/tiny-ernie")  # the whole command path reads it
    assert summary is not None
    assert "*.bin" not in ALLOW_PATTERNS and not any(p.endswith((".bin", ".pt", ".pth")) for p in ALLOW_PATTERNS)


def test_a_hub_id_missing_offline_is_one_line_naming_it(offline_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ErnieqError) as err:
        api.resolve_model("acme/not-downloaded@v2")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("acme/not-downloaded@v2: ")
    assert "huggingface-cli download acme/not-downloaded --revision v2" in msg


def test_a_local_folder_wins_over_a_hub_id_and_says_so(offline_cache, tmp_path, monkeypatch, caplog):
    write_tiny_ernie(tmp_path / "acme" / "tiny-ernie")
    monkeypatch.chdir(tmp_path)
    with caplog.at_level("INFO", logger="ernieq"):
        path = api.resolve_model("acme/tiny-ernie")
    assert path.resolve() == (tmp_path / "acme" / "tiny-ernie").resolve()
    assert "using the local folder" in caplog.text
    assert json.loads((path / "config.json").read_text())
