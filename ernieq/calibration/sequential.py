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
from ernieq.calibration.tuned_store import TunedStore
from ernieq.calibration.rounding import encode_weight, rotate_stats
from ernieq.codecs import CalibrationStats, QuantizedTensor, decode, get_codec
from ernieq.transforms import Rotation, make_rotation
from ernieq.model.adapters import TensorInfo
from ernieq.model.moe import linear_weights

# (weight name, info) -> (codec name and kwargs, or None to keep the weight; stored rotated?)
Chooser = Callable[[str, TensorInfo], tuple[tuple[str, dict] | None, bool]]


@dataclass(frozen=True)
class SequentialPlan:
    """What the quantization will do, for the calibration to simulate: the codec choice and the method.
    ``tune``: block-output tuning after GPTQ (``ernieq.calibration.tune.TuneSettings``), whose results go
    to ``sink`` (a ``tuned_store.TunedStore``). ``key``: what ``choose`` is made from (the recipe's repr),
    part of a resumed pass's fingerprint (``resume.py``). ``awq``: AWQ's scales searched on each layer's
    statistics and folded into its norms and up projections before the weights are encoded (``awq.py``)."""

    choose: Chooser
    method: str
    rotation_seed: int = 0
    awq: bool = False
    tune: object | None = None
    sink: TunedStore | None = None
    key: str = ""

    def describe(self) -> dict:
        """What makes the pass's bytes (``choose`` by its ``key``)."""
        return {"method": self.method, "rotation_seed": self.rotation_seed, "key": self.key, "tune": repr(self.tune),
                "awq": self.awq}


@dataclass(frozen=True)
class Encoded:
    """One weight of a layer as the plan encodes it.

    q: the codec's result; weight: float32 [N, K] the weight the codec encoded (W R when rotated),
    on the layer's device; rotation: R or None; stats: the statistics the codec saw (turned by R).
    """

    q: QuantizedTensor
    weight: torch.Tensor
    rotation: Rotation | None
    stats: CalibrationStats | None

    def decoded(self, q: QuantizedTensor | None = None) -> torch.Tensor:
        """W_hat [N, K] of ``q`` (default: this weight's own) in the model's frame: ``W_hat R^T`` when rotated."""
        return self.model_frame(decode(q or self.q).float().to(self.weight.device))  # [N, K]

    def model_frame(self, w_hat: torch.Tensor, dense: bool = False) -> torch.Tensor:
        """A weight [N, K] in the codec's frame turned back to the model's (``W_hat R^T`` when rotated);
        dense: by one GEMM with the Hadamard block (``Rotation.apply_t``), faster on a CPU."""
        return self.rotation.to(w_hat.device).apply_t(w_hat, dense) if self.rotation is not None else w_hat


def encode_layer(
    model: LayerwiseModel, i: int, stats_of: Callable[[str], CalibrationStats | None], plan: SequentialPlan
) -> tuple[dict[str, Encoded], dict[str, torch.Tensor]]:
    """Every weight of decoder layer i the plan quantizes, encoded as ``ernieq quantize`` will encode it, and
    (``plan.awq``) the tensors stored as they are that AWQ's fold changed (norms, the router), by name."""
    lt = model.layer_tensors(i)
    tensors = {t.name: model.reader.get(t.name) for t in lt.infos}
    weights = {name: (info, weight.to(model.device, torch.float32))  # encoded where the layer runs
               for name, info, weight in linear_weights(lt.infos, tensors, model.adapter)}
    choices = {name: plan.choose(name, info) for name, (info, _) in weights.items()}
    plain: dict[str, torch.Tensor] = {}
    stats = {}
    if plan.awq:
        from ernieq.calibration.awq import awq_group

        named = {**{name: w for name, (_, w) in weights.items()},
                 **{t.name: tensors[t.name].to(model.device) for t in lt.infos if not t.is_linear_weight}}

        def codec(name: str):
            choice = choices[name][0] if name in choices else None
            return None if choice is None else get_codec(choice[0], **choice[1])

        def stats_on_device(name: str) -> CalibrationStats | None:
            s = stats_of(name)
            return s.to(model.device) if s is not None else None

        folded, stats = awq_group(model.adapter, i, named, codec, stats_on_device, f"layer {i}")
        weights = {name: (info, folded[name]) for name, (info, _) in weights.items()}
        plain = {name: t for name, t in folded.items() if t is not named[name] and choices.get(name, (None,))[0] is None}
    out: dict[str, Encoded] = {}
    for name, (info, weight) in weights.items():
        choice, rotate = choices[name]
        if choice is None:
            continue
        codec_name, kwargs = choice
        rotation = make_rotation(weight.shape[1], plan.rotation_seed) if rotate else None
        s = stats[name] if name in stats else stats_of(name)
        q = encode_weight(get_codec(codec_name, **kwargs), weight, s, name, plan.method, rotation)
        s = s.to(weight.device) if s is not None else None
        if rotation is not None:
            rotation = rotation.to(weight.device)
            weight, s = rotation.apply(weight), rotate_stats(s, rotation)  # what the codec saw
        out[name] = Encoded(q, weight, rotation, s)
    return out, plain


def quantized_layer(
    model: LayerwiseModel, i: int, stats_of: Callable[[str], CalibrationStats | None], plan: SequentialPlan
) -> nn.Module:
    """Decoder layer i reloaded with every weight the plan quantizes replaced by its decoded value (and the
    tensors AWQ's fold changed by their new values)."""
    encoded, plain = encode_layer(model, i, stats_of, plan)
    return model.load_layer(i, {**plain, **{name: e.decoded() for name, e in encoded.items()}})  # W_hat R R^T
