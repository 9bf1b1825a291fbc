"""Shared cases for the kernel tests: codecs under test, random weights, tolerances.

Shape legend: M rows of x, K input features, N output features, E experts.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from ernieq.codecs import QuantizedTensor, get_codec, stack_experts

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


# The ccq2 encoder searches (seconds per small weight on 2 cores); kernels read its bytes the same
# whatever the search effort, so the tests encode with less of it: per-channel grids still vary.
CCQ2_FAST = {"grid_candidates": 2, "scale_steps": 1, "refine_steps": 0}

# (codec, params): every kernel path. fp8 block 100 takes the element-wise scale fallback
# (no power-of-two tile divides it); wint4 g32/g64/g128 put 1, 2 or 4 tiles in a group. fp8 runs
# W8A8 (activations quantized per token and group: per token for per-channel weights) and
# weight-only ("-w16").
CODECS = [
    pytest.param("wint8", {}, id="wint8"),
    pytest.param("wint4", {"group_size": 32, "symmetric": True}, id="wint4-g32-sym"),
    pytest.param("wint4", {"group_size": 64, "symmetric": False}, id="wint4-g64-asym"),
    pytest.param("wint4", {"group_size": 128, "symmetric": False}, id="wint4-g128-asym"),
    pytest.param("wint4", {"group_size": None, "symmetric": True}, id="wint4-channel-sym"),
    pytest.param("fp8", {"block_size": None}, id="fp8-channel"),
    pytest.param("fp8", {"block_size": 128}, id="fp8-b128"),
    pytest.param("fp8", {"block_size": 100}, id="fp8-b100"),
    pytest.param("fp8", {"block_size": 128, "activations": "none"}, id="fp8-b128-w16"),
    pytest.param("fp8", {"block_size": 100, "activations": "none"}, id="fp8-b100-w16"),
    pytest.param("ccq2", CCQ2_FAST, id="ccq2"),
]
# Dense tests also take ccq2 with float16 super scales (bfloat16 is the default) and wint4 with
# float16 scales (the --bits 4 recipe's).
DENSE_CODECS = CODECS + [
    pytest.param("ccq2", {**CCQ2_FAST, "super_scale_dtype": "float16"}, id="ccq2-f16"),
    pytest.param("wint4", {"group_size": 64, "symmetric": True, "scale_dtype": "float16"}, id="wint4-g64-f16"),
]

# Kernel vs reference, per activation dtype: |y - ref| <= atol_rel * max|ref| + rtol * |ref|.
# fp32: decoded codes are exact, only the summation order differs.
# bf16: the output is rounded to bf16 (the interpreter truncates: up to 2^-7 relative),
#       and the fused MoE rounds its intermediate h to bf16 as well.
TOLERANCES = {
    torch.float32: dict(rtol=1e-4, atol_rel=1e-5),
    torch.bfloat16: dict(rtol=1.6e-2, atol_rel=1e-2),
}
MOE_TOLERANCES = {
    torch.float32: dict(rtol=1e-4, atol_rel=1e-5),
    torch.bfloat16: dict(rtol=3e-2, atol_rel=2e-2),
}


def seeded(*parts) -> torch.Generator:
    """A generator seeded from the test case: fresh data per case, reproducible across runs."""
    return torch.Generator().manual_seed(zlib.crc32(repr(parts).encode()))


def random_weight(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Gaussian [N, K] with per-row scales spread over two decades and a few outliers."""
    w = torch.randn(n, k, generator=gen) * torch.logspace(-1, 1, n)[torch.randperm(n, generator=gen)][:, None]
    outliers = torch.rand(n, k, generator=gen) < 0.01
    return torch.where(outliers, w * 8, w)


def encode(codec: str, params: dict, n: int, k: int, gen: torch.Generator) -> QuantizedTensor:
    """A fresh random [N, K] weight encoded by the real codec, on DEVICE."""
    return get_codec(codec, **params).encode(random_weight(n, k, gen)).to(DEVICE)


def encode_stack(codec: str, params: dict, e: int, n: int, k: int, gen: torch.Generator) -> QuantizedTensor:
    """E fresh random experts, stacked to (E, N, K), on DEVICE."""
    c = get_codec(codec, **params)
    return stack_experts([c.encode(random_weight(n, k, gen)) for _ in range(e)]).to(DEVICE)


def assert_close(y: torch.Tensor, ref: torch.Tensor, tol: dict) -> None:
    """y vs ref with the tolerance of their dtype; atol scales with the output's magnitude."""
    assert y.dtype == ref.dtype and y.shape == ref.shape
    scale = ref.float().abs().max().item()
    assert scale > 0, "a reference of all zeros cannot tell a kernel from a broken one"
    torch.testing.assert_close(y.float(), ref.float(), rtol=tol["rtol"], atol=tol["atol_rel"] * scale)
