"""The oracle: plain torch, decode then matmul. Every Triton kernel is tested against it.

Shape legend: T tokens, E experts, A active experts per token, K input features,
N output features, H hidden size, I expert intermediate size, M rows of x.

Everything is computed in float32 and returned in ``x.dtype``; weights are decoded
by the codec's own ``decode`` (``ernieq.codecs``), never by kernel code, and each weight's
inputs are rounded as its codec computes them (``round_activations``: fp8's W8A8 quantizes
them per token and group, weight-only codecs leave them as they are).
"""

from __future__ import annotations

import torch

from ernieq.codecs import QuantizedTensor, codec_for
from ernieq.kernels.args import MoEWeights, check_linear_args, check_moe_args


def linear(x: torch.Tensor, q: QuantizedTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x_hat @ W_hat.T (+ bias), x_hat = x as the codec computes it.

    x: float [M, K]; q: shape (N, K); bias: float [N] or None. Returns [M, N] in x.dtype.
    """
    check_linear_args(x, q, bias)
    codec = codec_for(q)
    w_hat = codec.decode(q).to(x.device)  # [N, K] float32
    y = codec.round_activations(x.float()) @ w_hat.T  # [M, N]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def moe(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, weights: MoEWeights) -> torch.Tensor:
    """out[t] = sum_a w[t, a] * down_e(silu(gate_e x_t) * up_e x_t), e = topk_ids[t, a].

    x: float [T, H]; topk_ids: int [T, A]; topk_weights: float [T, A]; weights: gate, up (E, I, H),
    down (E, H, I) and down's rotation R, by which h is turned first; each projection's input
    rounded as its codec computes it. Returns [T, H] in x.dtype.
    Loops over the experts that received tokens, like vLLM's test ``torch_moe``.
    """
    check_moe_args(x, topk_ids, topk_weights, weights)
    down_rotation = weights.down_rotation
    xf = x.float()  # [T, H]
    out = torch.zeros_like(xf)  # [T, H]
    gate_codec, up_codec, down_codec = codecs = [codec_for(w) for w in weights.projections]
    x_gate, x_up = gate_codec.round_activations(xf), up_codec.round_activations(xf)  # [T, H], per token: once
    for e in torch.unique(topk_ids).tolist():
        t_idx, a_idx = torch.nonzero(topk_ids == e, as_tuple=True)  # [T_e], [T_e]
        w_gate, w_up, w_down = (c.decode(w.expert(e)).to(x.device) for c, w in zip(codecs, weights.projections))
        h = torch.nn.functional.silu(x_gate[t_idx] @ w_gate.T) * (x_up[t_idx] @ w_up.T)  # [T_e, I]: silu(gate x) * up x
        if down_rotation is not None:
            h = down_rotation.apply(h)  # h R, for down stored as down_e R
        y = down_codec.round_activations(h) @ w_down.T  # [T_e, H]
        out.index_add_(0, t_idx, y * topk_weights[t_idx, a_idx].float()[:, None])  # sum_a w[t, a] * y
    return out.to(x.dtype)
