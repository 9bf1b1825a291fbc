"""The Triton activation quantizer against fp8's torch definition, bit for bit."""

from __future__ import annotations

import pytest
import torch

from ernieq.codecs.fp8 import quantize_activations
from ernieq.kernels import KernelError
from ernieq.kernels.act_quant import act_quant
from tests.kernels.cases import DEVICE, seeded

# (M, K, G): G = 128 (a partial last group at K = 200), 100, and per token (G = K)
CASES = [(1, 200, 128), (3, 200, 128), (33, 576, 128), (17, 200, 100), (5, 72, 72), (20, 300, 300)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def assert_same(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Codes bit for bit (so -0 and +0 differ) and scales exactly."""
    assert torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8))
    assert torch.equal(got[1], want[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,k,g", CASES)
def test_act_quant_matches_the_torch_definition(m, k, g, dtype):
    gen = seeded("act", m, k, g, str(dtype))
    x = torch.randn(m, k, generator=gen) * torch.logspace(-3, 3, m)[:, None]  # rows over six decades
    x[0, 1] = 500.0  # an outlier: its group's other values go to e4m3 subnormals and -0
    if m > 2:
        x[1] = 0  # an all-zero row: scale 1.0
        x[2, : min(g, k)] *= 1e-30  # a group whose scale is far below float32's normals
    x = x.to(DEVICE, dtype)
    got = act_quant(x, g)
    assert got[0].shape == (m, k) and got[1].shape == (m, -(-k // g))
    assert_same(got, quantize_activations(x, g))


def test_every_e4m3_rounding_case():
    """Every e4m3 value, every midpoint (ties go to even) and a float32 ulp either side, in one row per group."""
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = codes[torch.isfinite(codes)].unique()  # -448 .. 448
    mids = (grid[1:] + grid[:-1]) / 2
    values = torch.cat([grid, mids, torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1)])
    x = values[torch.randperm(values.numel(), generator=seeded("ties"))]
    x = torch.cat([x, x.new_zeros(-x.numel() % 127)]).view(-1, 127)
    x = torch.cat([x.new_full((x.shape[0], 1), 448.0), x], dim=1)  # [R, 128]: each row's scale is exactly 1.0
    got = act_quant(x.to(DEVICE), 128)
    assert torch.equal(got[1], torch.ones(x.shape[0], 1, device=DEVICE))
    assert_same(got, quantize_activations(x.to(DEVICE), 128))


def test_strided_input_and_empty_batch():
    x = torch.randn(200, 7, generator=seeded("strided")).to(DEVICE).T  # [7, 200], strides (1, 7)
    assert_same(act_quant(x, 128), quantize_activations(x, 128))
    q, s = act_quant(torch.empty(0, 64, device=DEVICE), 128)
    assert q.shape == (0, 64) and s.shape == (0, 1)


def test_bad_arguments():
    with pytest.raises(KernelError, match="act_quant"):
        act_quant(torch.zeros(3, device=DEVICE), 128)
    with pytest.raises(KernelError, match="act_quant"):
        act_quant(torch.zeros(3, 4, device=DEVICE), 0)
