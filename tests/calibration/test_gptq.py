"""GPTQ behind the codec interface: against a naive oracle, against round to nearest, and its fallbacks."""

import logging

import numpy as np
import pytest
import torch

import ernieq.calibration  # noqa: F401  (registers the ccq2 rounder)
from ernieq.calibration.gptq import column_loop, column_rounder, gptq_encode, inverse_cholesky, usable_hessian
from ernieq.codecs import CalibrationStats, CodecError, decode, get_codec
from ernieq.codecs.wint4 import SYM_DIVISORS

T = 1024
CODECS = [
    ("wint4", dict(group_size=128)),
    ("wint4", dict(group_size=None)),
    ("wint4", dict(group_size=32, symmetric=False)),
    ("wint8", {}),
    ("fp8", dict(block_size=64)),
    ("fp8", dict(block_size=None)),
    ("ccq2", dict(grid_candidates=2)),
    ("ccq2", dict(code_scale=120.0, code_zp=540.0)),
]


def correlated(k, t=T, seed=0):
    """Inputs X [T, K] with correlated channels of very different scales."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    scale = torch.exp(torch.randn(k, generator=g))  # log-normal channel scales
    return (torch.randn(t, k, generator=g) @ mix) * scale


def weight(n, k, seed=1):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


def stats_of(x):
    return CalibrationStats(hessian=x.T @ x / x.shape[0], act_abs_mean=x.abs().mean(0), tokens=x.shape[0])


def output_error(x, w, w_hat):
    """||X W^T - X W_hat^T||_F, the quantity GPTQ minimises."""
    return torch.linalg.norm(x @ (w - w_hat).T).item()


def naive_gptq(w, h, round_column, damp=0.01):
    """GPTQ in its OBS form, in float64 numpy: quantize column k, spread its error over the
    columns right of it through the current inverse Hessian, then remove k from that inverse."""
    w, h = w.double().numpy().copy(), h.double().numpy().copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * np.diag(h).mean() * np.eye(h.shape[0])
    hinv = np.linalg.inv(h)
    for k in range(w.shape[1]):
        q = round_column(k, w)  # [N]
        e = (w[:, k] - q) / hinv[k, k]
        w[:, k:] -= np.outer(e, hinv[k, k:])
        hinv -= np.outer(hinv[:, k], hinv[k, :]) / hinv[k, k]
        w[:, k] = q
    return torch.from_numpy(w).float()


def wint8_columns(w0):
    scale = w0.abs().amax(1).double().numpy() / 127  # fixed per channel from the weight

    def round_column(k, w):
        return np.clip(np.round(w[:, k] / scale), -127, 127) * scale

    return round_column


def symmetric_scale(span, clip=False):
    """amax / 7, or with clip amax / d for the d of wint4's SYM_DIVISORS with the least squared error
    per row (first on ties)."""
    amax = np.abs(span).max(1)
    cands = [amax / d for d in (SYM_DIVISORS if clip else SYM_DIVISORS[:1])]
    errs = [((np.clip(np.round(span / c[:, None]), -8, 7) * c[:, None] - span) ** 2).sum(1) for c in cands]
    return np.choose(np.argmin(np.stack(errs), axis=0), cands)


def wint4_columns(group, symmetric, clip=False):
    grid = {}

    def round_column(k, w):
        g = k // group
        if k % group == 0:  # scales from the current weights when the group starts
            span = w[:, k : k + group]
            if symmetric:
                s = symmetric_scale(span, clip)
                grid[g] = (s, np.full_like(s, 8.0))
            else:
                lo, hi = np.minimum(span.min(1), 0), np.maximum(span.max(1), 0)
                s = (hi - lo) / 15
                grid[g] = (s, np.clip(np.round(-lo / s), 0, 15))
        s, z = grid[g]
        return (np.clip(np.round(w[:, k] / s) + z, 0, 15) - z) * s

    return round_column


def wint4_channel_columns(w0):
    scale = symmetric_scale(w0.double().numpy())  # one group per channel: fixed from the whole row, as for wint8

    def round_column(k, w):
        return (np.clip(np.round(w[:, k] / scale) + 8, 0, 15) - 8) * scale

    return round_column


@pytest.mark.parametrize(
    "codec,params,oracle",
    [
        ("wint8", {}, lambda w: wint8_columns(w)),
        ("wint4", dict(group_size=64), lambda w: wint4_columns(64, True)),
        ("wint4", dict(group_size=64, clip=True), lambda w: wint4_columns(64, True, clip=True)),
        ("wint4", dict(group_size=32, symmetric=False), lambda w: wint4_columns(32, False)),
        ("wint4", dict(group_size=None), lambda w: wint4_channel_columns(w)),
    ],
)
def test_matches_the_naive_obs_oracle(codec, params, oracle):
    n, k = 24, 200  # K: neither a multiple of the block (128) nor of every group
    x, w = correlated(k), weight(n, k)
    st = stats_of(x)
    got = decode(gptq_encode(get_codec(codec, **params), w, st))
    want = naive_gptq(w, st.hessian, oracle(w))
    close = torch.isclose(got, want, rtol=1e-4, atol=1e-6)
    assert close.float().mean() > 0.99  # float32 vs float64: a rare rounding tie may flip
    assert abs(output_error(x, w, got) / output_error(x, w, want) - 1) < 0.02


@pytest.mark.parametrize("block_size", [32, 64, 256])
def test_lazy_block_size_does_not_change_the_result(block_size):
    x, w = correlated(192), weight(16, 192)
    codec = get_codec("wint4", group_size=32)
    ref = decode(gptq_encode(codec, w, stats_of(x), block_size=128))
    got = decode(gptq_encode(codec, w, stats_of(x), block_size=block_size))
    assert torch.isclose(got, ref, rtol=1e-5, atol=1e-6).float().mean() > 0.99


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("codec,params", CODECS)
def test_lowers_output_error_against_round_to_nearest(codec, params, act_order):
    x, w = correlated(192), weight(32, 192)
    st = stats_of(x)
    c = get_codec(codec, **params)
    rtn = output_error(x, w, decode(c.encode(w, st)))  # ccq2's RTN already weighs by diag(H)
    q = gptq_encode(c, w, st, act_order=act_order)
    assert output_error(x, w, decode(q)) < 0.95 * rtn


class Spy:
    """A column rounder that remembers what it returned to the loop."""

    def __init__(self, rounder, shape):
        self.r, self.unit, self.group = rounder, rounder.unit, rounder.group
        self.w_hat = torch.full(shape, float("nan"))

    def start_group(self, col, w):
        self.r.start_group(col, w)

    def round(self, col, w, hinv):
        q = self.r.round(col, w, hinv)
        self.w_hat[:, col : col + self.unit] = q
        return q

    def result(self):
        return self.r.result()


@pytest.mark.parametrize("codec,params", CODECS)
def test_result_is_a_valid_tensor_that_decodes_to_what_the_loop_used(codec, params):
    n, k = 20, 192
    x, w = correlated(k), weight(n, k)
    c = get_codec(codec, **params)
    h = usable_hessian(stats_of(x), k, "w")
    spy = Spy(column_rounder(c, w, False, stats_of(x)), (n, k))
    column_loop(w.clone(), inverse_cholesky(h, 0.01, "w"), spy, torch.arange(k), 128, spy.group)
    q = spy.result()
    rtn = c.encode(w)
    assert q.codec == rtn.codec and q.shape == rtn.shape and q.params == rtn.params
    assert {key: (t.dtype, t.shape) for key, t in q.tensors.items()} == {
        key: (t.dtype, t.shape) for key, t in rtn.tensors.items()
    }
    torch.testing.assert_close(c.decode(q), spy.w_hat, rtol=1e-6, atol=0)


@pytest.mark.parametrize("codec,params", [("wint4", dict(group_size=64)), ("wint8", {}), ("ccq2", dict(grid_candidates=2))])
def test_dead_inputs_are_zeroed_and_everything_stays_finite(codec, params):
    k = 128
    x, w = correlated(k), weight(16, k)
    dead = torch.zeros(k, dtype=torch.bool)
    dead[[3, 40, 41, 42, 43, 100]] = True
    x[:, dead] = 0.0
    q = gptq_encode(get_codec(codec, **params), w, stats_of(x))
    w_hat = decode(q)
    assert torch.isfinite(w_hat).all()
    if codec != "ccq2":  # a ccq2 quad cannot hold an exact 0 beside other values; the error ignores it
        assert torch.equal(w_hat[:, dead], torch.zeros(16, int(dead.sum())))
    assert output_error(x, w, w_hat) < output_error(x, w, decode(get_codec(codec, **params).encode(w)))


@pytest.mark.parametrize(
    "stats,why",
    [
        (None, "no calibration statistics"),
        (CalibrationStats(hessian=torch.eye(64), tokens=0), "no token"),
        (CalibrationStats(hessian=torch.zeros(64, 64), tokens=5), "zero"),
    ],
)
def test_nothing_to_calibrate_with_falls_back_to_round_to_nearest(stats, why, caplog):
    w = weight(8, 64)
    codec = get_codec("wint4", group_size=32)
    with caplog.at_level(logging.WARNING, logger="ernieq.calibration.gptq"):
        q = gptq_encode(codec, w, stats, name="layers.7.mlp.experts.3.up_proj.weight")
    assert why in caplog.text and "layers.7.mlp.experts.3.up_proj.weight" in caplog.text
    rtn = codec.encode(w)
    assert all(torch.equal(q.tensors[key], rtn.tensors[key]) for key in rtn.tensors)


def test_tiny_and_rank_deficient_hessians_give_finite_scales():
    k = 128
    x, w = correlated(k, t=6), weight(16, k)  # 6 tokens: rank 6 of 128
    st = stats_of(x)
    tiny = CalibrationStats(hessian=st.hessian * 1e-30, tokens=6)
    for codec in (get_codec("wint4", group_size=32), get_codec("wint8"), get_codec("ccq2", grid_candidates=2)):
        a, b = gptq_encode(codec, w, st), gptq_encode(codec, w, tiny)
        for q in (a, b):
            assert all(torch.isfinite(t.float()).all() for t in q.tensors.values())
        assert torch.isclose(decode(a), decode(b), rtol=1e-5, atol=1e-7).float().mean() > 0.99  # H's scale is irrelevant


def test_bad_input_fails_loudly():
    w = weight(8, 64)
    codec = get_codec("wint4", group_size=64)
    nan = torch.eye(64)
    nan[3, 3] = float("nan")
    with pytest.raises(CodecError, match="NaN"):
        gptq_encode(codec, w, CalibrationStats(hessian=nan, tokens=4), name="w")
    with pytest.raises(CodecError, match="K=64"):
        gptq_encode(codec, w, CalibrationStats(hessian=torch.eye(32), tokens=4), name="w")
    with pytest.raises(CodecError, match="block_size"):
        gptq_encode(codec, w, CalibrationStats(hessian=torch.eye(64), tokens=4), block_size=96)
    with pytest.raises(CodecError, match="damping"):
        gptq_encode(codec, w, CalibrationStats(hessian=torch.eye(64), tokens=4), damp=0.0)
    with pytest.raises(CodecError, match="rounding unit 4"):
        gptq_encode(get_codec("ccq2"), weight(8, 66), CalibrationStats(hessian=torch.eye(66), tokens=4))


def test_activation_order_for_unrotated_weights_only():
    """``--method gptq`` visits columns by activation order unless the weight is rotated."""
    from ernieq.calibration.rounding import encode_weight, rotate_stats
    from ernieq.transforms import make_rotation

    codec, x = get_codec("wint4", group_size=32), correlated(64)
    w, st = weight(16, 64), stats_of(x)
    plain, ordered = gptq_encode(codec, w, st), gptq_encode(codec, w, st, act_order=True)
    assert not torch.equal(plain.tensors["qweight"], ordered.tensors["qweight"])  # the order matters here
    assert torch.equal(encode_weight(codec, w, st, "w", "gptq").tensors["qweight"], ordered.tensors["qweight"])
    rot = make_rotation(64)
    turned = gptq_encode(codec, rot.apply(w), rotate_stats(st, rot))
    assert torch.equal(encode_weight(codec, w, st, "w", "gptq", rotation=rot).tensors["qweight"],
                       turned.tensors["qweight"])
