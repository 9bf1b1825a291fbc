"""What the dense model's MLPs see on calibration text, computed the same on every machine.

The routed plan is fitted to these inputs, and its discrete steps (top-k, sorts,
balanced assignments) turn any difference in them into different experts. A
float32 forward differs between CPUs and thread counts in its last bits (each
vectorised kernel sums in its own order), so this is a plain float64 forward of
the dense Llama written out here: differences of 1e-16 relative per operation, far
below any gap a discrete step sees. It runs layer by layer over all windows, so
only one layer's inputs are held at a time; no logits are computed.

Legend: W windows of S tokens, T = W * S, H hidden size, D head dim, Q / KV heads.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from ernieq.demo.recipe import DemoModelError

log = logging.getLogger(__name__)

CHARS_PER_TOKEN_BOUND = 16  # English BPE averages about 4.5 characters per token


def calibration_windows(tokenizer, text: str, tokens: int, seq_len: int) -> torch.Tensor:
    """LongTensor [W, S]: the first ``tokens`` tokens of ``text`` (tokenized once) in whole windows of S."""
    prefix = text[: tokens * CHARS_PER_TOKEN_BOUND]  # tokenize only what the windows can use
    ids = tokenizer(prefix, return_tensors="pt").input_ids[0]
    if len(ids) < tokens and len(prefix) < len(text):
        ids = tokenizer(text, return_tensors="pt").input_ids[0]
    windows = min(tokens, len(ids)) // seq_len
    if windows == 0:
        raise DemoModelError(f"calibration text has {len(ids)} tokens, fewer than one window of {seq_len}")
    if windows * seq_len < tokens:
        log.warning("calibration text gives %d tokens of the %d asked for", windows * seq_len, tokens)
    return ids[: windows * seq_len].reshape(windows, seq_len)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., H] / sqrt(mean(x^2) + eps) * weight [H]."""
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * weight


def rope_tables(head_dim: int, theta: float, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 cos, sin [S, D] of Llama's rotary embedding: angle(p, i) = p / theta^(2i/D), the halves repeated."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # [D/2]
    angles = torch.arange(seq_len, dtype=torch.float64)[:, None] * inv_freq  # [S, D/2]
    angles = torch.cat([angles, angles], dim=1)  # [S, D]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., S, D] rotated in Llama's pairs (i, i + D/2): x cos + rotate_half(x) sin."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def attention(x: torch.Tensor, w: dict[str, torch.Tensor], head_dim: int, cos: torch.Tensor, sin: torch.Tensor):
    """Causal grouped-query attention per window; x [W, S, H] normed, returns [W, S, H].

    Query head h reads key/value head h // (Q / KV); softmax(q k^T / sqrt(D)) v.
    """
    wn, s, _ = x.shape
    q, k, v = ((x @ w[n].T).reshape(wn, s, -1, head_dim).transpose(1, 2) for n in ("q_proj", "k_proj", "v_proj"))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # [W, Q, S, D], [W, KV, S, D]
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # [W, Q, S, D]
    return out.transpose(1, 2).reshape(wn, s, -1) @ w["o_proj"].T  # [W, S, H]


def check_llama(cfg) -> None:
    """The forward below covers plain Llama: no biases, SiLU, default rotary embedding."""
    rope = getattr(cfg, "rope_parameters", None) or {"rope_type": "default"}
    if cfg.hidden_act != "silu" or cfg.attention_bias or cfg.mlp_bias or rope.get("rope_type") != "default":
        raise DemoModelError(
            f"the demo's reference forward takes a plain Llama (silu, no biases, default rope); got "
            f"hidden_act={cfg.hidden_act}, attention_bias={cfg.attention_bias}, mlp_bias={cfg.mlp_bias}, rope={rope}"
        )


def mlp_inputs(
    state: dict[str, torch.Tensor], cfg, ids: torch.Tensor, layers: range
) -> Iterator[tuple[int, torch.Tensor]]:
    """(layer, float64 [T, H]) the inputs of each listed layer's MLP over the windows ids [W, S].

    state: the dense Llama state dict (any float dtype); cfg: its LlamaConfig. Layers are
    visited in order; the forward stops after the last listed one.
    """
    check_llama(cfg)
    cos, sin = rope_tables(cfg.head_dim, cfg.rope_parameters["rope_theta"], ids.shape[1])
    hidden = state["model.embed_tokens.weight"].double()[ids]  # [W, S, H]
    for i in range(max(layers) + 1):  # ends at the last listed layer's MLP input
        p = f"model.layers.{i}"
        w = {n: state[f"{p}.self_attn.{n}.weight"].double() for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
        normed = rms_norm(hidden, state[f"{p}.input_layernorm.weight"].double(), cfg.rms_norm_eps)
        hidden = hidden + attention(normed, w, cfg.head_dim, cos, sin)
        x = rms_norm(hidden, state[f"{p}.post_attention_layernorm.weight"].double(), cfg.rms_norm_eps)  # [W, S, H]
        if i in layers:
            yield i, x.reshape(-1, x.shape[-1])  # [T, H]
        if i == max(layers):
            return
        gate, up, down = (state[f"{p}.mlp.{n}_proj.weight"].double() for n in ("gate", "up", "down"))
        hidden = hidden + (F.silu(x @ gate.T) * (x @ up.T)) @ down.T
