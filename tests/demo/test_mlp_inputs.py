"""The float64 reference forward of the dense Llama against transformers' own (the oracle)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from ernieq.demo.mlp_inputs import calibration_windows, check_llama, mlp_inputs
from ernieq.demo.recipe import DemoModelError


def _hooked_inputs(model, ids, layers):
    """float32 [T, H] MLP inputs of transformers' forward, window by window."""
    seen = {i: [] for i in layers}
    hooks = [model.model.layers[i].mlp.register_forward_pre_hook(
        lambda _m, args, i=i: seen[i].append(args[0][0].clone())) for i in layers]
    with torch.inference_mode():
        for window in ids:
            model(input_ids=window[None])
    for hook in hooks:
        hook.remove()
    return {i: torch.cat(seen[i]) for i in layers}


def test_mlp_inputs_match_transformers_llama(dense_source):
    from ernieq.text import load_text

    ids = calibration_windows(dense_source.tokenizer, load_text("demo", "calib"), tokens=256, seq_len=128)  # [2, 128]
    assert ids.shape == (2, 128)
    model = dense_source.model
    got = dict(mlp_inputs(model.state_dict(), model.config, ids, range(1, 4)))
    assert sorted(got) == [1, 2, 3] and all(x.dtype == torch.float64 for x in got.values())
    for i, want in _hooked_inputs(model, ids, range(1, 4)).items():
        assert got[i].shape == want.shape
        # float32 against float64: measured 2e-6 of the largest input on the demo's calibration text
        assert (got[i] - want.double()).abs().max() <= 1e-5 * want.abs().max(), i


def test_only_a_plain_llama_is_taken():
    with pytest.raises(DemoModelError, match="plain Llama .*hidden_act=gelu"):
        check_llama(LlamaConfig(hidden_act="gelu"))
    check_llama(LlamaConfig())
