"""The ``ernieq`` command line: parses options, calls ``ernieq.api``, prints results."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from ernieq import api, distributed
from ernieq.config import TUNE_TARGETS, W4_GROUP_SIZE, QuantizeOptions
from ernieq.device import DTYPE_CHOICES, describe, resolve_device
from ernieq.errors import ErnieqError
from ernieq.formats.registry import format_names

# A pipe or a file gets every table at its full width (rich would cut it at 80 columns)
console = Console(width=None if sys.stdout.isatty() else 100_000)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 100_000)
_file_handler: logging.Handler | None = None  # the --log FILE handler on the "ernieq" logger


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars; only warnings and errors on the terminal.")
@click.option("--log-file", "--log", "log_file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Also write the full log (debug level, with times) to this file (under torchrun spell it "
                   "--log-file: torchrun reads --log as its own option).")
def cli(verbose: bool, quiet: bool, log_file: Path | None) -> None:
    """ernieq: quantize Mixture-of-Experts language models (ERNIE 4.5 first) and prove what was kept.

    MODEL arguments take a local Hugging Face-layout folder (config.json and
    safetensors), a hub id org/name[@revision] (safetensors, config and tokenizer
    only; from the local hub cache when offline, HF_HUB_OFFLINE=1), or the name
    `demo`: the offline demo MoE model, built from SmolLM2-135M on first use.
    """
    from ernieq.progress import set_quiet

    set_quiet(quiet)
    if quiet or not sys.stderr.isatty():  # transformers' and the hub's tqdm bars redraw with carriage returns
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when they are first imported
    terminal = RichHandler(console=err_console, show_path=False) if sys.stderr.isatty() else _plain_log_handler()
    terminal.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", handlers=[terminal])
    if log_file is not None:
        _log_to_file(log_file)


def _plain_log_handler() -> logging.Handler:
    """Log lines as they are for a pipe or a file: rich would pad each to the console's full width."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    return handler


def _log_to_file(path: Path) -> None:
    """ernieq's whole log, debug lines included (per-group timings), with times, to ``path``."""
    global _file_handler
    logger = logging.getLogger("ernieq")
    if _file_handler is not None:
        logger.removeHandler(_file_handler)
        _file_handler.close()
    _file_handler = logging.FileHandler(path)
    _file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(_file_handler)
    logger.setLevel(logging.DEBUG)


def _device_option(ctx, param, value: str) -> str:
    resolve_device(value)  # a device that is not there: one line, before any work
    return value


def placement_options(fn):
    """--device and --dtype (``ernieq.device``), the same on every command that computes."""
    fn = click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default="auto", show_default=True,
                      help="Compute dtype; auto: bfloat16 on a GPU, float32 on the CPU.")(fn)
    return click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda|cuda:N",
                        callback=_device_option,
                        help="Where to compute; auto: the first CUDA GPU when there is one, else the CPU.")(fn)


def _decode_cache_option(ctx, param, value: str) -> str:
    from ernieq.runtime.decode_cache import parse_decode_cache

    parse_decode_cache(value)
    return value


def decode_cache_option(fn):
    """--decode-cache: how much the reference path may keep decoded (``ernieq.runtime.decode_cache``)."""
    return click.option("--decode-cache", default="auto", show_default=True, metavar="auto|off|GiB",
                        callback=_decode_cache_option,
                        help="Reference path (no GPU): keep quantized weights decoded, in the compute dtype, up "
                             "to this many GiB (auto: half the memory available; off: decode on every call).")(fn)


def _join_job(ctx, param, required: bool) -> None:
    """Join the torchrun job this process was started in (``ernieq.distributed``); ``--distributed``: one
    must be there. Rank 0 alone shows progress and prints results; the others print warnings and errors."""
    world = distributed.init(required)
    if not world.main:
        from ernieq.progress import set_quiet

        set_quiet(True)
        console.quiet = True
        for handler in logging.getLogger().handlers:
            handler.setLevel(max(handler.level, logging.WARNING))


distributed_option = click.option(
    "--distributed", is_flag=True, expose_value=False, callback=_join_job,
    help="Run as one rank of a torchrun job (read RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); "
         "under torchrun this is the default.")


def stream_option(fn):
    """--stream/--no-stream: one decoder layer resident at a time (``ernieq.runtime.stream``)."""
    return click.option("--stream/--no-stream", default=None,
                        help="Hold one decoder layer at a time, read from the checkpoint as it runs (evaluation runs "
                             "every window through layer i, then layer i+1, so each weight is read once; generation "
                             "reads every layer once per new token: slow, bounded memory). Default: stream when the "
                             "weights as computed exceed half the memory available on the device.")(fn)


@cli.command("demo-model")
@click.option("--out", "out", type=click.Path(path_type=Path), required=True, help="Folder to write the checkpoint to.")
@click.option("--variant", type=click.Choice(["routed", "exact"]), default="routed", show_default=True,
              help="routed: top-k < E with a fitted router; exact: every expert active, reproduces the dense logits.")
