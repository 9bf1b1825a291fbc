"""End-to-end tuning of the stored scales: the layer-by-layer gradient is the whole graph's; tuned scales are
kept only where they lower the held-out KL; a rerun of the same pass reads back what was kept."""

from __future__ import annotations

import pytest
import torch

from ernieq.calibration import collect_stats
from ernieq.calibration.layerwise import LayerwiseModel
from ernieq.calibration.sequential import SequentialPlan
from ernieq.calibration.tune import TuneSettings
import ernieq.calibration.tune_model as e2e
from ernieq.calibration.tune_model import ModelTuneSettings, _gradients, _graph_bytes, _kl, _Layer, tune_model
from ernieq.calibration.tuned_store import TunedStore
from ernieq.codecs import decode
from ernieq.model.adapters import TensorClass
from tests.tiny import TINY_ERNIE, write_tiny_ernie


def _choose(name, info):
    if info.cls is TensorClass.ROUTED_EXPERT:
        return ("ccq2", {}), True  # rotated, as the native --bits 2 recipe stores them
    return ("wint4", {"group_size": 32, "symmetric": False}), False


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A tiny ERNIE MoE, its calibration tokens, and block tuning's results for it."""
    root = tmp_path_factory.mktemp("tune_model")
    src = write_tiny_ernie(root / "m")
    ids = torch.randint(0, TINY_ERNIE["vocab_size"], (8, 32), generator=torch.Generator().manual_seed(0))
    store = TunedStore(root / "tuned")
    plan = SequentialPlan(_choose, "gptq", tune=TuneSettings(steps=2), sink=store)
    collect_stats(src, ids, progress=False, sequential=plan)
    return src, ids, store, plan


@pytest.mark.parametrize("whole_graph", [False, True])
def test_the_layer_by_layer_gradient_is_the_whole_graphs(tuned, whole_graph):
    src, ids, store, plan = tuned
    model = LayerwiseModel(src)
    model.load_outer()
    layers = [_Layer(model, i, store, plan) for i in range(model.num_layers)]
    params = [p for layer in layers for tu in layer.tuners.values() for p in tu.parameters()]
    assert params and any(n.endswith("down_proj.weight") for layer in layers for n in layer.tuners)
    batch = ids[:2]
    teacher = torch.randn(*batch.shape, TINY_ERNIE["vocab_size"], generator=torch.Generator().manual_seed(1))
    loss = _gradients(model, layers, batch, teacher, whole_graph)
    ours = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    with torch.enable_grad():  # every layer in one graph
        h = model.enter(batch)[0]
        for layer in layers:
            h = layer.run(h, grad=True)
        whole = _kl(model.logits(model.leave(h)), teacher) / batch.numel()
        whole.backward()
    assert loss == pytest.approx(whole.item(), rel=1e-6)
    assert sum(float(g.abs().sum()) for g in ours) > 0
    for g, p in zip(ours, params):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6 * float(p.grad.abs().max()) + 1e-12)


def test_the_whole_graph_is_kept_only_where_it_fits(tuned, tmp_path, monkeypatch, caplog):
    """The kept graph and the layer-by-layer backward tune to the same scales; which one runs follows the
    measured size of one layer's graph."""
    src, ids, store, plan = tuned
    model = LayerwiseModel(src)
    model.load_outer()
    layer = _Layer(model, 1, store, plan)
    assert layer.tuners and _graph_bytes(layer, model.enter(ids[:2])[0]) > 0
    ids = ids[:1].repeat(ids.shape[0], 1)  # held-out sequences as the training ones: the KL falls, tuned is kept
    settings = ModelTuneSettings(steps=3, lr=0.005, batch_seqs=2)
    results, default = {}, e2e.GRAPH_SHARE
    for share in (default, 0.0):
        monkeypatch.setattr(e2e, "GRAPH_SHARE", share)
        caplog.clear()
        with caplog.at_level("INFO", logger="ernieq.calibration.tune_model"):
            kept, _ = tune_model(src, store, plan, ids, settings, torch.device("cpu"),
                               tmp_path / str(share), "run-1", False)
        assert ("kept for each step" in caplog.text) == (share > 0)
        assert kept is not store
        results[share] = {n: decode(kept.get(n)) for n in store._file_of}
    for n, w in results[0.0].items():
        torch.testing.assert_close(results[default][n], w, rtol=0, atol=0)


# a small step on sequences that repeat one (the held-out ones are the training ones: the KL falls), and a step
# too large for the scales (it rises)
@pytest.mark.parametrize("lr, repeat, choice", [(0.005, True, "tuned"), (2.0, False, "start")])
def test_tuned_scales_are_kept_only_where_they_lower_the_held_out_kl(tuned, tmp_path, lr, repeat, choice):
    src, ids, store, plan = tuned
    if repeat:
        ids = ids[:1].repeat(ids.shape[0], 1)
    settings = ModelTuneSettings(steps=8, lr=lr, batch_seqs=2)
    kept, report = tune_model(src, store, plan, ids, settings, torch.device("cpu"), tmp_path / "m", "run-1", False)
    assert report is not None and report.kl_start > 0
    assert (report.kept == "tuned") == (report.kl_tuned < report.kl_start)
    assert report.kept == choice
    names = list(store._file_of)
    if report.kept == "tuned":
        assert kept is not store
        assert any(not torch.equal(decode(kept.get(n)), decode(store.get(n))) for n in names)
    else:
        assert kept is store
    assert kept.reports == store.reports  # block tuning's reports, layer by layer
    again, none = tune_model(src, store, plan, ids, settings, torch.device("cpu"), tmp_path / "m", "run-1", False)
    assert none is None  # read back, not run again
    assert all(torch.equal(decode(again.get(n)), decode(kept.get(n))) for n in names)
    _, other = tune_model(src, store, plan, ids, settings, torch.device("cpu"), tmp_path / "m", "run-2", False)
    assert other is not None  # another pass's results: tuned again


def test_a_stopped_run_resumes_after_its_last_step_to_the_same_scales(tuned, tmp_path, monkeypatch, caplog):
    """Stopped after its third step, the rerun takes back the saved scales, draws the same batches and ends
    where an uninterrupted run does; a finished run leaves no step behind."""
    src, ids, store, plan = tuned
    ids = ids[:1].repeat(ids.shape[0], 1)  # the held-out KL falls: the tuned scales are what is kept
    settings = ModelTuneSettings(steps=5, lr=0.005, batch_seqs=2)
    whole, _ = tune_model(src, store, plan, ids, settings, torch.device("cpu"), tmp_path / "whole", "run-1", False)
    saves = []

    def stop(point):
        saves.append(point)
        if len(saves) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(e2e, "kill_point", stop)
    with pytest.raises(KeyboardInterrupt):
        tune_model(src, store, plan, ids, settings, torch.device("cpu"), tmp_path / "m", "run-1", False)
    assert len(list((tmp_path / "m").glob(e2e.STEP_GLOB))) == 2  # steps 2 and 3
    with caplog.at_level("INFO", logger="ernieq.calibration.tune_model"):
        kept, report = tune_model(src, store, plan, ids, settings, torch.device("cpu"), tmp_path / "m", "run-1",
                                  False)
    assert "resuming after step 3 of 5" in caplog.text and report.kept == "tuned"
    assert all(torch.equal(decode(kept.get(n)), decode(whole.get(n))) for n in store._file_of)
    assert any(not torch.equal(decode(kept.get(n)), decode(store.get(n))) for n in store._file_of)
    assert not list((tmp_path / "m").glob(e2e.STEP_GLOB))
