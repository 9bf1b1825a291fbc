"""The fused dequant-GEMM against the reference (codec decode + matmul), every codec."""

from __future__ import annotations

import pytest
import torch

from ernieq.codecs import QuantizedTensor
from ernieq.kernels import KernelError, reference
from ernieq.kernels.configs import TileConfig
from ernieq.kernels.dequant_gemm import linear
from tests.kernels.cases import DENSE_CODECS, DEVICE, TOLERANCES, assert_close, encode, seeded as _seed

# (M, N, K): M in {1, 3, 16, 33}; N and K off the tile sizes, odd K (a padded wint4 byte),
# K with a partial last group / fp8 block / ccq2 64-row group (and byte: 331 in the split-K test).
SHAPES = [(1, 40, 200), (3, 70, 136), (16, 33, 64), (33, 24, 300)]
DTYPES = [torch.float32, torch.bfloat16]




@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("codec,params", DENSE_CODECS)
def test_linear_matches_reference(codec, params, m, n, k, dtype):
    gen = _seed(codec, str(params), m, n, k, str(dtype))
    q = encode(codec, params, n, k, gen)
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    assert_close(linear(x, q), reference.linear(x, q), TOLERANCES[dtype])


@pytest.mark.parametrize("codec,params", DENSE_CODECS)
def test_linear_odd_k_split_k_and_bias(codec, params):
    """Split-K (partial sums added after the kernel) with a bias, on an odd or ragged K."""
    gen = _seed(codec, str(params), "split")
    m, n, k = 3, 37, 331
    q = encode(codec, params, n, k, gen)
    x = torch.randn(m, k, generator=gen).to(DEVICE)
    bias = torch.randn(n, generator=gen).to(DEVICE)
    cfg = TileConfig(block_m=16, block_n=16, block_k=64, split_k=3)
    assert_close(linear(x, q, bias, config=cfg), reference.linear(x, q, bias), TOLERANCES[torch.float32])


def test_linear_non_contiguous_x_and_fused_bias():
    gen = _seed("strided")
    q = encode("wint4", {"group_size": 32, "symmetric": False}, 24, 96, gen)
    x = torch.randn(96, 5, generator=gen).to(DEVICE).T  # [5, 96], strides (1, 5)
    bias = torch.randn(24, generator=gen).to(DEVICE, torch.bfloat16)
    assert not x.is_contiguous()
    assert_close(linear(x, q, bias), reference.linear(x, q, bias), TOLERANCES[torch.float32])


def test_linear_empty_batch():
    q = encode("wint8", {}, 8, 32, _seed("empty"))
    y = linear(torch.empty(0, 32, device=DEVICE), q)
    assert y.shape == (0, 8)


def test_tolerance_catches_a_wrong_weight():
    """The comparison is not vacuous: one channel's scale off by 1% fails it."""
    gen = _seed("wrong")
    q = encode("wint8", {}, 16, 64, gen)
    x = torch.randn(4, 64, generator=gen).to(DEVICE)
    bad_scale = q.tensors["scale"].clone()
    bad_scale[3] *= 1.01
    bad = QuantizedTensor(q.codec, q.shape, {**q.tensors, "scale": bad_scale}, q.params)
    with pytest.raises(AssertionError):
        assert_close(linear(x, bad), reference.linear(x, q), TOLERANCES[torch.float32])


def test_linear_rejects_bad_arguments():
    q = encode("wint8", {}, 8, 32, _seed("bad"))
    with pytest.raises(KernelError, match="K=32"):
        linear(torch.randn(2, 31, device=DEVICE), q)
    with pytest.raises(KernelError, match="dtype"):
        linear(torch.randint(0, 3, (2, 32), device=DEVICE), q)
    broken = QuantizedTensor(q.codec, q.shape, {"qweight": q.tensors["qweight"]}, q.params)
    with pytest.raises(KernelError, match="scale"):
        linear(torch.randn(2, 32, device=DEVICE), broken)
    unknown = QuantizedTensor("nf4", q.shape, q.tensors, {})
    with pytest.raises(KernelError, match="no Triton kernel"):
        linear(torch.randn(2, 32, device=DEVICE), unknown)
