"""How each codec's stored tensors map onto the kernels' weight-operand roles.

Shape legend: E experts, K input features, N output features, G group size.

A kernel never sees a ``QuantizedTensor``; it sees a :class:`KernelOperand`: the
stored tensors in fixed roles, their strides named by logical axis, and the
compile-time facts of the codec. One builder per codec, found by registry.

Roles (``-`` = unused, a placeholder pointer is passed; ccq2 also passes
``code_scale`` and ``code_zp`` float32 [N]):

| codec       | codes (q)                   | K scale (s)             | zero (z)      | channel (c)      |
|-------------|-----------------------------|-------------------------|---------------|------------------|
| wint8       | qweight int8 [N, K]         | -                       | -             | scale [N]        |
| wint4       | qweight uint8 [N, K/2]      | scale [N, K/G]          | zero [N, K/G] | -                |
| fp8 channel | qweight e4m3 [N, K]         | -                       | -             | scale [N]        |
| fp8 block B | qweight e4m3 [N, K]         | scale [N/B, K/B]        | -             | -                |
| ccq2        | quant_weight uint8 [K/4, N] | weight_scale [K/128, N] | -             | super_scales [N] |

Stacks carry a leading E dimension on every tensor; a single weight gets expert stride 0.

fp8 with ``activations="dynamic"`` (W8A8) also sets ``x_group``: the kernels then read x
quantized to e4m3 per token and group of ``x_group`` input channels (B, or K per channel).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

from ernieq.codecs import QuantizedTensor
from ernieq.codecs.fp8 import FP8Config, activations_of
from ernieq.kernels.args import KernelError

# The codec ids of ernieq.kernels.tiles (WINT8, WINT4, FP8, CCQ2).
CODEC_IDS = {"wint8": 0, "wint4": 1, "fp8": 2, "ccq2": 3}
CCQ2_GROUP = 64  # rows of K per ccq2 local scale


@dataclass(frozen=True)
class KernelOperand:
    """One weight (or a stack) as a kernel reads it.

    codes/scale/zero/channel/code_scale/code_zp: tensors in the roles above.
    stride_*: element strides; ``q``: codes, ``s``: scale and zero, ``c``: the [N] vectors;
      ``e`` one expert, ``n`` one output channel (or scale row), ``k`` one packed K unit (or scale column).
    group: G for wint4, B for fp8 blocks, 0 otherwise.
    k_multiple: BLOCK_K must be a multiple of this.
    x_group: W8A8 (fp8 weights and activations): x is quantized to fp8 per token and group of
      x_group input channels before the GEMM; 0: x multiplies as it is.
    """

    codec_id: int
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    channel: torch.Tensor
    code_scale: torch.Tensor
    code_zp: torch.Tensor
    stride_qe: int
    stride_qn: int
    stride_qk: int
    stride_se: int
    stride_sn: int
    stride_sk: int
    stride_ce: int
    group: int = 0
    has_zero: bool = False
    has_channel_scale: bool = False
    k_multiple: int = 16
    x_group: int = 0

    def pointers(self) -> tuple[torch.Tensor, ...]:
        """The six weight pointers in kernel order: q, s, z, c, code_scale, code_zp."""
        return self.codes, self.scale, self.zero, self.channel, self.code_scale, self.code_zp

    def block_k(self, preferred: int) -> tuple[int, bool]:
        """BLOCK_K near ``preferred`` (a power of two) and whether the K scale is constant over a tile.

        With a K scale per ``group`` columns the tile shrinks to the largest power of two
        (>= k_multiple) that divides the group, so the scale leaves the dot; when none
        exists (an fp8 block size like 100) the scale is applied element by element.
        """
        bk = -(-max(preferred, self.k_multiple) // self.k_multiple) * self.k_multiple  # round up
        if self.group:
            fits = [p for p in (256, 128, 64, 32, 16) if self.k_multiple <= p <= bk and self.group % p == 0]
            bk = fits[0] if fits else bk
        return bk, self.group == 0 or self.group % bk == 0


_BUILDERS: dict[str, Callable[[QuantizedTensor], KernelOperand]] = {}


def register_operand(codec: str):
    """Decorator: the builder of ``codec``'s kernel operand."""

    def wrap(fn):
        _BUILDERS[codec] = fn
        return fn

    return wrap


def operand_for(q: QuantizedTensor) -> KernelOperand:
    """The kernel operand of ``q`` (shape (N, K) or a stack (E, N, K)); fails loudly on a bad layout."""
    if q.codec not in _BUILDERS:
        raise KernelError(f"no Triton kernel for codec {q.codec!r}; kernels exist for {sorted(_BUILDERS)}")
    if len(q.shape) not in (2, 3):
        raise KernelError(f"{q.codec}: weight shape must be (N, K) or (E, N, K), got {q.shape}")
    return _BUILDERS[q.codec](q)


