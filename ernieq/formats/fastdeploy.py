"""``fastdeploy``: ERNIE 4.5 MoE 2-bit checkpoints that FastDeploy's ``wint2`` (w4w2) path loads.

Shape legend: E experts, H hidden size, I expert intermediate size, K input
features, N output features. FastDeploy reads a *Paddle* checkpoint: linear
weights in ``[K, N]`` order, names under ``ernie.``, every linear layer
pre-quantized. What its sources (PaddlePaddle/FastDeploy, read with the search
tool) say it reads, and what this writer puts there:

- ``fastdeploy/config.py`` (``ModelConfig.read_model_config``): a ``config.json``
  with ``torch_dtype``, or with ``dtype`` and ``transformers_version`` > 4.56, is a
  torch checkpoint, and ``layers/quantization/__init__.py``
  (``parse_quant_config``) takes only block FP8 from torch checkpoints. So the
  config keeps ``dtype`` (the serving dtype: the ccq2 super scales' dtype) and
  drops ``torch_dtype`` and ``transformers_version``; ``quantization_config``
  carries ``"quantization": "wint2"`` (the key it dispatches on) and
  ``is_quantized`` is true, so every linear layer is read pre-quantized. The
  ``v1_loader_support`` check sends ``wint2`` to the v0 (state-dict) loader.
- ``layers/quantization/wint2.py`` (``WINT2Config.from_config``): ``dense_quant_type``,
  ``dense_quant_granularity``, ``moe_quant_config.quant_type``, and in
  ``moe_w4_quant_config`` / ``moe_w2_quant_config``: ``quant_type``,
  ``quant_granularity``, ``quant_start_layer``, ``quant_end_layer`` (w2 also
  ``quant_group_size``). ``get_quant_method``: a MoE layer with
  ``layer_idx <= moe_w4_quant_end_layer`` runs ``wint4`` (weight-only int4, per
  channel), every later one ``wint2``; every other linear layer ``wint8``.
  So the wint4 experts must be exactly the leading MoE layers.
- ``models/ernie4_5_moe.py``: prefix ``ernie.``; ``self_attn.qkv_proj`` (q | k | v
  fused along N), ``self_attn.o_proj``, ``mlp.up_gate_proj`` (gate | up along N)
  and ``mlp.down_proj`` for dense layers and ``mlp.shared_experts``; for
  ``moe_quant_type == "w4w2"`` the routed experts under
  ``mlp.experts.{e}.up_gate_proj.{quant_weight, weight_scale, super_scales,
  code_scale, code_zp}`` and ``down_proj``; the router ``mlp.gate.weight`` and
  ``mlp.moe_statics.e_score_correction_bias``; ``lm_head.weight``
  (``Ernie4_5_PretrainedModel.weight_infos``: a column weight, ``[H, V]``).
- ``layers/linear.py`` (``LinearBase``, v0 loader): with ``is_quantized`` a layer
  reads ``{prefix}.quant_weight`` and ``{prefix}.weight_scale`` and
  ``layers/quantization/weight_only.py`` (``GPUWeightOnlyLinearMethod.
  process_prequanted_weights``) sets them as they are: ``quant_weight`` int8
  ``[N, K]`` in the layout Paddle's ``weight_quantize(algo="weight_only_int8")``
  produces, ``weight_scale`` ``[N]`` (cast to the model dtype).
- ``layers/moe/fused_moe_cutlass_backend.py`` (``CutlassWeightOnlyMoEMethod``,
  the wint4 layers): per expert ``quant_weight`` int8 ``[N/2, K]`` in
  ``weight_quantize(algo="weight_only_int4")``'s layout, ``weight_scale`` ``[N]``
  in the model dtype (``set_value`` into a parameter of that dtype).
- ``layers/moe/fused_moe_wint2_backend.py`` (``CutlassWint2FusedMoeMethod``): per
  expert ``quant_weight`` uint8 ``[K/4, N]``, ``weight_scale`` uint8 ``[K/128, N]``,
  ``super_scales`` ``[N]`` (model dtype), ``code_scale`` / ``code_zp`` float32
  ``[N]``: ernieq's ``ccq2`` tensors as they are (``ernieq.codecs.ccq2``), gate
  and up concatenated along N (the last dimension).
- ``layers/moe/moe.py`` (``FusedMoE.load_state_dict``): the router weight is
  ``[H, E]`` (``matmul(x, gate_weight)``), read as float32; the correction bias
  is used when ``{prefix}.moe_statics.e_score_correction_bias`` is present.
- ``utils.py`` (``check_unified_ckpt``): shards ``model-0000i-of-0000n.safetensors``
  or one ``model.safetensors``, as ``CheckpointWriter`` names them.

The int8 / int4 bytes are Paddle's ``weight_quantize`` layout
(``ernieq.formats.paddle_layout``): quantized dense layers need K % 64 == 0 and
wint4 experts also N % 4 == 0; ccq2 needs K % 128 == 0 (FastDeploy's kernels
step whole 128-row scale bytes).

Values: ccq2 tensors are copied bit for bit; wint8 / wint4 codes are ernieq's,
their float32 scales are cast to the serving dtype, the one rounding FastDeploy's
format imposes. ernieq's ``wint4`` goes here only per channel (symmetric, one
group per row: ``group_size >= K``), as FastDeploy's is. Unquantized tensors keep
their dtype (FastDeploy casts them on load); the router and lm_head are
transposed to Paddle's ``[K, N]``. Tensor parallelism is not considered: the
layouts are the ones FastDeploy loads with ``--tensor-parallel-size 1``.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from ernieq.codecs import QuantizedTensor
from ernieq.codecs.packing import unpack_int4_k_major
from ernieq.errors import ErnieqError
from ernieq.formats.native import ModuleSpec, NativeReader, copy_side_files
from ernieq.formats.paddle_layout import check_layout_shape, paddle_int4_layout, paddle_int8_layout
from ernieq.formats.registry import register_format
from ernieq.model.checkpoint import CheckpointWriter, write_json

log = logging.getLogger(__name__)

FORMAT_NAME = "fastdeploy"
MODEL_TYPE = "ernie4_5_moe"
PREFIX = "ernie"
SERVING_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
CCQ2_K_TILE = 128  # one ccq2 weight_scale byte row covers 128 rows of K
CCQ2_LOCAL_GROUP = 64  # rows per 4-bit local scale: FastDeploy's moe_w2 quant_group_size
WINT4_CODE_OFFSET = 8  # ernieq's wint4 code is v + 8
# Config keys FastDeploy reads as the torch-checkpoint marker (see the module docstring).
TORCH_MARKERS = ("torch_dtype", "transformers_version")


# ---------------------------------------------------------------- where each native module goes

DENSE, ROUTED = "dense", "routed"
# The codecs FastDeploy's w4w2 path runs at each kind of place (see WINT2Config.get_quant_method).
ROLE_CODECS = {DENSE: ("wint8",), ROUTED: ("ccq2", "wint4")}


@dataclass(frozen=True)
class Slot:
    """One native linear module's place in FastDeploy's checkpoint.

    pattern: matches the native module name (groups ``layer``, and ``expert`` for routed experts).
    target: the FastDeploy module, a template over those groups.
    part, parts: this module is part ``part`` of ``parts`` concatenated along N into ``target``.
    role: DENSE or ROUTED, which decides the codecs FastDeploy takes there.
    """

    pattern: re.Pattern
    target: str
    part: int
    parts: int
    role: str


_L = r"^model\.layers\.(?P<layer>\d+)\."
_T = PREFIX + ".layers.{layer}."
_EXPERT = r"mlp\.experts\.(?P<expert>\d+)\."
SLOTS = (
    Slot(re.compile(_L + r"self_attn\.q_proj$"), _T + "self_attn.qkv_proj", 0, 3, DENSE),
    Slot(re.compile(_L + r"self_attn\.k_proj$"), _T + "self_attn.qkv_proj", 1, 3, DENSE),
    Slot(re.compile(_L + r"self_attn\.v_proj$"), _T + "self_attn.qkv_proj", 2, 3, DENSE),
    Slot(re.compile(_L + r"self_attn\.o_proj$"), _T + "self_attn.o_proj", 0, 1, DENSE),
    Slot(re.compile(_L + r"mlp\.gate_proj$"), _T + "mlp.up_gate_proj", 0, 2, DENSE),
    Slot(re.compile(_L + r"mlp\.up_proj$"), _T + "mlp.up_gate_proj", 1, 2, DENSE),
    Slot(re.compile(_L + r"mlp\.down_proj$"), _T + "mlp.down_proj", 0, 1, DENSE),
    Slot(re.compile(_L + r"mlp\.shared_experts\.gate_proj$"), _T + "mlp.shared_experts.up_gate_proj", 0, 2, DENSE),
    Slot(re.compile(_L + r"mlp\.shared_experts\.up_proj$"), _T + "mlp.shared_experts.up_gate_proj", 1, 2, DENSE),
    Slot(re.compile(_L + r"mlp\.shared_experts\.down_proj$"), _T + "mlp.shared_experts.down_proj", 0, 1, DENSE),
    Slot(re.compile(_L + _EXPERT + r"gate_proj$"), _T + "mlp.experts.{expert}.up_gate_proj", 0, 2, ROUTED),
    Slot(re.compile(_L + _EXPERT + r"up_proj$"), _T + "mlp.experts.{expert}.up_gate_proj", 1, 2, ROUTED),
    Slot(re.compile(_L + _EXPERT + r"down_proj$"), _T + "mlp.experts.{expert}.down_proj", 0, 1, ROUTED),
)


@dataclass
class Target:
    """One FastDeploy linear module and the native modules fused into it (by part, along N)."""

    name: str
    layer: int
    expert: int | None
    role: str
    parts: list[str | None]

    def modules(self) -> list[str]:
        return [m for m in self.parts if m is not None]


def _slot_of(module: str) -> tuple[Slot, re.Match]:
    for slot in SLOTS:
        m = slot.pattern.match(module)
        if m:
            return slot, m
    raise ErnieqError(f"{FORMAT_NAME}: {module} has no place in FastDeploy's ERNIE 4.5 MoE checkpoint")


def collect_targets(reader: NativeReader) -> dict[str, Target]:
    """Group the quantized native modules into FastDeploy's (fused) modules; fail on a gap or a codec misfit."""
    targets: dict[str, Target] = {}
    for module, spec in sorted(reader.modules.items()):
        slot, m = _slot_of(module)
        if spec.codec not in ROLE_CODECS[slot.role]:
            raise ErnieqError(
                f"{FORMAT_NAME}: {module} is {spec.codec}; FastDeploy's w4w2 path reads "
                f"{' or '.join(ROLE_CODECS[slot.role])} there (quantize with --bits 2)"
            )
        groups = m.groupdict()
        name = slot.target.format(**groups)
        expert = int(groups["expert"]) if groups.get("expert") is not None else None
        target = targets.setdefault(name, Target(name, int(groups["layer"]), expert, slot.role, [None] * slot.parts))
        target.parts[slot.part] = module
    for target in targets.values():
        if None in target.parts:
            raise ErnieqError(f"{FORMAT_NAME}: {target.name} fuses {len(target.parts)} modules but only "
                              f"{', '.join(target.modules())} are quantized; the others are missing")
        codecs = [reader.modules[m].codec for m in target.parts]
        if len(set(codecs)) > 1:
            raise ErnieqError(f"{FORMAT_NAME}: {target.name} fuses {', '.join(target.parts)}, "
                              f"which need one codec; got {', '.join(codecs)}")
    return targets


