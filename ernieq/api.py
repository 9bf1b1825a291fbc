"""The typed library functions behind every CLI command.

Everything the command line does is callable from here, without a subprocess.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ernieq.config import NATIVE_FORMAT, QuantizeOptions, with_fields
from ernieq.device import Placement
from ernieq.distributed import DistributedError, barrier, world
from ernieq.errors import ErnieqError
from ernieq.model.hub import hub_snapshot, parse_hub_id
from ernieq.model.summary import CheckpointSummary

log = logging.getLogger(__name__)

DEMO_NAME = "demo"


def resolve_model(model: str | Path) -> Path:
    """A checkpoint folder for ``model``: a local folder; ``demo`` (built and cached on first use); or a
    Hugging Face hub id ``org/name[@revision]`` (its snapshot, from the local hub cache when offline).
    A local folder wins over a name that means something else, and the log says so."""
    path = Path(model)
    if path.exists():
        if str(model) == DEMO_NAME or parse_hub_id(str(model)):
            log.info("%s: using the local folder %s, not the %s of that name", model, path.resolve(),
                     "built-in demo model" if str(model) == DEMO_NAME else "hub model")
    elif str(model) == DEMO_NAME:
        from ernieq.demo import demo_model_path

        return demo_model_path()
    elif (hub := parse_hub_id(str(model))) is not None:
        path = hub_snapshot(*hub)
    else:
        raise ErnieqError(f"{path}: no such model folder (give a local checkpoint folder, 'demo' or a hub id "
                          f"org/name[@revision])")
    if not (path / "config.json").exists():
        raise ErnieqError(f"{path / 'config.json'}: missing; not a Hugging Face-layout checkpoint folder")
    return path


def inspect(model: str | Path, options: QuantizeOptions | None = None, **fields) -> CheckpointSummary:
    """Per layer: dense or MoE, experts, shapes, codecs, parameters and bytes; totals by tensor class;
    where every parameter goes (quantized, kept and why, tied, unclassified). Any checkpoint folder:
    plain (accounted by the ``--bits`` recipe of ``options`` with ``fields`` replaced), ernieq native or
    another format ernieq reads (FastDeploy)."""
    from ernieq.formats.registry import checkpoint_summary, quantized_format
    from ernieq.quantize import recipe_for, recipe_view

    path = resolve_model(model)
    if quantized_format(path) is not None:
        return checkpoint_summary(path)
    config, _ = recipe_for(path, with_fields(options, fields))
    return checkpoint_summary(path, recipe_view(path, config))


def stored_recipe(model: str | Path) -> dict | None:
    """The recipe an ernieq checkpoint was made with (``quantization_config.recipe_spec``), or None."""
    from ernieq.model.checkpoint import read_json
    from ernieq.recipes import SPEC_KEY

    qc = read_json(resolve_model(model) / "config.json").get("quantization_config") or {}
    return qc.get(SPEC_KEY)


def is_quantized(path: Path) -> bool:
    """Whether ``path`` is a quantized checkpoint of a format ernieq reads (native, FastDeploy)."""
    from ernieq.formats.registry import quantized_format

    return quantized_format(path) is not None


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


def load(model: str | Path, *, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
         decode_cache: str | float = "auto", stream: bool | None = None):
    """(model, tokenizer) for a plain or a quantized checkpoint (ernieq native, FastDeploy), ready for
    inference on ``device`` in ``dtype`` (see ``ernieq.device``: auto is the first CUDA GPU in bfloat16,
    else the CPU in float32). A quantized model computes through the Triton kernels on CUDA and the
    reference path elsewhere, where ``decode_cache`` (auto, off or GiB; process-wide) bounds the weights
    kept decoded (``ernieq.runtime.decode_cache``). ``stream`` (None: when the weights do not fit in half
    the memory available; see ``ernieq.runtime.stream``): the model is a ``StreamedLM`` with one decoder
    layer resident at a time, else a transformers model. Either carries its ``stream_plan``."""
    placement = Placement.resolve(device, dtype)  # a device that is not there fails first
    path = resolve_model(model)
    tokenizer = load_tokenizer(path)  # before the weights: a folder without one fails at once
    return load_model(path, device=placement.device, dtype=placement.dtype, decode_cache=decode_cache,
                      stream=stream), tokenizer


def load_model(model: str | Path, *, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
               decode_cache: str | float = "auto", stream: bool | None = None):
    """The model alone, as :func:`load` loads it: for what needs no text (``ernieq bench`` on a
    synthetic checkpoint, which has no tokenizer)."""
    from transformers import AutoModelForCausalLM

    from ernieq.runtime.decode_cache import set_decode_cache
    from ernieq.runtime.stream import StreamedLM, stream_plan

    placement = Placement.resolve(device, dtype)
    set_decode_cache(decode_cache)
    path = resolve_model(model)
    quantized = is_quantized(path)
    plan = stream_plan(path, placement, stream, quantized)
    log.info("%s: %s", path, plan.describe())
    if plan.streamed:
        return StreamedLM.open(path, placement, plan, quantized)
    if quantized:
        from ernieq.runtime.loader import load_quantized

        net = load_quantized(path, dtype=placement.dtype, device=placement.device)
    else:
        net = AutoModelForCausalLM.from_pretrained(path, dtype=placement.dtype, use_safetensors=True)  # no pickle
        net = net.to(placement.device)
    net.eval()
    net.stream_plan = plan
    return net


def _runtime(net, placement: Placement) -> dict:
    """What a result records of where ``net`` ran: device, dtype, kernel path, decode cache, streamed or not."""
    from ernieq.runtime.record import kernel_path, runtime_record

    return runtime_record(placement, kernel_path(net, placement.device), net.stream_plan.record())


@dataclass
class EvalResult:
    ppl: float
    tokens: int
    seq_len: int
    windows: int
    model: str
    data: str
    seconds: float
    runtime: dict  # device, dtype, kernel path, decode cache, stream plan (``ernieq.runtime.record``)


def evaluate(
    model: str | Path,
    data: str,
    seq_len: int = 2048,
    max_windows: int | None = None,
    progress: bool = True,
    json_path: Path | None = None,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    decode_cache: str | float = "auto",
    stream: bool | None = None,
) -> EvalResult:
    """Perplexity of ``model`` on the text source ``data`` (GPTQ/AWQ protocol), computed on ``device``
    in ``dtype``, streamed or resident (see :func:`load`)."""
    from ernieq.eval.perplexity import perplexity, tokenize_text
    from ernieq.text import load_text

    placement = Placement.resolve(device, dtype)
    text = load_text(data, split="eval")
    net, tokenizer = load(model, device=placement.device, dtype=placement.dtype, decode_cache=decode_cache,
                          stream=stream)
    ids = tokenize_text(tokenizer, text)
    start = time.perf_counter()
    with torch.inference_mode():
        r = perplexity(net, ids, seq_len=seq_len, max_windows=max_windows, progress=progress)
    result = EvalResult(r.ppl, r.tokens, r.seq_len, r.windows, str(model), data, time.perf_counter() - start,
                        _runtime(net, placement))
    if json_path is not None:
        Path(json_path).write_text(json.dumps(asdict(result), indent=2) + "\n")
    return result


@dataclass
class TaskEvalResult:
    """lm-eval's scores of ``model`` (``ernieq.eval.tasks.TaskScore.to_json`` per task) and how they were run."""

    model: str
    tasks: list[dict]
    limit: int | None
    num_fewshot: int | None
    batch_size: int
    seconds: float
    provenance: dict
    runtime: dict  # device, dtype, kernel path, decode cache (``ernieq.runtime.record``)


