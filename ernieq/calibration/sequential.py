"""Sequential calibration: layer l + 1 sees the outputs of layer l with its weights already quantized.

The calibration pass (``collect.py``) runs one decoder layer at a time. In
sequential mode, after a layer's statistics are collected, every weight of that
layer the recipe quantizes is encoded exactly as ``ernieq quantize`` will encode
it (same codec, method and rotation, from the same statistics), decoded, and the
layer runs again with those weights to give the next layer its inputs. The
quantization that follows re-encodes from the saved statistics and gets the
same weights, so the statistics of every layer describe the inputs it will see
in the quantized model, and GPTQ compensates the error of the layers before it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ernieq.calibration.layerwise import LayerwiseModel
from ernieq.calibration.rounding import encode_weight
from ernieq.codecs import CalibrationStats, decode, get_codec
from ernieq.transforms import make_rotation
from ernieq.model.adapters import TensorInfo
from ernieq.model.moe import linear_weights

# (weight name, info) -> (codec name and kwargs, or None to keep the weight; stored rotated?)
Chooser = Callable[[str, TensorInfo], tuple[tuple[str, dict] | None, bool]]


@dataclass(frozen=True)
class SequentialPlan:
    """What the quantization will do, for the calibration to simulate: the codec choice and the method."""

    choose: Chooser
    method: str
    rotation_seed: int = 0


def quantized_layer(
    model: LayerwiseModel, i: int, stats_of: Callable[[str], CalibrationStats | None], plan: SequentialPlan
) -> nn.Module:
    """Decoder layer i reloaded with every weight the plan quantizes replaced by its decoded value."""
    lt = model.layer_tensors(i)
    tensors = {t.name: model.reader.get(t.name) for t in lt.infos if t.is_linear_weight}
    replaced: dict[str, torch.Tensor] = {}
    for name, info, weight in linear_weights(lt.infos, tensors, model.adapter):
        choice, rotate = plan.choose(name, info)
        if choice is None:
            continue
        codec_name, kwargs = choice
        rotation = make_rotation(weight.shape[1], plan.rotation_seed) if rotate else None
        weight = weight.to(model.device, torch.float32)  # encoded where the layer runs
        q = encode_weight(get_codec(codec_name, **kwargs), weight, stats_of(name), name, plan.method, rotation)
        w_hat = decode(q).float()  # [N, K]
        replaced[name] = rotation.to(w_hat.device).apply_t(w_hat) if rotation is not None else w_hat  # W_hat R R^T
    return model.load_layer(i, replaced)
