"""Bad input, one case each: a one-line error naming the file (and tensor), a non-zero exit code,
and nothing at OUT that looks like a finished checkpoint. And no code runs from a checkpoint.

Every case runs the console entry point in this process (``ernieq.cli.main``), so a full
or read-only disk can be simulated by patching the one OS call that fails.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ernieq import api, progress
from tests.test_cli import run as run_cli
from tests.tiny import write_tiny_ernie

PACKAGE = Path(__file__).resolve().parents[1] / "ernieq"
EXPERT = "model.layers.2.mlp.experts.1.up_proj.weight"
Q_PROJ = "model.layers.1.self_attn.q_proj.weight"
PROGRESS_LINE = re.compile(r", \d+:\d\d:\d\d elapsed, eta ")  # ernieq.progress.PlainProgress's lines
QUANTIZE = ("quantize", "--workers", "1")  # encode in this process: no worker start-up per case


def run(monkeypatch, capsys, *args) -> tuple[int, list[str]]:
    """The console entry point on ``args``; returns (exit code, the non-empty lines on stderr that are not
    piped progress lines: those come only when a bar finishes here, no timed ones)."""
    monkeypatch.setattr(progress, "PLAIN_INTERVAL_S", 1e9)
    code, _, err = run_cli(monkeypatch, capsys, *args)
    return code, [line for line in err.splitlines() if line.strip() and not PROGRESS_LINE.search(line)]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return write_tiny_ernie(tmp_path_factory.mktemp("tiny") / "m")


@pytest.fixture
def model(pristine, tmp_path) -> Path:
    """A fresh copy of the tiny checkpoint (per-expert layout, several shards), free to break."""
    return Path(shutil.copytree(pristine, tmp_path / "model"))


def _shard_of(folder: Path, name: str) -> Path:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return folder / index["weight_map"][name]


def _replace_tensor(folder: Path, name: str, tensor: torch.Tensor) -> Path:
    """Rewrite the shard holding ``name`` with ``tensor`` in its place; returns the shard."""
    shard = _shard_of(folder, name)
    with safe_open(shard, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    tensors[name] = tensor
    save_file(tensors, shard, metadata=meta)
    return shard


def assert_clean_failure(code: int, lines: list[str], out: Path, *needles: str, exit_code: int = 1) -> None:
    assert code == exit_code, lines
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not (out / "config.json").exists()
    assert not out.exists(), sorted(p.name for p in out.iterdir())
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert not leftovers, leftovers


def test_truncated_safetensors_header(model, tmp_path, monkeypatch, capsys):
    shard = _shard_of(model, Q_PROJ)
    blob = shard.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    shard.write_bytes(blob[: 8 + n // 2])  # cut inside the JSON header
    code, lines = run(monkeypatch, capsys, *QUANTIZE, model, "--out", tmp_path / "out", "--bits", "8")
    assert_clean_failure(code, lines, tmp_path / "out", shard.name, "truncated")


def test_corrupt_safetensors_header(model, tmp_path, monkeypatch, capsys):
    shard = _shard_of(model, Q_PROJ)
    blob = bytearray(shard.read_bytes())
    blob[8:12] = b"@@@@"  # the header's opening brace and first characters
    shard.write_bytes(bytes(blob))
    code, lines = run(monkeypatch, capsys, *QUANTIZE, model, "--out", tmp_path / "out", "--bits", "8")
    assert_clean_failure(code, lines, tmp_path / "out", shard.name, "corrupt safetensors header")


def test_header_offsets_that_disagree_with_the_shape(model, tmp_path, monkeypatch, capsys):
    shard = _shard_of(model, Q_PROJ)
    blob = shard.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    header[Q_PROJ]["shape"][1] -= 1  # 64 -> 63: as many digits
    raw = json.dumps(header, separators=(",", ":")).encode().ljust(n)  # same length: only the shape lies
    shard.write_bytes(blob[:8] + raw + blob[8 + n :])
    code, lines = run(monkeypatch, capsys, *QUANTIZE, model, "--out", tmp_path / "out", "--bits", "8")
    assert_clean_failure(code, lines, tmp_path / "out", shard.name, Q_PROJ)


def test_tensor_shape_inconsistent_with_the_config(model, tmp_path, monkeypatch, capsys):
    shard = _replace_tensor(model, Q_PROJ, torch.randn(64, 48))  # config: hidden_size 64, so [64, 64]
    code, lines = run(monkeypatch, capsys, *QUANTIZE, model, "--out", tmp_path / "out", "--bits", "8")
    assert_clean_failure(code, lines, tmp_path / "out", shard.name, Q_PROJ, "[64, 48]", "[64, 64]")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_a_weight(model, tmp_path, monkeypatch, capsys, bad):
    shard = _shard_of(model, EXPERT)
    with safe_open(shard, framework="pt") as f:
        weight = f.get_tensor(EXPERT).clone()
    weight[3, 5] = bad
    _replace_tensor(model, EXPERT, weight)
    code, lines = run(monkeypatch, capsys, *QUANTIZE, model, "--out", tmp_path / "out", "--bits", "4")
    assert_clean_failure(code, lines, tmp_path / "out", shard.name, EXPERT, "non-finite")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2])
def test_non_finite_values_are_counted_in_every_float_dtype(dtype):
    from ernieq.model.adapters import non_finite_count

    t = torch.zeros(4, 6).to(dtype)
    assert non_finite_count(t) == 0
    t[1, 2], t[3, 0] = float("nan"), float("nan")
    assert non_finite_count(t) == 2
    assert non_finite_count(torch.arange(6)) == 0


def test_unknown_architecture(model, tmp_path, monkeypatch, capsys):
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(architectures=["NoSuchModelForCausalLM"], model_type="no_such_model")
    (model / "config.json").write_text(json.dumps(cfg))
    code, lines = run(monkeypatch, capsys, *QUANTIZE, model, "--out", tmp_path / "out")
    assert_clean_failure(code, lines, tmp_path / "out", str(model / "config.json"), "unknown architecture",
                         "no_such_model")


def test_a_matrix_ernieq_cannot_classify_is_refused_unless_the_recipe_names_it(model, tmp_path, monkeypatch, capsys):
    """Nothing is skipped in silence: a tensor the model has no place for stops quantize, naming it; an
    override that keeps it lets it through, and inspect and the summary say why it was kept."""
    stray = "model.layers.1.mlp.stray_proj.weight"
    extra = model / "stray.safetensors"
    save_file({stray: torch.randn(8, 64)}, extra)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    index["weight_map"][stray] = extra.name
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    code, lines = run(monkeypatch, capsys, *QUANTIZE, model, "--out", tmp_path / "out", "--bits", "8")
    assert_clean_failure(code, lines, tmp_path / "out", extra.name, stray, "cannot classify", "--override")
    summary = api.quantize(model, tmp_path / "ok", bits=8, overrides=(r"stray_proj=none",), progress=False)
    assert stray in summary.kept["unclassified matrix, kept because the recipe names it"]["names"]


def test_a_group_size_the_codec_cannot_take(model, tmp_path, monkeypatch, capsys):
    code, lines = run(monkeypatch, capsys, *QUANTIZE, model, "--out", tmp_path / "out",
                      "--override", "down_proj=wint4:group_size=48")
    assert_clean_failure(code, lines, tmp_path / "out", "down_proj=wint4:group_size=48", "group_size")


def test_a_block_size_the_format_cannot_take_for_that_k(model, tmp_path, monkeypatch, capsys):
    # hf-fp8 stores whole 128x128 blocks only; the dense down_proj has K = intermediate_size = 96
    code, lines = run(monkeypatch, capsys, *QUANTIZE, model, "--out", tmp_path / "out", "--fp8", "--format", "hf-fp8")
    assert_clean_failure(code, lines, tmp_path / "out", "model.layers.0.mlp.down_proj", "K=96")


def test_a_read_only_output_disk(model, tmp_path, monkeypatch, capsys):
    parent = tmp_path / "ro"
    parent.mkdir()
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):  # what every mkdir under a read-only mount gets
        if parent in self.parents:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    code, lines = run(monkeypatch, capsys, *QUANTIZE, model, "--out", parent / "out", "--bits", "8")
    assert_clean_failure(code, lines, parent / "out", str(parent), "Read-only file system")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a 0o555 folder anyway; the EROFS case covers it")
def test_a_read_only_output_folder(model, tmp_path, monkeypatch, capsys):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        code, lines = run(monkeypatch, capsys, *QUANTIZE, model, "--out", parent / "out", "--bits", "8")
    finally:
        parent.chmod(0o755)
    assert_clean_failure(code, lines, parent / "out", str(parent), "Permission denied")


def test_a_full_output_disk(model, tmp_path, monkeypatch, capsys):
    def full(fd):  # a real disk reports ENOSPC on write or, with delayed allocation, on fsync
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    code, lines = run(monkeypatch, capsys, *QUANTIZE, model, "--out", tmp_path / "out", "--bits", "8")
    assert_clean_failure(code, lines, tmp_path / "out", str(tmp_path), "No space left on device")


def test_a_missing_tokenizer_for_eval(model, tmp_path, monkeypatch, capsys):
    code, lines = run(monkeypatch, capsys, "eval", model, "--data", "demo", "--seq-len", "16", "--json",
                      tmp_path / "out" / "r.json")
    assert_clean_failure(code, lines, tmp_path / "out", str(model), "tokenizer")


def test_a_missing_tokenizer_for_calibration(model, tmp_path, monkeypatch, capsys):
    text = tmp_path / "calib.txt"
    text.write_text("Some calibration text about anything at all.\n" * 20)
    code, lines = run(monkeypatch, capsys, *QUANTIZE, model, "--out", tmp_path / "out", "--calib-data", text,
                      "--calib-tokens", "64", "--calib-seq-len", "16")
    assert_clean_failure(code, lines, tmp_path / "out", str(model), "tokenizer")


def test_an_invalid_bits(model, tmp_path, monkeypatch, capsys):
    code, lines = run(monkeypatch, capsys, *QUANTIZE, model, "--out", tmp_path / "out", "--bits", "3")
    assert_clean_failure(code, lines, tmp_path / "out", "--bits", "'3'", exit_code=2)


# -- no code execution from a checkpoint -------------------------------------------------------

# What would run code from a file: unpickling (torch.load without weights_only=True, pickle,
# numpy's allow_pickle), a model's own Python (trust_remote_code=True), eval/exec.
UNSAFE = [
    (r"\btorch\.load\((?![^)]*weights_only\s*=\s*True)", "torch.load without weights_only=True"),
    (r"^\s*(import|from)\s+(pickle|cPickle|dill|joblib|marshal|shelve)\b", "a pickle-family import"),
    (r"\bpickle\.(loads?|Unpickler)\b", "pickle.load"),
    (r"allow_pickle\s*=\s*True", "numpy allow_pickle=True"),
    (r"trust_remote_code\s*=\s*True", "trust_remote_code=True"),
    (r"(?<![\w.])(?<!def )(eval|exec)\(", "eval/exec of a string"),  # a method named eval is no call
]


# Pickle that never touches a file: objects this process built, sent to its own worker processes.
# Such a file may not read files at all (checked below), so no checkpoint byte can reach its unpickler.
PICKLE_BETWEEN_OWN_PROCESSES = {"ernieq/encode.py"}
PICKLE_KINDS = ("a pickle-family import", "pickle.load")
READS_FILES = r"\b(open|safe_open|load_file|read_bytes|read_text|from_pretrained)\("


def _package_sources() -> list[Path]:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20, f"{PACKAGE}: the package sources were not found"
    return files


def test_the_package_never_unpickles_or_runs_checkpoint_code():
    hits = []
    for path in _package_sources():
        rel = path.relative_to(PACKAGE.parent).as_posix()
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            for pattern, what in UNSAFE:
                if re.search(pattern, code) and not (rel in PICKLE_BETWEEN_OWN_PROCESSES and what in PICKLE_KINDS):
                    hits.append(f"{rel}:{number}: {what}: {line.strip()}")
    assert not hits, "\n".join(hits)


def test_modules_that_pickle_between_their_own_processes_read_no_files():
    for rel in PICKLE_BETWEEN_OWN_PROCESSES:
        source = (PACKAGE.parent / rel).read_text()
        reads = [line.strip() for line in source.splitlines() if re.search(READS_FILES, line.split("#", 1)[0])]
        assert not reads, f"{rel} unpickles and reads files: {reads}"


def test_the_unsafe_patterns_do_find_what_they_look_for():
    samples = ["x = torch.load(path)", "import pickle", "m = f(trust_remote_code=True)",
               "np.load(p, allow_pickle=True)", "y = eval(text)"]
    safe = ["x = torch.load(path, weights_only=True)", "model.eval()", "def eval(self):", "tokenizer.from_pretrained(p)"]
    assert all(any(re.search(p, s) for p, _ in UNSAFE) for s in samples)
    assert not any(re.search(p, s) for p, _ in UNSAFE for s in safe)


def test_transformers_loads_plain_checkpoints_from_safetensors_only():
    """``api.load`` asks transformers for safetensors: a pytorch_model.bin beside them is never unpickled."""
    source = (PACKAGE / "api.py").read_text()
    calls = re.findall(r"AutoModelForCausalLM\.from_pretrained\(([^)]*)\)", source)
    assert calls and all("use_safetensors=True" in c for c in calls), calls
