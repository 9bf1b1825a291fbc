"""Dynamic activation quantization for W8A8 FP8: x[M, K] -> x_q[M, K] float8_e4m3fn, x_scale[M, ceil(K/G)] float32.

    x_scale[m, g] = max_{k in group g} |x[m, k]| / 448         (1.0 for an all-zero group)
    x_q[m, k]     = e4m3(clamp(x[m, k] / x_scale[m, k // G], -448, 448))

Shape legend: M rows of x (tokens), K input features, G group size (input channels per scale).

DeepSeek-V3's ``act_quant`` convention, per token and group of G input channels; the last
group may be partial (its scale from its own elements). Bit for bit
``ernieq.codecs.fp8.quantize_activations``: both divisions round to nearest (``div_rn``, as
torch divides), and the rounding to e4m3 is done here in float32 (:func:`_round_e4m3`), so the
final cast only ever sees values e4m3 holds exactly. (Triton 3.9's interpreter casts float32 to
fp8 without carrying a rounding into the exponent: 31.6 becomes 16, not 32.)

Importing this module defines the Triton kernel (see ``ernieq.kernels.dequant_gemm``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ernieq.kernels.args import KernelError

FP8_MAX = tl.constexpr(448.0)  # the largest float8_e4m3fn value
RINT_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2^23: (t + RINT_MAGIC) - RINT_MAGIC = rint(t) for |t| < 2^22


@triton.jit
def _abs_max(a, b):
    return tl.maximum(a, b)


@triton.jit
def _round_e4m3(v):
    """v: float32 in [-448, 448]. Returns v rounded to the nearest e4m3 value (ties to even), as float32.

    e4m3 keeps 3 mantissa bits: values in [2^e, 2^(e+1)) step by 2^(e-3); below 2^-6 (subnormals)
    by 2^-9. So v = rint(|v| / step) * step, with the sign put back (a negative that rounds to
    zero stays -0, as torch casts it).
    """
    bits = v.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127  # the exponent of v (-127 for 0)
    s = tl.maximum(e, -6) - 3  # step = 2^s
    step = ((s + 127) << 23).to(tl.float32, bitcast=True)  # 2^s
    inv_step = ((127 - s) << 23).to(tl.float32, bitcast=True)  # 2^-s: the products below are exact
    q = ((tl.abs(v) * inv_step + RINT_MAGIC) - RINT_MAGIC) * step  # rint(|v| / step) * step
    return tl.where(bits < 0, -q, q)


@triton.jit
def _act_quant_kernel(
    # pointers
    x_ptr, xq_ptr, s_ptr,
    # sizes
    M, K, G,
    # strides
    stride_xm, stride_xk, stride_qm, stride_qk, stride_sm, stride_sg,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Program (pid_m, g) quantizes rows [pid_m * BLOCK_M, +BLOCK_M) of group g: a pass for the amax, one to round."""
    pid_m = tl.program_id(0)
    g = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    row_mask = offs_m < M
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm  # [BM, 1]
    q_rows = xq_ptr + offs_m.to(tl.int64)[:, None] * stride_qm  # [BM, 1]
    k_start = g * G
    k_end = min(k_start + G, K)

    amax = tl.full((BLOCK_M,), 0.0, tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)  # [BK]
        mask = row_mask[:, None] & (ks[None, :] < k_end)
        x = tl.load(x_rows + ks[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)  # [BM, BK]
        amax = tl.maximum(amax, tl.reduce(tl.abs(x), 1, _abs_max))  # [BM]
    scale = tl.div_rn(amax, FP8_MAX)  # x_scale = amax / 448
    scale = tl.where(scale > 0, scale, 1.0)  # an all-zero (or underflowing) group
    tl.store(s_ptr + offs_m.to(tl.int64) * stride_sm + g * stride_sg, scale, mask=row_mask)

    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)  # [BK]
        mask = row_mask[:, None] & (ks[None, :] < k_end)
        x = tl.load(x_rows + ks[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)  # [BM, BK]
        v = tl.clamp(tl.div_rn(x, scale[:, None]), -FP8_MAX, FP8_MAX)  # x / x_scale, clamped: e4m3fn has no inf
        tl.store(q_rows + ks[None, :] * stride_qk, _round_e4m3(v).to(xq_ptr.dtype.element_ty), mask=mask)


def act_quant(x: torch.Tensor, group: int, block_m: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """x: float32/bfloat16/float16 [M, K]; group: G > 0.

    Returns x_q float8_e4m3fn [M, K] and x_scale float32 [M, ceil(K/G)], on x's device.
    """
    if x.ndim != 2 or group <= 0:
        raise KernelError(f"act_quant: x must be [M, K] and the group positive, got {tuple(x.shape)} and {group}")
    m, k = x.shape
    n_groups = triton.cdiv(k, group)
    x_q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((m, n_groups), dtype=torch.float32, device=x.device)
    if m > 0:
        _act_quant_kernel[(triton.cdiv(m, block_m), n_groups)](
            x, x_q, scale,
            m, k, group,
            x.stride(0), x.stride(1), x_q.stride(0), x_q.stride(1), scale.stride(0), scale.stride(1),
            BLOCK_M=block_m, BLOCK_K=min(triton.next_power_of_2(group), 128),
        )  # fmt: skip
    return x_q, scale
