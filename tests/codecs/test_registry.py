"""The codec registry: names, parameters, self-describing tensors."""

import dataclasses
import json

import pytest
import torch

import ernieq.codecs as codecs
from ernieq.codecs import CodecError, codec_for, codec_names, decode, get_codec, stack_experts

CASES = [("wint8", {}), ("wint4", {"group_size": 64, "symmetric": False}), ("fp8", {"block_size": None})]


def gaussian(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_codecs_register_on_import():
    assert {"wint8", "wint4", "fp8"} <= set(codec_names())


def test_unknown_codec_raises():
    with pytest.raises(CodecError, match="unknown codec 'wint3'"):
        get_codec("wint3")


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("wint8", {"group_size": 128}, "no parameter"),
        ("wint4", {"groupsize": 128}, "no parameter"),
        ("fp8", {"block": 128}, "no parameter"),
        ("wint4", {"group_size": 100}, "group_size"),
        ("wint4", {"group_size": 256}, "group_size"),
        ("wint4", {"symmetric": "yes"}, "symmetric"),
        ("fp8", {"block_size": 0}, "block_size"),
        ("fp8", {"block_size": 12.5}, "block_size"),
    ],
)
def test_bad_params_raise(name, params, message):
    with pytest.raises(CodecError, match=message):
        get_codec(name, **params)


@pytest.mark.parametrize("name, params", CASES)
def test_params_are_the_config_and_survive_json(name, params):
    codec = get_codec(name, **params)
    q = codec.encode(gaussian((16, 96)))
    assert q.codec == name and q.params == dataclasses.asdict(codec.config)
    q.params = json.loads(json.dumps(q.params))  # as read back from a checkpoint's JSON metadata
    assert codec_for(q).config == codec.config
    assert torch.equal(decode(q), codec.decode(q))


@pytest.mark.parametrize("name, params", CASES)
def test_decode_refuses_another_codecs_tensor(name, params):
    q = get_codec(name, **params).encode(gaussian((8, 64)))
    other = next(n for n in ("wint8", "fp8") if n != name)
    with pytest.raises(CodecError, match="cannot decode"):
        get_codec(other).decode(q)


@pytest.mark.parametrize("name, params", CASES)
def test_stack_then_decode_per_expert(name, params):
    codec = get_codec(name, **params)
    qs = [codec.encode(gaussian((8, 40), seed=e)) for e in range(3)]
    stacked = stack_experts(qs)
    assert stacked.shape == (3, 8, 40)
    assert stacked.bits_per_weight == qs[0].bits_per_weight
    w_hat = decode(stacked)
    for e, q in enumerate(qs):
        assert torch.equal(w_hat[e], codecs.decode(q))
