"""The routed variant's linear router: a ridge fit to each expert's log output norm, in float64.

The stored router is snapped to values that bfloat16 represents: the fit's last-bit
differences between machines (measured up to 1e-11 relative) move a value only where
it straddles a rounding boundary, at least 2^-8 relative apart, so the bytes written agree.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def ridge_solver(x: torch.Tensor, ridge: float) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Ridge least squares target ~ x a^T + c for any number of targets, factorised once.

    x [T, H]; the returned solve(target [T, E]) gives float64 a [E, H], c [E]:
    [a c]^T = (X^T X + lambda I)^-1 X^T target with X = [x 1], lambda = ridge * mean(diag X^T X).
    """
    xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1).double()  # [T, H+1]
    gram = xa.T @ xa  # [H+1, H+1]
    gram += ridge * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
    chol = torch.linalg.cholesky(gram)

    def solve(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        coef = torch.cholesky_solve(xa.T @ target.double(), chol)  # [H+1, E]
        return coef[:-1].T, coef[-1]

    return solve


def expert_log_norms(h: torch.Tensor, down: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """[T, E] log ||expert e's output||; h [T, I] neuron outputs, down [H, I], experts [E, m].

    ||down_e h_e||^2 = h_e^T (down_e^T down_e) h_e: an [m, m] Gram instead of the [T, H] output.
    """
    sq = []
    for ix in experts:
        h_e, d_e = h[:, ix], down[:, ix]  # [T, m], [H, m]
        sq.append(((h_e @ (d_e.T @ d_e)) * h_e).sum(1))  # [T]
    norms = torch.stack(sq, dim=1).clamp_min(0).sqrt()  # [T, E]
    return (norms + 1e-3 * norms.mean()).log()


def snap_to_bfloat16(t: torch.Tensor) -> torch.Tensor:
    """float32 copy of ``t`` rounded to the nearest bfloat16 value (8 significant bits)."""
    return t.to(torch.bfloat16).float()
