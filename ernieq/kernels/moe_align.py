"""Sort token-expert pairs by expert and pad every expert's run to the M block (vLLM's moe_align_block_size).

Shape legend: T tokens, A active experts per token, E experts, P = T * A pairs.

Pair ``p = t * A + a`` is token ``t``'s ``a``-th expert choice. The fused MoE
kernel walks ``sorted_token_ids`` in blocks of ``block_m``; every block holds the
pairs of one expert (``expert_ids[block]``), padded with the sentinel ``P``.

Plain torch with no host synchronisation (static output sizes, the padded total
stays on the device), so it runs inside CUDA graphs and ``torch.compile``.
"""

from __future__ import annotations

import torch

from ernieq.kernels.args import KernelError


def max_padded_pairs(num_pairs: int, num_experts: int, block_m: int) -> int:
    """The length of ``sorted_token_ids``: P plus the worst-case padding, a multiple of block_m.

    Only experts that get a pair are padded, so at most min(E, P) runs pad by at most block_m - 1.
    """
    worst = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    return max(-(-worst // block_m) * block_m, block_m)


def moe_align_block_size(
    topk_ids: torch.Tensor, block_m: int, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_ids: int [T, A] with values in [0, E).

    Returns
      sorted_token_ids: int32 [EM], pair ids grouped by expert, each group padded with P to a multiple of block_m;
      expert_ids: int32 [EM / block_m], the expert of each block (-1 past the padded total);
      num_tokens_post_padded: int32 [1], the padded total (the blocks in use).
    """
    if topk_ids.ndim != 2 or topk_ids.dtype not in (torch.int32, torch.int64):
        raise KernelError(f"topk_ids must be int32/int64 [T, A], got {topk_ids.dtype} {tuple(topk_ids.shape)}")
    if block_m < 1 or num_experts < 1:
        raise KernelError(f"block_m and num_experts must be >= 1, got {block_m}, {num_experts}")
    device = topk_ids.device
    flat = topk_ids.reshape(-1).long()  # [P]
    p = flat.numel()
    if device.type == "cpu" and p and (int(flat.min()) < 0 or int(flat.max()) >= num_experts):
        raise KernelError(f"topk_ids must lie in [0, {num_experts}), found [{int(flat.min())}, {int(flat.max())}]")
    em = max_padded_pairs(p, num_experts, block_m)

    counts = torch.zeros(num_experts, dtype=torch.long, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # [E]: pairs per expert
    padded = (counts + block_m - 1) // block_m * block_m  # [E]: ceil(count / block_m) * block_m
    padded_end = torch.cumsum(padded, 0)  # [E]
    padded_start = padded_end - padded  # [E]
    start = torch.cumsum(counts, 0) - counts  # [E]: first sorted position of each expert

    order = torch.argsort(flat, stable=True)  # [P]: pair ids, grouped by expert, in token order
    expert_of = flat[order]  # [P]
    rank = torch.arange(p, device=device) - start[expert_of]  # [P]: position inside the expert's run
    sorted_token_ids = torch.full((em,), p, dtype=torch.int32, device=device)  # sentinel P = padding
    sorted_token_ids[padded_start[expert_of] + rank] = order.to(torch.int32)

    block_start = torch.arange(0, em, block_m, device=device)  # [EM / block_m]
    expert_ids = torch.searchsorted(padded_end, block_start, right=True)  # first e with padded_end[e] > start
    total = padded_end[-1:]  # [1]
    expert_ids = torch.where(block_start < total, expert_ids, -1).to(torch.int32)
    return sorted_token_ids, expert_ids, total.to(torch.int32)
