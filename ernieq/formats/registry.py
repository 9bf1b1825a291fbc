"""Export formats: each turns a finished native checkpoint folder into another folder.

A format is a function ``export(native_dir, out) -> out`` registered under its
name with ``@register_format("name")``. It writes into ``out``, a fresh empty
folder; :func:`export_checkpoint` makes that folder a temporary one and renames
it into place only when the export has finished, so an interrupted or failed
export leaves nothing that looks like a valid checkpoint.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from ernieq.errors import ErnieqError

log = logging.getLogger(__name__)

ExportFn = Callable[[Path, Path], Path]
_FORMATS: dict[str, ExportFn] = {}


def register_format(name: str) -> Callable[[ExportFn], ExportFn]:
    """Function decorator: register ``export(native_dir, out) -> out`` under ``name``."""

    def wrap(fn: ExportFn) -> ExportFn:
        if name in _FORMATS:
            raise ValueError(f"export format {name!r} registered twice")
        _FORMATS[name] = fn
        return fn

    return wrap


def _load_builtin_formats() -> None:
    """Import the formats shipped with ernieq; each registers itself on import."""
    from ernieq.formats import compressed_tensors, fastdeploy, hf_fp8  # noqa: F401


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


def export_checkpoint(native_dir: str | Path, out: str | Path, fmt: str, *, overwrite: bool = False) -> Path:
    """Convert the native checkpoint ``native_dir`` into format ``fmt`` at ``out``; returns ``out``.

    ``out`` must not exist or be empty unless ``overwrite``; it is replaced only
    once the export has succeeded.
    """
    native_dir, out = Path(native_dir), Path(out)
    export = get_format(fmt)
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
        export(native_dir, tmp)
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