# ---------------------------------------------------------------- the stored tensors of each codec


class _Layout(Protocol):
    def check(self, target: Target, specs: list[ModuleSpec]) -> None:
        """Fail, naming the module, on a shape or parameter FastDeploy cannot load."""
        ...

    def tensors(self, parts: list[QuantizedTensor], dtype: torch.dtype, where: str) -> dict[str, torch.Tensor]:
        """parts: (N_i, K) each, concatenated along N. Returns FastDeploy's tensors by local name."""
        ...


LAYOUTS: dict[str, _Layout] = {}


def _layout(codec: str) -> Callable[[type], type]:
    def wrap(cls: type) -> type:
        LAYOUTS[codec] = cls()
        return cls

    return wrap


def _fused_shape(target: Target, specs: list[ModuleSpec]) -> tuple[int, int]:
    """(N, K) of the fused weight: the parts' N added, their common K."""
    ks = {s.shape[-1] for s in specs}
    if len(ks) != 1:
        raise ErnieqError(f"{FORMAT_NAME}: {target.name} fuses weights of different K {sorted(ks)}")
    return sum(s.shape[0] for s in specs), ks.pop()


def _cast_scale(scale: torch.Tensor, dtype: torch.dtype, where: str) -> torch.Tensor:
    """The per-channel scale in the serving dtype; fails if one rounds to 0 or overflows there."""
    cast = scale.to(dtype)
    if not (torch.isfinite(cast).all() and (cast > 0).all()):
        raise ErnieqError(f"{where}: weight scales do not fit {dtype} (a scale rounds to 0 or inf)")
    return cast


