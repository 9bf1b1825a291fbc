"""Padding to multiples of 128 (or any multiple): zero channels and zero heads leave every logit as it was."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ernieq.demo.pad import SIZE_MULTIPLE, pad_tensor, padding_for
from ernieq.demo.recipe import DemoModelError

# a small Llama shaped like SmolLM2: GQA groups of 3, a hidden size that is no multiple of the step (32 here);
# transformers checks that the padded Llama's hidden size divides by its heads: 96 = 6 x 16
TINY = {"vocab_size": 50, "hidden_size": 72, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 3, "num_key_value_heads": 1, "head_dim": 16, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True}


def test_smollm2_sizes_pad_to_whole_128_blocks():
    cfg = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64)
    p = padding_for(cfg)
    assert (p.padded_hidden, p.padded_heads, p.padded_kv_heads) == (640, 12, 4)
    for kind in ("hidden", "q", "kv"):
        assert p.sizes(kind)[1] % SIZE_MULTIPLE == 0, kind
    assert p.padded_heads // p.padded_kv_heads == 3  # GQA groups kept: heads 9..11 read the new KV head 3


def test_padded_model_gives_the_same_logits():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)  # non-trivial norms, so their rescaling is tested
    p = padding_for(model.config, multiple=32)
    assert (p.padded_hidden, p.padded_heads, p.padded_kv_heads) == (96, 6, 2)
    padded_cfg = LlamaConfig(**{**TINY, "hidden_size": p.padded_hidden, "num_attention_heads": p.padded_heads,
                                "num_key_value_heads": p.padded_kv_heads, "rms_norm_eps": 1e-5 * p.eps_scale})
    padded = LlamaForCausalLM(padded_cfg).eval()
    state = {n: pad_tensor(n, t, p) for n, t in model.state_dict().items() if n != "lm_head.weight"}
    padded.load_state_dict(state, strict=False)
    padded.tie_weights()
    ids = torch.randint(0, 50, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(padded(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
        hidden = padded.model(ids).last_hidden_state
    assert not hidden[..., TINY["hidden_size"]:].any()  # the extra channels stay exactly zero


def test_a_tensor_without_a_rule_or_of_the_wrong_size_is_named():
    p = padding_for(LlamaConfig(**TINY), multiple=32)
    with pytest.raises(DemoModelError, match="model.rotary.weight: no padding rule"):
        pad_tensor("model.rotary.weight", torch.zeros(3, 3), p)
    with pytest.raises(DemoModelError, match=r"q_proj.weight: dimension 0 is 40, expected 48 \(q\)"):
        pad_tensor("model.layers.0.self_attn.q_proj.weight", torch.zeros(40, 72), p)
