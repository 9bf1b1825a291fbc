"""The offline task ``wikitext2_lastword``: LAMBADA-style last-word prediction over WikiText-2.

LAMBADA (as lm-eval's ``lambada_openai`` scores it) gives a model a passage without its
last word and counts the passage as right when greedy decoding would produce exactly that
word (``acc``, from ``loglikelihood``'s ``is_greedy``), next to the perplexity of the word.
This task asks the same of paragraphs of the WikiText-2 raw test split, which ernieq
already reads offline (``ernieq.text``, source ``wikitext2``), so task accuracy needs no hub.

How the examples are chosen (``BUILD_VERSION`` 1; the same examples on every machine):

- a paragraph is a line of the raw file (CRLF read as LF) with its outer spaces stripped;
  empty lines and headings (lines that start with ``=``) are not paragraphs;
- the paragraph is cut into words at single spaces (the raw file already spaces out its
  punctuation: ``the game 's`` ...); one closing sentence mark (``.``, ``!`` or ``?``) is dropped;
- it is kept when the last word is made of letters only (``[A-Za-z]+``) and the passage has
  ``MIN_WORDS`` to ``MAX_WORDS`` words; a passage seen before is dropped;
- context = every word but the last, joined by single spaces; target = the last word (the
  task scores ``' ' + target`` after the context, as ``lambada_openai`` does);
- the passages are ordered by the SHA-256 of their text, so that the first N (``--limit N``)
  are spread over the whole split rather than taken from its first articles.

The examples are written once per source file as JSON lines (``context``, ``target``,
``text``) under ``$ERNIEQ_CACHE/tasks`` (named by the build version and the source's hash)
and read back through ``datasets``' own JSON loader: the task YAML beside this module
(``lm_tasks/wikitext2_lastword.yaml``, lm-eval's format) names :func:`dataset` as its
``custom_dataset``. WikiText-2 is CC BY-SA 3.0; no copy of it is shipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from ernieq.errors import ErnieqError
from ernieq.text import load_documents

TASK_NAME = "wikitext2_lastword"
BUILD_VERSION = 1
MIN_WORDS, MAX_WORDS = 40, 400
SENTENCE_MARKS = (".", "!", "?")
WORD = re.compile(r"[A-Za-z]+")
DEFAULT_SOURCE = "wikitext2"
TASKS_CACHE = "tasks"


def lastword_records(text: str) -> list[dict]:
    """The examples of ``text`` (LF line ends), in SHA-256 order of their passages."""
    seen, records = set(), []
    for line in text.split("\n"):
        paragraph = line.strip()
        if not paragraph or paragraph.startswith("="):
            continue
        words = paragraph.split(" ")
        if words[-1] in SENTENCE_MARKS:
            words = words[:-1]
        if not MIN_WORDS <= len(words) <= MAX_WORDS or not WORD.fullmatch(words[-1]):
            continue
        passage = " ".join(words)
        if passage in seen:
            continue
        seen.add(passage)
        records.append({"context": " ".join(words[:-1]), "target": words[-1], "text": passage})
    records.sort(key=lambda r: hashlib.sha256(r["text"].encode("utf-8")).digest())
    return records


def _cache_dir() -> Path:
    from ernieq.demo.cache import cache_root

    return cache_root() / TASKS_CACHE


def build_lastword(source: str = DEFAULT_SOURCE, cache: Path | None = None) -> Path:
    """The JSON-lines file of ``source``'s examples (a text source of ``ernieq.text``), built on first use.

    The file's name carries the build version and the SHA-256 of the source text, so a changed
    source or a changed rule builds a new file; it is written beside its final name and renamed.
    """
    text = "\n\n".join(load_documents(source, split="eval"))
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    folder = Path(cache) if cache is not None else _cache_dir()
    path = folder / f"{TASK_NAME}-v{BUILD_VERSION}-{digest}.jsonl"
    if path.is_file():
        return path
    records = lastword_records(text)
    if not records:
        raise ErnieqError(f"{TASK_NAME}: text source {source!r} has no paragraph of {MIN_WORDS} to {MAX_WORDS} "
                          "words that ends in a word")
    folder.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f".{path.name}.{os.getpid()}.partial")
    part.write_text("".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records),
                    encoding="utf-8")
    os.replace(part, path)
    return path


def dataset(source: str = DEFAULT_SOURCE, **_metadata):
    """lm-eval's ``custom_dataset`` hook: {"test": the examples} as a ``datasets.DatasetDict``.

    lm-eval calls it with the task's metadata and ``dataset_kwargs``; ``source`` (a
    ``dataset_kwargs`` entry) picks another text source or file than WikiText-2.
    """
    import datasets

    return datasets.load_dataset("json", data_files={"test": str(build_lastword(source))})