def _check_k_tile(target: Target, n: int, k: int, n_multiple: int, what: str) -> None:
    problem = check_layout_shape(n, k, n_multiple)
    if problem:
        raise ErnieqError(f"{FORMAT_NAME}: {target.name} ({', '.join(target.modules())}): Paddle's {what} "
                          f"layout of {problem}")


@_layout("wint8")
class _WInt8:
    """quant_weight int8 [N, K] (Paddle weight_only_int8 bytes), weight_scale [N] (serving dtype)."""

    def check(self, target: Target, specs: list[ModuleSpec]) -> None:
        n, k = _fused_shape(target, specs)
        _check_k_tile(target, n, k, 2, "weight_only_int8")

    def tensors(self, parts: list[QuantizedTensor], dtype: torch.dtype, where: str) -> dict[str, torch.Tensor]:
        values = torch.cat([q.tensors["qweight"] for q in parts])  # [N, K] int8
        scale = torch.cat([q.tensors["scale"] for q in parts])  # [N] float32
        return {"quant_weight": paddle_int8_layout(values), "weight_scale": _cast_scale(scale, dtype, where)}


@_layout("wint4")
class _WInt4:
    """quant_weight int8 [N/2, K] (Paddle weight_only_int4 bytes), weight_scale [N] (serving dtype)."""

    def check(self, target: Target, specs: list[ModuleSpec]) -> None:
        n, k = _fused_shape(target, specs)
        for module, spec in zip(target.parts, specs):
            if not spec.params["symmetric"] or (spec.params["group_size"] or k) < k:
                raise ErnieqError(
                    f"{FORMAT_NAME}: {module} is wint4 {spec.params} with K={k}; FastDeploy's wint4 MoE layers "
                    f"are symmetric and per channel (one group per row: group_size >= K). Quantize with "
                    f"--w4-moe-layers 0 (every routed expert ccq2) to export for FastDeploy"
                )
        _check_k_tile(target, n, k, 4, "weight_only_int4")

    def tensors(self, parts: list[QuantizedTensor], dtype: torch.dtype, where: str) -> dict[str, torch.Tensor]:
        k = parts[0].shape[-1]
        codes = torch.cat([unpack_int4_k_major(q.tensors["qweight"], k) for q in parts])  # [N, K] uint8, v + 8
        values = (codes.to(torch.int16) - WINT4_CODE_OFFSET).to(torch.int8)  # v in [-8, 7]
        scale = torch.cat([q.tensors["scale"][:, 0] for q in parts])  # [N]: one group per row
        return {"quant_weight": paddle_int4_layout(values), "weight_scale": _cast_scale(scale, dtype, where)}


