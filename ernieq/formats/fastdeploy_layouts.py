"""How FastDeploy stores each codec's tensors, both ways: ernieq's quantized tensor ↔ a module's files.

Shape legend: N output features, K input features (one, possibly fused, module).
Per codec (``LAYOUTS``), what FastDeploy's loader reads for a pre-quantized module
``{prefix}.<name>`` (see ``ernieq.formats.fastdeploy`` for the sources):

- ``wint8`` (``layers/quantization/weight_only.py``, every dense linear layer):
  ``quant_weight`` int8 ``[N, K]`` in Paddle's ``weight_only_int8`` layout,
  ``weight_scale`` ``[N]`` in the serving dtype.
- ``wint4`` (``layers/moe/fused_moe_cutlass_backend.py``, the leading MoE layers'
  experts): ``quant_weight`` int8 ``[N/2, K]`` in Paddle's ``weight_only_int4``
  layout, ``weight_scale`` ``[N]``: symmetric, one scale per output channel.
- ``ccq2`` (``layers/moe/fused_moe_wint2_backend.py``, FastDeploy's ``wint2``):
  ernieq's tensors as they are, ``quant_weight`` uint8 ``[K/4, N]``,
  ``weight_scale`` uint8 ``[K/128, N]``, ``super_scales`` ``[N]`` (serving dtype),
  ``code_scale`` / ``code_zp`` float32 ``[N]``.

Reading undoes the Paddle layouts exactly (``ernieq.formats.paddle_layout``); the
scales come back as float32 (bf16 and fp16 widen exactly). Int8 bytes may be
stored as I8 or U8 (the same bits), as Paddle's exporters differ there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol

import torch

from ernieq.codecs import QuantizedTensor
from ernieq.codecs.ccq2 import SUPER_SCALE_DTYPES, CCQ2Config
from ernieq.codecs.packing import pack_int4_k_major, unpack_int4_k_major
from ernieq.codecs.wint4 import WInt4Config
from ernieq.errors import ErnieqError
from ernieq.formats.native import ModuleSpec
from ernieq.formats.paddle_layout import (
    check_layout_shape,
    paddle_int4_layout,
    paddle_int4_values,
    paddle_int8_layout,
    paddle_int8_values,
)

CCQ2_K_TILE = 128  # one ccq2 weight_scale byte row covers 128 rows of K
WINT4_CODE_OFFSET = 8  # ernieq's wint4 code is v + 8
BYTES = ("I8", "U8")  # safetensors dtypes of packed bytes
FLOATS = ("F32", "BF16", "F16")
HALVES = {"BF16": torch.bfloat16, "F16": torch.float16}
Stored = dict[str, tuple[tuple[str, ...], tuple[int, ...]]]  # name -> (allowed dtypes, shape)


class Layout(Protocol):
    names: tuple[str, ...]

    def check_spec(self, module: str, spec: ModuleSpec) -> None:
        """Fail, naming the module, on codec parameters FastDeploy does not run."""
        ...

    def check_shape(self, where: str, n: int, k: int) -> None:
        """Fail, naming ``where``, when a weight [N, K] has no layout FastDeploy loads."""
        ...

    def stored(self, n: int, k: int) -> Stored:
        """The tensors a weight [N, K] is stored as: local name -> (safetensors dtypes, shape)."""
        ...

    def params(self, dtypes: dict[str, str]) -> dict:
        """The codec parameters of the module whose tensors have these safetensors ``dtypes``."""
        ...

    def to_stored(self, q: QuantizedTensor, dtype: torch.dtype, where: str) -> dict[str, torch.Tensor]:
        """q: shape (N, K). Returns FastDeploy's tensors by local name (scales in the serving ``dtype``)."""
        ...

    def from_stored(self, tensors: dict[str, torch.Tensor], where: str) -> QuantizedTensor:
        """FastDeploy's tensors of one module (shapes already checked) back to ernieq's quantized tensor."""
        ...


LAYOUTS: dict[str, Layout] = {}


