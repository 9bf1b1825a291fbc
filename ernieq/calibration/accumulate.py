"""Running statistics of what one linear layer (or one router) sees, batch by batch.

Shape legend: T tokens, E experts, A active experts per token, K input features.

An :class:`InputAccumulator` sums, over every input row ``x [K]`` a linear
layer receives, ``|x|`` (mean), ``max |x|`` and ``x x^T`` (the Hessian of the
layer-wise least-squares objective, ``H = X^T X / n``), in float32 (the mean's
sum in float64). A :class:`RouterAccumulator` counts which experts the router
picked and how sure it was.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ernieq.device import HOST
from ernieq.distributed import all_reduce, world


@dataclass(frozen=True)
class SiteStats:
    """The statistics of one distinct input (a *site*; gate and up share one).

    hessian: float32 [K, K] = X^T X / tokens. abs_mean, abs_max: float32 [K].
    tokens: the number of input rows (T routed to it, or T of the layer).
    """

    hessian: torch.Tensor
    abs_mean: torch.Tensor
    abs_max: torch.Tensor
    tokens: int

    @property
    def k(self) -> int:
        return int(self.abs_mean.shape[0])


PANEL = 320  # columns per panel of X^T X (see add_upper_gram)


def add_upper_gram(acc: torch.Tensor, x: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """acc [K, K] += alpha * X^T X for x [T, K], on and above the diagonal only.

    X^T X is symmetric, so only the panels ``X_i^T [X_i ... X_last]`` are computed
    (about 2/3 of the work for K >= 640, and faster than one full product on a CPU);
    below the diagonal acc holds partial values until :func:`mirror_upper`.
    """
    k = x.shape[1]
    b = max(1, round(k / PANEL))
    edges = [round(i * k / b) for i in range(b + 1)]
    for lo, hi in zip(edges[:-1], edges[1:]):
        acc[lo:hi, lo:].addmm_(x[:, lo:hi].T, x[:, lo:], alpha=alpha)  # X_i^T X_[i:]
    return acc


def mirror_upper(a: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose upper triangle is a's."""
    return torch.triu(a) + torch.triu(a, diagonal=1).T


class InputAccumulator:
    """Sums over the input rows x [T, K] of one site, on ``device`` (where the rows are computed);
    ``finish`` normalises by the count and hands the statistics over in host memory.

    ``xtx`` is valid on and above the diagonal (``add_upper_gram``) until ``finish``.
    """

    def __init__(self, k: int, device: torch.device = HOST):
        self.k = k
        self.count = 0
        self.abs_sum = torch.zeros(k, dtype=torch.float64, device=device)
        self.abs_max = torch.zeros(k, dtype=torch.float32, device=device)
        self.xtx: torch.Tensor | None = None  # float32 [K, K], allocated by the first batch

    def add(self, x: torch.Tensor, gram: torch.Tensor | None = None) -> None:
        """x: [T, K] (any float dtype), T may be 0. gram: X^T X [K, K] of these rows (valid on and
        above the diagonal) when the caller has it already, else it is computed here."""
        if x.shape[-1] != self.k:
            raise ValueError(f"input accumulator for K={self.k} got rows of width {x.shape[-1]}")
        x = x.reshape(-1, self.k).float()  # [T, K]
        if x.shape[0] == 0:
            return
        self.count += x.shape[0]
        a = x.abs()  # [T, K]
        self.abs_sum += a.sum(0)  # sum_t |x_tk|: one batch in fp32, the running total in fp64
        torch.maximum(self.abs_max, a.amax(0), out=self.abs_max)
        if self.xtx is None:
            self.xtx = torch.zeros(self.k, self.k, dtype=torch.float32, device=self.abs_max.device)
        if gram is not None:
            self.xtx.add_(gram)
        else:
            add_upper_gram(self.xtx, x)  # X^T X, fp32 accumulation  [K, K]

    def all_reduce(self) -> None:
        """Sums over every rank's rows (data-parallel calibration); nothing to do in one process."""
        if world().size == 1:
            return
        head = torch.cat([self.abs_sum, self.abs_sum.new_tensor([self.count])])  # [K + 1], float64
        if self.xtx is None:  # no rows here; other ranks may have some
            self.xtx = torch.zeros(self.k, self.k, dtype=torch.float32, device=self.abs_max.device)
        all_reduce([head, self.xtx])
        all_reduce([self.abs_max], op="max")
        self.abs_sum, self.count = head[:-1], int(head[-1])

    def finish(self) -> SiteStats | None:
        """The site's statistics, or None when it saw no input. Call once: the sums become the result."""
        if self.count == 0:
            return None
        hessian, self.xtx = mirror_upper(self.xtx).div_(self.count).to(HOST), None  # H = X^T X / n
        abs_mean = (self.abs_sum / self.count).float()  # mean |x| per channel
        return SiteStats(hessian, abs_mean.to(HOST), self.abs_max.to(HOST, copy=True), self.count)