@_layout("ccq2")
class _CCQ2:
    """ernieq's ccq2 tensors, the parts concatenated along N (the last dimension)."""

    def check(self, target: Target, specs: list[ModuleSpec]) -> None:
        _, k = _fused_shape(target, specs)
        if k % CCQ2_K_TILE:
            raise ErnieqError(
                f"{FORMAT_NAME}: {target.parts[0]} is ccq2 with K={k}; FastDeploy's wint2 kernels need "
                f"K % {CCQ2_K_TILE} == 0 (whole 128-row weight_scale bytes)"
            )

    def tensors(self, parts: list[QuantizedTensor], dtype: torch.dtype, where: str) -> dict[str, torch.Tensor]:
        found = {q.tensors["super_scales"].dtype for q in parts}
        if found != {dtype}:
            raise ErnieqError(f"{where}: ccq2 super scales are {sorted(map(str, found))}, "
                              f"the checkpoint serves in {dtype}")
        # quant_weight [K/4, N], weight_scale [K/128, N], super_scales / code_scale / code_zp [N]
        return {name: torch.cat([q.tensors[name] for q in parts], dim=-1) for name in parts[0].tensors}


# ---------------------------------------------------------------- MoE layers: which run wint4, which wint2


@dataclass(frozen=True)
class MoePlan:
    """The MoE layers (decoder layer indices) whose routed experts FastDeploy runs as wint4 and as wint2."""

    first_moe_layer: int
    w4_layers: tuple[int, ...]
    w2_layers: tuple[int, ...]

    @property
    def w4_end(self) -> int:
        """FastDeploy runs wint4 where layer_idx <= this; first_moe_layer - 1 (an empty range) without wint4."""
        return self.w4_layers[-1] if self.w4_layers else self.first_moe_layer - 1

    def quantization_config(self) -> dict:
        """The ``quantization_config`` FastDeploy's ``parse_quant_config`` and ``WINT2Config.from_config`` read."""
        return {
            "quantization": "wint2",
            "dense_quant_type": "wint8",
            "dense_quant_granularity": "per_channel",
            "moe_quant_type": "w4w2",
            "moe_quant_config": {
                "quant_type": "w4w2",
                "moe_w4_quant_config": {
                    "quant_type": "wint4",
                    "quant_granularity": "per_channel",
                    "quant_start_layer": self.first_moe_layer,
                    "quant_end_layer": self.w4_end,
                },
                "moe_w2_quant_config": {
                    "quant_type": "wint2",
                    "quant_granularity": "pp_acc",
                    "quant_group_size": CCQ2_LOCAL_GROUP,
                    "quant_start_layer": self.w2_layers[0],
                    "quant_end_layer": self.w2_layers[-1],
                },
            },
        }


