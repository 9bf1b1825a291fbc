"""Formats: exporters turn a finished native checkpoint folder into another folder; readers
present a quantized folder of some format as ernieq's runtime needs it.

A format is a function ``export(native_dir, out, **options) -> out`` registered
under its name with ``@register_format("name", options=(...))``, naming the
keyword options it takes (FastDeploy's ``tp``). It writes into ``out``, a fresh empty
folder; :func:`export_checkpoint` makes that folder a temporary one and renames
it into place only when the export has finished, so an interrupted or failed
export leaves nothing that looks like a valid checkpoint.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch

from ernieq.errors import ErnieqError

log = logging.getLogger(__name__)

ExportFn = Callable[..., Path]
_FORMATS: dict[str, ExportFn] = {}
_OPTIONS: dict[str, tuple[str, ...]] = {}


def register_format(name: str, options: tuple[str, ...] = ()) -> Callable[[ExportFn], ExportFn]:
    """Function decorator: register ``export(native_dir, out, **options) -> out`` under ``name``;
    ``options``: the keyword options it takes."""

    def wrap(fn: ExportFn) -> ExportFn:
        if name in _FORMATS:
            raise ValueError(f"export format {name!r} registered twice")
        _FORMATS[name] = fn
        _OPTIONS[name] = tuple(options)
        return fn

    return wrap


def check_options(fmt: str, options: dict) -> None:
    """Fail unless the export format ``fmt`` takes every option in ``options``."""
    get_format(fmt)
    unknown = sorted(set(options) - set(_OPTIONS[fmt]))
    if unknown:
        takers = sorted(f for f, names in _OPTIONS.items() if unknown[0] in names)
        raise ErnieqError(f"--{unknown[0]} applies to the {' or '.join(takers) or 'no'} format, not {fmt}")


def _load_builtin_formats() -> None:
    """Import the formats shipped with ernieq; each registers itself on import."""
    from ernieq.formats import (  # noqa: F401
        compressed_tensors,
        fastdeploy,
        fastdeploy_read,
        hf_fp8,
        native,
    )


def format_names() -> list[str]:
    _load_builtin_formats()
    return sorted(_FORMATS)


def get_format(name: str) -> ExportFn:
    _load_builtin_formats()
    if name not in _FORMATS:
        raise ErnieqError(f"unknown export format {name!r}; known: {', '.join(sorted(_FORMATS))}")
    return _FORMATS[name]


def _check_no_rotations(native_dir: Path, fmt: str) -> None:
    """Export formats hold weights only: an online input rotation has no place in them."""
    from ernieq.formats.native import read_config

    modules = (read_config(native_dir).get("quantization_config") or {}).get("modules") or {}
    turned = [base for base, spec in modules.items() if isinstance(spec, dict) and spec.get("rotation")]
    if turned:
        raise ErnieqError(
            f"{native_dir}: {len(turned)} modules (e.g. {turned[0]}) are stored with an online input rotation, "
            f"which the {fmt} format cannot carry; quantize with --no-rotate for {fmt}"
        )


def export_checkpoint(native_dir: str | Path, out: str | Path, fmt: str, *, overwrite: bool = False,
                      options: dict | None = None) -> Path:
    """Convert the native checkpoint ``native_dir`` into format ``fmt`` at ``out``; returns ``out``.

    ``out`` must not exist or be empty unless ``overwrite``; it is replaced only
    once the export has succeeded. ``options``: the format's keyword options.
    """
    native_dir, out = Path(native_dir), Path(out)
    options = dict(options or {})
    export = get_format(fmt)
    check_options(fmt, options)
    if not native_dir.is_dir():
        raise ErnieqError(f"{native_dir}: no such checkpoint folder")
    if out.resolve() == native_dir.resolve():
        raise ErnieqError(f"{out}: the export cannot replace the checkpoint it reads")
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise ErnieqError(f"{out}: output exists and is not empty (use --overwrite to replace it)")
    _check_no_rotations(native_dir, fmt)
    tmp = out.parent / f".{out.name}.ernieq-export-tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        export(native_dir, tmp, **options)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.is_dir():
        shutil.rmtree(out)
    elif out.exists():
        out.unlink()
    tmp.rename(out)
    log.debug("exported %s as %s to %s", native_dir, fmt, out)  # the CLI prints the result line
    return out


# ---------------------------------------------------------------- readers


class QuantizedCheckpoint(Protocol):
    """A quantized checkpoint folder as ernieq's runtime, eval and reports read it, whatever its format.

    Names are ernieq's native ones (``model.layers.3.self_attn.q_proj``): ``modules`` maps every
    quantized module to its ``ModuleSpec`` (codec, params, logical shape (N, K)); ``quantized(base)``
    is its ``QuantizedTensor`` in the codec's own layout; everything else is a plain tensor.
    """

    path: Path
    config: dict  # the model's config (no quantization_config): what transformers builds the model from
    quant_info: dict  # how it was quantized: recipe, method, calibration (what a report shows)
    modules: dict

    def quantized(self, base: str): ...

    def rotation(self, base: str): ...

    def plain_names(self) -> list[str]: ...

    def plain(self, name: str) -> torch.Tensor: ...

    def summary(self): ...

    def release(self) -> None:
        """Unmap the files read so far (``CheckpointReader.release``)."""


OpenFn = Callable[[Path], QuantizedCheckpoint]
DetectFn = Callable[[dict], bool]
_READERS: dict[str, tuple[DetectFn, OpenFn]] = {}


def register_reader(name: str, detect: DetectFn) -> Callable[[OpenFn], OpenFn]:
    """Decorator: register ``open(path) -> QuantizedCheckpoint`` for the format ``name``; ``detect(config)``
    says from a folder's ``config.json`` whether it is one."""

    def wrap(fn: OpenFn) -> OpenFn:
        if name in _READERS:
            raise ValueError(f"checkpoint reader {name!r} registered twice")
        _READERS[name] = (detect, fn)
        return fn

    return wrap


def quantized_format(path: str | Path) -> str | None:
    """The format of the quantized checkpoint folder ``path`` by its ``config.json``; None for a plain one."""
    from ernieq.model.checkpoint import read_json

    _load_builtin_formats()
    config = read_json(Path(path) / "config.json")
    found = [name for name, (detect, _) in _READERS.items() if detect(config)]
    return found[0] if found else None


def open_quantized(path: str | Path) -> QuantizedCheckpoint:
    """The reader of the quantized checkpoint folder ``path``, whatever its format."""
    fmt = quantized_format(path)
    if fmt is None:
        raise ErnieqError(f"{Path(path) / 'config.json'}: not a quantized checkpoint ernieq reads "
                          f"(formats: {', '.join(sorted(_READERS))})")
    return _READERS[fmt][1](Path(path))


def checkpoint_summary(path: str | Path, recipe=None):
    """``ernieq.model.summary``'s summary of any checkpoint folder: plain, native or another format's;
    ``recipe`` (a ``RecipeView``) is what a plain checkpoint is accounted by (a quantized one was
    quantized by its own)."""
    from ernieq.model.checkpoint import CheckpointReader
    from ernieq.model.summary import summarize

    if quantized_format(path) is None:
        return summarize(CheckpointReader(path), recipe)
    return open_quantized(path).summary()
