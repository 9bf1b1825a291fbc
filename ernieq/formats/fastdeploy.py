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
step whole 128-row scale bytes). Names: ``ernieq.formats.fastdeploy_names``;
stored tensors per codec: ``ernieq.formats.fastdeploy_layouts``; the reader:
``ernieq.formats.fastdeploy_read``.

Values: ccq2 tensors are copied bit for bit; wint8 / wint4 codes are ernieq's,
their float32 scales are cast to the serving dtype, the one rounding FastDeploy's
format imposes. ernieq's ``wint4`` goes here only per channel (symmetric, one
group per row: ``group_size >= K``), as FastDeploy's is. Unquantized tensors keep
their dtype (FastDeploy casts them on load); the router and lm_head are
transposed to Paddle's ``[K, N]``.

Tensor parallelism: with ``tp`` > 1 the checkpoint is written as FastDeploy
loads a pre-split one on ``tp`` GPUs, one folder ``rank{r}`` per rank beside
``config.json`` (``ernieq.formats.fastdeploy_tp`` says what each rank holds and
where FastDeploy reads it).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from ernieq.errors import ErnieqError
from ernieq.formats.fastdeploy_layouts import layout_of
from ernieq.formats.fastdeploy_names import (
    DENSE,
    DROPPED,
    MODEL_TYPE,
    ROUTED,
    Plain,
    plain_rule,
    slot_of,
)
from ernieq.formats.fastdeploy_tp import RANK_DIR, module_split, split_plain
from ernieq.formats.native import NativeReader, copy_side_files
from ernieq.formats.quant_slices import cat_n
from ernieq.formats.registry import register_format
from ernieq.model.checkpoint import CheckpointWriter, write_json

log = logging.getLogger(__name__)

FORMAT_NAME = "fastdeploy"
SERVING_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
CCQ2_LOCAL_GROUP = 64  # rows per 4-bit local scale: FastDeploy's moe_w2 quant_group_size
VOCAB_PADDING = 64  # DEFAULT_VOCAB_PADDING_SIZE of FastDeploy's layers/utils.py (vLLM's value, which it follows)
MAX_SHARD_BYTES = 2**31  # over all ranks: each rank's writer holds at most its share before writing a shard
# Config keys FastDeploy reads as the torch-checkpoint marker (see the module docstring).
TORCH_MARKERS = ("torch_dtype", "transformers_version")
# The codecs FastDeploy's w4w2 path runs at each kind of place (see WINT2Config.get_quant_method).
ROLE_CODECS = {DENSE: ("wint8",), ROUTED: ("ccq2", "wint4")}


# ---------------------------------------------------------------- where each native module goes


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


def collect_targets(reader: NativeReader) -> dict[str, Target]:
    """Group the quantized native modules into FastDeploy's (fused) modules; fail on a gap or a codec misfit."""
    targets: dict[str, Target] = {}
    for module, spec in sorted(reader.modules.items()):
        found = slot_of(module)
        if found is None:
            raise ErnieqError(f"{FORMAT_NAME}: {module} has no place in FastDeploy's ERNIE 4.5 MoE checkpoint")
        slot, fields = found
        if spec.codec not in ROLE_CODECS[slot.role]:
            raise ErnieqError(
                f"{FORMAT_NAME}: {module} is {spec.codec}; FastDeploy's w4w2 path reads "
                f"{' or '.join(ROLE_CODECS[slot.role])} there (quantize with --bits 2)"
            )
        name = slot.target.format(**fields)
        expert = int(fields["expert"]) if fields.get("expert") is not None else None
        target = targets.setdefault(name, Target(name, int(fields["layer"]), expert, slot.role, [None] * slot.parts))
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