def moe_plan(reader: NativeReader, targets: dict[str, Target]) -> MoePlan:
    """Where the wint4 and ccq2 experts are; fails unless FastDeploy's split (wint4 first) can express it."""
    num_experts = int(reader.config.get("moe_num_experts") or 0)
    codecs: dict[int, set[str]] = defaultdict(set)
    experts: dict[int, set[int]] = defaultdict(set)
    for t in targets.values():
        if t.role == ROUTED:
            codecs[t.layer].add(reader.modules[t.parts[0]].codec)
            experts[t.layer].add(t.expert)
    for layer in sorted(codecs):
        if len(codecs[layer]) > 1:
            raise ErnieqError(f"{FORMAT_NAME}: the routed experts of layer {layer} mix {sorted(codecs[layer])}; "
                              f"FastDeploy runs one method per MoE layer")
        if experts[layer] != set(range(num_experts)):
            missing = sorted(set(range(num_experts)) - experts[layer])
            raise ErnieqError(f"{FORMAT_NAME}: layer {layer} lacks quantized routed experts {missing} "
                              f"(moe_num_experts={num_experts})")
    w4 = tuple(layer for layer in sorted(codecs) if codecs[layer] == {"wint4"})
    w2 = tuple(layer for layer in sorted(codecs) if codecs[layer] == {"ccq2"})
    if not w2:
        raise ErnieqError(f"{FORMAT_NAME}: no ccq2 routed experts; FastDeploy's wint2 format is for 2-bit "
                          f"checkpoints (quantize with --bits 2)")
    if w4 and w4[-1] > w2[0]:
        raise ErnieqError(f"{FORMAT_NAME}: wint4 experts in layer {w4[-1]} follow ccq2 experts in layer {w2[0]}; "
                          f"FastDeploy runs wint4 only in the leading MoE layers (layer_idx <= quant_end_layer)")
    start = reader.config.get("moe_layer_start_index")
    first = min(codecs) if start is None else int(start)
    return MoePlan(first, w4, w2)


