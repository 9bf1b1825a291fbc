"""What produced a result: the command, package versions, the commit, the machine and the time.

Every figure ernieq writes (reports, ``ernieq bench``, the scripts under ``benchmarks/``) records
these from here.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import ernieq
from ernieq.device import cpu_name

PACKAGES = ("torch", "transformers", "safetensors", "triton", "compressed-tensors", "numpy", "matplotlib",
            "lm-eval")


def package_versions() -> dict[str, str]:
    """Installed version of every package a report's numbers depend on ("not installed" when absent)."""
    versions = {"ernieq": ernieq.__version__, "python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit(where: Path | None = None, short: bool = False) -> str:
    """``git rev-parse HEAD`` of the source tree ernieq runs from (plus ``-dirty`` when it has
    uncommitted changes), or ``unknown`` outside a git checkout."""
    where = where or Path(ernieq.__file__).resolve().parent
    try:
        cmd = ["git", "rev-parse", *(["--short"] if short else []), "HEAD"]
        head = subprocess.run(cmd, cwd=where, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def machine() -> str:
    """The CPU model, cores and memory, and the first CUDA GPU's name when there is one."""
    text = f"{cpu_name()}, {os.cpu_count()} cores"
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        text += f", {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB"
    import torch

    if torch.cuda.is_available():
        text += f"; GPU {torch.cuda.get_device_name(0)}"
    return text


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def provenance(started: str) -> dict:
    """The command line as typed (``sys.argv``), versions, commit, machine and start/finish times."""
    return {
        "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "",
        "argv": list(sys.argv),
        "versions": package_versions(),
        "commit": git_commit(),
        "machine": machine(),
        "started": started,
        "finished": now_iso(),
    }
