"""Cut quantized weights along N or K and join the pieces, without decoding them.

Shape legend: N output features, K input features. Export formats fuse modules
along N (FastDeploy's ``qkv_proj`` is q | k | v) and tensor parallelism splits
weights along N (column-parallel) or K (row-parallel). Both are exact on the
stored tensors of ernieq's codecs: cutting ``q`` (a weight ``W [N, K]``) gives the
quantized tensor of the sub-weight, bit for bit::

    decode(slice_n(q, a, b)) == decode(q)[a:b]        decode(slice_k(q, a, b)) == decode(q)[:, a:b]

and joining the pieces gives ``q`` back. Pieces are contiguous copies (kernels read
them as packed). How each codec's stored tensors follow N
and K is one table per codec (``AXES``); the cutting itself is one code path.
A tensor that does not vary along K (a per-channel scale) is copied into every
K piece, and joining K pieces checks that they agree.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate, pairwise

import torch

from ernieq.codecs import QuantizedTensor
from ernieq.errors import ErnieqError


@dataclass(frozen=True)
class Axes:
    """How one stored tensor follows the weight: ``n`` the dimension along N; ``k`` the dimension
    along K (None: the same for all of K), each element of which covers ``k_unit`` weights of K."""

    n: int
    k: int | None = None
    k_unit: int = 1


# codec -> (q -> {stored tensor name: Axes}); each codec's module documents its stored tensors.
AXES: dict[str, Callable[[QuantizedTensor], dict[str, Axes]]] = {}


def _axes(codec: str):
    def wrap(fn):
        AXES[codec] = fn
        return fn

    return wrap


@_axes("wint8")
def _wint8(q: QuantizedTensor) -> dict[str, Axes]:
    return {"qweight": Axes(0, 1), "scale": Axes(0)}  # qweight int8 [N, K], scale [N]


@_axes("wint4")
def _wint4(q: QuantizedTensor) -> dict[str, Axes]:
    # qweight uint8 [N, ceil(K/2)] (two codes per byte along K); scale / zero [N, n_groups]
    g = q.params.get("group_size")
    group = Axes(0, 1, g) if g else Axes(0)  # one group per channel: the same for every piece of K
    return {"qweight": Axes(0, 1, 2), "scale": group, "zero": group}


@_axes("ccq2")
def _ccq2(q: QuantizedTensor) -> dict[str, Axes]:
    # quant_weight uint8 [K/4, N], weight_scale uint8 [K/128, N], super_scales / code_scale / code_zp [N]
    return {"quant_weight": Axes(1, 0, 4), "weight_scale": Axes(1, 0, 128), "super_scales": Axes(0),
            "code_scale": Axes(0), "code_zp": Axes(0)}


def _table(q: QuantizedTensor, what: str) -> dict[str, Axes]:
    if q.codec not in AXES:
        raise ErnieqError(f"{what}: cannot cut {q.codec} weights along N or K (known: {', '.join(sorted(AXES))})")
    if len(q.shape) != 2:
        raise ErnieqError(f"{what}: expected one weight [N, K], got shape {q.shape}")
    table = AXES[q.codec](q)
    unknown = sorted(set(q.tensors) - set(table))
    if unknown:
        raise ErnieqError(f"{what}: {q.codec} has no stored tensor named {unknown[0]!r}")
    return {name: table[name] for name in q.tensors}


def _replace(q: QuantizedTensor, n: int, k: int, tensors: dict[str, torch.Tensor]) -> QuantizedTensor:
    return dataclasses.replace(q, shape=(n, k), tensors=tensors, params=dict(q.params))


def k_multiple(q: QuantizedTensor) -> int:
    """K pieces of ``q`` must start (and, but for the last, end) at multiples of this."""
    return math.lcm(*(a.k_unit for a in _table(q, q.codec).values() if a.k is not None))


def slice_n(q: QuantizedTensor, start: int, stop: int, what: str = "weight") -> QuantizedTensor:
    """Output channels start..stop of ``q`` (shape (N, K)) as a quantized tensor of shape (stop - start, K)."""
    n, k = q.shape
    if not 0 <= start < stop <= n:
        raise ErnieqError(f"{what}: output channels {start}..{stop} outside N={n}")
    tensors = {name: t.narrow(a.n, start, stop - start).contiguous() for name, (t, a) in _zip(q, what).items()}
    return _replace(q, stop - start, k, tensors)


def slice_k(q: QuantizedTensor, start: int, stop: int, what: str = "weight") -> QuantizedTensor:
    """Input features start..stop of ``q`` (shape (N, K)) as a quantized tensor of shape (N, stop - start).

    start must be a multiple of :func:`k_multiple`, and stop too unless it is K."""
    n, k = q.shape
    step = k_multiple(q)
    if not (0 <= start < stop <= k and start % step == 0 and (stop % step == 0 or stop == k)):
        raise ErnieqError(f"{what}: {q.codec} of K={k} cannot be cut at input features {start}..{stop} "
                          f"(pieces start and end at multiples of {step})")
    tensors = {}
    for name, (t, a) in _zip(q, what).items():
        if a.k is None:
            tensors[name] = t
        else:
            first, last = start // a.k_unit, -(-stop // a.k_unit)  # elements covering [start, stop)
            tensors[name] = t.narrow(a.k, first, last - first).contiguous()
    return _replace(q, n, stop - start, tensors)


def split_n(q: QuantizedTensor, sizes: list[int], what: str = "weight") -> list[QuantizedTensor]:
    """``q`` cut along N into pieces of ``sizes`` output channels (summing to N)."""
    if sum(sizes) != q.shape[0] or min(sizes) <= 0:
        raise ErnieqError(f"{what}: N={q.shape[0]} does not split into {sizes}")
    bounds = [0, *accumulate(sizes)]
    return [slice_n(q, a, b, what) for a, b in pairwise(bounds)]


def split_k(q: QuantizedTensor, parts: int, what: str = "weight") -> list[QuantizedTensor]:
    """``q`` cut along K into ``parts`` equal pieces."""
    k = q.shape[1]
    if k % parts:
        raise ErnieqError(f"{what}: K={k} does not split into {parts} equal parts")
    size = k // parts
    return [slice_k(q, i * size, (i + 1) * size, what) for i in range(parts)]


def cat_n(qs: list[QuantizedTensor], what: str = "weight") -> QuantizedTensor:
    """Pieces of one codec and one K joined along N (the inverse of :func:`split_n`)."""
    first = _same_kind(qs, what)
    ks = {q.shape[1] for q in qs}
    if len(ks) != 1:
        raise ErnieqError(f"{what}: pieces joined along N have different K {sorted(ks)}")
    table = _table(first, what)
    tensors = {name: torch.cat([q.tensors[name] for q in qs], dim=a.n) for name, a in table.items()}
    return _replace(first, sum(q.shape[0] for q in qs), first.shape[1], tensors)


def cat_k(qs: list[QuantizedTensor], what: str = "weight") -> QuantizedTensor:
    """Pieces of one codec and one N joined along K (the inverse of :func:`split_k`); tensors that do
    not follow K must be the same in every piece."""
    first = _same_kind(qs, what)
    ns = {q.shape[0] for q in qs}
    if len(ns) != 1:
        raise ErnieqError(f"{what}: pieces joined along K have different N {sorted(ns)}")
    step = k_multiple(first)
    if any(q.shape[1] % step for q in qs[:-1]):
        raise ErnieqError(f"{what}: {first.codec} pieces of K {[q.shape[1] for q in qs]} cannot be joined "
                          f"(every piece but the last needs K % {step} == 0)")
    tensors = {}
    for name, a in _table(first, what).items():
        if a.k is None:
            for i, q in enumerate(qs[1:], 1):
                if not torch.equal(q.tensors[name], first.tensors[name]):
                    raise ErnieqError(f"{what}: {name} differs between pieces 0 and {i}; a per-channel tensor "
                                      f"must be the same in every piece along K")
            tensors[name] = first.tensors[name]
        else:
            tensors[name] = torch.cat([q.tensors[name] for q in qs], dim=a.k)
    return _replace(first, first.shape[0], sum(q.shape[1] for q in qs), tensors)


def _same_kind(qs: list[QuantizedTensor], what: str) -> QuantizedTensor:
    if not qs:
        raise ErnieqError(f"{what}: nothing to join")
    first = qs[0]
    for q in qs[1:]:
        if q.codec != first.codec or q.params != first.params or set(q.tensors) != set(first.tensors):
            raise ErnieqError(f"{what}: pieces of different codecs or parameters cannot be joined "
                              f"({first.codec} {first.params} and {q.codec} {q.params})")
    return first


def _zip(q: QuantizedTensor, what: str) -> dict[str, tuple[torch.Tensor, Axes]]:
    table = _table(q, what)
    return {name: (q.tensors[name], table[name]) for name in q.tensors}