# ---------------------------------------------------------------- unquantized tensors


def _as_stored(t: torch.Tensor) -> torch.Tensor:
    return t


def _to_paddle_order(t: torch.Tensor) -> torch.Tensor:
    return t.t().contiguous()  # torch [N, K] → Paddle [K, N]


def _router(t: torch.Tensor) -> torch.Tensor:
    return t.float().t().contiguous()  # [E, H] → [H, E] float32: FastDeploy computes x @ gate_weight


def _float32(t: torch.Tensor) -> torch.Tensor:
    return t.float()


@dataclass(frozen=True)
class Rename:
    """An unquantized tensor: its native name pattern, its FastDeploy name template, how it is converted."""

    pattern: re.Pattern
    target: str
    convert: Callable[[torch.Tensor], torch.Tensor] = field(default=_as_stored)


RENAMES = (
    Rename(re.compile(r"^model\.embed_tokens\.weight$"), PREFIX + ".embed_tokens.weight"),
    Rename(re.compile(r"^model\.norm\.weight$"), PREFIX + ".norm.weight"),
    Rename(re.compile(_L + r"(?P<norm>input_layernorm|post_attention_layernorm)\.weight$"), _T + "{norm}.weight"),
    Rename(re.compile(_L + r"mlp\.gate\.weight$"), _T + "mlp.gate.weight", _router),
    Rename(re.compile(_L + r"mlp\.(?:gate\.)?moe_statics\.e_score_correction_bias$"),
           _T + "mlp.moe_statics.e_score_correction_bias", _float32),
    Rename(re.compile(r"^lm_head\.weight$"), "lm_head.weight", _to_paddle_order),
)


# Unquantized tensors FastDeploy's ERNIE 4.5 model does not read and this writer leaves out: the
# multi-token-prediction head (FastDeploy loads it as a separate speculative-decoding model).
DROPPED = re.compile(r"^model\.mtp[._]")


def rename_plain(name: str, shape: tuple[int, ...]) -> Rename | None:
    """The rename rule of the unquantized tensor ``name``, None for a DROPPED one; fails on a
    tensor FastDeploy would not read."""
    if DROPPED.match(name):
        return None
    for rule in RENAMES:
        if rule.pattern.match(name):
            return rule
    if (name.endswith(".weight") and len(shape) == 2) or ".experts." in name:
        raise ErnieqError(f"{FORMAT_NAME}: {name} is stored unquantized; FastDeploy's w4w2 path reads every "
                          f"linear layer pre-quantized (quantize with --bits 2 and no 'none' overrides)")
    raise ErnieqError(f"{FORMAT_NAME}: {name} has no place in FastDeploy's ERNIE 4.5 MoE checkpoint")


# ---------------------------------------------------------------- config.json