def _layout(codec: str) -> Callable[[type], type]:
    def wrap(cls: type) -> type:
        LAYOUTS[codec] = cls()
        return cls

    return wrap


def layout_of(codec: str, where: str) -> Layout:
    if codec not in LAYOUTS:
        raise ErnieqError(f"{where}: FastDeploy's w4w2 path has no {codec} layout (it runs {', '.join(LAYOUTS)})")
    return LAYOUTS[codec]


def cast_scale(scale: torch.Tensor, dtype: torch.dtype, where: str) -> torch.Tensor:
    """The per-channel scale in the serving dtype; fails if one rounds to 0 or overflows there."""
    cast = scale.to(dtype)
    if not (torch.isfinite(cast).all() and (cast > 0).all()):
        raise ErnieqError(f"{where}: weight scales do not fit {dtype} (a scale rounds to 0 or inf)")
    return cast


def _scale32(t: torch.Tensor, where: str) -> torch.Tensor:
    scale = t.float()
    if not torch.isfinite(scale).all():
        raise ErnieqError(f"{where}: non-finite weight scales")
    return scale


def _check_paddle(where: str, n: int, k: int, n_multiple: int, what: str) -> None:
    problem = check_layout_shape(n, k, n_multiple)
    if problem:
        raise ErnieqError(f"{where}: Paddle's {what} layout of {problem}")


@_layout("wint8")
class WInt8Layout:
    """quant_weight int8 [N, K] (Paddle weight_only_int8 bytes), weight_scale [N] (serving dtype)."""

    names = ("quant_weight", "weight_scale")

    def check_spec(self, module: str, spec: ModuleSpec) -> None:
        pass  # per-channel int8 is all wint8 is

    def check_shape(self, where: str, n: int, k: int) -> None:
        _check_paddle(where, n, k, 2, "weight_only_int8")

    def stored(self, n: int, k: int) -> Stored:
        return {"quant_weight": (BYTES, (n, k)), "weight_scale": (FLOATS, (n,))}

    def params(self, dtypes: dict[str, str]) -> dict:
        return {}

    def to_stored(self, q: QuantizedTensor, dtype: torch.dtype, where: str) -> dict[str, torch.Tensor]:
        return {"quant_weight": paddle_int8_layout(q.tensors["qweight"]),  # values int8 [N, K]
                "weight_scale": cast_scale(q.tensors["scale"], dtype, where)}  # [N]

    def from_stored(self, tensors: dict[str, torch.Tensor], where: str) -> QuantizedTensor:
        values = paddle_int8_values(tensors["quant_weight"], f"{where}.quant_weight")  # [N, K]
        scale = _scale32(tensors["weight_scale"], f"{where}.weight_scale")  # [N]
        return QuantizedTensor("wint8", tuple(values.shape), {"qweight": values, "scale": scale}, {})


# FastDeploy's int4 experts: symmetric, one float scale per output channel (ernieq's wint4, group_size None).
WINT4_PARAMS = dataclasses.asdict(WInt4Config(group_size=None, symmetric=True))


