"""Where block-output tuning leaves its results until ``ernieq quantize`` writes them.

One safetensors file per decoder layer in ``folder`` (``layer-0003.safetensors``): tensor
``{weight name}::{stored tensor}``, and in the metadata, per weight name, the QuantizedTensor's
codec, shape and params as JSON, and the layer's tuning report (``__report__``); tensors stored as they
are whose values the pass changed (AWQ's fold: norms, the router) under their own names, listed in
``__plain__``. Memory follows one layer: ``get`` and ``get_plain`` read one tensor back. A calibration pass that resumes (``resume.py``) takes back the
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

import torch

from ernieq.codecs import QuantizedTensor

SEP = "::"
REPORT_KEY, PLAIN_KEY = "__report__", "__plain__"
FILE_RE = re.compile(r"layer-(\d{4,})\.safetensors")


class TunedStore:
    """Tuned QuantizedTensors by weight name, one file per layer, and the layers' reports."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._file_of: dict[str, Path] = {}
        self._plain_file_of: dict[str, Path] = {}
        self.reports: list[dict] = []

    def put(self, layer: int, tensors: dict[str, QuantizedTensor], report=None,
            plain: dict[str, torch.Tensor] | None = None) -> None:
        """Store layer ``layer``'s kept tensors (``report``: its ``tune.LayerReport``) and the ``plain`` ones
        (stored as they are) whose values changed."""
        path = self.folder / f"layer-{layer:04d}.safetensors"
        plain = plain or {}
        flat = {f"{name}{SEP}{key}": t.contiguous() for name, q in tensors.items() for key, t in q.tensors.items()}
        flat.update({name: t.contiguous() for name, t in plain.items()})
        meta = {name: json.dumps({"codec": q.codec, "shape": list(q.shape), "params": q.params})
                for name, q in tensors.items()}
        meta[PLAIN_KEY] = json.dumps(sorted(plain))
        if report is not None:
            meta[REPORT_KEY] = json.dumps(asdict(report))
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(flat, str(tmp), metadata=meta)
        os.replace(tmp, path)
        self._add(path, meta)

    def _add(self, path: Path, meta: dict[str, str]) -> None:
        for name in meta:
            if name not in (REPORT_KEY, PLAIN_KEY):
                self._file_of[name] = path
        self._plain_file_of.update({name: path for name in json.loads(meta.get(PLAIN_KEY, "[]"))})
        if REPORT_KEY in meta:
            self.reports.append(json.loads(meta[REPORT_KEY]))

    def restore(self, layers: int) -> None:
        """Hold exactly the first ``layers`` decoder layers' files (those an earlier run finished, read back);
        any other file goes."""
        self._file_of.clear()
        self._plain_file_of.clear()
        self.reports.clear()
        for path in sorted(self.folder.glob("layer-*.safetensors")):
            match = FILE_RE.fullmatch(path.name)
            if match is None or int(match.group(1)) >= layers:
                path.unlink()
                continue
            with safe_open(str(path), framework="pt") as f:
                self._add(path, f.metadata() or {})

    def __call__(self, layer: int, tensors: dict[str, QuantizedTensor], report=None,
                 plain: dict[str, torch.Tensor] | None = None) -> None:
        self.put(layer, tensors, report, plain)

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

    def get_plain(self, name: str) -> torch.Tensor | None:
        """The new value of tensor ``name``, stored as it is (host memory), or None when the pass left it."""
        path = self._plain_file_of.get(name)
        if path is None:
            return None
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(name)
