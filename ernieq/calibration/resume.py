"""Resuming the calibration pass where it stopped: a killed ``calibrate --out`` or sequential ``quantize``
keeps the decoder layers it finished.

Shape legend: B sequences per batch, L sequence length, H hidden size.

The pass writes its statistics folder one decoder layer at a time (``stats.py``). After each layer it
also saves there what the next layer needs, so that the same command started again continues after
the last layer saved and writes the same bytes as a run never stopped:

- ``.resume-rank-R-P.safetensors`` (every rank; P, the layer's parity): the hidden states entering the
  next layer, this rank's share, batch by batch as the pass holds them (``hidden.J`` [B, L, H]), and
  with tuning against the model's own states the unquantized stream beside them (``plain.J``);
- ``.resume.json`` (rank 0, once every rank has saved its file): the run's fingerprint, the last
  layer done, and everything but the tensors of the statistics so far (routes, expert table,
  routers, which file holds each site). Each layer's tuned tensors are in the tuning's own folder
  (``tuned_store.py``), one file per layer.

Two parities keep the states ``.resume.json`` names intact while the next layer's are written. A
finished pass drops the states and marks ``.resume.json`` done: the same command run again (a
``quantize`` killed while it wrote the checkpoint) reads the statistics instead of computing them. A
different fingerprint (another model or source files, other tokens, settings, dtype, device kind or
number of ranks) starts the pass over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import ernieq
from ernieq import distributed
from ernieq.killpoints import kill_point

log = logging.getLogger(__name__)

STATE_NAME = ".resume.json"
STATES_PATTERN = ".resume-rank-{rank}-{parity}.safetensors"
RESUME_VERSION = 1  # bump when the pass's bytes change, so that old folders are not resumed


def fingerprint(model_path, token_ids: torch.Tensor, **settings) -> dict:
    """What makes the pass's bytes: ernieq's version, the model's files (name, size, mtime), the tokens
    (sha256 of all of them), the number of ranks and ``settings`` (batch, dtype, device kind, plan...)."""
    folder = Path(model_path)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors"))
    tokens = hashlib.sha256(token_ids.contiguous().cpu().numpy().tobytes()).hexdigest()
    return json.loads(json.dumps({
        "resume_version": RESUME_VERSION, "ernieq": ernieq.__version__,
        "model": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files],
        "tokens": [list(token_ids.shape), tokens], "ranks": distributed.world().size, **settings,
    }, sort_keys=True, default=str))


@dataclass
class Saved:
    """Where a stopped pass is: the next layer to run, the statistics of the finished layers (``state``:
    what ``CalibrationSet.summary`` gives, with the statistics files and run id), and this rank's
    hidden states entering the next layer (None once the pass is done)."""

    next_layer: int
    state: dict
    hidden: list[torch.Tensor] | None = None
    plain: list[torch.Tensor] | None = None

    @property
    def done(self) -> bool:
        return self.hidden is None


class PassCheckpoint:
    """The pass's resume files in its statistics folder (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike, fingerprint: dict):
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self.rank = distributed.world().rank

    def _states(self, layer: int) -> Path:
        return self.folder / STATES_PATTERN.format(rank=self.rank, parity=layer % 2)

    def load(self) -> Saved | None:
        """What an earlier run with the same fingerprint left, the same on every rank (None where any rank
        lacks its part: the pass starts over)."""
        saved = self._read()
        ok = torch.tensor([1 if saved is not None else 0])
        distributed.all_reduce([ok], op="min", what="checking what an earlier run left")
        return saved if ok.item() else None

    def _read(self) -> Saved | None:
        try:
            meta = json.loads((self.folder / STATE_NAME).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(meta, dict) or meta.get("fingerprint") != self.fingerprint:
            if isinstance(meta, dict):
                log.info("%s: left by a run with other inputs or settings; the pass starts over", self.folder)
            return None
        layer, state = meta.get("layer"), meta.get("state")
        if not isinstance(layer, int) or not isinstance(state, dict):
            return None
        if meta.get("done"):
            return Saved(layer + 1, state)
        streams: dict[str, dict[int, torch.Tensor]] = {}
        try:
            with safe_open(str(self._states(layer)), framework="pt") as f:
                if (f.metadata() or {}).get("layer") != str(layer):
                    return None
                for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    stream, _, j = key.partition(".")
                    streams.setdefault(stream, {})[int(j)] = f.get_tensor(key)
        except (OSError, SafetensorError, ValueError):
            return None
        if "hidden" not in streams:
            return None
        hidden, plain = ([s[j] for j in sorted(s)] for s in (streams["hidden"], streams.get("plain", {})))
        return Saved(layer + 1, state, hidden, plain or None)

    def save(self, layer: int, state: dict, hidden: list[torch.Tensor], plain: list[torch.Tensor] | None) -> None:
        """Layer ``layer`` is done: this rank's states entering the next layer, then (rank 0, after every rank's)
        the layer and ``state``."""
        tensors = {f"hidden.{j}": h.detach().to("cpu").contiguous() for j, h in enumerate(hidden)}
        tensors.update({f"plain.{j}": h.detach().to("cpu").contiguous() for j, h in enumerate(plain or [])})
        path = self._states(layer)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"layer": str(layer)})
        os.replace(tmp, path)
        kill_point("calibration-states")
        distributed.barrier("saving the hidden states")
        if distributed.world().main:
            self._write_meta(layer, state, done=False)
        distributed.barrier("saving the calibration's progress")
        kill_point("calibration-layer")

    def finish(self, layer: int, state: dict) -> None:
        """The pass is done (its summary written): keep only the mark that says so."""
        if distributed.world().main:
            self._write_meta(layer, state, done=True)
        distributed.barrier("marking the calibration done")
        for parity in (0, 1):
            self._states(parity).unlink(missing_ok=True)

    def _write_meta(self, layer: int, state: dict, done: bool) -> None:
        tmp = self.folder / f"{STATE_NAME}.tmp"
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "layer": layer, "done": done, "state": state},
                                  sort_keys=True) + "\n")
        os.replace(tmp, self.folder / STATE_NAME)


def clear(folder: str | os.PathLike) -> None:
    """Remove every resume file of ``folder`` (a pass that starts over)."""
    folder = Path(folder)
    (folder / STATE_NAME).unlink(missing_ok=True)
    for path in folder.glob(".resume-rank-*"):
        path.unlink(missing_ok=True)
