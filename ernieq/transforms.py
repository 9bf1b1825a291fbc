"""Orthogonal input rotations that make weights incoherent (QuIP#'s idea), applied online.

Shape legend: K input features, K = m * b with b the largest power of two dividing K.

A linear layer y = x W^T is unchanged when both sides turn by an orthogonal R:
y = (x R) (W R)^T. The codec then sees W R, whose entries look Gaussian (outliers
spread over all K columns), and the runtime turns x by R before the GEMM. Here

    R = diag(s) (Q ⊗ H_b / sqrt(b))

with s random signs [K], Q a random orthogonal [m, m] and H_b the Sylvester
Hadamard matrix [b, b]: for x viewed as X [m, b] (index k = i * b + j),
x R = Q^T (X ∘ S) H_b / sqrt(b). The Hadamard part is a fast Walsh-Hadamard
transform (:func:`fwht`: log2 b butterfly steps, no matrix), so a row costs
O(K (m + log b)) instead of O(K^2), and nothing is built on the host per call:
the signs and Q are module buffers on the device, which makes the transform
capturable by CUDA graphs and ``torch.compile``. The signs and Q are stored
with the checkpoint, so decoding never depends on a random generator.

Here, not in ``ernieq.kernels``: calibration (GPTQ on W R with R^T H R), the
quantize pass, the formats that store rotations and the runtime all use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def hadamard(b: int) -> torch.Tensor:
    """The Sylvester Hadamard matrix of order b (a power of two), entries ±1. float32 [b, b]."""
    if b < 1 or b & (b - 1):
        raise ValueError(f"Hadamard order {b} is not a power of two")
    h = torch.ones(1, 1)
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)  # [[H, H], [H, -H]]
    return h


def fwht(x: torch.Tensor) -> torch.Tensor:
    """x [..., b] -> x H_b / sqrt(b), b a power of two, by log2 b butterfly steps on x's device.

    Step with half-width h: each pair (u, v) of entries h apart becomes (u + v, u - v), which is
    the Sylvester recursion H_2n = [[H_n, H_n], [H_n, -H_n]] applied from the inside out.
    Half-precision inputs are transformed in float32 (log2 b additions would round each time).
    """
    b = x.shape[-1]
    if b < 1 or b & (b - 1):
        raise ValueError(f"Hadamard order {b} is not a power of two")
    y = x.float() if x.element_size() < 4 else x
    lead = y.shape[:-1]
    h = 1
    while h < b:
        pairs = y.reshape(*lead, b // (2 * h), 2, h)  # [..., b/2h, 2, h]: u = [..., 0, :], v = [..., 1, :]
        u, v = pairs[..., 0, :], pairs[..., 1, :]
        y = torch.stack((u + v, u - v), dim=-2)  # (u + v, u - v)
        h *= 2
    return (y.reshape(x.shape) * b**-0.5).to(x.dtype)


def power_of_two_block(k: int) -> int:
    """The largest power of two dividing k."""
    return k & -k


@dataclass(frozen=True)
class Rotation:
    """R = diag(signs) (q ⊗ H_b / sqrt(b)). signs: float32 [K] of ±1; q: float32 [m, m] orthogonal."""

    signs: torch.Tensor
    q: torch.Tensor

    @property
    def k(self) -> int:
        return self.signs.shape[0]

    @property
    def block(self) -> int:
        return self.k // self.q.shape[0]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> x R. signs and q must be on x's device (the runtime keeps them as buffers)."""
        m, b = self.q.shape[0], self.block
        xs = (x * self.signs.to(x.dtype)).reshape(*x.shape[:-1], m, b)  # X ∘ S as [.., m, b]
        y = self.q.to(x.dtype).T @ fwht(xs)  # Q^T (X ∘ S) H / sqrt(b)
        return y.reshape(x.shape)

    def apply_t(self, x: torch.Tensor, dense: bool = False) -> torch.Tensor:
        """x [..., K] -> x R^T (the inverse turn). dense: multiply by H_b as a matrix (one GEMM, several
        times faster than the butterfly on a CPU) to turn stored weights back once; the default keeps
        the per-call path free of a host-built matrix."""
        m, b = self.q.shape[0], self.block
        xs = x.reshape(*x.shape[:-1], m, b)
        xh = xs @ (hadamard(b).to(xs) * b**-0.5) if dense else fwht(xs)  # X H / sqrt(b)
        y = self.q.to(x.dtype) @ xh  # Q X H^T / sqrt(b), H symmetric
        return y.reshape(x.shape) * self.signs.to(x.dtype)

    def to(self, device: torch.device | str) -> Rotation:
        """The same rotation with its tensors on ``device``."""
        return Rotation(self.signs.to(device), self.q.to(device))

    def conjugate(self, h: torch.Tensor) -> torch.Tensor:
        """A Hessian [K, K] of the inputs x, as seen by the turned inputs x R: R^T h R."""
        return self.apply(self.apply(h).T).T  # (h R) then R^T (h R) = ((h R)^T R)^T

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"signs": self.signs, "q": self.q}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> Rotation:
        signs, q = tensors["signs"].float(), tensors["q"].float()
        m = q.shape[0]
        if signs.dim() != 1 or q.shape != (m, m) or signs.shape[0] % m or power_of_two_block(signs.shape[0] // m) != signs.shape[0] // m:
            raise ValueError(f"rotation tensors of shapes {tuple(signs.shape)}, {tuple(q.shape)} do not form K = m * 2^j")
        return cls(signs, q)


def make_rotation(k: int, seed: int = 0) -> Rotation:
    """The rotation for K inputs drawn from ``seed`` (signs and Q from one CPU generator)."""
    b = power_of_two_block(k)
    m = k // b
    gen = torch.Generator().manual_seed(seed * 1_000_003 + k)
    signs = torch.randint(0, 2, (k,), generator=gen).float() * 2 - 1
    a = torch.randn(m, m, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r))  # Haar-distributed orthogonal
    return Rotation(signs, q.float())
