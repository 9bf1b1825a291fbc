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

The division by s folds into the producer — a norm's weight (by the norm's own rule:
Gemma's ``1 + w`` too), or the rows of ``up_proj`` for ``down_proj`` — so nothing changes at
run time and every export format can carry it. The router, unquantized, is scaled exactly.
Which weights read which producer's output comes from the architecture adapter's shape-only
run of each decoder layer (``Adapter.fold_sets``); where that run shows no exact fold (an
output that also feeds a residual, a gate function not linear in up, a norm no parameter
change divides), those weights are rounded unscaled and the reason is logged. Statistics of
the scaled weights are those of x / s: H' = H / (s s^T), mean |x'| = m / s.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ernieq.codecs import CalibrationStats, Codec, decode
from ernieq.model.adapters import Adapter
from ernieq.model.norm_fold import NormFold

log = logging.getLogger(__name__)

GRID = 20  # alpha in {0, 1/20, ..., 19/20}, as llm-awq searches
COARSE = 4  # the search's first pass takes every 4th alpha of the grid, then halves the step around the best


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


def search_scale(members: list[Member], grid: int = GRID, coarse: int = COARSE) -> torch.Tensor | None:
    """The AWQ scale s [K] (float32) minimising the members' summed output error over alpha in
    {0, 1/grid, ..., (grid - 1)/grid}, or None when there are no activation statistics or alpha = 0 (no
    scaling) is best. Searched coarse to fine: every ``coarse``-th alpha, then the best one's neighbours at
    half the step, and so on (9 errors for the default grid instead of 20; the same alpha where the error is
    unimodal in alpha). Each error is an encode of every member: ccq2's is what the search costs."""
    m = mean_abs_input(members)
    if m is None:
        return None
    m = m.clamp(min=1e-8 * float(m.max().clamp(min=1e-30)))  # dead channels: no division by zero

    def scale(step: int) -> torch.Tensor:
        if step == 0:
            return torch.ones_like(m, dtype=torch.float32)
        s = m ** (step / grid)
        return (s / (s.max() * s.min()).sqrt()).float()  # geometric centre 1

    errors: dict[int, float] = {}

    def error(step: int) -> tuple[float, int]:
        if step not in errors:
            errors[step] = sum(output_error(x, scale(step)) for x in members)
        return errors[step], step  # on ties the smaller alpha

    best = min(range(0, grid, coarse), key=error)
    step = coarse // 2
    while step >= 1:
        best = min((b for b in (best - step, best, best + step) if 0 <= b < grid), key=error)
        step //= 2
    return scale(best) if best > 0 else None


# ---- which weights share an input, and what their scale folds into ---------------------


@dataclass(frozen=True)
class Fold:
    """Weights reading one input x [K], and the tensor producing it, by the names of one tensor group:
    a norm (``norm``: its fold rule; ``producer`` its weight [K], ``bias`` its bias) or rows ``rows``
    (all when None) of a linear weight [N, K] and its bias (an up projection)."""

    producer: str
    consumers: tuple[str, ...]
    bias: str | None = None
    rows: tuple[int, int] | None = None
    norm: NormFold | None = None


def group_folds(adapter: Adapter, layer: int, names: list[str]) -> tuple[list[Fold], list[str]]:
    """The adapter's fold sets of decoder ``layer`` (``Adapter.fold_sets``) in the names of a tensor group
    holding ``names``, and why any weights are left unscaled. A set whose producer or consumers are not
    all in the group is left out whole (a partial fold would change the function)."""
    by_hf = {adapter.to_hf_name(n): n for n in names}
    folds, reasons = [], []
    sets, skipped = adapter.fold_sets(layer)
    for fs in sets:
        wanted = [fs.producer, *fs.consumers, *([fs.bias] if fs.bias else [])]
        if not any(w in by_hf for w in wanted):
            continue  # the other half of the layer
        missing = [w for w in wanted if w not in by_hf]
        if missing:
            reasons.append(f"{fs.producer}: {missing[0]} is in another tensor group")
            continue
        folds.append(Fold(by_hf[fs.producer], tuple(by_hf[c] for c in fs.consumers),
                          by_hf[fs.bias] if fs.bias else None, fs.rows, fs.fold))
    return folds, reasons + skipped


