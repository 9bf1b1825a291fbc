"""Sequential calibration: layer l + 1 calibrated on the outputs of the quantized layer l."""

from __future__ import annotations

import pytest
import torch

from ernieq.calibration import collect_stats
from ernieq.calibration.layerwise import LayerwiseModel
from ernieq.calibration.rounding import encode_weight
from ernieq.calibration.sequential import SequentialPlan, quantized_layer
from ernieq.codecs import decode, get_codec
from ernieq.transforms import make_rotation
from ernieq.model.adapters import TensorClass
from tests.tiny import TINY_ERNIE, write_tiny_ernie

WINT4 = ("wint4", {"group_size": 32, "symmetric": True})


def _ids():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, TINY_ERNIE["vocab_size"], (3, 24), generator=g)


def _experts_only(rotate: bool):
    return SequentialPlan(lambda name, info: (WINT4 if info.cls is TensorClass.ROUTED_EXPERT else None, rotate), "rtn")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_ernie(tmp_path_factory.mktemp("seq") / "m")


@pytest.mark.parametrize("rotate", [False, True])
def test_quantized_layer_holds_the_decoded_weights(tiny, rotate):
    model = LayerwiseModel(tiny)
    layer = quantized_layer(model, 1, lambda name: None, _experts_only(rotate))
    name = "model.layers.1.mlp.experts.2.down_proj.weight"
    w = model.reader.get(name).float()
    rot = make_rotation(w.shape[1]) if rotate else None
    q = encode_weight(get_codec(WINT4[0], **WINT4[1]), w, None, name, "rtn", rot)
    want = rot.apply_t(decode(q)) if rotate else decode(q)
    got = layer.mlp.experts.down_proj[2]  # transformers' fused [E, H, I]
    torch.testing.assert_close(got, want)
    assert not torch.equal(got, w)
    torch.testing.assert_close(layer.self_attn.q_proj.weight, model.reader.get("model.layers.1.self_attn.q_proj.weight").float())
    model.release_layer(1)


def test_sequential_statistics_follow_the_quantized_layers(tiny):
    plain = collect_stats(tiny, _ids(), progress=False)
    same = collect_stats(tiny, _ids(), progress=False,
                         sequential=SequentialPlan(lambda name, info: (None, False), "rtn"))
    seq = collect_stats(tiny, _ids(), progress=False, sequential=_experts_only(False))
    first = "model.layers.0.self_attn.q_proj.weight"
    later = "model.layers.2.self_attn.q_proj.weight"
    for name in (first, later):
        torch.testing.assert_close(same.stats(name).hessian, plain.stats(name).hessian)  # nothing quantized
    # layer 0 sees the embeddings either way; layer 2 sees the quantized experts of layer 1
    torch.testing.assert_close(seq.stats(first).hessian, plain.stats(first).hessian)
    assert not torch.allclose(seq.stats(later).hessian, plain.stats(later).hessian, rtol=1e-4, atol=1e-6)
    assert seq.info["sequential"] is True and plain.info["sequential"] is False
