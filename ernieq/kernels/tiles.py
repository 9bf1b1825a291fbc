"""One K step of every ernieq kernel: decode a weight tile in registers and multiply.

    acc[BM, BN] += x[BM, k0 : k0 + BLOCK_K] @ W_hat[BN, k0 : k0 + BLOCK_K].T

Shape legend: K input features, N output features, G group size; BM, BN, BLOCK_K tile sizes.

The packed codes are decoded to small integers (or fp8 values) that the dot
dtype holds exactly, multiplied by x on the tensor cores, and scaled afterwards:
per tile (the launcher fits BLOCK_K inside one wint4 group or fp8 block), per
64-row sub-tile (ccq2's local scales; BLOCK_K is a multiple of 64) and per output
channel in the epilogue. Only the fp8 fallback for block sizes that no
power-of-two tile divides scales element by element.

x reaches the K step in one of two forms (the ``X`` enum): as it is (``X_FLOAT``), or, for
fp8's W8A8, as e4m3 codes ``x_q`` with a float32 scale per token and group of ``x_group``
input channels (``X_FP8``, quantized before the GEMM by ``ernieq.kernels.act_quant``;
``xs_rows`` [BM] points at each row's scales, ``stride_xsk`` steps one group). Then both
operands are fp8 values and the tile computes DeepSeek-V3's
``acc += (x_q @ q) * x_scale[m, k0 // x_group] * w_scale[n // B, k0 // B]``.

The weight operand reaches these helpers as pointers in fixed roles (see
``ernieq.kernels.operands``): ``q_ptr`` packed codes, ``s_ptr`` the scale that
varies along K, ``z_ptr`` wint4 zero points (same layout as the scale), and, for
ccq2, the per-channel ``code_scale``/``code_zp`` preloaded as ``cs``/``cz`` [BN].
Strides are named by logical axis: ``stride_qn``/``stride_qk`` step one output
channel / one packed K unit; ``stride_sn``/``stride_sk`` one scale row / column.

ernieq's kernels use only Triton builtins, none of the ``tl.*`` helpers that
triton itself defines with ``@triton.jit`` (``tl.cdiv``, ``tl.zeros``,
``tl.sigmoid``, reductions): those are fixed as compiled or interpreted when
triton is first imported, so avoiding them lets the kernels run under
``TRITON_INTERPRET=1`` even when triton was imported before the variable was
set (torch.compile and transformers import it early). Only ernieq's own kernel
modules must be imported after it is set.
"""

import triton
import triton.language as tl

# The codec enum (one constexpr instead of a boolean per codec).
WINT8 = tl.constexpr(0)
WINT4 = tl.constexpr(1)
FP8 = tl.constexpr(2)
CCQ2 = tl.constexpr(3)

# How x reaches the dot (one constexpr): as it is, or fp8 codes with a scale per token and group (W8A8).
X_FLOAT = tl.constexpr(0)
X_FP8 = tl.constexpr(1)

CCQ2_GROUP = tl.constexpr(64)  # rows of K that share one 4-bit local scale
CCQ2_BYTE_ROWS = tl.constexpr(16)  # 64 rows / 4 weights per byte


