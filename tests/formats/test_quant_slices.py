"""Cutting quantized weights along N and K is exact on the stored tensors, and joining undoes it."""

import pytest
import torch

from ernieq.codecs import decode, get_codec
from ernieq.errors import ErnieqError
from ernieq.formats.quant_slices import (
    cat_k,
    cat_n,
    k_multiple,
    slice_k,
    slice_n,
    split_k,
    split_n,
)

CODECS = [
    ("wint8", {}),
    ("wint4", {"group_size": None}),
    ("wint4", {"group_size": 32, "symmetric": False}),
    ("ccq2", {"grid_candidates": 1, "scale_steps": 0, "refine_steps": 0}),
]


def _q(codec, params, n, k, seed=0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    return get_codec(codec, **params).encode(w)


def _equal(a, b):
    return (a.codec, a.shape, a.params) == (b.codec, b.shape, b.params) and a.tensors.keys() == b.tensors.keys() \
        and all(torch.equal(a.tensors[n], b.tensors[n]) for n in a.tensors)


@pytest.mark.parametrize("codec, params", CODECS)
@pytest.mark.parametrize("n, k", [(12, 256), (7, 384)])
def test_cuts_decode_to_the_cut_weight_and_join_back(codec, params, n, k):
    q = _q(codec, params, n, k)
    w = decode(q)
    assert torch.equal(decode(slice_n(q, 2, 5)), w[2:5])
    step = k_multiple(q)
    stop = min(3 * step, k)
    assert torch.equal(decode(slice_k(q, step, stop)), w[:, step:stop])
    pieces = split_n(q, [3, n - 5, 2])
    assert _equal(cat_n(pieces), q)
    pieces = split_k(q, 2 if (k // step) % 2 == 0 else 3)  # ccq2 at K = 384: three pieces of 128
    assert _equal(cat_k(pieces), q)
    assert torch.equal(torch.cat([decode(p) for p in pieces], dim=1), w)


def test_k_cuts_keep_whole_scale_groups():
    q = _q("ccq2", CODECS[3][1], 8, 384)
    assert k_multiple(q) == 128
    with pytest.raises(ErnieqError, match=r"cannot be cut at input features 64\.\.192 .* multiples of 128"):
        slice_k(q, 64, 192)
    with pytest.raises(ErnieqError, match=r"K=384 does not split into 5 equal parts"):
        split_k(q, 5)
    assert k_multiple(_q("wint4", {"group_size": 64}, 4, 128)) == 64
    assert k_multiple(_q("wint8", {}, 4, 128)) == 1


def test_joining_along_k_checks_the_per_channel_tensors():
    a, b = split_k(_q("wint8", {}, 4, 128), 2)
    b.tensors["scale"] = b.tensors["scale"] * 2
    with pytest.raises(ErnieqError, match=r"scale differs between pieces 0 and 1"):
        cat_k([a, b])
    with pytest.raises(ErnieqError, match=r"pieces of different codecs"):
        cat_n([a, _q("wint4", {"group_size": None}, 4, 64)])
    with pytest.raises(ErnieqError, match=r"cannot cut fp8"):
        slice_n(_q("fp8", {}, 128, 128), 0, 64)


@pytest.mark.parametrize("codec, params", CODECS)
def test_a_padded_last_piece_cuts_too(codec, params):
    """K not a multiple of the codec's step: the last piece keeps the padding and decodes to its columns."""
    q = _q(codec, params, 5, 200)
    step = k_multiple(q)
    start = 200 // step * step if 200 % step else 200 - step
    tail = slice_k(q, start, 200)
    assert torch.equal(decode(tail), decode(q)[:, start:])
    assert _equal(cat_k([slice_k(q, 0, start), tail]), q)