def evaluate_tasks(
    model: str | Path,
    tasks: tuple[str, ...],
    *,
    include_paths: tuple[str | Path, ...] = (),
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 1,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    decode_cache: str | float = "auto",
    stream: bool | None = None,
    json_path: Path | None = None,
    perplexity: EvalResult | None = None,
) -> TaskEvalResult:
    """lm-evaluation-harness tasks (names, or task YAML files; ``include_paths``: more task folders) on
    ``model`` as :func:`load` loads it on ``device`` in ``dtype`` (see ``ernieq.eval.tasks``). Unknown
    tasks fail before the model is looked for, a model that would stream (see :func:`load`) before any task
    data loads, and data that cannot be had offline before the model loads. ``json_path``: the result as JSON, with
    ``perplexity`` under that key when given (``ernieq eval --data ... --tasks ...``)."""
    from ernieq.eval.tasks import TaskSuite, run_tasks
    from ernieq.provenance import now_iso, provenance
    from ernieq.runtime.stream import no_tasks_when_streamed, stream_plan

    started = now_iso()
    placement = Placement.resolve(device, dtype)
    suite = TaskSuite(tuple(tasks), tuple(include_paths))  # names checked
    path = resolve_model(model)
    no_tasks_when_streamed(stream_plan(path, placement, stream, is_quantized(path)))
    suite.load()  # the tasks' data, before the model
    net, tokenizer = load(path, device=placement.device, dtype=placement.dtype, decode_cache=decode_cache,
                          stream=stream)
    start = time.perf_counter()
    scores = run_tasks(net, tokenizer, suite, device=placement.device, limit=limit, num_fewshot=num_fewshot,
                       batch_size=batch_size)
    result = TaskEvalResult(str(model), [s.to_json() for s in scores], limit, num_fewshot, batch_size,
                            time.perf_counter() - start, provenance(started), _runtime(net, placement))
    if json_path is not None:
        data = {**asdict(result), **({"perplexity": asdict(perplexity)} if perplexity is not None else {})}
        Path(json_path).write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    return result


