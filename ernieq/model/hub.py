"""Hugging Face hub ids as models: ``org/name`` or ``org/name@revision`` → a local snapshot folder.

Only what ernieq reads is fetched (config, safetensors shards and index, tokenizer and
generation files), never ``.bin``/``.pt``/pickles, through ``huggingface_hub.snapshot_download``,
which keeps it in the local hub cache (``$HF_HUB_CACHE``, default ``~/.cache/huggingface/hub``).
With ``HF_HUB_OFFLINE=1``, or when the hub cannot be reached, the cached snapshot is used;
with neither, the error names the id and how to fetch it beforehand.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from ernieq.model.checkpoint import CheckpointError

log = logging.getLogger(__name__)

# what a checkpoint folder needs, and nothing that could be unpickled
ALLOW_PATTERNS = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "LICENSE*",
    "README.md",
)
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")


def parse_hub_id(model: str) -> tuple[str, str | None] | None:
    """('org/name', revision or None) when ``model`` reads as a hub id, else None."""
    m = _HUB_ID.match(model)
    return (m["repo"], m["revision"]) if m else None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_snapshot(repo: str, revision: str | None = None) -> Path:
    """The local folder of hub model ``repo`` at ``revision`` (default: main), downloaded when online and
    taken from the hub cache when offline; a CheckpointError naming the id when it is in neither."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    def fetch(local_only: bool) -> Path:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=list(ALLOW_PATTERNS),
                                      local_files_only=local_only))

    name = repo + (f"@{revision}" if revision else "")
    if not _offline():
        try:
            return fetch(local_only=False)
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as err:
            log.info("%s: the hub is not reachable (%s); looking in the local hub cache", name, type(err).__name__)
    try:
        path = fetch(local_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        include = " ".join(f"--include '{p}'" for p in ("*.json", "*.safetensors", "tokenizer*"))
        raise CheckpointError(
            f"{name}: not a local folder, and not in the local hub cache while offline; download it first "
            f"where the hub is reachable (`huggingface-cli download {repo}{f' --revision {revision}' if revision else ''}"
            f" {include}`, same HF_HUB_CACHE) or give a local folder") from None
    log.info("%s: using the cached snapshot %s", name, path)
    return path