@click.option("--experts", type=int, default=None, help="Routed experts per MoE layer (default: the variant's).")
@click.option("--top-k", type=int, default=None, help="Experts per token (default: the variant's).")
@click.option("--shared", type=int, default=None, help="Shared experts per MoE layer (default: the variant's).")
def demo_model(out: Path, variant: str, experts: int | None, top_k: int | None, shared: int | None) -> None:
    """Write the offline demo ERNIE 4.5 MoE checkpoint (from SmolLM2-135M-Instruct) to OUT: a copy of the
    cached build ($ERNIEQ_CACHE, default ~/.cache/ernieq), built there first if missing."""
    from ernieq.demo import write_demo_model
    from ernieq.model.checkpoint import weights_sha256

    options = {k: v for k, v in {"experts": experts, "top_k": top_k, "shared": shared}.items() if v is not None}
    path = write_demo_model(out, variant, **options)
    console.print(f"demo model ({variant}) written to [bold]{path}[/bold]")
    console.print(f"weights sha256 {weights_sha256(path)} (LC_ALL=C sha256sum *.safetensors | sha256sum)")


def _bits_table(title: str, key: str, rows: list[tuple[str, int, int, float]]) -> Table:
    """A table of (name, weights, bytes, bits per weight) rows."""
    table = Table(title=title)
    for col in (key, "weights", "bytes", "bits/weight"):
        table.add_column(col, justify="left" if col == key else "right")
    for name, weights, nbytes, bits in rows:
        table.add_row(name, f"{weights:,}", _human_bytes(nbytes), f"{bits:.4f}")
    return table


@cli.command()
@click.argument("model")
@click.option("--bits", type=click.Choice(["2", "4", "8"]), default="4", show_default=True,
              help="A plain MODEL is accounted by this recipe (what quantize --bits would keep and why).")
@click.option("--fp8", is_flag=True, help="Account a plain MODEL by the block-FP8 recipe instead.")
@click.option("--recipe", default=None, metavar="FILE|NAME", help="Account a plain MODEL by this recipe instead.")
@click.option("--override", "overrides", multiple=True, metavar="'REGEX=CODEC[:k=v,...]'",
              help="Overrides of that recipe, as quantize takes them.")
def inspect(model: str, bits: str, fp8: bool, recipe: str | None, overrides: tuple[str, ...]) -> None:
    """Print MODEL's layers (dense or MoE, experts, shapes, codecs, parameters, bytes), bits per weight by class,
    and where every parameter goes: quantized (by codec), kept (and why), tied, unclassified.
    MODEL: a plain or quantized folder (ernieq native, or FastDeploy's wint2 layout, split per rank or not)."""
    summary = api.inspect(model, QuantizeOptions(bits=int(bits), fp8=fp8, recipe=recipe, overrides=overrides))
    table = Table(title=f"{model}")
    for col in ("layer", "kind", "experts", "shapes", "codecs", "params", "bytes"):
        table.add_column(col, justify="right" if col in ("experts", "params", "bytes") else "left")
    for s in summary.layers:
        shapes = ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in sorted(s.shapes.items()))
        experts = f"{len(s.experts)}{' +shared' if s.shared_experts else ''}" if s.kind == "moe" else ""
        codecs = ", ".join(sorted(s.codecs))
        table.add_row(s.label, s.kind, experts, shapes, codecs, f"{s.params:,}", _human_bytes(s.bytes))
    total_params = sum(s.params for s in summary.layers)
    total_bytes = summary.stored_bytes
    table.add_row("total", "", "", "", "", f"{total_params:,}", _human_bytes(total_bytes), style="bold")
    console.print(table)
    classes = [(c, summary.params_by_class[c], summary.bytes_by_class[c], summary.bits_per_weight(c))
               for c in sorted(summary.params_by_class)]
    console.print(_bits_table("by tensor class", "class", classes))
    if summary.params_by_codec:
        codecs = [(c, summary.params_by_codec[c], summary.bytes_by_codec[c], summary.codec_bits_per_weight(c))
                  for c in sorted(summary.params_by_codec)]
        console.print(_bits_table("by codec (every stored byte, scales included)", "codec", codecs))
    console.print(_accounting_table(summary))
    moe = sum(s.kind == "moe" for s in summary.layers)
    dense = sum(s.kind == "dense" for s in summary.layers)
    console.print(f"{dense} dense and {moe} MoE layers, {total_params:,} parameters, {_human_bytes(total_bytes)}")
    spec = api.stored_recipe(model)
    if spec is not None:
        from ernieq.recipes import dump

        console.print("recipe (a recipe file: `ernieq quantize MODEL --recipe FILE` makes this checkpoint again):",
                      markup=False, highlight=False, soft_wrap=True)
        console.print(dump(spec), markup=False, highlight=False, soft_wrap=True, end="")


def _comma_strings(ctx, param, value: str | None) -> tuple[str, ...] | None:
    return None if value is None else tuple(v.strip() for v in value.split(",") if v.strip())


