"""Hugging Face-layout checkpoints: a lazy, memory-mapped reader and a sharded writer.

A checkpoint folder holds ``config.json`` and either one ``model.safetensors`` or
several shards listed by ``model.safetensors.index.json``. Nothing is loaded until
a tensor is asked for, and then only that tensor; safetensors never runs code
from the file (no pickle).
"""

from __future__ import annotations

import hashlib
import json
import math
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
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read ({err.strerror or err})") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({type(err).__name__}: {err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def write_json(path: Path, data: dict) -> None:
    try:
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    except OSError as err:
        raise CheckpointError(f"{path}: cannot write ({err.strerror or err})") from None


# Bytes per element of every safetensors dtype ernieq reads (F4 packs two values per byte: a shape
# of [..., 2n] takes n bytes, so it is checked by safetensors itself, not here).
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
HASH_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex sha256 of the file's bytes."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def weights_sha256(folder: Path) -> str:
    """One hex sha256 for a checkpoint's weights: of ``<sha256>  <name>`` lines of its safetensors
    files sorted by name, as ``LC_ALL=C sha256sum *.safetensors | sha256sum`` prints it in the folder."""
    names = sorted(p.name for p in Path(folder).glob("*.safetensors"))
    if not names:
        raise CheckpointError(f"{folder}: no safetensors files")
    lines = "".join(f"{sha256_file(Path(folder) / name)}  {name}\n" for name in names)
    return hashlib.sha256(lines.encode()).hexdigest()


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_entry(path: Path, name: str, info) -> tuple[int, int]:
    """The byte range [begin, end) of one header entry, after checking dtype, shape and offsets agree."""
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header at tensor {name!r} (not an object)")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)
            and offsets[0] <= offsets[1]):
        raise CheckpointError(f"{path}: corrupt safetensors header at tensor {name!r} (data_offsets {offsets!r})")
    if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
        raise CheckpointError(f"{path}: corrupt safetensors header at tensor {name!r} (shape {shape!r})")
    if not (isinstance(dtype, str) and dtype in DTYPE_BYTES):
        raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype!r}; ernieq reads {', '.join(DTYPE_BYTES)}")
    nbytes = math.prod(shape) * DTYPE_BYTES[dtype]  # elements x bytes per element
    if offsets[1] - offsets[0] != nbytes:
        raise CheckpointError(f"{path}: corrupt safetensors header at tensor {name!r} "
                              f"(shape {shape} of {dtype} needs {nbytes} bytes, "
                              f"offsets span {offsets[1] - offsets[0]})")
    return offsets[0], offsets[1]


def _check_header(path: Path) -> set[str]:
    """Reject a truncated or corrupt safetensors file before safetensors maps it; returns its tensor names."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise CheckpointError(f"{path}: truncated safetensors header "
                                      f"({n} header bytes announced, file has {size})")
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: corrupt safetensors header ({n} bytes, more than {MAX_HEADER_BYTES})")
            raw = f.read(n)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read ({err.strerror or err})") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise CheckpointError(f"{path}: corrupt safetensors header ({type(err).__name__}: {err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", {})
    if not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")
    ranges = sorted(_check_entry(path, name, info) + (name,) for name, info in header.items())
    end = 0
    for begin, stop, name in ranges:  # the tensors tile the data buffer: no gap, no overlap
        if begin != end:
            raise CheckpointError(f"{path}: corrupt safetensors header at tensor {name!r} "
                                  f"(data starts at byte {begin}, expected {end})")
        end = stop
    if 8 + n + end != size:
        what = "truncated safetensors file" if 8 + n + end > size else "corrupt safetensors file (trailing bytes)"
        raise CheckpointError(f"{path}: {what} (needs {8 + n + end} bytes, has {size})")
    return set(header)


def _safetensors_call(what: str, fn, *args):
    """Call into safetensors; its errors (and the OS's) become a CheckpointError starting with ``what``."""
    try:
        return fn(*args)
    except SafetensorError as err:
        raise CheckpointError(f"{what}: {err}") from None
    except OSError as err:
        raise CheckpointError(f"{what}: cannot read ({err.strerror or err})") from None


class CheckpointReader:
    """Lazy access to a checkpoint folder's config and tensors.

    Tensors are read one at a time from memory-mapped shards: ``get`` returns a
    CPU tensor holding just that tensor's data. Every shard's header is checked
    when the reader opens (dtype, shape and offsets of every tensor agree, the
    file is as long as its header says), so a truncated or corrupt file fails here,
    with its name, and not halfway through a run. ``config``: the model's config when
    the folder has none of its own (one rank's folder of a tensor-parallel checkpoint).
    """

    def __init__(self, path: str | os.PathLike, config: dict | None = None):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a checkpoint folder")
        self.config = read_json(self.path / "config.json") if config is None else config
        self._handles: dict[Path, object] = {}
        self._file_of = self._map_tensors()

    def _map_tensors(self) -> dict[str, Path]:
        index = self.path / INDEX_NAME
        if index.exists():
            files = self._read_index(index)
            for shard in sorted(set(files.values())):
                if not shard.is_file():
                    raise CheckpointError(f"{shard}: shard listed in {index.name} is missing")
                held = _check_header(shard)
                self._handle(shard)
                for name in sorted(n for n, s in files.items() if s == shard and n not in held):
                    raise CheckpointError(f"{shard}: {index.name} lists tensor {name!r}, "
                                          f"which this shard does not hold")
            return files
        shards = sorted(self.path.glob("*.safetensors"))
        if not shards:
            raise CheckpointError(f"{self.path}: no *.safetensors files")
        files = {}
        for shard in shards:
            _check_header(shard)
            for name in _safetensors_call(str(shard), lambda s: list(self._handle(s).keys()), shard):
                if name in files:
                    raise CheckpointError(f"{shard}: tensor {name!r} is also in {files[name].name}")
                files[name] = shard
        return files

    def _read_index(self, index: Path) -> dict[str, Path]:
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map' object")
        files = {}
        for name, shard in weight_map.items():
            if not (isinstance(shard, str) and shard and Path(shard).name == shard):
                raise CheckpointError(f"{index}: tensor {name!r} maps to {shard!r}, not a file name in the folder")
            files[name] = self.path / shard
        return files

    def _handle(self, shard: Path):
        if shard not in self._handles:
            self._handles[shard] = _safetensors_call(str(shard), safe_open, shard, "pt")
        return self._handles[shard]

    def release(self) -> None:
        """Unmap every shard: the pages read so far stop counting in this process's memory.

        Tensors from :meth:`get` are views of the map and count until dropped;
        the next ``get`` maps its shard again.
        """
        self._handles.clear()

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
        return _safetensors_call(f"{shard}: tensor {name!r}", lambda: self._handle(shard).get_tensor(name))

    def _slice(self, name: str):
        shard = self.file_of(name)
        return _safetensors_call(f"{shard}: tensor {name!r}", lambda: self._handle(shard).get_slice(name))

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
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:  # a read-only or full disk
            raise CheckpointError(f"{self.out_dir}: cannot create ({err.strerror or err})") from None
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
        try:
            save_file(self._pending, part, metadata=self.metadata)
        except (OSError, SafetensorError) as err:  # safetensors reports a full disk as either
            raise CheckpointError(f"{part}: cannot write ({err})") from None
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
            try:
                part.rename(final)
            except OSError as err:
                raise CheckpointError(f"{final}: cannot write ({err.strerror or err})") from None
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
