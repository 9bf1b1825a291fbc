"""The typed library functions behind every CLI command.

Everything the command line does is callable from here, without a subprocess.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ernieq.errors import ErnieqError
from ernieq.model.checkpoint import CheckpointReader, read_json
from ernieq.model.summary import CheckpointSummary, summarize

log = logging.getLogger(__name__)

DEMO_NAME = "demo"
NATIVE_FORMAT = "native"


def resolve_model(model: str | Path) -> Path:
    """A checkpoint folder for ``model``: a local path, or ``demo`` (built and cached on first use)."""
    if str(model) == DEMO_NAME:
        from ernieq.model.demo import demo_model_path

        return demo_model_path()
    path = Path(model)
    if not path.exists():
        raise ErnieqError(f"{path}: no such model folder (give a local checkpoint folder or 'demo'; the hub is not used)")
    if not (path / "config.json").exists():
        raise ErnieqError(f"{path / 'config.json'}: missing; not a Hugging Face-layout checkpoint folder")
    return path


def inspect(model: str | Path) -> CheckpointSummary:
    """Per layer: dense or MoE, experts, shapes, codecs, parameters and bytes; totals by tensor class."""
    return summarize(CheckpointReader(resolve_model(model)))


def is_quantized(path: Path) -> bool:
    qc = read_json(path / "config.json").get("quantization_config") or {}
    return qc.get("quant_method") == "ernieq"


def load(model: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, tokenizer) for a plain or an ernieq-quantized checkpoint, ready for inference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if is_quantized(path):
        from ernieq.runtime.loader import load_quantized

        net = load_quantized(path, dtype=dtype, device=device)
    else:
        net = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    net.eval()
    return net, tokenizer


@dataclass
class EvalResult:
    ppl: float
    tokens: int
    seq_len: int
    windows: int
    model: str
    data: str
    seconds: float


def evaluate(
    model: str | Path,
    data: str,
    seq_len: int = 2048,
    max_windows: int | None = None,
    progress: bool = True,
    json_path: Path | None = None,
) -> EvalResult:
    """Perplexity of ``model`` on the text source ``data`` (GPTQ/AWQ protocol)."""
    from ernieq.eval.perplexity import perplexity, tokenize_text
    from ernieq.eval.text import load_text

    text = load_text(data, split="eval")
    net, tokenizer = load(model)
    ids = tokenize_text(tokenizer, text)
    start = time.perf_counter()
    with torch.inference_mode():
        r = perplexity(net, ids, seq_len=seq_len, max_windows=max_windows, progress=progress)
    result = EvalResult(r.ppl, r.tokens, r.seq_len, r.windows, str(model), data, time.perf_counter() - start)
    if json_path is not None:
        Path(json_path).write_text(json.dumps(asdict(result), indent=2) + "\n")
    return result


def quantize(
    model: str | Path,
    out: str | Path,
    config: "QuantConfig | None" = None,  # noqa: F821
    *,
    bits: int = 4,
    fp8: bool = False,
    group_size: int = 128,
    symmetric: bool = True,
    w4_moe_layers: int | None = None,
    overrides: tuple[str, ...] = (),
    calib_data: str | None = None,
    calib: str | Path | None = None,
    calib_tokens: int = 64 * 512,
    calib_seq_len: int = 512,
    all_experts: bool = False,
    method: str | None = None,
    format: str = NATIVE_FORMAT,
    overwrite: bool = False,
    progress: bool = True,
) -> "QuantizeSummary":  # noqa: F821
    """Encode every linear weight of MODEL's decoder layers and write the checkpoint to OUT.

    The checkpoint is read and written one tensor group (a layer's attention, a
    layer's MLP or MoE block) at a time; the output appears at OUT only when
    complete. ``format`` other than native converts the native result at the end.
    Calibration statistics come from ``calib`` (a saved ``ernieq calibrate`` folder)
    or are collected from ``calib_data``; ``method`` defaults to GPTQ with
    statistics and round-to-nearest without.
    """
    from ernieq.formats.registry import export_checkpoint, get_format
    from ernieq.quantize import run_quantize

    out = Path(out)
    source = resolve_model(model)
    if calib_data is not None and calib is not None:
        raise ErnieqError("give --calib-data (collect now) or --calib (reuse saved statistics), not both")
    stats = None
    if calib is not None:
        from ernieq.calibration import load_stats

        stats = load_stats(calib)
    elif calib_data is not None:
        stats = calibrate(source, calib_data, tokens=calib_tokens, seq_len=calib_seq_len, all_experts=all_experts,
                          progress=progress)
    method = method or ("gptq" if stats is not None else "rtn")
    if method != "rtn" and stats is None:
        raise ErnieqError(f"--method {method} needs calibration statistics (--calib-data SRC or --calib DIR)")
    options = dict(bits=bits, fp8=fp8, group_size=group_size, symmetric=symmetric, w4_moe_layers=w4_moe_layers,
                   overrides=overrides, progress=progress, calib=stats, method=method)
    if format == NATIVE_FORMAT:
        return run_quantize(source, out, config, overwrite=overwrite, **options)
    get_format(format)  # an unknown name fails before any work
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ErnieqError(f"{out}: output folder exists and is not empty (use --overwrite to replace it)")
    native = out.parent / f".{out.name}.ernieq-native"
    try:
        summary = run_quantize(source, native, config, overwrite=True, **options)
        export_checkpoint(native, out, format, overwrite=overwrite)
    finally:
        shutil.rmtree(native, ignore_errors=True)
    return summary


def calibration_tokens(model: str | Path, data: str, tokens: int, seq_len: int) -> torch.Tensor:
    """The calibration split of ``data`` tokenized once and cut into [tokens // seq_len, seq_len] windows."""
    from transformers import AutoTokenizer

    from ernieq.eval.perplexity import tokenize_text
    from ernieq.eval.text import load_text

    if tokens < seq_len:
        raise ErnieqError(f"--tokens {tokens} is less than one window of --seq-len {seq_len}")
    ids = tokenize_text(AutoTokenizer.from_pretrained(resolve_model(model)), load_text(data, split="calib"))
    ids = ids.reshape(-1)
    n = min(tokens // seq_len, ids.numel() // seq_len)
    if n == 0:
        raise ErnieqError(f"{data}: {ids.numel()} calibration tokens, fewer than one window of {seq_len}")
    if n < tokens // seq_len:
        log.warning("%s: only %d calibration windows of %d tokens available", data, n, seq_len)
    return ids[: n * seq_len].reshape(n, seq_len)  # [n_seq, seq_len]


def calibrate(
    model: str | Path,
    data: str,
    *,
    tokens: int = 64 * 512,
    seq_len: int = 512,
    all_experts: bool = False,
    out: str | Path | None = None,
    progress: bool = True,
):
    """Run the unquantized model layer by layer over ``data``'s calibration split and collect statistics."""
    from ernieq.calibration import collect_stats, save_stats

    source = resolve_model(model)
    cset = collect_stats(source, calibration_tokens(source, data, tokens, seq_len), all_experts=all_experts,
                         progress=progress)
    cset.info["data"] = data
    if out is not None:
        save_stats(cset, out)
    return cset


def export(native_dir: str | Path, out: str | Path, fmt: str, *, overwrite: bool = False) -> Path:
    """Convert the ernieq checkpoint NATIVE_DIR into format FMT at OUT (the folder appears only when complete)."""
    from ernieq.formats.registry import export_checkpoint

    return export_checkpoint(Path(native_dir), Path(out), fmt, overwrite=overwrite)


def generate(model: str | Path, prompt: str, max_new_tokens: int = 32) -> str:
    """Greedy continuation of ``prompt``; returns the prompt and the new text."""
    net, tokenizer = load(model)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = net.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def bench(
    *,
    out: str | Path | None = None,
    quick: bool = False,
    budget_s: float = 420.0,
    codecs: tuple[str, ...] | None = None,
    models: tuple[str, ...] | None = None,
    m: tuple[int, ...] | None = None,
    dense: bool = True,
    moe: bool = True,
    sweep: bool = False,
    save_configs: bool = False,
    command: str = "ernieq bench",
) -> "Report":  # noqa: F821
    """Time the kernels per codec and shape: the Triton kernels on a CUDA GPU; without one the
    reference path on the CPU, labelled so (see ``ernieq.kernels.bench``). Returns the table
    (``ernieq.kernels.bench_report.Report``), also written as markdown to ``out`` when given.

    codecs, models ('21b', '300b'), m: None for the defaults of this machine.
    sweep: also time a few tile configurations per case (GPU); save_configs: store the fastest
    in the tile table the launchers read.
    """
    from ernieq.kernels.bench import BenchOptions, run_bench
    from ernieq.kernels.bench_inputs import CODECS

    options = BenchOptions(out=None if out is None else Path(out), quick=quick, budget_s=budget_s,
                           codecs=tuple(codecs or CODECS), models=models, m=m, dense=dense, moe=moe, sweep=sweep,
                           save_configs=save_configs, command=command)  # fmt: skip
    return run_bench(options)
