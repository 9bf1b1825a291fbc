"""lm-evaluation-harness tasks through ``ernieq eval --tasks``: lm-eval's numbers against a direct
computation of the same metric (its own code path, the same examples), the offline task's examples,
task YAML files over local data, and the one-line errors."""

from __future__ import annotations

import builtins
import hashlib
import json
import math
import re

import pytest
import torch

from ernieq import api
from ernieq.eval import lastword
from ernieq.eval.tasks import MetricScore, TaskError, TaskScore, TaskSuite, compare_scores
from tests.eval.direct_tasks import direct_scores, examples as _examples
from tests.test_cli import run as run_cli

LIMIT = 6


def _metrics(result: dict, task: str) -> dict[str, dict]:
    (row,) = [t for t in result["tasks"] if t["task"] == task]
    return {m["metric"]: {**m, "samples": row["samples"]} for m in row["metrics"]}


@pytest.fixture
def offline_cache(tmp_path, monkeypatch, wikitext2_path):
    """A fresh ernieq cache and the WikiText-2 file beside the repository."""
    monkeypatch.setenv("ERNIEQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ERNIEQ_WIKITEXT2", str(wikitext2_path))
    return tmp_path / "cache"


# --- the offline task's examples ---------------------------------------------------------------

def test_lastword_examples_follow_the_documented_rules():
    long = " ".join(["word"] * 45)
    text = "\n".join([
        " = Heading with many words = " + long,  # a heading
        f" {long} ends in a word .",  # kept: the closing mark dropped
        f" {long} ends in a number 1984 .",  # last word not letters
        " too short to count .",  # under MIN_WORDS
        f" {long} ends in a word .",  # a duplicate
        f" {long} asks a question ?",
        f" {long} closes a quote \" .",  # a quote mark before the full stop
    ])
    records = lastword.lastword_records(text)
    assert sorted(r["target"] for r in records) == ["question", "word"]
    for r in records:
        assert r["text"] == f"{r['context']} {r['target']}" and r["text"].startswith("word word")
    digests = [hashlib.sha256(r["text"].encode()).digest() for r in records]
    assert digests == sorted(digests)


def test_lastword_on_wikitext2(wikitext2_path):
    from ernieq.text import load_text

    records = lastword.lastword_records(load_text(str(wikitext2_path)))
    assert len(records) > 1000  # 1,370 at build version 1
    assert len({r["text"] for r in records}) == len(records)
    for r in records:
        words = r["text"].split(" ")
        assert lastword.MIN_WORDS <= len(words) <= lastword.MAX_WORDS
        assert words[-1] == r["target"] and r["target"].isascii() and r["target"].isalpha()
        assert " ".join(words[:-1]) == r["context"]


def test_the_examples_are_built_once_per_source(tmp_path, offline_cache, wikitext2_path):
    path = lastword.build_lastword()
    assert path.parent == offline_cache / lastword.TASKS_CACHE
    first = path.read_bytes()
    assert lastword.build_lastword() == path and path.read_bytes() == first
    lines = [json.loads(line) for line in first.decode().splitlines()]
    assert lines == lastword.lastword_records(wikitext2_path.read_text(encoding="utf-8").replace("\r\n", "\n"))
    other = tmp_path / "other.txt"
    other.write_text(" ".join(["word"] * 50) + " .\n")
    assert lastword.build_lastword(str(other)) != path  # named by the source's hash


# --- lm-eval against a direct computation ------------------------------------------------------

def test_eval_tasks_accuracy_equals_a_direct_computation(demo_routed_dir, offline_cache, tmp_path, monkeypatch,
                                                         capsys):
    out = tmp_path / "tasks.json"
    code, _, err = run_cli(monkeypatch, capsys, "eval", demo_routed_dir, "--tasks", lastword.TASK_NAME,
                           "--limit", LIMIT, "--json", out, "--device", "cpu")
    assert code == 0, err
    got = _metrics(json.loads(out.read_text()), lastword.TASK_NAME)
    assert got["acc"]["samples"] == LIMIT
    records = _examples()[:LIMIT]  # lm-eval's first N
    model, tokenizer = api.load(demo_routed_dir, device="cpu")
    greedy, logprob = direct_scores(model, tokenizer, [(r["context"], " " + r["target"]) for r in records])
    assert got["acc"]["value"] == sum(greedy) / LIMIT
    assert got["perplexity"]["value"] == pytest.approx(math.exp(-sum(logprob) / LIMIT), rel=1e-5)
    assert got["acc"]["stderr"] is not None and got["perplexity"]["stderr"] is not None


def _greedy_examples(model, tokenizer, contexts: list[str]) -> list[dict]:
    """Examples the model gets right (its own greedy next token) and wrong (its second choice), alternately,
    kept only where the continuation tokenizes after the context as that one token."""
    examples = []
    for context in contexts:
        ids = tokenizer(context).input_ids
        with torch.inference_mode():
            ranked = model(input_ids=torch.tensor([ids])).logits[0, -1].argsort(descending=True)
        token = int(ranked[len(examples) % 2])
        continuation = tokenizer.decode([token])
        if tokenizer(context + continuation).input_ids == ids + [token]:
            examples.append({"context": context, "continuation": continuation})
    return examples