def _stored(q: QuantizedTensor, name: str, dtypes: tuple[torch.dtype, ...], shape: tuple[int, ...]) -> torch.Tensor:
    """q.tensors[name], checked for dtype and its per-weight shape, made contiguous, with a leading E."""
    if name not in q.tensors:
        raise KernelError(f"{q.codec}: stored tensor {name!r} missing (have {sorted(q.tensors)})")
    t = q.tensors[name]
    lead = tuple(q.shape[:-2])  # (E,) or ()
    if t.dtype not in dtypes or tuple(t.shape) != lead + shape:
        raise KernelError(
            f"{q.codec}: stored tensor {name!r} must be {[str(d) for d in dtypes]} {lead + shape}, "
            f"got {t.dtype} {tuple(t.shape)} for a weight of shape {q.shape}"
        )
    t = t.contiguous()
    return t if lead else t.unsqueeze(0)


def _expert_stride(q: QuantizedTensor, t: torch.Tensor) -> int:
    return t.stride(0) if len(q.shape) == 3 else 0


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _one_byte_per_code(q: QuantizedTensor, codec: str, dtype: torch.dtype) -> KernelOperand:
    """wint8 and per-channel fp8: qweight [E, N, K] of ``dtype``, a float32 scale [E, N] per channel."""
    n, k = q.shape[-2:]
    codes = _stored(q, "qweight", (dtype,), (n, k))  # [E, N, K]
    scale = _stored(q, "scale", (torch.float32,), (n,))  # [E, N]
    return KernelOperand(
        CODEC_IDS[codec], codes, codes, codes, scale, scale, scale,
        stride_qe=_expert_stride(q, codes), stride_qn=codes.stride(1), stride_qk=codes.stride(2),
        stride_se=0, stride_sn=0, stride_sk=0, stride_ce=_expert_stride(q, scale),
        has_channel_scale=True,
    )  # fmt: skip


@register_operand("wint8")
def _wint8(q: QuantizedTensor) -> KernelOperand:
    return _one_byte_per_code(q, "wint8", torch.int8)


@register_operand("wint4")
def _wint4(q: QuantizedTensor) -> KernelOperand:
    n, k = q.shape[-2:]
    g = int(q.params["group_size"] or k)  # None: one group per output channel
    codes = _stored(q, "qweight", (torch.uint8,), (n, _cdiv(k, 2)))  # [E, N, K/2]
    scale = _stored(q, "scale", (torch.float32, torch.float16), (n, _cdiv(k, g)))  # [E, N, K/G]
    has_zero = not q.params["symmetric"]
    zero = _stored(q, "zero", (torch.uint8,), (n, _cdiv(k, g))) if has_zero else scale  # [E, N, K/G]
    return KernelOperand(
        CODEC_IDS["wint4"], codes, scale, zero, scale, scale, scale,
        stride_qe=_expert_stride(q, codes), stride_qn=codes.stride(1), stride_qk=codes.stride(2),
        stride_se=_expert_stride(q, scale), stride_sn=scale.stride(1), stride_sk=scale.stride(2), stride_ce=0,
        group=g, has_zero=has_zero, k_multiple=32,
    )  # fmt: skip


@register_operand("fp8")
def _fp8(q: QuantizedTensor) -> KernelOperand:
    n, k = q.shape[-2:]
    activations_of(q.params)  # recorded since W8A8: fails on older params rather than guess
    config = FP8Config(**q.params)
    b = config.block_size
    if b is None:
        return dataclasses.replace(_one_byte_per_code(q, "fp8", torch.float8_e4m3fn), x_group=config.input_group(k))
    codes = _stored(q, "qweight", (torch.float8_e4m3fn,), (n, k))  # [E, N, K]
    scale = _stored(q, "scale", (torch.float32,), (_cdiv(n, b), _cdiv(k, b)))  # [E, N/B, K/B]
    return KernelOperand(
        CODEC_IDS["fp8"], codes, scale, scale, scale, scale, scale,
        stride_qe=_expert_stride(q, codes), stride_qn=codes.stride(1), stride_qk=codes.stride(2),
        stride_se=_expert_stride(q, scale), stride_sn=scale.stride(1), stride_sk=scale.stride(2), stride_ce=0,
        group=b, x_group=config.input_group(k),
    )  # fmt: skip


@register_operand("ccq2")
def _ccq2(q: QuantizedTensor) -> KernelOperand:
    n, k = q.shape[-2:]
    floats = (torch.float32, torch.float16, torch.bfloat16)
    codes = _stored(q, "quant_weight", (torch.uint8,), (_cdiv(k, 4), n))  # [E, K/4, N]
    local = _stored(q, "weight_scale", (torch.uint8,), (_cdiv(k, 2 * CCQ2_GROUP), n))  # [E, K/128, N]
    super_scales = _stored(q, "super_scales", floats, (n,))  # [E, N]
    code_scale = _stored(q, "code_scale", (torch.float32,), (n,))  # [E, N]
    code_zp = _stored(q, "code_zp", (torch.float32,), (n,))  # [E, N]
    if not (super_scales.stride() == code_scale.stride() == code_zp.stride()):
        raise KernelError("ccq2: super_scales, code_scale and code_zp must share one layout")
    return KernelOperand(
        CODEC_IDS["ccq2"], codes, local, local, super_scales, code_scale, code_zp,
        stride_qe=_expert_stride(q, codes), stride_qn=codes.stride(2), stride_qk=codes.stride(1),
        stride_se=_expert_stride(q, local), stride_sn=local.stride(2), stride_sk=local.stride(1),
        stride_ce=_expert_stride(q, code_scale),
        has_channel_scale=True, k_multiple=CCQ2_GROUP,
    )  # fmt: skip
