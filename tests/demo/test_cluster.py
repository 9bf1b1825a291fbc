"""Neurons into equal experts: balanced assignment, k-means, router-driven refinement."""

from __future__ import annotations

import torch

from ernieq.demo.cluster import balanced_assign, balanced_kmeans, refine_experts


def test_balanced_assign_fills_every_group_exactly():
    sim = torch.randn(60, 4, generator=torch.Generator().manual_seed(1))
    assign = balanced_assign(sim, 15)
    assert torch.equal(torch.bincount(assign, minlength=4), torch.full((4,), 15))


def test_balanced_kmeans_recovers_planted_groups():
    gen = torch.Generator().manual_seed(2)
    centers = torch.nn.functional.normalize(torch.randn(3, 32, generator=gen), dim=1)
    truth = torch.arange(48) % 3
    feats = torch.nn.functional.normalize(centers[truth] + 0.2 * torch.randn(48, 32, generator=gen), dim=1)
    assign = balanced_kmeans(feats, 3, iters=10, generator=gen)
    assert torch.equal(torch.bincount(assign), torch.full((3,), 16))
    for g in range(3):  # each found group is exactly one planted group
        assert len(set(truth[assign == g].tolist())) == 1


def test_refine_experts_moves_neurons_to_the_experts_routed_when_they_fire():
    groups, size, tokens = 3, 4, 30
    routed = torch.arange(100, 100 + groups * size)
    home = torch.arange(groups * size) % groups  # neuron n fires only on tokens routed to expert home[n]
    chosen = (torch.arange(tokens) % groups)[:, None]  # [T, A=1]
    energy = (chosen == home[None, :]).float() * torch.linspace(1, 2, groups * size)  # [T, E*m]
    experts = refine_experts(energy, routed, chosen, groups)
    assert experts.shape == (groups, size)
    for g in range(groups):
        assert sorted(experts[g].tolist()) == routed[home == g].tolist()
