"""``wint8``: symmetric int8, one scale per output channel, round to nearest.

Stored tensors (a contract with the kernels and format writers):

- ``qweight``: int8 [N, K], values in [-127, 127] (-128 is never used).
- ``scale``: float32 [N], ``scale = amax(|W[n, :]|) / 127``; an all-zero row gets 1.0.

Decode: ``W_hat = qweight * scale[:, None]``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ernieq.codecs.base import CalibrationStats, CodecError, QuantizedTensor, check_weight, register_codec

QMAX = 127


@dataclass(frozen=True)
class WInt8Config:
    """wint8 has no parameters: per-channel symmetric int8 is the whole recipe."""


@register_codec("wint8", WInt8Config)
class WInt8Codec:
    def __init__(self, config: WInt8Config):
        self.config = config

    def encode(
        self, weight: torch.Tensor, stats: CalibrationStats | None = None, *, name: str = "weight"
    ) -> QuantizedTensor:
        """weight: [N, K], any float dtype. stats: unused by round to nearest.

        Returns qweight int8 [N, K] and scale float32 [N].
        """
        w = check_weight(weight, name)  # [N, K] float32
        amax = w.abs().amax(dim=1)  # [N]
        scale = amax / QMAX  # scale = amax / 127
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # zero (or underflowing) row: 1.0
        q = torch.round(w / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)  # [N, K]
        tensors = {"qweight": q, "scale": scale}
        return QuantizedTensor(self.name, tuple(w.shape), tensors, dataclasses.asdict(self.config))

    def decode(self, q: QuantizedTensor) -> torch.Tensor:
        """q: shape (N, K). Returns float32 W_hat [N, K] = qweight * scale[:, None]."""
        self._check_layout(q)
        return q.tensors["qweight"].float() * q.tensors["scale"][:, None]  # [N, K]

    def _check_layout(self, q: QuantizedTensor) -> None:
        """Fail loudly when ``q`` is not a wint8 tensor of its own shape."""
        if q.codec != self.name or q.params != dataclasses.asdict(self.config) or len(q.shape) != 2:
            raise CodecError(f"wint8: cannot decode codec {q.codec!r} params {q.params} shape {q.shape}")
        n, k = q.shape
        expected = {"qweight": (torch.int8, (n, k)), "scale": (torch.float32, (n,))}
        got = {key: (t.dtype, tuple(t.shape)) for key, t in q.tensors.items()}
        if got != expected:
            raise CodecError(f"wint8: stored tensors {got} do not match the layout {expected} for shape {q.shape}")
