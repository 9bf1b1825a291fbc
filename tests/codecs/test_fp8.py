"""fp8: float8_e4m3fn per output channel or per B x B block."""

import math

import pytest
import torch

from ernieq.codecs import CodecError, QuantizedTensor, decode, get_codec, stack_experts

SHAPES = [(1, 33), (7, 100), (130, 257), (128, 256)]
BLOCKS = [None, 128, 32]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
E4M3_MAX = 448.0
E4M3_MANTISSA_BITS = 3
E4M3_MIN_NORMAL = 2.0**-6


def gaussian(shape, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(device)


def sqnr_db(w, w_hat):
    """10 log10(|W|^2 / |W - W_hat|^2)."""
    return 10 * math.log10(w.pow(2).sum().item() / (w - w_hat).pow(2).sum().item())


def element_scale(scale, block, n, k):
    """The scale of every element, [N, K], from [N] or [ceil(N/B), ceil(K/B)]."""
    if block is None:
        return scale[:, None].expand(n, k)
    return scale.repeat_interleave(block, 0)[:n].repeat_interleave(block, 1)[:, :k]


def naive_block_scale(w, block):
    """Oracle: block amax / 448, one block at a time, edge blocks from their own elements."""
    n, k = w.shape
    rows = []
    for i in range(0, n, block):
        rows.append([w[i : i + block, j : j + block].abs().max() / E4M3_MAX for j in range(0, k, block)])
    return torch.tensor(rows, dtype=torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("shape", SHAPES)
def test_layout_and_error_bound(shape, block, device):
    n, k = shape
    w = gaussian(shape, device=device)
    q = get_codec("fp8", block_size=block).encode(w)
    scale_shape = (n,) if block is None else (math.ceil(n / block), math.ceil(k / block))
    got = {key: (t.dtype, tuple(t.shape)) for key, t in q.tensors.items()}
    assert got == {"qweight": (torch.float8_e4m3fn, shape), "scale": (torch.float32, scale_shape)}
    assert not torch.isnan(q.tensors["qweight"].float()).any()
    w_hat = decode(q)
    assert w_hat.dtype == torch.float32 and w_hat.shape == shape and w_hat.device == w.device
    s = element_scale(q.tensors["scale"], block, n, k)
    # e4m3 round to nearest: relative error <= 2^-4 for normals, half the subnormal step 2^-9 below
    bound = torch.maximum(w.abs() * 2.0 ** -(E4M3_MANTISSA_BITS + 1), s * E4M3_MIN_NORMAL * 2.0**-4)
    assert ((w - w_hat).abs() <= bound * (1 + 1e-5)).all()


@pytest.mark.parametrize("shape", [(130, 257), (1, 33), (100, 576)])
@pytest.mark.parametrize("block", [128, 64])
def test_edge_block_scale_from_its_own_elements(shape, block):
    w = gaussian(shape, seed=1)
    w[-1, -1] = 40.0  # an outlier in the corner (edge) block must not leak into other blocks
    q = get_codec("fp8", block_size=block).encode(w)
    torch.testing.assert_close(q.tensors["scale"], naive_block_scale(w, block), rtol=0, atol=0)


def test_per_channel_scale():
    w = gaussian((9, 70), seed=2)
    q = get_codec("fp8", block_size=None).encode(w)
    torch.testing.assert_close(q.tensors["scale"], w.abs().amax(dim=1) / E4M3_MAX, rtol=0, atol=0)


@pytest.mark.parametrize("block", [None, 128])
def test_sqnr_gaussian(block):
    w = gaussian((256, 576), seed=3)
    # measured 31.5 dB (blocks of 128) and 31.6 dB (per channel) on [256, 576] and [300, 1024]
    assert sqnr_db(w, decode(get_codec("fp8", block_size=block).encode(w))) > 30.0


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("shape", SHAPES)
def test_reencode_is_identity(shape, block):
    codec = get_codec("fp8", block_size=block)
    q = codec.encode(gaussian(shape, seed=4))
    q2 = codec.encode(codec.decode(q))
    assert torch.equal(q.tensors["qweight"].view(torch.uint8), q2.tensors["qweight"].view(torch.uint8))  # bit patterns
    assert torch.equal(q.tensors["scale"], q2.tensors["scale"])


@pytest.mark.parametrize("block", BLOCKS)
def test_zero_block_and_extremes(block):
    w = gaussian((160, 160), seed=5).to(torch.bfloat16)
    w[:128, :128] = 0  # an all-zero block (and all-zero rows when per channel)
    w[150, 3] = 3e38  # near float32 max (bf16 keeps the exponent): no overflow to inf or NaN
    q = get_codec("fp8", block_size=block).encode(w)
    scale = q.tensors["scale"]
    assert torch.isfinite(scale).all() and (scale > 0).all()
    w_hat = decode(q)
    assert torch.isfinite(w_hat).all()
    assert torch.equal(w_hat[:128, :128], torch.zeros(128, 128))


@pytest.mark.parametrize("block", [None, 128])
@pytest.mark.parametrize("shape", [(256, 576), (3, 101)])
def test_bits_per_weight_formula(shape, block):
    n, k = shape
    q = get_codec("fp8", block_size=block).encode(gaussian(shape))
    n_scales = n if block is None else math.ceil(n / block) * math.ceil(k / block)
    assert q.bits_per_weight == (n * k + 4 * n_scales) * 8 / (n * k)  # 1 byte per weight + fp32 scales


@pytest.mark.parametrize("bad", [float("nan"), -float("inf")])
def test_non_finite_raises_naming_tensor(bad):
    w = gaussian((8, 64))
    w[7, 63] = bad
    with pytest.raises(CodecError, match="self_attn.q_proj.weight"):
        get_codec("fp8").encode(w, name="self_attn.q_proj.weight")


@pytest.mark.parametrize("shape", [(2, 3, 4), (0, 16), (16, 0)])
def test_bad_shape_raises(shape):
    with pytest.raises(CodecError, match="2-D"):
        get_codec("fp8").encode(torch.zeros(shape))


@pytest.mark.parametrize("block", [None, 32])
def test_stacked_decode_equals_per_expert(block):
    codec = get_codec("fp8", block_size=block)
    qs = [codec.encode(gaussian((40, 70), seed=e)) for e in range(3)]
    stacked = decode(stack_experts(qs))
    assert stacked.shape == (3, 40, 70)
    for e, q in enumerate(qs):
        assert torch.equal(stacked[e], codec.decode(q))


def test_decode_rejects_other_config():
    q = get_codec("fp8", block_size=128).encode(gaussian((8, 16)))
    with pytest.raises(CodecError, match="cannot decode"):
        get_codec("fp8", block_size=None).decode(q)


# ---- activations: W8A8 ("dynamic") and weight-only ("none") ---------------------------------------


def test_activations_mode_is_recorded_and_checked():
    assert get_codec("fp8").encode(gaussian((8, 16))).params == {"block_size": 128, "activations": "dynamic"}
    q = get_codec("fp8", activations="none").encode(gaussian((8, 16)))
    assert q.params == {"block_size": 128, "activations": "none"}
    with pytest.raises(CodecError, match="activations must be one of"):
        get_codec("fp8", activations="static")


def test_params_from_before_w8a8_fail_loudly():
    q = get_codec("fp8").encode(gaussian((8, 16)))
    old = QuantizedTensor(q.codec, q.shape, q.tensors, {"block_size": 128})
    with pytest.raises(CodecError, match="do not say how activations are computed"):
        decode(old)


def loop_round_activations(x, group):
    """Per token, per group of input channels: x_scale = amax / 448, x_hat = e4m3(x / x_scale) * x_scale.
    Returns x_hat and every element's x_scale, [M, K]."""
    x_hat, scale = torch.empty_like(x), torch.empty_like(x)
    for m in range(x.shape[0]):
        for k0 in range(0, x.shape[1], group):
            g = x[m, k0 : k0 + group]
            s = g.abs().max() / E4M3_MAX
            s = s if s > 0 else torch.ones(())
            x_hat[m, k0 : k0 + group] = (g / s).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float() * s
            scale[m, k0 : k0 + group] = s
    return x_hat, scale


@pytest.mark.parametrize("block", [128, 32, None])
@pytest.mark.parametrize("k", [200, 64, 33])
def test_dynamic_activations_round_per_token_and_group(block, k):
    """Groups of B input channels (the last one partial), or the whole row per channel; all-zero rows stay 0."""
    x = gaussian((7, k), seed=k) * torch.logspace(-2, 2, 7)[:, None]
    x[3] = 0
    x[5, 0] = 1e3  # an outlier: only its own group's scale grows
    codec = get_codec("fp8", block_size=block)
    got = codec.round_activations(x)
    want, scale = loop_round_activations(x, block or k)
    assert torch.equal(got, want)
    assert torch.equal(got[3], torch.zeros(k))
    # e4m3 round to nearest: |x - x_hat| <= 2^-4 |x| for normals, half a subnormal step below
    bound = torch.maximum(x.abs() * 2.0**-4, scale * E4M3_MIN_NORMAL * 2.0**-4)
    assert ((x - got).abs() <= bound * (1 + 1e-6)).all()


def test_weight_only_leaves_activations_as_they_are():
    x = gaussian((3, 50))
    assert get_codec("fp8", activations="none").round_activations(x) is x
    assert get_codec("wint8").round_activations(x) is x  # every weight-only codec
