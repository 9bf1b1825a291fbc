"""What the dense model's MLPs see on calibration text: the inputs the routed plan is fitted to."""

from __future__ import annotations

import logging

import torch

from ernieq.demo.recipe import DemoModelError
from ernieq.demo.source import DenseSource

log = logging.getLogger(__name__)

CHARS_PER_TOKEN_BOUND = 16  # English BPE averages about 4.5 characters per token


def collect_mlp_inputs(
    source: DenseSource, text: str, layers: list[int], tokens: int, seq_len: int
) -> dict[int, torch.Tensor]:
    """float32 [T, H] inputs of each listed layer's MLP over the first ``tokens`` tokens of ``text``."""
    prefix = text[: tokens * CHARS_PER_TOKEN_BOUND]  # tokenize only what the windows can use
    ids = source.tokenizer(prefix, return_tensors="pt").input_ids[0]
    if len(ids) < tokens and len(prefix) < len(text):
        ids = source.tokenizer(text, return_tensors="pt").input_ids[0]
    windows = min(tokens, len(ids)) // seq_len
    if windows == 0:
        raise DemoModelError(f"calibration text has {len(ids)} tokens, fewer than one window of {seq_len}")
    if windows * seq_len < tokens:
        log.warning("calibration text gives %d tokens of the %d asked for", windows * seq_len, tokens)
    store: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    blocks = source.model.model.layers

    def hook_for(i: int):
        def hook(_module, args):
            store[i].append(args[0].reshape(-1, args[0].shape[-1]).float().clone())  # [T_w, H]

        return hook

    handles = [blocks[i].mlp.register_forward_pre_hook(hook_for(i)) for i in layers]
    try:
        with torch.inference_mode():
            for w in range(windows):
                source.model(input_ids=ids[w * seq_len : (w + 1) * seq_len][None])
    finally:
        for handle in handles:
            handle.remove()
    return {i: torch.cat(store[i]) for i in layers}
