"""Streamed models (one decoder layer resident at a time) compute what resident ones do.

Shape legend: W windows, L tokens per window, V vocabulary.
"""

from __future__ import annotations

import json
import logging
import random
import string

import pytest
import torch
from click.testing import CliRunner

from ernieq import api
from ernieq.cli import cli
from ernieq.device import Placement
from ernieq.errors import ErnieqError
from ernieq.eval.report import score_corpus
from ernieq.eval.perplexity import tokenize_text
from ernieq.runtime import stream as stream_module
from ernieq.runtime.stream import RESIDENT, STREAMED, StreamedLM, stream_plan
from tests.tiny import write_char_tokenizer, write_tiny_ernie

SHAPES = dict(hidden_size=128, moe_intermediate_size=128, intermediate_size=256)  # ccq2 takes K, N multiples of 128
SEQ_LEN, WINDOWS = 24, 3
REL = 1e-5  # float32, the same operations in another order of layers and windows


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny plain ERNIE MoE with a tokenizer, its --bits 2 (wint8, wint4 and rotated ccq2) and --bits 4
    checkpoints, and a text file to score."""
    root = tmp_path_factory.mktemp("stream")
    plain = write_tiny_ernie(root / "plain", **SHAPES)
    write_char_tokenizer(plain)
    out = {"plain": plain}
    for bits in (2, 4):
        out[f"q{bits}"] = root / f"q{bits}"
        api.quantize(plain, out[f"q{bits}"], bits=bits, w4_moe_layers=1, progress=False)
    rng = random.Random(0)
    text = root / "text.txt"
    text.write_text("".join(rng.choice(string.ascii_letters + " .,") for _ in range(SEQ_LEN * WINDOWS + 5)))
    return out, text


@pytest.mark.parametrize("which", ["plain", "q2", "q4"])
def test_streamed_perplexity_equals_resident(models, which):
    paths, text = models
    got = {s: api.evaluate(paths[which], str(text), seq_len=SEQ_LEN, max_windows=WINDOWS, progress=False,
                           device="cpu", stream=s) for s in (True, False)}
    assert got[True].windows == WINDOWS
    assert got[True].ppl == pytest.approx(got[False].ppl, rel=REL)
    assert got[True].runtime["stream"]["path"] == STREAMED and got[True].runtime["stream"]["choice"] == "--stream"
    assert got[False].runtime["stream"]["path"] == RESIDENT
    if which != "plain":  # the decode cache held one layer's modules at a time, each once
        assert got[True].runtime["kernels"].endswith(", one layer at a time")


@pytest.mark.parametrize("which", ["plain", "q2"])
def test_streamed_logits_equal_resident_with_one_layer_resident(models, which):
    paths, _ = models
    streamed, _ = api.load(paths[which], device="cpu", stream=True)
    resident, _ = api.load(paths[which], device="cpu", stream=False)
    assert isinstance(streamed, StreamedLM)
    resident_layers = []

    def count(module, args):
        layers = streamed.layers.layers
        resident_layers.append(sum(not next(layer.parameters()).is_meta for layer in layers))

    for layer in streamed.layers.layers:
        layer.register_forward_pre_hook(count)
    ids = torch.randint(0, 96, (2, 17), generator=torch.Generator().manual_seed(3))  # [W, L]
    with torch.no_grad():
        want = resident(ids).logits  # [W, L, V]
    torch.testing.assert_close(streamed(ids), want, rtol=1e-5, atol=1e-5)
    assert resident_layers == [1] * streamed.layers.num_layers  # both windows through each layer, one layer held
    assert all(p.is_meta for p in streamed.layers.layers.parameters())  # released after the pass


@pytest.mark.parametrize("which", ["plain", "q2"])
def test_streamed_generation_equals_resident(models, which):
    paths, _ = models
    got = {s: api.generate(paths[which], "Abc de", max_new_tokens=6, device="cpu", stream=s) for s in (True, False)}
    assert got[True] == got[False]
    assert len(got[True]) > len("Abc de")


def test_report_scores_streamed_models_as_resident_ones(models):
    paths, text = models
    tokenizer = api.load_tokenizer(paths["plain"])
    ids = tokenize_text(tokenizer, text.read_text())
    scores = {}
    for s in (True, False):
        nets = {label: api.load(paths[which], device="cpu", stream=s)[0]
                for label, which in (("baseline", "plain"), ("quantized", "q2"), ("q4", "q4"))}
        scores[s] = score_corpus(nets, ids, "text", SEQ_LEN, WINDOWS, progress=False)
    for field in ("ppl", "kl_mean", "top1_agreement"):
        assert getattr(scores[True], field) == pytest.approx(getattr(scores[False], field), rel=1e-4, abs=1e-7)


def test_auto_streams_when_the_weights_exceed_half_the_available_memory(models, monkeypatch, caplog):
    paths, _ = models
    cpu = Placement.resolve("cpu", "float32")
    need = stream_module.weight_bytes(paths["plain"], cpu, quantized=False)
    monkeypatch.setattr(stream_module, "available_memory", lambda device: 2 * need - 2)
    assert stream_plan(paths["plain"], cpu, None, quantized=False).streamed
    monkeypatch.setattr(stream_module, "available_memory", lambda device: 2 * need)
    assert not stream_plan(paths["plain"], cpu, None, quantized=False).streamed
    monkeypatch.setattr(stream_module, "available_memory", lambda device: 0)
    with caplog.at_level(logging.INFO, logger="ernieq"):
        net, _ = api.load(paths["q2"], device="cpu")
    assert isinstance(net, StreamedLM)
    assert "one decoder layer resident at a time: its weights" in caplog.text
    assert net.stream_plan.weight_bytes == stream_module.weight_bytes(paths["q2"], cpu, quantized=True)


def test_lm_eval_tasks_on_a_streamed_model_are_a_one_line_error(models):
    paths, _ = models
    with pytest.raises(ErnieqError, match=r"^lm-eval tasks need the whole model resident.*--no-stream"):
        api.evaluate_tasks(paths["plain"], ("wikitext2_lastword",), device="cpu", stream=True)


def test_eval_cli_records_the_stream_plan(models, tmp_path):
    paths, text = models
    out = tmp_path / "r.json"
    result = CliRunner().invoke(cli, ["eval", str(paths["q4"]), "--data", str(text), "--seq-len", str(SEQ_LEN),
                                      "--max-windows", "1", "--device", "cpu", "--stream", "--json", str(out)])
    assert result.exit_code == 0, result.output
    stream = json.loads(out.read_text())["runtime"]["stream"]
    assert stream["path"] == STREAMED and stream["weight_bytes"] > 0
