"""What produced a result: the command, package versions, the commit and the time."""

from __future__ import annotations

import importlib.metadata
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import ernieq

PACKAGES = ("torch", "transformers", "safetensors", "triton", "compressed-tensors", "numpy", "matplotlib")


def package_versions() -> dict[str, str]:
    """Installed version of every package a report's numbers depend on ("not installed" when absent)."""
    versions = {"ernieq": ernieq.__version__, "python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit(where: Path | None = None) -> str:
    """``git rev-parse HEAD`` of the source tree ernieq runs from (plus ``-dirty`` when it has
    uncommitted changes), or ``unknown`` outside a git checkout."""
    where = where or Path(ernieq.__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def provenance(started: str) -> dict:
    """The command line as typed (``sys.argv``), versions, commit, machine and start/finish times."""
    return {
        "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "",
        "argv": list(sys.argv),
        "versions": package_versions(),
        "commit": git_commit(),
        "machine": f"{platform.system()} {platform.machine()}",
        "started": started,
        "finished": now_iso(),
    }
