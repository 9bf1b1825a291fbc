"""``ernieq bench MODEL --baseline MODEL``: every figure of the JSON and how they relate (no timed assertions),
the decode loop against transformers' own greedy generation, and one-line errors for what cannot run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ernieq import api
from ernieq.bench import model as bench_model
from ernieq.bench.model import (COMPILED, CPU_LABEL, EAGER, STREAMED, ModelBenchOptions, _Run, _StreamedRun,
                                check_positions, measure, weight_bytes)
from ernieq.device import HOST
from ernieq.errors import ErnieqError
from tests.test_cli import run
from tests.tiny import tiny_ernie_model, write_tiny_ernie

BATCHES, PROMPT, NEW = (1, 3), 8, 3
ROW_FIELDS = {"model", "batch", "prompt_len", "new_tokens", "prefill_s", "decode_s", "prefill_tokens_per_s",
              "decode_tokens_per_s", "peak_memory_bytes", "weight_bytes", "decode", "kernels", "note"}
RATIO_FIELDS = {"model", "baseline", "batch", "prefill_tokens_per_s", "decode_tokens_per_s", "peak_memory_bytes", "weight_bytes"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_model")
    src = write_tiny_ernie(root / "src")
    api.quantize(src, root / "w8", bits=8, progress=False, workers=1)
    return src, root / "w8"


@pytest.fixture(scope="module")
def measured(models, tmp_path_factory):
    src, w8 = models
    out = tmp_path_factory.mktemp("bench_json") / "bench.json"
    result = api.bench_model(w8, src, batches=BATCHES, prompt_len=PROMPT, new_tokens=NEW, json_path=out,
                             device="cpu")
    return result, json.loads(out.read_text())


def test_json_has_every_figure_for_model_and_baseline(measured, models):
    result, data = measured
    src, w8 = models
    assert data["settings"]["batches"] == list(BATCHES)
    assert (data["settings"]["prompt_len"], data["settings"]["new_tokens"]) == (PROMPT, NEW)
    assert data["settings"]["static_kv_cache"] is True and data["settings"]["peak_memory"].startswith("peak RSS")
    assert data["settings"]["label"] == CPU_LABEL == result.report.banner
    assert [(m["role"], m["name"]) for m in data["models"]] == [("model", str(w8)), ("baseline", str(src))]
    for m in data["models"]:
        assert m["runtime"]["device"] == "cpu" and m["runtime"]["dtype"] == "float32"
        assert [r["batch"] for r in m["rows"]] == list(BATCHES)
        for r in m["rows"]:
            assert set(r) == ROW_FIELDS, r
            assert r["decode"] == "eager" and r["note"] == ""
            assert r["prefill_s"] > 0 and r["decode_s"] > 0
            assert math.isclose(r["prefill_tokens_per_s"], r["batch"] * PROMPT / r["prefill_s"])
            assert math.isclose(r["decode_tokens_per_s"], r["batch"] * NEW / r["decode_s"])
            assert r["weight_bytes"] == m["weight_bytes"] < r["peak_memory_bytes"]  # RSS holds the weights
    model, baseline = data["models"]
    assert model["rows"][0]["kernels"].startswith("reference, decode cache") and baseline["rows"][0]["kernels"] == "torch"
    assert model["weight_bytes"] < 0.5 * baseline["weight_bytes"]  # int8 against float32 (norms, router kept)
    assert [r["batch"] for r in data["ratios"]] == list(BATCHES)
    for ratio, a, b in zip(data["ratios"], model["rows"], baseline["rows"], strict=True):
        assert set(ratio) == RATIO_FIELDS
        assert (ratio["model"], ratio["baseline"]) == (str(w8), str(src))
        for key in RATIO_FIELDS - {"model", "baseline", "batch"}:
            assert math.isclose(ratio[key], a[key] / b[key]), key


def test_table_has_a_row_per_model_and_batch_and_the_ratios(measured, models):
    result, _ = measured
    src, w8 = models
    names = [row.cells()[0] for row in result.report.rows]
    assert len(names) == 3 * len(BATCHES) and names[-len(BATCHES):] == [f"{w8} / {src}"] * len(BATCHES)
    assert all(len(row.cells()) == len(result.report.columns) for row in result.report.rows)
    assert f"| {w8} / {src} | 1 |" in result.report.markdown()


def test_the_timed_decode_continues_the_prompt_as_greedy_generation_does():
    net = tiny_ernie_model()
    run_ = _Run(net, 2, ModelBenchOptions(prompt_len=PROMPT, new_tokens=4), HOST)
    with torch.inference_mode():
        run_(net, 4)
        want = net.generate(run_.prompt, max_new_tokens=5, do_sample=False, min_new_tokens=5)[:, PROMPT:]  # [B, 5]
    assert torch.equal(run_.tokens, want)


def test_a_streamed_model_decodes_what_the_resident_one_does_and_says_it_streamed(models, tmp_path, monkeypatch,
                                                                                  capsys):
    src, w8 = models
    resident, streamed = (api.load_model(src, device="cpu", stream=s) for s in (False, True))
    options = ModelBenchOptions(prompt_len=PROMPT, new_tokens=4)
    runs = _Run(resident, 2, options, HOST), _StreamedRun(streamed, 2, options, HOST)
    with torch.inference_mode():
        for run_, net in zip(runs, (resident, streamed)):
            run_(net, 4)
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    rows = measure("tiny", streamed, ModelBenchOptions(batches=(1, 2), prompt_len=4, new_tokens=2), HOST)
    assert [r.decode for r in rows] == [STREAMED] * 2 and rows[0].weight_bytes == streamed.stream_plan.weight_bytes
    with pytest.raises(ErnieqError, match="--compile needs the model resident"):
        measure("tiny", streamed, ModelBenchOptions(batches=(1,), prompt_len=4, new_tokens=2, compile=True), HOST)
    out = tmp_path / "bench.json"
    code, _, err = run(monkeypatch, capsys, "bench", str(w8), "--stream", "--batch", "1", "--prompt-len", "4",
                       "--new-tokens", "2", "--json", str(out))
    assert code == 0, err
    (model,) = json.loads(out.read_text())["models"]
    assert model["runtime"]["stream"]["path"] == "streamed" and model["rows"][0]["decode"] == STREAMED
    assert model["rows"][0]["kernels"].endswith("one layer at a time")


class _NestedConfigModel(torch.nn.Module):
    """What _Run reads of a multimodal model: a config whose vocab_size sits in its text_config only."""

    def __init__(self):
        from transformers import LlavaConfig

        super().__init__()
        self.config = LlavaConfig(text_config={"model_type": "llama", "vocab_size": 7, "hidden_size": 16,
                                               "num_hidden_layers": 1, "num_attention_heads": 2,
                                               "num_key_value_heads": 2, "max_position_embeddings": 16})


def test_a_nested_config_gives_the_text_models_vocabulary_and_positions():
    net = _NestedConfigModel()
    assert not hasattr(net.config, "vocab_size")  # the top level has none to read
    run_ = _Run(net, 3, ModelBenchOptions(prompt_len=64, new_tokens=2), HOST)
    assert run_.prompt.shape == (3, 64) and set(run_.prompt.unique().tolist()) == set(range(7))
    config = net.config.to_dict()
    assert "max_position_embeddings" not in config and config["text_config"]["max_position_embeddings"] == 16
    with pytest.raises(ErnieqError, match="is more than its max_position_embeddings 16"):
        check_positions("nested", config, ModelBenchOptions(prompt_len=12, new_tokens=8))
    check_positions("nested", config, ModelBenchOptions(prompt_len=8, new_tokens=8))  # fits


def test_a_failed_compile_decodes_eagerly_and_says_so_unless_compiling_was_asked_for(monkeypatch):
    def broken(**inputs):
        raise RuntimeError("no graph today")

    monkeypatch.setattr(bench_model, "_decode_step", lambda net, compile: (broken, COMPILED))
    net = tiny_ernie_model()
    rows = measure("tiny", net, ModelBenchOptions(batches=(1, 2), prompt_len=4, new_tokens=2), HOST)
    assert [(r.decode, r.note) for r in rows] == [(EAGER, "torch.compile failed (RuntimeError): eager")] * 2
    with pytest.raises(RuntimeError, match="no graph today"):
        measure("tiny", net, ModelBenchOptions(batches=(1,), prompt_len=4, new_tokens=2, compile=True), HOST)


def test_weight_bytes_count_tied_embeddings_once():
    net = tiny_ernie_model()
    assert net.config.tie_word_embeddings
    params = sum(p.numel() * p.element_size() for p in net.parameters())  # parameters() yields a tied one once
    buffers = sum(b.numel() * b.element_size() for b in net.buffers())
    assert weight_bytes(net) == params + buffers


@pytest.mark.parametrize("args, message", [
    (["--batch", "0"], "--batch takes batch sizes >= 1"),
    (["--prompt-len", "250", "--new-tokens", "8"], "max_position_embeddings 256"),
    (["--quick"], "--quick: options of --kernels only"),
    (["--kernels"], "not both"),
])
def test_what_cannot_run_is_one_line(models, monkeypatch, capsys, args, message):
    code, _, err = run(monkeypatch, capsys, "bench", models[0], *args)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and message in lines[0], err


def test_bench_needs_a_model_or_kernels(monkeypatch, capsys):
    code, _, err = run(monkeypatch, capsys, "bench", "--baseline", "demo")
    assert code == 1 and "give a MODEL (whole-model throughput) or --kernels" in err
    code, _, err = run(monkeypatch, capsys, "bench", "--kernels", "--baseline", "demo")
    assert code == 1 and "--baseline: options of a MODEL's benchmark, not of --kernels" in err
