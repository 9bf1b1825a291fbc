"""What the runtime calls: ``linear`` and ``moe`` with a backend choice, and the ``torch.library`` ops.

Shape legend: M rows of x, K input features, N output features, T tokens,
H hidden size, I expert intermediate size, E experts, A active experts per token.

Backends: ``"reference"`` (plain torch, ``ernieq.kernels.reference``) and
``"triton"`` (the fused kernels, through the custom ops ``ernieq::linear`` and
``ernieq::moe`` so ``torch.compile`` traces them as opaque calls with fake
implementations). The choice, first match wins: the ``backend`` argument, the
environment variable ``ERNIEQ_KERNELS=reference|triton``, then triton when x is
on CUDA and the reference elsewhere.

Triton on the CPU runs under its interpreter, which triton decides when a
kernel is *defined*, i.e. when ``ernieq.kernels.dequant_gemm`` is first imported
(the kernels avoid triton's own jit'd helpers, so when triton itself was
imported does not matter; see ``ernieq.kernels.tiles``). So the Triton modules
are imported lazily, on the first triton call, and if that call is on the CPU and
``TRITON_INTERPRET`` is unset, it is set to 1 first (slow: for checking a model
end to end against the reference path). If the kernel modules were already
imported for the GPU, the call fails with a message saying so.

A ``QuantizedTensor`` is not a tensor, so the ops take each weight as its stored
tensors (a list) plus a JSON spec string: codec, params, logical shape and the
tensor names, in list order (:func:`to_op_args` / :func:`from_op_args`).
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import os
import sys
from types import ModuleType

import torch

from ernieq.codecs import QuantizedTensor
from ernieq.kernels import reference
from ernieq.kernels.args import KernelError, MoEWeights
from ernieq.transforms import Rotation

log = logging.getLogger(__name__)

BACKENDS = ("reference", "triton")
BACKEND_ENV = "ERNIEQ_KERNELS"
_TRITON_MODULES = ("ernieq.kernels.dequant_gemm", "ernieq.kernels.fused_moe")
_KERNEL_DEFINITIONS = (*_TRITON_MODULES, "ernieq.kernels.act_quant")  # every module that defines a Triton kernel


def resolve_backend(device: torch.device, backend: str | None = None) -> str:
    """The backend for a call on ``device``: the argument, else $ERNIEQ_KERNELS, else triton on CUDA only."""
    choice = backend or os.environ.get(BACKEND_ENV) or ("triton" if device.type == "cuda" else "reference")
    if choice not in BACKENDS:
        source = "backend argument" if backend else f"${BACKEND_ENV}"
        raise KernelError(f"{source}: unknown kernel backend {choice!r}; choose one of {BACKENDS}")
    return choice


_loaded: tuple[ModuleType, ModuleType] | None = None  # (dequant_gemm, fused_moe) once imported


def triton_modules(device: torch.device) -> tuple[ModuleType, ModuleType]:
    """(dequant_gemm, fused_moe), imported for ``device``: on the CPU under the Triton interpreter."""
    global _loaded
    if _loaded is None:
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            if any(name in sys.modules for name in _KERNEL_DEFINITIONS):
                raise KernelError(
                    f"Triton kernels on {device} need the Triton interpreter, but they were defined without it "
                    "in this process; set TRITON_INTERPRET=1 before ernieq's Triton kernels are first imported "
                    "(or use backend='reference')"
                )
            log.warning("Triton kernels on %s: running them under the Triton interpreter (TRITON_INTERPRET=1)", device)
            os.environ["TRITON_INTERPRET"] = "1"
        _loaded = tuple(importlib.import_module(name) for name in _TRITON_MODULES)  # type: ignore[assignment]
    return _loaded


# ---- QuantizedTensor <-> op arguments ------------------------------------------------


def _json_value(v) -> str:
    """One JSON value from python scalars, tuples and lists, written with plain string operations.

    Not ``json.dumps``: inside ``torch.compile`` the spec is traced once from python constants
    and folds into the graph as a constant, and dynamo cannot trace ``json``.
    """
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        if v != v or v in (float("inf"), float("-inf")):
            raise KernelError(f"op spec: non-finite number {v!r} in a weight's params")
        return repr(v)
    if isinstance(v, str):
        if '"' in v or "\\" in v:
            raise KernelError(f"op spec: quotes or backslashes in the string {v!r}")
        return '"' + v + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_json_value(x) for x in v) + "]"
    raise KernelError(f"op spec: cannot write {type(v).__name__} {v!r}")


def _write_spec(codec: str, shape: tuple[int, ...], names: tuple[str, ...], params: tuple) -> str:
    """'{"codec": .., "names": [..], "params": [[key, value], ..], "shape": [..]}'; params sorted by key."""
    return ('{"codec": ' + _json_value(codec) + ', "names": ' + _json_value(names) + ', "params": '
            + _json_value(params) + ', "shape": ' + _json_value(shape) + "}")


_cached_spec = functools.lru_cache(maxsize=4096)(_write_spec)  # eager calls: built once per weight layout


@functools.lru_cache(maxsize=4096)
def _read_spec(spec: str) -> tuple[str, tuple[int, ...], tuple[str, ...], dict]:
    """(codec, shape, names, params) of a spec string, parsed once per distinct spec."""
    s = json.loads(spec)
    return s["codec"], tuple(s["shape"]), tuple(s["names"]), {k: v for k, v in s["params"]}


def to_op_args(q: QuantizedTensor) -> tuple[list[torch.Tensor], str]:
    """q -> (stored tensors in name order, spec string with codec, params, shape and names).

    The spec is built once per distinct layout (a cache) and, under ``torch.compile``, once at
    trace time; the op parses each distinct spec once.
    """
    names = tuple(sorted(q.tensors))
    key = (q.codec, tuple(q.shape), names, tuple(sorted(q.params.items())))
    spec = _write_spec(*key) if torch.compiler.is_compiling() else _cached_spec(*key)
    return [q.tensors[n] for n in names], spec


def from_op_args(tensors: list[torch.Tensor], spec: str) -> QuantizedTensor:
    """The inverse of :func:`to_op_args`."""
    codec, shape, names, params = _read_spec(spec)
    if len(tensors) != len(names):
        raise KernelError(f"op weight spec names {list(names)} but {len(tensors)} tensors were passed")
    return QuantizedTensor(codec, shape, dict(zip(names, tensors)), dict(params))


# ---- the custom ops (Triton) ---------------------------------------------------------


@torch.library.custom_op("ernieq::linear", mutates_args=())
def linear_op(x: torch.Tensor, weight: list[torch.Tensor], weight_spec: str, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] @ W_hat[N, K].T (+ bias) -> [M, N], by the Triton dequant-GEMM."""
    dequant_gemm, _ = triton_modules(x.device)
    return dequant_gemm.linear(x, from_op_args(weight, weight_spec), bias)


