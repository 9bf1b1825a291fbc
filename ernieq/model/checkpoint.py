"""Hugging Face-layout checkpoints: a lazy, memory-mapped reader and a sharded writer.

A checkpoint folder holds ``config.json`` and either one ``model.safetensors`` or
several shards listed by ``model.safetensors.index.json``. Nothing is loaded until
a tensor is asked for, and then only that tensor; safetensors never runs code
from the file (no pickle).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ernieq.errors import ErnieqError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class CheckpointError(ErnieqError, ValueError):
    """A checkpoint that cannot be read: the message names the file (and tensor)."""


def read_json(path: Path) -> dict:
    """A JSON object from ``path``, or a CheckpointError naming the file."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _check_header(path: Path) -> None:
    """Reject a truncated or corrupt safetensors file before safetensors maps it."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{path}: truncated safetensors header ({n} header bytes announced, file has {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{path}: corrupt safetensors header ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise CheckpointError(f"{path}: corrupt safetensors header at tensor {name!r}")
        end = max(end, offsets[1])
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated safetensors file (needs {8 + n + end} bytes, has {size})")


class CheckpointReader:
    """Lazy access to a checkpoint folder's config and tensors.

    Tensors are read one at a time from memory-mapped shards: ``get`` returns a
    CPU tensor holding just that tensor's data.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a checkpoint folder")
        self.config = read_json(self.path / "config.json")
        self._file_of = self._map_tensors()
        self._handles: dict[Path, object] = {}

    def _map_tensors(self) -> dict[str, Path]:
        index = self.path / INDEX_NAME
        if index.exists():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no 'weight_map' object")
            files = {name: self.path / shard for name, shard in weight_map.items()}
        else:
            shards = sorted(self.path.glob("*.safetensors"))
            if not shards:
                raise CheckpointError(f"{self.path}: no *.safetensors files")
            files = {}
            for shard in shards:
                for name in self._header_keys(shard):
                    files[name] = shard
        for shard in sorted(set(files.values())):
            if not shard.exists():
                raise CheckpointError(f"{shard}: shard listed in the index is missing")
            _check_header(shard)
        return files

    @staticmethod
    def _header_keys(shard: Path) -> list[str]:
        _check_header(shard)
        try:
            with safe_open(shard, framework="pt") as f:
                return list(f.keys())
        except SafetensorError as err:
            raise CheckpointError(f"{shard}: {err}") from None

    def _handle(self, shard: Path):
        if shard not in self._handles:
            try:
                self._handles[shard] = safe_open(shard, framework="pt")
            except SafetensorError as err:
                raise CheckpointError(f"{shard}: {err}") from None
        return self._handles[shard]

    def keys(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def file_of(self, name: str) -> Path:
        if name not in self._file_of:
            raise CheckpointError(f"{self.path}: no tensor {name!r}")
        return self._file_of[name]

    def get(self, name: str) -> torch.Tensor:
        shard = self.file_of(name)
        try:
            return self._handle(shard).get_tensor(name)
        except SafetensorError as err:
            raise CheckpointError(f"{shard}: tensor {name!r}: {err}") from None

    def _slice(self, name: str):
        shard = self.file_of(name)
        try:
            return self._handle(shard).get_slice(name)
        except SafetensorError as err:
            raise CheckpointError(f"{shard}: tensor {name!r}: {err}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """The safetensors dtype name, e.g. ``'BF16'``, ``'F32'``, ``'U8'``."""
        return self._slice(name).get_dtype()


class CheckpointWriter:
    """Writes tensors into safetensors shards of at most ``max_shard_bytes`` each.

    Shards are named ``model-0000i-of-0000n.safetensors`` with an index, or
    ``model.safetensors`` when one shard suffices. Use as a context manager; the
    files appear on a clean exit only.
    """

    def __init__(self, out_dir: str | os.PathLike, max_shard_bytes: int = 2**31, metadata: dict | None = None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self._names: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise CheckpointError(f"{self.out_dir}: tensor {name!r} written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._names.add(name)
        self._pending[name] = tensor.detach().to("cpu").contiguous()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        part = self.out_dir / f".part-{len(self._shards):05d}.safetensors"
        save_file(self._pending, part, metadata=self.metadata)
        self._shards.append((part, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[Path]:
        """Write what is pending, name the shards, write the index; returns the shard paths."""
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        weight_map, paths = {}, []
        for i, (part, names) in enumerate(self._shards):
            final = self.out_dir / (SINGLE_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors")
            part.rename(final)
            paths.append(final)
            weight_map.update({name: final.name for name in names})
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            write_json(self.out_dir / INDEX_NAME, index)
        return paths

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            for part in self.out_dir.glob(".part-*.safetensors"):
                part.unlink()
