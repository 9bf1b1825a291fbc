"""wint4: group-wise 4-bit, symmetric or with zero point; and the int4 packings."""

import math
import sys

import pytest
import torch

from ernieq.codecs import CodecError, decode, get_codec, stack_experts
from ernieq.codecs.packing import pack_int4_int32, pack_int4_k_major, unpack_int4_int32, unpack_int4_k_major
from ernieq.codecs.wint4 import SYM_DIVISORS

SHAPES = [(1, 33), (7, 100), (16, 576), (5, 257), (3, 32)]
CONFIGS = [dict(group_size=g, symmetric=s) for g in (32, 64, 128, None) for s in (True, False)] + [
    dict(group_size=64, symmetric=True, scale_dtype="float16"),  # the --bits 4 recipe's 4.25 bits
    dict(group_size=128, symmetric=False, scale_dtype="float16"),
]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def gaussian(shape, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(device)


def random_codes(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 16, shape, generator=g, dtype=torch.uint8)


def sqnr_db(w, w_hat):
    """10 log10(|W|^2 / |W - W_hat|^2)."""
    return 10 * math.log10(w.pow(2).sum().item() / (w - w_hat).pow(2).sum().item())


def per_element(t, group_size, k):
    """[N, n_groups] -> [N, K]: the value of each element's group, in float32."""
    return t.float().repeat_interleave(group_size, dim=1)[:, :k]


# ---- packing -------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (4, 8), (2, 3, 33), (5, 576)])
def test_k_major_round_trip(shape):
    codes = random_codes(shape)
    packed = pack_int4_k_major(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (*shape[:-1], math.ceil(shape[-1] / 2))
    assert torch.equal(unpack_int4_k_major(packed, shape[-1]), codes)


def test_k_major_nibble_order():
    codes = torch.tensor([[1, 2, 3, 4, 5]], dtype=torch.uint8)
    # even k low nibble, odd k high nibble, odd K padded with a zero code
    expected = torch.tensor([[1 | 2 << 4, 3 | 4 << 4, 5]], dtype=torch.uint8)
    assert torch.equal(pack_int4_k_major(codes), expected)


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (4, 8), (2, 3, 33), (5, 576)])
def test_int32_round_trip(shape):
    codes = random_codes(shape, seed=1)
    packed = pack_int4_int32(codes)
    assert packed.dtype == torch.int32 and packed.shape == (*shape[:-1], math.ceil(shape[-1] / 8))
    assert torch.equal(unpack_int4_int32(packed, shape[-1]), codes)


def test_int32_nibble_order_and_sign():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15, 9]], dtype=torch.uint8)
    word0 = sum(c << (4 * i) for i, c in enumerate([1, 2, 3, 4, 5, 6, 7, 15])) - 2**32  # top nibble 15: negative
    assert torch.equal(pack_int4_int32(codes), torch.tensor([[word0, 9]], dtype=torch.int32))


@pytest.mark.skipif(sys.byteorder != "little", reason="int32 bytes are k_major bytes only on little-endian hosts")
@pytest.mark.parametrize("k", [8, 16, 576])
def test_int32_is_k_major_bytes_on_little_endian(k):
    codes = random_codes((3, k), seed=2)
    assert torch.equal(pack_int4_int32(codes), pack_int4_k_major(codes).view(torch.int32))


@pytest.mark.parametrize("shape", [(3, 7), (4, 64), (2, 100)])
def test_int32_matches_compressed_tensors(shape):
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    signed = random_codes(shape, seed=3).to(torch.int8) - 8  # compressed-tensors int4 values in [-8, 7]
    ours = pack_int4_int32((signed + 8).to(torch.uint8))
    assert torch.equal(ours, helpers.pack_to_int32(signed, 4))
    assert torch.equal(helpers.unpack_from_int32(ours, 4, torch.Size(shape)), signed)


def test_packing_rejects_bad_codes():
    with pytest.raises(CodecError, match=r"\[0, 15\]"):
        pack_int4_k_major(torch.tensor([[16]], dtype=torch.uint8))
    with pytest.raises(CodecError, match="uint8"):
        pack_int4_int32(torch.tensor([[1]], dtype=torch.int32))
    with pytest.raises(CodecError, match="K=5"):
        unpack_int4_k_major(torch.zeros(2, 2, dtype=torch.uint8), 5)


