"""A hub-ready folder from an ernieq checkpoint (``ernieq publish``) and its upload.

A published folder holds the native checkpoint as it is (``config.json`` with its
``quantization_config``, safetensors shards, tokenizer and generation files), the
model card ``README.md``, the base model's ``LICENSE`` when known, the accuracy
report under ``report/``, and ``SHA256SUMS`` (``sha256sum -c`` format) over every
other file. :func:`ernieq.publish.verify.verify_files` re-checks all of it; every failure is one
:class:`VerifyError` line naming the file (and tensor).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from ernieq.errors import ErnieqError
from ernieq.formats.native import NativeReader
from ernieq.model.checkpoint import sha256_file
from ernieq.publish.card import base_license, render_card

log = logging.getLogger(__name__)

SUMS_NAME = "SHA256SUMS"
CARD_NAME = "README.md"
LICENSE_NAME = "LICENSE"
REPORT_DIR = "report"
REPORT_FILES = ("report.json", "report.md", "report.html")
# The smoke test's text (verify): plain encyclopedic English any language model should find likely.
SMOKE_TEXT = (
    "The city is the capital of the country and its largest city. It lies on the river, which flows from the "
    "mountains in the north to the sea in the south. The city was founded in the twelfth century and grew into "
    "an important centre of trade, science and the arts. Today it is home to about two million people, several "
    "universities and many museums, and it is one of the most visited cities in the world."
)


def listed_files(folder: Path) -> list[str]:
    """Every file under ``folder`` as a POSIX relative path, sorted; SHA256SUMS itself left out."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != SUMS_NAME)


def write_sums(folder: Path) -> Path:
    """SHA256SUMS: ``<hex>  <path>`` per file, sorted by path."""
    lines = [f"{sha256_file(folder / name)}  {name}\n" for name in listed_files(folder)]
    (folder / SUMS_NAME).write_text("".join(lines))
    return folder / SUMS_NAME


def publish(qdir: Path, out: Path, *, name: str | None = None, report: dict | None = None,
            report_dir: Path | None = None, base_model: str | None = None, base_path: Path | None = None,
            overwrite: bool = False) -> Path:
    """Write the hub-ready folder of the native checkpoint ``qdir`` to ``out`` (appears only when complete).

    report: the report dict (``report.json``) whose files in ``report_dir`` are copied to ``out/report``;
    None publishes without accuracy numbers (the card says so). base_model / base_path: the base
    model's name and local folder (for its license); default: the report's baseline.
    """
    qdir, out = Path(qdir), Path(out)
    reader = NativeReader(qdir)  # fails on anything but an ernieq native checkpoint
    if out.resolve() == qdir.resolve():
        raise ErnieqError(f"{out}: publish writes a new folder; it cannot be the checkpoint {qdir}")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ErnieqError(f"{out}: exists and is not empty (use --overwrite to replace it)")
    if report is not None:
        base_model = base_model or report["model"]["baseline"]
        base_path = base_path or Path(report["model"]["baseline_path"])
    tmp = out.parent / f".{out.name}.ernieq-publish-tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        for src in sorted(qdir.iterdir()):
            if src.is_file() and not src.name.startswith(".") and src.name not in (CARD_NAME, SUMS_NAME):
                shutil.copy2(src, tmp / src.name)
        lic = base_license(base_path)
        if lic.text and not (tmp / LICENSE_NAME).exists():
            (tmp / LICENSE_NAME).write_text(lic.text)
        if lic.spdx is None and lic.text is None:
            log.warning("%s: the base model's license was not found; the card says so", base_path or "base model")
        if report is not None:
            _copy_report(Path(report_dir), tmp / REPORT_DIR)
        else:
            log.warning("publishing %s without an accuracy report (give --report DIR)", qdir)
        card = render_card(reader.config, name or out.name, report, lic, base_model)
        (tmp / CARD_NAME).write_text(card)
        write_sums(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _copy_report(src: Path, dst: Path) -> None:
    missing = [f for f in REPORT_FILES if not (src / f).is_file()]
    if missing:
        raise ErnieqError(f"{src / missing[0]}: missing from the report folder (run `ernieq report` again)")
    dst.mkdir()
    for f in REPORT_FILES:
        shutil.copy2(src / f, dst / f)
    if (src / "plots").is_dir():
        shutil.copytree(src / "plots", dst / "plots")


def push_to_hub(folder: Path, repo: str, *, private: bool = False) -> str:
    """Upload ``folder`` to the hub repository ``repo`` (created if needed); returns the commit URL.

    Offline, or refused by the hub, this fails with one line naming the repository and the cause.
    """
    try:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HTTPError  # its HTTP client's base error: refused, unreachable, 4xx/5xx
    except ImportError as err:
        raise ErnieqError(f"--push-to-hub needs huggingface_hub: pip install huggingface_hub ({err})") from None
    api = HfApi()
    try:
        api.create_repo(repo, private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo, commit_message="ernieq publish")
    except (OSError, HTTPError) as err:
        raise ErnieqError(f"push to {repo}: the Hugging Face hub is unreachable or refused the upload "
                          f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                          f"{folder} is complete, push it later") from None
    return str(getattr(info, "commit_url", info))