def quantize(model: str | Path, out: str | Path, config: "QuantConfig | None" = None,  # noqa: F821
             options: QuantizeOptions | None = None, **fields) -> "QuantizeSummary":  # noqa: F821
    """Encode every linear weight of MODEL's decoder layers and write the checkpoint to OUT.

    ``options`` (a :class:`ernieq.config.QuantizeOptions`; keyword ``fields`` replace its fields:
    ``quantize("demo", "q2", bits=2)``, ``quantize("demo", "q", recipe="my.yaml")``) say how; ``config``
    replaces the recipe. A recipe that does not fit the model fails before any work (``ernieq.plan``).
    The checkpoint is read and written one tensor group (a layer's attention, a
    layer's MLP or MoE block) at a time; the output appears at OUT only when
    complete. A format other than native converts the native result at the end.
    Calibration statistics come from ``calib`` (a saved ``ernieq calibrate`` folder)
    or are collected from ``calib_data``; ``method`` defaults to GPTQ with
    statistics and round-to-nearest without. ``rotate``: store the wint4 and ccq2
    weights turned by input rotations the runtime applies (default: on for the
    native format, which alone can carry them). ``sequential``: calibrate each
    layer on the outputs of the quantized layers before it (needs ``calib_data``). ``method="tune"``:
    GPTQ, then block-output tuning of each layer in that same sequential pass (``ernieq.calibration.tune``;
    ``tune_steps``, ``tune_lr``, ``tune_rounding``, ``tune_seed``, ``tune_target``); the summary's ``tune_reports`` say
    what each layer kept. ``tune_model_steps``: then every layer's scales tuned together against the unquantized
    model's output distribution (``ernieq.calibration.tune_model``; the summary's ``model_tune``). ``target_bits``: the routed experts' codecs mixed per MoE layer by measured sensitivity
    (``ernieq.calibration.mixed``; with ``sequential`` or ``method="tune"`` chosen first, on one pass over the
    unquantized model); the summary's ``mix`` holds the measurements and the choice, the checkpoint's recipe
    the rules.
    ``tp`` (``options.tp``): the fastdeploy format split for that many GPUs (FastDeploy's per-rank
    folders). A killed run resumes when run again with the same arguments: the calibration pass after its
    last finished layer (``ernieq.calibration.resume``; tuning included), the writing after its last
    finished tensor group (``ernieq.quantize``).
    Under torchrun calibration is data-parallel and encoding weight-parallel (``ernieq.distributed``);
    the checkpoint's bytes do not depend on the number of ranks.
    """
    from ernieq.formats.registry import check_options
    from ernieq.plan import check_plan
    from ernieq.quantize import recipe_for, sequential_plan

    o = with_fields(options, fields)
    placement = Placement.resolve(o.device, o.dtype)  # a device that is not there fails before any work
    out = Path(out)
    source = resolve_model(model)
    if o.calib_data is not None and o.calib is not None:
        raise ErnieqError("give --calib-data (collect now) or --calib (reuse saved statistics), not both")
    format_options = _format_options(o.format, o.tp)
    if o.format != NATIVE_FORMAT:
        check_options(o.format, format_options)  # an unknown format or option fails before any work
    native = o.format == NATIVE_FORMAT
    if config is None:
        config, o = recipe_for(source, o, default_rotate=native)
    elif o.rotate is None:
        o = dataclasses.replace(o, rotate=native)
    if o.rotate and not native:
        raise ErnieqError(f"--rotate (or the recipe's rotate: true): the {o.format} format cannot carry online "
                          f"input rotations (use --no-rotate)")
    if o.method == "tune" and o.calib_data is None:
        raise ErnieqError("--method tune tunes each layer during a calibration pass: it needs --calib-data SRC")
    if o.awq and o.method in ("rtn", "awq"):
        raise ErnieqError(f"--awq folds AWQ's scales in before GPTQ (--method gptq or tune); --method {o.method} "
                          f"{'rounds to nearest after them' if o.method == 'awq' else 'has no statistics to search them on'}")
    if o.sequential and o.calib_data is None:
        raise ErnieqError("--sequential calibrates while it quantizes: it needs --calib-data SRC")
    check_plan(source, config)
    sequential = o.sequential or o.method == "tune"
    stats, tuned, mix, model_tune = None, None, None, None
    # statistics stream to folders beside OUT (memory follows one layer, not the model), where a killed run
    # resumes: the unquantized model's, and the sequential pass's (its own, so that neither restarts the other)
    calib_dir, sequential_dir, tuned_dir = (out.parent / f".{out.name}.ernieq-{what}"
                                            for what in ("calib", "sequential", "tuned"))

    def collect(plan=None):
        return calibrate(source, o.calib_data, tokens=o.calib_tokens, seq_len=o.calib_seq_len,
                         all_experts=o.all_experts, out=sequential_dir if plan else calib_dir, progress=o.progress,
                         sequential=plan, device=placement.device, dtype=placement.dtype)

    def discard() -> None:
        if world().main:
            for folder in (calib_dir, sequential_dir, tuned_dir):
                shutil.rmtree(folder, ignore_errors=True)

    try:
        if o.calib is not None:
            from ernieq.calibration import load_stats

            stats = load_stats(o.calib)
        elif o.calib_data is not None and (not sequential or o.target_bits is not None):
            # the unquantized model's statistics: what the encoding uses, or (sequential) what the mix is chosen by
            stats = collect()
        if o.target_bits is not None:
            from ernieq.calibration.mixed import mixed_config, plan_mix

            # FastDeploy runs wint4 experts only in the MoE layers before its wint2 ones (quant_end_layer)
            mix = plan_mix(source, config, stats, o.target_bits, placement.device, o.progress,
                           wider_first=o.format == "fastdeploy")
            config = mixed_config(config, mix)
        if sequential:  # each layer calibrated on the quantized (and with tune: tuned) layers before it
            if stats is not None:  # the mix's statistics (a model's Hessians: up to a TB), done with once read
                barrier("choosing the codecs")  # a rerun measures the mix again, then resumes the pass below
                if world().main:
                    shutil.rmtree(calib_dir, ignore_errors=True)
                barrier("starting the sequential pass")
            plan = sequential_plan(source, config, o.method or "gptq", o.awq)
            if o.method == "tune":  # GPTQ, then each layer tuned in the same pass; results beside OUT until written
                from ernieq.calibration.tune import TuneSettings
                from ernieq.calibration.tuned_store import TunedStore

                tuned = TunedStore(tuned_dir / f"rank-{world().rank}")  # every rank its own
                plan = dataclasses.replace(plan, tune=TuneSettings(steps=o.tune_steps, lr=o.tune_lr,
                                                                    round_weights=o.tune_rounding, seed=o.tune_seed,
                                                                    target=o.tune_target), sink=tuned)
            stats = collect(plan)
            if tuned is not None and o.tune_model_steps > 0:  # then every layer's scales together, end to end
                from ernieq.calibration.tune_model import ModelTuneSettings, tune_model

                tuned, model_tune = tune_model(
                    source, tuned, plan, calibration_tokens(source, o.calib_data, o.calib_tokens, o.calib_seq_len),
                    ModelTuneSettings(steps=o.tune_model_steps, lr=o.tune_model_lr, seed=o.tune_seed), placement.device,
                    tuned_dir / f"model-rank-{world().rank}", stats.sites.run_id, o.progress)
        o = dataclasses.replace(o, method=o.method or ("gptq" if stats is not None else "rtn"))
        if o.method != "rtn" and stats is None:
            raise ErnieqError(f"--method {o.method} needs calibration statistics (--calib-data SRC or --calib DIR)")
        summary = _write_quantized(source, out, config, o, stats, tuned, mix, str(model), format_options)
        summary.model_tune = asdict(model_tune) if model_tune is not None else None
    except ErnieqError as err:
        if not isinstance(err, DistributedError):  # bad input: nothing worth resuming (a lost rank keeps the work)
            discard()
        raise
    discard()  # every rank is done with the folders: quantize ends on a barrier
    return summary


