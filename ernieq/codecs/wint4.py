"""``wint4``: 4-bit integers, group-wise along K, round to nearest.

G = ``group_size`` in {32, 64, 128}, or ``None`` for one group per output channel
(G = K, FastDeploy's and vLLM's per-channel int4); n_groups = ceil(K / G). The last group may
be partial: its scale comes from its own elements (the codec pads it with
zeros, which changes neither an amax nor a range that already holds 0).

Stored tensors (a contract with the kernels and format writers):

- ``qweight``: uint8 [N, ceil(K/2)], codes in [0, 15] packed two per byte, even k
  in the low nibble (``ernieq.codecs.packing.pack_int4_k_major``); an odd K pads
  one zero code that decode drops.
- ``scale``: float32 [N, n_groups], or float16 with ``scale_dtype="float16"`` (4.25 bits per
  weight at G = 64). Codes are chosen against the scale as stored.
- ``zero``: uint8 [N, n_groups], asymmetric only, the integer zero point in [0, 15].

Symmetric:  ``scale = amax / d``, ``code = clamp(round(w / scale), -8, 7) + 8``,
            ``W_hat = (code - 8) * scale``. d = 7 clips nothing: every error is at
            most scale / 2. With ``clip``, d in ``SYM_DIVISORS`` is chosen per group
            for the least squared error: larger d give a finer grid and clip the
            largest weights (GPTQ's and AWQ's clipping search). That suits weights
            that look Gaussian (after a rotation it lowers the error by about
            10 %); weights with meaningful outliers lose by it, so it is off by
            default. Decoded weights re-encode to themselves: their amax is 7 or 8
            steps, which d = 7 or 8 hits exactly.
Asymmetric: the range [min, max] is widened to hold 0, ``scale = (max - min) / 15``,
            ``zero = clamp(round(-min / scale), 0, 15)``,
            ``code = clamp(round(w / scale) + zero, 0, 15)``, ``W_hat = (code - zero) * scale``.
An all-zero group gets scale 1.0 (and zero point 0 when asymmetric).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ernieq.codecs.base import (
    CalibrationStats,
    CodecBase,
    CodecError,
    Layout,
    QuantizedTensor,
    check_layout,
    check_weight,
    register_codec,
)
from ernieq.codecs.packing import pack_int4_k_major, unpack_int4_k_major

GROUP_SIZES = (32, 64, 128)
SYM_DIVISORS = (7.0, 7.5, 8.0, 8.5, 9.0, 9.5, 10.0)  # symmetric grid: scale = amax / d, the best d per group
SYM_OFFSET = 8  # code = value + 8, value in [-8, 7]
ASYM_LEVELS = 15  # asymmetric grid: 16 codes, 15 steps
MAX_CODE = 15
SCALE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


@dataclass(frozen=True)
class WInt4Config:
    """group_size: G, the number of K-consecutive weights that share a scale (None: all of K).
    symmetric: True for a zero point fixed at code 8, False for a stored zero point."""

    group_size: int | None = 128
    symmetric: bool = True
    clip: bool = False  # symmetric only: search the scale that clips for the least squared error
    scale_dtype: str = "float32"  # how scales are stored: "float32" or "float16"

    @property
    def dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]

    def group(self, k: int) -> int:
        """G for a weight with K input features."""
        return self.group_size or k

    def __post_init__(self):
        if self.group_size is not None and self.group_size not in GROUP_SIZES:
            raise CodecError(f"wint4: group_size must be one of {GROUP_SIZES} or None, got {self.group_size!r}")
        if not isinstance(self.symmetric, bool):
            raise CodecError(f"wint4: symmetric must be a bool, got {self.symmetric!r}")
        if not isinstance(self.clip, bool) or (self.clip and not self.symmetric):
            raise CodecError(f"wint4: clip must be a bool and applies to the symmetric grid, got clip={self.clip!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise CodecError(f"wint4: scale_dtype must be one of {sorted(SCALE_DTYPES)}, got {self.scale_dtype!r}")


def _group(w: torch.Tensor, g: int) -> torch.Tensor:
    """w: [..., N, K]. Returns [..., N, n_groups, G], the last group padded with zeros."""
    pad = -w.shape[-1] % g
    return torch.nn.functional.pad(w, (0, pad)).unflatten(-1, (-1, g))


def _ungroup(x: torch.Tensor, k: int) -> torch.Tensor:
    """x: [N, n_groups, G]. Returns [N, K], the padding dropped."""
    return x.flatten(1)[:, :k]


def _positive(scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The scale as ``dtype`` stores it, in float32; an all-zero (or underflowing) group gets 1.0:
    finite, positive, decodes to 0. A scale ``dtype`` cannot hold is an error."""
    stored = scale.to(dtype)
    if not torch.isfinite(stored).all():
        raise CodecError(f"wint4: a group's scale {scale.abs().max().item():.4g} overflows {dtype}")
    stored = stored.float()
    return torch.where(stored > 0, stored, torch.ones_like(stored))


