"""AWQ (Lin et al., 2023): per-input-channel scales searched against the output error, folded away.

Shape legend: N output features, K input features.

Weights that read one input x [K] (q/k/v after the input norm; gate/up of every
expert, the shared experts and the router after the post-attention norm; down
after up's output) can all be scaled along K by s while whatever produced x is
divided by s: y = (x / s) (W diag(s))^T. The codec then rounds W diag(s), where
the channels that carry large activations got larger and so lose less to the
grid. The scale is s = m^alpha / sqrt(max(m^alpha) min(m^alpha)) for the mean
|x| per channel m, and alpha in [0, 1) is searched on a grid to minimise the
summed output error of the weights that share x, with their Hessians:

    err(s) = sum_W tr(dW H dW^T),  dW = Q(W diag(s)) diag(1/s) - W.

The division by s folds into the producer — a norm's weight, or the rows of
``up_proj`` for ``down_proj`` — so nothing changes at run time and every export
format can carry it. The router, unquantized, is scaled exactly. Statistics of
the scaled weights are those of x / s: H' = H / (s s^T), mean |x'| = m / s.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ernieq.codecs import CalibrationStats, Codec, decode

log = logging.getLogger(__name__)

GRID = 20  # alpha in {0, 1/20, ..., 19/20}, as llm-awq searches


@dataclass(frozen=True)
class Member:
    """One quantized weight that reads the shared input: its name, weight [N, K], codec and statistics."""

    name: str
    weight: torch.Tensor
    codec: Codec
    stats: CalibrationStats | None


def scale_stats(stats: CalibrationStats | None, s: torch.Tensor) -> CalibrationStats | None:
    """Statistics of the inputs x / s: Hessian H / (s s^T) [K, K], mean |x| / s [K]."""
    if stats is None:
        return None
    h = stats.hessian / (s[:, None] * s[None, :]) if stats.hessian is not None else None
    m = stats.act_abs_mean / s if stats.act_abs_mean is not None else None
    return CalibrationStats(hessian=h, act_abs_mean=m, tokens=stats.tokens)


def output_error(member: Member, s: torch.Tensor) -> float:
    """tr(dW H dW^T) with dW = Q(W diag(s)) diag(1/s) - W, the Hessian-weighted error of rounding W
    scaled by s (H: the member's Hessian; none or no tokens: error counts with identity H)."""
    w = member.weight.float()
    scaled_stats = scale_stats(member.stats, s)
    w_hat = decode(member.codec.encode(w * s, scaled_stats, name=member.name)).float() / s  # [N, K]
    dw = (w_hat - w).double()
    h = member.stats.hessian if member.stats is not None and member.stats.tokens > 0 else None
    if h is None:
        return float((dw * dw).sum())
    return float(((dw @ h.double()) * dw).sum())  # tr(dW H dW^T)


def mean_abs_input(members: list[Member]) -> torch.Tensor | None:
    """Mean |x| per input channel over the members' tokens (token-weighted), or None without statistics."""
    rows = [(m.stats.act_abs_mean.double(), m.stats.tokens) for m in members
            if m.stats is not None and m.stats.act_abs_mean is not None and m.stats.tokens > 0]
    if not rows:
        return None
    total = sum(t for _, t in rows)
    return sum(a * t for a, t in rows) / total


def search_scale(members: list[Member], grid: int = GRID) -> torch.Tensor | None:
    """The AWQ scale s [K] (float32) minimising the members' summed output error, or None when
    there are no activation statistics or alpha = 0 (no scaling) is best."""
    m = mean_abs_input(members)
    if m is None:
        return None
    m = m.clamp(min=1e-8 * float(m.max().clamp(min=1e-30)))  # dead channels: no division by zero
    best, best_err = None, sum(output_error(x, torch.ones_like(m, dtype=torch.float32)) for x in members)
    for step in range(1, grid):
        s = m ** (step / grid)
        s = (s / (s.max() * s.min()).sqrt()).float()  # geometric centre 1
        err = sum(output_error(x, s) for x in members)
        if err < best_err:
            best, best_err = s, err
    return best


# ---- which weights share an input, and what their scale folds into ---------------------

# (producer pattern, consumer pattern): a producer's output feeds the consumers; \1 is the layer.
# Producers are norms (scaled by 1/s: a vector along K) or up projections (their rows scaled by 1/s).
_ATTENTION_INPUT = (r"^(.*\.layers\.\d+)\.input_layernorm\.weight$", r"\.self_attn\.(q|k|v)_proj\.weight$")
_MLP_INPUT = (r"^(.*\.layers\.\d+)\.post_attention_layernorm\.weight$",
              r"\.mlp\.(gate|(experts\.\d+|shared_experts)\.(gate_proj|up_proj)|gate_proj|up_proj)\.weight$")
_UP = re.compile(r"^(?P<block>.+)\.up_proj\.weight$")


@dataclass(frozen=True)
class FoldSet:
    """Weights reading one input, and the tensor producing it: a norm weight [K] or an up_proj [K, H]."""

    producer: str
    consumers: tuple[str, ...]


def fold_sets(names: list[str]) -> list[FoldSet]:
    """The fold sets among a tensor group's names: attention q/k/v behind the input norm, the MLP's
    gate/up (experts, shared experts, router) behind the post-attention norm, each down behind its up."""
    sets = []
    for producer_re, consumer_re in (_ATTENTION_INPUT, _MLP_INPUT):
        for name in names:
            m = re.match(producer_re, name)
            if m:
                layer = m.group(1)
                consumers = tuple(n for n in names if n.startswith(layer + ".") and re.search(consumer_re, n))
                if consumers:
                    sets.append(FoldSet(name, consumers))
    for name in names:
        m = _UP.match(name)
        if m and f"{m['block']}.down_proj.weight" in names:
            sets.append(FoldSet(name, (f"{m['block']}.down_proj.weight",)))
    return sets


def apply_awq(
    tensors: dict[str, torch.Tensor],
    member_of: Callable[[str, torch.Tensor], Member | None],
    stats_of: Callable[[str], CalibrationStats | None],
) -> tuple[dict[str, torch.Tensor], dict[str, CalibrationStats | None]]:
    """Search and fold the AWQ scales of one tensor group.

    tensors: the group's tensors by (canonical) name, routed experts per expert.
    member_of(name, weight): the Member for a weight the recipe quantizes, or None (kept as it is:
    still scaled, exactly, like the router).
    Returns the new tensors and the statistics of every scaled weight's new inputs.
    """
    out = dict(tensors)
    new_stats: dict[str, CalibrationStats | None] = {}
    for fs in fold_sets(sorted(tensors)):
        if fs.producer not in out:
            continue
        members = [m for m in (member_of(n, out[n]) for n in fs.consumers) if m is not None]
        if not members:
            continue
        s = search_scale(members)
        if s is None:
            continue
        producer = out[fs.producer]
        # x / s: a norm's weight [K] divided by s; an up projection's rows [K, H] divided by s
        out[fs.producer] = (producer.float() / (s if producer.dim() == 1 else s[:, None])).to(producer.dtype)
        for name in fs.consumers:
            w = out[name]
            out[name] = (w.float() * s).to(w.dtype)  # W diag(s)
            new_stats[name] = scale_stats(stats_of(name), s)
        log.debug("awq: %s and %d weights scaled (s in [%.3g, %.3g])", fs.producer, len(fs.consumers), s.min(), s.max())
    return out, new_stats