def _check_target(reader: NativeReader, target: Target, tp: int) -> None:
    """Fail, naming the module, unless FastDeploy can load ``target`` (every rank's piece, with ``tp`` > 1)."""
    specs = [reader.modules[m] for m in target.parts]
    layout = layout_of(specs[0].codec, f"{FORMAT_NAME}: {target.name}")
    for module, spec in zip(target.parts, specs):
        layout.check_spec(f"{FORMAT_NAME}: {module}", spec)
    ks = {s.shape[-1] for s in specs}
    if len(ks) != 1:
        raise ErnieqError(f"{FORMAT_NAME}: {target.name} fuses weights of different K {sorted(ks)}")
    parts, k = [s.shape[0] for s in specs], ks.pop()
    where = f"{FORMAT_NAME}: {target.name} ({', '.join(target.modules())})"
    if tp == 1:
        layout.check_shape(where, sum(parts), k)
        return
    n_local, k_local = module_split(target.name, reader.config).local_shape(parts, k, tp, where)
    layout.check_shape(f"{where}, each of {tp} tensor-parallel ranks' [N={n_local}, K={k_local}]", n_local, k_local)


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


def rename_plain(name: str, shape: tuple[int, ...]) -> Plain | None:
    """The rule of the unquantized tensor ``name``, None for a DROPPED one; fails on a tensor FastDeploy would
    not read."""
    if DROPPED.match(name):
        return None
    found = plain_rule(name)
    if found is not None:
        return found[0]
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


@register_format(FORMAT_NAME, options=("tp",))
def export_fastdeploy(native_dir: Path, out: Path, tp: int = 1) -> Path:
    """Write the native 2-bit ERNIE 4.5 MoE checkpoint ``native_dir`` as FastDeploy's wint2 checkpoint into
    ``out``; with ``tp`` > 1, split for ``tp`` GPUs (``out/rank{r}`` per rank, see ``fastdeploy_tp``)."""
    if not (isinstance(tp, int) and tp >= 1):
        raise ErnieqError(f"{FORMAT_NAME}: --tp must be a positive integer, got {tp!r}")
    reader = NativeReader(native_dir)
    _check_architecture(reader)
    plain = {name: rename_plain(name, reader.reader.shape(name)) for name in reader.plain_names()}
    dropped = sorted(name for name, rule in plain.items() if rule is None)
    if dropped:
        log.warning("%s: %d multi-token-prediction tensor(s) left out (%s, ...): FastDeploy's w4w2 model does "
                    "not read them", FORMAT_NAME, len(dropped), dropped[0])
    targets = collect_targets(reader)
    for t in targets.values():
        _check_target(reader, t, tp)
    plan = moe_plan(reader, targets)
    dtype = serving_dtype(reader, targets)
    vocab = int(reader.config.get("vocab_size") or 0)
    if tp > 1 and vocab % (VOCAB_PADDING * tp):
        log.warning("%s: vocabulary %d is not a multiple of %d x %d: FastDeploy versions that pad the vocabulary "
                    "to a multiple of %d cut other blocks than these rank files hold", FORMAT_NAME, vocab,
                    VOCAB_PADDING, tp, VOCAB_PADDING)
    aux_free = False
    folders = [out] if tp == 1 else [out / RANK_DIR.format(r) for r in range(tp)]
    with ExitStack() as stack:
        writers = [stack.enter_context(CheckpointWriter(f, max_shard_bytes=MAX_SHARD_BYTES // tp)) for f in folders]
        for name in sorted(targets):
            t = targets[name]
            parts = [reader.quantized(m) for m in t.parts]
            fused = cat_n(parts, name)  # [N, K]: the parts along N
            layout = layout_of(fused.codec, name)
            pieces = [fused] if tp == 1 else module_split(name, reader.config).split(
                fused, [p.shape[0] for p in parts], tp, name)
            for writer, piece in zip(writers, pieces):
                for local, tensor in layout.to_stored(piece, dtype, name).items():
                    writer.add(f"{name}.{local}", tensor)
        for name, rule in plain.items():
            if rule is None:
                continue
            target = rule.target.format(**rule.pattern.match(name).groupdict())
            for writer, piece in zip(writers, split_plain(target, rule.to_target(reader.reader.get(name)), tp)):
                writer.add(target, piece)
            aux_free |= name.endswith("e_score_correction_bias")
    write_json(out / "config.json", fastdeploy_config(reader, plan, dtype, aux_free))
    copy_side_files(Path(native_dir), out)
    return out
