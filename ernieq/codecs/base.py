"""The codec protocol, the quantized-tensor container and the codec registry.

Shape legend for the whole project: T tokens, E experts, A active experts per
token, K input features, N output features, G group size.

A codec turns one weight ``W [N, K]`` (torch ``nn.Linear`` order: output
features by input features) into a :class:`QuantizedTensor` and back. What the
stored tensors mean is the codec's business; how they sit in a file is the
format writer's (``ernieq.formats``), and kernels read them as they are.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Protocol

import torch

from ernieq.errors import ErnieqError


class CodecError(ErnieqError, ValueError):
    """A weight the codec cannot take (shape, dtype, non-finite values)."""


@dataclass(frozen=True)
class CalibrationStats:
    """What calibration knows about the inputs of one linear layer.

    hessian: float32 [K, K], ``X^T X / tokens`` of the layer's inputs, or None.
    act_abs_mean: float32 [K], mean |x| per input channel, or None.
    tokens: how many input rows the statistics were collected from.
    """

    hessian: torch.Tensor | None = None
    act_abs_mean: torch.Tensor | None = None
    tokens: int = 0

    def to(self, device: torch.device | str) -> CalibrationStats:
        """The same statistics with their tensors on ``device``."""
        return dataclasses.replace(self, hessian=None if self.hessian is None else self.hessian.to(device),
                                   act_abs_mean=None if self.act_abs_mean is None else self.act_abs_mean.to(device))


@dataclass
class QuantizedTensor:
    """One encoded weight (or a stack of E of them, one per expert).

    codec: the registry name of the codec that made it.
    shape: the logical weight shape, ``(N, K)``, or ``(E, N, K)`` when stacked.
    tensors: the stored tensors by name; a stack carries a leading E dimension.
    params: the codec's config as a JSON-able dict (``dataclasses.asdict``).
    """

    codec: str
    shape: tuple[int, ...]
    tensors: dict[str, torch.Tensor]
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def num_weights(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Every stored byte: packed values and all scales."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.num_weights

    def to(self, device: torch.device | str) -> QuantizedTensor:
        return dataclasses.replace(self, tensors={k: v.to(device) for k, v in self.tensors.items()})

    def expert(self, e: int) -> QuantizedTensor:
        """The e-th weight of a stack: shape (N, K), tensors without the E dimension."""
        if len(self.shape) != 3:
            raise CodecError(f"expert() needs a stacked tensor, got shape {self.shape}")
        return dataclasses.replace(self, shape=self.shape[1:], tensors={k: v[e] for k, v in self.tensors.items()})


def stack_experts(qs: list[QuantizedTensor]) -> QuantizedTensor:
    """Stack E per-expert tensors of one codec and one shape into ``(E, N, K)``."""
    first = qs[0]
    for q in qs[1:]:
        if q.codec != first.codec or q.shape != first.shape or q.params != first.params:
            raise CodecError("experts of one group must share codec, shape and parameters")
    tensors = {k: torch.stack([q.tensors[k] for q in qs]) for k in first.tensors}
    return QuantizedTensor(first.codec, (len(qs), *first.shape), tensors, dict(first.params))


class Codec(Protocol):
    """What every registered codec provides. ``config`` is its frozen dataclass."""

    name: ClassVar[str]
    config: Any

    def encode(
        self, weight: torch.Tensor, stats: CalibrationStats | None = None, *, name: str = "weight"
    ) -> QuantizedTensor:
        """weight: [N, K], any float dtype; ``name`` appears in errors. Returns the encoded tensor."""
        ...

    def decode(self, q: QuantizedTensor) -> torch.Tensor:
        """q of shape (N, K). Returns float32 W_hat [N, K]. Stacks go through ``decode``."""
        ...

    def round_activations(self, x: torch.Tensor) -> torch.Tensor:
        """x: float32 [M, K], the inputs of a weight of this codec. Returns them as the checkpoint
        multiplies them: x itself for weight-only codecs, x rounded as the codec quantizes it otherwise."""
        ...


class CodecBase:
    """What every registered codec class shares: it is built from its frozen config, and its
    weights multiply the activations as they are (weight-only) unless it says otherwise."""

    name: ClassVar[str]
    # GPTQ's rounders, where the codec's file has them (each module sets them below its classes):
    # ``columns(codec, W [N, K], static_groups)`` for one weight (``ernieq.calibration.gptq``) and
    # ``expert_columns`` for stacked experts (``ernieq.calibration.gptq_experts``)
    columns: ClassVar[type | None] = None
    expert_columns: ClassVar[type | None] = None

    def __init__(self, config: Any):
        self.config = config

    def round_activations(self, x: torch.Tensor) -> torch.Tensor:
        """x: float32 [M, K]. Weight-only: returned as it is."""
        return x


_REGISTRY: dict[str, tuple[type, type]] = {}


def register_in(table: dict, key: str, what: str):
    """Decorator: the decorated object goes into ``table`` under ``key``; a second one is an error (``what``)."""

    def wrap(obj):
        if key in table:
            raise ValueError(f"{what} for {key!r} registered twice")
        table[key] = obj
        return obj

    return wrap


def register_codec(name: str, config_cls: type):
    """Class decorator: register a codec class under ``name`` with its config dataclass."""

    def wrap(cls):
        if not issubclass(cls, CodecBase):  # what the runtime and GPTQ ask of every codec lives there
            raise TypeError(f"codec {name!r}: {cls.__name__} must derive from ernieq.codecs.base.CodecBase")
        register_in(_REGISTRY, name, "codec")((cls, config_cls))
        cls.name = name
        return cls

    return wrap


def codec_names() -> list[str]:
    return sorted(_REGISTRY)


def get_codec(name: str, **params: Any) -> Codec:
    """The codec ``name`` with its config built from ``params`` (defaults elsewhere)."""
    if name not in _REGISTRY:
        raise CodecError(f"unknown codec {name!r}; known: {', '.join(codec_names())}")
    cls, config_cls = _REGISTRY[name]
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = set(params) - known
    if unknown:
        raise CodecError(f"codec {name!r} has no parameter(s) {sorted(unknown)}; known: {sorted(known)}")
    return cls(config_cls(**params))


def codec_for(q: QuantizedTensor) -> Codec:
    """The codec that decodes ``q``, configured as when it was encoded."""
    return get_codec(q.codec, **q.params)


def decode(q: QuantizedTensor) -> torch.Tensor:
    """W_hat of ``q`` in float32, shape ``q.shape``; stacks decode expert by expert."""
    codec = codec_for(q)
    if len(q.shape) == 3:
        return torch.stack([codec.decode(q.expert(e)) for e in range(q.shape[0])])
    return codec.decode(q)


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in floating ``t``: a finite sum says so at once (about 20x faster than
    ``isfinite(t).all()`` on a CPU); only a sum that overflows or is not finite looks at every value."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


Layout = dict[str, tuple[torch.dtype, tuple[int, ...]]]  # stored tensor name -> (dtype, shape)


def check_layout(codec: Codec, q: QuantizedTensor, expected: Callable[[int, int], Layout], *,
                 params: bool = True) -> None:
    """Fail loudly when ``q`` is not ``codec``'s tensor of its own shape (N, K): its codec name,
    its params (when ``params``) and every stored tensor's dtype and shape, ``expected(N, K)``."""
    mine = dataclasses.asdict(codec.config)
    if q.codec != codec.name or (params and q.params != mine) or len(q.shape) != 2:
        raise CodecError(f"{codec.name}{mine}: cannot decode codec {q.codec!r} params {q.params} shape {q.shape}")
    want = expected(*q.shape)
    got = {key: (t.dtype, tuple(t.shape)) for key, t in q.tensors.items()}
    if got != want:
        raise CodecError(f"{codec.name}: stored tensors {got} do not match the layout {want} for shape {q.shape}")


def check_shape(shape: tuple[int, ...], name: str = "weight") -> None:
    """Fail loudly on a shape no codec takes: not 2-D, or empty (every codec pads K and N as it needs)."""
    if len(shape) != 2 or math.prod(shape) == 0:
        raise CodecError(f"{name}: expected a non-empty 2-D weight [N, K], got shape {tuple(shape)}")


def check_weight(weight: torch.Tensor, name: str = "weight") -> torch.Tensor:
    """Fail loudly on a weight no codec should take: not 2-D, empty or non-finite.

    Returns the weight as float32.
    """
    check_shape(tuple(weight.shape), name)
    w = weight.float()
    if not all_finite(w):
        bad = (~torch.isfinite(w)).sum().item()
        raise CodecError(f"{name}: {bad} non-finite value(s) (NaN or Inf) in a weight of shape {tuple(w.shape)}")
    return w