# ---- codec ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
def test_layout_and_error_bound(shape, config, device):
    n, k = shape
    g = config["group_size"] or k  # None: one group per output channel
    n_groups = math.ceil(k / g)
    w = gaussian(shape, device=device)
    q = get_codec("wint4", **config).encode(w)
    scale_dtype = getattr(torch, config.get("scale_dtype", "float32"))
    expected = {"qweight": (torch.uint8, (n, math.ceil(k / 2))), "scale": (scale_dtype, (n, n_groups))}
    if not config["symmetric"]:
        expected["zero"] = (torch.uint8, (n, n_groups))
    assert {key: (t.dtype, tuple(t.shape)) for key, t in q.tensors.items()} == expected
    codes = unpack_int4_k_major(q.tensors["qweight"], k)
    assert codes.max() <= 15
    if k % 2:
        assert (q.tensors["qweight"][:, -1] >> 4 == 0).all()  # the padding nibble is code 0
    w_hat = decode(q)
    assert w_hat.dtype == torch.float32 and w_hat.shape == shape and w_hat.device == w.device
    scale = per_element(q.tensors["scale"], g, k)
    err = (w - w_hat).abs()
    if config["symmetric"]:  # amax / d with d > 7 clips the largest weights to the end of the grid
        assert (err <= scale * (0.5 + 1e-4))[w.abs() <= 7 * scale].all()  # half a step, plus float rounding
        assert torch.equal(w_hat, torch.round(w / scale).clamp(-8, 7) * scale)
    else:
        assert (err <= scale * (0.5 + 1e-4)).all()


