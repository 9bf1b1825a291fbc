"""Fused MoE: out[t] = sum_a w[t, a] * down_e(silu(gate_e x_t) * up_e x_t), weights decoded in the K loop.

Shape legend: T tokens, H hidden size, I expert intermediate size, E experts,
A active experts per token, P = T * A token-expert pairs.

vLLM-style grouped GEMM: pairs are sorted by expert and padded to BLOCK_M
(``ernieq.kernels.moe_align``), so every M block multiplies one expert's weights.
Two kernels, any codec (the ``CODEC`` enum of ``ernieq.kernels.tiles``):

1. gate/up: h[p] = silu(x[t] @ gate_e.T) * (x[t] @ up_e.T), both products in one
   program, SiLU-and-multiply in the epilogue; h [P, I] in x.dtype (float32 when down
   quantizes it: W8A8 rounds h once, to fp8, not first to x.dtype).
2. down: o[p] = w[p] * (h[p] @ down_e.T), the routing weight in the epilogue;
   o [P, H] float32, then summed over A per token.

fp8's W8A8 quantizes each kernel's input first (``ernieq.kernels.act_quant``): x once per
token for gate and up, h once per pair for down.

Importing this module defines the Triton kernels (see ``ernieq.kernels.dequant_gemm``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ernieq.kernels.args import KernelError, MoEWeights, check_moe_args
from ernieq.kernels.configs import TileConfig, moe_config
from ernieq.kernels.dequant_gemm import check_device, dot_dtype, is_interpreted, kernel_input
from ernieq.kernels.moe_align import moe_align_block_size
from ernieq.kernels.operands import KernelOperand, operand_for
from ernieq.kernels.tiles import accumulate_k_tile, grouped_tile, load_code_params


@triton.jit
def _expert_block(sorted_ids_ptr, expert_ids_ptr, num_post_ptr, num_pairs, EM, N,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's block: (pair ids [BM], pair mask [BM], expert, offs_n [BN], n mask, live)."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), (EM + BLOCK_M - 1) // BLOCK_M, (N + BLOCK_N - 1) // BLOCK_N, GROUP_M)

    live = pid_m * BLOCK_M < tl.load(num_post_ptr)  # blocks past the padded total do nothing
    pairs = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # [BM]
    pair_mask = pairs < num_pairs  # padding slots hold num_pairs
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    return pairs, pair_mask, expert, offs_n, offs_n < N, live & (expert >= 0)


@triton.jit
def _expert_gemm(rows, scale_rows, pair_mask, K, stride_k, x_group, stride_xsk, offs_n, n_mask, expert,
                 q_ptr, s_ptr, z_ptr, c_ptr, cs_ptr, cz_ptr,
                 stride_qe, stride_qn, stride_qk, stride_se, stride_sn, stride_sk, stride_ce,
                 CODEC: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, SCALE_PER_TILE: tl.constexpr,
                 HAS_CHANNEL_SCALE: tl.constexpr, X: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    """rows[BM, K] @ W_e[offs_n, :].T -> float32 [BM, BN]: expert e's weight decoded tile by tile along K,
    its per-channel scale applied in the epilogue; scale_rows [BM]: the rows' activation scales (W8A8)."""
    c_off = expert * stride_ce
    cs, cz = load_code_params(cs_ptr + c_off, cz_ptr + c_off, offs_n, n_mask, CODEC)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for t in range(0, (K + BLOCK_K - 1) // BLOCK_K):
        acc = accumulate_k_tile(acc, rows, scale_rows, pair_mask, t * BLOCK_K, K, stride_k, x_group, stride_xsk,
                                offs_n, n_mask,
                                q_ptr + expert * stride_qe, s_ptr + expert * stride_se, z_ptr + expert * stride_se,
                                stride_qn, stride_qk, stride_sn, stride_sk, cs, cz,
                                CODEC, GROUP, HAS_ZERO, SCALE_PER_TILE, X, BLOCK_K, DOT, PRECISION)
    if HAS_CHANNEL_SCALE:
        acc *= tl.load(c_ptr + c_off + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]  # y *= scale[n]
    return acc


@triton.jit
def _moe_gate_up_kernel(
    # pointers
    x_ptr, xs_ptr, h_ptr, sorted_ids_ptr, expert_ids_ptr, num_post_ptr,
    gq_ptr, gs_ptr, gz_ptr, gc_ptr, gcs_ptr, gcz_ptr,
    uq_ptr, us_ptr, uz_ptr, uc_ptr, ucs_ptr, ucz_ptr,
    # sizes
    num_pairs, EM, N, K,
    # strides
    stride_xm, stride_xk, stride_xsm, stride_xsk, stride_hm, stride_hn,
    stride_qe, stride_qn, stride_qk, stride_se, stride_sn, stride_sk, stride_ce,
    # quantization parameters
    x_group,
    CODEC: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, SCALE_PER_TILE: tl.constexpr,
    HAS_CHANNEL_SCALE: tl.constexpr, X: tl.constexpr,
    # meta-parameters
    TOP_K: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """h[pairs, offs_n] = silu(x[t] @ gate_e.T) * (x[t] @ up_e.T) for one expert block; N = I, K = H."""
    pairs, pair_mask, expert, offs_n, n_mask, live = _expert_block(
        sorted_ids_ptr, expert_ids_ptr, num_post_ptr, num_pairs, EM, N, BLOCK_M, BLOCK_N, GROUP_M)
    if live:
        tokens = pairs // TOP_K  # [BM]: pair p reads token p // A
        x_rows = x_ptr + tokens[:, None] * stride_xm  # [BM, 1]
        xs_rows = xs_ptr + tokens * stride_xsm  # [BM]
        acc_g = _expert_gemm(x_rows, xs_rows, pair_mask, K, stride_xk, x_group, stride_xsk, offs_n, n_mask, expert,
                             gq_ptr, gs_ptr, gz_ptr, gc_ptr, gcs_ptr, gcz_ptr, stride_qe, stride_qn, stride_qk,
                             stride_se, stride_sn, stride_sk, stride_ce, CODEC, GROUP, HAS_ZERO, SCALE_PER_TILE,
                             HAS_CHANNEL_SCALE, X, BLOCK_M, BLOCK_N, BLOCK_K, DOT, PRECISION)  # x @ gate_e.T
        acc_u = _expert_gemm(x_rows, xs_rows, pair_mask, K, stride_xk, x_group, stride_xsk, offs_n, n_mask, expert,
                             uq_ptr, us_ptr, uz_ptr, uc_ptr, ucs_ptr, ucz_ptr, stride_qe, stride_qn, stride_qk,
                             stride_se, stride_sn, stride_sk, stride_ce, CODEC, GROUP, HAS_ZERO, SCALE_PER_TILE,
                             HAS_CHANNEL_SCALE, X, BLOCK_M, BLOCK_N, BLOCK_K, DOT, PRECISION)  # x @ up_e.T
        h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u  # silu(g) * u = g * sigmoid(g) * u
        h_ptrs = h_ptr + pairs[:, None] * stride_hm + offs_n[None, :] * stride_hn
        tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=pair_mask[:, None] & n_mask[None, :])


@triton.jit
def _moe_down_kernel(
    # pointers
    h_ptr, hs_ptr, o_ptr, topk_weights_ptr, sorted_ids_ptr, expert_ids_ptr, num_post_ptr,
    q_ptr, s_ptr, z_ptr, c_ptr, cs_ptr, cz_ptr,
    # sizes
    num_pairs, EM, N, K,
    # strides
    stride_hm, stride_hk, stride_hsm, stride_hsk, stride_om, stride_on,
    stride_qe, stride_qn, stride_qk, stride_se, stride_sn, stride_sk, stride_ce,
    # quantization parameters
    x_group,
    CODEC: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, SCALE_PER_TILE: tl.constexpr,
    HAS_CHANNEL_SCALE: tl.constexpr, X: tl.constexpr,
    # meta-parameters
    DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """o[pairs, offs_n] = w[pairs] * (h[pairs] @ down_e.T) for one expert block; N = H, K = I."""
    pairs, pair_mask, expert, offs_n, n_mask, live = _expert_block(
        sorted_ids_ptr, expert_ids_ptr, num_post_ptr, num_pairs, EM, N, BLOCK_M, BLOCK_N, GROUP_M)
    if live:
        h_rows = h_ptr + pairs[:, None] * stride_hm  # [BM, 1]
        hs_rows = hs_ptr + pairs * stride_hsm  # [BM]
        acc = _expert_gemm(h_rows, hs_rows, pair_mask, K, stride_hk, x_group, stride_hsk, offs_n, n_mask, expert,
                           q_ptr, s_ptr, z_ptr, c_ptr, cs_ptr, cz_ptr, stride_qe, stride_qn, stride_qk,
                           stride_se, stride_sn, stride_sk, stride_ce, CODEC, GROUP, HAS_ZERO, SCALE_PER_TILE,
                           HAS_CHANNEL_SCALE, X, BLOCK_M, BLOCK_N, BLOCK_K, DOT, PRECISION)  # h @ down_e.T
        w = tl.load(topk_weights_ptr + pairs, mask=pair_mask, other=0.0).to(tl.float32)  # [BM]
        acc *= w[:, None]  # the routing weight w[t, a]
        o_ptrs = o_ptr + pairs[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty), mask=pair_mask[:, None] & n_mask[None, :])


def _quant_args(op: KernelOperand, x_mode: int, block_k: int, scale_per_tile: bool) -> tuple[list[int], dict]:
    """The operand's strides (kernel order) and its quantization constexprs; x_mode: the ``X`` enum."""
    strides = [op.stride_qe, op.stride_qn, op.stride_qk, op.stride_se, op.stride_sn, op.stride_sk, op.stride_ce]
    consts = dict(CODEC=op.codec_id, GROUP=op.group, HAS_ZERO=op.has_zero, SCALE_PER_TILE=scale_per_tile,
                  HAS_CHANNEL_SCALE=op.has_channel_scale, X=x_mode, BLOCK_K=block_k)  # fmt: skip
    return strides, consts


def moe(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    weights: MoEWeights,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """The routed experts of one layer, fused.

    x: float [T, H]; topk_ids: int [T, A]; topk_weights: float [T, A]; weights: gate, up (E, I, H)
    of one codec and params, down (E, H, I) of any codec, and down's rotation R, by which h is
    turned between the kernels; fp8 W8A8 quantizes x, and h, per token (pair) and group before
    their GEMMs. Returns [T, H] in x.dtype.
    config: tiles (default ``ernieq.kernels.configs.moe_config``); split_k is ignored.
    """
    check_moe_args(x, topk_ids, topk_weights, weights)
    gate, up, down = weights.projections
    if gate.codec != up.codec or gate.params != up.params:
        raise KernelError(
            f"fused moe: gate and up must share codec and params, got {gate.codec}{gate.params} "
            f"and {up.codec}{up.params}"
        )
    g_op, u_op, d_op = operand_for(gate), operand_for(up), operand_for(down)  # gate, up: one shape, one layout
    check_device(x, g_op, f"moe gate/up ({gate.codec})")
    check_device(x, u_op, f"moe gate/up ({up.codec})")
    check_device(x, d_op, f"moe down ({down.codec})")
    t, hidden = x.shape
    a = topk_ids.shape[1]
    e, inter, _ = gate.shape
    p = t * a
    cfg = config or moe_config(p, e, x.device, is_interpreted(), codec=gate.codec, n=inter, k=hidden)
    if p == 0:
        return torch.zeros((t, hidden), dtype=x.dtype, device=x.device)

    sorted_ids, expert_ids, num_post = moe_align_block_size(topk_ids, cfg.block_m, e)  # [EM], [EM/BM], [1]
    em = sorted_ids.numel()
    dot, precision = dot_dtype(x.dtype)
    meta = dict(DOT=dot, PRECISION=precision, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, GROUP_M=cfg.group_m,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)  # fmt: skip

    h = torch.empty((p, inter), dtype=torch.float32 if d_op.x_group else x.dtype, device=x.device)  # [P, I]
    x_in, x_scale, x_group, x_mode = kernel_input(x, g_op)  # gate and up share params, so one quantized x
    gu_strides, gu_consts = _quant_args(g_op, x_mode, *g_op.block_k(cfg.block_k))
    _moe_gate_up_kernel[(triton.cdiv(em, cfg.block_m) * triton.cdiv(inter, cfg.block_n),)](
        x_in, x_scale, h, sorted_ids, expert_ids, num_post,
        *g_op.pointers(), *u_op.pointers(),
        p, em, inter, hidden,
        x_in.stride(0), x_in.stride(1), x_scale.stride(0), x_scale.stride(1), h.stride(0), h.stride(1),
        *gu_strides, x_group, TOP_K=a, **gu_consts, **meta,
    )  # fmt: skip

    if weights.down_rotation is not None:
        h = weights.down_rotation.apply(h).contiguous()  # h R, for down stored as down_e R
    h_in, h_scale, h_group, h_mode = kernel_input(h, d_op)
    o = torch.empty((p, hidden), dtype=torch.float32, device=x.device)  # [P, H]
    d_strides, d_consts = _quant_args(d_op, h_mode, *d_op.block_k(cfg.block_k))
    _moe_down_kernel[(triton.cdiv(em, cfg.block_m) * triton.cdiv(hidden, cfg.block_n),)](
        h_in, h_scale, o, topk_weights.contiguous(), sorted_ids, expert_ids, num_post,
        *d_op.pointers(),
        p, em, hidden, inter,
        h_in.stride(0), h_in.stride(1), h_scale.stride(0), h_scale.stride(1), o.stride(0), o.stride(1),
        *d_strides, h_group, **d_consts, **meta,
    )  # fmt: skip
    return o.view(t, a, hidden).sum(dim=1).to(x.dtype)  # [T, H]: sum over the A experts of each token
