"""Batched GPTQ over experts: the same bytes however experts are batched, the reference's results, fallbacks."""

import logging

import pytest
import torch

import ernieq.calibration  # noqa: F401  (registers the ccq2 rounders)
from ernieq.calibration import gptq_experts
from ernieq.calibration.gptq import gptq_encode
from ernieq.calibration.gptq_experts import experts_per_chunk, gptq_encode_experts, upper_factor
from ernieq.calibration.rounding import encode_experts, encode_weight
from ernieq.codecs import CalibrationStats, CodecError, decode, get_codec
from ernieq.transforms import make_rotation

CODECS = [
    ("wint4", dict(group_size=64)),
    ("wint4", dict(group_size=64, clip=True, scale_dtype="float16")),  # --bits 4 with rotations
    ("wint4", dict(group_size=32, symmetric=False)),
    ("wint4", dict(group_size=None, clip=True)),  # the 2-bit recipe's per-channel int4
    ("wint8", {}),
    ("fp8", dict(block_size=64)),
    ("fp8", dict(block_size=None)),
    ("ccq2", dict(grid_candidates=2)),
    ("ccq2", dict(code_scale=120.0, code_zp=540.0)),
]
N, K = 21, 200  # N odd; K a multiple of ccq2's 4 but not of a group (32/64), a block (128) or 128 x 128 fp8


def correlated(k, t=512, seed=0):
    """Inputs X [T, K] with correlated channels of very different scales."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    return (torch.randn(t, k, generator=g) @ mix) * torch.exp(torch.randn(k, generator=g))


def stats_of(x):
    return CalibrationStats(hessian=x.T @ x / x.shape[0], act_abs_mean=x.abs().mean(0), tokens=x.shape[0])


def experts(e, n=N, k=K, seed=0):
    """E weights [E, N, K] and their statistics (expert 1: none, a cold expert)."""
    w = torch.randn(e, n, k, generator=torch.Generator().manual_seed(seed + 100))
    return w, [None if i == 1 else stats_of(correlated(k, seed=seed + i)) for i in range(e)]


def same_bytes(a, b):
    return a.codec == b.codec and a.shape == b.shape and a.params == b.params and a.tensors.keys() == b.tensors.keys() \
        and all(a.tensors[key].dtype == b.tensors[key].dtype and torch.equal(a.tensors[key], b.tensors[key])
                for key in a.tensors)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("codec,params", CODECS)
def test_batched_experts_have_the_bytes_of_one_at_a_time(codec, params, act_order):
    w, stats = experts(4)
    c = get_codec(codec, **params)
    batched = gptq_encode_experts(c, w, stats, act_order=act_order)
    for e in range(4):
        alone = gptq_encode_experts(c, w[e : e + 1], stats[e : e + 1], act_order=act_order)[0]
        assert same_bytes(batched[e], alone), e
    assert same_bytes(batched[1], c.encode(w[1]))  # no statistics: round to nearest, as gptq_encode does
    chunked = gptq_encode_experts(c, w, stats, act_order=act_order, budget=1)  # one expert per chunk
    assert all(same_bytes(a, b) for a, b in zip(batched, chunked))


# The tolerance ``gptq_experts.py`` states against the reference ``gptq.py`` on these small shapes: the
# fraction of stored code bytes that are the same, and the output error tr(dW H dW^T) over the reference's.
SAME_CODES = 0.998
OUTPUT_ERROR_RATIO = 4e-4


def output_error(w, w_hat, hessian):
    """tr(dW H dW^T) for dW = W - W_hat [N, K] and H [K, K], in float64: the quantity GPTQ minimises."""
    d = (w - w_hat).double()
    return torch.einsum("nk,kl,nl->", d, hessian.double(), d).item()


@pytest.mark.parametrize("shape", [(N, K), (48, 256)])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("codec,params", CODECS)
def test_matches_the_reference_loop_within_the_stated_tolerance(codec, params, act_order, shape):
    """Every codec: at least SAME_CODES of the code bytes as ``gptq.py`` (float64 factor, its own order
    of float operations) and an output error within OUTPUT_ERROR_RATIO of its."""
    w, stats = experts(3, *shape, seed=7)
    c = get_codec(codec, **params)
    batched = gptq_encode_experts(c, w, stats, act_order=act_order)
    codes = "quant_weight" if codec == "ccq2" else "qweight"
    for e in (0, 2):
        ref = gptq_encode(c, w[e], stats[e], act_order=act_order)
        same = (batched[e].tensors[codes].view(torch.uint8) == ref.tensors[codes].view(torch.uint8)).double().mean()
        assert same >= SAME_CODES, (e, same.item())
        h = stats[e].hessian
        ratio = output_error(w[e], decode(batched[e]), h) / output_error(w[e], decode(ref), h)
        assert abs(ratio - 1) <= OUTPUT_ERROR_RATIO, (e, ratio)


@pytest.mark.parametrize("codec,params", [("wint4", dict(group_size=64, clip=True, scale_dtype="float16")),
                                          ("ccq2", dict(grid_candidates=2))])
def test_rotated_experts_encode_as_each_weight_alone(codec, params):
    """quantize's batched items and ``encode_weight`` (sequential calibration's path) write the same bytes."""
    w, stats = experts(4, k=192)
    stats = [stats[0], stats[0], stats[1], stats[3]]  # a gate and up sharing statistics, a cold expert, another
    c, rot = get_codec(codec, **params), make_rotation(192)
    names = [f"layers.3.mlp.experts.{e}.up_proj.weight" for e in range(4)]
    batched = encode_experts(c, list(w), stats, names, "gptq", rot)
    for e in range(4):
        assert same_bytes(batched[e], encode_weight(c, w[e], stats[e], names[e], "gptq", rot))


@pytest.mark.parametrize("act_order", [False, True])
def test_weights_of_one_input_share_one_factor(monkeypatch, act_order):
    """An expert's gate and up (one statistics object) are factored once, with the bytes of two factors."""
    w, stats = experts(4, k=128)
    shared = [stats[0], stats[0], stats[2], stats[2]]  # (gate, up) of expert 0, then of expert 2
    copies = [CalibrationStats(hessian=st.hessian.clone(), tokens=st.tokens) for st in shared]
    calls = []
    factor = gptq_experts.upper_factor
    monkeypatch.setattr(gptq_experts, "upper_factor", lambda *a: calls.append(1) or factor(*a))
    c = get_codec("ccq2", grid_candidates=2)
    got = gptq_encode_experts(c, w, shared, act_order=act_order)
    assert len(calls) == 2
    assert all(same_bytes(a, b) for a, b in zip(got, gptq_encode_experts(c, w, copies, act_order=act_order)))
    assert len(calls) == 6


