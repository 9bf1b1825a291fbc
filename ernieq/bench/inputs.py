"""What ``ernieq bench`` multiplies: model shapes, codec parameters, synthetic weights, random routing.

Shape legend: M rows of x (tokens), N output features, K input features,
E experts, A active experts per token, H hidden size, I expert intermediate size.

Weights are synthetic: random bytes in each codec's stored layout (ccq2 with
per-channel code grids from the encoder's pool), because timing depends only on
the layout and encoding a 300B layer would take hours. Correctness of the codecs
themselves is the test suite's job.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from ernieq.codecs import QuantizedTensor, get_codec
from ernieq.errors import ErnieqError

CODECS = {
    "wint8": {},
    "wint4": {"group_size": 128, "symmetric": True},
    "fp8": {"block_size": 128, "activations": "dynamic"},  # W8A8: the activation quantizer is timed too
    "ccq2": {},
}


@dataclass(frozen=True)
class Model:
    name: str
    hidden: int  # H
    inter: int  # I, moe_intermediate_size
    experts: int  # E
    top_k: int  # A
    heads: int
    kv_heads: int
    head_dim: int

    def dense_shapes(self) -> dict[str, tuple[int, int]]:
        """(N, K) of the dense GEMMs benchmarked."""
        q = self.heads * self.head_dim
        return {
            "attn q_proj": (q, self.hidden),
            "attn o_proj": (self.hidden, q),
            "expert gate/up": (self.inter, self.hidden),
            "expert down": (self.hidden, self.inter),
        }


MODELS = {
    "21B-A3B": Model("ERNIE-4.5-21B-A3B", hidden=2560, inter=1536, experts=64, top_k=6,
                     heads=20, kv_heads=4, head_dim=128),
    "300B-A47B": Model("ERNIE-4.5-300B-A47B", hidden=8192, inter=3584, experts=64, top_k=8,
                       heads=64, kv_heads=8, head_dim=128),
}  # fmt: skip


def resolve_models(names: tuple[str, ...] | list[str]) -> list[str]:
    """Keys of MODELS for names such as '21b', '21B-A3B' or '300b' (case-insensitive); fails on unknown ones."""
    aliases = {key.lower(): key for key in MODELS} | {key.split("-")[0].lower(): key for key in MODELS}
    unknown = [n for n in names if n.strip().lower() not in aliases]
    if unknown:
        raise ErnieqError(f"unknown model(s) {unknown}; known: {sorted(aliases)}")
    return list(dict.fromkeys(aliases[n.strip().lower()] for n in names))


def resolve_codecs(names: tuple[str, ...] | list[str]) -> list[str]:
    """Codec names checked against CODECS; fails on unknown ones."""
    unknown = [n for n in names if n not in CODECS]
    if unknown:
        raise ErnieqError(f"unknown codec(s) {unknown}; known: {list(CODECS)}")
    return list(dict.fromkeys(names))


# ---- synthetic weights in each codec's stored layout ----------------------------------------


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class _Random:
    """Random tensors from one generator on one device."""

    gen: torch.Generator
    device: torch.device

    def uniform(self, *shape: int) -> torch.Tensor:  # float32 in [0, 1)
        return torch.rand(*shape, generator=self.gen, device=self.device)

    def normal(self, *shape: int) -> torch.Tensor:  # float32, unit Gaussian
        return torch.randn(*shape, generator=self.gen, device=self.device)

    def ints(self, *shape: int, lo: int = 0, hi: int = 256, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
        return torch.randint(lo, hi, shape, generator=self.gen, device=self.device, dtype=torch.int32).to(dtype)


Layout = Callable[[dict, tuple[int, ...], int, int, _Random], dict]
_LAYOUTS: dict[str, Layout] = {}


def _layout(codec: str):
    """Decorator: the builder of ``codec``'s stored tensors (params, lead dims, N, K, random source) -> dict."""

    def wrap(fn: Layout) -> Layout:
        _LAYOUTS[codec] = fn
        return fn

    return wrap


