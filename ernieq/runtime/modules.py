"""Compressed modules that stand in for transformers' linear layers and expert blocks.

They keep the packed tensors of a :class:`QuantizedTensor` as buffers and compute
through ``ernieq.kernels`` (the Triton kernels on CUDA, the reference path elsewhere).
On the reference path a module whose codecs are weight-only decodes its weights once,
when the decode cache (``decode_cache.py``) has room, and then computes as an
unquantized layer would, in the input's dtype, with its rotations folded into the
decoded weights. W8A8 weights (fp8 with dynamic activations) quantize their inputs on
every call and always compute through the kernels.

Shape legend: T tokens, E experts, A active experts per token, K input features,
N output features, H hidden size, I expert intermediate size, M rows of x.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ernieq import kernels
from ernieq.codecs import QuantizedTensor, codec_for
from ernieq.runtime.decode_cache import decode_cache
from ernieq.transforms import Rotation


class _Packed(nn.Module):
    """Holds one QuantizedTensor's stored tensors as buffers, so ``.to()`` moves them."""

    def __init__(self, q: QuantizedTensor):
        super().__init__()
        self.codec, self.shape, self.params = q.codec, tuple(q.shape), dict(q.params)
        self._names = tuple(q.tensors)
        for name, t in q.tensors.items():
            self.register_buffer(name, t, persistent=False)

    def quantized(self) -> QuantizedTensor:
        return QuantizedTensor(self.codec, self.shape, {n: getattr(self, n) for n in self._names}, self.params)

    def extra_repr(self) -> str:
        return f"codec={self.codec}, shape={self.shape}, params={self.params}"


class _Turn(nn.Module):
    """An input rotation's tensors as buffers (see ``ernieq.transforms``)."""

    def __init__(self, rotation: Rotation):
        super().__init__()
        self.register_buffer("signs", rotation.signs, persistent=False)
        self.register_buffer("q", rotation.q, persistent=False)

    def rotation(self) -> Rotation:
        return Rotation(self.signs, self.q)


def _turn(rotation: Rotation | None) -> _Turn | None:
    return _Turn(rotation) if rotation is not None else None


def _rotation(turn: _Turn | None) -> Rotation | None:
    return turn.rotation() if turn is not None else None


def _decode_into(out: torch.Tensor, q: QuantizedTensor, rotation: Rotation | None) -> None:
    """out [(E,) N, K] (any float dtype) = W_hat of q, one expert at a time. A weight stored turned by R
    decodes to (W R)_hat R^T, so that x ((W R)_hat R^T)^T = (x R) (W R)_hat^T: no rotation at run time."""
    codec = codec_for(q)
    for e, dst in enumerate(out if len(q.shape) == 3 else [out]):
        w_hat = codec.decode(q.expert(e) if len(q.shape) == 3 else q)  # [N, K] float32
        dst.copy_(rotation.apply_t(w_hat, dense=True) if rotation is not None else w_hat)  # (W R)_hat R^T


def _weight_only(q: QuantizedTensor) -> bool:
    """Whether q's codec multiplies its inputs as they are (``round_activations`` returns x itself),
    so that its decoded weight is all a matmul needs."""
    probe = torch.zeros(1, q.shape[-1])
    return codec_for(q).round_activations(probe) is probe


