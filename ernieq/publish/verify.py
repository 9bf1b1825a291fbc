"""``ernieq verify``: a published folder checked file by file and tensor by tensor.

Every failure is one :class:`VerifyError` line naming the file (and tensor); the
one-window perplexity smoke test is ``ernieq.api.verify``'s (it loads the model).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ernieq.codecs import CodecError, QuantizedTensor, decode
from ernieq.errors import ErnieqError
from ernieq.formats.native import NativeReader
from ernieq.model.adapters import adapter_for
from ernieq.model.checkpoint import CheckpointError, read_json
from ernieq.model.checkpoint import sha256_file
from ernieq.publish.folder import SUMS_NAME, listed_files


class VerifyError(ErnieqError, ValueError):
    """A published folder that does not check out: the message names the file (and tensor)."""


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
    extra = [name for name in listed_files(folder) if name not in listed]
    if extra:
        raise VerifyError(f"{folder / extra[0]}: not listed in {SUMS_NAME} ({len(extra)} unlisted file(s))")
    return len(listed)


def check_tensors(folder: Path) -> tuple[int, int]:
    """Open every tensor; every quantized module's stored tensors fit its codec's layout for the shape
    in ``quantization_config``, and every logical shape fits the model the config describes."""
    reader = NativeReader(folder)
    ckpt = reader.reader
    for name in ckpt.keys():
        ckpt.get(name)  # reads the data: a short or unreadable tensor fails here, naming the file
    adapter = adapter_for(reader.config, str(folder / "config.json"))
    owned = set()
    for base, spec in sorted(reader.modules.items()):
        q = reader.quantized(base)  # CheckpointError (naming the folder) when nothing is stored
        first = sorted(f"{base}.{k}" for k in q.tensors)[0]
        file = ckpt.file_of(first)
        owned |= {f"{base}.{k}" for k in q.tensors}
        _check_module(q, base, file)
        want = adapter.expected_shape(f"{base}.weight")
        if want is None or tuple(want) != tuple(spec.shape):
            raise VerifyError(f"{folder / 'config.json'}: module {base}: quantization_config shape {list(spec.shape)}"
                              f" but the model config implies {list(want) if want else 'no such weight'}")
    for name in reader.plain_names():
        want = adapter.expected_shape(name)
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
