"""Token-expert pairs sorted by expert and padded to the M block, against a python loop."""

from __future__ import annotations

import pytest
import torch

from ernieq.kernels import KernelError
from ernieq.kernels.moe_align import max_padded_pairs, moe_align_block_size
from tests.kernels.cases import DEVICE, seeded


def align_by_loop(topk_ids: torch.Tensor, block_m: int, num_experts: int) -> tuple[list[int], list[int], int]:
    """The oracle: for each expert in order, its pairs in token order, then padding to block_m."""
    flat = topk_ids.reshape(-1).tolist()
    p = len(flat)
    ids, experts = [], []
    for e in range(num_experts):
        pairs = [i for i, v in enumerate(flat) if v == e]
        if not pairs:
            continue
        pad = -len(pairs) % block_m
        ids += pairs + [p] * pad
        experts += [e] * ((len(pairs) + pad) // block_m)
    return ids, experts, len(ids)


def random_ids(t: int, a: int, e: int, gen: torch.Generator) -> torch.Tensor:
    """[T, A]: A distinct experts per token, as a top-k router picks them."""
    if t == 0:
        return torch.empty(0, a, dtype=torch.long)
    return torch.stack([torch.randperm(e, generator=gen)[:a] for _ in range(t)])


@pytest.mark.parametrize("t,a,e", [(1, 1, 1), (1, 2, 8), (3, 2, 4), (16, 1, 8), (33, 2, 8), (40, 6, 64)])
@pytest.mark.parametrize("block_m", [16, 64])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64], ids=str)
def test_align_matches_loop(t, a, e, block_m, dtype):
    ids = random_ids(t, a, e, seeded(t, a, e, block_m)).to(DEVICE, dtype)
    sorted_ids, expert_ids, num_post = moe_align_block_size(ids, block_m, e)
    want_ids, want_experts, want_total = align_by_loop(ids.cpu(), block_m, e)

    assert sorted_ids.dtype == expert_ids.dtype == num_post.dtype == torch.int32
    assert sorted_ids.numel() == max_padded_pairs(t * a, e, block_m) >= want_total
    assert num_post.tolist() == [want_total]
    assert sorted_ids[:want_total].tolist() == want_ids
    assert (sorted_ids[want_total:] == t * a).all()  # unused tail: padding
    n_blocks = want_total // block_m
    assert expert_ids[:n_blocks].tolist() == want_experts
    assert (expert_ids[n_blocks:] == -1).all()


def test_experts_without_tokens_get_no_block():
    ids = torch.tensor([[5, 2], [5, 2], [2, 5]], device=DEVICE)  # experts 0, 1, 3, 4, 6, 7 get nothing
    sorted_ids, expert_ids, num_post = moe_align_block_size(ids, 16, 8)
    assert num_post.item() == 32
    assert expert_ids[:2].tolist() == [2, 5]
    assert sorted_ids[:3].tolist() == [1, 3, 4] and sorted_ids[16:19].tolist() == [0, 2, 5]


def test_no_tokens():
    sorted_ids, expert_ids, num_post = moe_align_block_size(torch.empty(0, 2, dtype=torch.long, device=DEVICE), 16, 4)
    assert num_post.item() == 0 and (expert_ids == -1).all() and (sorted_ids == 0).all()


@pytest.mark.skipif(DEVICE.type == "cuda", reason="the range check runs on the CPU only (no host sync on CUDA)")
def test_rejects_expert_ids_out_of_range():
    with pytest.raises(KernelError, match=r"\[0, 4\)"):
        moe_align_block_size(torch.tensor([[0, 4]]), 16, 4)
    with pytest.raises(KernelError, match="int32/int64"):
        moe_align_block_size(torch.tensor([[0.0, 1.0]]), 16, 4)
