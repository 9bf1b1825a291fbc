"""How a fused experts module holds its routed experts, found by running it.

Shape legend: E experts, H hidden size, I expert intermediate size, T tokens.

transformers 5 keeps a layer's routed experts as 3-D parameters, each class in its own
orientation: ``gate_up_proj [E, 2I, H]`` (``x W^T``, Mixtral, Qwen3-MoE, DeepSeek-V3 ...)
or ``[E, H, 2I]`` (``x W``, GPT-OSS, Aria); gate and up concatenated (``[gate | up]``) or
interleaved (GPT-OSS: gate in the even columns); with biases or without; the hidden state
``act(gate) * up`` or a gate function of the class's own (GPT-OSS: a clamped swish-GLU
with ``(up + 1)``). The shapes alone are ambiguous (H = 2I is common in small models), so
:func:`probe_layout` runs the class's own eager forward on one expert (every expert
sharing the same random weights, a stride-0 view: one expert's memory), tries every
orientation of the two parameters and keeps the one that reproduces it; then it finds,
from the class's gate function alone, which of the 2I columns are the gate and which the
up projection, whether the gate function is ``silu(gate) * up`` (what ernieq's fused MoE
kernel computes) and whether it is linear in ``up`` (what AWQ needs to fold a scale of
``down``'s input into ``up``).
"""

from __future__ import annotations

import copy
import inspect
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ernieq.model.checkpoint import CheckpointError

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_PROBE_TOKENS = 5
_TOL = 1e-9  # float64 probes: only the orientation that is the class's own matches this closely