def _write_quantized(source: Path, out: Path, config, o: QuantizeOptions, stats, tuned, mix, model: str,
                     format_options: dict) -> "QuantizeSummary":  # noqa: F821
    """The quantization itself once the recipe and statistics are settled: the native checkpoint at OUT, or
    converted to ``o.format`` from a native one written beside it."""
    from ernieq.formats.registry import export_checkpoint
    from ernieq.quantize import run_quantize

    base = model if model == DEMO_NAME or parse_hub_id(model) else str(source.resolve())
    main = world().main  # under torchrun, rank 0 alone writes what is written once (see ernieq.distributed)
    if o.format == NATIVE_FORMAT:
        summary = run_quantize(source, out, config, o, calib=stats, base_model=base, tuned=tuned)
    else:
        if out.exists() and any(out.iterdir()) and not o.overwrite:
            raise ErnieqError(f"{out}: output folder exists and is not empty (use --overwrite to replace it)")
        native = out.parent / f".{out.name}.ernieq-native"
        try:
            summary = run_quantize(source, native, config, dataclasses.replace(o, overwrite=True), calib=stats,
                                   base_model=base, tuned=tuned)
            if main:
                export_checkpoint(native, out, o.format, overwrite=o.overwrite, options=format_options)
        finally:
            if main:
                shutil.rmtree(native, ignore_errors=True)
    summary.tune_reports = tuned.reports if tuned is not None else []
    summary.mix = mix
    return summary


