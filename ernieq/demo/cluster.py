"""Neurons into equal experts: balanced assignment, balanced spherical k-means, router-driven moves."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def balanced_assign(sim: torch.Tensor, size: int) -> torch.Tensor:
    """LongTensor [n]: each of n items to one of G groups of exactly ``size``, greedily by similarity.

    sim: [n, G] with n == G * size. Pairs are taken best first (equal ones in index
    order, so the result does not depend on the sort's implementation); a pair is kept
    while its item is free and its group has room.
    """
    n, groups = sim.shape
    assign = [-1] * n
    fill = [0] * groups
    left = n
    for flat in torch.argsort(sim.flatten(), descending=True, stable=True).tolist():
        item, group = divmod(flat, groups)
        if assign[item] < 0 and fill[group] < size:
            assign[item], fill[group], left = group, fill[group] + 1, left - 1
            if left == 0:
                break
    return torch.tensor(assign)


def balanced_kmeans(features: torch.Tensor, groups: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """LongTensor [n]: spherical k-means into ``groups`` equal groups; features [n, d] unit rows.

    Run in kernel form on the [n, n] cosine matrix: the similarity of item i to group g's
    mean direction is (sum_{j in g} K_ij) / ||sum_{j in g} f_j||, with ||.||^2 = sum_{j,l in g} K_jl.
    """
    n = features.shape[0]
    size = n // groups
    gram = features @ features.T  # [n, n]
    seeds = torch.randperm(n, generator=generator)[:groups]
    assign = balanced_assign(gram[:, seeds], size)  # [n]
    for _ in range(iters):
        members = F.one_hot(assign, groups).to(gram.dtype)  # [n, G]
        sums = gram @ members  # [n, G] f_i . (sum of group g)
        norms = (members * sums).sum(0).clamp_min(1e-12).sqrt()  # [G] ||sum of group g||
        new = balanced_assign(sums / norms, size)
        if torch.equal(new, assign):
            break
        assign = new
    return assign


def refine_experts(
    energy: torch.Tensor, routed: torch.Tensor, chosen: torch.Tensor, groups: int
) -> torch.Tensor:
    """LongTensor [E, m]: move each routed neuron to the expert whose chosen tokens it serves most.

    energy: [T, E*m] squared output size of the routed neurons; chosen: [T, A] experts the
    router picks. kept[n, e] = sum over tokens routed to e of energy[t, n]; the balanced
    assignment maximises the energy the router's choices keep.
    """
    mask = torch.zeros(energy.shape[0], groups, dtype=energy.dtype).scatter_(1, chosen, 1.0)  # [T, E]
    kept = energy.T @ mask  # [E*m, E]
    assign = balanced_assign(kept, len(routed) // groups)  # [E*m]
    return torch.stack([routed[assign == e] for e in range(groups)])  # [E, m]
