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

from ernieq.config import W4_GROUP_SIZE
from ernieq.errors import ErnieqError
from ernieq.model.checkpoint import CheckpointReader, read_json
from ernieq.model.summary import CheckpointSummary, summarize

log = logging.getLogger(__name__)

DEMO_NAME = "demo"
NATIVE_FORMAT = "native"


def resolve_model(model: str | Path) -> Path:
    """A checkpoint folder for ``model``: a local path, or ``demo`` (built and cached on first use)."""
    if str(model) == DEMO_NAME:
        from ernieq.demo import demo_model_path

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


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def load_tokenizer(path: Path):
    """The tokenizer saved in checkpoint folder ``path``, or an ErnieqError naming the folder."""
    from transformers import AutoTokenizer

    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ErnieqError(f"{path}: no tokenizer ({', '.join(TOKENIZER_FILES)} missing); copy the source model's "
                          f"tokenizer files into the folder")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:  # what transformers raises for tokenizer files it cannot use
        raise ErnieqError(f"{path}: cannot load its tokenizer ({type(err).__name__}: {err})") from None


def load(model: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, tokenizer) for a plain or an ernieq-quantized checkpoint, ready for inference."""
    from transformers import AutoModelForCausalLM

    path = resolve_model(model)
    tokenizer = load_tokenizer(path)
    if is_quantized(path):
        from ernieq.runtime.loader import load_quantized

        net = load_quantized(path, dtype=dtype, device=device)
    else:
        net = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True).to(device)  # no pickle
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
    from ernieq.text import load_text

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
    group_size: int | None = W4_GROUP_SIZE,
    symmetric: bool = True,
    w4_moe_layers: int | None = None,
    overrides: tuple[str, ...] = (),
    calib_data: str | None = None,
    calib: str | Path | None = None,
    calib_tokens: int = 64 * 512,
    calib_seq_len: int = 512,
    all_experts: bool = False,
    method: str | None = None,
    rotate: bool | None = None,
    sequential: bool = False,
    format: str = NATIVE_FORMAT,
    overwrite: bool = False,
    progress: bool = True,
    workers: int | None = None,
) -> "QuantizeSummary":  # noqa: F821
    """Encode every linear weight of MODEL's decoder layers and write the checkpoint to OUT.

    The checkpoint is read and written one tensor group (a layer's attention, a
    layer's MLP or MoE block) at a time; the output appears at OUT only when
    complete. ``format`` other than native converts the native result at the end.
    Calibration statistics come from ``calib`` (a saved ``ernieq calibrate`` folder)
    or are collected from ``calib_data``; ``method`` defaults to GPTQ with
    statistics and round-to-nearest without. ``rotate``: store the wint4 and ccq2
    weights turned by input rotations the runtime applies (default: on for the
    native format, which alone can carry them). ``sequential``: calibrate each
    layer on the outputs of the quantized layers before it (needs ``calib_data``).
    ``workers``: encoder processes on the CPU (default: every usable core). A
    killed run resumes when run again with the same arguments (see ``ernieq.quantize``).
    """
    from ernieq.formats.registry import export_checkpoint, get_format
    from ernieq.quantize import recipe_for, run_quantize, sequential_plan

    out = Path(out)
    source = resolve_model(model)
    if calib_data is not None and calib is not None:
        raise ErnieqError("give --calib-data (collect now) or --calib (reuse saved statistics), not both")
    if rotate is None:
        rotate = format == NATIVE_FORMAT
    elif rotate and format != NATIVE_FORMAT:
        raise ErnieqError(f"--rotate: the {format} format cannot carry online input rotations (use --no-rotate)")
    if sequential and calib_data is None:
        raise ErnieqError("--sequential calibrates while it quantizes: it needs --calib-data SRC")
    if config is None:
        config = recipe_for(source, bits, fp8, group_size, symmetric, w4_moe_layers, overrides, rotate)
    stats, calib_dir = None, None
    if calib is not None:
        from ernieq.calibration import load_stats

        stats = load_stats(calib)
    elif calib_data is not None:  # streamed to a folder beside OUT: memory follows one layer, not the model
        calib_dir = out.parent / f".{out.name}.ernieq-calib"
        plan = sequential_plan(source, config, method or "gptq") if sequential else None
        stats = calibrate(source, calib_data, tokens=calib_tokens, seq_len=calib_seq_len, all_experts=all_experts,
                          out=calib_dir, progress=progress, sequential=plan)
    method = method or ("gptq" if stats is not None else "rtn")
    if method != "rtn" and stats is None:
        raise ErnieqError(f"--method {method} needs calibration statistics (--calib-data SRC or --calib DIR)")
    options = dict(bits=bits, fp8=fp8, group_size=group_size, symmetric=symmetric, w4_moe_layers=w4_moe_layers,
                   overrides=overrides, progress=progress, calib=stats, method=method, workers=workers)
    try:
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
    finally:
        if calib_dir is not None:
            shutil.rmtree(calib_dir, ignore_errors=True)


def calibration_tokens(model: str | Path, data: str, tokens: int, seq_len: int) -> torch.Tensor:
    """The calibration split of ``data`` tokenized once and cut into [tokens // seq_len, seq_len] windows."""
    from ernieq.eval.perplexity import tokenize_text
    from ernieq.text import load_text

    if tokens < seq_len:
        raise ErnieqError(f"--tokens {tokens} is less than one window of --seq-len {seq_len}")
    ids = tokenize_text(load_tokenizer(resolve_model(model)), load_text(data, split="calib"))
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
    sequential=None,
):
    """Run the unquantized model layer by layer over ``data``'s calibration split and collect statistics.
    ``sequential``: a ``SequentialPlan``, to calibrate each layer on the quantized layers before it."""
    from ernieq.calibration import collect_stats

    source = resolve_model(model)
    return collect_stats(source, calibration_tokens(source, data, tokens, seq_len), all_experts=all_experts,
                         progress=progress, out=out, info={"data": data},  # with out: streamed, layer by layer
                         sequential=sequential)


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


def report(
    qdir: str | Path,
    baseline: str | Path,
    data: tuple[str, ...],
    out: str | Path | None = None,
    *,
    calib: str | Path | None = None,
    compare: tuple[str | Path, ...] = (),
    seq_len: int = 2048,
    max_windows: int | None = 4,
    progress: bool = True,
) -> dict:
    """The accuracy report of the ernieq checkpoint QDIR against BASELINE (see ``ernieq.eval.report``);
    written to OUT as report.json, report.md, report.html and plots/ when OUT is given."""
    from ernieq.eval.report import build_report, write_report

    cset = None
    if calib is not None:
        from ernieq.calibration import load_stats

        cset = load_stats(calib)
    result = build_report(Path(qdir), resolve_model(baseline), tuple(data), load, baseline_name=str(baseline),
                          calib=cset, calib_source=None if calib is None else str(calib),
                          compare=tuple(Path(c) for c in compare), seq_len=seq_len, max_windows=max_windows,
                          progress=progress)
    if out is not None:
        write_report(result, Path(out))
    return result


def publish(
    qdir: str | Path,
    out: str | Path | None = None,
    *,
    name: str | None = None,
    report_dir: str | Path | None = None,
    base_model: str | None = None,
    push_to_hub: str | None = None,
    overwrite: bool = False,
) -> Path:
    """A hub-ready folder of QDIR (default: ``QDIR-hub`` beside it): model card from REPORT_DIR's report.json,
    SHA256SUMS; uploaded to the hub repository PUSH_TO_HUB when given."""
    from ernieq.eval.report import read_report
    from ernieq.formats.publish import publish as publish_folder
    from ernieq.formats.publish import push_to_hub as push

    qdir = Path(qdir)
    out = Path(out) if out is not None else qdir.parent / f"{qdir.name}-hub"
    rep = read_report(Path(report_dir)) if report_dir is not None else None
    base_path = resolve_model(base_model) if base_model is not None else None
    path = publish_folder(qdir, out, name=name, report=rep, report_dir=report_dir, base_model=base_model,
                          base_path=base_path, overwrite=overwrite)
    if push_to_hub:
        log.info("pushed to %s", push(path, push_to_hub))
    return path


@dataclass
class VerifyReport:
    files: int
    tensors: int
    modules: int
    smoke_ppl: float | None
    smoke_tokens: int


def verify(folder: str | Path, *, smoke: bool = True, smoke_tokens: int = 128,
           max_ppl: float | None = None) -> VerifyReport:
    """Re-check a published folder: SHA256SUMS, every tensor, shapes and dtypes against the config, then
    (``smoke``) the perplexity of one short window of built-in text: finite and below ``max_ppl``
    (default: the vocabulary size, what a uniform guess scores)."""
    from ernieq.eval.perplexity import perplexity, tokenize_text
    from ernieq.formats.publish import SMOKE_TEXT, VerifyError, verify_files

    folder = Path(folder)
    files = verify_files(folder)
    if not smoke:
        return VerifyReport(files.files, files.tensors, files.modules, None, 0)
    net, tokenizer = load(folder)
    ids = tokenize_text(tokenizer, SMOKE_TEXT)[0]
    n = min(smoke_tokens, ids.numel())
    with torch.inference_mode():
        r = perplexity(net, ids[:n], seq_len=n, max_windows=1, progress=False)
    bound = net.config.vocab_size if max_ppl is None else max_ppl
    if not r.ppl < bound:
        raise VerifyError(f"{folder}: smoke-test perplexity {r.ppl:.4g} over {r.tokens} tokens is not below "
                          f"{bound:.4g} (the vocabulary size unless given): the weights do not make a language model")
    return VerifyReport(files.files, files.tensors, files.modules, r.ppl, r.tokens)


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
