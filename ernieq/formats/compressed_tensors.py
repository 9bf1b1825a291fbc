"""``compressed-tensors``: the checkpoint format vLLM serves (``quant_method: compressed-tensors``).

Every quantized weight ``<base>`` is stored as compressed-tensors' tensors
``<base>.<name>``; routed experts keep their per-expert names
(``...mlp.experts.M.gate_proj``), which vLLM's FusedMoE loader maps onto its
``w13_*`` / ``w2_*`` parameters. Layouts, by ernieq codec:

- ``wint4`` → ``pack-quantized``, 4-bit int, ``group`` strategy (``channel`` when
  K < G: one group per row). ``weight_packed`` int32 [N, ceil(K/8)]: the signed
  value v in [-8, 7] stored as the code v + 8, code 8j + i at bits 4i of word j
  (ernieq's wint4 code already is v + 8). ``weight_scale`` [N, n_groups] in the
  model's dtype (vLLM keeps WNA16 scales in it). Asymmetric: ``weight_zero_point``
  int32 [ceil(N/8), n_groups], the zero point's code packed along N.
  ``weight_shape`` int64 [2] = (N, K). compressed-tensors' group strategy has no
  partial group: K > G must be a multiple of G.
- ``wint8`` → ``pack-quantized``, 8-bit int, ``channel``: ``weight_packed`` int32
  [N, ceil(K/4)], code v + 128, code 4j + i at bits 8i of word j;
  ``weight_scale`` [N, 1] in the model's dtype; ``weight_shape``. (vLLM runs
  weight-only int8 only from ``pack-quantized``.)
- ``fp8`` → ``float-quantized``: ``weight`` float8_e4m3fn [N, K], ``weight_scale``
  float32 [ceil(N/B), ceil(K/B)] (``block``) or [N, 1] (``channel``), ernieq's bit for bit.
  The input activations say how ernieq computes the weight: ``activations="dynamic"``
  declares dynamic fp8 activations per token and group of B (``block``, as ``FP8_BLOCK``)
  or per token (``channel``, as ``FP8_DYNAMIC``), which vLLM's W8A8 FP8 kernels run;
  ``activations="none"`` declares none (weight-only, vLLM's W8A16 FP8).

Dequantized, (v - zero) * scale is exactly ernieq's decode; only a scale cast to
bf16/fp16 (the model's dtype) rounds, as it does when vLLM loads it.

``quantization_config`` is built from compressed-tensors' own pydantic classes
and written by its ``ModelCompressor.update_config``: one config group per
distinct scheme, targeting ``Linear`` when there is only one, else regular
expressions over module names (layer and expert indices generalised where
that stays unambiguous); ``ignore`` lists every module kept unquantized.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Protocol

import torch

from ernieq.codecs import QuantizedTensor
from ernieq.codecs.fp8 import DYNAMIC, activations_of
from ernieq.codecs.packing import pack_int4_int32, unpack_int4_k_major
from ernieq.errors import ErnieqError
from ernieq.formats.exporting import (
    QKV_AND_GATE_UP,
    ROUTED_EXPERTS,
    check_fused_layouts,
    copy_plain_tensors,
    hub_modules,
    model_dtype,
    plain_config,
    unquantized_modules,
)
from ernieq.formats.native import ModuleSpec, NativeReader, copy_side_files
from ernieq.formats.registry import register_format
from ernieq.model.checkpoint import CheckpointWriter, write_json

FORMAT_NAME = "compressed-tensors"
PACK_QUANTIZED = "pack-quantized"
FLOAT_QUANTIZED = "float-quantized"
MIXED = "mixed-precision"
INT8_OFFSET = 128  # compressed-tensors stores an 8-bit value v as the code v + 128
BYTES_PER_INT32 = 4


@dataclasses.dataclass(frozen=True)
class CtScheme:
    """One config group's scheme in hashable form: the compression format and the
    keyword arguments of compressed-tensors' ``QuantizationArgs`` for weights and inputs."""

    format: str
    weights: tuple[tuple[str, Any], ...]
    input_activations: tuple[tuple[str, Any], ...] | None = None

    def describe(self) -> str:
        w = dict(self.weights)
        grid = {"group": f"group {w.get('group_size')}", "block": f"block {w.get('block_structure')}"}
        kind = f"{w['type']}{w['num_bits']} {grid.get(w['strategy'], w['strategy'])}"
        inputs = "" if self.input_activations is None else f", {dict(self.input_activations)['type']} activations"
        return f"{self.format} {kind}{'' if w['symmetric'] else ' asym'}{inputs}"

    def build(self, targets: list[str]):
        """compressed-tensors' ``QuantizationScheme`` for ``targets``."""
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

        def args(items):
            return QuantizationArgs(**{k: list(v) if isinstance(v, tuple) else v for k, v in items})

        inputs = args(self.input_activations) if self.input_activations is not None else None
        return QuantizationScheme(targets=targets, weights=args(self.weights), input_activations=inputs,
                                  format=self.format)


