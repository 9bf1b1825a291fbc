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

from ernieq.codecs.base import (
    CalibrationStats,
    CodecBase,
    QuantizedTensor,
    check_layout,
    check_weight,
    register_codec,
)

QMAX = 127


@dataclass(frozen=True)
class WInt8Config:
    """wint8 has no parameters: per-channel symmetric int8 is the whole recipe."""


def _channel_scale(w: torch.Tensor) -> torch.Tensor:
    """w: [..., N, K] float32. Returns scale [..., N] = amax / 127; a zero (or underflowing) row gets 1.0."""
    scale = w.abs().amax(dim=-1) / QMAX  # scale = amax / 127
    return torch.where(scale > 0, scale, torch.ones_like(scale))


@register_codec("wint8", WInt8Config)
class WInt8Codec(CodecBase):
    config: WInt8Config

    def encode(
        self, weight: torch.Tensor, stats: CalibrationStats | None = None, *, name: str = "weight"
    ) -> QuantizedTensor:
        """weight: [N, K], any float dtype. stats: unused by round to nearest.

        Returns qweight int8 [N, K] and scale float32 [N].
        """
        w = check_weight(weight, name)  # [N, K] float32
        scale = _channel_scale(w)  # [N]
        q = torch.round(w / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)  # [N, K]
        tensors = {"qweight": q, "scale": scale}
        return QuantizedTensor(self.name, tuple(w.shape), tensors, dataclasses.asdict(self.config))

    def decode(self, q: QuantizedTensor) -> torch.Tensor:
        """q: shape (N, K). Returns float32 W_hat [N, K] = qweight * scale[:, None]."""
        self._check_layout(q)
        return q.tensors["qweight"].float() * q.tensors["scale"][:, None]  # [N, K]

    def _check_layout(self, q: QuantizedTensor) -> None:
        """Fail loudly when ``q`` is not a wint8 tensor of its own shape."""
        check_layout(self, q, lambda n, k: {"qweight": (torch.int8, (n, k)), "scale": (torch.float32, (n,))})


class WInt8Columns:
    """wint8's rounding step inside GPTQ's column loop, one column (``unit = 1``) at a time.

    The per-channel scale is fixed up front from the whole row, as round to
    nearest sets it (``scale = amax / 127``); ``group = 0``: no per-group scales.
    """

    unit = 1
    group = 0

    def __init__(self, codec: WInt8Codec, weight: torch.Tensor, static_groups: bool = False):  # no groups: unused
        self.codec = codec
        w = weight.float()
        self.scale = _channel_scale(w)  # [N]
        self.qweight = torch.zeros(w.shape, dtype=torch.int8, device=w.device)  # [N, K]

    def round(self, col: int, w: torch.Tensor, hinv: torch.Tensor | None = None) -> torch.Tensor:
        """w: [N, 1] the current column ``col``. Returns its dequantized value [N, 1]."""
        s = self.scale[:, None]  # [N, 1]
        q = torch.round(w / s).clamp_(-QMAX, QMAX)  # q = clamp(round(w / s), -127, 127)
        self.qweight[:, col : col + 1] = q.to(torch.int8)
        return q * s

    def result(self) -> QuantizedTensor:
        tensors = {"qweight": self.qweight, "scale": self.scale}
        return QuantizedTensor(self.codec.name, tuple(self.qweight.shape), tensors, dataclasses.asdict(self.codec.config))


class WInt8ExpertColumns:
    """wint8's rounding step for E experts at once (``ernieq.calibration.gptq_experts``): one column
    of all experts, transposed (w [E, 1, N]), per call; scales fixed up front per channel. Codes
    are kept K-major ([E, K, N]) so that a column's are one contiguous slice."""

    unit = 1
    group = 0

    def __init__(self, codec: WInt8Codec, weight: torch.Tensor, order: torch.Tensor | None, stats=None):
        """weight: float32 [E, N, K]; order: int64 [E, K] (loop position -> column) or None."""
        self.codec = codec
        e, n, k = weight.shape
        self.scale = _channel_scale(weight)  # [E, N]
        self.qweight = torch.zeros(e, k, n, dtype=torch.int8, device=weight.device)  # [E, K, N]
        self.order = order
        self.experts = torch.arange(e, device=weight.device)

    def round(self, j: int, w: torch.Tensor, m: torch.Tensor | None = None) -> torch.Tensor:
        """w: [E, 1, N] the column at loop position j. Returns its dequantized value [E, 1, N]."""
        s = self.scale[:, None]  # [E, 1, N]
        q = torch.round(w / s).clamp_(-QMAX, QMAX)  # q = clamp(round(w / s), -127, 127)
        if self.order is None:
            self.qweight[:, j : j + 1] = q
        else:
            self.qweight[self.experts, self.order[:, j]] = q[:, 0].to(torch.int8)
        return q * s

    def result(self) -> list[QuantizedTensor]:
        params = dataclasses.asdict(self.codec.config)
        out = []
        for e in range(self.qweight.shape[0]):
            tensors = {"qweight": self.qweight[e].t().contiguous(), "scale": self.scale[e].clone()}
            out.append(QuantizedTensor(self.codec.name, tuple(tensors["qweight"].shape), tensors, params))
        return out


WInt8Codec.columns, WInt8Codec.expert_columns = WInt8Columns, WInt8ExpertColumns
