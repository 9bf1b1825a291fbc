"""``--target-bits B``: each MoE layer's routed experts take the codec their measured sensitivity earns.

Shape legend: N output features, K input features, r sampled rows.

The candidates are the codecs the recipe itself gives routed experts (``--bits 2``: wint4 per
channel and ccq2). For every MoE layer and candidate, each routed expert weight W [N, K] is
encoded by round to nearest (rotated where the recipe rotates that codec) and its output error
measured on the calibration statistics:

    error(layer, codec) = sum over the layer's routed expert weights of  tokens * tr(D H D^T)

with D = W - W_hat in the model's frame, H = X^T X / tokens the weight's input Hessian and
tokens the calibration tokens routed to its expert (a cold expert costs nothing). Every codec
here encodes each output channel on its own, so D and the stored bytes are measured on r rows
spread over N (``SAMPLE_ROWS``) and scaled by N / r: exact for the bytes, an unbiased estimate
of the trace. Round to nearest stands in for the final rounding (GPTQ), which it bounds.

The choice is per MoE layer (the runtime's fused expert kernels and FastDeploy's w4w2 layout take
one codec for all experts of a layer): every layer starts at its cheapest candidate, then the
upgrade (layer, codec) with the most error removed per stored bit is taken while the average over
all routed expert weights stays within B bits (scales counted). The result is a recipe: one rule
per codec naming its layers, in front of the recipe's own rules.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ernieq.calibration.rounding import encode_weight
from ernieq.codecs import decode, get_codec
from ernieq.config import CodecChoice, QuantConfig, Rule
from ernieq.errors import ErnieqError
from ernieq.model.adapters import adapter_for, iter_groups
from ernieq.model.checkpoint import CheckpointReader
from ernieq.model.moe import linear_weights
from ernieq.model.tensor_info import TensorClass
from ernieq.progress import progress_bar
from ernieq.transforms import make_rotation

log = logging.getLogger(__name__)

SAMPLE_ROWS = 128  # output channels measured per weight (all of them when N is smaller)
ROUTED = TensorClass.ROUTED_EXPERT


@dataclass
class LayerCosts:
    """One MoE layer: its routed expert weights, and per candidate the stored bits and the output error."""

    layer: int
    weights: int = 0
    bits: list[float] = field(default_factory=list)
    error: list[float] = field(default_factory=list)


@dataclass
class MixPlan:
    """What ``--target-bits`` chose: per layer the candidate index, and the measurements behind it."""

    target_bits: float
    candidates: list[CodecChoice]
    layers: list[LayerCosts]
    chosen: dict[int, int]  # layer -> index into candidates

    @property
    def bits_per_weight(self) -> float:
        """Average stored bits per routed expert weight of the choice (scales counted)."""
        total = sum(c.weights for c in self.layers)
        return sum(c.bits[self.chosen[c.layer]] for c in self.layers) / total if total else 0.0

    def to_json(self) -> dict:
        return {"target_bits": self.target_bits, "bits_per_weight": self.bits_per_weight,
                "candidates": [c.describe() for c in self.candidates],
                "layers": [{"layer": c.layer, "weights": c.weights, "chosen": self.candidates[self.chosen[c.layer]].describe(),
                            "bits_per_weight": [b / c.weights for b in c.bits], "error": c.error}
                           for c in self.layers]}


def expert_candidates(config: QuantConfig) -> list[CodecChoice]:
    """The codecs the recipe's rules give routed experts by name (rules for every class excluded)."""
    out: list[CodecChoice] = []
    for rule in config.rules:
        if rule.choice is not None and ROUTED in rule.classes and len(rule.classes) == 1 and rule.choice not in out:
            out.append(rule.choice)
    return out


def _rows(n: int) -> torch.Tensor:
    """SAMPLE_ROWS output channels spread evenly over n (all of them when n is smaller)."""
    return torch.linspace(0, n - 1, min(n, SAMPLE_ROWS)).round().long().unique()


def weight_cost(weight: torch.Tensor, stats, choice: CodecChoice, rotate: bool, name: str) -> tuple[float, float]:
    """(stored bits, tokens * tr(D H D^T)) of ``weight`` [N, K] rounded to nearest by ``choice``, measured
    on sampled rows and scaled to N. Without a Hessian (or tokens) the error is 0."""
    n, k = weight.shape
    rows = _rows(n)
    sample = weight[rows].float().contiguous()  # [r, K]
    rotation = make_rotation(k).to(weight.device) if rotate else None
    q = encode_weight(get_codec(choice.codec, **choice.kwargs), sample, stats, name, "rtn", rotation)
    w_hat = decode(q).float().to(weight.device)
    if rotation is not None:
        w_hat = rotation.apply_t(w_hat, dense=True)  # back to the model's frame
    scale = n / rows.numel()
    if stats is None or stats.hessian is None or stats.tokens <= 0:
        return 8.0 * q.nbytes * scale, 0.0
    d = sample - w_hat  # [r, K]
    h = stats.hessian.to(weight.device, torch.float32)
    return 8.0 * q.nbytes * scale, float(stats.tokens * scale * ((d @ h) * d).sum())


