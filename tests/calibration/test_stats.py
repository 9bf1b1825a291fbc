"""Calibration statistics on disk: exact round trip, interrupted writes refused."""

import json

import pytest
import torch

from ernieq.calibration import StatsError, collect_stats, load_stats, save_stats
from ernieq.calibration.stats import SUMMARY_NAME, TENSORS_NAME
from tests.tiny import TINY_ERNIE, write_tiny_ernie


@pytest.fixture(scope="module")
def cset(tmp_path_factory):
    path = write_tiny_ernie(tmp_path_factory.mktemp("tiny") / "m", "fused")
    ids = torch.randint(0, TINY_ERNIE["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1))
    return collect_stats(path, ids, all_experts=True, progress=False)


def test_round_trip_is_exact(cset, tmp_path):
    save_stats(cset, tmp_path)
    back = load_stats(tmp_path)
    assert back.summary() == cset.summary()
    assert sorted(back.sites) == sorted(cset.sites)
    for site, s in cset.sites.items():
        b = back.sites[site]
        assert b.tokens == s.tokens
        for field in ("hessian", "abs_mean", "abs_max"):
            assert torch.equal(getattr(b, field), getattr(s, field)), (site, field)
    for name in cset.weight_names():
        assert back.site_of(name) == cset.site_of(name)
    assert sorted(back.routers) == sorted(cset.routers)
    assert back.experts == cset.experts


def test_saving_twice_replaces_and_leaves_no_temporary_files(cset, tmp_path):
    save_stats(cset, tmp_path)
    save_stats(cset, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([SUMMARY_NAME, TENSORS_NAME])
    load_stats(tmp_path)


def test_interrupted_write_is_refused(cset, tmp_path):
    save_stats(cset, tmp_path)
    (tmp_path / SUMMARY_NAME).unlink()  # a crash between the two renames
    with pytest.raises(StatsError, match="missing"):
        load_stats(tmp_path)


def test_files_of_different_runs_are_refused(cset, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    save_stats(cset, a)
    save_stats(cset, b)
    (a / SUMMARY_NAME).write_text((b / SUMMARY_NAME).read_text())
    with pytest.raises(StatsError, match="different runs"):
        load_stats(a)


def test_corrupt_files_are_named(cset, tmp_path):
    save_stats(cset, tmp_path)
    (tmp_path / TENSORS_NAME).write_bytes(b"\x00" * 4)
    with pytest.raises(StatsError, match=TENSORS_NAME):
        load_stats(tmp_path)
    (tmp_path / SUMMARY_NAME).write_text("{not json")
    with pytest.raises(StatsError, match=SUMMARY_NAME):
        load_stats(tmp_path)
    (tmp_path / SUMMARY_NAME).write_text(json.dumps({"version": 99}))
    with pytest.raises(StatsError, match="version"):
        load_stats(tmp_path)