def _format_options(fmt: str, tp: int) -> dict:
    """The export format's options from the CLI's: ``tp`` only where it is not 1 (FastDeploy's split)."""
    if tp == 1:
        return {}
    if fmt == NATIVE_FORMAT:
        raise ErnieqError("--tp applies to the fastdeploy format (FastDeploy's per-rank checkpoint), not native")
    return {"tp": tp}


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
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
):
    """Run the unquantized model layer by layer over ``data``'s calibration split and collect statistics,
    each decoder layer on ``device`` in ``dtype`` (auto: the first CUDA GPU in bfloat16, else the CPU in
    float32). ``sequential``: a ``SequentialPlan``, to calibrate each layer on the quantized layers before it."""
    from ernieq.calibration import collect_stats

    placement = Placement.resolve(device, dtype)
    source = resolve_model(model)
    return collect_stats(source, calibration_tokens(source, data, tokens, seq_len), all_experts=all_experts,
                         progress=progress, out=out, info={"data": data},  # with out: streamed, layer by layer
                         sequential=sequential, device=placement.device, dtype=placement.dtype)


def export(native_dir: str | Path, out: str | Path, fmt: str, *, tp: int = 1, overwrite: bool = False) -> Path:
    """Convert the ernieq checkpoint NATIVE_DIR into format FMT at OUT (the folder appears only when complete);
    ``tp``: FastDeploy's split for that many GPUs."""
    from ernieq.formats.registry import export_checkpoint

    return export_checkpoint(Path(native_dir), Path(out), fmt, overwrite=overwrite, options=_format_options(fmt, tp))


