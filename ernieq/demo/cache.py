"""Where the demo's built folders live (``$ERNIEQ_CACHE``), how they appear (whole or not at all), and how
a built one is handed out to a folder of the user's."""

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


def _link_or_copy(src: str, dst: str) -> None:
    """A hard link for a weight shard (nothing rewrites one in place, and the demo's is most of a
    gigabyte), a copy for every other file, so editing the copy's ``config.json`` (an editor may
    write through a link) never changes the cached model; a copy too across file systems."""
    if src.endswith(".safetensors"):
        with contextlib.suppress(OSError):
            return os.link(src, dst)
    shutil.copy2(src, dst)


def copy_folder(src: Path, out: Path) -> Path:
    """``src`` (a built checkpoint folder) to ``out`` (empty or absent), whole or not at all, in seconds."""
    with atomic_folder(out) as tmp:
        shutil.copytree(src, tmp, copy_function=_link_or_copy, dirs_exist_ok=True)
    return out