class _Layout(Protocol):
    """How one ernieq codec sits in compressed-tensors."""

    def scheme(self, module: str, spec: ModuleSpec) -> CtScheme:
        """The scheme for a weight of this codec; fails on a shape compressed-tensors cannot hold."""
        ...

    def tensors(self, module: str, q: QuantizedTensor, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """q: shape (N, K). Returns the compressed-tensors tensors by their local names."""
        ...


_LAYOUTS: dict[str, _Layout] = {}


def _layout(codec: str):
    def wrap(cls):
        _LAYOUTS[codec] = cls()
        return cls

    return wrap


def _int_args(bits: int, symmetric: bool, strategy: str, group_size: int | None) -> tuple:
    return (("num_bits", bits), ("type", "int"), ("symmetric", symmetric), ("strategy", strategy),
            ("group_size", group_size), ("dynamic", False))


def _cast_scale(module: str, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The scale in ``dtype``; fails if a scale rounds to 0 or overflows there."""
    cast = scale.to(dtype)
    if not (torch.isfinite(cast).all() and (cast > 0).all()):
        raise ErnieqError(f"{module}: weight scales do not fit the model dtype {dtype} (a scale rounds to 0 or inf)")
    return cast


def _weight_shape(q: QuantizedTensor) -> torch.Tensor:
    return torch.tensor(q.shape, dtype=torch.int64)  # [2] = (N, K)


def pack_int8_int32(codes: torch.Tensor) -> torch.Tensor:
    """codes: uint8 [..., K]. Returns int32 [..., ceil(K/4)], code 4j + i at bits 8i of word j.

    Built in int64 and wrapped to int32 explicitly, independent of the host's byte order.
    """
    pad = -codes.shape[-1] % BYTES_PER_INT32
    words = torch.nn.functional.pad(codes, (0, pad)).unflatten(-1, (-1, BYTES_PER_INT32)).long()  # [..., K/4, 4]
    shifts = 8 * torch.arange(BYTES_PER_INT32, device=codes.device)  # [4]: 0, 8, 16, 24
    unsigned = (words << shifts).sum(dim=-1)  # sum_i c_i * 2^(8i), in [0, 2^32)
    return torch.where(unsigned >= 2**31, unsigned - 2**32, unsigned).to(torch.int32)  # two's complement wrap


@_layout("wint4")
class _WInt4Layout:
    def scheme(self, module: str, spec: ModuleSpec) -> CtScheme:
        k = spec.shape[-1]
        g, symmetric = spec.params["group_size"] or k, spec.params["symmetric"]
        if spec.params["group_size"] is None or k < g:
            strategy, group_size = "channel", None  # a single, partial group: one scale per row
        elif k % g == 0:
            strategy, group_size = "group", g
        else:
            raise ErnieqError(
                f"{module}: K={k} is not a multiple of the wint4 group size {g}; compressed-tensors' group "
                f"strategy cannot hold a partial group (quantize with a --group-size that divides {k})"
            )
        return CtScheme(PACK_QUANTIZED, _int_args(4, symmetric, strategy, group_size))

    def tensors(self, module: str, q: QuantizedTensor, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
        k = q.shape[-1]
        codes = unpack_int4_k_major(q.tensors["qweight"], k)  # [N, K] uint8, code = v + 8
        out = {
            "weight_packed": pack_int4_int32(codes),  # [N, ceil(K/8)] int32
            "weight_scale": _cast_scale(module, q.tensors["scale"], scale_dtype),  # [N, n_groups]
            "weight_shape": _weight_shape(q),
        }
        if "zero" in q.tensors:
            # packed along N: [n_groups, N] → [n_groups, ceil(N/8)] → [ceil(N/8), n_groups]
            out["weight_zero_point"] = pack_int4_int32(q.tensors["zero"].T.contiguous()).T.contiguous()
        return out


@_layout("wint8")
class _WInt8Layout:
    def scheme(self, module: str, spec: ModuleSpec) -> CtScheme:
        return CtScheme(PACK_QUANTIZED, _int_args(8, True, "channel", None))

    def tensors(self, module: str, q: QuantizedTensor, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
        codes = (q.tensors["qweight"].to(torch.int16) + INT8_OFFSET).to(torch.uint8)  # [N, K], code = v + 128
        return {
            "weight_packed": pack_int8_int32(codes),  # [N, ceil(K/4)] int32
            "weight_scale": _cast_scale(module, q.tensors["scale"], scale_dtype)[:, None],  # [N, 1]
            "weight_shape": _weight_shape(q),
        }


@_layout("fp8")
class _FP8Layout:
    def scheme(self, module: str, spec: ModuleSpec) -> CtScheme:
        b = spec.params["block_size"]
        float8 = (("num_bits", 8), ("type", "float"), ("symmetric", True))
        if b is None:  # compressed-tensors' FP8_DYNAMIC: per-channel weights, per-token activations
            grid, inputs = (("strategy", "channel"),), (("strategy", "token"),)
        else:  # FP8_BLOCK: B x B weight blocks, per-token groups of B activations
            grid = (("strategy", "block"), ("block_structure", (b, b)))
            inputs = (("strategy", "group"), ("group_size", b))
        weights = (*float8, ("dynamic", False), *grid)
        if activations_of(spec.params) != DYNAMIC:  # weight-only: no input activations to quantize
            return CtScheme(FLOAT_QUANTIZED, weights)
        return CtScheme(FLOAT_QUANTIZED, weights, (*float8, ("dynamic", True), *inputs))

    def tensors(self, module: str, q: QuantizedTensor, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
        scale = q.tensors["scale"]  # float32, kept: vLLM's FP8 scales are float32
        return {"weight": q.tensors["qweight"], "weight_scale": scale[:, None] if scale.ndim == 1 else scale}


def _layout_of(module: str, spec: ModuleSpec) -> _Layout:
    if spec.codec not in _LAYOUTS:
        raise ErnieqError(
            f"{module}: codec {spec.codec!r} has no compressed-tensors form "
            f"(exportable codecs: {', '.join(sorted(_LAYOUTS))}); choose another --format or recipe"
        )
    return _LAYOUTS[spec.codec]


def ct_scheme(module: str, spec: ModuleSpec) -> CtScheme:
    """The compressed-tensors scheme of the quantized ``module``; fails if there is none."""
    return _layout_of(module, spec).scheme(module, spec)


# Name generalisations tried in order: a number after these name parts becomes \d+.
_WILDCARDS = (("layers", "experts"), ("experts",))
_WILD = r"\d+"


def _pattern(module: str, wild: tuple[str, ...]) -> str:
    parts = module.split(".")
    return r"\.".join(_WILD if p.isdigit() and i and parts[i - 1] in wild else re.escape(p)
                      for i, p in enumerate(parts))


def _general_pattern(module: str, claims: dict) -> str | None:
    """The most general pattern of ``module`` that only modules of its own scheme share;
    None when no pattern with a wildcard is (the exact name serves)."""
    for wild in _WILDCARDS:
        pattern = _pattern(module, wild)
        if len(claims[wild][pattern]) == 1 and _WILD in pattern:
            return pattern
    return None


def config_targets(schemes: dict[str, CtScheme], kept: list[str]) -> dict[CtScheme, list[str]]:
    """The targets of each scheme: ``Linear`` when there is one scheme, else regexes or names.

    A module gets the most general pattern (layer and expert index as ``\\d+``,
    then the expert index only) that matches no module of another scheme and
    no kept module; else its exact name.
    """
    if len(set(schemes.values())) == 1:
        return {next(iter(schemes.values())): ["Linear"]}
    claims = {wild: defaultdict(set) for wild in _WILDCARDS}  # pattern → the schemes of the modules it matches
    for module, scheme in [*schemes.items(), *((k, None) for k in kept)]:
        for wild in _WILDCARDS:
            claims[wild][_pattern(module, wild)].add(scheme)
    targets: dict[CtScheme, set[str]] = defaultdict(set)
    for module, scheme in schemes.items():
        pattern = _general_pattern(module, claims)
        targets[scheme].add(f"re:{pattern}$" if pattern is not None else module)
    return {s: sorted(t) for s, t in targets.items()}


def quantization_config(schemes: dict[str, CtScheme], kept: list[str]):
    """compressed-tensors' ``QuantizationConfig`` for modules ``schemes`` and the ``kept`` ones."""
    from compressed_tensors.quantization import QuantizationConfig

    targets = config_targets(schemes, kept)
    order = [s for s, _ in Counter(schemes.values()).most_common()]
    formats = {s.format for s in order}
    return QuantizationConfig(
        config_groups={f"group_{i}": s.build(targets[s]) for i, s in enumerate(order)},
        format=formats.pop() if len(formats) == 1 else MIXED,
        ignore=kept,
        quantization_status="compressed",
    )


def _require_compressed_tensors():
    try:
        from compressed_tensors.compressors import ModelCompressor
    except ImportError as err:
        raise ErnieqError(f"the {FORMAT_NAME} format needs the 'compressed-tensors' package ({err})") from None
    return ModelCompressor


@register_format(FORMAT_NAME)
def export_compressed_tensors(native_dir: Path, out: Path) -> Path:
    """Write the native checkpoint ``native_dir`` as a compressed-tensors checkpoint into ``out``."""
    model_compressor = _require_compressed_tensors()
    reader = NativeReader(native_dir)
    if not reader.modules:
        raise ErnieqError(f"{native_dir}: no quantized modules to export")
    kept = unquantized_modules(reader)
    schemes = {m: ct_scheme(m, spec) for m, spec in reader.modules.items()}
    # vLLM runs q/k/v, gate/up and a block's routed experts each as one fused layer with one scheme
    check_fused_layouts({m: s.describe() for m, s in schemes.items()}, kept, FORMAT_NAME,
                        ROUTED_EXPERTS + QKV_AND_GATE_UP)
    scale_dtype = model_dtype(reader)
    # per-expert names where the hub holds the experts fused: llm-compressor's for such models (GPT-OSS)
    hub = {m: name or m for m, name in hub_modules(reader).items()}
    with CheckpointWriter(out) as writer:
        for module in sorted(reader.modules):
            layout = _layout_of(module, reader.modules[module])
            for name, tensor in layout.tensors(module, reader.quantized(module), scale_dtype).items():
                writer.add(f"{hub[module]}.{name}", tensor)
        copy_plain_tensors(reader, writer)
    write_json(out / "config.json", plain_config(reader))
    hub_schemes = {hub[m]: s for m, s in schemes.items()}
    model_compressor(quantization_config=quantization_config(hub_schemes, kept)).update_config(str(out))
    copy_side_files(Path(native_dir), out)
    return out
