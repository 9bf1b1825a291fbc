"""Read a FastDeploy ERNIE 4.5 MoE 2-bit checkpoint into ernieq's runtime, nothing re-encoded.

Shape legend: N output features, K input features, E routed experts, TP ranks.
The folder is what FastDeploy's loader reads (see ``ernieq.formats.fastdeploy``
for the sources): a Paddle ``config.json`` whose ``quantization_config`` says
``"quantization": "wint2"`` (``is_quantized`` true), and the tensors under
``ernie.`` either beside it (TP 1) or split over ``rank0`` .. ``rank{TP-1}``
(``ernieq.formats.fastdeploy_tp``). The codec of each linear module is the one
FastDeploy runs there (``WINT2Config.from_config`` / ``get_quant_method`` in
``layers/quantization/wint2.py``): a MoE layer with ``layer_idx <=
moe_w4_quant_config.quant_end_layer`` (default 6) has wint4 experts, every later
one wint2 (ernieq's ``ccq2``), every other linear layer wint8 (FastDeploy reads
the dense type from a ``dense_quant_config`` key, default ``wint8``: the only
dense type it runs here). Baidu's ERNIE-4.5-300B-A47B-2Bits-Paddle config
carries exactly these fields (FastDeploy ``docs/quantization/wint2.md``:
``dense_quant_type``, ``moe_quant_type: w4w2``, ``moe_w4_quant_config`` layers
0..6, ``moe_w2_quant_config`` layers 7..53, group size 64).

Presented as ernieq's runtime needs it (:class:`FastDeployReader`, the protocol
of ``ernieq.formats.registry.QuantizedCheckpoint``): native module names, each a
``QuantizedTensor`` in its codec's own layout, got by exact steps only: Paddle's
int8/int4 layouts undone (``paddle_layout``), the ranks' pieces joined
(``fastdeploy_tp``), fused modules cut along N back into q / k / v and gate / up
(``quant_slices``). Scales come back as float32 (bf16 widens exactly). The
folder is checked against ``config.json`` from the safetensors headers when it is
opened: a missing rank, a missing tensor, a wrong shape or dtype fails there with
one line naming the file and tensor.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from ernieq.codecs import QuantizedTensor
from ernieq.errors import ErnieqError
from ernieq.formats.fastdeploy_layouts import LAYOUTS, Layout
from ernieq.formats.fastdeploy_names import (
    ARCHITECTURE,
    DENSE,
    MODEL_TYPE,
    Plain,
    Slot,
    expected_targets,
    model_dims,
    plain_rule_of_target,
    required_plains,
    target_slots,
)
from ernieq.formats.fastdeploy_tp import (
    RANK_DIR,
    RANK_DIR_PATTERN,
    join_plain,
    module_split,
    plain_local_shape,
    plain_split_dim,
)
from ernieq.formats.native import ModuleSpec
from ernieq.formats.quant_slices import split_n
from ernieq.formats.registry import register_reader
from ernieq.model.adapters import adapter_for
from ernieq.model.checkpoint import DTYPE_BYTES, CheckpointReader, read_json
from ernieq.model.summary import StoredTensor, summarize_stored

log = logging.getLogger(__name__)

FORMAT_NAME = "fastdeploy"
QUANTIZATION = "wint2"  # the quantization_config.quantization this reader reads
MOE_QUANT_TYPE = "w4w2"
# FastDeploy quant_type -> ernieq codec, per place (WINT2Config: dense, MoE up to quant_end_layer, later MoE)
DENSE_TYPES = {"wint8": "wint8"}
MOE_W4_TYPES = {"wint4": "wint4"}
MOE_W2_TYPES = {"wint2": "ccq2"}
W4_END_DEFAULT = 6  # WINT2Config.from_config's default moe_w4 quant_end_layer
DECODED_CACHE = 128  # FastDeploy modules kept decoded (a layer's experts), for q/k/v and gate/up read one by one


@dataclass(frozen=True)
class ReadPlan:
    """Which codec FastDeploy runs at each place: dense layers, and MoE layers up to and after ``w4_end``."""

    dense: str
    moe_w4: str
    moe_w2: str
    w4_end: int

    def codec(self, role: str, layer: int) -> str:
        if role == DENSE:
            return self.dense
        return self.moe_w4 if layer <= self.w4_end else self.moe_w2  # get_quant_method: layer_idx <= end


def _choice(table: dict[str, str], value, key: str, where: Path) -> str:
    if value not in table:
        raise ErnieqError(f"{where}: quantization_config {key} is {value!r}; FastDeploy's wint2 path runs "
                          f"{', '.join(table)} there")
    return table[value]


def _section(config: dict, key: str, where: Path) -> dict:
    value = config.get(key, {})
    if not isinstance(value, dict):
        raise ErnieqError(f"{where}: quantization_config {key} must be an object, got {value!r}")
    return value


def read_plan(qc, where: Path) -> ReadPlan:
    """The plan of a ``quantization_config`` as FastDeploy's ``WINT2Config.from_config`` reads it (its defaults)."""
    if not isinstance(qc, dict) or qc.get("quantization") != QUANTIZATION:
        found = qc.get("quantization") if isinstance(qc, dict) else qc
        raise ErnieqError(f"{where}: quantization {found!r}; ernieq reads FastDeploy's {QUANTIZATION!r} "
                          f"(w4w2) checkpoints")
    moe = _section(qc, "moe_quant_config", where)
    if moe.get("quant_type", MOE_QUANT_TYPE) != MOE_QUANT_TYPE:
        raise ErnieqError(f"{where}: moe_quant_config quant_type {moe.get('quant_type')!r}; FastDeploy's "
                          f"{QUANTIZATION} path runs {MOE_QUANT_TYPE!r}")
    w4, w2 = _section(moe, "moe_w4_quant_config", where), _section(moe, "moe_w2_quant_config", where)
    end = w4.get("quant_end_layer", W4_END_DEFAULT)
    if not (isinstance(end, int) and not isinstance(end, bool)):
        raise ErnieqError(f"{where}: moe_w4_quant_config quant_end_layer must be an integer, got {end!r}")
    dense = qc.get("dense_quant_config", qc.get("dense_quant_type", "wint8"))
    return ReadPlan(_choice(DENSE_TYPES, dense, "dense_quant_type", where),
                    _choice(MOE_W4_TYPES, w4.get("quant_type", "wint4"), "moe_w4_quant_config.quant_type", where),
                    _choice(MOE_W2_TYPES, w2.get("quant_type", "wint2"), "moe_w2_quant_config.quant_type", where),
                    end)


