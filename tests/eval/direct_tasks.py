"""The metrics of lm-eval's loglikelihood tasks computed directly (their own code path), for the tests
that check ``ernieq eval --tasks`` and ``ernieq report --tasks`` against them."""

from __future__ import annotations

import json

import torch

from ernieq.eval import lastword


def direct_scores(model, tokenizer, examples: list[tuple[str, str]]) -> tuple[list[bool], list[float]]:
    """Per example (context, continuation): would greedy decoding give the continuation's tokens, and
    their log-probability. The tokens are those of context + continuation after the context's."""
    greedy, logprob = [], []
    for context, continuation in examples:
        ctx = tokenizer(context).input_ids
        whole = tokenizer(context + continuation).input_ids
        target = torch.tensor(whole[len(ctx):])
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([whole[:-1]])).logits[0, -len(target):]  # [C, V]
        logp = logits.float().log_softmax(-1)
        greedy.append(bool((logp.argmax(-1) == target).all()))
        logprob.append(logp.gather(-1, target[:, None]).sum().item())
    return greedy, logprob


def examples() -> list[dict]:
    """The offline task's examples as its data file holds them."""
    return [json.loads(line) for line in lastword.build_lastword().read_text().splitlines()]