@_layout("wint8")
def _wint8(params, lead, n, k, rnd):
    return {"qweight": rnd.ints(*lead, n, k, lo=-127, hi=128, dtype=torch.int8),
            "scale": rnd.uniform(*lead, n) * 1e-2 + 1e-3}  # fmt: skip


@_layout("wint4")
def _wint4(params, lead, n, k, rnd):
    g = params["group_size"]
    t = {"qweight": rnd.ints(*lead, n, _cdiv(k, 2)), "scale": rnd.uniform(*lead, n, _cdiv(k, g)) * 1e-2 + 1e-3}
    if not params["symmetric"]:
        t["zero"] = rnd.ints(*lead, n, _cdiv(k, g), hi=16)
    return t


@_layout("fp8")
def _fp8(params, lead, n, k, rnd):
    b = params["block_size"]
    q = (rnd.normal(*lead, n, k) * 64).clamp_(-448, 448).to(torch.float8_e4m3fn)
    s = rnd.uniform(*lead, n) if b is None else rnd.uniform(*lead, _cdiv(n, b), _cdiv(k, b))
    return {"qweight": q, "scale": s * 1e-3 + 1e-4}


@_layout("ccq2")
def _ccq2(params, lead, n, k, rnd):
    from ernieq.codecs.ccq2 import CODE_GRID_POOL

    pool = torch.tensor(CODE_GRID_POOL, device=rnd.device)  # [P, 2]: (code_scale, code_zp)
    pick = rnd.ints(*lead, n, hi=len(CODE_GRID_POOL), dtype=torch.int64)  # one pool grid per channel
    return {
        "quant_weight": rnd.ints(*lead, _cdiv(k, 4), n),
        "weight_scale": rnd.ints(*lead, _cdiv(k, 128), n),
        "super_scales": (rnd.uniform(*lead, n) * 1e-3 + 1e-4).to(torch.bfloat16),
        "code_scale": pool[pick, 0].contiguous(),
        "code_zp": pool[pick, 1].contiguous(),
    }


def synthetic(
    codec: str, params: dict, shape: tuple[int, ...], device: torch.device, gen: torch.Generator
) -> QuantizedTensor:
    """A QuantizedTensor of ``shape`` ((N, K) or (E, N, K)) with random stored values in the codec's layout."""
    if codec not in _LAYOUTS:
        raise ErnieqError(f"no synthetic layout for codec {codec!r}; have {sorted(_LAYOUTS)}")
    lead, (n, k) = tuple(shape[:-2]), shape[-2:]
    tensors = _LAYOUTS[codec](params, lead, n, k, _Random(gen, device))
    full_params = dataclasses.asdict(get_codec(codec, **params).config)
    return QuantizedTensor(codec, tuple(shape), tensors, full_params)


# ---- routing and the looped MoE baseline ---------------------------------------------------------


def route(t: int, e: int, a: int, device: torch.device, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random top-A routing: A distinct experts per token ([T, A] int64), weights summing to 1 ([T, A])."""
    ids = torch.rand(t, e, generator=gen, device=device).argsort(dim=1)[:, :a]  # [T, A]
    w = torch.rand(t, a, generator=gen, device=device)
    return ids, w / w.sum(dim=1, keepdim=True)


def looped_moe(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, experts: Mapping) -> torch.Tensor:
    """The baseline: one torch GEMM per active expert, in x's dtype, as serving without a fused kernel does.

    x: [T, H]; topk_ids, topk_weights: [T, A]; experts[e] = (gate [I, H], up [I, H], down [H, I]).
    """
    out = torch.zeros_like(x, dtype=torch.float32)  # [T, H]
    for e in torch.unique(topk_ids).tolist():
        w_gate, w_up, w_down = experts[e]
        t_idx, a_idx = torch.nonzero(topk_ids == e, as_tuple=True)
        xe = x[t_idx]  # [T_e, H]
        h = torch.nn.functional.silu(xe @ w_gate.T) * (xe @ w_up.T)  # [T_e, I]
        y = (h @ w_down.T).float() * topk_weights[t_idx, a_idx, None]  # [T_e, H]: w[t, a] * y
        out.index_put_((t_idx,), y, accumulate=True)  # sum over a (index_add_ is erratically slow on a busy CPU)
    return out.to(x.dtype)
