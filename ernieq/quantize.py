"""The quantization pass: checkpoint → adapter → codec → native format, one tensor group at a time."""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ernieq.codecs import CodecError, get_codec
from ernieq.config import QuantConfig, recipe
from ernieq.errors import ErnieqError
from ernieq.progress import progress_bar
from ernieq.formats.native import NativeWriter, copy_side_files
from ernieq.model.adapters import TensorClass, adapter_for, iter_groups, stream_groups
from ernieq.model.checkpoint import CheckpointReader, write_json
from ernieq.model.moe import ExpertGroup

log = logging.getLogger(__name__)
SUMMARY_NAME = "quantize_summary.json"


@dataclass
class ClassSummary:
    """What quantization did to one tensor class."""

    weights: int = 0
    quantized_weights: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    codecs: dict[str, int] = field(default_factory=dict)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.bytes_after / self.weights if self.weights else 0.0


@dataclass
class QuantizeSummary:
    recipe: str
    classes: dict[str, ClassSummary]
    seconds: float = 0.0

    def total(self, quantized_only: bool = False) -> tuple[int, int, int]:
        """(weights, bytes before, bytes after) over all tensors, or over classes with quantized weights."""
        rows = [c for c in self.classes.values() if c.quantized_weights or not quantized_only]
        return sum(c.weights for c in rows), sum(c.bytes_before for c in rows), sum(c.bytes_after for c in rows)

    def to_json(self) -> dict:
        n_all, b_all, a_all = self.total()
        n_q, _, a_q = self.total(quantized_only=True)
        return {
            "recipe": self.recipe,
            "seconds": round(self.seconds, 2),
            "bits_per_weight_all": 8.0 * a_all / n_all if n_all else 0.0,
            "bits_per_weight_quantized": 8.0 * a_q / n_q if n_q else 0.0,
            "bytes_before": b_all,
            "bytes_after": a_all,
            "classes": {k: {**asdict(c), "bits_per_weight": c.bits_per_weight} for k, c in sorted(self.classes.items())},
        }


def moe_ordinals(reader: CheckpointReader, adapter) -> dict[int, int]:
    """Layer index → its ordinal among the layers that have routed experts."""
    layers = sorted({g.layer for g in iter_groups(reader, adapter)
                     if any(t.cls is TensorClass.ROUTED_EXPERT for t in g.tensors)})
    return {layer: i for i, layer in enumerate(layers)}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _encode_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _linear_weights(group, tensors):
    """(name, info, weight [N, K]) of a group's linear weights; routed experts under per-expert names."""
    experts = ExpertGroup.from_infos(group.tensors)
    for info in group.tensors:
        if info.is_linear_weight and info.cls is not TensorClass.ROUTED_EXPERT:
            yield info.name, info, tensors[info.name]
    if experts is not None:
        proto = next(t for t in group.tensors if t.cls is TensorClass.ROUTED_EXPERT)
        for e, proj, weight in experts.weights(tensors):
            name = experts.canonical_name(e, proj)
            yield name, type(proto)(name, TensorClass.ROUTED_EXPERT, proto.layer, e, proj, False), weight


def _round_to_nearest(codec, weight, stats, name):
    return codec.encode(weight, stats, name=name)


def _gptq(codec, weight, stats, name):
    from ernieq.calibration import gptq_encode

    return gptq_encode(codec, weight, stats, name=name)


# How a weight is rounded: the codec's own encoder, or GPTQ's error feedback through it.
METHODS = {"rtn": _round_to_nearest, "gptq": _gptq}


def run_quantize(
    source: Path,
    out: Path,
    config: QuantConfig | None = None,
    *,
    calib=None,
    method: str = "rtn",
    bits: int = 4,
    fp8: bool = False,
    group_size: int = 128,
    symmetric: bool = True,
    w4_moe_layers: int | None = None,
    overrides: tuple[str, ...] = (),
    overwrite: bool = False,
    progress: bool = True,
) -> QuantizeSummary:
    if method not in METHODS:
        raise ErnieqError(f"--method {method}: expected one of {', '.join(METHODS)}")
    encode = METHODS[method]
    reader = CheckpointReader(source)
    adapter = adapter_for(reader.config, str(source / "config.json"))
    ordinals = moe_ordinals(reader, adapter)
    if config is None:
        config = recipe(bits, fp8, group_size, symmetric, w4_moe_layers, len(ordinals), tuple(overrides))
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ErnieqError(f"{out}: output folder exists and is not empty (use --overwrite to replace it)")
    tmp = out.parent / f".{out.name}.ernieq-tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    start = time.perf_counter()
    summary = QuantizeSummary(config.recipe, {})
    writer = NativeWriter(tmp, reader.config, config.recipe)
    device = _encode_device()
    codecs: dict = {}
    groups = list(iter_groups(reader, adapter))
    try:
        with progress_bar(progress) as bar:
            task = bar.add_task("quantizing", total=len(groups))
            for group, tensors in stream_groups(reader, adapter):
                bar.update(task, description=f"quantizing {group.key}")
                for name, info, weight in _linear_weights(group, tensors):
                    row = summary.classes.setdefault(info.cls.value, ClassSummary())
                    row.weights += weight.numel()
                    row.bytes_before += _nbytes(weight)
                    choice = config.choose(name, info, ordinals.get(info.layer))
                    if choice is None:
                        writer.add_plain(name, weight)
                        row.bytes_after += _nbytes(weight)
                        continue
                    codec = codecs.get(choice) or codecs.setdefault(choice, get_codec(choice.codec, **choice.kwargs))
                    try:
                        stats = calib.stats(name) if calib is not None else None
                        q = encode(codec, weight.to(device), stats, name).to("cpu")
                    except CodecError as err:
                        raise ErnieqError(f"{reader.file_of(_source_name(group, info))}: {err}") from None
                    writer.add_quantized(name, q)
                    row.quantized_weights += weight.numel()
                    row.bytes_after += q.nbytes
                    row.codecs[choice.codec] = row.codecs.get(choice.codec, 0) + weight.numel()
                for info in group.tensors:
                    if info.is_linear_weight:
                        continue
                    t = tensors[info.name]
                    row = summary.classes.setdefault(info.cls.value, ClassSummary())
                    row.weights += t.numel()
                    row.bytes_before += _nbytes(t)
                    row.bytes_after += _nbytes(t)
                    writer.add_plain(info.name, t)
                bar.advance(task)
        summary.seconds = time.perf_counter() - start
        extra = {"method": method, "summary": {"bits_per_weight_all": summary.to_json()["bits_per_weight_all"]}}
        if calib is not None:
            extra["calibration"] = calib.info
        writer.close(extra)
        copy_side_files(source, tmp)
        write_json(tmp / SUMMARY_NAME, summary.to_json())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return summary


def _source_name(group, info) -> str:
    """The source tensor a (possibly canonicalised) weight came from, for error messages."""
    names = {t.name for t in group.tensors}
    if info.name in names:
        return info.name
    return next(t.name for t in group.tensors if t.cls is TensorClass.ROUTED_EXPERT)
