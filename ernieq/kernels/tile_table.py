"""Tuned tile configurations kept in the repo, keyed by GPU name, kernel, codec and shape.

Shape legend: M rows of x (tokens; token-expert pairs T * A for the fused MoE),
N output features, K input features (MoE: N = I, K = H of the gate/up GEMM).

The table is a JSON file (``ernieq/kernels/tile_configs.json``, or the file named
by ``$ERNIEQ_TILE_CONFIGS``) with one entry per key::

    {"kernel": "linear", "gpu": "NVIDIA H200", "codec": "wint4", "m_bucket": 16, "n": 2560, "k": 2560,
     "config": {"block_m": 16, "block_n": 64, ...}, "us": 11.9, "default_us": 14.2, "source": "..."}

``m_bucket`` is the smallest power of two >= M, so one entry serves M in
(m_bucket / 2, m_bucket]. ``ernieq bench --sweep --save-configs`` writes entries
(the fastest configuration it measured); the launchers look a key up here
before falling back to the heuristics of ``ernieq.kernels.configs``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path

from ernieq.kernels.args import KernelError

TABLE_ENV = "ERNIEQ_TILE_CONFIGS"
DEFAULT_TABLE = Path(__file__).with_name("tile_configs.json")
_DEFAULT_TEXT = str(DEFAULT_TABLE)
TABLE_VERSION = 1
KERNELS = ("linear", "moe")

Key = tuple[str, str, str, int, int, int]  # (kernel, gpu, codec, m_bucket, n, k)


def table_path() -> Path:
    """$ERNIEQ_TILE_CONFIGS when set, else the table shipped beside this module."""
    return Path(os.environ.get(TABLE_ENV) or DEFAULT_TABLE)


def m_bucket(m: int) -> int:
    """The smallest power of two >= m (1 for m <= 1)."""
    return 1 << max(m - 1, 0).bit_length()


def entry_key(entry: dict) -> Key:
    return (entry["kernel"], entry["gpu"], entry["codec"], int(entry["m_bucket"]), int(entry["n"]), int(entry["k"]))


def read_table(path: Path) -> list[dict]:
    """The entries of the table at ``path`` ([] when the file does not exist); fails loudly on a bad file."""
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise KernelError(f"{path}: tile configuration table is not valid JSON: {err}") from err
    if not isinstance(data, dict) or data.get("version") != TABLE_VERSION or not isinstance(data.get("entries"), list):
        raise KernelError(f"{path}: expected {{'version': {TABLE_VERSION}, 'entries': [...]}}")
    for i, entry in enumerate(data["entries"]):
        missing = {"kernel", "gpu", "codec", "m_bucket", "n", "k", "config"} - set(entry)
        if missing or entry["kernel"] not in KERNELS:
            raise KernelError(f"{path}: entry {i} lacks {sorted(missing)} or has an unknown kernel: {entry}")
    return data["entries"]


@functools.lru_cache(maxsize=4)
def _loaded(path_text: str) -> dict[Key, "TileConfig"]:  # noqa: F821
    """The table at ``path_text`` as TileConfigs, read once per process (``save_entries`` clears the cache)."""
    from ernieq.kernels.configs import TileConfig

    path = Path(path_text)
    table = {}
    for entry in read_table(path):
        try:
            table[entry_key(entry)] = TileConfig(**entry["config"])
        except (TypeError, ValueError) as err:
            raise KernelError(f"{path}: bad tile config in entry {entry_key(entry)}: {err}") from err
    return table


def lookup(kernel: str, gpu: str, codec: str, m: int, n: int, k: int, path: Path | None = None):
    """The stored ``TileConfig`` for this key, or None. Called on every launch: a string and a dict lookup."""
    path_text = str(path) if path else (os.environ.get(TABLE_ENV) or _DEFAULT_TEXT)
    return _loaded(path_text).get((kernel, gpu, codec, m_bucket(m), n, k))


def make_entry(kernel: str, gpu: str, codec: str, m: int, n: int, k: int, config, **extra) -> dict:
    """A table entry for a measured configuration; ``extra`` adds fields such as us, default_us, source."""
    if kernel not in KERNELS:
        raise KernelError(f"tile table: unknown kernel {kernel!r}; known: {KERNELS}")
    return {"kernel": kernel, "gpu": gpu, "codec": codec, "m_bucket": m_bucket(m), "n": n, "k": k,
            "config": dataclasses.asdict(config), **extra}  # fmt: skip


def save_entries(entries: list[dict], path: Path | None = None) -> Path:
    """Merge ``entries`` into the table (same key: the new entry wins), sorted; written atomically."""
    path = path or table_path()
    merged = {entry_key(e): e for e in read_table(path)}
    merged.update({entry_key(e): e for e in entries})
    text = json.dumps({"version": TABLE_VERSION, "entries": [merged[k] for k in sorted(merged)]}, indent=1)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n")
    tmp.replace(path)
    _loaded.cache_clear()
    return path