@dataclass(frozen=True)
class ExpertLayout:
    """One experts module's parameters, per expert in torch ``nn.Linear`` order [N, K].

    gate_up: the fused gate/up parameter, ``[E, 2I, H]`` or, with ``gate_up_k_major``, ``[E, H, 2I]``;
    down: ``[E, H, I]`` or, with ``down_k_major``, ``[E, I, H]``. Along the 2I axis the gate columns
    are every other column or one half, gate first or not (see :meth:`split`). Biases ``[E, 2I]`` and
    ``[E, H]`` when the class has them. silu_gate: the hidden state is ``silu(gate) * up``;
    up_linear: it is linear in ``up``.
    """

    num_experts: int
    hidden: int
    inter: int
    gate_up: str
    down: str
    gate_up_k_major: bool
    down_k_major: bool
    interleaved: bool
    gate_first: bool
    gate_up_bias: str | None = None
    down_bias: str | None = None
    silu_gate: bool = False
    up_linear: bool = False

    @property
    def params(self) -> tuple[str, ...]:
        return tuple(p for p in (self.gate_up, self.gate_up_bias, self.down, self.down_bias) if p)

    @property
    def has_bias(self) -> bool:
        return self.gate_up_bias is not None or self.down_bias is not None

    @property
    def kernel_ok(self) -> bool:
        """ernieq's fused MoE kernel computes exactly this module: silu(gate) * up, no biases."""
        return self.silu_gate and not self.has_bias

    def describe(self) -> str:
        gu = "[E, H, 2I]" if self.gate_up_k_major else "[E, 2I, H]"
        dn = "[E, I, H]" if self.down_k_major else "[E, H, I]"
        split = "interleaved" if self.interleaved else "concatenated"
        order = "gate first" if self.gate_first else "up first"
        return (f"{self.gate_up} {gu} ({split}, {order}), {self.down} {dn}"
                f"{', with biases' if self.has_bias else ''}, {'silu(gate) * up' if self.silu_gate else 'own gate function'}")

    def split(self) -> tuple[slice, slice]:
        """(gate columns, up columns) along the 2I axis: halves, or every other column (views, no copy)."""
        first, second = (slice(0, None, 2), slice(1, None, 2)) if self.interleaved else (
            slice(0, self.inter), slice(self.inter, 2 * self.inter))
        return (first, second) if self.gate_first else (second, first)

    def assemble(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """gate, up [T, I] -> the module's own [T, 2I] (what its gate function takes)."""
        g_idx, u_idx = self.split()
        out = gate.new_empty(*gate.shape[:-1], 2 * self.inter)
        out[..., g_idx] = gate
        out[..., u_idx] = up
        return out

    def gate_up_nk(self, p: torch.Tensor) -> torch.Tensor:
        """The gate_up parameter as [E, 2I, H] (a view)."""
        return p.transpose(1, 2) if self.gate_up_k_major else p

    def down_nk(self, p: torch.Tensor) -> torch.Tensor:
        """The down parameter as [E, H, I] (a view)."""
        return p.transpose(1, 2) if self.down_k_major else p

    def weights(self, params: dict[str, torch.Tensor]) -> Iterator[tuple[int, str, torch.Tensor]]:
        """(expert, projection, W [N, K]) for every expert: gate and up [I, H], down [H, I]."""
        gate_up, down = self.gate_up_nk(params[self.gate_up]), self.down_nk(params[self.down])
        g_idx, u_idx = self.split()
        for e in range(gate_up.shape[0]):
            yield e, "gate_proj", gate_up[e, g_idx]  # [I, H]
            yield e, "up_proj", gate_up[e, u_idx]  # [I, H]
            yield e, "down_proj", down[e]  # [H, I]

    def biases(self, params: dict[str, torch.Tensor]) -> dict[tuple[int, str], torch.Tensor]:
        """{(expert, projection): b [N]} of the biased projections."""
        out = {}
        g_idx, u_idx = self.split()
        if self.gate_up_bias is not None:
            b = params[self.gate_up_bias]  # [E, 2I]
            for e in range(b.shape[0]):
                out[(e, "gate_proj")], out[(e, "up_proj")] = b[e, g_idx], b[e, u_idx]
        if self.down_bias is not None:
            b = params[self.down_bias]  # [E, H]
            for e in range(b.shape[0]):
                out[(e, "down_proj")] = b[e]
        return out

    def fuse(self, weights: dict[tuple[int, str], torch.Tensor], num_experts: int) -> dict[str, torch.Tensor]:
        """The module's gate_up and down parameters from per-expert weights [N, K] ({(e, proj): W}), in the
        first weight's dtype and on its device."""
        if num_experts != self.num_experts:
            raise ValueError(f"{self.describe()}: {num_experts} experts given, the module holds {self.num_experts}")
        first = weights[(0, "gate_proj")]
        return self.fill(lambda e, proj: weights[(e, proj)], first.dtype, first.device)

    def fill(self, weight: Callable[[int, str], torch.Tensor], dtype: torch.dtype, device: torch.device,
             after_expert: Callable[[], None] | None = None, where: str = "") -> dict[str, torch.Tensor]:
        """The module's gate_up and down parameters (in its own orientation), allocated once in ``dtype`` on
        ``device``, every expert's weights W [N, K] = ``weight(e, proj)`` copied straight into place (no
        stacked copy of the block beside them); ``after_expert()`` runs after each expert (a reader's
        ``release``: the pages read are unmapped as the copy goes). ``where`` names the module in errors."""
        gate_up = torch.empty(self.num_experts, *self._gate_up_shape(), dtype=dtype, device=device)  # as stored
        down = torch.empty(self.num_experts, *self._down_shape(), dtype=dtype, device=device)  # as stored
        gate_up_nk, down_nk = self.gate_up_nk(gate_up), self.down_nk(down)  # [E, 2I, H], [E, H, I] views
        g_idx, u_idx = self.split()
        for e in range(self.num_experts):
            for proj, dst in (("gate_proj", gate_up_nk[e, g_idx]), ("up_proj", gate_up_nk[e, u_idx]),
                              ("down_proj", down_nk[e])):
                src = weight(e, proj)
                if tuple(src.shape) != tuple(dst.shape):
                    raise CheckpointError(f"{where or self.describe()}: expert {e} {proj} has shape "
                                          f"{tuple(src.shape)}, the module holds {tuple(dst.shape)}")
                dst.copy_(src)  # converts to dtype and device
            if after_expert is not None:
                after_expert()
        return {self.gate_up: gate_up, self.down: down}

    def _gate_up_shape(self) -> tuple[int, int]:
        return (self.hidden, 2 * self.inter) if self.gate_up_k_major else (2 * self.inter, self.hidden)

    def _down_shape(self) -> tuple[int, int]:
        return (self.inter, self.hidden) if self.down_k_major else (self.hidden, self.inter)

def gate_function(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The experts module's map from its [T, 2I] gate_up output to the hidden state [T, I]: its
    ``_apply_gate`` (transformers' experts interface) or ``act_fn(first half) * second half``."""
    if hasattr(module, "_apply_gate"):
        return module._apply_gate
    act = getattr(module, "act_fn", None)
    if act is None:
        raise CheckpointError(f"{type(module).__name__}: an experts module without _apply_gate or act_fn")
    return lambda z: act(z[..., : z.shape[-1] // 2]) * z[..., z.shape[-1] // 2 :]


def _eager_forward(module: nn.Module):
    """The class's own forward, not transformers' dispatch to a batched implementation."""
    return inspect.unwrap(type(module).forward)


def _probe_module(module: nn.Module, values: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of the (meta) module holding ``values``: every expert the same float64 weights."""
    probe = copy.deepcopy(module)
    for name, t in values.items():
        probe._parameters[name] = nn.Parameter(t, requires_grad=False)
    return probe


def _candidates(params: dict[str, tuple[int, ...]], hidden: int) -> Iterator[dict]:
    """Every assignment of the two 3-D parameters (and 2-D biases) to gate_up / down and their
    orientations that the shapes allow."""
    three = [n for n, s in params.items() if len(s) == 3]
    two = [n for n, s in params.items() if len(s) == 2]
    for gu, dn in itertools.permutations(three, 2):
        a, b = params[gu][1:]
        for gu_k_major, two_i in ((False, a), (True, b)):
            if (b if not gu_k_major else a) != hidden or two_i % 2:
                continue
            inter = two_i // 2
            for dn_k_major in (False, True):
                if params[dn][1:] != ((inter, hidden) if dn_k_major else (hidden, inter)):
                    continue
                for biases in _bias_choices(two, params, two_i, hidden):
                    yield dict(gate_up=gu, down=dn, gate_up_k_major=gu_k_major, down_k_major=dn_k_major,
                               inter=inter, **biases)


def _bias_choices(two: list[str], params: dict, two_i: int, hidden: int) -> Iterator[dict]:
    if not two:
        yield {"gate_up_bias": None, "down_bias": None}
        return
    for gb, db in itertools.permutations(two, 2) if len(two) == 2 else ():
        if params[gb][1] == two_i and params[db][1] == hidden:
            yield {"gate_up_bias": gb, "down_bias": db}


def probe_layout(module: nn.Module, hidden: int, where: str) -> ExpertLayout:
    """The layout of experts module ``module`` (meta or not) whose hidden size is ``hidden``."""
    shapes = {n: tuple(p.shape) for n, p in module.named_parameters(recurse=False)}
    if not any(len(s) == 3 for s in shapes.values()) or len({s[0] for s in shapes.values()}) != 1:
        raise CheckpointError(f"{where}: experts module {type(module).__name__} holds {shapes}: not one [E, ...] "
                              f"parameter per projection")
    num = next(iter(shapes.values()))[0]
    gen = torch.Generator().manual_seed(0)
    one = {n: torch.randn(1, *s[1:], generator=gen, dtype=torch.float64) * s[-1] ** -0.5 for n, s in shapes.items()}
    x = torch.randn(_PROBE_TOKENS, hidden, generator=gen, dtype=torch.float64)
    index = torch.zeros(_PROBE_TOKENS, 1, dtype=torch.long)  # every token to expert 0 ...
    weight = torch.ones(_PROBE_TOKENS, 1, dtype=torch.float64)  # ... with weight 1
    probe = _probe_module(module, {n: t.expand(num, *t.shape[1:]) for n, t in one.items()})
    with torch.no_grad():
        want = _eager_forward(module)(probe, x, index, weight)  # [T, H]
    gate_fn = gate_function(probe)
    for cand in _candidates(shapes, hidden):
        w_gu = one[cand["gate_up"]][0]
        z = x @ w_gu if cand["gate_up_k_major"] else x @ w_gu.T  # [T, 2I]
        if cand["gate_up_bias"]:
            z = z + one[cand["gate_up_bias"]][0]
        with torch.no_grad():
            h = gate_fn(z)  # [T, I]
        w_d = one[cand["down"]][0]
        y = h @ w_d if cand["down_k_major"] else h @ w_d.T  # [T, H]
        if cand["down_bias"]:
            y = y + one[cand["down_bias"]][0]
        if y.shape == want.shape and torch.allclose(y, want, rtol=_TOL, atol=_TOL):
            return ExpertLayout(num, hidden, **cand, **_gate_roles(gate_fn, cand["inter"], where))
    raise CheckpointError(f"{where}: no orientation of {shapes} reproduces {type(module).__name__}'s forward; "
                          f"ernieq reads gated experts (gate_up [E, 2I, H] or [E, H, 2I], down [E, H, I] or [E, I, H])")


def _gate_roles(gate_fn, inter: int, where: str) -> dict:
    """Which of the 2I columns feed each hidden unit (concatenated halves or interleaved pairs), which of
    each pair is the gate (the one the hidden state is not affine in), and whether the function is
    silu(gate) * up / linear in up. A few forward runs of the gate function on [T, 2I], whatever I."""
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(7, 2 * inter, generator=gen, dtype=torch.float64) * 0.5
    for interleaved in (False, True):
        first, second = (slice(0, None, 2), slice(1, None, 2)) if interleaved else (slice(0, inter), slice(inter, None))
        if _pairs(gate_fn, z, first, second, inter, gen):
            break
    else:
        raise CheckpointError(f"{where}: its gate/up columns are neither concatenated nor interleaved")
    affine = [_affine_in(gate_fn, z, cols) for cols in (first, second)]
    if affine[0] == affine[1]:
        raise CheckpointError(f"{where}: cannot tell its gate from its up columns (the gate function is "
                              f"{'affine' if affine[0] else 'not affine'} in both)")
    gate_first = affine[1]
    g_idx, u_idx = (first, second) if gate_first else (second, first)
    h = gate_fn(z)
    silu = torch.allclose(h, torch.nn.functional.silu(z[:, g_idx]) * z[:, u_idx], rtol=_TOL, atol=_TOL)
    c = torch.rand(inter, generator=gen, dtype=torch.float64) + 0.5
    scaled = z.clone()
    scaled[:, u_idx] *= c
    linear = torch.allclose(gate_fn(scaled), h * c, rtol=_TOL, atol=_TOL)
    return {"interleaved": interleaved, "gate_first": gate_first, "silu_gate": silu, "up_linear": linear}


def _pairs(gate_fn, z: torch.Tensor, first: slice, second: slice, inter: int, gen) -> bool:
    """Whether hidden unit i reads exactly columns first[i] and second[i]: moving every other unit's
    columns leaves a few sampled units alone, and moving either of their own columns moves them."""
    units = torch.randperm(inter, generator=gen)[: min(8, inter)]
    own = torch.zeros(2 * inter, dtype=torch.bool)
    col = torch.arange(2 * inter)
    own[col[first][units]] = True
    own[col[second][units]] = True
    h = gate_fn(z)[:, units]
    others = z + 0.3 * (~own).to(z.dtype)
    if not torch.allclose(gate_fn(others)[:, units], h, rtol=_TOL, atol=_TOL):
        return False
    for cols in (first, second):
        moved = z.clone()
        moved[:, col[cols][units]] += 0.3
        if (gate_fn(moved)[:, units] - h).abs().amin(0).min() == 0:
            return False
    return True


def _affine_in(gate_fn, z: torch.Tensor, cols: slice) -> bool:
    """Whether every hidden unit is affine in its column among ``cols`` (second differences vanish)."""
    step = torch.zeros_like(z)
    step[:, cols] = 0.3
    h0, h1, h2 = (gate_fn(z + k * step) for k in range(3))
    return torch.allclose(h2 - 2 * h1 + h0, torch.zeros_like(h0), atol=1e-9)