def test_a_codec_without_an_expert_rounder_goes_through_the_reference(monkeypatch):
    w, stats = experts(2, k=128)
    c = get_codec("wint4", group_size=64)
    monkeypatch.setattr(gptq_experts, "expert_rounder_class", lambda codec: None)
    got = gptq_encode_experts(c, w, stats, act_order=True)
    assert all(same_bytes(q, gptq_encode(c, w[e], stats[e], act_order=True)) for e, q in enumerate(got))


def test_upper_factor_is_the_ul_cholesky_of_the_damped_hessian():
    raw = stats_of(correlated(96)).hessian
    h = raw / raw.diagonal().mean()
    v = upper_factor(raw, raw.diagonal().mean(), 0.01, "w")
    assert torch.equal(v, v.triu()) and (v.diagonal() > 0).all()
    torch.testing.assert_close(v @ v.T, h + 0.01 * torch.eye(96), rtol=1e-4, atol=1e-4)
    u = torch.linalg.cholesky(torch.linalg.inv((h + 0.01 * torch.eye(96)).double()), upper=True)
    torch.testing.assert_close(torch.linalg.inv(v.double()), u, rtol=1e-3, atol=1e-4)  # GPTQ's U = V^-1


def test_cold_and_unfactorable_experts_fall_back_to_round_to_nearest(caplog):
    w, stats = experts(4, k=128)
    stats[2] = CalibrationStats(hessian=torch.eye(128), tokens=0)  # saw no token
    indefinite = torch.full((128,), 2.0)
    indefinite[0] = -100.0  # mean diagonal 1.2 > 0, but no damping up to 1000 x 1 % makes it definite
    stats[3] = CalibrationStats(hessian=torch.diag(indefinite), tokens=5)
    c = get_codec("wint4", group_size=64)
    with caplog.at_level(logging.WARNING, logger="ernieq.calibration"):
        got = gptq_encode_experts(c, w, stats, names=[f"experts.{e}.w" for e in range(4)])
    assert "experts.2.w: calibration saw no token" in caplog.text
    assert "experts.3.w: the Hessian cannot be factorised" in caplog.text
    for e in (1, 2, 3):
        assert same_bytes(got[e], c.encode(w[e]))
    assert not same_bytes(got[0], c.encode(w[0]))


def test_bad_input_fails_loudly_naming_the_expert():
    w, stats = experts(2, k=64)
    bad = torch.eye(64)
    bad[3, 3] = float("nan")
    c = get_codec("wint4", group_size=64)
    with pytest.raises(CodecError, match="experts.1.w: the calibration Hessian has NaN"):
        gptq_encode_experts(c, w, [stats[0], CalibrationStats(hessian=bad, tokens=4)],
                            names=["experts.0.w", "experts.1.w"])
    with pytest.raises(CodecError, match="rounding unit 4"):
        gptq_encode_experts(get_codec("ccq2"), torch.randn(2, 8, 66), [stats_of(correlated(66))] * 2)
    with pytest.raises(CodecError, match="one shape"):
        gptq_encode_experts(c, [w[0], w[1][:, :32]], stats)
    with pytest.raises(CodecError, match="block_size"):
        gptq_encode_experts(c, w, [stats[0]] * 2, block_size=96)


def test_chunks_fit_the_budget():
    assert experts_per_chunk(1536, 2560, 2 << 30) == 20  # ERNIE-4.5-21B gate/up: 103 MB per expert
    assert experts_per_chunk(3584, 8192, 2 << 30) == 2  # ERNIE-4.5-300B gate/up: 0.9 GB per expert
    assert experts_per_chunk(8192, 3584, 1) == 1


def test_ccq2_fits_experts_together_or_one_by_one_alike(monkeypatch):
    """On an accelerator ccq2 fits a chunk's experts in one call (channels stacked, importance per channel)."""
    from ernieq.calibration import gptq_ccq2

    w, stats = experts(3, k=192)
    stats[1] = stats[0]
    c = get_codec("ccq2", grid_candidates=3)
    for act_order in (False, True):
        alone = gptq_encode_experts(c, w, stats, act_order=act_order)
        monkeypatch.setitem(gptq_ccq2.FIT_EXPERTS, "cpu", 2)
        together = gptq_encode_experts(c, w, stats, act_order=act_order)
        monkeypatch.setitem(gptq_ccq2.FIT_EXPERTS, "cpu", 1)
        assert all(same_bytes(a, b) for a, b in zip(alone, together))
