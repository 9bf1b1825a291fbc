"""``fp8``: float8_e4m3fn weights with float32 scales, per output channel or per block, and
(``activations="dynamic"``, the default) float8_e4m3fn activations quantized at run time.

B = ``block_size``; None means one scale per output channel.

Stored tensors (a contract with the kernels and format writers):

- ``qweight``: float8_e4m3fn [N, K].
- ``scale``: float32 [N] per channel, or [ceil(N/B), ceil(K/B)] per B x B block:
  ``scale = amax / 448`` (448 is the largest e4m3fn value), the transformers /
  vLLM ``weight_scale_inv`` convention. Edge blocks (N or K not a multiple of B)
  take their scale from the elements they hold. An all-zero block gets 1.0.

Decode: ``W_hat = qweight.float() * scale`` (broadcast over each row or block).

How a checkpoint is computed (``activations``, recorded with the other params):

- ``"dynamic"`` (W8A8, DeepSeek-V3's ``act_quant`` and transformers' FineGrainedFP8, what the
  hf-fp8 and compressed-tensors exports declare): every input ``x [M, K]`` is quantized at run
  time per token (row) and per group of G_x input channels, G_x = B (all of K per channel):
  ``x_scale[m, g] = amax(|x[m, gG_x : (g+1)G_x]|) / 448`` (float32; a partial last group from its
  own elements, an all-zero group 1.0), ``x_q = e4m3(clamp(x / x_scale, -448, 448))``, and
  ``y[m, n] = sum_k x_q[m, k] x_scale[m, k // G_x] * W_hat[n, k]``.
- ``"none"`` (weight-only, W8A16): ``y = x @ W_hat.T`` with x as it is.
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

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448.0
DYNAMIC = "dynamic"  # W8A8: activations quantized per token and group at run time
WEIGHT_ONLY = "none"  # W8A16: activations multiply as they are
ACTIVATIONS = (DYNAMIC, WEIGHT_ONLY)


@dataclass(frozen=True)
class FP8Config:
    """block_size: B for B x B blocks (128: DeepSeek-V3 / transformers ``weight_block_size``),
    or None for one scale per output channel.
    activations: ``"dynamic"`` (W8A8: inputs quantized to fp8 per token and group at run time)
    or ``"none"`` (weight-only)."""

    block_size: int | None = 128
    activations: str = DYNAMIC

    def __post_init__(self):
        valid = self.block_size is None or (
            isinstance(self.block_size, int) and not isinstance(self.block_size, bool) and self.block_size > 0
        )
        if not valid:
            raise CodecError(f"fp8: block_size must be a positive int or None, got {self.block_size!r}")
        if self.activations not in ACTIVATIONS:
            raise CodecError(f"fp8: activations must be one of {ACTIVATIONS}, got {self.activations!r}")

    def input_group(self, k: int) -> int:
        """G_x for a weight with K input features: the input channels that share one activation
        scale per token (B, or K per channel); 0 when the activations are not quantized."""
        return (self.block_size or k) if self.activations == DYNAMIC else 0


def _blocks(w: torch.Tensor, b: int) -> torch.Tensor:
    """w: [N, K]. Returns [ceil(N/B), B, ceil(K/B), B], edge blocks padded with zeros."""
    n, k = w.shape
    padded = torch.nn.functional.pad(w, (0, -k % b, 0, -n % b))
    return padded.unflatten(1, (-1, b)).unflatten(0, (-1, b))


def _expand_block_scale(scale: torch.Tensor, b: int, n: int, k: int) -> torch.Tensor:
    """scale: [ceil(N/B), ceil(K/B)]. Returns the scale of every element, [N, K]."""
    return scale.repeat_interleave(b, dim=0)[:n].repeat_interleave(b, dim=1)[:, :k]


def _positive(scale: torch.Tensor) -> torch.Tensor:
    """An all-zero (or underflowing) row or block gets scale 1.0."""
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _scale(w: torch.Tensor, b: int | None) -> torch.Tensor:
    """w: [N, K] float32. Returns scale [N] (per channel) or [ceil(N/B), ceil(K/B)] = amax / 448."""
    if b is None:
        return _positive(w.abs().amax(dim=1) / FP8_MAX)  # [N]: scale = amax / 448
    return _positive(_blocks(w, b).abs().amax(dim=(1, 3)) / FP8_MAX)  # [N/B, K/B]: scale = block amax / 448


def activations_of(params: dict) -> str:
    """The activations mode an fp8 weight's params record; fails on params that record none
    (checkpoints from before ernieq computed W8A8, when it ran every fp8 weight weight-only)."""
    mode = params.get("activations")
    if mode not in ACTIVATIONS:
        raise CodecError(f"fp8 params {params} do not say how activations are computed (activations: one of "
                         f"{ACTIVATIONS}); quantize the checkpoint again")
    return mode


def quantize_activations(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x: float [M, K]; group: G_x. Returns x_q float8_e4m3fn [M, K] and x_scale float32 [M, ceil(K/G_x)],
    ``x_scale = amax / 448`` per token and group of G_x input channels (the last group may be partial)."""
    k = x.shape[1]
    groups = torch.nn.functional.pad(x.float(), (0, -k % group)).unflatten(1, (-1, group))  # [M, K/G, G]
    scale = _positive(groups.abs().amax(dim=2) / FP8_MAX)  # [M, K/G]: x_scale = amax / 448
    x_q = (groups / scale[:, :, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)  # [M, K/G, G]
    return x_q.flatten(1)[:, :k], scale


def dequantize_activations(x_q: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    """x_q: float8_e4m3fn [M, K]; scale: float32 [M, ceil(K/G_x)]. Returns float32 x_hat [M, K] = x_q * x_scale."""
    k = x_q.shape[1]
    return x_q.float() * scale.repeat_interleave(group, dim=1)[:, :k]  # x_hat[m, k] = x_q[m, k] * x_scale[m, k // G]


@register_codec("fp8", FP8Config)
class FP8Codec(CodecBase):
    config: FP8Config

    def encode(
        self, weight: torch.Tensor, stats: CalibrationStats | None = None, *, name: str = "weight"
    ) -> QuantizedTensor:
        """weight: [N, K], any float dtype. stats: unused by round to nearest.

        Returns qweight float8_e4m3fn [N, K] and scale float32 ([N] or [ceil(N/B), ceil(K/B)]).
        """
        w = check_weight(weight, name)  # [N, K] float32
        n, k = w.shape
        b = self.config.block_size
        scale = _scale(w, b)  # [N] or [N/B, K/B]
        full_scale = scale[:, None] if b is None else _expand_block_scale(scale, b, n, k)  # [N, 1] or [N, K]
        # clamp: w / scale may round a hair past 448, which e4m3fn (no inf) would turn into NaN
        qweight = (w / full_scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)  # [N, K]
        return QuantizedTensor(self.name, (n, k), {"qweight": qweight, "scale": scale}, dataclasses.asdict(self.config))

    def decode(self, q: QuantizedTensor) -> torch.Tensor:
        """q: shape (N, K). Returns float32 W_hat [N, K] = qweight * scale (per row or block)."""
        self._check_layout(q)
        n, k = q.shape
        scale = q.tensors["scale"]
        b = self.config.block_size
        full_scale = scale[:, None] if b is None else _expand_block_scale(scale, b, n, k)  # [N, 1] or [N, K]
        return q.tensors["qweight"].float() * full_scale  # [N, K]

    def round_activations(self, x: torch.Tensor) -> torch.Tensor:
        """x: float32 [M, K]. W8A8: x_hat = x_q * x_scale, quantized per token and group; weight-only: x."""
        group = self.config.input_group(x.shape[1])
        return dequantize_activations(*quantize_activations(x, group), group) if group else x

    def _check_layout(self, q: QuantizedTensor) -> None:
        """Fail loudly when ``q`` is not an fp8 tensor of this config and its own shape."""
        if q.codec == self.name:
            activations_of(q.params)
        b = self.config.block_size

        def layout(n: int, k: int) -> Layout:
            scale_shape = (n,) if b is None else (-(-n // b), -(-k // b))  # [N] or [ceil(N/B), ceil(K/B)]
            return {"qweight": (FP8_DTYPE, (n, k)), "scale": (torch.float32, scale_shape)}

        check_layout(self, q, layout)


class FP8Columns:
    """fp8's rounding step inside GPTQ's column loop, one column (``unit = 1``) at a time.

    Per channel (``group = 0``): the scale is fixed up front from the whole row.
    Per B x B block (``group = B``): a block column's scales are set from the
    current, error-updated weights when the loop reaches its first column
    (``start_group``), or up front with ``static_groups`` (activation order).
    """

    unit = 1

    def __init__(self, codec: FP8Codec, weight: torch.Tensor, static_groups: bool):
        self.codec = codec
        w = weight.float()
        self.n, self.k = w.shape
        self.b = codec.config.block_size
        self.group = self.b or 0
        if self.b is None or static_groups:
            self.scale = _scale(w, self.b)  # [N] or [N/B, K/B]
        else:
            self.scale = torch.ones(-(-self.n // self.b), -(-self.k // self.b), device=w.device)
        self.qweight = torch.zeros(w.shape, dtype=FP8_DTYPE, device=w.device)  # [N, K]

    def start_group(self, col: int, w: torch.Tensor) -> None:
        """col: the block column's first column; w: [N, <= B] its current values."""
        self.scale[:, col // self.b] = _scale(w.float(), self.b)[:, 0]  # [N/B]

    def _column_scale(self, col: int) -> torch.Tensor:
        """The scale of every row of column ``col``, [N, 1]."""
        if self.b is None:
            return self.scale[:, None]
        return self.scale[:, col // self.b].repeat_interleave(self.b)[: self.n, None]

    def round(self, col: int, w: torch.Tensor, hinv: torch.Tensor | None = None) -> torch.Tensor:
        """w: [N, 1] the current column ``col``. Returns its dequantized value [N, 1]."""
        s = self._column_scale(col)  # [N, 1]
        q = (w / s).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)  # e4m3fn has no inf: clamp first
        self.qweight[:, col : col + 1] = q
        return q.float() * s

    def result(self) -> QuantizedTensor:
        tensors = {"qweight": self.qweight, "scale": self.scale}
        return QuantizedTensor(self.codec.name, (self.n, self.k), tensors, dataclasses.asdict(self.codec.config))


def _row_block_scale(w: torch.Tensor, b: int) -> torch.Tensor:
    """w: [E, N, span] one block column of E experts. Returns its scales [E, ceil(N/B)] = block amax / 448."""
    e, n, _ = w.shape
    amax = torch.nn.functional.pad(w.abs().amax(dim=-1), (0, -n % b))  # [E, N padded]
    return _positive(amax.unflatten(1, (-1, b)).amax(dim=-1) / FP8_MAX)  # scale = block amax / 448


class FP8ExpertColumns:
    """fp8's rounding step for E experts at once (``ernieq.calibration.gptq_experts``): one column
    of all experts, transposed (w [E, 1, N]), per call.

    Scales as :class:`FP8Columns` sets them, per expert: per channel up front, or per B x B
    block from the current weights at each block column's first column (or up front from W
    when ``order`` is given). Codes are kept K-major ([E, K, N]).
    """

    unit = 1

    def __init__(self, codec: FP8Codec, weight: torch.Tensor, order: torch.Tensor | None, stats=None):
        """weight: float32 [E, N, K]; order: int64 [E, K] (loop position -> column) or None."""
        self.codec = codec
        e, self.n, self.k = weight.shape
        self.b = codec.config.block_size
        self.group = self.b or 0
        if self.b is None:
            self.scale = _scale(weight.reshape(e * self.n, self.k), None).reshape(e, self.n)  # [E, N]
        elif order is not None:
            self.scale = torch.stack([_scale(w, self.b) for w in weight])  # [E, N/B, K/B]
        else:
            self.scale = torch.ones(e, -(-self.n // self.b), -(-self.k // self.b), device=weight.device)
        self.qweight = torch.zeros(e, self.k, self.n, dtype=FP8_DTYPE, device=weight.device)  # [E, K, N]
        self.order = order
        self.experts = torch.arange(e, device=weight.device)

    def start_group(self, col: int, w: torch.Tensor) -> None:
        """col: the block column's first column; w: [E, <= B, N] its current values."""
        self.scale[:, :, col // self.b] = _row_block_scale(w.transpose(1, 2), self.b)  # [E, N/B]

    def _column_scale(self, j: int) -> torch.Tensor:
        """The scale of every row of the column at loop position j, [E, 1, N]."""
        if self.b is None:
            return self.scale[:, None]
        if self.order is None:
            s = self.scale[:, :, j // self.b]  # [E, N/B]
        else:
            s = self.scale[self.experts, :, self.order[:, j] // self.b]  # [E, N/B]
        return s.repeat_interleave(self.b, dim=1)[:, None, : self.n]

    def round(self, j: int, w: torch.Tensor, m: torch.Tensor | None = None) -> torch.Tensor:
        """w: [E, 1, N] the column at loop position j. Returns its dequantized value [E, 1, N]."""
        s = self._column_scale(j)  # [E, 1, N]
        q = (w / s).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)  # e4m3fn has no inf: clamp first
        if self.order is None:
            self.qweight[:, j : j + 1] = q
        else:
            self.qweight[self.experts, self.order[:, j]] = q[:, 0]
        return q.float() * s

    def result(self) -> list[QuantizedTensor]:
        params = dataclasses.asdict(self.codec.config)
        return [
            QuantizedTensor(self.codec.name, (self.n, self.k),
                            {"qweight": self.qweight[e].t().contiguous(), "scale": self.scale[e].clone()}, params)
            for e in range(self.qweight.shape[0])
        ]


FP8Codec.columns, FP8Codec.expert_columns = FP8Columns, FP8ExpertColumns
