"""Where the demo's built folders live (``$ERNIEQ_CACHE``) and how they appear: whole or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ernieq.demo.recipe import DemoModelError

CACHE_ENV = "ERNIEQ_CACHE"
DEFAULT_CACHE = "~/.cache/ernieq"


def cache_root() -> Path:
    """``$ERNIEQ_CACHE``, default ``~/.cache/ernieq``."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


@contextlib.contextmanager
def atomic_folder(final: Path) -> Iterator[Path]:
    """A temporary sibling folder that is renamed to ``final`` when the block ends without error.

    ``final`` must not exist or be an empty folder; an interrupted block leaves nothing behind.
    """
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise DemoModelError(f"{final} already exists and is not an empty folder")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if final.is_dir():
            final.rmdir()  # empty, checked above
        try:
            tmp.rename(final)
        except OSError as err:
            raise DemoModelError(f"cannot move the finished folder to {final}: {err.strerror or err}") from err
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
