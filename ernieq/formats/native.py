"""The ernieq native checkpoint: safetensors shards plus a self-describing config.

A quantized linear weight ``<base>.weight`` is stored as its codec's tensors,
``<base>.<tensor>`` (e.g. ``model.layers.1.self_attn.q_proj.qweight``); routed
experts always under their per-expert names, whichever layout the source used.
Everything else keeps its source name, dtype and values. ``config.json`` carries

    "quantization_config": {
        "quant_method": "ernieq", "format_version": 1, "recipe": "...",
        "modules": {"<base>": {"codec": "wint4", "params": {...}, "shape": [N, K]}, ...}
    }
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ernieq.codecs import QuantizedTensor
from ernieq.formats.registry import register_reader
from ernieq.transforms import Rotation
from ernieq.model.checkpoint import CheckpointError, CheckpointReader, read_json

FORMAT_VERSION = 1
PLAIN_LEAVES = ("weight", "bias")  # never a codec tensor's name
ROTATIONS = "ernieq_rotations"  # input rotations are stored once per K as ``ernieq_rotations.k<K>.{signs,q}``
QUANT_METHOD = "ernieq"
# Files copied from the source checkpoint as they are.
SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "LICENSE",
)


def base_name(weight_name: str) -> str:
    """``a.b.q_proj.weight`` → ``a.b.q_proj`` (fused expert names have no ``.weight``)."""
    return weight_name[: -len(".weight")] if weight_name.endswith(".weight") else weight_name


@dataclass(frozen=True)
class ModuleSpec:
    """How one quantized weight was encoded."""

    codec: str
    params: dict
    shape: tuple[int, ...]
    rotation: str | None = None  # the input rotation the weight was stored turned by (``ROTATIONS`` prefix)


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Tokenizer and generation files from ``src`` to ``dst``; returns the names copied."""
    copied = []
    for name in SIDE_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


class NativeReader:
    """Reads the quantized weights and plain tensors of a native checkpoint."""

    def __init__(self, path: Path):
        self.reader = CheckpointReader(path)
        qc = self.reader.config.get("quantization_config") or {}
        where = self.reader.path / "config.json"
        if qc.get("quant_method") != QUANT_METHOD:
            raise CheckpointError(f"{where}: not an ernieq checkpoint (quant_method {qc.get('quant_method')!r})")
        if qc.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{where}: format_version {qc.get('format_version')!r}, this ernieq reads {FORMAT_VERSION}")
        try:
            self.modules = {
                base: ModuleSpec(m["codec"], dict(m["params"]), tuple(m["shape"]), m.get("rotation"))
                for base, m in qc["modules"].items()
            }
        except (KeyError, TypeError, ValueError, AttributeError) as err:  # a hand-edited or damaged config
            raise CheckpointError(f"{where}: malformed quantization_config.modules ({type(err).__name__}: {err})") from None
        self._stored: dict[str, list[str]] = {}  # module base → its stored tensor names
        for name in self.reader.keys():
            base = self.module_of(name)
            if base is not None:
                self._stored.setdefault(base, []).append(name)

    def module_of(self, name: str) -> str | None:
        """The quantized module whose codec tensor ``name`` is, else None (a linear layer's ``bias`` beside
        its quantized weight stays a plain tensor: no codec names a tensor ``weight`` or ``bias``)."""
        base, _, leaf = name.rpartition(".")
        return base if base in self.modules and leaf not in PLAIN_LEAVES else None

    @property
    def path(self) -> Path:
        return self.reader.path

    @property
    def config(self) -> dict:
        return self.reader.config

    @property
    def quant_info(self) -> dict:
        return self.reader.config["quantization_config"]

    def plain_names(self) -> list[str]:
        owned = {n for names in self._stored.values() for n in names}
        return [n for n in self.reader.keys() if n not in owned and not n.startswith(ROTATIONS + ".")]

    def plain(self, name: str) -> torch.Tensor:
        return self.reader.get(name)

    def release(self) -> None:
        self.reader.release()

    def summary(self):
        """``ernieq inspect``'s summary: a quantized module's stored tensors count as its logical weight,
        the rotations as stored bytes that are no model parameter."""
        from ernieq.model.adapters import adapter_for
        from ernieq.model.summary import DTYPE_BYTES, StoredTensor, summarize_stored

        stored, counted = [], set()
        for name in self.reader.keys():
            size = math.prod(self.reader.shape(name)) * DTYPE_BYTES.get(self.reader.dtype(name), 4)
            base = self.module_of(name)
            spec = self.modules.get(base) if base is not None else None
            if name.startswith(ROTATIONS + "."):
                stored.append(StoredTensor(name, tuple(self.reader.shape(name)), 0, size, overhead=True))
            elif spec is not None:
                params = 0 if base in counted else math.prod(spec.shape)
                stored.append(StoredTensor(f"{base}.weight", tuple(spec.shape), params, size, spec.codec))
                counted.add(base)
            else:
                shape = tuple(self.reader.shape(name))
                stored.append(StoredTensor(name, shape, math.prod(shape), size))
        return summarize_stored(adapter_for(self.config, str(self.path / "config.json")), stored)

    def rotation(self, base: str) -> Rotation | None:
        """The input rotation quantized module ``base`` was stored turned by, or None."""
        key = self.modules[base].rotation
        if key is None:
            return None
        names = {part: f"{ROTATIONS}.{key}.{part}" for part in ("signs", "q")}
        missing = [n for n in names.values() if n not in self.reader]
        if missing:
            raise CheckpointError(f"{self.reader.path}: {base} is stored rotated, but {missing[0]} is missing")
        try:
            return Rotation.from_tensors({part: self.reader.get(n) for part, n in names.items()})
        except ValueError as err:
            raise CheckpointError(f"{self.reader.path}: {names['q']}: {err}") from None

    def quantized(self, base: str) -> QuantizedTensor:
        spec = self.modules[base]
        names = self._stored.get(base)
        if not names:
            raise CheckpointError(f"{self.reader.path}: no stored tensors for quantized module {base!r}")
        tensors = {n[len(base) + 1 :]: self.reader.get(n) for n in sorted(names)}
        return QuantizedTensor(spec.codec, spec.shape, tensors, dict(spec.params))


def _is_native(config: dict) -> bool:
    qc = config.get("quantization_config")
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


register_reader("native", _is_native)(NativeReader)


def read_config(path: Path) -> dict:
    return read_json(Path(path) / "config.json")