def fold_scale(fold: Fold, tensors: dict[str, torch.Tensor], s: torch.Tensor) -> None:
    """Scale the consumers of ``fold`` by s [K] along K and divide what produces their input by s, in
    ``tensors`` (replaced, not changed in place): y = (x / s) (W diag(s))^T, the function unchanged.
    The producer: a norm's parameters by its rule, or rows of an up projection (and their bias)."""
    producer = tensors[fold.producer]
    bias = tensors[fold.bias] if fold.bias else None
    if fold.norm is not None:
        weight, bias = fold.norm.apply(producer, bias, s)
    else:
        lo, hi = fold.rows or (0, producer.shape[0])
        weight = producer.clone()
        weight[lo:hi] = (producer[lo:hi].float() / s[:, None]).to(producer.dtype)  # rows [K, H] divided by s
        if bias is not None:
            bias = bias.clone()
            bias[lo:hi] = (bias[lo:hi].float() / s).to(bias.dtype)
    tensors[fold.producer] = weight
    if fold.bias:
        tensors[fold.bias] = bias
    for name in fold.consumers:
        w = tensors[name]
        tensors[name] = (w.float() * s).to(w.dtype)  # W diag(s)


def apply_awq(
    tensors: dict[str, torch.Tensor],
    folds: list[Fold],
    member_of: Callable[[str, torch.Tensor], Member | None],
    stats_of: Callable[[str], CalibrationStats | None],
) -> tuple[dict[str, torch.Tensor], dict[str, CalibrationStats | None]]:
    """Search and fold the AWQ scales of one tensor group.

    tensors: the group's tensors by (canonical) name, routed experts per expert; folds: its fold sets
    (:func:`group_folds`). member_of(name, weight): the Member for a weight the recipe quantizes, or None
    (kept as it is: still scaled, exactly, like the router).
    Returns the new tensors and the statistics of every scaled weight's new inputs.
    """
    out = dict(tensors)
    new_stats: dict[str, CalibrationStats | None] = {}
    for fold in folds:
        members = [m for m in (member_of(n, out[n]) for n in fold.consumers) if m is not None]
        if not members:
            continue
        s = search_scale(members)
        if s is None:
            continue
        fold_scale(fold, out, s)
        for name in fold.consumers:
            new_stats[name] = scale_stats(stats_of(name), s)
        log.debug("awq: %s and %d weights scaled (s in [%.3g, %.3g])", fold.producer, len(fold.consumers), s.min(), s.max())
    return out, new_stats


def awq_group(
    adapter: Adapter,
    layer: int | None,
    tensors: dict[str, torch.Tensor],
    codec_of: Callable[[str], Codec | None],
    stats_of: Callable[[str], CalibrationStats | None],
    where: str,
) -> tuple[dict[str, torch.Tensor], dict[str, CalibrationStats | None]]:
    """AWQ on the tensors of decoder ``layer`` (or of a part of it; None: outside the decoder layers, nothing
    to fold) by name, routed experts per expert: the fold sets found (:func:`group_folds`), their scales
    searched and folded (:func:`apply_awq`). codec_of(name): the codec of a weight the recipe quantizes, None
    for one it keeps; ``where`` names the tensors in the log. Returns the new tensors and the statistics of
    every scaled weight's new inputs."""
    folds, reasons = group_folds(adapter, layer, list(tensors)) if layer is not None else ([], [])
    for reason in reasons:
        log.info("awq: %s: left unscaled: %s", where, reason)

    def member(name: str, weight: torch.Tensor) -> Member | None:
        codec = codec_of(name)
        return None if codec is None else Member(name, weight, codec, stats_of(name))

    return apply_awq(tensors, folds, member, stats_of)

