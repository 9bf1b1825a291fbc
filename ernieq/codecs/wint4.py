"""``wint4``: 4-bit integers, group-wise along K, round to nearest.

G = ``group_size`` in {32, 64, 128}; n_groups = ceil(K / G). The last group may
be partial: its scale comes from its own elements (the codec pads it with
zeros, which changes neither an amax nor a range that already holds 0).

Stored tensors (a contract with the kernels and format writers):

- ``qweight``: uint8 [N, ceil(K/2)], codes in [0, 15] packed two per byte, even k
  in the low nibble (``ernieq.codecs.packing.pack_int4_k_major``); an odd K pads
  one zero code that decode drops.
- ``scale``: float32 [N, n_groups].
- ``zero``: uint8 [N, n_groups], asymmetric only, the integer zero point in [0, 15].

Symmetric:  ``scale = amax / 7``, ``code = clamp(round(w / scale), -8, 7) + 8``,
            ``W_hat = (code - 8) * scale``. With amax / 7 nothing is clipped, so
            every error is at most scale / 2; code 0 (-8) is never produced by
            round to nearest but decodes fine (GPTQ may use it).
Asymmetric: the range [min, max] is widened to hold 0, ``scale = (max - min) / 15``,
            ``zero = clamp(round(-min / scale), 0, 15)``,
            ``code = clamp(round(w / scale) + zero, 0, 15)``, ``W_hat = (code - zero) * scale``.
An all-zero group gets scale 1.0 (and zero point 0 when asymmetric).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ernieq.codecs.base import CalibrationStats, CodecError, QuantizedTensor, check_weight, register_codec
from ernieq.codecs.packing import pack_int4_k_major, unpack_int4_k_major

GROUP_SIZES = (32, 64, 128)
SYM_QMAX = 7  # symmetric grid: scale = amax / 7
SYM_OFFSET = 8  # code = value + 8, value in [-8, 7]
ASYM_LEVELS = 15  # asymmetric grid: 16 codes, 15 steps
MAX_CODE = 15


@dataclass(frozen=True)
class WInt4Config:
    """group_size: G, the number of K-consecutive weights that share a scale.
    symmetric: True for a zero point fixed at code 8, False for a stored zero point."""

    group_size: int = 128
    symmetric: bool = True

    def __post_init__(self):
        if self.group_size not in GROUP_SIZES:
            raise CodecError(f"wint4: group_size must be one of {GROUP_SIZES}, got {self.group_size!r}")
        if not isinstance(self.symmetric, bool):
            raise CodecError(f"wint4: symmetric must be a bool, got {self.symmetric!r}")


def _group(w: torch.Tensor, g: int) -> torch.Tensor:
    """w: [N, K]. Returns [N, n_groups, G], the last group padded with zeros."""
    pad = -w.shape[1] % g
    return torch.nn.functional.pad(w, (0, pad)).unflatten(1, (-1, g))


def _ungroup(x: torch.Tensor, k: int) -> torch.Tensor:
    """x: [N, n_groups, G]. Returns [N, K], the padding dropped."""
    return x.flatten(1)[:, :k]


def _positive(scale: torch.Tensor) -> torch.Tensor:
    """An all-zero (or underflowing) group gets scale 1.0: finite, positive, decodes to 0."""
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _encode_symmetric(wg: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """wg: [N, n_groups, G]. Returns codes uint8 [N, n_groups, G] and {"scale": [N, n_groups]}."""
    scale = _positive(wg.abs().amax(dim=2) / SYM_QMAX)  # scale = amax / 7
    value = torch.round(wg / scale[..., None]).clamp_(-SYM_OFFSET, SYM_QMAX)  # in [-8, 7]
    return (value + SYM_OFFSET).to(torch.uint8), {"scale": scale}  # code = value + 8


def _encode_asymmetric(wg: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """wg: [N, n_groups, G]. Returns codes uint8 [N, n_groups, G], {"scale", "zero": [N, n_groups]}."""
    lo = wg.amin(dim=2).clamp(max=0)  # min, widened to hold 0
    hi = wg.amax(dim=2).clamp(min=0)  # max, widened to hold 0
    scale = _positive(hi / ASYM_LEVELS - lo / ASYM_LEVELS)  # (max - min) / 15, no overflow at float max
    zero = torch.round(-lo / scale).clamp_(0, MAX_CODE)  # zero = round(-min / scale)
    code = (torch.round(wg / scale[..., None]) + zero[..., None]).clamp_(0, MAX_CODE)
    return code.to(torch.uint8), {"scale": scale, "zero": zero.to(torch.uint8)}


@register_codec("wint4", WInt4Config)
class WInt4Codec:
    def __init__(self, config: WInt4Config):
        self.config = config

    def encode(
        self, weight: torch.Tensor, stats: CalibrationStats | None = None, *, name: str = "weight"
    ) -> QuantizedTensor:
        """weight: [N, K], any float dtype. stats: unused by round to nearest.

        Returns qweight uint8 [N, ceil(K/2)], scale float32 [N, n_groups] and,
        when asymmetric, zero uint8 [N, n_groups].
        """
        w = check_weight(weight, name)  # [N, K] float32
        n, k = w.shape
        wg = _group(w, self.config.group_size)  # [N, n_groups, G]
        encode_groups = _encode_symmetric if self.config.symmetric else _encode_asymmetric
        codes, grid = encode_groups(wg)
        qweight = pack_int4_k_major(_ungroup(codes, k))  # [N, ceil(K/2)]
        return QuantizedTensor(self.name, (n, k), {"qweight": qweight, **grid}, dataclasses.asdict(self.config))

    def decode(self, q: QuantizedTensor) -> torch.Tensor:
        """q: shape (N, K). Returns float32 W_hat [N, K] = (code - zero) * scale per group."""
        self._check_layout(q)
        n, k = q.shape
        g = self.config.group_size
        codes = _group(unpack_int4_k_major(q.tensors["qweight"], k).float(), g)  # [N, n_groups, G]
        scale = q.tensors["scale"][..., None]  # [N, n_groups, 1]
        if self.config.symmetric:
            zero = torch.full_like(scale, SYM_OFFSET)
        else:
            zero = q.tensors["zero"][..., None].float()  # [N, n_groups, 1]
        return _ungroup((codes - zero) * scale, k)  # W_hat = (code - zero) * scale

    def _check_layout(self, q: QuantizedTensor) -> None:
        """Fail loudly when ``q`` is not a wint4 tensor of this config and its own shape."""
        params = dataclasses.asdict(self.config)
        if q.codec != self.name or q.params != params or len(q.shape) != 2:
            raise CodecError(f"wint4{params}: cannot decode codec {q.codec!r} params {q.params} shape {q.shape}")
        n, k = q.shape
        n_groups = -(-k // self.config.group_size)  # ceil(K / G)
        expected = {"qweight": (torch.uint8, (n, -(-k // 2))), "scale": (torch.float32, (n, n_groups))}
        if not self.config.symmetric:
            expected["zero"] = (torch.uint8, (n, n_groups))
        got = {key: (t.dtype, tuple(t.shape)) for key, t in q.tensors.items()}
        if got != expected:
            raise CodecError(f"wint4: stored tensors {got} do not match the layout {expected} for shape {q.shape}")
