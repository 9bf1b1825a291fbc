"""A hub-ready folder from an ernieq checkpoint (``ernieq publish``), its check (``ernieq verify``), its upload.

A published folder holds the native checkpoint as it is (``config.json`` with its
``quantization_config``, safetensors shards, tokenizer and generation files), the
model card ``README.md``, the base model's ``LICENSE`` when known, the accuracy
report under ``report/``, and ``SHA256SUMS`` (``sha256sum -c`` format) over every
other file. :func:`verify_files` re-checks all of it; every failure is one
:class:`VerifyError` line naming the file (and tensor).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ernieq.codecs import CodecError, QuantizedTensor, decode
from ernieq.errors import ErnieqError
from ernieq.formats.model_card import base_license, render_card
from ernieq.formats.native import NativeReader
from ernieq.model.adapters import adapter_for, hf_config
from ernieq.model.checkpoint import CheckpointError, read_json, sha256_file

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


class VerifyError(ErnieqError, ValueError):
    """A published folder that does not check out: the message names the file (and tensor)."""


def _files(folder: Path) -> list[str]:
    """Every file under ``folder`` as a POSIX relative path, sorted; SHA256SUMS itself left out."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != SUMS_NAME)


def write_sums(folder: Path) -> Path:
    """SHA256SUMS: ``<hex>  <path>`` per file, sorted by path."""
    lines = [f"{sha256_file(folder / name)}  {name}\n" for name in _files(folder)]
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


@dataclass(frozen=True)
class VerifyResult:
    files: int
    tensors: int
    modules: int


def check_sums(folder: Path) -> int:
    """Every file listed in SHA256SUMS exists and has its sum; no file is missing from the list."""
    sums = folder / SUMS_NAME
    if not sums.is_file():
        raise VerifyError(f"{sums}: missing")
    listed: dict[str, str] = {}
    for lineno, line in enumerate(sums.read_text().splitlines(), start=1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or not name:
            raise VerifyError(f"{sums}:{lineno}: not a '<sha256>  <file>' line")
        listed[name] = digest
    for name, digest in listed.items():
        path = folder / name
        if not path.is_file():
            raise VerifyError(f"{path}: listed in {SUMS_NAME} but missing")
        if sha256_file(path) != digest:
            raise VerifyError(f"{path}: SHA-256 differs from {SUMS_NAME} (the file changed or is corrupt)")
    extra = [name for name in _files(folder) if name not in listed]
    if extra:
        raise VerifyError(f"{folder / extra[0]}: not listed in {SUMS_NAME} ({len(extra)} unlisted file(s))")
    return len(listed)


def _expected_shapes(config: dict, where: Path) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the model ``config`` describes (transformers names), from a meta-device build."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(config, str(where)))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _logical_shape(hf_name: str, expected: dict[str, tuple[int, ...]]) -> tuple[int, ...] | None:
    """The [N, K] a weight of transformers name ``hf_name`` must have; per-expert names map onto
    the fused ``experts.gate_up_proj [E, 2I, H]`` / ``experts.down_proj [E, H, I]``."""
    if hf_name in expected:
        return expected[hf_name]
    prefix, _, rest = hf_name.partition(".experts.")
    expert, _, proj = rest.partition(".")
    fused = {"gate_proj.weight": "gate_up_proj", "up_proj.weight": "gate_up_proj", "down_proj.weight": "down_proj"}
    if not expert.isdigit() or proj not in fused or f"{prefix}.experts.{fused[proj]}" not in expected:
        return None
    e, n, k = expected[f"{prefix}.experts.{fused[proj]}"]
    if int(expert) >= e:
        return None
    return (n // 2, k) if fused[proj] == "gate_up_proj" else (n, k)


def check_tensors(folder: Path) -> tuple[int, int]:
    """Open every tensor; every quantized module's stored tensors fit its codec's layout for the shape
    in ``quantization_config``, and every logical shape fits the model the config describes."""
    reader = NativeReader(folder)
    ckpt = reader.reader
    for name in ckpt.keys():
        ckpt.get(name)  # reads the data: a short or unreadable tensor fails here, naming the file
    adapter = adapter_for(reader.config, str(folder / "config.json"))
    expected = _expected_shapes(reader.config, folder / "config.json")
    owned = set()
    for base, spec in sorted(reader.modules.items()):
        q = reader.quantized(base)  # CheckpointError (naming the folder) when nothing is stored
        first = sorted(f"{base}.{k}" for k in q.tensors)[0]
        file = ckpt.file_of(first)
        owned |= {f"{base}.{k}" for k in q.tensors}
        _check_module(q, base, file)
        want = _logical_shape(adapter.to_hf_name(f"{base}.weight"), expected)
        if want is None or tuple(want) != tuple(spec.shape):
            raise VerifyError(f"{folder / 'config.json'}: module {base}: quantization_config shape {list(spec.shape)}"
                              f" but the model config implies {list(want) if want else 'no such weight'}")
    for name in reader.plain_names():
        want = _logical_shape(adapter.to_hf_name(name), expected)
        got = ckpt.shape(name)
        if want is not None and tuple(want) != tuple(got):
            raise VerifyError(f"{ckpt.file_of(name)}: tensor {name}: shape {list(got)}, the config implies {list(want)}")
    return len(ckpt.keys()), len(reader.modules)


def _check_module(q: QuantizedTensor, base: str, file: Path) -> None:
    """The codec's own layout check (``decode`` checks shapes and dtypes first), and finite values."""
    try:
        w_hat = decode(q)
    except CodecError as err:
        raise VerifyError(f"{file}: module {base}: {err}") from None
    if not torch.isfinite(w_hat).all():
        raise VerifyError(f"{file}: module {base}: decodes to non-finite values")


def verify_files(folder: Path) -> VerifyResult:
    """SHA256SUMS, every tensor, every shape and dtype; the perplexity smoke test is the caller's."""
    folder = Path(folder)
    if not folder.is_dir():
        raise VerifyError(f"{folder}: no such folder")
    files = check_sums(folder)
    try:
        read_json(folder / "config.json")
        tensors, modules = check_tensors(folder)
    except CheckpointError as err:
        raise VerifyError(str(err)) from None
    return VerifyResult(files, tensors, modules)


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