@dataclass(frozen=True)
class RouterStats:
    """What the router of one MoE layer did over T calibration tokens.

    counts[e]: tokens routed to expert e (sums to T * A). load_share[e] = counts / (T A).
    mean_prob[e]: mean routing probability (softmax of the router logits).
    entropy: mean over tokens of -sum_e p log p, in nats (at most log E).
    topk_margin_mean / _min: p_(A) - p_(A+1), the gap between the last chosen and
    the first unchosen probability (sorted descending), mean and minimum over tokens.
    """

    layer: int
    tokens: int
    top_k: int
    counts: list[int]
    load_share: list[float]
    mean_prob: list[float]
    entropy: float
    max_entropy: float
    topk_margin_mean: float
    topk_margin_min: float

    def to_json(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: dict) -> RouterStats:
        return cls(**data)


class RouterAccumulator:
    """Counts per expert and the router's confidence, from logits [T, E] and choices [T, A] on ``device``."""

    def __init__(self, layer: int, num_experts: int, top_k: int, device: torch.device = HOST):
        self.layer = layer
        self.num_experts = num_experts
        self.top_k = top_k
        self.tokens = 0
        self.counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
        self.prob_sum = torch.zeros(num_experts, dtype=torch.float64, device=device)
        self.entropy_sum = 0.0
        self.margin_sum = 0.0
        self.margin_min = math.inf

    def add(self, logits: torch.Tensor, selected: torch.Tensor) -> None:
        """logits: [T, E] router logits; selected: int [T, A] the chosen experts."""
        logits = logits.reshape(-1, self.num_experts).float()  # [T, E]
        selected = selected.reshape(logits.shape[0], -1)  # [T, A]
        if logits.shape[0] == 0:
            return
        self.tokens += logits.shape[0]
        self.counts += torch.bincount(selected.flatten().long(), minlength=self.num_experts)[: self.num_experts]
        p = torch.softmax(logits, dim=-1)  # [T, E]
        self.prob_sum += p.sum(0, dtype=torch.float64)
        self.entropy_sum += float(-(p * torch.log_softmax(logits, dim=-1)).sum())  # sum_t -sum_e p log p
        if self.top_k < self.num_experts:
            top = p.topk(self.top_k + 1, dim=-1).values  # [T, A+1], descending
            margin = top[:, self.top_k - 1] - top[:, self.top_k]  # p_(A) - p_(A+1)  [T]
            self.margin_sum += float(margin.sum(dtype=torch.float64))
            self.margin_min = min(self.margin_min, float(margin.min()))

    def all_reduce(self) -> None:
        """Counts and sums over every rank's tokens (data-parallel calibration); the margin's minimum."""
        if world().size == 1:
            return
        sums = self.prob_sum.new_tensor([self.tokens, self.entropy_sum, self.margin_sum])  # float64
        low = self.prob_sum.new_tensor([self.margin_min])
        all_reduce([sums, self.counts, self.prob_sum])
        all_reduce([low], op="min")
        self.tokens, self.entropy_sum, self.margin_sum = int(sums[0]), float(sums[1]), float(sums[2])
        self.margin_min = float(low[0])

    def finish(self) -> RouterStats:
        t = max(self.tokens, 1)
        dense = self.top_k >= self.num_experts  # every expert always chosen: no margin
        return RouterStats(
            layer=self.layer,
            tokens=self.tokens,
            top_k=self.top_k,
            counts=[int(c) for c in self.counts],
            load_share=[float(c) / (t * self.top_k) for c in self.counts],  # counts / (T A)
            mean_prob=[float(s) / t for s in self.prob_sum],
            entropy=self.entropy_sum / t,
            max_entropy=math.log(self.num_experts),
            topk_margin_mean=0.0 if dense else self.margin_sum / t,
            topk_margin_min=0.0 if dense or self.tokens == 0 else self.margin_min,
        )
