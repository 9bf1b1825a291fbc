"""The settings ``benchmarks/peers.py`` compares, in one registry.

A setting builds one checkpoint of the model (``build(ctx) -> Built``); ``peers.py``
then evaluates it, each setting in its own process. Adding an ernieq setting is one
line: ``ernieq("name", "METHOD", bits=..., method=..., ...)`` with the keyword
arguments of :func:`ernieq.api.quantize`. A peer that rounds some tensors differently
from ernieq swaps codecs inside ernieq's own recipe (``swap={"ccq2": choice}``), so
it quantizes exactly the tensors ernieq puts in that codec and everything else as the
recipe does; the table's "what is quantized" column is written from that recipe.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import hqq_peer  # noqa: F401  (registers the hqq peer codec)
import int2_baseline  # noqa: F401  (registers the int2g64 baseline codec)
from ernieq import api
from ernieq.config import CodecChoice, QuantConfig, Rule, in_spans
from ernieq.recipes import preset as recipe
from ernieq.errors import ErnieqError
from ernieq.formats.native import NativeReader
from ernieq.model.adapters import LINEAR_CLASSES, adapter_for
from ernieq.model.checkpoint import CheckpointReader
from ernieq.quantize import moe_ordinals

FLOAT_BITS = 32.0  # the demo checkpoints are float32

HQQ_W4 = CodecChoice("hqq", (("nbits", 4), ("group_size", 64)))
HQQ_W2 = CodecChoice("hqq", (("nbits", 2), ("group_size", 64)))
W4_G64_F32 = CodecChoice("wint4", (("group_size", 64), ("symmetric", True), ("clip", True)))
W4_G128 = CodecChoice("wint4", (("group_size", 128), ("symmetric", True), ("clip", True), ("scale_dtype", "float16")))
INT2_G64_FP16 = CodecChoice("int2g64", (("group_size", 64), ("fp16_zero", True)))  # 2.5 bits per weight


@dataclass(frozen=True)
class Context:
    """What every setting gets. model: the source checkpoint folder; calib: saved ernieq
    calibration statistics (``ernieq calibrate ... --out``) or None to collect from
    ``calib_data`` (never the evaluation text); work: an empty scratch folder."""

    model: Path
    work: Path
    calib: Path | None = None
    calib_data: str = "demo"
    calib_tokens: int = 64 * 512
    calib_seq_len: int = 512


@dataclass(frozen=True)
class Built:
    """The checkpoint to evaluate and what quantization stored.

    bits_per_weight: every stored byte over the weights of the tensor classes that have
    quantized weights (``ernieq quantize``'s ``bits_per_weight_quantized``);
    by_codec: bits per weight of each codec's tensors; quantized: which tensors got which codec.
    """

    model: Path
    bits_per_weight: float
    by_codec: dict[str, float] = field(default_factory=dict)
    quantized: str = "nothing"
    quantize_seconds: float = 0.0


@dataclass(frozen=True)
class Setting:
    """build: makes the checkpoint that peers.py's child evaluates; or external: the command line of a
    child that quantizes and evaluates by itself (given peers.py's options and the result file to write)."""

    name: str
    method: str  # how weights are rounded: RTN, GPTQ, HQQ, ...
    build: Callable[[Context], Built] | None = None
    needs_calib: bool = False
    requires: tuple[str, ...] = ()  # modules only this setting imports (benchmark-only dependencies)
    requires_env: tuple[str, ...] = ()  # environment variables it needs
    external: Callable[[object, Path], list[str]] | None = None

    def missing(self) -> list[str]:
        return ([m for m in self.requires if importlib.util.find_spec(m) is None]
                + [f"${v}" for v in self.requires_env if not os.environ.get(v)])


SETTINGS: dict[str, Setting] = {}


def register(setting: Setting) -> Setting:
    if setting.name in SETTINGS:
        raise ValueError(f"setting {setting.name!r} registered twice")
    SETTINGS[setting.name] = setting
    return setting


def moe_layers(model: Path) -> list[int]:
    """The indices of ``model``'s decoder layers that have routed experts, in order (ordinal -> layer)."""
    reader = CheckpointReader(model)
    return sorted(moe_ordinals(reader, adapter_for(reader.config, str(model / "config.json"))))


def swapped_recipe(model: Path, swap: dict[str, CodecChoice], **recipe_kwargs) -> QuantConfig:
    """ernieq's recipe for ``model`` with every rule choosing codec X choosing ``swap[X]`` instead."""
    base = recipe(num_moe_layers=len(moe_layers(model)), **recipe_kwargs)  # QuantizeOptions fields
    found = {r.choice.codec for r in base.rules if r.choice is not None}
    absent = set(swap) - found
    if absent:
        raise ErnieqError(f"recipe {base.recipe} has no rule with codec(s) {sorted(absent)} to swap")
    rules = tuple(dataclasses.replace(r, choice=swap.get(r.choice.codec, r.choice)) if r.choice else r
                  for r in base.rules)
    name = base.name + "".join(f"+{old}->{new.describe()}" for old, new in swap.items())
    return QuantConfig(name, rules, base.rotate)


def _span(layers: list[int]) -> str:
    return "none" if not layers else f"{layers[0]}" if len(layers) == 1 else f"{layers[0]}-{layers[-1]}"


def describe_rule(rule: Rule, layers: list[int]) -> str:
    """One rule in words, e.g. ``routed_experts of layers 4-29: hqq:nbits=2,group_size=64``.
    layers: the MoE layers' indices (the rules count MoE layers by ordinal)."""
    classes = "every linear" if rule.classes == LINEAR_CLASSES else "/".join(c.value for c in rule.classes)
    where = [f"/{rule.pattern}/"] if rule.pattern else []
    if rule.moe_layers is not None:
        where.append(f"of layers {_span([layer for i, layer in enumerate(layers) if in_spans(i, rule.moe_layers)])}")
    scope = " ".join([classes, *where])
    return f"{scope}: {rule.choice.describe() if rule.choice else 'kept'}"


def describe_config(config: QuantConfig, layers: list[int]) -> str:
    """The rules in order, first match wins; ``other linears`` for a catch-all after others."""
    parts = [describe_rule(r, layers) for r in config.rules]
    if len(parts) > 1:
        parts[-1] = parts[-1].replace("every linear:", "other linears:", 1)
    return "; ".join(parts)


def bits_by_codec(checkpoint: Path) -> dict[str, float]:
    """Bits per weight of each codec's stored tensors in an ernieq native checkpoint."""
    reader = NativeReader(checkpoint)
    size: dict[str, list[int]] = {}
    for base in reader.modules:
        q = reader.quantized(base)
        acc = size.setdefault(q.codec, [0, 0])
        acc[0] += q.nbytes
        acc[1] += q.num_weights
    return {codec: 8.0 * b / n for codec, (b, n) in sorted(size.items())}


def ernieq(name: str, label: str, *, swap: dict[str, CodecChoice] | None = None,
           requires: tuple[str, ...] = (), **quantize_kwargs) -> Setting:
    """Register a setting that runs :func:`ernieq.api.quantize` with ``quantize_kwargs``.

    label: the table's method column, and ernieq's ``method`` (lower-cased) unless given;
    every method but ``rtn`` gets the shared calibration statistics."""
    quantize_kwargs.setdefault("method", label.lower())
    needs_calib = quantize_kwargs["method"] != "rtn"
    recipe_keys = ("bits", "fp8", "group_size", "symmetric", "w4_moe_layers", "overrides", "rotate")

    def build(ctx: Context) -> Built:
        out = ctx.work / name
        kwargs = dict(quantize_kwargs)
        if swap:
            config = swapped_recipe(ctx.model, swap, **{k: kwargs.pop(k) for k in recipe_keys if k in kwargs})
        else:
            config = recipe(num_moe_layers=len(moe_layers(ctx.model)),
                            **{k: kwargs[k] for k in recipe_keys if k in kwargs})
        if needs_calib and ctx.calib is not None and not kwargs.get("sequential"):
            kwargs["calib"] = ctx.calib
        elif needs_calib:
            kwargs.update(calib_data=ctx.calib_data, calib_tokens=ctx.calib_tokens, calib_seq_len=ctx.calib_seq_len)
        start = time.perf_counter()
        summary = api.quantize(ctx.model, out, config if swap else None, progress=False, **kwargs).to_json()
        seconds = time.perf_counter() - start
        return Built(out, summary["bits_per_weight_quantized"], bits_by_codec(out),
                     describe_config(config, moe_layers(ctx.model)), seconds)

    return register(Setting(name, label, build, needs_calib, requires))


def _unquantized(ctx: Context) -> Built:
    return Built(ctx.model, FLOAT_BITS)


register(Setting("unquantized", "-", _unquantized))
# ernieq: --bits 4 (G = 64, float16 scales: 4.25 bits per weight; "-g128": G = 128, 4.125); --bits 2. "+rot": the
# online input rotations of ernieq's own format (--rotate); without them the checkpoint also exports to
# vLLM / FastDeploy. "+seq": sequential calibration (--sequential, calibrated while quantizing).
for _bits in (4, 2):
    ernieq(f"ernieq-w{_bits}-rtn", "RTN", bits=_bits, rotate=False)
    ernieq(f"ernieq-w{_bits}-awq", "AWQ", bits=_bits, rotate=False)
    ernieq(f"ernieq-w{_bits}-gptq", "GPTQ", bits=_bits, rotate=False)
    ernieq(f"ernieq-w{_bits}-gptq-rot", "GPTQ+rot", method="gptq", bits=_bits, rotate=True)
    ernieq(f"ernieq-w{_bits}-gptq-rot-seq", "GPTQ+rot+seq", method="gptq", bits=_bits, rotate=True, sequential=True)
ernieq("ernieq-w4-gptq-rot-g128", "GPTQ+rot", method="gptq", bits=4, group_size=128, rotate=True)
# the same with float32 scales (4.5 bits per weight): what storing them in float16 costs
ernieq("ernieq-w4-gptq-rot-f32", "GPTQ+rot", method="gptq", bits=4, rotate=True, swap={"wint4": W4_G64_F32})
# --bits 2 with the ccq2 experts at 4 bits instead: how close to the unquantized model 4-bit experts get
ernieq("ernieq-w2-experts-at-w4", "GPTQ+rot", method="gptq", bits=2, rotate=True, swap={"ccq2": W4_G128})
# peers, on the tensors ernieq puts in the swapped codec; the other tensors as ernieq's recipe (HQQ
# needs no calibration, so its rows round the rest to nearest; the GPTQ baseline runs GPTQ throughout)
ernieq("hqq-w4-g64", "HQQ", swap={"wint4": HQQ_W4}, requires=("hqq",), bits=4, group_size=64, method="rtn")
ernieq("hqq-w2-g64", "HQQ", swap={"ccq2": HQQ_W2}, requires=("hqq",), bits=2, method="rtn")
ernieq("gptq-int2-g64", "GPTQ", swap={"ccq2": INT2_G64_FP16}, bits=2)


# peers that need their own environment (BENCHMARKS.md says how); an environment variable names its python,
# the child quantizes and evaluates by itself and writes the row
LLMC_PYTHON_ENV = "ERNIEQ_LLMC_PYTHON"  # llm-compressor
AUTOROUND_PYTHON_ENV = "ERNIEQ_AUTOROUND_PYTHON"  # AutoRound


def _external(python_env: str, script: str, *extra: str) -> Callable[[object, Path], list[str]]:
    """The command line of ``benchmarks/<script>`` under ``$python_env``, given peers.py's options ``a``."""

    def command(a, result: Path) -> list[str]:
        argv = [os.environ[python_env], str(Path(__file__).resolve().parent / script), *extra, "--model", a.model,
                "--data", str(a.data), "--seq-len", str(a.seq_len), "--calib-data", a.calib_data,
                "--calib-tokens", str(a.calib_tokens), "--calib-seq-len", str(a.calib_seq_len), "--out", str(result)]
        return argv + ([] if a.max_windows is None else ["--max-windows", str(a.max_windows)])

    return command


register(Setting("llmcompressor-w4a16", "GPTQ (llm-compressor)", requires_env=(LLMC_PYTHON_ENV,),
                 external=_external(LLMC_PYTHON_ENV, "llmc_peer.py")))
# AutoRound's SignRound (benchmarks/autoround_peer.py): "-w4": every linear as --bits 4, 4-bit g64 symmetric;
# "-w2": the ccq2 experts of --bits 2 at 2-bit g64 asymmetric, the other tensors as the --bits 2 recipe, rounded
# to nearest by ernieq (as in hqq-w2-g64); "-i20": 20 SignRound steps per layer (ernieq's --tune-steps default)
# instead of AutoRound's 200
for _bits in (4, 2):
    for _suffix, _iters in (("", ()), ("-i20", ("--iters", "20"))):
        register(Setting(f"autoround-w{_bits}-g64{_suffix}", "SignRound (AutoRound)",
                         requires_env=(AUTOROUND_PYTHON_ENV,),
                         external=_external(AUTOROUND_PYTHON_ENV, "autoround_peer.py", "--bits", str(_bits), *_iters)))
