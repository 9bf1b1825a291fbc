"""Input rotations: orthogonal, exact inverse, Hessian conjugation, and the MoE op's down rotation."""

from __future__ import annotations

import pytest
import torch

from ernieq import kernels
from ernieq.codecs import decode
from ernieq.transforms import Rotation, fwht, hadamard, make_rotation
from tests.kernels.cases import MOE_TOLERANCES, assert_close, encode_stack, seeded
from tests.kernels.test_moe_align import random_ids

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # interpreter sigmoid


@pytest.mark.parametrize("k", [576, 128, 96, 7, 1])
def test_rotation_is_orthogonal_and_matches_its_dense_matrix(k):
    rot = make_rotation(k)
    dense = rot.apply(torch.eye(k))  # R [K, K]
    torch.testing.assert_close(dense @ dense.T, torch.eye(k), atol=1e-5, rtol=0)
    x = torch.randn(3, 2, k, generator=torch.Generator().manual_seed(k))
    torch.testing.assert_close(rot.apply(x), x @ dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rot.apply_t(rot.apply(x)), x, atol=1e-5, rtol=1e-5)
    h = torch.randn(k, k, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    h = h @ h.T
    r64 = rot.apply(torch.eye(k, dtype=torch.float64))
    torch.testing.assert_close(rot.conjugate(h), r64.T @ h @ r64, atol=1e-9 * h.abs().max().item(), rtol=0)


def test_rotation_spreads_an_outlier_over_every_input():
    w = torch.zeros(1, 576)
    w[0, 17] = 1.0
    turned = make_rotation(576).apply(w)
    assert turned.abs().min() > 0  # every column got a share
    assert turned.abs().max() < 0.2  # of 1/sqrt(576) ~ 0.042 times a Q_9 entry


def test_rotation_is_deterministic_and_round_trips_through_tensors():
    a, b = make_rotation(576, seed=3), make_rotation(576, seed=3)
    assert torch.equal(a.signs, b.signs) and torch.equal(a.q, b.q)
    assert not torch.equal(a.signs, make_rotation(576, seed=4).signs)
    back = Rotation.from_tensors(a.tensors())
    assert torch.equal(back.signs, a.signs) and back.block == 64
    with pytest.raises(ValueError, match="K = m"):
        Rotation.from_tensors({"signs": torch.ones(576), "q": torch.eye(5)})


@pytest.mark.parametrize("b", [1, 2, 8, 64, 512])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fwht_equals_the_dense_hadamard_product(b, dtype):
    x = torch.randn(3, 5, b, generator=torch.Generator().manual_seed(b)).to(dtype)
    want = (x.double() @ hadamard(b).double()) / b**0.5
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(fwht(x).double(), want, atol=tol * want.abs().max().item(), rtol=0)
    assert fwht(x).dtype == dtype
    with pytest.raises(ValueError, match="power of two"):
        fwht(torch.ones(2, 12))


def test_rotation_builds_nothing_on_the_host():
    """apply and apply_t make every intermediate on x's device: no host matrix, no host-to-device copy
    per call (what CUDA graphs and torch.compile need); checked on the meta device."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Devices(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.seen.add(t.device.type)
            return out

    rot = make_rotation(576).to("meta")
    x = torch.empty(4, 576, device="meta")
    with Devices() as mode:
        rot.apply(x)
        rot.apply_t(x)
    assert mode.seen == {"meta"}


def test_hadamard_rejects_orders_that_are_not_powers_of_two():
    assert torch.equal(hadamard(4) @ hadamard(4).T, 4 * torch.eye(4))
    with pytest.raises(ValueError, match="power of two"):
        hadamard(12)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_moe_turns_h_by_the_down_rotation(backend):
    """down stored turned (down_e R): out = sum_a w * (h R) down_e_stored^T, against a dense loop."""
    gen = seeded(5, backend)
    t, e, a, h, i = 7, 4, 2, 64, 48  # I = 3 * 16: Q_3 ⊗ H_16
    gate, up = (encode_stack("wint8", {}, e, i, h, gen) for _ in range(2))
    down = encode_stack("wint4", {"group_size": None, "symmetric": True}, e, h, i, gen)
    rot = make_rotation(i)
    x = torch.randn(t, h, generator=gen)
    ids, weights = random_ids(t, a, e, gen), torch.rand(t, a, generator=gen)
    got = kernels.moe(x, ids, weights, kernels.MoEWeights(gate, up, down, rot), backend=backend)
    want = torch.zeros(t, h)
    for tok in range(t):
        for slot in range(a):
            k = int(ids[tok, slot])
            hid = torch.nn.functional.silu(x[tok] @ decode(gate.expert(k)).T) * (x[tok] @ decode(up.expert(k)).T)
            want[tok] += weights[tok, slot] * (rot.apply(hid) @ decode(down.expert(k)).T)
    assert_close(got, want, MOE_TOLERANCES[torch.float32])
    plain = kernels.moe(x, ids, weights, kernels.MoEWeights(gate, up, down), backend="reference")
    assert (plain - got).abs().max() > 1e-3 * want.abs().max()  # the rotation changed the result
