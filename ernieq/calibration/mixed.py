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
all routed expert weights stays within B bits (scales counted). For ``--format fastdeploy`` the
wider codecs must lead (wint4 only in the first MoE layers): then the least-error split within B
is taken. The result is a recipe: one rule per codec naming its layers, in front of the recipe's
own rules.

Known limit: the error is local. On the demo it grows 116-fold with depth, while the KL each layer
causes at the model's output is largest in the first and last MoE layers, so this choice loses to
the fixed "first layers at wint4" rule there (README; ``benchmarks/layer_sensitivity.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ernieq.calibration.rounding import rotate_stats
from ernieq.codecs import decode, get_codec
from ernieq.config import CodecChoice, QuantConfig, Rule
from ernieq.errors import ErnieqError
from ernieq.model.adapters import adapter_for, iter_groups
from ernieq.model.checkpoint import CheckpointReader
from ernieq.model.moe import linear_weights
from ernieq.model.tensor_info import TensorClass
from ernieq.progress import progress_bar
from ernieq.transforms import Rotation, make_rotation

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


def turn(stats, k: int, rotate: bool, device: torch.device):
    """Statistics of a weight with K inputs in the codec's frame, on ``device``: Hessian R^T H R when rotated."""
    stats = stats.to(device) if stats is not None else None
    return rotate_stats(stats, _rotation(k).to(device)) if rotate else stats


def weight_cost(weight: torch.Tensor, stats, choice: CodecChoice, rotate: bool, name: str) -> tuple[float, float]:
    """(stored bits, tokens * tr(D H D^T)) of ``weight`` [N, K] rounded to nearest by ``choice``, measured
    on sampled rows and scaled to N; ``stats``: the weight's statistics as :func:`turn` gives them. Rotated,
    D and H are both in the codec's frame (W R, R^T H R): the same trace, as R is orthogonal. Without a
    Hessian (or tokens) the error is 0."""
    n, k = weight.shape
    rows = _rows(n)
    sample = weight[rows].float().contiguous()  # [r, K]
    if rotate:
        sample = _rotation(k).to(weight.device).apply(sample)
    q = get_codec(choice.codec, **choice.kwargs).encode(sample, stats, name=name)  # round to nearest
    scale = n / rows.numel()
    if stats is None or stats.hessian is None or stats.tokens <= 0:
        return 8.0 * q.nbytes * scale, 0.0
    d = sample - decode(q).float().to(weight.device)  # [r, K]
    return 8.0 * q.nbytes * scale, float(stats.tokens * scale * ((d @ stats.hessian.float()) * d).sum())


@functools.cache
def _rotation(k: int) -> Rotation:
    return make_rotation(k)


def measure(source, config: QuantConfig, calib, candidates: list[CodecChoice], device: torch.device,
            progress: bool = True) -> list[LayerCosts]:
    """LayerCosts of every MoE layer of the checkpoint at ``source`` (one tensor group at a time; the
    statistics of one input site turned once for the weights and candidates that read it)."""
    reader = CheckpointReader(source)
    adapter = adapter_for(reader.config, str(Path(source) / "config.json"))
    groups = [g for g in iter_groups(reader, adapter) if any(t.cls is ROUTED for t in g.tensors)]
    costs: dict[int, LayerCosts] = {}
    with progress_bar(progress) as bar:
        task = bar.add_task("sensitivity", total=len(groups))
        for group in groups:
            tensors, frames = group.load(reader), {}
            for name, info, weight in linear_weights(group.tensors, tensors, adapter):
                if info.cls is not ROUTED:
                    continue
                row = costs.setdefault(info.layer, LayerCosts(info.layer, bits=[0.0] * len(candidates),
                                                              error=[0.0] * len(candidates)))
                row.weights += weight.numel()
                weight, k = weight.to(device), weight.shape[1]
                for j, choice in enumerate(candidates):
                    rotate = config.rotates(choice)
                    key = (calib.site_of(name) or name, k, rotate)
                    if key not in frames:
                        frames[key] = turn(calib.stats(name), k, rotate, device)
                    bits, err = weight_cost(weight, frames[key], choice, rotate, name)
                    row.bits[j] += bits
                    row.error[j] += err
            del tensors, frames
            reader.release()
            bar.advance(task)
    return [costs[layer] for layer in sorted(costs)]


def choose(layers: list[LayerCosts], target_bits: float, wider_first: bool = False) -> dict[int, int]:
    """Per layer a candidate index: the cheapest everywhere, then the upgrades that remove the most error per
    stored bit while the average stays within ``target_bits`` per routed expert weight. ``wider_first``: the
    codecs' widths never grow with the layer index (FastDeploy's w4w2: wint4 only in the leading MoE layers);
    then every such split is measured and the one with the least error within the budget taken."""
    total = sum(c.weights for c in layers)
    chosen = {c.layer: min(range(len(c.bits)), key=lambda j: (c.bits[j], c.error[j])) for c in layers}
    used = sum(c.bits[chosen[c.layer]] for c in layers)
    budget = target_bits * total
    if used > budget * (1 + 1e-9):
        raise ErnieqError(f"--target-bits {target_bits}: the cheapest codecs already store "
                          f"{used / total:.3f} bits per routed expert weight")
    if wider_first:
        return _choose_split(layers, budget)
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


def _choose_split(layers: list[LayerCosts], budget: float) -> dict[int, int]:
    """The least-error choice within ``budget`` bits whose codecs go from the widest (first layers) to the
    cheapest (last): one cut between each two candidates, every placement tried (layers ordered by index)."""
    widest = sorted(range(len(layers[0].bits)), key=lambda j: -sum(c.bits[j] for c in layers))
    best: tuple[float, dict[int, int]] | None = None
    for cuts in itertools.combinations_with_replacement(range(len(layers) + 1), len(widest) - 1):
        bounds = (0, *cuts, len(layers))
        pick = {c.layer: widest[i] for i in range(len(widest)) for c in layers[bounds[i]:bounds[i + 1]]}
        if sum(c.bits[pick[c.layer]] for c in layers) <= budget:
            error = sum(c.error[pick[c.layer]] for c in layers)
            if best is None or error < best[0]:
                best = (error, pick)
    assert best is not None, "the all-cheapest choice fits: checked by choose"
    return best[1]


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
             progress: bool = True, wider_first: bool = False) -> MixPlan:
    """Measure and choose (see the module's docstring and :func:`choose`); the choice is logged layer by layer."""
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
    plan = MixPlan(target_bits, candidates, layers, choose(layers, target_bits, wider_first))
    for c in layers:
        log.info("target-bits: layer %d -> %s (errors %s)", c.layer, candidates[plan.chosen[c.layer]].describe(),
                 ", ".join(f"{cand.codec} {e:.4g}" for cand, e in zip(candidates, c.error)))
    log.info("target-bits %g: %.3f bits per routed expert weight", target_bits, plan.bits_per_weight)
    return plan