def measure(source, config: QuantConfig, calib, candidates: list[CodecChoice], device: torch.device,
            progress: bool = True) -> list[LayerCosts]:
    """LayerCosts of every MoE layer of the checkpoint at ``source`` (one tensor group at a time)."""
    reader = CheckpointReader(source)
    adapter = adapter_for(reader.config, str(Path(source) / "config.json"))
    groups = [g for g in iter_groups(reader, adapter) if any(t.cls is ROUTED for t in g.tensors)]
    costs: dict[int, LayerCosts] = {}
    with progress_bar(progress) as bar:
        task = bar.add_task("sensitivity", total=len(groups))
        for group in groups:
            tensors = group.load(reader)
            for name, info, weight in linear_weights(group.tensors, tensors, adapter):
                if info.cls is not ROUTED:
                    continue
                row = costs.setdefault(info.layer, LayerCosts(info.layer, bits=[0.0] * len(candidates),
                                                              error=[0.0] * len(candidates)))
                row.weights += weight.numel()
                stats = calib.stats(name)
                for j, choice in enumerate(candidates):
                    bits, err = weight_cost(weight.to(device), stats, choice, config.rotates(choice), name)
                    row.bits[j] += bits
                    row.error[j] += err
            del tensors
            reader.release()
            bar.advance(task)
    return [costs[layer] for layer in sorted(costs)]


def choose(layers: list[LayerCosts], target_bits: float) -> dict[int, int]:
    """Per layer a candidate index: the cheapest everywhere, then the upgrades that remove the most error per
    stored bit while the average stays within ``target_bits`` per routed expert weight."""
    total = sum(c.weights for c in layers)
    chosen = {c.layer: min(range(len(c.bits)), key=lambda j: (c.bits[j], c.error[j])) for c in layers}
    used = sum(c.bits[chosen[c.layer]] for c in layers)
    budget = target_bits * total
    if used > budget * (1 + 1e-9):
        raise ErnieqError(f"--target-bits {target_bits}: the cheapest codecs already store "
                          f"{used / total:.3f} bits per routed expert weight")
    while True:
        best = None  # (error removed per bit, layer, index)
        for c in layers:
            now = chosen[c.layer]
            for j in range(len(c.bits)):
                extra, gain = c.bits[j] - c.bits[now], c.error[now] - c.error[j]
                if extra > 0 and gain > 0 and used + extra <= budget and (best is None or gain / extra > best[0]):
                    best = (gain / extra, c, j)
        if best is None:
            return chosen
        _, c, j = best
        used += c.bits[j] - c.bits[chosen[c.layer]]
        chosen[c.layer] = j


def mixed_config(config: QuantConfig, plan: MixPlan) -> QuantConfig:
    """``config`` with one rule per chosen codec (routed experts of the layers it won) in front; the recipe's
    own rules follow, optional now that the mix decides every routed expert."""
    front = []
    for j, choice in enumerate(plan.candidates):
        layers = tuple((c.layer, c.layer) for c in plan.layers if plan.chosen[c.layer] == j)
        if layers:
            front.append(Rule(choice=choice, classes=(ROUTED,), layers=layers, optional=True,
                              origin=f"--target-bits {plan.target_bits}"))
    rest = tuple(dataclasses.replace(r, optional=True) for r in config.rules)
    description = (f"{config.description} " if config.description else "") + (
        f"Routed experts mixed by measured sensitivity to {plan.bits_per_weight:.3f} bits per weight "
        f"(--target-bits {plan.target_bits}).")
    return dataclasses.replace(config, name=f"{config.name}-mix{plan.target_bits:g}", rules=(*front, *rest),
                               description=description)


def plan_mix(source, config: QuantConfig, calib, target_bits: float, device: torch.device,
             progress: bool = True) -> MixPlan:
    """Measure and choose (see the module's docstring); the choice is logged layer by layer."""
    candidates = expert_candidates(config)
    if len(candidates) < 2:
        raise ErnieqError(f"--target-bits mixes the codecs a recipe gives routed experts; recipe {config.name!r} "
                          f"gives them {len(candidates)} (use --bits 2, or a recipe with rules for routed_experts)")
    if calib is None:
        raise ErnieqError("--target-bits measures each layer's sensitivity on calibration statistics "
                          "(--calib-data SRC or --calib DIR)")
    layers = measure(source, config, calib, candidates, device, progress)
    if not layers:
        raise ErnieqError(f"--target-bits: {source} has no routed experts to mix")
    plan = MixPlan(target_bits, candidates, layers, choose(layers, target_bits))
    for c in layers:
        log.info("target-bits: layer %d -> %s (errors %s)", c.layer, candidates[plan.chosen[c.layer]].describe(),
                 ", ".join(f"{cand.codec} {e:.4g}" for cand, e in zip(candidates, c.error)))
    log.info("target-bits %g: %.3f bits per routed expert weight", target_bits, plan.bits_per_weight)
    return plan
