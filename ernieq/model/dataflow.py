"""Which weights read which tensors inside a decoder layer: a shape-only run on the meta device.

A decoder layer runs once on the meta device (no values, no memory), its experts modules
replaced by stand-ins (their routing is data dependent), with a torch function mode that
follows every tensor through views and casts. It records:

- which modules read each norm's output: the weights whose input a scale folded into the
  norm would divide (AWQ); a norm whose output also feeds anything else (a residual add,
  an elementwise op outside those modules) has none;
- which linear layer's input is ``f(...) * (part of another linear layer's output)``, with
  that output used nowhere else: AWQ folds a scale of the first one's input into the rows
  of the second (``down_proj`` behind ``up_proj``, or behind the up half of Phi-3's fused
  ``gate_up_proj``);
- which linear layers read the very same tensor (q/k/v, gate/up): they share one set of
  calibration statistics.

The run uses the layer's own arguments (``decoder.layer_calls`` on the meta device).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

_VIEWS = {torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.Tensor.contiguous, torch.Tensor.to,
          torch.Tensor.float, torch.Tensor.type_as, torch.Tensor.flatten, torch.flatten, torch.Tensor.view_as,
          torch.Tensor.reshape_as, torch.Tensor.unsqueeze, torch.unsqueeze}
_SPLITS = {torch.Tensor.chunk, torch.chunk, torch.Tensor.split, torch.split}
_MULS = {torch.Tensor.__mul__, torch.Tensor.__rmul__, torch.Tensor.mul, torch.mul}
_QUIET = {torch.Tensor.shape.__get__, torch.Tensor.size, torch.Tensor.dim, torch.Tensor.dtype.__get__,
          torch.Tensor.device.__get__, torch.Tensor.is_floating_point, torch.Tensor.numel, torch.Tensor.__len__}


@dataclass(frozen=True)
class UpFold:
    """``consumer``'s input is ``f(...) * producer(x)[..., lo:hi]``, that slice used nowhere else."""

    producer: str
    lo: int
    hi: int
    consumer: str


@dataclass
class LayerFlow:
    """What one decoder layer's run showed (module paths relative to the model)."""

    feeds: dict[str, list[str]] = field(default_factory=dict)  # norm -> the modules reading its output
    escaped: set[str] = field(default_factory=set)  # norms whose output also feeds something else
    up_folds: list[UpFold] = field(default_factory=list)
    shared: list[list[str]] = field(default_factory=list)  # linear layers reading one tensor


