"""The decode cache: decoded once, the same outputs as the uncached reference path, the budget kept.

Shape legend: T tokens, E experts, A active experts per token, H hidden size, I expert intermediate size.
"""

from __future__ import annotations

import functools
import gc

import pytest
import torch

from ernieq import api, kernels
from ernieq.codecs import get_codec, stack_experts
from ernieq.device import HOST
from ernieq.errors import ErnieqError
from ernieq.runtime import decode_cache as dc
from ernieq.runtime.loader import load_quantized
from ernieq.runtime.modules import QuantLinear, QuantMoEExperts
from ernieq.runtime.record import kernel_path
from ernieq.transforms import make_rotation
from tests.tiny import write_tiny_ernie

# ccq2 needs K and N multiples of 128 ... and a rotated 2-bit recipe puts every codec in play
SHAPES = dict(hidden_size=128, moe_intermediate_size=128, intermediate_size=256)


@pytest.fixture(scope="module")
def q2(tmp_path_factory):
    """A tiny 2-bit checkpoint (wint8, wint4 and ccq2 modules, rotated: the native default)."""
    root = tmp_path_factory.mktemp("dc")
    src = write_tiny_ernie(root / "src", **SHAPES)
    api.quantize(src, root / "q", bits=2, w4_moe_layers=1, progress=False)
    return root / "q"


@pytest.fixture
def cache(monkeypatch):
    """A fresh process-wide cache for one test: cache(spec) sets its budget and returns it."""

    def make(spec):
        fresh = dc.DecodeCache(spec)
        monkeypatch.setattr(dc, "_CACHE", fresh)
        return fresh

    monkeypatch.delenv("ERNIEQ_KERNELS", raising=False)
    return make


def _ids(t: int = 7) -> torch.Tensor:
    return torch.randint(0, 96, (1, t), generator=torch.Generator().manual_seed(5))


def _quantized(model) -> list:
    return [m for m in model.modules() if isinstance(m, (QuantLinear, QuantMoEExperts))]


@pytest.mark.parametrize("spec, limit", [("auto", None), ("AUTO", None), (None, None), ("off", 0), ("0", 0),
                                         ("1.5", 3 * 2**29), (2, 2 * 2**30)])
def test_decode_cache_sizes(spec, limit):
    assert dc.parse_decode_cache(spec) == limit


@pytest.mark.parametrize("spec", ["lots", "-1", "nan", "inf"])
def test_bad_decode_cache_is_one_line(spec):
    with pytest.raises(ErnieqError, match=rf"^--decode-cache {spec}: "):
        dc.parse_decode_cache(spec)


def test_cached_model_computes_what_the_uncached_reference_path_does(q2, cache):
    cache("off")
    model = load_quantized(q2)
    with torch.no_grad():
        want = model(_ids()).logits
    assert kernel_path(model, HOST) == "reference, decode cache off"
    assert all(m.cached_bytes == 0 for m in _quantized(model))
    budget = cache("auto")
    with torch.no_grad():
        first = model(_ids()).logits  # decodes
        again = model(_ids()).logits  # from the cache
    mods = _quantized(model)
    assert all(m.cached_bytes > 0 for m in mods)
    assert {m.packed.codec for m in mods if isinstance(m, QuantLinear)} == {"wint8"}
    assert {m.gate.codec for m in mods if isinstance(m, QuantMoEExperts)} == {"wint4", "ccq2"}
    torch.testing.assert_close(first, want, rtol=1e-5, atol=1e-5)  # rotations folded: float rounding only
    assert torch.equal(first, again)
    held = budget.budgets[HOST]
    assert held.used == sum(m.cached_bytes for m in mods) and held.modules == len(mods)
    assert kernel_path(model, HOST).startswith(f"reference, decode cache 0.00 GiB: {len(mods)} of {len(mods)} modules")


def test_a_small_budget_caches_the_first_modules_in_forward_order(q2, cache):
    model = load_quantized(q2)
    mods = _quantized(model)
    sizes = [sum(4 * torch.Size(s).numel() for s in m.decoded_shapes()) for m in mods]  # float32 bytes
    order = []
    hooks = [m.register_forward_pre_hook(lambda m, args: order.append(m) if m not in order else None) for m in mods]
    budget = cache(sum(sorted(sizes)[:3]) / 2**30)  # room for three of the smallest, never for all
    with torch.no_grad():
        model(_ids())
    for h in hooks:
        h.remove()
    cached = [m for m in order if m.cached_bytes]
    assert 0 < len(cached) < len(mods)
    assert budget.budgets[HOST].used == sum(m.cached_bytes for m in cached) <= budget.limit_bytes
    room, expected = budget.limit_bytes, []
    for m in order:  # first come, first served: each module that still fits, in the order they ran
        need = sizes[mods.index(m)]
        if need <= room:
            expected.append(m)
            room -= need
    assert cached == expected
    with torch.no_grad():
        model(_ids())
    assert [m for m in order if m.cached_bytes] == cached  # the same modules on every call