def test_a_task_yaml_over_local_data(demo_routed_dir, offline_cache, tmp_path, monkeypatch, capsys):
    """lm-eval's custom-task mechanism: a task file of the user's, its data a local JSON-lines file, given as a
    path and through --include-path. The examples are built so that the model gets some but not all right."""
    model, tokenizer = api.load(demo_routed_dir, device="cpu")
    contexts = [r["context"] for r in _examples()[:8]]
    examples = _greedy_examples(model, tokenizer, [" ".join(c.split(" ")[:24]) for c in contexts])
    assert len(examples) >= 2, "the examples alternate a hit and a miss"
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in examples))
    folder = tmp_path / "my_tasks"
    folder.mkdir()
    (folder / "my_next_token.yaml").write_text(
        "task: my_next_token\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "output_type: loglikelihood\ntest_split: test\n"
        'doc_to_text: "{{context}}"\ndoc_to_target: "{{continuation}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    greedy, _ = direct_scores(model, tokenizer, [(e["context"], e["continuation"]) for e in examples])
    assert 0 < sum(greedy) < len(greedy)
    for how in ((str(folder / "my_next_token.yaml"),), ("my_next_token", "--include-path", folder)):
        out = tmp_path / "out.json"
        code, _, err = run_cli(monkeypatch, capsys, "eval", demo_routed_dir, "--tasks", *how, "--json", out,
                               "--device", "cpu")
        assert code == 0, err
        passes = re.findall(r"lm-eval: forward passes of up to 1 requests: (\d+), ", err)  # a plain line in a pipe
        assert passes and int(passes[-1]) >= len(examples), err
        got = _metrics(json.loads(out.read_text()), "my_next_token")
        assert got["acc"]["samples"] == len(examples)
        assert got["acc"]["value"] == sum(greedy) / len(greedy)


# --- the task table's differences --------------------------------------------------------------

def _score(acc: list[float], ppl: float, ppl_se: float) -> list[TaskScore]:
    mean = sum(acc) / len(acc)
    se = math.sqrt(sum((a - mean) ** 2 for a in acc) / (len(acc) - 1) / len(acc))
    return [TaskScore("t", len(acc), 0, "1", (MetricScore("acc", mean, se, True, "mean", tuple(acc)),
                                              MetricScore("perplexity", ppl, ppl_se, False, "perplexity", ())))]


def test_differences_are_paired_for_means_and_independent_otherwise():
    base, q = [1.0, 1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 1.0, 1.0]
    rows = compare_scores({"baseline": _score(base, 10.0, 3.0), "quantized": _score(q, 14.0, 4.0)}, "baseline")
    acc, ppl = rows
    d = [b - a for a, b in zip(base, q)]  # 0, -1, 0, 0, +1
    assert acc["diff"]["quantized"] == pytest.approx(0.0)
    assert acc["diff_stderr"]["quantized"] == pytest.approx(math.sqrt(sum(x * x for x in d) / 4 / 5))
    assert acc["paired"]["quantized"] and not ppl["paired"]["quantized"]
    assert ppl["diff"]["quantized"] == 4.0 and ppl["diff_stderr"]["quantized"] == 5.0  # hypot(3, 4)
    assert acc["value"] == {"baseline": 0.6, "quantized": 0.6} and "baseline" not in acc["diff"]


# --- one-line errors ---------------------------------------------------------------------------

def _one_line_error(monkeypatch, capsys, *args) -> str:
    code, _, err = run_cli(monkeypatch, capsys, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error:"), err
    return lines[0]


def test_a_hub_task_offline_and_not_cached_is_one_line(demo_routed_dir, tmp_path, monkeypatch, capsys):
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))  # nothing cached
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    line = _one_line_error(monkeypatch, capsys, "eval", demo_routed_dir, "--tasks", "lambada_openai", "--device", "cpu")
    assert "lambada_openai" in line and "hub" in line and "cache" in line


def test_an_unknown_task_is_one_line(monkeypatch, capsys):
    line = _one_line_error(monkeypatch, capsys, "eval", "no-model-needed", "--tasks", "no_such_task_anywhere")
    assert "no_such_task_anywhere" in line and lastword.TASK_NAME in line


def test_a_missing_task_file_and_a_missing_lm_eval_are_one_line(monkeypatch, capsys, tmp_path):
    line = _one_line_error(monkeypatch, capsys, "eval", "demo", "--tasks", str(tmp_path / "nope.yaml"))
    assert "nope.yaml" in line
    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    with pytest.raises(TaskError, match=r"pip install 'ernieq\[tasks\]'"):
        TaskSuite((lastword.TASK_NAME,))