def _group_sq_error(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """w: [N, G], scale: [N]. Squared error of the symmetric grid per row."""
    return ((torch.round(w / scale[:, None]).clamp(-8, 7) * scale[:, None] - w) ** 2).sum(1)


def test_clip_applies_to_the_symmetric_grid_only():
    with pytest.raises(CodecError, match="clip"):
        get_codec("wint4", symmetric=False, clip=True)


def test_symmetric_scale_is_the_least_error_divisor_and_beats_no_clipping():
    w = gaussian((64, 128), seed=11)
    q = get_codec("wint4", group_size=128, symmetric=True, clip=True).encode(w)
    amax = w.abs().amax(dim=1)
    errs = torch.stack([_group_sq_error(w, amax / d) for d in SYM_DIVISORS])  # [D, N]
    plain = get_codec("wint4", group_size=128, symmetric=True).encode(w)
    torch.testing.assert_close(plain.tensors["scale"][:, 0], amax / 7, rtol=0, atol=0)  # no clip: amax / 7
    chosen = _group_sq_error(w, q.tensors["scale"][:, 0])
    torch.testing.assert_close(chosen, errs.min(dim=0).values)
    assert chosen.sum() < 0.95 * errs[0].sum()  # clipping pays on Gaussian weights (d = 7 clips nothing)


@pytest.mark.parametrize("symmetric", [True, False])
def test_partial_group_scale_from_its_own_elements(symmetric):
    n, k, g = 4, 576, 128  # the hidden size of SmolLM2: 4.5 groups of 128
    w = gaussian((n, k), seed=4)
    w[:, 512:] *= 0.01  # a small last group: a scale from padding or from other groups would be wrong
    q = get_codec("wint4", group_size=g, symmetric=symmetric).encode(w)
    last = w[:, 512:]
    if symmetric:
        expected = last.abs().amax(dim=1) / 7  # scale = amax / 7, from its own elements
    else:
        expected = last.amax(dim=1).clamp(min=0) / 15 - last.amin(dim=1).clamp(max=0) / 15  # (max - min) / 15
    torch.testing.assert_close(q.tensors["scale"][:, -1], expected, rtol=0, atol=0)


def test_asymmetric_zero_point_and_grid():
    w = gaussian((32, 256), seed=5) + 0.7  # off-centre groups
    q = get_codec("wint4", group_size=64, symmetric=False).encode(w)
    zero, scale = q.tensors["zero"].float(), q.tensors["scale"]
    lo = w.unflatten(1, (-1, 64)).amin(dim=2).clamp(max=0)
    torch.testing.assert_close(zero, torch.round(-lo / scale).clamp(0, 15), rtol=0, atol=0)
    codes = unpack_int4_k_major(q.tensors["qweight"], 256).float()
    torch.testing.assert_close(decode(q), (codes - per_element(zero, 64, 256)) * per_element(scale, 64, 256))


@pytest.mark.parametrize(
    "config, min_db",
    # measured on [256, 576] and [300, 1024] Gaussians: 18.6, 19.4, 20.3 dB (sym); 20.0, 21.8 dB (asym g128, g32)
    [
        (dict(group_size=128, symmetric=True), 17.5),
        (dict(group_size=64, symmetric=True), 18.3),
        (dict(group_size=32, symmetric=True), 19.2),
        (dict(group_size=128, symmetric=False), 19.0),
        (dict(group_size=32, symmetric=False), 20.8),
    ],
    ids=str,
)
def test_sqnr_gaussian(config, min_db):
    w = gaussian((128, 576), seed=6)
    assert sqnr_db(w, decode(get_codec("wint4", **config).encode(w))) > min_db


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
def test_reencode_is_identity(shape, config):
    codec = get_codec("wint4", **config)
    q = codec.encode(gaussian(shape, seed=7))
    q2 = codec.encode(codec.decode(q))
    assert torch.equal(q.tensors["qweight"], q2.tensors["qweight"])
    if not config["symmetric"]:
        assert torch.equal(q.tensors["zero"], q2.tensors["zero"])
    # symmetric: decoded groups have amax 7 s or 8 s, which d = 7 or 8 divides back to s up to the
    # rounding of fl(7 s) / 7; asymmetric: the range (15 - zero) * s - (-zero * s) is rounded twice
    torch.testing.assert_close(q.tensors["scale"], q2.tensors["scale"], rtol=1e-6, atol=0)


@pytest.mark.parametrize("symmetric", [True, False])
def test_zero_and_one_sided_groups(symmetric):
    w = gaussian((3, 96), seed=8)
    w[0, :32] = 0  # an all-zero group
    w[1] = w[1].abs()  # all positive
    w[2] = -w[2].abs()  # all negative
    q = get_codec("wint4", group_size=32, symmetric=symmetric).encode(w.half())
    scale = q.tensors["scale"]
    assert torch.isfinite(scale).all() and (scale > 0).all()
    w_hat = decode(q)
    assert torch.equal(w_hat[0, :32], torch.zeros(32))
    assert ((w.half().float() - w_hat).abs() <= per_element(scale, 32, 96) * (0.5 + 1e-4)).all()


@pytest.mark.parametrize("symmetric, zero_bytes", [(True, 0), (False, 1)])
@pytest.mark.parametrize("shape", [(8, 576), (3, 101)])
def test_bits_per_weight_formula(shape, symmetric, zero_bytes):
    n, k = shape
    q = get_codec("wint4", group_size=128, symmetric=symmetric).encode(gaussian(shape))
    n_groups = math.ceil(k / 128)
    # packed codes + fp32 scale (+ uint8 zero point) per group
    assert q.bits_per_weight == (n * math.ceil(k / 2) + (4 + zero_bytes) * n * n_groups) * 8 / (n * k)


def test_float16_scales_cost_a_quarter_bit_at_g64_and_codes_follow_the_stored_scale():
    w = gaussian((16, 576), seed=9) * 1e-3  # small weights: float16 rounds their scales visibly
    q16 = get_codec("wint4", group_size=64, scale_dtype="float16").encode(w)
    q32 = get_codec("wint4", group_size=64).encode(w)
    assert q16.bits_per_weight == 4.25 and q32.bits_per_weight == 4.5
    assert torch.equal(q16.tensors["scale"], q32.tensors["scale"].half())  # the same amax / 7, rounded
    scale = per_element(q16.tensors["scale"], 64, 576)
    assert torch.equal(decode(q16), torch.round(w / scale).clamp(-8, 7) * scale)  # codes for the stored scale
    assert sqnr_db(w, decode(q16)) > sqnr_db(w, decode(q32)) - 0.05


def test_float16_scale_overflow_is_an_error():
    with pytest.raises(CodecError, match="overflows torch.float16"):
        get_codec("wint4", group_size=64, scale_dtype="float16").encode(torch.full((2, 64), 1e6))
    with pytest.raises(CodecError, match="scale_dtype"):
        get_codec("wint4", scale_dtype="bfloat16")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_raises_naming_tensor(bad):
    w = gaussian((8, 64))
    w[0, 0] = bad
    with pytest.raises(CodecError, match="experts.3.down_proj"):
        get_codec("wint4").encode(w, name="experts.3.down_proj")


@pytest.mark.parametrize("shape", [(2, 3, 4), (0, 16), (16, 0)])
def test_bad_shape_raises(shape):
    with pytest.raises(CodecError, match="2-D"):
        get_codec("wint4").encode(torch.zeros(shape))


@pytest.mark.parametrize("config", CONFIGS[:2], ids=str)
def test_stacked_decode_equals_per_expert(config):
    codec = get_codec("wint4", **config)
    qs = [codec.encode(gaussian((6, 100), seed=e)) for e in range(4)]
    stacked = decode(stack_experts(qs))
    assert stacked.shape == (4, 6, 100)
    for e, q in enumerate(qs):
        assert torch.equal(stacked[e], codec.decode(q))


def test_decode_rejects_other_config():
    q = get_codec("wint4", group_size=64).encode(gaussian((4, 128)))
    with pytest.raises(CodecError, match="cannot decode"):
        get_codec("wint4", group_size=128).decode(q)
    q.tensors.pop("scale")
    with pytest.raises(CodecError, match="layout"):
        get_codec("wint4", group_size=64).decode(q)