@_layout("wint4")
class WInt4Layout:
    """quant_weight int8 [N/2, K] (Paddle weight_only_int4 bytes), weight_scale [N] (serving dtype)."""

    names = ("quant_weight", "weight_scale")

    def check_spec(self, module: str, spec: ModuleSpec) -> None:
        k = spec.shape[-1]
        if not spec.params["symmetric"] or (spec.params["group_size"] or k) < k:
            raise ErnieqError(
                f"{module} is wint4 {spec.params} with K={k}; FastDeploy's wint4 MoE layers are symmetric and "
                f"per channel (one group per row: group_size >= K). Quantize with --w4-moe-layers 0 (every "
                f"routed expert ccq2) to export for FastDeploy"
            )

    def check_shape(self, where: str, n: int, k: int) -> None:
        _check_paddle(where, n, k, 4, "weight_only_int4")

    def stored(self, n: int, k: int) -> Stored:
        return {"quant_weight": (BYTES, (n // 2, k)), "weight_scale": (FLOATS, (n,))}

    def params(self, dtypes: dict[str, str]) -> dict:
        return dict(WINT4_PARAMS)

    def to_stored(self, q: QuantizedTensor, dtype: torch.dtype, where: str) -> dict[str, torch.Tensor]:
        k = q.shape[-1]
        codes = unpack_int4_k_major(q.tensors["qweight"], k)  # [N, K] uint8, v + 8
        values = (codes.to(torch.int16) - WINT4_CODE_OFFSET).to(torch.int8)  # v in [-8, 7]
        return {"quant_weight": paddle_int4_layout(values),
                "weight_scale": cast_scale(q.tensors["scale"][:, 0], dtype, where)}  # [N]: one group per row

    def from_stored(self, tensors: dict[str, torch.Tensor], where: str) -> QuantizedTensor:
        values = paddle_int4_values(tensors["quant_weight"], f"{where}.quant_weight")  # [N, K] in [-8, 7]
        codes = (values.to(torch.int16) + WINT4_CODE_OFFSET).to(torch.uint8)  # code = v + 8
        scale = _scale32(tensors["weight_scale"], f"{where}.weight_scale")[:, None]  # [N, 1]
        return QuantizedTensor("wint4", tuple(values.shape), {"qweight": pack_int4_k_major(codes), "scale": scale},
                               dict(WINT4_PARAMS))


@_layout("ccq2")
class CCQ2Layout:
    """ernieq's ccq2 tensors as they are (see ``ernieq.codecs.ccq2``)."""

    names = ("quant_weight", "weight_scale", "super_scales", "code_scale", "code_zp")

    def check_spec(self, module: str, spec: ModuleSpec) -> None:
        pass  # every ccq2 tensor is FastDeploy's wint2

    def check_shape(self, where: str, n: int, k: int) -> None:
        if k % CCQ2_K_TILE:
            raise ErnieqError(f"{where}: ccq2 with K={k}; FastDeploy's wint2 kernels need K % {CCQ2_K_TILE} == 0 "
                              f"(whole 128-row weight_scale bytes)")

    def stored(self, n: int, k: int) -> Stored:
        return {"quant_weight": (BYTES, (k // 4, n)), "weight_scale": (BYTES, (k // CCQ2_K_TILE, n)),
                "super_scales": (tuple(HALVES), (n,)), "code_scale": (FLOATS, (n,)), "code_zp": (FLOATS, (n,))}

    def params(self, dtypes: dict[str, str]) -> dict:
        return _ccq2_params(HALVES[dtypes["super_scales"]])

    def to_stored(self, q: QuantizedTensor, dtype: torch.dtype, where: str) -> dict[str, torch.Tensor]:
        if q.tensors["super_scales"].dtype != dtype:
            raise ErnieqError(f"{where}: ccq2 super scales are {q.tensors['super_scales'].dtype}, "
                              f"the checkpoint serves in {dtype}")
        return dict(q.tensors)

    def from_stored(self, tensors: dict[str, torch.Tensor], where: str) -> QuantizedTensor:
        t = {"quant_weight": tensors["quant_weight"].view(torch.uint8),  # [K/4, N]
             "weight_scale": tensors["weight_scale"].view(torch.uint8),  # [K/128, N]
             "super_scales": tensors["super_scales"],  # [N], bf16 or fp16
             "code_scale": tensors["code_scale"].float(), "code_zp": tensors["code_zp"].float()}  # [N]
        k, n = 4 * t["quant_weight"].shape[0], t["quant_weight"].shape[1]
        return QuantizedTensor("ccq2", (n, k), t, _ccq2_params(t["super_scales"].dtype))


def _ccq2_params(super_scale_dtype: torch.dtype) -> dict:
    """ccq2's parameters with the super scales' dtype (the others steer only the encoder)."""
    name = {v: k for k, v in SUPER_SCALE_DTYPES.items()}[super_scale_dtype]
    return dataclasses.asdict(CCQ2Config(super_scale_dtype=name))