@linear_op.register_fake
def _linear_fake(x, weight, weight_spec, bias):
    n = _read_spec(weight_spec)[1][0]
    return x.new_empty((x.shape[0], n))


@torch.library.custom_op("ernieq::moe", mutates_args=())
def moe_op(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate: list[torch.Tensor],
    gate_spec: str,
    up: list[torch.Tensor],
    up_spec: str,
    down: list[torch.Tensor],
    down_spec: str,
    down_rotation: list[torch.Tensor],
) -> torch.Tensor:
    """The routed experts of one layer -> [T, H], by the Triton fused MoE. down_rotation: [] or [signs, q]."""
    _, fused_moe = triton_modules(x.device)
    weights = MoEWeights(from_op_args(gate, gate_spec), from_op_args(up, up_spec), from_op_args(down, down_spec),
                         Rotation(*down_rotation) if down_rotation else None)
    return fused_moe.moe(x, topk_ids, topk_weights, weights)


@moe_op.register_fake
def _moe_fake(x, topk_ids, topk_weights, gate, gate_spec, up, up_spec, down, down_spec, down_rotation):
    return torch.empty_like(x)


# ---- what the runtime calls ----------------------------------------------------------


def linear(
    x: torch.Tensor, q: QuantizedTensor, bias: torch.Tensor | None = None, backend: str | None = None
) -> torch.Tensor:
    """y = x @ W_hat.T (+ bias). x: float [M, K]; q: shape (N, K); bias: [N] or None. Returns [M, N] in x.dtype."""
    if resolve_backend(x.device, backend) == "reference":
        return reference.linear(x, q, bias)
    if _loaded is None and not torch.compiler.is_compiling():
        triton_modules(x.device)  # before the op call: dispatching it imports triton (the op loads them too)
    return torch.ops.ernieq.linear(x, *to_op_args(q), bias)


def moe(
    x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, weights: MoEWeights, backend: str | None = None
) -> torch.Tensor:
    """sum_a w[t, a] * down_e(silu(gate_e x_t) * up_e x_t). x: float [T, H]; topk_ids: int [T, A];
    topk_weights: float [T, A]; weights: gate, up (E, I, H), down (E, H, I) and down's rotation.
    Returns [T, H] in x.dtype."""
    if resolve_backend(x.device, backend) == "reference":
        return reference.moe(x, topk_ids, topk_weights, weights)
    if _loaded is None and not torch.compiler.is_compiling():
        triton_modules(x.device)  # before the op call: dispatching it imports triton (the op loads them too)
    packed = [a for w in weights.projections for a in to_op_args(w)]
    rot = weights.down_rotation
    return torch.ops.ernieq.moe(x, topk_ids, topk_weights, *packed, [rot.signs, rot.q] if rot is not None else [])
