"""Where block-output tuning leaves its results until ``ernieq quantize`` writes them.

One safetensors file per decoder layer in ``folder`` (``layer-0003.safetensors``): tensor
``{weight name}::{stored tensor}``, and in the metadata, per weight name, the QuantizedTensor's
codec, shape and params as JSON, and the layer's tuning report (``__report__``). Memory follows one
layer: ``get`` reads one weight back. A calibration pass that resumes (``resume.py``) takes back the
layers an earlier run finished (:meth:`TunedStore.restore`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from ernieq.codecs import QuantizedTensor

SEP = "::"
REPORT_KEY = "__report__"
FILE_RE = re.compile(r"layer-(\d{4,})\.safetensors")


class TunedStore:
    """Tuned QuantizedTensors by weight name, one file per layer, and the layers' reports."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._file_of: dict[str, Path] = {}
        self.reports: list[dict] = []

    def put(self, layer: int, tensors: dict[str, QuantizedTensor], report=None) -> None:
        """Store layer ``layer``'s kept tensors (``report``: its ``tune.LayerReport``)."""
        path = self.folder / f"layer-{layer:04d}.safetensors"
        flat = {f"{name}{SEP}{key}": t.contiguous() for name, q in tensors.items() for key, t in q.tensors.items()}
        meta = {name: json.dumps({"codec": q.codec, "shape": list(q.shape), "params": q.params})
                for name, q in tensors.items()}
        if report is not None:
            meta[REPORT_KEY] = json.dumps(asdict(report))
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(flat, str(tmp), metadata=meta)
        os.replace(tmp, path)
        self._add(path, meta)

    def _add(self, path: Path, meta: dict[str, str]) -> None:
        for name in meta:
            if name != REPORT_KEY:
                self._file_of[name] = path
        if REPORT_KEY in meta:
            self.reports.append(json.loads(meta[REPORT_KEY]))

    def restore(self, layers: int) -> None:
        """Hold exactly the first ``layers`` decoder layers' files (those an earlier run finished, read back);
        any other file goes."""
        self._file_of.clear()
        self.reports.clear()
        for path in sorted(self.folder.glob("layer-*.safetensors")):
            match = FILE_RE.fullmatch(path.name)
            if match is None or int(match.group(1)) >= layers:
                path.unlink()
                continue
            with safe_open(str(path), framework="pt") as f:
                self._add(path, f.metadata() or {})

    def __call__(self, layer: int, tensors: dict[str, QuantizedTensor], report=None) -> None:
        self.put(layer, tensors, report)

    def get(self, name: str) -> QuantizedTensor | None:
        """The tuned tensor of weight ``name`` (host memory), or None when tuning left none."""
        path = self._file_of.get(name)
        if path is None:
            return None
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()[name])
            prefix = f"{name}{SEP}"
            keys = [key for key in f.keys() if key.startswith(prefix)]  # noqa: SIM118 (safe_open is not iterable)
            tensors = {key[len(prefix):]: f.get_tensor(key) for key in keys}
        return QuantizedTensor(meta["codec"], tuple(meta["shape"]), tensors, meta["params"])
