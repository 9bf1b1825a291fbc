"""The rotary layout: Llama's (i, i + D/2) pairs become ERNIE's (2i, 2i+1) by a row permutation."""

from __future__ import annotations

import torch
from transformers.models.ernie4_5_moe.modeling_ernie4_5_moe import apply_rotary_pos_emb as ernie_rope
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_rope

from ernieq.demo.convert import permute_rope_rows, rope_interleave_permutation


def test_rope_permutation_turns_llama_pairs_into_ernie_pairs():
    heads, d, seq = 3, 64, 7
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, seq, d, generator=gen)
    k = torch.randn(1, heads, seq, d, generator=gen)
    inv_freq = 1.0 / (100000.0 ** (torch.arange(0, d, 2).float() / d))
    freqs = torch.arange(seq).float()[:, None] * inv_freq  # [seq, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)[None]  # [1, seq, D] both models take this layout
    q_l, k_l = llama_rope(q, k, emb.cos(), emb.sin())
    perm = rope_interleave_permutation(d)
    q_e, k_e = ernie_rope(q[..., perm], k[..., perm], emb.cos(), emb.sin())
    torch.testing.assert_close(q_e, q_l[..., perm], rtol=0, atol=1e-5)
    torch.testing.assert_close(k_e, k_l[..., perm], rtol=0, atol=1e-5)
    assert sorted(perm.tolist()) == list(range(d))


def test_permute_rope_rows_moves_rows_within_each_head():
    d, heads, hidden = 8, 2, 3
    w = torch.arange(heads * d * hidden, dtype=torch.float32).reshape(heads * d, hidden)
    out = permute_rope_rows(w, d)
    assert torch.equal(out[1], w[d // 2]) and torch.equal(out[d + 1], w[d + d // 2])
    assert torch.equal(out.sort(0).values, w.sort(0).values)
