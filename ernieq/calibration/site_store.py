"""Per-site calibration statistics kept on disk, read back one site at a time.

Shape legend: K input features.

A :class:`SiteStore` is the ``sites`` mapping of a :class:`CalibrationSet` whose
tensors live in safetensors files of one folder. New statistics are held in
memory until :meth:`SiteStore.flush` writes them, as one file, and keeps only
their names, token counts and K; the calibration pass flushes after every
decoder layer, so its memory follows one layer, not the model. Reading a site
(:class:`LazySiteStats`) loads its tensors from the file on every access and
keeps nothing, so quantizing reads one weight's statistics at a time.

Every file carries the run id of the folder in its metadata; a file of another
run is refused.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, MutableMapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ernieq.calibration.accumulate import SiteStats
from ernieq.errors import ErnieqError

FIELDS = ("hessian", "abs_mean", "abs_max")
FILE_PATTERN = "stats-{:05d}.safetensors"
FILE_GLOB = "stats-*.safetensors"
FORMAT = "ernieq-calibration"


class StatsError(ErnieqError, ValueError):
    """Calibration statistics that cannot be read or written: the message names the file."""


def tensor_name(site: str, field: str) -> str:
    return f"{site}::{field}"


def field_shape(field: str, k: int) -> tuple[int, ...]:
    """hessian [K, K]; abs_mean, abs_max [K]."""
    return (k, k) if field == "hessian" else (k,)


class LazySiteStats:
    """One site's statistics in a file: ``tokens`` and ``k`` at hand, each tensor read when asked for."""

    def __init__(self, store: SiteStore, site: str, file: str, tokens: int, k: int):
        self.store, self.site, self.file, self.tokens, self.k = store, site, file, tokens, k

    def _read(self, field: str) -> torch.Tensor:
        return self.store.read(self.file, tensor_name(self.site, field))

    @property
    def hessian(self) -> torch.Tensor:  # float32 [K, K]
        return self._read("hessian")

    @property
    def abs_mean(self) -> torch.Tensor:  # float32 [K]
        return self._read("abs_mean")

    @property
    def abs_max(self) -> torch.Tensor:  # float32 [K]
        return self._read("abs_max")

    def load(self) -> SiteStats:
        return SiteStats(self.hessian, self.abs_mean, self.abs_max, self.tokens)


class SiteStore(MutableMapping):
    """site name -> :class:`SiteStats` (pending, in memory) or :class:`LazySiteStats` (in a file of ``folder``)."""

    def __init__(self, folder: str | os.PathLike, run_id: str):
        self.folder = Path(folder)
        self.run_id = run_id
        self._sites: dict[str, SiteStats | LazySiteStats] = {}
        self._pending: list[str] = []
        self._handles: dict[str, object] = {}
        self.files: list[str] = []

    # -- the mapping -----------------------------------------------------------------------

    def __getitem__(self, site: str) -> SiteStats | LazySiteStats:
        return self._sites[site]

    def __setitem__(self, site: str, stats: SiteStats) -> None:
        if site not in self._pending:
            self._pending.append(site)
        self._sites[site] = stats

    def __delitem__(self, site: str) -> None:
        del self._sites[site]
        if site in self._pending:
            self._pending.remove(site)

    def __iter__(self) -> Iterator[str]:
        return iter(self._sites)

    def __len__(self) -> int:
        return len(self._sites)

    @property
    def pending(self) -> tuple[str, ...]:
        """Sites held in memory, not yet written."""
        return tuple(self._pending)

    # -- writing ------------------------------------------------------------------------------

    def flush(self) -> str | None:
        """Write the pending sites into the next file (atomically) and drop their tensors; returns its name."""
        if not self._pending:
            return None
        name = FILE_PATTERN.format(len(self.files))
        tensors = {}
        for site in self._pending:
            s = self._sites[site]
            for field in FIELDS:
                tensors[tensor_name(site, field)] = getattr(s, field).detach().to("cpu", torch.float32).contiguous()
        path, tmp = self.folder / name, self.folder / f".{name}.tmp"
        try:
            save_file(tensors, tmp, metadata={"run_id": self.run_id, "format": FORMAT})
            os.replace(tmp, path)
        except (OSError, SafetensorError) as err:
            tmp.unlink(missing_ok=True)
            raise StatsError(f"{path}: cannot write calibration statistics ({err})") from None
        for site in self._pending:
            s = self._sites[site]
            self._sites[site] = LazySiteStats(self, site, name, s.tokens, int(s.abs_mean.shape[0]))
        self._pending.clear()
        self.files.append(name)
        return name

    def file_of(self) -> dict[str, str]:
        """site -> file name, for every written site."""
        return {site: s.file for site, s in self._sites.items() if isinstance(s, LazySiteStats)}

    # -- reading ------------------------------------------------------------------------------

    def add_file(self, name: str, sites: dict[str, dict]) -> None:
        """Register file ``name`` of this folder holding ``sites`` ({site: {"tokens": n, "k": K}}); checks
        its run id and that every tensor is there with its shape, reads no tensor data."""
        path = self.folder / name
        handle = self._handle(name)
        try:
            run_id = (handle.metadata() or {}).get("run_id")
            keys = set(handle.keys())
            if run_id != self.run_id:
                raise StatsError(f"{path}: comes from another calibration run than the folder's summary")
            for site, meta in sites.items():
                for field in FIELDS:
                    key = tensor_name(site, field)
                    if key not in keys:
                        raise StatsError(f"{path}: no tensor {key!r}")
                    view = handle.get_slice(key)
                    shape, dtype = tuple(view.get_shape()), view.get_dtype()
                    if shape != field_shape(field, meta["k"]) or dtype != "F32":
                        raise StatsError(f"{path}: tensor {key!r} is {dtype} {list(shape)}, "
                                         f"expected F32 {list(field_shape(field, meta['k']))}")
                self._sites[site] = LazySiteStats(self, site, name, meta["tokens"], meta["k"])
        except SafetensorError as err:
            raise StatsError(f"{path}: {err}") from None
        self.files.append(name)

    def _handle(self, name: str):
        if name not in self._handles:
            path = self.folder / name
            try:
                self._handles[name] = safe_open(path, framework="pt")
            except (SafetensorError, OSError) as err:
                raise StatsError(f"{path}: {err}") from None
        return self._handles[name]

    def read(self, name: str, key: str) -> torch.Tensor:
        """Tensor ``key`` of file ``name``, read now (nothing is cached)."""
        try:
            return self._handle(name).get_tensor(key)
        except (SafetensorError, OSError) as err:
            raise StatsError(f"{self.folder / name}: tensor {key!r}: {err}") from None