def model_config(raw: dict, where: Path) -> dict:
    """The model's config as transformers builds it: no quantization_config; a Paddle config without
    ``model_type`` gets it from its architecture."""
    config = {k: v for k, v in raw.items() if k != "quantization_config"}
    if "model_type" not in config and ARCHITECTURE in (config.get("architectures") or []):
        config["model_type"] = MODEL_TYPE
    if config.get("model_type") != MODEL_TYPE:
        raise ErnieqError(f"{where}: model_type {config.get('model_type')!r}; FastDeploy's {QUANTIZATION} "
                          f"checkpoints ernieq reads are ERNIE 4.5 MoE ({MODEL_TYPE})")
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads"):
        if not isinstance(config.get(key), int):
            raise ErnieqError(f"{where}: {key} must be an integer, got {config.get(key)!r}")
    return config


def rank_folders(path: Path) -> list[Path]:
    """Where the tensors are: ``path`` itself, or ``rank0`` .. ``rank{TP-1}`` when there is more than one
    ``rank*`` folder (``load_composite_checkpoint``)."""
    found = sorted(d for d in path.iterdir() if d.is_dir() and d.name.startswith("rank"))
    if len(found) <= 1:
        return [path]
    index = {}
    for d in found:
        m = RANK_DIR_PATTERN.match(d.name)
        if m is None:
            raise ErnieqError(f"{d}: FastDeploy takes every rank* folder for a tensor-parallel rank; "
                              f"expected rank0 .. rank{len(found) - 1}")
        index[int(m[1])] = d
    tp = max(index) + 1
    missing = [r for r in range(tp) if r not in index]
    if missing:
        raise ErnieqError(f"{path / RANK_DIR.format(missing[0])}: missing; the checkpoint is split for {tp} "
                          f"tensor-parallel ranks (rank0 .. rank{tp - 1})")
    return [index[r] for r in range(tp)]


