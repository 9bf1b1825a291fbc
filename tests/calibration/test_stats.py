"""Calibration statistics on disk: exact round trip, streamed layer by layer, read lazily,
interrupted writes refused."""

import errno
import gc
import json
import re
import weakref

import pytest
import torch
from safetensors.torch import save_file

from ernieq.calibration import StatsError, collect_stats, load_stats, save_stats
from ernieq.calibration import site_store
from ernieq.calibration.accumulate import SiteStats
from ernieq.calibration.site_store import FILE_GLOB, LazySiteStats, SiteStore
from ernieq.calibration.stats import SUMMARY_NAME, TENSORS_NAME
from tests.tiny import TINY_ERNIE, write_tiny_ernie

FIELDS = ("hessian", "abs_mean", "abs_max")


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_tiny_ernie(tmp_path_factory.mktemp("tiny") / "m", "fused")


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, TINY_ERNIE["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def cset(tiny_path, ids):
    return collect_stats(tiny_path, ids, all_experts=True, progress=False)


def _assert_same_sites(a, b):
    assert sorted(a.sites) == sorted(b.sites)
    for site in a.sites:
        assert a.sites[site].tokens == b.sites[site].tokens
        for field in FIELDS:
            assert torch.equal(getattr(a.sites[site], field), getattr(b.sites[site], field)), (site, field)


def _stats_files(folder):
    return sorted(p.name for p in folder.glob(FILE_GLOB))


def test_round_trip_is_exact(cset, tmp_path):
    save_stats(cset, tmp_path)
    back = load_stats(tmp_path)
    assert back.summary() == cset.summary()
    _assert_same_sites(back, cset)
    for name in cset.weight_names():
        assert back.site_of(name) == cset.site_of(name)
        s, b = cset.stats(name), back.stats(name)
        assert (s is None) == (b is None)
        if s is not None:
            assert torch.equal(s.hessian, b.hessian) and torch.equal(s.act_abs_mean, b.act_abs_mean)
    assert sorted(back.routers) == sorted(cset.routers)
    assert back.experts == cset.experts


def test_streamed_collection_equals_the_in_memory_one(cset, tiny_path, ids, tmp_path):
    streamed = collect_stats(tiny_path, ids, all_experts=True, progress=False, out=tmp_path)
    assert (tmp_path / SUMMARY_NAME).exists()
    assert len(_stats_files(tmp_path)) == TINY_ERNIE["num_hidden_layers"]  # one file per decoder layer
    for back in (streamed, load_stats(tmp_path)):
        _assert_same_sites(back, cset)
        drop = lambda s: {**s, "info": {k: v for k, v in s["info"].items() if k != "seconds"}}  # noqa: E731
        assert drop(back.summary()) == drop(cset.summary())


def test_streaming_keeps_one_layer_in_memory(tiny_path, ids, tmp_path, monkeypatch):
    flushed: list[set[int]] = []
    alive: list[weakref.ref] = []
    real_flush = SiteStore.flush

    def flush(self):
        layers = {int(re.search(r"layers\.(\d+)\.", site).group(1)) for site in self.pending}
        # every site held in memory is one of the current layer's; earlier layers' tensors are gone
        gc.collect()
        assert all(ref() is None for ref in alive)
        alive.extend(weakref.ref(self[site].hessian) for site in self.pending)
        if self.pending:
            flushed.append(layers)
        return real_flush(self)

    monkeypatch.setattr(SiteStore, "flush", flush)
    streamed = collect_stats(tiny_path, ids, all_experts=True, progress=False, out=tmp_path)
    assert flushed == [{i} for i in range(TINY_ERNIE["num_hidden_layers"])]
    assert all(isinstance(s, LazySiteStats) for s in streamed.sites.values())


def test_loading_reads_tensors_only_when_asked_and_keeps_none(cset, tmp_path):
    save_stats(cset, tmp_path)
    back = load_stats(tmp_path)
    site = sorted(back.sites)[0]
    lazy = back.sites[site]
    assert isinstance(lazy, LazySiteStats)
    first = lazy.hessian
    assert torch.equal(first, cset.sites[site].hessian) and lazy.k == first.shape[0]
    ref = weakref.ref(first)
    del first
    gc.collect()
    assert ref() is None  # nothing kept a reference: the next access reads the file again
    assert not any(isinstance(v, torch.Tensor) for v in vars(lazy).values())


def test_a_legacy_single_file_folder_still_loads(cset, tmp_path):
    tensors = {f"{site}::{f}": getattr(s, f) for site, s in cset.sites.items() for f in FIELDS}
    save_file(tensors, tmp_path / TENSORS_NAME, metadata={"run_id": "r1", "format": "ernieq-calibration"})
    (tmp_path / SUMMARY_NAME).write_text(json.dumps({**cset.summary(), "run_id": "r1"}))
    back = load_stats(tmp_path)
    _assert_same_sites(back, cset)
    save_stats(back, tmp_path / "copy")  # a lazy set saved elsewhere: copied file by file
    _assert_same_sites(load_stats(tmp_path / "copy"), cset)


def test_saving_twice_replaces_and_leaves_no_temporary_files(cset, tmp_path):
    save_stats(cset, tmp_path)
    save_stats(cset, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([SUMMARY_NAME, *_stats_files(tmp_path)])
    assert len(_stats_files(tmp_path)) == 1
    back = load_stats(tmp_path)
    save_stats(back, tmp_path)  # its own folder: only the summary is rewritten
    _assert_same_sites(load_stats(tmp_path), cset)


def test_interrupted_write_is_refused(cset, tmp_path):
    save_stats(cset, tmp_path)
    (tmp_path / SUMMARY_NAME).unlink()  # a crash before the summary
    with pytest.raises(StatsError, match="missing"):
        load_stats(tmp_path)


def test_files_of_different_runs_are_refused(cset, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    save_stats(cset, a)
    save_stats(cset, b)
    (a / SUMMARY_NAME).write_text((b / SUMMARY_NAME).read_text())
    with pytest.raises(StatsError, match="another calibration run"):
        load_stats(a)


def test_corrupt_files_are_named(cset, tmp_path):
    save_stats(cset, tmp_path)
    name = _stats_files(tmp_path)[0]
    (tmp_path / name).write_bytes(b"\x00" * 4)
    with pytest.raises(StatsError, match=name):
        load_stats(tmp_path)
    (tmp_path / SUMMARY_NAME).write_text("{not json")
    with pytest.raises(StatsError, match=SUMMARY_NAME):
        load_stats(tmp_path)
    (tmp_path / SUMMARY_NAME).write_text(json.dumps({"version": 99}))
    with pytest.raises(StatsError, match="version"):
        load_stats(tmp_path)


def test_a_full_disk_while_streaming_names_the_file_and_leaves_no_summary(tiny_path, ids, tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(site_store, "save_file", full)
    with pytest.raises(StatsError, match=r"stats-00000\.safetensors.*No space left"):
        collect_stats(tiny_path, ids, progress=False, out=tmp_path)
    assert not (tmp_path / SUMMARY_NAME).exists() and not list(tmp_path.glob(".*tmp"))


def test_quantizing_from_streamed_statistics_gives_the_same_checkpoint(cset, tiny_path, tmp_path):
    from ernieq.model.checkpoint import CheckpointReader
    from ernieq.quantize import run_quantize

    save_stats(cset, tmp_path / "stats")
    outs = {"memory": cset, "disk": load_stats(tmp_path / "stats")}
    for key, calib in outs.items():
        run_quantize(tiny_path, tmp_path / key, calib=calib, method="gptq", bits=4, group_size=32, progress=False,
                     workers=1)
    a, b = CheckpointReader(tmp_path / "memory"), CheckpointReader(tmp_path / "disk")
    assert sorted(a.keys()) == sorted(b.keys())
    for name in a.keys():
        assert torch.equal(a.get(name), b.get(name)), name
    assert isinstance(cset.sites[sorted(cset.sites)[0]], SiteStats)