def generate(model: str | Path, prompt: str, max_new_tokens: int = 32, *, device: str | torch.device = "auto",
             dtype: str | torch.dtype = "auto", decode_cache: str | float = "auto", stream: bool | None = None,
             on_token: Callable[[str], None] | None = None) -> str:
    """Greedy continuation of ``prompt`` on ``device`` in ``dtype``, streamed or resident (see :func:`load`;
    streamed, every decoder layer is read once per new token); returns the prompt and the new text.
    ``on_token``: called with the text of each new token as soon as it is produced (on a CPU a token can
    take seconds). Where it ran is logged."""
    from ernieq.device import describe
    from ernieq.progress import TokenStream
    from ernieq.runtime.stream import StreamedLM

    placement = Placement.resolve(device, dtype)
    net, tokenizer = load(model, device=placement.device, dtype=placement.dtype, decode_cache=decode_cache,
                          stream=stream)
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(placement.device)
    streamer = TokenStream(tokenizer, on_token) if on_token is not None else None
    with torch.inference_mode():
        if isinstance(net, StreamedLM):
            log.info("streamed generation reads all %d decoder layers from the checkpoint for the prompt and again "
                     "for each of the %d new tokens: slow, with memory bounded by one layer",
                     net.layers.num_layers, max_new_tokens)
            out = net.generate(ids, max_new_tokens, streamer=streamer)
        else:
            out = net.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer)
    log.info("generated on %s", describe(_runtime(net, placement)))
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
    tasks: "TaskOptions | None" = None,  # noqa: F821
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    decode_cache: str | float = "auto",
    stream: bool | None = None,
) -> dict:
    """The accuracy report of the ernieq checkpoint QDIR against BASELINE (see ``ernieq.eval.report``);
    written to OUT as report.json, report.md, report.html and plots/ when OUT is given. ``tasks``
    (an ``ernieq.eval.tasks.TaskOptions``): lm-evaluation-harness tasks every model runs too. Every
    model runs on ``device`` in ``dtype``, streamed or resident (see :func:`load`); the report records where, by which
    kernels, and how each model was held."""
    from ernieq.eval.report import build_report, write_report

    placement = Placement.resolve(device, dtype)
    cset = None
    if calib is not None:
        from ernieq.calibration import load_stats

        cset = load_stats(calib)
    def load_here(path: Path):
        return load(path, device=placement.device, dtype=placement.dtype, decode_cache=decode_cache, stream=stream)

    result = build_report(Path(qdir), resolve_model(baseline), tuple(data), load_here, baseline_name=str(baseline),
                          calib=cset, calib_source=None if calib is None else str(calib),
                          compare=tuple(Path(c) for c in compare), seq_len=seq_len, max_windows=max_windows,
                          progress=progress, tasks=tasks, placement=placement)
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
    SHA256SUMS; uploaded to the hub repository PUSH_TO_HUB when given. The base model (its license and
    LICENSE): BASE_MODEL, else the report's baseline, else the one QDIR records it was quantized from."""
    from ernieq.eval.report import read_report
    from ernieq.publish.folder import publish as publish_folder
    from ernieq.publish.folder import push_to_hub as push

    qdir = Path(qdir)
    out = Path(out) if out is not None else qdir.parent / f"{qdir.name}-hub"
    rep = read_report(Path(report_dir)) if report_dir is not None else None
    base_path = resolve_model(base_model) if base_model is not None else None
    if base_model is None and rep is None:
        base_model, base_path = _quantized_from(qdir)
    path = publish_folder(qdir, out, name=name, report=rep, report_dir=report_dir, base_model=base_model,
                          base_path=base_path, overwrite=overwrite)
    if push_to_hub:
        log.info("pushed to %s", push(path, push_to_hub))
    return path


def _quantized_from(qdir: Path) -> tuple[str | None, Path | None]:
    """The base model an ernieq checkpoint records (``quantization_config.base_model``) and its folder;
    the folder is None, with a warning, when the model is no longer at hand (the card then says so)."""
    config = qdir / "config.json"
    qc = (json.loads(config.read_text()).get("quantization_config") or {}) if config.is_file() else {}
    name = qc.get("base_model")
    try:
        return name, resolve_model(name) if name is not None else None
    except ErnieqError as err:
        log.warning("the base model %s is not at hand, so neither is its license: %s", name, err)
        return name, None


@dataclass
class VerifyReport:
    files: int
    tensors: int
    modules: int
    smoke_ppl: float | None
    smoke_tokens: int
    runtime: dict | None = None  # where the smoke test ran (``ernieq.runtime.record``)


