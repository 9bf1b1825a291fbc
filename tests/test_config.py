import pytest

from ernieq.config import CodecChoice, parse_override
from ernieq.errors import ErnieqError
from ernieq.model.adapters import TensorClass, TensorInfo
from ernieq.recipes import FASTDEPLOY_W4_SHARE
from ernieq.recipes import preset as recipe
from ernieq.recipes.schema import first_count


def _info(cls, layer=1, expert=None):
    return TensorInfo("x", cls, layer, expert, "up_proj")


def test_two_bit_recipe_follows_fastdeploy_split():
    cfg = recipe(bits=2, w4_moe_layers=2, num_moe_layers=5)
    routed = _info(TensorClass.ROUTED_EXPERT, expert=0)
    assert cfg.choose("e", routed, moe_ordinal=0).codec == "wint4"
    assert cfg.choose("e", routed, moe_ordinal=1).codec == "wint4"
    assert cfg.choose("e", routed, moe_ordinal=2).codec == "ccq2"
    for cls in (TensorClass.ATTENTION, TensorClass.DENSE_MLP, TensorClass.SHARED_EXPERT):
        assert cfg.choose("a", _info(cls), moe_ordinal=3).codec == "wint8"
    for cls in (TensorClass.ROUTER, TensorClass.NORM, TensorClass.EMBEDDING, TensorClass.LM_HEAD):
        assert cfg.choose("r", _info(cls)) is None


def test_overrides_come_first_and_parse_parameters():
    cfg = recipe(bits=4, overrides=(r"layers\.1\..*q_proj=wint4:group_size=32,symmetric=false", r"o_proj=none"))
    att = _info(TensorClass.ATTENTION)
    assert cfg.choose("model.layers.1.self_attn.q_proj.weight", att) == CodecChoice(
        "wint4", (("group_size", 32), ("symmetric", False))
    )
    assert cfg.choose("model.layers.1.self_attn.o_proj.weight", att) is None
    expected = {"group_size": 64, "symmetric": True, "clip": False, "scale_dtype": "float16"}
    assert cfg.choose("model.layers.2.self_attn.q_proj.weight", att).kwargs == expected


@pytest.mark.parametrize("spec", ["noequals", "q_proj=nosuchcodec", "q_proj=wint4:group_size", "(=wint8",
                                  "q_proj=wint4:bogus=1"])
def test_bad_overrides_fail_early(spec):
    with pytest.raises(ErnieqError):
        parse_override(spec)


def test_invalid_bits():
    with pytest.raises(ErnieqError, match="--bits 3"):
        recipe(bits=3)


def test_default_w4_layers_is_at_least_one_and_at_most_all():
    assert first_count(FASTDEPLOY_W4_SHARE, 1) == 1
    assert first_count(FASTDEPLOY_W4_SHARE, 51) == 4  # FastDeploy's 300B: 4 of its 51 MoE layers
    assert first_count(FASTDEPLOY_W4_SHARE, 29) == 3  # the demo: ceil(4 * 29 / 51)
    assert first_count(FASTDEPLOY_W4_SHARE, 0) == 0


def test_fp8_recipe_is_w8a8_unless_asked_for_weight_only():
    linear = _info(TensorClass.ATTENTION)
    w8a8 = recipe(fp8=True)
    assert (w8a8.recipe, w8a8.choose("q", linear).kwargs) == ("fp8-w8a8", {"block_size": 128, "activations": "dynamic"})
    w16 = recipe(fp8=True, fp8_activations="none")
    assert (w16.recipe, w16.choose("q", linear).kwargs) == ("fp8-weight-only", {"block_size": 128, "activations": "none"})
    with pytest.raises(ErnieqError, match="--fp8-activations none: applies to --fp8 only"):
        recipe(bits=4, fp8_activations="none")
    with pytest.raises(ErnieqError, match="activations must be one of"):
        recipe(fp8=True, fp8_activations="static")
