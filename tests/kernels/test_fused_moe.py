"""The fused MoE kernels against the looped-over-experts torch MoE, every codec."""

from __future__ import annotations

import functools

import pytest
import torch

from ernieq.kernels import KernelError, MoEWeights, reference
from ernieq.transforms import make_rotation
from ernieq.kernels.configs import TileConfig
from ernieq.kernels.fused_moe import moe
from tests.kernels.cases import CODECS, DEVICE, MOE_TOLERANCES, assert_close, encode_stack, seeded
from tests.kernels.test_moe_align import random_ids

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # interpreter sigmoid

# (T, E, A, H, I, dtype): T in {1, 3, 16, 33}, E in {1, 4, 8}, top-k in {1, 2}; H and I off the
# tile sizes; T=1 and T=3 over 8 experts leave most experts without a token. The cheap cases
# run in both dtypes, the two larger ones in one each (interpreter time).
CASES = [
    (1, 4, 2, 72, 40, torch.float32),
    (1, 4, 2, 72, 40, torch.bfloat16),
    (3, 8, 2, 136, 64, torch.bfloat16),
    (16, 1, 1, 64, 96, torch.float32),
    (16, 1, 1, 64, 96, torch.bfloat16),
    (33, 8, 2, 100, 48, torch.float32),
]


@functools.lru_cache(maxsize=4)
def _experts(codec, params_items, e, h, i, down_codec):
    """gate, up (E, I, H) and down (E, H, I), encoded once per codec and shape (the two dtypes share them)."""
    gen = seeded("experts", codec, params_items, e, h, i, down_codec)
    params = dict(params_items)
    gate = encode_stack(codec, params, e, i, h, gen)
    up = encode_stack(codec, params, e, i, h, gen)
    down_name, down_params = (codec, params) if down_codec is None else (down_codec[0], dict(down_codec[1]))
    down = encode_stack(down_name, down_params, e, h, i, gen)
    return gate, up, down


def make_moe(codec, params, t, e, a, h, i, dtype, gen, down_codec=None):
    """x [T, H], topk ids and weights [T, A], and the three expert stacks."""
    down_key = None if down_codec is None else (down_codec[0], tuple(sorted(down_codec[1].items())))
    gate, up, down = _experts(codec, tuple(sorted(params.items())), e, h, i, down_key)
    x = torch.randn(t, h, generator=gen).to(DEVICE, dtype)
    ids = random_ids(t, a, e, gen).to(DEVICE)
    weights = torch.rand(t, a, generator=gen).to(DEVICE) + 0.1
    return x, ids, weights, MoEWeights(gate, up, down)


@pytest.mark.parametrize("t,e,a,h,i,dtype", CASES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("codec,params", CODECS)
def test_moe_matches_reference(codec, params, t, e, a, h, i, dtype):
    args = make_moe(codec, params, t, e, a, h, i, dtype, seeded(codec, str(params), t, e, a, str(dtype)))
    assert_close(moe(*args), reference.moe(*args), MOE_TOLERANCES[dtype])


def test_moe_one_busy_expert_and_a_different_down_codec():
    """Every token on expert 2 (the other 7 idle, several M blocks of one expert); down in wint8."""
    gen = seeded("busy")
    x, _, weights, experts = make_moe(
        "wint4", {"group_size": 32, "symmetric": True}, 40, 8, 1, 64, 32, torch.float32, gen, down_codec=("wint8", {})
    )
    ids = torch.full((40, 1), 2, device=DEVICE)
    cfg = TileConfig(block_m=16, block_n=16, block_k=32, group_m=2)
    assert_close(moe(x, ids, weights, experts, config=cfg), reference.moe(x, ids, weights, experts),
                 MOE_TOLERANCES[torch.float32])  # fmt: skip


def test_moe_rejects_gate_up_mismatch():
    gen = seeded("mismatch")
    x, ids, weights, experts = make_moe("wint8", {}, 2, 4, 1, 32, 64, torch.float32, gen)  # H=32, I=64
    gate, down = experts.gate, experts.down
    up = encode_stack("fp8", {"block_size": None}, 4, 64, 32, gen)
    with pytest.raises(KernelError, match="gate and up"):
        moe(x, ids, weights, MoEWeights(gate, up, down))
    with pytest.raises(KernelError, match="down"):
        moe(x, ids, weights, MoEWeights(gate, gate, gate))
    with pytest.raises(KernelError, match="down_rotation"):
        moe(x, ids, weights, MoEWeights(gate, gate, down, make_rotation(32)))
