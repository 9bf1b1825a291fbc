"""Writes an ernieq native checkpoint one tensor group at a time, so that a killed run can resume.

Each tensor group (a layer's attention, a layer's MLP or MoE block, the
embeddings, the head) becomes one shard, ``model-0000i-of-0000n.safetensors``
(``n`` groups; ``model.safetensors`` when there is one). A shard is written to
``<shard>.partial``, fsync'd and renamed; then a small JSON record of the group
(its tensor names, its quantized modules, the caller's ``extra``) is written the
same way into ``<out>/.ernieq-resume/``. A group is finished when its record is
there: a run killed at any point and started again finds the finished groups,
and a group that was being written is simply written again, to the same bytes.
:meth:`NativeWriter.close` writes the index and ``config.json`` from the records
read back from disk (never from memory), so the files do not depend on where
an earlier run stopped. Nothing in them depends on the time.

The state folder also holds the run's fingerprint (what was asked, from which
source files): a folder left by a run with another fingerprint is emptied first.

A group that a plan of several ranks cut (``ernieq.distributed.plan``) is written in
parts, ``span`` = (lo, hi) of its pieces: each part's tensors and record go into the
state folder the same way (:meth:`NativeWriter.write_part`), and
:meth:`NativeWriter.join_parts` writes the group's shard from them: the shard holds
the same tensors, so it has the same bytes as when written whole (the file orders
tensors by dtype size and name, never by arrival).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ernieq.codecs import QuantizedTensor
from ernieq.formats.native import FORMAT_VERSION, QUANT_METHOD, ROTATIONS, ModuleSpec, base_name
from ernieq.transforms import Rotation
from ernieq.killpoints import kill_point
from ernieq.model.checkpoint import INDEX_NAME, SINGLE_NAME, CheckpointError

log = logging.getLogger(__name__)
STATE_DIR = ".ernieq-resume"
FINGERPRINT_NAME = "fingerprint.json"
PARTIAL = ".partial"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write) -> None:
    """``write(tmp_path)`` into ``<path>.partial``, fsync it, rename it to ``path``, fsync the folder."""
    part = path.with_name(path.name + PARTIAL)
    try:
        write(part)
        _fsync(part)
        kill_point(f"partial-{path.suffix.lstrip('.')}")
        os.replace(part, path)
        _fsync(path.parent)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot write ({err.strerror or err})") from None


def write_json_atomic(path: Path, data: dict) -> None:
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    write_atomic(path, lambda p: p.write_text(text))


# torch dtype → safetensors dtype name
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A safetensors file written tensor by tensor, without a copy of the whole shard in memory.

    Layout as ``safetensors.torch.save_file`` makes it: a little-endian u64 header
    length, the JSON header (``__metadata__`` {"format": "pt"}, then every tensor's
    dtype, shape and byte range), padded with spaces to 8 bytes, then the data in
    the header's order: larger elements first, then by name, so every tensor
    starts aligned to its element size.
    """
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in order:
        t = tensors[name]
        if t.dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {t.dtype}, which safetensors does not store")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in order:
            f.write(tensors[name].detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())


def shard_name(index: int, num_shards: int) -> str:
    return SINGLE_NAME if num_shards == 1 else f"model-{index + 1:05d}-of-{num_shards:05d}.safetensors"


def module_entry(spec: ModuleSpec) -> dict:
    """A module's JSON entry in ``quantization_config.modules`` (``rotation`` only when set)."""
    entry = {"codec": spec.codec, "params": dict(spec.params), "shape": list(spec.shape)}
    if spec.rotation is not None:
        entry["rotation"] = spec.rotation
    return entry


@dataclass
class GroupTensors:
    """What one group stores: plain tensors by name and quantized weights by weight name."""

    plain: dict[str, torch.Tensor] = field(default_factory=dict)
    modules: dict[str, dict] = field(default_factory=dict)  # module base → module_entry
    quantized: dict[str, torch.Tensor] = field(default_factory=dict)  # stored name → tensor

    def add_plain(self, name: str, tensor: torch.Tensor) -> None:
        self._check_new(name)
        self.plain[name] = tensor

    def add_quantized(self, weight_name: str, q: QuantizedTensor, rotation: str | None = None) -> None:
        base = base_name(weight_name)
        for key, tensor in q.tensors.items():
            self._check_new(f"{base}.{key}")
            self.quantized[f"{base}.{key}"] = tensor
        self.modules[base] = module_entry(ModuleSpec(q.codec, dict(q.params), tuple(q.shape), rotation))

    def add_rotation(self, key: str, rotation: Rotation) -> None:
        """The input rotation that modules added with ``rotation=key`` were stored turned by."""
        for part, tensor in rotation.tensors().items():
            self.add_plain(f"{ROTATIONS}.{key}.{part}", tensor)

    def _check_new(self, name: str) -> None:
        if name in self.plain or name in self.quantized:
            raise CheckpointError(f"tensor {name!r} written twice")


