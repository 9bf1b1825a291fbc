"""The perplexity protocol on fake models with a known NLL, and on the real dense model."""

from __future__ import annotations

import math

import pytest
import torch

from ernieq.eval.perplexity import (
    PerplexityError,
    next_token_divergence,
    perplexity,
    tokenize_text,
    window_count,
)

VOCAB = 37


class UniformLM(torch.nn.Module):
    """Zero logits: every token has probability 1/V, so ppl == V. Records the windows it sees."""

    def __init__(self, vocab: int = VOCAB):
        super().__init__()
        self.vocab = vocab
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.seen: list[torch.Tensor] = []

    def forward(self, input_ids):
        self.seen.append(input_ids.clone())
        return torch.zeros(*input_ids.shape, self.vocab) * self.scale  # [1, L, V]


class SuccessorLM(torch.nn.Module):
    """Logit ``a`` on (t + 1) mod V, 0 elsewhere: p(next = t+1) = e^a / (e^a + V - 1)."""

    def __init__(self, a: float, vocab: int = VOCAB):
        super().__init__()
        self.a, self.vocab = a, vocab

    def forward(self, input_ids):
        logits = torch.zeros(*input_ids.shape, self.vocab)  # [1, L, V]
        logits.scatter_(-1, ((input_ids + 1) % self.vocab)[..., None], self.a)
        return type("Out", (), {"logits": logits})()


def test_uniform_logits_give_vocab_size():
    ids = torch.randint(0, VOCAB, (1, 3 * 16 + 5), generator=torch.Generator().manual_seed(0))
    r = perplexity(UniformLM(), ids, seq_len=16, progress=False)
    assert r.ppl == pytest.approx(VOCAB, rel=1e-6)
    assert r.nll_mean == pytest.approx(math.log(VOCAB), rel=1e-6)


def test_known_nll_of_successor_model():
    a = 2.5
    ids = (torch.arange(200) * 1) % VOCAB  # every next token is the successor
    r = perplexity(SuccessorLM(a), ids.tolist(), seq_len=50, progress=False)
    p = math.exp(a) / (math.exp(a) + VOCAB - 1)
    assert r.ppl == pytest.approx(1 / p, rel=1e-5)
    assert (r.windows, r.tokens, r.seq_len) == (4, 4 * 49, 50)


def test_windows_do_not_overlap_and_the_partial_tail_is_dropped():
    seq = 16
    ids = torch.arange(2 * seq + seq - 1) % VOCAB  # two full windows and a partial one
    model = UniformLM()
    r = perplexity(model, ids[None], seq_len=seq, progress=False)
    assert r.windows == 2 and r.tokens == 2 * (seq - 1)
    assert len(model.seen) == 2
    for w, seen in enumerate(model.seen):
        assert torch.equal(seen[0], ids[w * seq : (w + 1) * seq])


def test_max_windows_limits_scoring():
    model = UniformLM()
    r = perplexity(model, torch.zeros(100, dtype=torch.long), seq_len=10, max_windows=3, progress=False)
    assert (r.windows, r.tokens, len(model.seen)) == (3, 27, 3)
    assert window_count(100, 10) == 10 and window_count(99, 10) == 9 and window_count(100, 10, 4) == 4


def test_mixed_windows_average_over_tokens():
    """NLL is the mean over all predicted tokens: a window of successors and a window of repeats."""
    a, seq = 3.0, 20
    good = torch.arange(seq) % VOCAB  # successor everywhere: p
    bad = torch.full((seq,), 5)  # next token = same token, logit 0: q = 1 / (e^a + V - 1)
    r = perplexity(SuccessorLM(a), torch.cat([good, bad]), seq_len=seq, progress=False)
    z = math.exp(a) + VOCAB - 1
    expected = ((seq - 1) * -math.log(math.exp(a) / z) + (seq - 1) * math.log(z)) / (2 * (seq - 1))
    assert r.nll_mean == pytest.approx(expected, rel=1e-5)


def test_protocol_errors():
    with pytest.raises(PerplexityError, match="no full window"):
        perplexity(UniformLM(), torch.zeros(10, dtype=torch.long), seq_len=16, progress=False)
    with pytest.raises(PerplexityError, match="seq_len"):
        perplexity(UniformLM(), torch.zeros(10, dtype=torch.long), seq_len=1, progress=False)
    with pytest.raises(PerplexityError, match=r"\[1, L\] or \[L\]"):
        perplexity(UniformLM(), torch.zeros(2, 10, dtype=torch.long), seq_len=5, progress=False)


def test_non_finite_logits_fail_loudly():
    class NanLM(UniformLM):
        def forward(self, input_ids):
            return super().forward(input_ids) * float("nan")

    with pytest.raises(PerplexityError, match="window 0: .*non-finite"):
        perplexity(NanLM(), torch.zeros(10, dtype=torch.long), seq_len=5, progress=False)


def test_progress_bar_runs():
    r = perplexity(UniformLM(), torch.zeros(40, dtype=torch.long), seq_len=10, progress=True)
    assert r.windows == 4


def test_divergence_identical_and_known():
    base = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
    q = torch.log(torch.tensor([[0.9, 0.1], [0.9, 0.1]]))
    same = next_token_divergence(base, base)
    assert same.kl_mean == pytest.approx(0.0, abs=1e-7) and same.top1_agreement == 1.0
    d = next_token_divergence(base, q)
    kl0 = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert d.kl_mean == pytest.approx(kl0 / 2, rel=1e-5)
    assert d.tokens == 2
    flipped = next_token_divergence(base[1:], torch.log(torch.tensor([[0.2, 0.8]])))
    assert flipped.top1_agreement == 0.0
    with pytest.raises(PerplexityError, match="shapes differ"):
        next_token_divergence(base, q[:, :1])


def test_matches_transformers_loss_on_the_dense_model(dense_source):
    """One window scored by the protocol equals transformers' own shifted cross-entropy."""
    text = "The quick brown fox jumps over the lazy dog. " * 12
    ids = tokenize_text(dense_source.tokenizer, text)
    seq = 64
    assert ids.shape[0] == 1 and ids.shape[1] > seq
    r = perplexity(dense_source.model, ids, seq_len=seq, max_windows=1, progress=False)
    with torch.inference_mode():
        loss = dense_source.model(input_ids=ids[:, :seq], labels=ids[:, :seq]).loss
    assert r.nll_mean == pytest.approx(loss.item(), rel=1e-5)
    with pytest.raises(PerplexityError, match="empty"):
        tokenize_text(dense_source.tokenizer, "")