class _DecodeOnce(nn.Module):
    """What a quantized module shares: its decoded weights, while the decode cache holds them.

    ``decoded_weights(x)``: the decoded tensors on x's device in x's dtype when the reference path runs,
    the module's codecs are weight-only, and the cache has (or makes) room for them; else None (then the
    module calls the kernels).
    """

    def __init__(self, *weights: QuantizedTensor):
        super().__init__()
        self.weight_only = all(_weight_only(q) for q in weights)
        self._decoded: tuple[torch.Tensor, ...] | None = None

    def decoded_shapes(self) -> tuple[tuple[int, ...], ...]:
        raise NotImplementedError

    def decode(self, out: tuple[torch.Tensor, ...]) -> None:
        raise NotImplementedError

    def decoded_weights(self, x: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        if not self.weight_only or kernels.resolve_backend(x.device) != "reference":
            return None
        held = self._decoded
        if held is not None and held[0].device == x.device and held[0].dtype == x.dtype:
            return held
        self._decoded = None  # another device or dtype: its bytes come back when the tensors go
        cache = decode_cache()
        shapes = self.decoded_shapes()
        if not cache.fits(x.device, sum(x.element_size() * torch.Size(s).numel() for s in shapes)):
            return None
        out = tuple(torch.empty(s, dtype=x.dtype, device=x.device) for s in shapes)
        cache.hold(x.device, list(out))  # counted until freed
        with torch.no_grad():
            self.decode(out)
        self._decoded = out
        return out

    def drop_decoded(self) -> None:
        """Free the decoded weights (their bytes go back to the cache); the next call decodes again."""
        self._decoded = None

    @property
    def cached_bytes(self) -> int:
        """Bytes of decoded weights this module holds (0 when it computes from the packed tensors)."""
        return sum(t.numel() * t.element_size() for t in self._decoded) if self._decoded is not None else 0


class QuantLinear(_DecodeOnce):
    """y = x @ W_hat.T (+ bias) with W_hat [N, K] kept packed; with a rotation R, W_hat is
    stored turned (W R) and y = (x R) @ (W R)^T."""

    def __init__(self, q: QuantizedTensor, bias: torch.Tensor | None = None, rotation: Rotation | None = None):
        super().__init__(q)
        self.out_features, self.in_features = q.shape
        self.packed = _Packed(q)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.turn = _turn(rotation)

    def decoded_shapes(self) -> tuple[tuple[int, ...], ...]:
        return ((self.out_features, self.in_features),)

    def decode(self, out: tuple[torch.Tensor, ...]) -> None:
        _decode_into(out[0], self.packed.quantized(), _rotation(self.turn))  # (W R)_hat R^T  [N, K]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)  # [M, K]
        decoded = self.decoded_weights(x)
        if decoded is not None:
            bias = self.bias.to(x.dtype) if self.bias is not None else None
            y = F.linear(x, decoded[0], bias)  # x W_hat^T + b  [M, N]
        else:
            if self.turn is not None:
                x = self.turn.rotation().apply(x)  # x R
            y = kernels.linear(x, self.packed.quantized(), self.bias)  # [M, N]
        return y.reshape(*lead, self.out_features)


class QuantMoEExperts(_DecodeOnce):
    """The routed experts of one layer, packed: gate and up (E, I, H), down (E, H, I).

    Same call as transformers' fused expert modules:
    ``forward(hidden_states [T, H], top_k_index [T, A], top_k_weights [T, A]) -> [T, H]``.
    rotation: R_H that gate and up were stored turned by (hidden states turned once for all
    experts); down_rotation: R_I for down (applied inside the MoE op, between the two GEMMs).
    """

    def __init__(self, gate: QuantizedTensor, up: QuantizedTensor, down: QuantizedTensor,
                 rotation: Rotation | None = None, down_rotation: Rotation | None = None):
        super().__init__(gate, up, down)
        self.num_experts = gate.shape[0]
        self.gate, self.up, self.down = _Packed(gate), _Packed(up), _Packed(down)
        self.turn, self.down_turn = _turn(rotation), _turn(down_rotation)

    def decoded_shapes(self) -> tuple[tuple[int, ...], ...]:
        e, i, h = self.gate.shape
        return (e, 2 * i, h), (e, h, i)

    def decode(self, out: tuple[torch.Tensor, ...]) -> None:
        gate_up, down = out  # [E, 2I, H] = [gate | up], [E, H, I]
        i = self.gate.shape[1]
        _decode_into(gate_up[:, :i], self.gate.quantized(), _rotation(self.turn))  # gate_e R_H R_H^T
        _decode_into(gate_up[:, i:], self.up.quantized(), _rotation(self.turn))
        _decode_into(down, self.down.quantized(), _rotation(self.down_turn))  # (down_e R_I)_hat R_I^T

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        decoded = self.decoded_weights(hidden_states)
        if decoded is not None:
            return decoded_moe(hidden_states, top_k_index, top_k_weights, *decoded)
        if self.turn is not None:
            hidden_states = self.turn.rotation().apply(hidden_states)  # x R_H
        weights = kernels.MoEWeights(self.gate.quantized(), self.up.quantized(), self.down.quantized(),
                                     self.down_turn.rotation() if self.down_turn is not None else None)
        return kernels.moe(hidden_states, top_k_index, top_k_weights, weights)  # [T, H], [T, A], [T, A] -> [T, H]


def decoded_moe(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, gate_up: torch.Tensor,
                down: torch.Tensor) -> torch.Tensor:
    """out[t] = sum_a w[t, a] * down_e(silu(gate_e x_t) * up_e x_t), e = topk_ids[t, a], from decoded weights.

    x: [T, H]; topk_ids: int [T, A]; topk_weights: [T, A]; gate_up: [E, 2I, H] = [gate | up];
    down: [E, H, I]; all in x's dtype. The (token, slot) pairs are sorted by expert once, each
    expert that received tokens computes its rows with two GEMMs, and the A rows of each token are
    summed in a fixed order (no atomic accumulation). Returns [T, H] in x.dtype.
    """
    t, a = topk_ids.shape
    inter = down.shape[2]
    flat = topk_ids.reshape(-1)  # [T A]
    order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert  [T A]
    counts = torch.bincount(flat, minlength=gate_up.shape[0]).tolist()  # [E]
    xs = x[order // a]  # [T A, H]
    ys = torch.empty_like(xs)  # [T A, H]
    start = 0
    for e, n in enumerate(counts):
        if n:
            rows = slice(start, start + n)
            gu = xs[rows] @ gate_up[e].T  # [T_e, 2I]
            torch.mm(F.silu(gu[:, :inter]) * gu[:, inter:], down[e].T, out=ys[rows])  # down_e(silu(gate x) * up x)
            start += n
    ys *= topk_weights.reshape(-1)[order].to(x.dtype)[:, None]  # w[t, a] * y
    out = torch.empty_like(ys)
    out[order] = ys  # back in (token, slot) order  [T A, H]
    return out.view(t, a, -1).sum(1)  # sum over a  [T, H]
