"""Grow the demo's sizes to multiples of 128 with zero channels and zero heads, exactly.

The formats the demo goes through constrain every linear layer's K and N: FastDeploy's
wint2 steps whole 128-row scale bytes along K, transformers' block FP8 takes only whole
128 x 128 blocks. SmolLM2 has H = 576 = 4.5 x 128 and Q = 9, KV = 3 heads of D = 64
(q_proj N = 576, k/v N = 192). The demo grows, without changing a logit:

- the hidden size H -> H' (640): zero columns in the embedding and in every weight that
  reads the residual stream (K), zero rows in every weight that writes it (o_proj,
  down_proj). The stream's extra channels start at 0 and stay exactly 0.
- RMSNorm: with x' = [x, 0] of length H', mean(x'^2) = mean(x^2) H / H'. Weights
  w' = [w sqrt(H / H'), 0] and eps' = eps H / H' give
  w' x' / sqrt(mean(x'^2) + eps') = [w x / sqrt(mean(x^2) + eps), 0].
- the heads KV -> KV' (4) so that KV' D is a multiple of 128, and Q -> Q' = KV' Q / KV
  (12) so every key/value head keeps Q / KV query heads: query head h reads key/value
  head h // (Q / KV), so the new query heads (9..11) read only the new KV head (3).
  Their q, k and v rows are zero: each attends uniformly to zero values, and its
  o_proj columns are zero too, so the new heads add exactly 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ernieq.demo.recipe import DemoModelError

SIZE_MULTIPLE = 128  # FastDeploy wint2's K step and transformers' FP8 block

# (tensor name suffix, what its rows hold, what its columns hold); None: left as it is.
# The first matching suffix applies; norms ("norm.weight") are handled on their own.
LAYOUT = (
    ("embed_tokens.weight", None, "hidden"),  # [V, H]
    ("self_attn.q_proj.weight", "q", "hidden"),  # [Q*D, H]
    ("self_attn.k_proj.weight", "kv", "hidden"),  # [KV*D, H]
    ("self_attn.v_proj.weight", "kv", "hidden"),  # [KV*D, H]
    ("self_attn.o_proj.weight", "hidden", "q"),  # [H, Q*D]
    ("gate_proj.weight", None, "hidden"),  # [I, H] dense MLP, experts, shared experts
    ("up_proj.weight", None, "hidden"),  # [I, H]
    ("down_proj.weight", "hidden", None),  # [H, I]
    ("mlp.gate.weight", None, "hidden"),  # [E, H] the router
    ("moe_statics.e_score_correction_bias", None, None),  # [1, E]
)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class Padding:
    """The source sizes and the padded ones: hidden H -> H', query heads Q -> Q', key/value heads KV -> KV'."""

    hidden: int
    padded_hidden: int
    heads: int
    padded_heads: int
    kv_heads: int
    padded_kv_heads: int
    head_dim: int

    @property
    def norm_scale(self) -> float:
        """sqrt(H / H'): RMSNorm weights of the padded model."""
        return math.sqrt(self.hidden / self.padded_hidden)

    @property
    def eps_scale(self) -> float:
        """H / H': rms_norm_eps of the padded model."""
        return self.hidden / self.padded_hidden

    def sizes(self, kind: str) -> tuple[int, int]:
        """(source, padded) length of a dimension of ``kind``: hidden, q (Q*D) or kv (KV*D)."""
        return {
            "hidden": (self.hidden, self.padded_hidden),
            "q": (self.heads * self.head_dim, self.padded_heads * self.head_dim),
            "kv": (self.kv_heads * self.head_dim, self.padded_kv_heads * self.head_dim),
        }[kind]

    def to_json(self) -> dict:
        return {
            "hidden_size": [self.hidden, self.padded_hidden],
            "num_attention_heads": [self.heads, self.padded_heads],
            "num_key_value_heads": [self.kv_heads, self.padded_kv_heads],
        }


def padding_for(cfg, multiple: int = SIZE_MULTIPLE) -> Padding:
    """The smallest padding of the dense config's hidden size and heads to multiples of ``multiple``."""
    d, q, kv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    group = q // kv  # query heads per key/value head, kept
    padded_kv = round_up(kv * d, math.lcm(d, multiple)) // d  # KV' D a multiple of D and of 128
    return Padding(cfg.hidden_size, round_up(cfg.hidden_size, multiple), q, group * padded_kv, kv, padded_kv, d)


def zero_pad(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """t [r, c] in the top left corner of zeros [rows, cols]."""
    out = t.new_zeros(rows, cols)
    out[: t.shape[0], : t.shape[1]] = t
    return out


def pad_tensor(name: str, t: torch.Tensor, padding: Padding) -> torch.Tensor:
    """Checkpoint tensor ``name`` of the source sizes at the padded sizes (see the module docstring)."""
    if name.endswith("norm.weight"):  # [H]
        return zero_pad(t[None] * padding.norm_scale, 1, padding.padded_hidden)[0]
    for suffix, rows, cols in LAYOUT:
        if name.endswith(suffix):
            break
    else:
        raise DemoModelError(f"{name}: no padding rule for this tensor")
    shape = list(t.shape)
    for dim, kind in ((0, rows), (1, cols)):
        if kind is not None:
            size, padded = padding.sizes(kind)
            if shape[dim] != size:
                raise DemoModelError(f"{name}: dimension {dim} is {shape[dim]}, expected {size} ({kind})")
            shape[dim] = padded
    return zero_pad(t, *shape)
