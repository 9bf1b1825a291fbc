"""The router fit: ridge least squares."""

from __future__ import annotations

import torch

from ernieq.demo.router import fit_linear


def test_fit_linear_recovers_coefficients():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(500, 6, generator=gen)
    a, c = torch.randn(2, 6, generator=gen), torch.tensor([0.5, -1.0])
    got_a, got_c = fit_linear(x, x @ a.T + c, ridge=1e-9)
    torch.testing.assert_close(got_a, a, rtol=0, atol=1e-4)
    torch.testing.assert_close(got_c, c, rtol=0, atol=1e-4)
