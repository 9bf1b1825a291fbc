"""The router fit: ridge least squares in float64, and the snap to the bfloat16 grid."""

from __future__ import annotations

import torch

from ernieq.demo.router import ridge_solver, snap_to_bfloat16


def test_ridge_solver_recovers_coefficients_in_float64():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(500, 6, generator=gen)  # float32 in, float64 out
    a, c = torch.randn(2, 6, generator=gen, dtype=torch.float64), torch.tensor([0.5, -1.0], dtype=torch.float64)
    got_a, got_c = ridge_solver(x, ridge=1e-12)(x.double() @ a.T + c)
    assert got_a.dtype == got_c.dtype == torch.float64
    torch.testing.assert_close(got_a, a, rtol=0, atol=1e-9)
    torch.testing.assert_close(got_c, c, rtol=0, atol=1e-9)


def test_snap_to_bfloat16_absorbs_last_bit_differences():
    t = torch.randn(1000, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    snapped = snap_to_bfloat16(t)
    assert snapped.dtype == torch.float32
    assert torch.equal(snapped, snapped.to(torch.bfloat16).float())  # on the bfloat16 grid
    assert ((snapped - t).abs() <= t.abs() * 2.0**-8).all()  # nearest: within half a step of 2^-7 relative
    assert torch.equal(snap_to_bfloat16(t * (1 + 1e-12)), snapped)  # a relative change of 1e-12 moves none here