@triton.jit
def grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program ``pid`` in grouped order: GROUP_M row tiles sweep the N tiles
    together, so the weight tiles they share are reused from L2 (the Triton matmul tutorial's order)."""
    pids_per_group = GROUP_M * num_pid_n
    first_m = (pid // pids_per_group) * GROUP_M
    group_rows = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % pids_per_group) % group_rows
    pid_n = (pid % pids_per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def load_x(x_rows, row_mask, ks, K, stride_xk):
    """x_rows: [BM, 1] row pointers; ks: [BK] k indices. Returns x[:, ks], zero outside K."""
    return tl.load(x_rows + ks[None, :] * stride_xk, mask=row_mask[:, None] & (ks[None, :] < K), other=0.0)


@triton.jit
def _dot_bytes(acc, x_rows, row_mask, k0, K, stride_xk, offs_n, n_mask, q_ptr, stride_qn, stride_qk,
               BLOCK_K: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr):
    """wint8 and per-channel fp8: one code per byte, W [N, K]; the channel scale waits for the epilogue."""
    ks = k0 + tl.arange(0, BLOCK_K)  # [BK]
    x = load_x(x_rows, row_mask, ks, K, stride_xk).to(DOT)  # [BM, BK]
    w = tl.load(q_ptr + offs_n[None, :] * stride_qn + ks[:, None] * stride_qk,
                mask=n_mask[None, :] & (ks[:, None] < K), other=0.0)  # [BK, BN] int8 / fp8
    return tl.dot(x, w.to(DOT), acc, input_precision=PRECISION)


@triton.jit
def _dot_fp8_block(acc, x_rows, row_mask, k0, K, stride_xk, offs_n, n_mask, q_ptr, s_ptr, stride_qn, stride_qk,
                   stride_sn, stride_sk, GROUP: tl.constexpr, SCALE_PER_TILE: tl.constexpr,
                   BLOCK_K: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr):
    """fp8 with GROUP x GROUP blocks: W_hat = q * scale[n // GROUP, k // GROUP]."""
    ks = k0 + tl.arange(0, BLOCK_K)  # [BK]
    x = load_x(x_rows, row_mask, ks, K, stride_xk).to(DOT)  # [BM, BK]
    w = tl.load(q_ptr + offs_n[None, :] * stride_qn + ks[:, None] * stride_qk,
                mask=n_mask[None, :] & (ks[:, None] < K), other=0.0)  # [BK, BN] fp8
    s_rows = s_ptr + (offs_n // GROUP) * stride_sn  # [BN]
    if SCALE_PER_TILE:  # GROUP % BLOCK_K == 0: the tile lies in one block column
        s = tl.load(s_rows + (k0 // GROUP) * stride_sk, mask=n_mask, other=0.0)  # [BN]
        acc += tl.dot(x, w.to(DOT), input_precision=PRECISION) * s[None, :]
    else:  # blocks the tile straddles: scale element by element
        s = tl.load(s_rows[None, :] + (ks[:, None] // GROUP) * stride_sk,
                    mask=n_mask[None, :] & (ks[:, None] < K), other=0.0)  # [BK, BN]
        acc = tl.dot(x, (w.to(tl.float32) * s).to(DOT), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _dot_fp8_w8a8(acc, x_rows, xs_rows, row_mask, k0, K, stride_xk, x_group, stride_xsk, offs_n, n_mask,
                  q_ptr, s_ptr, stride_qn, stride_qk, stride_sn, stride_sk, GROUP: tl.constexpr,
                  SCALE_PER_TILE: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr):
    """fp8 weights times fp8 activations: x_hat = x_q * x_scale[m, k // x_group], W_hat = q * scale
    (GROUP x GROUP blocks; per channel, GROUP = 0, its scale waits for the epilogue)."""
    ks = k0 + tl.arange(0, BLOCK_K)  # [BK]
    x = load_x(x_rows, row_mask, ks, K, stride_xk)  # [BM, BK] fp8
    w = tl.load(q_ptr + offs_n[None, :] * stride_qn + ks[:, None] * stride_qk,
                mask=n_mask[None, :] & (ks[:, None] < K), other=0.0)  # [BK, BN] fp8
    if SCALE_PER_TILE:  # the tile lies in one activation group and one weight block column (or per channel)
        xs = tl.load(xs_rows + (k0 // x_group) * stride_xsk, mask=row_mask, other=0.0)  # [BM]
        part = tl.dot(x.to(DOT), w.to(DOT), input_precision=PRECISION) * xs[:, None]  # (x_q @ q) * x_scale[m]
        if GROUP > 0:
            s = tl.load(s_ptr + (offs_n // GROUP) * stride_sn + (k0 // GROUP) * stride_sk, mask=n_mask, other=0.0)
            part = part * s[None, :]  # * w_scale[n // B, k0 // B]
        acc += part
    else:  # groups and blocks the tile straddles: scale element by element
        xs = tl.load(xs_rows[:, None] + (ks[None, :] // x_group) * stride_xsk,
                     mask=row_mask[:, None] & (ks[None, :] < K), other=0.0)  # [BM, BK]
        s = tl.load(s_ptr + (offs_n[None, :] // GROUP) * stride_sn + (ks[:, None] // GROUP) * stride_sk,
                    mask=n_mask[None, :] & (ks[:, None] < K), other=0.0)  # [BK, BN]
        acc = tl.dot((x.to(tl.float32) * xs).to(DOT), (w.to(tl.float32) * s).to(DOT), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _dot_wint4(acc, x_rows, row_mask, k0, K, stride_xk, offs_n, n_mask, q_ptr, s_ptr, z_ptr, stride_qn, stride_qk,
               stride_sn, stride_sk, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
               BLOCK_K: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr):
    """wint4, W [N, ceil(K/2)] bytes: k = 2p in the low nibble, 2p + 1 in the high one.

    The tile lies inside one group (GROUP % BLOCK_K == 0): W_hat = (code - zero) * scale[n, k0 // G].
    Even and odd k are two dots of BLOCK_K / 2, so every byte is loaded once.
    """
    ps = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # [BK/2] byte columns
    byte = tl.load(q_ptr + offs_n[None, :] * stride_qn + ps[:, None] * stride_qk,
                   mask=n_mask[None, :] & (2 * ps[:, None] < K), other=0).to(tl.int32)  # [BK/2, BN]
    g = k0 // GROUP
    s = tl.load(s_ptr + offs_n * stride_sn + g * stride_sk, mask=n_mask, other=0.0).to(tl.float32)  # [BN]
    if HAS_ZERO:
        zero = tl.load(z_ptr + offs_n * stride_sn + g * stride_sk, mask=n_mask, other=0).to(tl.int32)  # [BN]
    else:
        zero = tl.full(offs_n.shape, 8, tl.int32)  # symmetric: code 8 is zero
    w_even = ((byte & 0xF) - zero[None, :]).to(DOT)  # code - zero, in [-15, 15]
    w_odd = ((byte >> 4) - zero[None, :]).to(DOT)
    part = tl.dot(load_x(x_rows, row_mask, 2 * ps, K, stride_xk).to(DOT), w_even, input_precision=PRECISION)
    part = tl.dot(load_x(x_rows, row_mask, 2 * ps + 1, K, stride_xk).to(DOT), w_odd, part, input_precision=PRECISION)
    return acc + part * s[None, :]


@triton.jit
def _dot_ccq2(acc, x_rows, row_mask, k0, K, stride_xk, offs_n, n_mask, q_ptr, s_ptr, stride_qn, stride_qk,
              stride_sn, stride_sk, cs, cz, BLOCK_K: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr):
    """ccq2, W^T [ceil(K/4), N] bytes; byte r holds k = 4r + j, j = 0..3, as overlapping 6-bit windows.

    c = floor(b * code_scale + code_zp + 0.5); q_j = ((c >> s_j) & 63) - 32, s = (9, 6, 3, 0);
    W_hat = q * nibble * super_scale, the nibble per 64-row group (the super scale waits for the epilogue).
    """
    for gi in tl.static_range(BLOCK_K // CCQ2_GROUP):
        kg = k0 + gi * CCQ2_GROUP  # first k of this 64-row group
        rs = kg // 4 + tl.arange(0, CCQ2_BYTE_ROWS)  # [16] byte rows
        b = tl.load(q_ptr + rs[:, None] * stride_qk + offs_n[None, :] * stride_qn,
                    mask=n_mask[None, :] & (4 * rs[:, None] < K), other=0)  # [16, BN] uint8
        c = tl.floor(b.to(tl.float32) * cs[None, :] + cz[None, :] + 0.5).to(tl.int32)  # the 15-bit code
        q0 = ((c >> 9) & 63) - 32  # window j = 0
        part = tl.dot(load_x(x_rows, row_mask, 4 * rs, K, stride_xk).to(DOT), q0.to(DOT), input_precision=PRECISION)
        for j in tl.static_range(1, 4):
            qj = ((c >> (9 - 3 * j)) & 63) - 32  # q_j = ((c >> s_j) & 63) - 32
            part = tl.dot(load_x(x_rows, row_mask, 4 * rs + j, K, stride_xk).to(DOT), qj.to(DOT), part,
                          input_precision=PRECISION)
        g = kg // CCQ2_GROUP
        ws = tl.load(s_ptr + (g // 2) * stride_sk + offs_n * stride_sn, mask=n_mask, other=0).to(tl.int32)  # [BN]
        nibble = (ws >> (4 - 4 * (g % 2))) & 0xF  # high nibble for even g, low for odd
        acc += part * nibble.to(tl.float32)[None, :]
    return acc


@triton.jit
def load_code_params(cs_ptr, cz_ptr, offs_n, n_mask, CODEC: tl.constexpr):
    """ccq2's code_scale and code_zp for the tile's channels, [BN] float32 (zeros for other codecs)."""
    if CODEC == CCQ2:
        cs = tl.load(cs_ptr + offs_n, mask=n_mask, other=0.0)
        cz = tl.load(cz_ptr + offs_n, mask=n_mask, other=0.0)
    else:
        cs = tl.full(offs_n.shape, 0.0, tl.float32)
        cz = tl.full(offs_n.shape, 0.0, tl.float32)
    return cs, cz


@triton.jit
def accumulate_k_tile(acc, x_rows, xs_rows, row_mask, k0, K, stride_xk, x_group, stride_xsk, offs_n, n_mask,
                      q_ptr, s_ptr, z_ptr, stride_qn, stride_qk, stride_sn, stride_sk, cs, cz,
                      CODEC: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
                      SCALE_PER_TILE: tl.constexpr, X: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr,
                      PRECISION: tl.constexpr):
    """acc[BM, BN] += x_hat[:, k0 : k0 + BLOCK_K] @ W_hat[offs_n, k0 : k0 + BLOCK_K].T, less the channel scale."""
    tl.static_assert(X == X_FLOAT or CODEC == FP8, "fp8 activations (W8A8) need fp8 weights")
    if X == X_FP8:
        acc = _dot_fp8_w8a8(acc, x_rows, xs_rows, row_mask, k0, K, stride_xk, x_group, stride_xsk, offs_n, n_mask,
                            q_ptr, s_ptr, stride_qn, stride_qk, stride_sn, stride_sk, GROUP, SCALE_PER_TILE,
                            BLOCK_K, DOT, PRECISION)
    elif CODEC == WINT8:
        acc = _dot_bytes(acc, x_rows, row_mask, k0, K, stride_xk, offs_n, n_mask, q_ptr, stride_qn, stride_qk,
                         BLOCK_K, DOT, PRECISION)
    elif CODEC == WINT4:
        acc = _dot_wint4(acc, x_rows, row_mask, k0, K, stride_xk, offs_n, n_mask, q_ptr, s_ptr, z_ptr, stride_qn,
                         stride_qk, stride_sn, stride_sk, GROUP, HAS_ZERO, BLOCK_K, DOT, PRECISION)
    elif CODEC == FP8:
        if GROUP == 0:  # per channel
            acc = _dot_bytes(acc, x_rows, row_mask, k0, K, stride_xk, offs_n, n_mask, q_ptr, stride_qn, stride_qk,
                             BLOCK_K, DOT, PRECISION)
        else:
            acc = _dot_fp8_block(acc, x_rows, row_mask, k0, K, stride_xk, offs_n, n_mask, q_ptr, s_ptr, stride_qn,
                                 stride_qk, stride_sn, stride_sk, GROUP, SCALE_PER_TILE, BLOCK_K, DOT, PRECISION)
    else:
        tl.static_assert(CODEC == CCQ2, "unknown codec id")
        acc = _dot_ccq2(acc, x_rows, row_mask, k0, K, stride_xk, offs_n, n_mask, q_ptr, s_ptr, stride_qn, stride_qk,
                        stride_sn, stride_sk, cs, cz, BLOCK_K, DOT, PRECISION)
    return acc