class NativeWriter:
    """A native checkpoint in ``out_dir`` (a temporary folder the caller renames), one shard per group."""

    def __init__(self, out_dir: Path, source_config: dict, recipe: str, num_groups: int, fingerprint: dict):
        if num_groups < 1:
            raise CheckpointError(f"{out_dir}: a checkpoint needs at least one tensor group")
        self.out_dir = Path(out_dir)
        self.state = self.out_dir / STATE_DIR
        self.source_config = source_config
        self.recipe = recipe
        self.num_groups = num_groups
        self.resumed = self._open(fingerprint)

    def _open(self, fingerprint: dict) -> bool:
        """Keep a folder left by a run with the same fingerprint (True), else start it empty."""
        path = self.state / FINGERPRINT_NAME
        if path.is_file():
            try:
                same = json.loads(path.read_text()) == fingerprint
            except (json.JSONDecodeError, UnicodeDecodeError):
                same = False
            if same:
                return True
            log.info("%s: left by a run with other arguments or other source files; starting over", self.out_dir)
        try:
            if self.out_dir.exists():
                shutil.rmtree(self.out_dir)
            self.state.mkdir(parents=True)
        except OSError as err:  # a read-only or full disk: name the folder
            raise CheckpointError(f"{self.state}: cannot create ({err.strerror or err})") from None
        write_json_atomic(path, fingerprint)
        return False

    def _record_path(self, index: int) -> Path:
        return self.state / f"group-{index:05d}.json"

    def finished(self, index: int) -> dict | None:
        """The record of group ``index`` when it was written completely, else None."""
        return self._read_record(self._record_path(index), self.out_dir)

    @staticmethod
    def _read_record(path: Path, folder: Path) -> dict | None:
        """The record at ``path`` when it and its shard (in ``folder``) are complete, else None."""
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        shard = folder / record.get("shard", "")
        if not shard.is_file() or shard.stat().st_size != record.get("file_size"):
            return None
        return record

    def write_group(self, index: int, key: str, group: GroupTensors, extra: dict | None = None) -> dict:
        """Write group ``index``'s shard, then its record (the commit); returns the record."""
        record = self._write(self.out_dir / shard_name(index, self.num_groups), self._record_path(index), index,
                             key, group, extra)
        kill_point("group-written")
        return record

    def _part_path(self, index: int, span: tuple[int, int], suffix: str) -> Path:
        return self.state / f"group-{index:05d}-part-{span[0]:05d}-{span[1]:05d}{suffix}"

    def write_part(self, index: int, key: str, span: tuple[int, int], group: GroupTensors,
                   extra: dict | None = None) -> dict:
        """Write part ``span`` of group ``index`` into the state folder (its tensors, then its record)."""
        record = self._write(self._part_path(index, span, ".safetensors"), self._part_path(index, span, ".json"),
                             index, key, group, extra)
        kill_point("part-written")
        return record

    def part_finished(self, index: int, span: tuple[int, int]) -> dict | None:
        """The record of part ``span`` of group ``index`` when it was written completely, else None."""
        return self._read_record(self._part_path(index, span, ".json"), self.state)

    def join_parts(self, index: int, key: str, spans: list[tuple[int, int]], merge_extra) -> dict:
        """Write group ``index``'s shard and record from its parts ``spans`` (every one written), then drop
        the parts; ``merge_extra(list of the parts' extras)`` is the group's extra. Returns the record."""
        from safetensors.torch import load_file

        group = GroupTensors()
        extras = []
        for span in spans:
            record = self.part_finished(index, span)
            if record is None:
                raise CheckpointError(f"{self.out_dir}: part {span} of group {key} was not written")
            group.plain.update(load_file(self._part_path(index, span, ".safetensors")))  # rotations: the same
            group.modules.update(record["modules"])
            extras.append(record["extra"])
        record = self.write_group(index, key, group, merge_extra(extras))
        for span in spans:
            for suffix in (".json", ".safetensors"):
                self._part_path(index, span, suffix).unlink(missing_ok=True)
        return record

    def _write(self, shard: Path, record_path: Path, index: int, key: str, group: GroupTensors,
               extra: dict | None) -> dict:
        """``group``'s tensors into ``shard``, then its record into ``record_path`` (the commit)."""
        tensors = {**group.plain, **group.quantized}
        if not tensors:
            raise CheckpointError(f"{self.out_dir}: group {key} has no tensors")
        write_atomic(shard, lambda p: save_safetensors(tensors, p))
        kill_point("shard-written")
        record = {
            "index": index,
            "group": key,
            "shard": shard.name,
            "file_size": shard.stat().st_size,
            "bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
            "tensors": sorted(tensors),
            "modules": group.modules,
            "extra": extra or {},
        }
        write_json_atomic(record_path, record)
        return record

    def records(self) -> list[dict]:
        """Every group's record, read back from disk, in group order; fails if one is missing."""
        records = []
        for index in range(self.num_groups):
            record = self.finished(index)
            if record is None:
                raise CheckpointError(f"{self.out_dir}: group {index} was not written")
            records.append(record)
        return records

    def close(self, extra: dict | None = None) -> list[dict]:
        """Write the shard index and ``config.json`` from the records; returns the records."""
        records = self.records()
        kill_point("index")
        if self.num_groups > 1:
            weight_map = {name: r["shard"] for r in records for name in r["tensors"]}
            index = {"metadata": {"total_size": sum(r["bytes"] for r in records)},
                     "weight_map": dict(sorted(weight_map.items()))}
            write_json_atomic(self.out_dir / INDEX_NAME, index)
        modules = {base: entry for r in records for base, entry in r["modules"].items()}
        config = dict(self.source_config)
        config["quantization_config"] = {
            "quant_method": QUANT_METHOD,
            "format_version": FORMAT_VERSION,
            "recipe": self.recipe,
            "modules": dict(sorted(modules.items())),
            **(extra or {}),
        }
        write_json_atomic(self.out_dir / "config.json", config)
        return records

    def drop_state(self) -> None:
        """Remove the resume records: what is left is exactly the checkpoint."""
        shutil.rmtree(self.state)