def _symmetric_scale(wg: torch.Tensor, clip: bool, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """wg: [..., N, n_groups, G]. Returns scale [..., N, n_groups] = amax / 7, or with ``clip`` amax / d
    for the d of ``SYM_DIVISORS`` with the least squared error per group (the first on ties), each
    rounded to ``dtype`` (and returned as float32)."""
    amax = wg.abs().amax(dim=-1)  # [N, n_groups]
    if not clip:
        return _positive(amax / SYM_DIVISORS[0], dtype)
    best, best_err = None, None
    t = torch.empty_like(wg)  # one buffer for every divisor's (w_hat - w)^2
    for d in SYM_DIVISORS:
        scale = _positive(amax / d, dtype)
        torch.div(wg, scale[..., None], out=t).round_().clamp_(-SYM_OFFSET, SYM_OFFSET - 1)
        err = t.mul_(scale[..., None]).sub_(wg).square_().sum(dim=-1)  # sum (w_hat - w)^2  [N, n_groups]
        if best is None:
            best, best_err = scale, err
        else:
            better = err < best_err
            best, best_err = torch.where(better, scale, best), torch.where(better, err, best_err)
    return best


def _asymmetric_grid(wg: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """wg: [..., N, n_groups, G]. Returns scale [..., N, n_groups] (rounded to ``dtype``, as float32) and
    the float zero point [..., N, n_groups] in [0, 15]."""
    lo = wg.amin(dim=-1).clamp(max=0)  # min, widened to hold 0
    hi = wg.amax(dim=-1).clamp(min=0)  # max, widened to hold 0
    scale = _positive(hi / ASYM_LEVELS - lo / ASYM_LEVELS, dtype)  # (max - min) / 15, no overflow at float max
    zero = torch.round(-lo / scale).clamp_(0, MAX_CODE)  # zero = round(-min / scale)
    return scale, zero


def _grid(wg: torch.Tensor, config: WInt4Config) -> tuple[torch.Tensor, torch.Tensor]:
    """wg: [..., N, n_groups, G]. Returns (scale, zero) [..., N, n_groups], the scale as stored (in
    float32): zero is 8 when symmetric."""
    if config.symmetric:
        scale = _symmetric_scale(wg, config.clip, config.dtype)
        return scale, torch.full_like(scale, SYM_OFFSET)
    return _asymmetric_grid(wg, config.dtype)


def _stored_grid(config: WInt4Config, scale: torch.Tensor, zero: torch.Tensor) -> dict[str, torch.Tensor]:
    """The stored scale (and zero point, asymmetric) tensors of a grid from ``_grid``."""
    grid = {"scale": scale.to(config.dtype).contiguous()}
    if not config.symmetric:
        grid["zero"] = zero.to(torch.uint8)
    return grid


@register_codec("wint4", WInt4Config)
class WInt4Codec(CodecBase):
    config: WInt4Config

    def encode(
        self, weight: torch.Tensor, stats: CalibrationStats | None = None, *, name: str = "weight"
    ) -> QuantizedTensor:
        """weight: [N, K], any float dtype. stats: unused by round to nearest.

        Returns qweight uint8 [N, ceil(K/2)], scale [N, n_groups] (``scale_dtype``) and,
        when asymmetric, zero uint8 [N, n_groups].
        """
        w = check_weight(weight, name)  # [N, K] float32
        n, k = w.shape
        wg = _group(w, self.config.group(k))  # [N, n_groups, G]
        scale, zero = _grid(wg, self.config)  # [N, n_groups]
        codes = (torch.round(wg / scale[..., None]) + zero[..., None]).clamp_(0, MAX_CODE).to(torch.uint8)
        qweight = pack_int4_k_major(_ungroup(codes, k))  # [N, ceil(K/2)]
        grid = _stored_grid(self.config, scale, zero)
        return QuantizedTensor(self.name, (n, k), {"qweight": qweight, **grid}, dataclasses.asdict(self.config))

    def decode(self, q: QuantizedTensor) -> torch.Tensor:
        """q: shape (N, K). Returns float32 W_hat [N, K] = (code - zero) * scale per group."""
        self._check_layout(q)
        n, k = q.shape
        g = self.config.group(k)
        codes = _group(unpack_int4_k_major(q.tensors["qweight"], k).float(), g)  # [N, n_groups, G]
        scale = q.tensors["scale"][..., None].float()  # [N, n_groups, 1]
        if self.config.symmetric:
            zero = torch.full_like(scale, SYM_OFFSET)
        else:
            zero = q.tensors["zero"][..., None].float()  # [N, n_groups, 1]
        return _ungroup((codes - zero) * scale, k)  # W_hat = (code - zero) * scale

    def _check_layout(self, q: QuantizedTensor) -> None:
        """Fail loudly when ``q`` is not a wint4 tensor of this config and its own shape."""

        def layout(n: int, k: int) -> Layout:
            n_groups = -(-k // self.config.group(k))  # ceil(K / G)
            zero = {} if self.config.symmetric else {"zero": (torch.uint8, (n, n_groups))}
            return {"qweight": (torch.uint8, (n, -(-k // 2))), "scale": (self.config.dtype, (n, n_groups)), **zero}

        check_layout(self, q, layout)


class WInt4Columns:
    """wint4's rounding step inside GPTQ's column loop, one column (``unit = 1``) at a time.

    Scales are per group of ``group = G`` columns, set as round to nearest sets
    them (``scale = amax / d`` with the least error, or the asymmetric range), either from the
    current, error-updated weights when the loop reaches the group's first
    column (``start_group``: GPTQ with ``static_groups=False``), or up front from
    the weight as given (``static_groups=True``, for activation order: the
    stored layout has no column permutation, so groups stay in K order).
    Per channel (``group_size=None``) the scale is fixed up front from the whole
    row, as GPTQ does for per-channel grids, and ``group = 0`` (no group starts).
    ``round`` returns the dequantized column; ``result`` packs what was chosen.
    """

    unit = 1

    def __init__(self, codec: WInt4Codec, weight: torch.Tensor, static_groups: bool):
        self.codec = codec
        n, self.k = weight.shape
        self.span = codec.config.group(self.k)  # G columns share a scale
        self.group = 0 if codec.config.group_size is None else self.span  # when the loop calls start_group
        self.codes = torch.zeros(n, self.k, dtype=torch.uint8, device=weight.device)  # [N, K]
        if static_groups or not self.group:
            self.scale, self.zero = _grid(_group(weight.float(), self.span), codec.config)  # [N, n_groups]
        else:
            n_groups = -(-self.k // self.span)
            self.scale = torch.ones(n, n_groups, device=weight.device)
            self.zero = torch.full((n, n_groups), float(SYM_OFFSET), device=weight.device)

    def start_group(self, col: int, w: torch.Tensor) -> None:
        """col: the group's first column; w: [N, <= G] its current values."""
        scale, zero = _grid(w.float().unsqueeze(1), self.codec.config)  # [N, 1]
        self.scale[:, col // self.span] = scale[:, 0]
        self.zero[:, col // self.span] = zero[:, 0]

    def round(self, col: int, w: torch.Tensor, hinv: torch.Tensor | None = None) -> torch.Tensor:
        """w: [N, 1] the current column ``col``. Returns its dequantized value [N, 1]."""
        g = col // self.span
        scale, zero = self.scale[:, g : g + 1], self.zero[:, g : g + 1]  # [N, 1]
        code = (torch.round(w / scale) + zero).clamp_(0, MAX_CODE)  # code = clamp(round(w / s) + z, 0, 15)
        self.codes[:, col : col + 1] = code.to(torch.uint8)
        return (code - zero) * scale  # W_hat = (code - zero) * scale

    def result(self) -> QuantizedTensor:
        n = self.codes.shape[0]
        tensors = {"qweight": pack_int4_k_major(self.codes), **_stored_grid(self.codec.config, self.scale, self.zero)}
        return QuantizedTensor(self.codec.name, (n, self.k), tensors, dataclasses.asdict(self.codec.config))


class WInt4ExpertColumns:
    """wint4's rounding step for E experts at once (``ernieq.calibration.gptq_experts``), one column
    (``unit = 1``) of all experts per call, the weights transposed: a column is w [E, 1, N].

    Scales as :class:`WInt4Columns` sets them, per expert: from the current weights at each
    group's first column, or up front from W when ``order`` is given (activation order) or
    per channel. Scales and codes are kept K-major ([E, n_groups, N], [E, K, N]) so that a
    column's are one contiguous slice.
    """

    unit = 1

    def __init__(self, codec: WInt4Codec, weight: torch.Tensor, order: torch.Tensor | None, stats=None):
        """weight: float32 [E, N, K]; order: int64 [E, K] (loop position -> column) or None."""
        self.codec = codec
        e, n, self.k = weight.shape
        self.span = codec.config.group(self.k)  # G columns share a scale
        self.group = 0 if codec.config.group_size is None else self.span
        self.codes = torch.zeros(e, self.k, n, dtype=torch.uint8, device=weight.device)  # [E, K, N]
        if order is not None or not self.group:
            scale, zero = _grid(_group(weight, self.span), codec.config)  # [E, N, n_groups]
            self.scale, self.zero = scale.transpose(1, 2).contiguous(), zero.transpose(1, 2).contiguous()
        else:
            n_groups = -(-self.k // self.span)
            self.scale = torch.ones(e, n_groups, n, device=weight.device)  # [E, n_groups, N]
            self.zero = torch.full((e, n_groups, n), float(SYM_OFFSET), device=weight.device)
        self.order = order
        self.experts = torch.arange(e, device=weight.device)

    def start_group(self, col: int, w: torch.Tensor) -> None:
        """col: the group's first column; w: [E, <= G, N] its current values."""
        scale, zero = _grid(w.transpose(1, 2).contiguous().unsqueeze(2), self.codec.config)  # [E, N, 1]
        self.scale[:, col // self.span] = scale[..., 0]
        self.zero[:, col // self.span] = zero[..., 0]

    def round(self, j: int, w: torch.Tensor, m: torch.Tensor | None = None) -> torch.Tensor:
        """w: [E, 1, N] the column at loop position j. Returns its dequantized value [E, 1, N]."""
        if self.order is None:
            g = j // self.span
            scale, zero = self.scale[:, g : g + 1], self.zero[:, g : g + 1]  # [E, 1, N]
        else:
            g = self.order[:, j] // self.span  # [E]: each expert's column has its own group
            scale, zero = self.scale[self.experts, g][:, None], self.zero[self.experts, g][:, None]
        code = (torch.round(w / scale) + zero).clamp_(0, MAX_CODE)  # code = clamp(round(w / s) + z, 0, 15)
        if self.order is None:
            self.codes[:, j : j + 1] = code
        else:
            self.codes[self.experts, self.order[:, j]] = code[:, 0].to(torch.uint8)
        return (code - zero) * scale  # W_hat = (code - zero) * scale

    def result(self) -> list[QuantizedTensor]:
        params = dataclasses.asdict(self.codec.config)
        out = []
        for e in range(self.codes.shape[0]):
            scale, zero = self.scale[e].t().contiguous(), self.zero[e].t().contiguous()  # [N, n_groups]
            tensors = {"qweight": pack_int4_k_major(self.codes[e].t().contiguous()),
                       **_stored_grid(self.codec.config, scale, zero)}
            out.append(QuantizedTensor(self.codec.name, (scale.shape[0], self.k), tensors, params))
        return out


WInt4Codec.columns, WInt4Codec.expert_columns = WInt4Columns, WInt4ExpertColumns
