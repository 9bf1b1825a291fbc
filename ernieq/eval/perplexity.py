"""Perplexity by the GPTQ/AWQ protocol, and next-token divergence against a baseline.

Protocol: tokenize the joined text once, cut it into non-overlapping windows of
``seq_len`` tokens, drop the last partial window, score every window on its own
(each token predicted from the earlier tokens of its window), and report
``ppl = exp(mean token NLL)`` over all ``windows * (seq_len - 1)`` predicted
tokens, with that token count.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ernieq.device import HOST
from ernieq.errors import ErnieqError
from ernieq.progress import progress_bar
from ernieq.runtime.stream import StreamedLM


class PerplexityError(ErnieqError, ValueError):
    """Input the protocol cannot score: too few tokens, bad window length, non-finite logits."""


@dataclass(frozen=True)
class PerplexityResult:
    """ppl = exp(nll_mean) over ``tokens`` predicted tokens in ``windows`` windows of ``seq_len``."""

    ppl: float
    nll_mean: float
    tokens: int
    seq_len: int
    windows: int


@dataclass(frozen=True)
class DivergenceResult:
    """Mean KL(base || quantized) in nats per token, and the share of tokens whose argmax agrees."""

    kl_mean: float
    top1_agreement: float
    tokens: int


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """LongTensor [1, L]: the whole text tokenized once, the tokenizer's default special tokens."""
    if not text:
        raise PerplexityError("cannot tokenize an empty text")
    return tokenizer(text, return_tensors="pt").input_ids


def _as_ids(input_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """LongTensor [L] from [1, L], [L] or a list of token ids."""
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise PerplexityError(f"input_ids must be [1, L] or [L], got shape {tuple(ids.shape)}")
    return ids


def window_count(num_tokens: int, seq_len: int, max_windows: int | None = None) -> int:
    """Full non-overlapping windows of ``seq_len`` (the partial tail is dropped), at most ``max_windows``."""
    n = num_tokens // seq_len  # floor: drop the last partial window
    return n if max_windows is None else min(n, max_windows)


def model_device(model) -> torch.device:
    """Where the model computes: a streamed model's device, else where its first parameter lives (host
    memory for a model without parameters)."""
    if isinstance(model, StreamedLM):
        return model.device
    params = getattr(model, "parameters", None)
    first = next(params(), None) if callable(params) else None
    return first.device if first is not None else HOST


def window_logits(model, windows: torch.Tensor) -> Iterator[torch.Tensor]:
    """Each window's float32 logits [L, V] in turn, from windows: int64 [W, L].

    A resident model (``model(input_ids=[1, L])`` returning logits [1, L, V] or an output with
    ``.logits``) runs window by window; a :class:`StreamedLM` runs all windows layer-major first (every
    weight read once) and then applies its head to one window's final hidden states at a time.
    """
    device = model_device(model)
    if isinstance(model, StreamedLM):
        hidden = model.final_hidden(windows)  # [W, L, H]
        for h in hidden:
            yield model.logits(h).float()  # [L, V]
        return
    for window in windows:
        out = model(input_ids=window.to(device)[None])
        yield (out.logits if hasattr(out, "logits") else out)[0].float()  # [L, V]


def perplexity(
    model,
    input_ids: torch.Tensor | Sequence[int],
    seq_len: int = 2048,
    max_windows: int | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of a causal LM over non-overlapping windows.

    model: callable as ``model(input_ids=LongTensor [1, L])`` returning logits
        [1, L, V] (or an output object with ``.logits``), or a ``StreamedLM`` (see :func:`window_logits`).
    input_ids: LongTensor [1, L] or [L], or a list of token ids: the tokenized text.
    """
    if seq_len < 2:
        raise PerplexityError(f"seq_len must be at least 2, got {seq_len}")
    if max_windows is not None and max_windows < 1:
        raise PerplexityError(f"max_windows must be at least 1, got {max_windows}")
    ids = _as_ids(input_ids)
    windows = window_count(len(ids), seq_len, max_windows)
    if windows == 0:
        raise PerplexityError(f"{len(ids)} tokens make no full window of {seq_len}")
    cut = ids[: windows * seq_len].reshape(windows, seq_len)  # [W, L]
    nll_sum = 0.0
    with torch.inference_mode(), progress_bar(progress) as bar:
        task = bar.add_task("perplexity", total=windows)
        for w, logits in enumerate(window_logits(model, cut)):  # [L, V]
            if not torch.isfinite(logits).all():
                raise PerplexityError(f"window {w}: the model returned non-finite logits")
            target = cut[w, 1:].to(logits.device)  # [L-1]
            nll = F.cross_entropy(logits[:-1], target, reduction="sum")  # sum of -log p(t_i | t_<i)
            nll_sum += nll.item()
            bar.advance(task)
    tokens = windows * (seq_len - 1)  # every window predicts all but its first token
    nll_mean = nll_sum / tokens
    return PerplexityResult(ppl=math.exp(nll_mean), nll_mean=nll_mean, tokens=tokens, seq_len=seq_len, windows=windows)


def next_token_divergence(base_logits: torch.Tensor, q_logits: torch.Tensor) -> DivergenceResult:
    """KL(base || q) and top-1 agreement of two models' next-token distributions.

    base_logits, q_logits: [T, V] (or [1, T, V]) logits at the same positions.
    KL = sum_v p_base(v) * (log p_base(v) - log p_q(v)), averaged over T.
    """
    base = base_logits.reshape(-1, base_logits.shape[-1]).float()  # [T, V]
    q = q_logits.reshape(-1, q_logits.shape[-1]).float()  # [T, V]
    if base.shape != q.shape:
        raise PerplexityError(f"logit shapes differ: {tuple(base_logits.shape)} vs {tuple(q_logits.shape)}")
    log_p = F.log_softmax(base, dim=-1)  # [T, V]
    log_q = F.log_softmax(q, dim=-1)  # [T, V]
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # [T]
    agree = (base.argmax(-1) == q.argmax(-1)).float()  # [T]
    return DivergenceResult(kl_mean=kl.mean().item(), top1_agreement=agree.mean().item(), tokens=base.shape[0])
