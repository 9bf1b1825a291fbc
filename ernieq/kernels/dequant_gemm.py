"""Fused dequant-GEMM: y[M, N] = x[M, K] @ W_hat[N, K].T (+ bias), decoding W inside the K loop.

Shape legend: M rows of x, K input features, N output features, G group size.

One kernel for every codec (the ``CODEC`` enum constexpr picks the decode step
in ``ernieq.kernels.tiles``); W_hat never exists in memory. Small M splits K
across programs (``SPLIT_K``) and sums the float32 slices afterwards, so a
GEMV still puts every SM to work streaming the packed weight. fp8's W8A8 first
quantizes x per token and group (``ernieq.kernels.act_quant``) and multiplies
the fp8 codes (the ``X`` enum).

Importing this module defines the Triton kernels: set ``TRITON_INTERPRET=1``
before the first import to run them on the CPU (``ernieq.kernels.ops`` does it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ernieq.codecs import QuantizedTensor
from ernieq.kernels.act_quant import act_quant
from ernieq.kernels.args import KernelError, check_linear_args
from ernieq.kernels.configs import TileConfig, linear_config
from ernieq.kernels.operands import KernelOperand, operand_for
from ernieq.kernels.tiles import X_FLOAT, X_FP8, accumulate_k_tile, grouped_tile, load_code_params


@triton.jit
def _linear_kernel(
    # pointers
    x_ptr, xs_ptr, y_ptr, bias_ptr,
    q_ptr, s_ptr, z_ptr, c_ptr, cs_ptr, cz_ptr,
    # sizes
    M, N, K, TILES_PER_SPLIT,
    # strides
    stride_xm, stride_xk, stride_xsm, stride_xsk, stride_ys, stride_ym, stride_yn,
    stride_qn, stride_qk, stride_sn, stride_sk,
    # quantization parameters
    x_group,
    CODEC: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, SCALE_PER_TILE: tl.constexpr,
    HAS_CHANNEL_SCALE: tl.constexpr, X: tl.constexpr,
    # meta-parameters
    HAS_BIAS: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """Program (pid, pid_k) computes y[BLOCK_M, BLOCK_N] over its K slice (all of K when SPLIT_K = 1)."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = grouped_tile(pid, (M + BLOCK_M - 1) // BLOCK_M, (N + BLOCK_N - 1) // BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    row_mask = offs_m < M
    n_mask = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm  # [BM, 1]
    xs_rows = xs_ptr + offs_m.to(tl.int64) * stride_xsm  # [BM]: each row's activation scales (W8A8)
    cs, cz = load_code_params(cs_ptr, cz_ptr, offs_n, n_mask, CODEC)

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    first_tile = pid_k * TILES_PER_SPLIT
    last_tile = min(first_tile + TILES_PER_SPLIT, (K + BLOCK_K - 1) // BLOCK_K)
    for t in range(first_tile, last_tile):
        acc = accumulate_k_tile(acc, x_rows, xs_rows, row_mask, t * BLOCK_K, K, stride_xk, x_group, stride_xsk,
                                offs_n, n_mask, q_ptr, s_ptr, z_ptr, stride_qn, stride_qk, stride_sn, stride_sk,
                                cs, cz, CODEC, GROUP, HAS_ZERO, SCALE_PER_TILE, X, BLOCK_K, DOT, PRECISION)

    if HAS_CHANNEL_SCALE:
        acc *= tl.load(c_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]  # y *= scale[n]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + pid_k * stride_ys + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


def is_interpreted() -> bool:
    """True when this module's kernels run under the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    return not isinstance(_linear_kernel, triton.runtime.JITFunction)


def dot_dtype(x_dtype: torch.dtype) -> tuple[tl.dtype, str]:
    """The dtype the tiles are multiplied in, and the fp32 dot precision.

    16-bit activations multiply in their own dtype (decoded codes are small
    integers or fp8 values, exact in bf16/fp16). fp32 uses IEEE dots, not TF32.
    The interpreter cannot ``tl.dot`` bfloat16 (numpy has no bf16; it would
    multiply the raw bits), so under it every dot runs in float32.
    """
    if is_interpreted() or x_dtype == torch.float32:
        return tl.float32, "ieee"
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[x_dtype], "tf32"


def kernel_input(x: torch.Tensor, op: KernelOperand) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """x as the kernels read it for the weight ``op``: (x or x_q, x_scale, x_group, the ``X`` enum).

    x: float [M, K]. W8A8 (``op.x_group`` > 0): x_q float8_e4m3fn [M, K] and x_scale float32
    [M, ceil(K/x_group)]; otherwise x itself, with x in the scale's place (never read).
    """
    if not op.x_group:
        return x, x, 1, X_FLOAT
    x_q, x_scale = act_quant(x, op.x_group)  # per token and group: x_scale = amax / 448
    return x_q, x_scale, op.x_group, X_FP8


def check_device(x: torch.Tensor, op: KernelOperand, what: str) -> None:
    """The activations and every stored tensor on one device, and a device the kernels can run on."""
    bad = [t.device for t in op.pointers() if t.device != x.device]
    if bad:
        raise KernelError(f"{what}: weights on {bad[0]} but x on {x.device}")
    if x.device.type != "cuda" and not is_interpreted():
        raise KernelError(
            f"{what}: Triton kernels need a CUDA tensor, got {x.device}; to run them on the CPU set "
            "TRITON_INTERPRET=1 before ernieq.kernels' Triton modules are first imported"
        )


def linear(
    x: torch.Tensor, q: QuantizedTensor, bias: torch.Tensor | None = None, config: TileConfig | None = None
) -> torch.Tensor:
    """y = x @ W_hat.T (+ bias), W decoded inside the kernel (fp8 W8A8: x quantized per token and group first).

    x: float32/bfloat16/float16 [M, K]; q: shape (N, K); bias: [N] or None.
    Returns [M, N] in x.dtype. config: tile sizes (default: ``ernieq.kernels.configs.linear_config``).
    """
    check_linear_args(x, q, bias)
    op = operand_for(q)
    check_device(x, op, f"linear({q.codec})")
    (m, k), n = x.shape, q.shape[0]
    cfg = config or linear_config(m, n, k, x.device, is_interpreted(), codec=q.codec)
    block_k, scale_per_tile = op.block_k(cfg.block_k)
    k_tiles = triton.cdiv(k, block_k)
    split_k = min(cfg.split_k, k_tiles)
    tiles_per_split = triton.cdiv(k_tiles, split_k)
    split_k = triton.cdiv(k_tiles, tiles_per_split)  # no empty slices
    if split_k == 1:
        y = torch.empty((m, n), dtype=x.dtype, device=x.device)
        y_strides = (0, y.stride(0), y.stride(1))
    else:
        y = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)  # partial sums over K slices
        y_strides = y.stride()
    fuse_bias = bias is not None and split_k == 1
    dot, precision = dot_dtype(x.dtype)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), split_k)
    if m > 0:
        x_in, x_scale, x_group, x_mode = kernel_input(x, op)
        _linear_kernel[grid](
            x_in, x_scale, y, bias if fuse_bias else x,
            *op.pointers(),
            m, n, k, tiles_per_split,
            x_in.stride(0), x_in.stride(1), x_scale.stride(0), x_scale.stride(1), *y_strides,
            op.stride_qn, op.stride_qk, op.stride_sn, op.stride_sk,
            x_group,
            CODEC=op.codec_id, GROUP=op.group, HAS_ZERO=op.has_zero, SCALE_PER_TILE=scale_per_tile,
            HAS_CHANNEL_SCALE=op.has_channel_scale, X=x_mode,
            HAS_BIAS=fuse_bias, DOT=dot, PRECISION=precision,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k, GROUP_M=cfg.group_m,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
    if split_k == 1:
        return y
    out = y.sum(dim=0)  # [M, N]: sum of the K slices
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype)