class _Stub(nn.Module):
    """Stands in for an experts module: reads its input, returns zeros of the same shape."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states.new_zeros(hidden_states.shape)


class _Flow(TorchFunctionMode):
    def __init__(self, leaves: set[str]):
        super().__init__()
        self.leaves = leaves  # modules that consume their input whole (linear layers, routers, experts)
        self.stack: list[str] = []
        self.tag: dict[int, tuple] = {}  # id(tensor) -> ("norm", path) | ("out", path, lo, hi) | ("prod", ...)
        self.root: dict[int, int] = {}  # id(view) -> id(the tensor it views)
        self.keep: list[torch.Tensor] = []  # every tagged tensor stays alive, so its id stays its own
        self.escaped: set[tuple] = set()
        self.readers: dict[tuple, list[str]] = defaultdict(list)
        self.input_root: dict[str, int] = {}

    def inside_leaf(self) -> bool:
        return bool(self.stack) and self.stack[-1] in self.leaves

    def mark(self, t: torch.Tensor, tag: tuple) -> None:
        self.tag[id(t)] = tag
        self.keep.append(t)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _QUIET or self.inside_leaf():
            return out
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if func in _VIEWS and first is not None and isinstance(out, torch.Tensor):
            self.root[id(out)] = self.root.get(id(first), id(first))
            self.keep += [first, out]  # both alive: no later tensor takes either id
            if id(first) in self.tag:
                self.mark(out, self.tag[id(first)])
            return out
        tagged = [self.tag[id(a)] for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and id(a) in self.tag]
        if not tagged:
            return out
        if func in _SPLITS and first is not None and len(tagged) == 1 and tagged[0][0] == "out" \
                and kwargs.get("dim", args[2] if len(args) > 2 else 0) in (-1, first.dim() - 1):
            _, path, lo, _ = tagged[0]
            for piece in out:
                self.mark(piece, ("out", path, lo, lo + piece.shape[-1]))
                lo += piece.shape[-1]
            return out
        if func in _MULS and len(tagged) == 1 and tagged[0][0] == "out" and isinstance(out, torch.Tensor):
            self.mark(out, ("prod", *tagged[0][1:]))
            return out
        self.escaped.update(tagged)
        return out

    # -- module hooks ---------------------------------------------------------------------

    def enter(self, path: str, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.get("hidden_states")
        if not self.inside_leaf() and isinstance(x, torch.Tensor):
            self.keep.append(x)  # alive until the run ends: no later tensor takes its id
            self.input_root[path] = self.root.get(id(x), id(x))
            if id(x) in self.tag and path in self.leaves:
                self.readers[self.tag[id(x)]].append(path)
        self.stack.append(path)

    def leave(self, path: str, out, norms: set[str], linears: set[str]) -> None:
        self.stack.pop()
        if self.inside_leaf() or not isinstance(out, torch.Tensor):
            return
        if path in norms:
            self.mark(out, ("norm", path))
        elif path in linears:
            self.mark(out, ("out", path, 0, out.shape[-1]))


def trace_layer(layer: nn.Module, prefix: str, call: tuple[tuple, dict], containers: set[str],
                routers: set[str], norms: set[str]) -> LayerFlow:
    """Run decoder ``layer`` (meta device; its path ``prefix``) once with ``call``'s arguments and
    return what it showed. containers, routers, norms: model paths of those modules in the layer."""
    rel = lambda p: p[len(prefix) + 1:]  # noqa: E731
    originals = {}
    for path in containers:
        parent, _, leaf = rel(path).rpartition(".")
        owner = layer.get_submodule(parent) if parent else layer
        originals[path] = (owner, leaf, getattr(owner, leaf))
        setattr(owner, leaf, _Stub())
    linears = {f"{prefix}.{n}" for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    leaves = linears | set(routers) | set(containers)
    flow = _Flow(leaves)
    handles = []
    for name, module in layer.named_modules():
        if not name:
            continue
        path = f"{prefix}.{name}"
        handles.append(module.register_forward_pre_hook(
            lambda m, a, k, path=path: flow.enter(path, a, k), with_kwargs=True))
        handles.append(module.register_forward_hook(
            lambda m, a, o, path=path: flow.leave(path, o, norms, linears)))
    try:
        args, kwargs = call
        with torch.no_grad(), flow:
            layer(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
        for owner, leaf, module in originals.values():
            setattr(owner, leaf, module)
    return _result(flow, norms, linears)


def _result(flow: _Flow, norms: set[str], linears: set[str]) -> LayerFlow:
    out = LayerFlow()
    for tag, readers in flow.readers.items():
        if tag[0] == "norm":
            out.feeds[tag[1]] = list(dict.fromkeys(readers))
        elif tag[0] == "prod" and tag not in flow.escaped and len(readers) == 1 and readers[0] in linears:
            _, producer, lo, hi = tag
            if not any(e[0] == "out" and e[1] == producer and e[2] < hi and lo < e[3] for e in flow.escaped):
                out.up_folds.append(UpFold(producer, lo, hi, readers[0]))
    out.escaped = {t[1] for t in flow.escaped if t[0] == "norm"}
    groups: dict[int, list[str]] = defaultdict(list)
    for path, root in flow.input_root.items():
        if path in linears:
            groups[root].append(path)
    out.shared = [g for g in groups.values() if len(g) > 1]
    return out
