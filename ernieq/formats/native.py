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

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ernieq.codecs import QuantizedTensor
from ernieq.model.checkpoint import CheckpointError, CheckpointReader, CheckpointWriter, read_json, write_json

FORMAT_VERSION = 1
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


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Tokenizer and generation files from ``src`` to ``dst``; returns the names copied."""
    copied = []
    for name in SIDE_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


class NativeWriter:
    """Writes a native checkpoint into ``out_dir`` (which the caller makes atomic)."""

    def __init__(self, out_dir: Path, source_config: dict, recipe: str, max_shard_bytes: int = 2**31):
        self.out_dir = Path(out_dir)
        self.source_config = source_config
        self.recipe = recipe
        self.modules: dict[str, ModuleSpec] = {}
        self._writer = CheckpointWriter(self.out_dir, max_shard_bytes=max_shard_bytes)

    def add_plain(self, name: str, tensor: torch.Tensor) -> None:
        self._writer.add(name, tensor)

    def add_quantized(self, weight_name: str, q: QuantizedTensor) -> None:
        base = base_name(weight_name)
        for key, tensor in q.tensors.items():
            self._writer.add(f"{base}.{key}", tensor)
        self.modules[base] = ModuleSpec(q.codec, dict(q.params), tuple(q.shape))

    def close(self, extra: dict | None = None) -> None:
        """Finish the shards and write ``config.json`` with the quantization config."""
        self._writer.close()
        config = dict(self.source_config)
        config["quantization_config"] = {
            "quant_method": QUANT_METHOD,
            "format_version": FORMAT_VERSION,
            "recipe": self.recipe,
            "modules": {k: {**asdict(v), "shape": list(v.shape)} for k, v in sorted(self.modules.items())},
            **(extra or {}),
        }
        write_json(self.out_dir / "config.json", config)


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
        self.modules = {
            base: ModuleSpec(m["codec"], dict(m["params"]), tuple(m["shape"])) for base, m in qc["modules"].items()
        }
        self._stored: dict[str, list[str]] = {}  # module base → its stored tensor names
        for name in self.reader.keys():
            base = name.rsplit(".", 1)[0]
            if base in self.modules:
                self._stored.setdefault(base, []).append(name)

    @property
    def config(self) -> dict:
        return self.reader.config

    def plain_names(self) -> list[str]:
        owned = {n for names in self._stored.values() for n in names}
        return [n for n in self.reader.keys() if n not in owned]

    def quantized(self, base: str) -> QuantizedTensor:
        spec = self.modules[base]
        names = self._stored.get(base)
        if not names:
            raise CheckpointError(f"{self.reader.path}: no stored tensors for quantized module {base!r}")
        tensors = {n[len(base) + 1 :]: self.reader.get(n) for n in sorted(names)}
        return QuantizedTensor(spec.codec, spec.shape, tensors, dict(spec.params))


def read_config(path: Path) -> dict:
    return read_json(Path(path) / "config.json")