def test_freed_modules_give_their_bytes_back(q2, cache):
    budget = cache("auto")
    model = load_quantized(q2)
    with torch.no_grad():
        model(_ids())
    assert budget.budgets[HOST].used > 0
    del model
    gc.collect()
    assert budget.budgets[HOST].used == 0 and budget.budgets[HOST].modules == 0


def test_off_and_the_triton_path_cache_nothing(q2, cache, monkeypatch):
    budget = cache("off")
    model = load_quantized(q2)
    with torch.no_grad():
        model(_ids())
    assert all(m.cached_bytes == 0 for m in _quantized(model)) and not budget.budgets
    cache("auto")
    monkeypatch.setenv("ERNIEQ_KERNELS", "triton")
    x = torch.randn(3, SHAPES["hidden_size"])
    assert all(m.decoded_weights(x) is None for m in _quantized(model))  # the kernels decode in their loop
    assert kernel_path(model, HOST) == "triton"


def test_bfloat16_model_caches_bfloat16_weights(q2, cache):
    cache("auto")
    model = load_quantized(q2, dtype=torch.bfloat16)
    with torch.no_grad():
        got = model(_ids()).logits.float()
    assert {t.dtype for m in _quantized(model) for t in m._decoded} == {torch.bfloat16}
    cache("off")
    with torch.no_grad():
        want = load_quantized(q2)(_ids()).logits
    assert (got - want).abs().max() < 0.05 * want.abs().max()  # bfloat16 compute against float32


@pytest.mark.parametrize("activations, cached", [("dynamic", False), ("none", True)])
def test_w8a8_modules_quantize_their_inputs_on_every_call(tmp_path, cache, activations, cached):
    """fp8 W8A8 rounds each input per token and group: its modules stay on the uncached reference path."""
    src = write_tiny_ernie(tmp_path / "src", **SHAPES)
    api.quantize(src, tmp_path / "q", fp8=True, fp8_activations=activations, progress=False, workers=1)
    model = load_quantized(tmp_path / "q")
    cache("off")
    with torch.no_grad():
        want = model(_ids()).logits
    cache("auto")
    with torch.no_grad():
        got = model(_ids()).logits
    mods = _quantized(model)
    assert all(m.weight_only == cached and (m.cached_bytes > 0) == cached for m in mods)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


E, H, I = 6, 128, 128


@functools.cache
def _expert_stacks(codec: str) -> tuple:
    """gate, up (E, I, H) and down (E, H, I) of random weights in ``codec``, encoded once."""
    gen = torch.Generator().manual_seed(0)
    c = get_codec(codec, **({"group_size": 32} if codec == "wint4" else {}))
    return tuple(stack_experts([c.encode(torch.randn(n, k, generator=gen)) for _ in range(E)])
                 for n, k in ((I, H), (I, H), (H, I)))


@pytest.mark.parametrize("codec", ["ccq2", "wint4", "wint8"])
@pytest.mark.parametrize("t", [1, 5, 33])
def test_decoded_moe_matches_the_reference_moe(codec, t, cache):
    """Every expert layout, tokens that leave experts idle, and a rotation of down's input (folded)."""
    e, a, h, i = E, 2, H, I
    gen = torch.Generator().manual_seed(t)
    stacks = _expert_stacks(codec)
    rot_h, rot_i = make_rotation(h, 1), make_rotation(i, 2)
    module = QuantMoEExperts(*stacks, rot_h, rot_i)
    x = torch.randn(t, h, generator=gen)
    ids = torch.stack([torch.randperm(e - 1, generator=gen)[:a] for _ in range(t)])  # expert e-1 never chosen
    w = torch.rand(t, a, generator=gen)
    want = kernels.moe(rot_h.apply(x), ids, w, kernels.MoEWeights(*stacks, rot_i), backend="reference")
    cache("off")
    torch.testing.assert_close(module(x, ids, w), want)
    cache("auto")
    got = module(x, ids, w)
    assert module.cached_bytes == 4 * e * 3 * h * i
    assert (got - want).abs().max() <= 2e-6 * want.abs().max()  # float32, rotations folded: rounding only
