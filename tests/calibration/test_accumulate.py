"""The running sums behind calibration statistics, against direct computation."""

import math

import pytest
import torch

from ernieq.calibration.accumulate import InputAccumulator, RouterAccumulator, add_upper_gram, mirror_upper


def rows(t, k, seed=0):
    return torch.randn(t, k, generator=torch.Generator().manual_seed(seed)) * torch.linspace(0.1, 2.0, k)


@pytest.mark.parametrize("k", [1, 7, 320, 700, 1000])  # one panel, and several of unequal widths
def test_upper_gram_panels_give_x_transpose_x(k):
    x = rows(50, k)
    acc = add_upper_gram(torch.zeros(k, k), x)
    add_upper_gram(acc, x[:20], alpha=-1)  # subtracting rows works panel by panel too
    want = x[20:].T @ x[20:]
    torch.testing.assert_close(mirror_upper(acc), want, rtol=1e-4, atol=1e-3)
    assert torch.equal(mirror_upper(acc), mirror_upper(acc).T)


def test_input_accumulator_over_batches_equals_one_pass():
    x = rows(300, 700, seed=1)
    acc = InputAccumulator(700)
    for batch in (x[:100], x[100:100], x[100:]):  # an empty batch is allowed
        acc.add(batch)
    s = acc.finish()
    assert s.tokens == 300
    torch.testing.assert_close(s.hessian, x.T @ x / 300, rtol=1e-4, atol=1e-4)  # H = X^T X / n
    torch.testing.assert_close(s.abs_mean, x.abs().mean(0), rtol=1e-5, atol=1e-6)
    assert torch.equal(s.abs_max, x.abs().amax(0))


def test_input_accumulator_without_rows_has_no_statistics():
    acc = InputAccumulator(16)
    acc.add(torch.zeros(0, 16))
    assert acc.finish() is None
    with pytest.raises(ValueError, match="K=16"):
        acc.add(torch.zeros(3, 8))


def test_router_statistics_on_a_hand_example():
    # 3 experts, top-1; probabilities per token: (0.7, 0.2, 0.1) and (0.25, 0.25, 0.5)
    p = torch.tensor([[0.7, 0.2, 0.1], [0.25, 0.25, 0.5]])
    acc = RouterAccumulator(layer=4, num_experts=3, top_k=1)
    acc.add(p.log(), torch.tensor([[0], [2]]))
    s = acc.finish()
    assert (s.layer, s.tokens, s.counts) == (4, 2, [1, 0, 1])
    assert s.load_share == [0.5, 0.0, 0.5]
    assert s.mean_prob == pytest.approx([0.475, 0.225, 0.3])
    entropy = [-sum(v * math.log(v) for v in row) for row in p.tolist()]
    assert s.entropy == pytest.approx(sum(entropy) / 2, rel=1e-6)
    assert s.max_entropy == pytest.approx(math.log(3))
    assert s.topk_margin_mean == pytest.approx((0.5 + 0.25) / 2, rel=1e-5)  # p_(1) - p_(2)
    assert s.topk_margin_min == pytest.approx(0.25, rel=1e-5)