def verify(folder: str | Path, *, smoke: bool = True, smoke_tokens: int = 128, max_ppl: float | None = None,
           device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
           decode_cache: str | float = "auto", stream: bool | None = None) -> VerifyReport:
    """Re-check a published folder: SHA256SUMS, every tensor, shapes and dtypes against the config, then
    (``smoke``) the perplexity of one short window of built-in text on ``device`` in ``dtype`` (see
    :func:`load`): finite and below ``max_ppl`` (default: the vocabulary size, what a uniform guess scores)."""
    from ernieq.eval.perplexity import perplexity, tokenize_text
    from ernieq.publish.folder import SMOKE_TEXT
    from ernieq.publish.verify import VerifyError, verify_files

    placement = Placement.resolve(device, dtype)
    folder = Path(folder)
    files = verify_files(folder)
    if not smoke:
        return VerifyReport(files.files, files.tensors, files.modules, None, 0)
    net, tokenizer = load(folder, device=placement.device, dtype=placement.dtype, decode_cache=decode_cache,
                          stream=stream)
    ids = tokenize_text(tokenizer, SMOKE_TEXT)[0]
    n = min(smoke_tokens, ids.numel())
    with torch.inference_mode():
        r = perplexity(net, ids[:n], seq_len=n, max_windows=1, progress=False)
    bound = net.config.get_text_config().vocab_size if max_ppl is None else max_ppl
    if not r.ppl < bound:
        raise VerifyError(f"{folder}: smoke-test perplexity {r.ppl:.4g} over {r.tokens} tokens is not below "
                          f"{bound:.4g} (the vocabulary size unless given): the weights do not make a language model")
    return VerifyReport(files.files, files.tensors, files.modules, r.ppl, r.tokens, _runtime(net, placement))


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
    command: str = "ernieq bench --kernels",
    device: str = "auto",
    dtype: str = "auto",
) -> "Report":  # noqa: F821
    """Time the kernels per codec and shape: the Triton kernels on a CUDA ``device``; on the CPU the
    reference path, labelled so (see ``ernieq.bench.kernels``); ``dtype``: the activations'. Returns the table
    (``ernieq.bench.report.Report``), also written as markdown to ``out`` when given.

    codecs, models ('21b', '300b'), m: None for the defaults of this machine.
    sweep: also time a few tile configurations per case (GPU); save_configs: store the fastest
    in the tile table the launchers read.
    """
    from ernieq.bench.kernels import BenchOptions, run_bench
    from ernieq.bench.inputs import CODECS

    options = BenchOptions(out=None if out is None else Path(out), quick=quick, budget_s=budget_s,
                           codecs=tuple(codecs or CODECS), models=models, m=m, dense=dense, moe=moe, sweep=sweep,
                           save_configs=save_configs, command=command, device=device, dtype=dtype)  # fmt: skip
    return run_bench(options)


def bench_model(
    model: str | Path,
    baseline: str | Path | None = None,
    *,
    batches: tuple[int, ...] = (1, 8, 32),
    prompt_len: int = 512,
    new_tokens: int = 128,
    compile: bool | None = None,
    json_path: str | Path | None = None,
    command: str = "ernieq bench",
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    decode_cache: str | float = "auto",
    stream: bool | None = None,
) -> "ModelBenchResult":  # noqa: F821
    """Whole-model throughput of ``model`` and ``baseline`` (one after the other, in one run): per batch
    size, prefill and decode tokens/s with a static KV cache, peak memory and weight bytes, and the ratios
    (see ``ernieq.bench.model``). Each loads as :func:`load_model` loads it on ``device`` in ``dtype``;
    ``compile``: None compiles the decode step (CUDA graphs) on CUDA only; ``stream`` as :func:`load_model`
    (a streamed model decodes eagerly, every layer read per step). The JSON goes to ``json_path``."""
    from ernieq.bench.model import ModelBenchOptions, check_positions, run_model_bench
    from ernieq.model.checkpoint import read_json

    placement = Placement.resolve(device, dtype)
    options = ModelBenchOptions(tuple(batches), prompt_len, new_tokens, compile)
    options.check()
    named = [("model", model), *([("baseline", baseline)] if baseline is not None else [])]
    paths = [(role, str(name), resolve_model(name)) for role, name in named]  # every name fails before any load
    for _, name, path in paths:
        check_positions(name, read_json(path / "config.json"), options)

    def loader(path: Path):
        return lambda: load_model(path, device=placement.device, dtype=placement.dtype, decode_cache=decode_cache,
                                  stream=stream)

    result = run_model_bench([(role, name, loader(path)) for role, name, path in paths], placement, options, command)
    if json_path is not None:
        Path(json_path).write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return result