def serving_dtype(reader: NativeReader, targets: dict[str, Target]) -> torch.dtype:
    """The dtype FastDeploy serves in: the ccq2 super scales' dtype, which a half-precision model must share."""
    names = {reader.modules[m].params.get("super_scale_dtype", "bfloat16")
             for t in targets.values() for m in t.parts if reader.modules[m].codec == "ccq2"}
    if len(names) != 1:
        raise ErnieqError(f"{FORMAT_NAME}: ccq2 super scales in several dtypes {sorted(names)}; "
                          f"FastDeploy serves in one")
    name = names.pop()
    model = reader.config.get("dtype") or reader.config.get("torch_dtype") or name
    if model in SERVING_DTYPES and model != name:
        raise ErnieqError(f"{FORMAT_NAME}: the model computes in {model} but its ccq2 super scales are {name}; "
                          f"quantize with super_scale_dtype={model}")
    if model != name:
        log.info("%s: the model is %s; FastDeploy will serve it in %s (the ccq2 super scales' dtype)",
                 FORMAT_NAME, model, name)
    return SERVING_DTYPES[name]


def fastdeploy_config(reader: NativeReader, plan: MoePlan, dtype: torch.dtype, aux_free: bool) -> dict:
    """config.json as FastDeploy reads a Paddle ERNIE 4.5 checkpoint, with the wint2 quantization config."""
    config = {k: v for k, v in reader.config.items() if k not in (*TORCH_MARKERS, "quantization_config")}
    config["dtype"] = next(k for k, v in SERVING_DTYPES.items() if v == dtype)
    rope = config.get("rope_parameters") or {}
    if "rope_theta" not in config and "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]  # transformers 5 nests it; FastDeploy reads it at the top
    config["moe_use_aux_free"] = aux_free
    config["is_quantized"] = True
    config["quantization_config"] = plan.quantization_config()
    return config


def _check_architecture(reader: NativeReader) -> None:
    model_type = reader.config.get("model_type")
    if model_type != MODEL_TYPE:
        raise ErnieqError(f"{FORMAT_NAME}: only ERNIE 4.5 MoE ({MODEL_TYPE}) checkpoints go to FastDeploy's "
                          f"wint2 format; {reader.reader.path} is {model_type!r}")


@register_format(FORMAT_NAME)
def export_fastdeploy(native_dir: Path, out: Path) -> Path:
    """Write the native 2-bit ERNIE 4.5 MoE checkpoint ``native_dir`` as FastDeploy's wint2 checkpoint into ``out``."""
    reader = NativeReader(native_dir)
    _check_architecture(reader)
    plain = {name: rename_plain(name, reader.reader.shape(name)) for name in reader.plain_names()}
    dropped = sorted(name for name, rule in plain.items() if rule is None)
    if dropped:
        log.warning("%s: %d multi-token-prediction tensor(s) left out (%s, ...): FastDeploy's w4w2 model does "
                    "not read them", FORMAT_NAME, len(dropped), dropped[0])
    targets = collect_targets(reader)
    for t in targets.values():
        LAYOUTS[reader.modules[t.parts[0]].codec].check(t, [reader.modules[m] for m in t.parts])
    plan = moe_plan(reader, targets)
    dtype = serving_dtype(reader, targets)
    aux_free = False
    with CheckpointWriter(out) as writer:
        for name in sorted(targets):
            t = targets[name]
            parts = [reader.quantized(m) for m in t.parts]
            for local, tensor in LAYOUTS[parts[0].codec].tensors(parts, dtype, name).items():
                writer.add(f"{name}.{local}", tensor)
        for name, rule in plain.items():
            if rule is None:
                continue
            m = rule.pattern.match(name)
            writer.add(rule.target.format(**m.groupdict()), rule.convert(reader.reader.get(name)))
            aux_free |= name.endswith("e_score_correction_bias")
    write_json(out / "config.json", fastdeploy_config(reader, plan, dtype, aux_free))
    copy_side_files(Path(native_dir), out)
    return out