@dataclass
class _Target:
    """One FastDeploy module: its slots (by part), fields, codec, parts' N and K."""

    slots: list[Slot]
    fields: dict
    codec: str
    parts: list[int]
    k: int

    def natives(self) -> list[str]:
        return [s.module.format(**self.fields) for s in self.slots]


class FastDeployReader:
    """A FastDeploy wint2 checkpoint folder under ernieq's native names (``QuantizedCheckpoint``)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        where = self.path / "config.json"
        raw = read_json(where)
        self.plan = read_plan(raw.get("quantization_config"), where)
        self.config = model_config(raw, where)
        self.folders = rank_folders(self.path)
        self.tp = len(self.folders)
        self.ranks = [CheckpointReader(f, config=self.config) for f in self.folders]
        self.quant_info = {"quant_method": FORMAT_NAME, "recipe": f"fastdeploy {QUANTIZATION} ({MOE_QUANT_TYPE})",
                           "method": None, "calibration": None, "tensor_parallel": self.tp,
                           "moe_w4_quant_end_layer": self.plan.w4_end}
        names = self._same_names_on_every_rank()
        self._targets, self._plains = self._scan(names)
        self._check_complete()
        self.modules: dict[str, ModuleSpec] = {}
        self._part_of: dict[str, tuple[str, int]] = {}
        for name, t in self._targets.items():
            self._check_stored(name, t)
            params = LAYOUTS[t.codec].params({local: self.ranks[0].dtype(f"{name}.{local}")
                                              for local in LAYOUTS[t.codec].names})
            for part, native in enumerate(t.natives()):
                self.modules[native] = ModuleSpec(t.codec, params, (t.parts[part], t.k))
                self._part_of[native] = (name, part)
        self._plain_shapes = {native: self._check_plain(native, fd, rule)
                              for native, (fd, rule) in self._plains.items()}
        self._decoded: OrderedDict[str, list[QuantizedTensor]] = OrderedDict()

    # ------------------------------------------------------------ opening: what is where, checked

    def _same_names_on_every_rank(self) -> list[str]:
        names = set(self.ranks[0].keys())
        for folder, reader in zip(self.folders[1:], self.ranks[1:]):
            other = set(reader.keys())
            if other != names:
                lacks, extra = sorted(names - other), sorted(other - names)
                what = f"lacks tensor {lacks[0]!r}" if lacks else f"holds tensor {extra[0]!r}"
                raise ErnieqError(f"{folder}: {what}, unlike {self.folders[0].name} (every rank holds the same names)")
        return sorted(names)

    def _scan(self, names: list[str]) -> tuple[dict[str, _Target], dict[str, tuple[str, Plain]]]:
        """FastDeploy's modules (by name) and plain tensors (by native name) among ``names``."""
        dims = model_dims(self.config)
        locals_of: dict[str, list[str]] = {}
        plains: dict[str, tuple[str, Plain]] = {}
        skipped = []
        tied = bool(self.config.get("tie_word_embeddings"))
        for name in names:
            base, _, local = name.rpartition(".")
            if target_slots(base) is not None:
                locals_of.setdefault(base, []).append(local)
                continue
            found = plain_rule_of_target(name)
            if found is None or (tied and name == "lm_head.weight"):
                skipped.append(name)
                continue
            rule, fields = found
            plains[rule.native.format(**fields)] = (name, rule)
        if skipped:
            log.warning("%s: %d tensor(s) FastDeploy's ERNIE 4.5 MoE model does not read left out (%s, ...)",
                        self.path, len(skipped), skipped[0])
        targets = {}
        for base, stored in locals_of.items():
            slots, fields = target_slots(base)
            codec = self.plan.codec(slots[0].role, int(fields["layer"]))
            layout = LAYOUTS[codec]
            if sorted(stored) != sorted(layout.names):
                raise ErnieqError(f"{self.ranks[0].file_of(f'{base}.{stored[0]}')}: {base} holds "
                                  f"{', '.join(sorted(stored))}; FastDeploy runs {codec} there (config.json) and "
                                  f"reads {', '.join(layout.names)}")
            sizes = [dims.get(s.shape[0]) for s in slots] + [dims.get(slots[0].shape[1])]
            if None in sizes:
                raise ErnieqError(f"{self.path / 'config.json'}: lacks the sizes of {base} "
                                  f"({', '.join(slots[0].shape)})")
            targets[base] = _Target(slots, fields, codec, sizes[:-1], sizes[-1])
        return targets, plains

    def _check_complete(self) -> None:
        where = self.folders[0]
        for name in expected_targets(self.config):
            if name not in self._targets:
                raise ErnieqError(f"{where}: no tensors of {name} (FastDeploy's ERNIE 4.5 MoE of config.json "
                                  f"reads {name}.quant_weight ...)")
        extra = sorted(set(self._targets) - set(expected_targets(self.config)))
        if extra:
            raise ErnieqError(f"{where}: {extra[0]} is not a module of the ERNIE 4.5 MoE config.json describes")
        fd_names = {fd for fd, _ in self._plains.values()}
        for name in required_plains(self.config):
            if name not in fd_names:
                raise ErnieqError(f"{where}: no tensor {name!r} (FastDeploy's ERNIE 4.5 MoE reads it)")

    def _rank_note(self, r: int) -> str:
        return "" if self.tp == 1 else f" (rank {r} of {self.tp})"

    def _check_stored(self, name: str, t: _Target) -> None:
        """Every rank's tensors of module ``name`` have the dtypes and shapes config.json implies."""
        layout: Layout = LAYOUTS[t.codec]
        if self.tp == 1:
            n, k = sum(t.parts), t.k
        else:
            n, k = module_split(name, self.config).local_shape(t.parts, t.k, self.tp,
                                                               f"{self.path}: split for {self.tp} ranks, but {name}")
        for r, reader in enumerate(self.ranks):
            for local, (dtypes, shape) in layout.stored(n, k).items():
                full = f"{name}.{local}"
                got, dtype = reader.shape(full), reader.dtype(full)
                if got != shape or dtype not in dtypes:
                    raise ErnieqError(
                        f"{reader.file_of(full)}: tensor {full!r} is {dtype} {list(got)}, expected "
                        f"{'/'.join(dtypes)} {list(shape)}: the {t.codec} weight [N={n}, K={k}] config.json "
                        f"implies{self._rank_note(r)}")

    def _check_plain(self, native: str, fd: str, rule: Plain) -> tuple[int, ...]:
        """The native shape of a plain tensor, after checking every rank's piece and config.json's dims."""
        shapes = [reader.shape(fd) for reader in self.ranks]
        full = list(shapes[0])
        dim = plain_split_dim(fd)
        if dim is not None and dim < len(full):
            full[dim] *= self.tp  # the ranks' blocks along the cut dimension
        for r, (reader, got) in enumerate(zip(self.ranks, shapes)):
            if got != plain_local_shape(fd, tuple(full), self.tp):
                raise ErnieqError(f"{reader.file_of(fd)}: tensor {fd!r} has shape {list(got)}, rank 0's "
                                  f"{list(shapes[0])}{self._rank_note(r)}")
        shape = tuple(rule.to_native(torch.empty(full, device="meta")).shape)
        adapter = adapter_for(self.config, str(self.path / "config.json"))
        want = adapter.expected_shape(native)
        if want is not None and (len(want) != len(shape) or any(w not in (None, g) for g, w in zip(shape, want))):
            shown = "[" + ", ".join("*" if w is None else str(w) for w in want) + "]"
            raise ErnieqError(f"{self.ranks[0].file_of(fd)}: tensor {fd!r} is {list(shape)} as {native}, "
                              f"config.json implies {shown}")
        return shape

    # ------------------------------------------------------------ the QuantizedCheckpoint protocol

    def quantized(self, base: str) -> QuantizedTensor:
        if base not in self._part_of:
            raise ErnieqError(f"{self.path}: no quantized module {base!r}")
        name, part = self._part_of[base]
        return self._decode(name)[part]

    def rotation(self, base: str) -> None:
        return None  # FastDeploy's format holds weights only

    def plain_names(self) -> list[str]:
        return list(self._plains)

    def plain(self, name: str) -> torch.Tensor:
        fd, rule = self._plains[name]
        pieces = [reader.get(fd) for reader in self.ranks]
        return rule.to_native(join_plain(fd, pieces, [str(r.file_of(fd)) for r in self.ranks]))

    def release(self) -> None:
        for reader in self.ranks:
            reader.release()

    def summary(self):
        """``ernieq inspect``'s summary: every quantized module with its share of its FastDeploy module's
        stored bytes (over every rank), every plain tensor with its bytes on every rank."""
        def nbytes(name: str) -> int:
            return sum(math.prod(r.shape(name)) * DTYPE_BYTES[r.dtype(name)] for r in self.ranks)

        stored = []
        for name, t in self._targets.items():
            total = sum(nbytes(f"{name}.{local}") for local in LAYOUTS[t.codec].names)
            shares = [total * n // sum(t.parts) for n in t.parts]
            shares[-1] += total - sum(shares)
            for native, n, share in zip(t.natives(), t.parts, shares):
                stored.append(StoredTensor(f"{native}.weight", (n, t.k), n * t.k, share, t.codec))
        for native, (fd, _) in self._plains.items():
            shape = self._plain_shapes[native]
            stored.append(StoredTensor(native, shape, math.prod(shape), nbytes(fd)))
        return summarize_stored(adapter_for(self.config, str(self.path / "config.json")), stored)

    # ------------------------------------------------------------ decoding

    def _decode(self, name: str) -> list[QuantizedTensor]:
        """The native parts of FastDeploy module ``name``: every rank's tensors back to ernieq's layout,
        the ranks joined, the fused parts cut apart."""
        if name in self._decoded:
            self._decoded.move_to_end(name)
            return self._decoded[name]
        t = self._targets[name]
        layout = LAYOUTS[t.codec]
        pieces = []
        for r, reader in enumerate(self.ranks):
            tensors = {local: reader.get(f"{name}.{local}") for local in layout.names}
            pieces.append(layout.from_stored(tensors, f"{reader.file_of(f'{name}.{layout.names[0]}')}: {name}"))
        full = pieces[0] if self.tp == 1 else module_split(name, self.config).join(pieces, t.parts,
                                                                                   f"{self.path}: {name}")
        parts = split_n(full, t.parts, name)
        self._decoded[name] = parts
        if len(self._decoded) > DECODED_CACHE:
            self._decoded.popitem(last=False)
        return parts


def _is_fastdeploy(config: dict) -> bool:
    """A FastDeploy (Paddle) quantized checkpoint: its quantization_config names a ``quantization``."""
    qc = config.get("quantization_config")
    return isinstance(qc, dict) and "quantization" in qc and "quant_method" not in qc


register_reader(FORMAT_NAME, _is_fastdeploy)(FastDeployReader)