def _task_options(f):
    """``--tasks`` and what goes with it, shared by ``eval`` and ``report``."""
    options = [
        click.option("--tasks", callback=_comma_strings, default=None, metavar="NAME[,NAME...]",
                     help="lm-evaluation-harness tasks: lm-eval's names, ernieq's offline 'wikitext2_lastword', names "
                          "in --include-path folders, or task YAML files."),
        click.option("--include-path", "include_paths", multiple=True,
                     type=click.Path(path_type=Path, exists=True, file_okay=False),
                     help="A folder of lm-eval task YAML files (lm-eval's include_path). Repeatable."),
        click.option("--limit", type=click.IntRange(min=1), default=None, help="--tasks: the first N examples per task."),
        click.option("--num-fewshot", type=click.IntRange(min=0), default=None,
                     help="--tasks: few-shot examples (default: each task's own, else 0)."),
        click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True,
                     help="--tasks: requests per forward pass."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _accounting_table(summary) -> Table:
    """Every parameter once: quantized (by codec), kept (and why), tied, extra, unclassified; the model's count."""
    table = Table(title=f"where every parameter goes ({summary.model_class}: {summary.model_params:,} parameters)")
    for col in ("status", "reason", "tensors", "params", "names"):
        table.add_column(col, justify="right" if col in ("tensors", "params") else "left")
    for (status, reason), row in sorted(summary.accounting.items()):
        table.add_row(status, reason, f"{row.tensors:,}", f"{row.params:,}", "\n".join(row.names))
    counted = summary.accounted("quantized", "kept", "unclassified")
    table.add_row("total", "quantized + kept + unclassified", "", f"{counted:,}",
                  "= the model's parameters" if counted == summary.model_params else
                  f"the model has {summary.model_params:,}: the checkpoint is incomplete", style="bold")
    return table


@cli.command("eval")
@click.argument("model")
@click.option("--data", default=None,
              help="Text source for perplexity: a .txt/.jsonl/.raw file or folder, 'wikitext2' (or $ERNIEQ_WIKITEXT2), "
                   "or 'demo'.")
@click.option("--seq-len", type=click.IntRange(min=2), default=2048, show_default=True, help="Window length in tokens.")
@click.option("--max-windows", type=click.IntRange(min=1), default=None, help="Score only the first N windows.")
@_task_options
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Write the result as JSON here.")
@placement_options
@decode_cache_option
@stream_option
def eval_(model: str, data: str | None, seq_len: int, max_windows: int | None, tasks: tuple[str, ...] | None,
          include_paths: tuple[Path, ...], limit: int | None, num_fewshot: int | None, batch_size: int,
          json_path: Path | None, device: str, dtype: str, decode_cache: str, stream: bool | None) -> None:
    """Perplexity of MODEL on DATA (non-overlapping windows, exp(mean token NLL)) and/or lm-evaluation-harness
    TASKS on MODEL as ernieq runs it."""
    if not data and not tasks:
        raise click.UsageError("give --data SRC (perplexity), --tasks NAMES (lm-eval), or both")
    r = None
    if data:
        r = api.evaluate(model, data, seq_len=seq_len, max_windows=max_windows,
                         json_path=None if tasks else json_path, device=device, dtype=dtype, decode_cache=decode_cache,
                         stream=stream)
        console.print(
            f"perplexity [bold]{r.ppl:.4f}[/bold] over {r.tokens:,} tokens "
            f"({r.windows} windows of {r.seq_len}) on {data} in {r.seconds:.1f} s on {describe(r.runtime)}",
            highlight=False,
        )
    if tasks:
        t = api.evaluate_tasks(model, tasks, include_paths=include_paths, limit=limit, num_fewshot=num_fewshot,
                               batch_size=batch_size, json_path=json_path, perplexity=r, device=device, dtype=dtype,
                               decode_cache=decode_cache, stream=stream)
        table = Table(title=f"{model}: lm-evaluation-harness in {t.seconds:.1f} s on {describe(t.runtime)}")
        for col in ("task", "metric", "examples", "shots", "value", "stderr"):
            table.add_column(col, justify="left" if col in ("task", "metric") else "right")
        for task in t.tasks:
            for m in task["metrics"]:
                table.add_row(task["task"], m["metric"], str(task["samples"]), str(task["num_fewshot"]),
                              f"{m['value']:.4f}", "" if m["stderr"] is None else f"{m['stderr']:.4f}")
        console.print(table)


@cli.group(invoke_without_command=True)
@click.pass_context
def recipes(ctx: click.Context) -> None:
    """List the shipped recipes (`ernieq recipes show NAME` prints one; `quantize --recipe NAME|FILE` uses one)."""
    if ctx.invoked_subcommand is not None:
        return
    from ernieq.recipes import load_recipe, shipped_names

    table = Table(title="shipped recipes")
    table.add_column("name")
    table.add_column("what it does")
    for name in shipped_names():
        table.add_row(name, load_recipe(name).description)
    console.print(table)


@recipes.command("show")
@click.argument("name")
def recipes_show(name: str) -> None:
    """Print the shipped recipe NAME (a YAML file; copy it to start your own)."""
    from ernieq.recipes import shipped_text

    console.print(shipped_text(name), markup=False, highlight=False, soft_wrap=True, end="")


PRESET_OPTIONS = ("bits", "fp8", "fp8_activations", "group_size", "sym", "w4_moe_layers")  # pick and set a shipped recipe


@cli.command()
@distributed_option
@click.argument("model")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for the quantized checkpoint.")
@click.option("--recipe", default=None, metavar="FILE|NAME",
              help="A recipe file (YAML: rules, rounding, rotations, calibration; see the README) or a shipped "
                   "recipe's name (`ernieq recipes`), instead of --bits/--fp8.")
@click.option("--bits", type=click.Choice(["2", "4", "8"]), default="4", show_default=True,
              help="8: wint8 everywhere; 4: wint4 everywhere; 2: the FastDeploy 2-bit recipe (wint8 attention/dense/"
                   "shared, wint4 routed experts of the first MoE layers, ccq2 for the rest).")
@click.option("--fp8", is_flag=True, help="Block FP8 (128x128, float8_e4m3fn) everywhere instead of --bits.")
@click.option("--fp8-activations", type=click.Choice(["dynamic", "none"]), default="dynamic", show_default=True,
              help="With --fp8: 'dynamic' (W8A8): activations are quantized to fp8 per token and 128-channel group "
                   "at run time, as the hf-fp8 and compressed-tensors exports declare; 'none': weight-only FP8 "
                   "(activations stay in the model's dtype; exported by compressed-tensors only).")
@click.option("--group-size", type=click.Choice(["32", "64", "128", "channel"]), default=str(W4_GROUP_SIZE),
              show_default=True, help="wint4 group size along K, float16 scales ('channel': one float32 scale per "
                                      "output channel).")
@click.option("--sym/--asym", default=True, show_default=True, help="wint4 symmetric, or with a zero point.")
@click.option("--w4-moe-layers", type=click.IntRange(min=0), default=None,
              help="--bits 2: how many leading MoE layers keep wint4 experts (default: FastDeploy's 300B share, 4 of 51, rounded up).")
@click.option("--override", "overrides", multiple=True, metavar="'REGEX=CODEC[:k=v,...]'",
              help="Codec for the weights whose name matches REGEX (first match wins; CODEC 'none' keeps a weight). Repeatable.")
@click.option("--calib-data", default=None, metavar="SRC",
              help="Collect calibration statistics from SRC's calibration split first (e.g. 'demo' or a text file).")
@click.option("--calib", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="Reuse statistics saved by `ernieq calibrate`.")
@click.option("--calib-tokens", type=click.IntRange(min=1), default=64 * 512, show_default=True,
              help="Calibration tokens for --calib-data.")
@click.option("--calib-seq-len", type=click.IntRange(min=2), default=512, show_default=True,
              help="Calibration sequence length for --calib-data.")
@click.option("--all-experts", is_flag=True,
              help="With --calib-data: every routed expert also sees every calibration token (statistics only).")
@click.option("--method", type=click.Choice(["rtn", "gptq", "awq", "tune"]), default=None,
              help="Rounding: round-to-nearest; GPTQ error feedback; AWQ (per-input-channel scales searched on "
                   "the statistics and folded into the norms and up projections, then round-to-nearest); or tune: "
                   "GPTQ, then each layer's stored scales and rounding tuned against the unquantized layer's "
                   "outputs, keeping GPTQ's result where held-out tokens say tuning did not help (sequential; "
                   "needs --calib-data; the demo on 2 cores: about 18 minutes with the end-to-end steps, against 4 "
                   "for gptq; measurements in the README). "
                   "Default: gptq with statistics, rtn without.")
@click.option("--awq", is_flag=True,
              help="With gptq or tune: AWQ's per-input-channel scales searched on each layer's statistics and "
                   "folded into the norms and up projections (an exact fold every format stores) before GPTQ; "
                   "off by default: on the demo it did not lower the tuned FastDeploy-exportable checkpoint's "
                   "perplexity (measurements in the README).")
@click.option("--tune-steps", type=click.IntRange(min=0), default=20, show_default=True,
              help="--method tune: signed-gradient steps per decoder layer.")
@click.option("--tune-lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="--method tune: the rounding offsets' first step (falls linearly to 0) [default: 1 / steps].")
@click.option("--tune-rounding", is_flag=True,
              help="--method tune: the integer grids (wint4, wint8) also tune each weight's rounding (AutoRound's "
                   "offsets, so codes may change), not only their group scales.")
@click.option("--tune-seed", type=int, default=0, show_default=True,
              help="--method tune: the seed of the order the calibration sequences are stepped on (to see how much "
                   "a result owes to it).")
@click.option("--tune-target", type=click.Choice(TUNE_TARGETS), default=TUNE_TARGETS[0], show_default=True,
              help="--method tune: each layer matches the unquantized layer's outputs on the quantized model's own "
                   "inputs (local), or the unquantized model's hidden states (model, AutoRound's: the layer also "
                   "makes up for the error the earlier layers left; one more copy of the calibration states).")
@click.option("--tune-model-steps", type=click.IntRange(min=0), default=20, show_default=True,
              help="--method tune: after the layers, steps of every layer's stored scales tuned together against the "
                   "unquantized model's output distribution (KL on the calibration tokens; kept only where it lowers "
                   "the KL on held-out ones); 0: none.")
@click.option("--tune-model-lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="--method tune: the end-to-end steps' first step (falls linearly to 0) [default: 2 / "
                   "--tune-model-steps for ccq2's scales, a fifth of it for wint4's and wint8's].")
@click.option("--target-bits", type=click.FloatRange(min=0, min_open=True), default=None, metavar="B",
              help="Mix the codecs the recipe gives routed experts (--bits 2: wint4 and ccq2) per MoE layer by "
                   "measured sensitivity (round-to-nearest output error on the statistics) to at most B bits per "
                   "routed expert weight, scales counted. Needs --calib-data or --calib; with --sequential or "
                   "--method tune it is chosen first, on a pass over the unquantized model.")
@click.option("--rotate/--no-rotate", default=None,
              help="Store the wint4 and ccq2 weights turned by orthogonal input rotations that ernieq's runtime "
                   "applies (incoherence: outliers spread over all inputs). Default: on for --format native, "
                   "which alone can carry them.")
@click.option("--sequential", is_flag=True,
              help="Calibrate each layer on the outputs of the already quantized layers before it "
                   "(with --calib-data; about twice the calibration time).")
@click.option("--format", "fmt", type=click.Choice(["native", *format_names()]), default="native", show_default=True,
              help="Checkpoint format written to OUT: native (ernieq), compressed-tensors (vLLM), hf-fp8 (transformers), "
                   "fastdeploy (FastDeploy's 2-bit wint2; quantizes without rotations).")
@click.option("--tp", type=click.IntRange(min=1), default=1, show_default=True,
              help="--format fastdeploy: write the split FastDeploy loads on TP GPUs (folders rank0 .. rank{TP-1}).")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Encoder processes on the CPU [default: every usable core, for tensor groups of 16 M weights or more]; "
                   "with --device on a GPU the weights are encoded there.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@placement_options
def quantize(model: str, out: Path, recipe: str | None, bits: str, fp8: bool, fp8_activations: str, group_size: str,
             sym: bool, w4_moe_layers: int | None, overrides: tuple[str, ...], calib_data: str | None,
             calib: Path | None, calib_tokens: int, calib_seq_len: int, all_experts: bool, method: str | None,
             awq: bool, tune_steps: int, tune_lr: float | None, tune_rounding: bool, tune_seed: int,
             tune_target: str, tune_model_steps: int, tune_model_lr: float | None, target_bits: float | None, rotate: bool | None, sequential: bool, fmt: str, tp: int,
             workers: int | None, overwrite: bool, device: str, dtype: str) -> None:
    """Quantize MODEL's linear weights and write the checkpoint to OUT.

    A run that was killed leaves .OUT.ernieq-tmp (and, with --calib-data, the calibration pass's folders) beside
    OUT: the same command resumes from the tensor groups already written, and a calibration, sequential or tuning
    pass from its last finished decoder layer (the end-to-end tuning from its last step), and gives the same bytes. --device: where calibration, GPTQ/AWQ, rotations and encoding
    run; --dtype: the calibration pass's compute dtype (weights are rounded in float32)."""
    ctx = click.get_current_context()
    given = [p for p in PRESET_OPTIONS if ctx.get_parameter_source(p) not in (None, click.core.ParameterSource.DEFAULT)]
    if recipe is not None and given:
        raise click.UsageError(f"--{given[0].replace('_', '-')} sets a --bits preset; with --recipe, write it in "
                               f"the recipe file")
    group = None if group_size == "channel" else int(group_size)
    options = QuantizeOptions(recipe=recipe, bits=int(bits), fp8=fp8, fp8_activations=fp8_activations,
                              group_size=group, symmetric=sym, w4_moe_layers=w4_moe_layers,
                              overrides=overrides, rotate=rotate, method=method, awq=awq, calib_data=calib_data, calib=calib,
                              calib_tokens=calib_tokens, calib_seq_len=calib_seq_len, all_experts=all_experts,
                              sequential=sequential, tune_steps=tune_steps, tune_lr=tune_lr,
                              tune_rounding=tune_rounding, tune_seed=tune_seed, tune_target=tune_target,
                              tune_model_steps=tune_model_steps, tune_model_lr=tune_model_lr,
                              target_bits=target_bits,
                              format=fmt, tp=tp, overwrite=overwrite, workers=workers, device=device, dtype=dtype)
    summary = api.quantize(model, out, options=options)
    data = summary.to_json()
    table = Table(title=f"{out} ({summary.recipe})")
    for col in ("class", "weights", "codecs", "bytes before", "bytes after", "bits/weight"):
        table.add_column(col, justify="left" if col in ("class", "codecs") else "right")
    for name, row in data["classes"].items():
        codecs = ", ".join(f"{k} {v / row['weights']:.0%}" for k, v in sorted(row["codecs"].items()))
        table.add_row(name, f"{row['weights']:,}", codecs, _human_bytes(row["bytes_before"]),
                      _human_bytes(row["bytes_after"]), f"{row['bits_per_weight']:.3f}")
    console.print(table)
    kept = Table(title="left as they are, and why")
    for col in ("reason", "tensors", "params", "names"):
        kept.add_column(col, justify="right" if col in ("tensors", "params") else "left")
    for reason, row in data["kept"].items():
        kept.add_row(reason, f"{row['tensors']:,}", f"{row['params']:,}", "\n".join(row["names"]))
    console.print(kept)
    if summary.mix is not None:
        mix = summary.mix.to_json()
        table = Table(title=f"--target-bits {mix['target_bits']:g}: routed experts per MoE layer "
                            f"({mix['bits_per_weight']:.3f} bits per weight)")
        table.add_column("layer", justify="right")
        table.add_column("codec")
        for cand in mix["candidates"]:
            table.add_column(f"error {cand}", justify="right")
        for row in mix["layers"]:
            table.add_row(str(row["layer"]), row["chosen"], *(f"{e:.4g}" for e in row["error"]))
        console.print(table)
    console.print(
        f"{data['bits_per_weight_all']:.3f} bits per weight over all weights, "
        f"{data['bits_per_weight_quantized']:.3f} over the quantized classes; "
        f"{_human_bytes(data['bytes_before'])} → {_human_bytes(data['bytes_after'])} in {summary.seconds:.1f} s"
    )


@cli.command()
@distributed_option
@click.argument("model")
@click.option("--data", required=True, metavar="SRC",
              help="Calibration text: 'demo' (its calibration split), a .txt/.jsonl file or folder. Never the text you evaluate on.")
@click.option("--tokens", type=click.IntRange(min=1), default=64 * 512, show_default=True, help="Calibration tokens.")
@click.option("--seq-len", type=click.IntRange(min=2), default=512, show_default=True, help="Sequence length.")
@click.option("--all-experts", is_flag=True,
              help="Extra pass: every routed expert sees every token (statistics only; the model's output is unchanged).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for the statistics: stats-NNNNN.safetensors (one per decoder layer) + summary.json.")
@placement_options
def calibrate(model: str, data: str, tokens: int, seq_len: int, all_experts: bool, out: Path, device: str,
              dtype: str) -> None:
    """Run MODEL over calibration text layer by layer and save per-layer, per-expert statistics.

    Each decoder layer runs on --device, one layer's weights there at a time (statistics in float32). A run that
    was killed resumes after its last finished layer when the same command is run again (the hidden states
    the next layer needs are saved in OUT); a finished one is read back."""
    cset = api.calibrate(model, data, tokens=tokens, seq_len=seq_len, all_experts=all_experts, out=out,
                         device=device, dtype=dtype)
    cold = cset.cold_experts()
    console.print(f"statistics of {cset.info.get('tokens', 0):,} tokens written to [bold]{out}[/bold]; "
                  f"{len(cold)} of {len(cset.experts)} routed experts cold")
    for row in cold[:20]:
        console.print(f"  cold: layer {row.layer} expert {row.expert}: {row.tokens} tokens ({row.share:.2%})")


@cli.command("export")
@click.argument("qdir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--format", "fmt", type=click.Choice(format_names()), required=True,
              help="compressed-tensors: vLLM (wint4/wint8/fp8); hf-fp8: transformers' block FP8 (--fp8 only); "
                   "fastdeploy: FastDeploy's 2-bit wint2 (--bits 2, no rotations).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for the exported checkpoint.")
@click.option("--tp", type=click.IntRange(min=1), default=1, show_default=True,
              help="--format fastdeploy: write the split FastDeploy loads on TP GPUs (folders rank0 .. rank{TP-1}).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def export(qdir: Path, fmt: str, out: Path, tp: int, overwrite: bool) -> None:
    """Convert the ernieq checkpoint QDIR into another format at OUT."""
    path = api.export(qdir, out, fmt, tp=tp, overwrite=overwrite)
    console.print(f"{qdir} exported as {fmt} to [bold]{path}[/bold]")


@cli.command()
@click.argument("model")
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@placement_options
@decode_cache_option
@stream_option
def generate(model: str, prompt: str, max_new_tokens: int, device: str, dtype: str, decode_cache: str,
             stream: bool | None) -> None:
    """Greedy continuation of PROMPT by MODEL (plain or quantized), printed token by token as it is produced."""
    click.echo(prompt, nl=False)
    api.generate(model, prompt, max_new_tokens=max_new_tokens, device=device, dtype=dtype, decode_cache=decode_cache,
                 stream=stream, on_token=lambda text: click.echo(text, nl=False))
    click.echo()


@cli.command()
@click.argument("qdir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--baseline", required=True, help="The unquantized model QDIR was made from (a folder or 'demo').")
@click.option("--data", required=True, metavar="SRC[,SRC...]",
              help="Comma list of text sources scored for perplexity: 'wikitext2', 'demo', a .txt/.jsonl file or folder.")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Folder for report.json, report.md, report.html (self-contained) and plots/.")
@click.option("--calib", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="Calibration statistics of the baseline (`ernieq calibrate`): output error, tokens per expert, cold experts.")
@click.option("--compare", "compare", multiple=True, type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="Another quantized checkpoint (ernieq or FastDeploy) of the same baseline to score too "
                   "(perplexity vs bits). Repeatable.")
@click.option("--seq-len", type=click.IntRange(min=2), default=2048, show_default=True, help="Window length in tokens.")
@click.option("--max-windows", type=click.IntRange(min=1), default=4, show_default=True,
              help="Windows scored per corpus (every model on the same windows).")
@_task_options
@placement_options
@decode_cache_option
@stream_option
def report(qdir: Path, baseline: str, data: str, out: Path, calib: Path | None, compare: tuple[Path, ...],
           seq_len: int, max_windows: int, tasks: tuple[str, ...] | None, include_paths: tuple[Path, ...],
           limit: int | None, num_fewshot: int | None, batch_size: int, device: str, dtype: str,
           decode_cache: str, stream: bool | None) -> None:
    """Accuracy report of the quantized checkpoint QDIR (ernieq or FastDeploy) against its baseline: perplexity, KL,
    top-1, lm-eval task accuracy (--tasks), per-layer and per-expert error, bits by tensor class, calibration
    coverage, plots."""
    from ernieq.eval.tasks import TaskOptions

    sources = tuple(s.strip() for s in data.split(",") if s.strip())
    task_options = TaskOptions(tasks, tuple(map(str, include_paths)), limit, num_fewshot, batch_size) if tasks else None
    result = api.report(qdir, baseline, sources, out, calib=calib, compare=compare, seq_len=seq_len,
                        max_windows=max_windows, tasks=task_options, device=device, dtype=dtype,
                        decode_cache=decode_cache, stream=stream)
    for c in result["perplexity"]:
        base, q = c["ppl"]["baseline"], c["ppl"]["quantized"]
        console.print(f"{c['corpus']}: perplexity {base:.4f} → [bold]{q:.4f}[/bold] ({q / base - 1:+.2%}) over "
                      f"{c['tokens']:,} tokens; KL {c['kl_mean']['quantized']:.4f}, top-1 agreement "
                      f"{c['top1_agreement']['quantized']:.2%}")
    for row in (result["tasks"] or {}).get("rows", []):
        diffs = ", ".join(f"{label} {v:+.4f}" for label, v in row["diff"].items())
        console.print(f"{row['task']} {row['metric']}: baseline {row['value']['baseline']:.4f}; {diffs}")
    console.print(f"report written to [bold]{out / 'report.html'}[/bold] (and report.md, report.json)")


@cli.command()
@click.argument("qdir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Folder to write (default: QDIR-hub beside QDIR).")
@click.option("--name", default=None, help="The model's name in the card (default: the output folder's name).")
@click.option("--report", "report_dir", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="An `ernieq report` folder: its accuracy table goes into the card and its files into report/. "
                   "Without it the card carries no accuracy numbers and says so.")
@click.option("--base-model", default=None, help="The base model (folder or 'demo'; default: the report's baseline), "
                                                 "for the card and its license.")
@click.option("--push-to-hub", "push_to_hub", default=None, metavar="REPO",
              help="Upload the folder to this Hugging Face repository (needs network and a token).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def publish(qdir: Path, out: Path | None, name: str | None, report_dir: Path | None, base_model: str | None,
            push_to_hub: str | None, overwrite: bool) -> None:
    """Hub-ready folder of QDIR: model card, config, tokenizer, report, LICENSE, SHA256SUMS."""
    path = api.publish(qdir, out, name=name, report_dir=report_dir, base_model=base_model, push_to_hub=push_to_hub,
                       overwrite=overwrite)
    console.print(f"published to [bold]{path}[/bold]; check it with `ernieq verify {path}`")


@cli.command()
@click.argument("folder", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--no-smoke", is_flag=True, help="Skip the perplexity smoke test (files, sums and shapes only).")
@placement_options
@decode_cache_option
@stream_option
def verify(folder: Path, no_smoke: bool, device: str, dtype: str, decode_cache: str, stream: bool | None) -> None:
    """Re-check a published folder: every SHA-256 sum, every tensor, shapes and dtypes, a perplexity smoke test."""
    r = api.verify(folder, smoke=not no_smoke, device=device, dtype=dtype, decode_cache=decode_cache, stream=stream)
    smoke = (f"; smoke-test perplexity {r.smoke_ppl:.2f} over {r.smoke_tokens} tokens on {describe(r.runtime)}"
             if r.smoke_ppl else "")
    console.print(f"[bold green]ok[/bold green]: {r.files} files, {r.tensors} tensors, {r.modules} quantized "
                  f"modules{smoke}")


def _comma_ints(ctx, param, value: str | None) -> tuple[int, ...] | None:
    try:
        return None if value is None else tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"a comma list of integers, got {value!r}") from None


def _command_line(ctx: click.Context) -> str:
    """The command as typed, rebuilt from the options that were given (for the report's header)."""
    words = ["ernieq", ctx.info_name]
    for param in ctx.command.params:
        if ctx.get_parameter_source(param.name) in (None, click.core.ParameterSource.DEFAULT):
            continue
        value = ctx.params[param.name]
        if isinstance(param, click.Argument):
            words.append(str(value))
        elif getattr(param, "is_flag", False):
            words.append((param.opts if value else param.secondary_opts)[0])
        else:
            words += [param.opts[0], ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    return " ".join(words)


KERNEL_OPTIONS = ("out", "quick", "budget_s", "codecs", "models", "m", "dense", "moe", "sweep", "save_configs")
MODEL_OPTIONS = ("baseline", "batches", "prompt_len", "new_tokens", "json_path", "compile_", "decode_cache", "stream")


def _given(ctx: click.Context, names: tuple[str, ...]) -> list[str]:
    """The options among ``names`` that were typed on the command line, as typed (--quick)."""
    given = [p for p in ctx.command.params if p.name in names
             and ctx.get_parameter_source(p.name) not in (None, click.core.ParameterSource.DEFAULT)]
    return [p.opts[0] for p in given]


def _print_report(report) -> None:
    """A benchmark's ``ernieq.bench.report.Report``: banner, header lines, the table."""
    if report.banner:
        console.print(f"[bold yellow]{report.banner}[/bold yellow]", soft_wrap=True)
    for line in report.header[2:]:
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    table = Table()
    for col in report.columns:
        table.add_column(col, justify="left" if col in report.text_columns else "right")
    for row in report.rows:
        table.add_row(*row.cells())
    console.print(table)


@cli.command()
@click.argument("model", required=False)
@click.option("--kernels", is_flag=True, help="The per-kernel benchmark instead of a MODEL's throughput.")
@click.option("--baseline", default=None, help="MODEL: also measure this model (folder, demo or hub id) and the ratio.")
@click.option("--batch", "batches", callback=_comma_ints, default="1,8,32", show_default=True, metavar="LIST",
              help="MODEL: comma list of batch sizes.")
@click.option("--prompt-len", type=click.IntRange(min=1), default=512, show_default=True,
              help="MODEL: prompt tokens per sequence (prefilled).")
@click.option("--new-tokens", type=click.IntRange(min=1), default=128, show_default=True,
              help="MODEL: tokens decoded per sequence, one step each.")
@click.option("--json", "json_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="MODEL: write every figure as JSON here.")
@click.option("--compile/--no-compile", "compile_", default=None,
              help="MODEL: decode through torch.compile (CUDA graphs); default: on CUDA, falling back to eager.")
@decode_cache_option
@stream_option
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="--kernels: also write the table as markdown here (rewritten after every case).")
@click.option("--quick", is_flag=True, help="--kernels: fewer M values (GPU: 1, 16, 4096; CPU: 1, 16 and two GEMMs).")
@click.option("--budget-s", type=click.FloatRange(min=0), default=420.0, show_default=True,
              help="--kernels: start no new case after this many seconds.")
@click.option("--codecs", callback=_comma_strings, default=None, metavar="LIST",
              help="--kernels: comma list of codecs (default: wint8,wint4,fp8,ccq2).")
@click.option("--models", callback=_comma_strings, default=None, metavar="LIST",
              help="--kernels: comma list of model shapes: 21b, 300b (default: both on a GPU, 21b on the CPU).")
@click.option("--m", "m", callback=_comma_ints, default=None, metavar="LIST",
              help="--kernels: comma list of M (tokens) instead of the default.")
@click.option("--dense/--no-dense", default=True, help="--kernels: time the dense GEMMs (attention, one expert).")
@click.option("--moe/--no-moe", default=True, help="--kernels: time whole MoE layers (not on the CPU under --quick).")
@click.option("--sweep", is_flag=True, help="--kernels, GPU: also time a few tile configurations per case.")
@click.option("--save-configs", is_flag=True,
              help="--kernels, with --sweep: store the fastest tiles in the launchers' tile table.")
@placement_options
def bench(model: str | None, kernels: bool, baseline: str | None, batches: tuple[int, ...], prompt_len: int,
          new_tokens: int, json_path: Path | None, compile_: bool | None, decode_cache: str, stream: bool | None,
          out: Path | None,
          quick: bool, budget_s: float, codecs: tuple[str, ...] | None, models: tuple[str, ...] | None,
          m: tuple[int, ...] | None, dense: bool, moe: bool, sweep: bool, save_configs: bool, device: str,
          dtype: str) -> None:
    """Throughput of MODEL (and --baseline) per batch size: prefill and decode tokens/s, peak memory, weight
    bytes; or, with --kernels, the kernels per codec and shape (ERNIE 4.5 21B/300B). Triton on a GPU, else
    the reference path on the CPU, labelled so."""
    ctx = click.get_current_context()
    if (model is not None) == kernels:
        raise ErnieqError("bench: give a MODEL (whole-model throughput) or --kernels (per-kernel timings)"
                          + (", not both" if kernels else ""))
    stray = _given(ctx, MODEL_OPTIONS if kernels else KERNEL_OPTIONS)
    if stray:
        what = "options of a MODEL's benchmark, not of --kernels" if kernels else "options of --kernels only"
        raise ErnieqError(f"bench: {', '.join(stray)}: {what}")
    if kernels:
        report = api.bench(out=out, quick=quick, budget_s=budget_s, codecs=codecs, models=models, m=m, dense=dense,
                           moe=moe, sweep=sweep, save_configs=save_configs, device=device, dtype=dtype,
                           command=_command_line(ctx))
    else:
        report = api.bench_model(model, baseline, batches=batches, prompt_len=prompt_len, new_tokens=new_tokens,
                                 compile=compile_, json_path=json_path, command=_command_line(ctx), device=device,
                                 dtype=dtype, decode_cache=decode_cache, stream=stream).report
    _print_report(report)
    if json_path is not None:
        console.print(f"wrote {json_path}", highlight=False)
    if report.failures:
        raise ErnieqError(f"bench: {len(report.failures)} case(s) failed or errored; see the note column")


def main() -> None:
    """Console entry point: an ErnieqError becomes one line on stderr and exit code 1."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except click.ClickException as err:  # a bad option or argument: one line too, with where to read more
        ctx = getattr(err, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        err_console.print(f"[bold red]error:[/bold red] {escape(_one_line(err.format_message()))}{escape(hint)}",
                          highlight=False, soft_wrap=True)
        sys.exit(err.exit_code)
    except ErnieqError as err:
        _fail(err)
    except Exception:
        if (stop := distributed.stopped()) is None:
            raise
        _fail(stop)  # the launcher's SIGTERM came out of a library call as that library's error


def _fail(err: ErnieqError) -> None:
    """``err`` as one line on stderr (naming this rank under torchrun), then exit code 1."""
    distributed.ending()
    world = distributed.world()
    rank = f"{world}: " if world.size > 1 and not isinstance(err, distributed.DistributedError) else ""
    err_console.print(f"[bold red]error:[/bold red] {escape(rank + _one_line(str(err)))}", highlight=False,
                      soft_wrap=True)
    sys.exit(1)


def _one_line(message: str) -> str:
    """A message on one line (a wrapped library message keeps its words)."""
    return " ".join(part.strip() for part in message.splitlines() if part.strip())


if __name__ == "__main__":
    main()
