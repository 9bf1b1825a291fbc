"""The quantization pass: checkpoint → adapter → codec → native format, one tensor group at a time.

Memory follows the largest tensor group, not the model: a group is loaded,
encoded (its weights spread over a pool of worker processes, or on the GPU),
written to its own shard and dropped, and the source shards are unmapped after
each group. The output is built in ``.<out>.ernieq-tmp`` beside ``out`` and
renamed into place when complete. A run that is killed leaves that folder
behind; started again with the same arguments and the same source files it
skips the groups already written and produces the same bytes as a run that was
never interrupted (``ernieq.formats.native_writer``). A run that fails on bad
input (an ``ErnieqError``) removes it; any other failure keeps it to resume.

Under torchrun the pass is weight-parallel (``ernieq.distributed.plan``): the groups,
cut between routed experts where that evens the load, are shared out by weight
count; each rank writes the shards of its groups and the parts of cut groups, the
rank holding a cut group's first part joins them, and rank 0 writes the index and
config once every rank is done. Shard names and contents never depend on the
number of ranks, so the checkpoint has the same bytes however many there were,
and a run killed with one number of ranks resumes with another.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import ernieq
from ernieq import distributed
from ernieq.calibration.gptq_experts import chunk_budget, experts_per_chunk
from ernieq.calibration.rounding import BATCHED_METHODS
from ernieq.codecs import CalibrationStats, CodecError
from ernieq.transforms import Rotation, make_rotation
from ernieq.config import QuantConfig, QuantizeOptions, with_fields
from ernieq.device import HOST, TORCH_KERNELS, Placement
from ernieq.encode import Encoder, WorkItem, check_method, codec_of
from ernieq.errors import ErnieqError
from ernieq.formats.native import copy_side_files
from ernieq.formats.native_writer import GroupTensors, NativeWriter, write_json_atomic
from ernieq.killpoints import kill_point
from ernieq.model.adapters import Adapter, TensorClass, TensorGroup, adapter_for, iter_groups
from ernieq.model.checkpoint import CheckpointReader
from ernieq.model.moe import linear_weight_shapes, linear_weights
from ernieq.model.summary import name_patterns
from ernieq.model.tensor_info import kept_reason
from ernieq.progress import QuantizeProgress
from ernieq.recipes import SPEC_KEY, configure, recipe_spec

log = logging.getLogger(__name__)
SUMMARY_NAME = "quantize_summary.json"
RESUME_VERSION = 2  # bump when the bytes a run writes change, so old temporary folders are not resumed
# 2: GPTQ through the batched loop (gptq_experts.py): float32 factor, so a rare rounding tie goes the other way


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

    def add(self, other: ClassSummary) -> None:
        self.weights += other.weights
        self.quantized_weights += other.quantized_weights
        self.bytes_before += other.bytes_before
        self.bytes_after += other.bytes_after
        for codec, n in other.codecs.items():
            self.codecs[codec] = self.codecs.get(codec, 0) + n


@dataclass
class QuantizeSummary:
    """Totals by tensor class. ``seconds`` is this run's wall time; it is printed, never written to the checkpoint."""

    recipe: str
    classes: dict[str, ClassSummary]
    kept: dict[str, dict] = field(default_factory=dict)  # reason -> {"tensors", "params", "names"}
    seconds: float = 0.0
    runtime: dict = field(default_factory=dict)  # where it ran (``Placement.record``)
    tune_reports: list = field(default_factory=list)  # --method tune: per layer, what tuning kept (not written)
    model_tune: dict | None = None  # --tune-model-steps: the end-to-end tuning's report (None: not run, or read back)
    mix: object | None = None  # --target-bits: the MixPlan (``ernieq.calibration.mixed``; its rules are in the recipe)

    def total(self, quantized_only: bool = False) -> tuple[int, int, int]:
        """(weights, bytes before, bytes after) over all tensors, or over classes with quantized weights."""
        rows = [c for c in self.classes.values() if c.quantized_weights or not quantized_only]
        return sum(c.weights for c in rows), sum(c.bytes_before for c in rows), sum(c.bytes_after for c in rows)

    def to_json(self) -> dict:
        """What ``quantize_summary.json`` holds (nothing time-dependent)."""
        n_all, b_all, a_all = self.total()
        n_q, _, a_q = self.total(quantized_only=True)
        return {
            "recipe": self.recipe,
            "bits_per_weight_all": 8.0 * a_all / n_all if n_all else 0.0,
            "bits_per_weight_quantized": 8.0 * a_q / n_q if n_q else 0.0,
            "bytes_before": b_all,
            "bytes_after": a_all,
            "classes": {k: {**asdict(c), "bits_per_weight": c.bits_per_weight} for k, c in sorted(self.classes.items())},
            "kept": self.kept,
            "runtime": self.runtime,
        }

    @classmethod
    def from_records(cls, recipe_name: str, records: list[dict]) -> QuantizeSummary:
        """The totals of every group's record (``extra.classes``), in group order."""
        classes: dict[str, ClassSummary] = {}
        kept: dict[str, list] = {}
        for record in records:
            for name, row in record["extra"]["classes"].items():
                classes.setdefault(name, ClassSummary()).add(ClassSummary(**row))
            for reason, names in record["extra"].get("kept", {}).items():
                kept.setdefault(reason, []).extend(names)
        rows = {reason: {"tensors": len(items), "params": sum(n for _, n in items),
                         "names": name_patterns(name for name, _ in items)} for reason, items in sorted(kept.items())}
        return cls(recipe_name, classes, rows)


def moe_ordinals(reader: CheckpointReader, adapter, groups: list[TensorGroup] | None = None) -> dict[int, int]:
    """Layer index → its ordinal among the layers that have routed experts."""
    groups = list(iter_groups(reader, adapter)) if groups is None else groups
    layers = sorted({g.layer for g in groups if any(t.cls is TensorClass.ROUTED_EXPERT for t in g.tensors)})
    return {layer: i for i, layer in enumerate(layers)}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _group_weights(reader: CheckpointReader, group: TensorGroup) -> int:
    """How many weights (elements) the group's tensors hold, from the headers only."""
    total = 0
    for t in group.tensors:
        n = 1
        for d in reader.shape(t.name):
            n *= d
        total += n
    return total


@dataclass
class _Job:
    """Everything :func:`quantize_group` needs besides the group."""

    reader: CheckpointReader
    adapter: Adapter
    config: QuantConfig
    ordinals: dict[int, int]
    calib: object | None
    method: str
    encoder: Encoder
    bar: QuantizeProgress
    tuned: object | None = None  # block-output tuning's results: ``get(name) -> QuantizedTensor | None``, ``get_plain``
    awq: bool = False  # AWQ's scales searched and folded into each group first (done in the pass when tuned)

    def stats(self, name: str) -> CalibrationStats | None:
        return self.calib.stats(name) if self.calib is not None else None

    def site(self, name: str) -> str | None:
        """The calibration site (the input) whose statistics ``name`` gets; weights of one site share them."""
        return self.calib.site_of(name) if self.calib is not None else None

    def rotation(self, group: TensorGroup, choice, k: int) -> tuple[str | None, Rotation | None]:
        """(key, rotation) for a weight with K inputs and this codec choice: (None, None) unless the
        config rotates it. The key names the group, so each group's shard holds its own rotations."""
        if not self.config.rotates(choice):
            return None, None
        return f"{group.key}.k{k}", make_rotation(k)


def _awq(job: _Job, group: TensorGroup, tensors: Mapping[str, torch.Tensor], weights: list) -> tuple[list, dict, dict]:
    """AWQ's scales searched and folded into the group (``ernieq.calibration.awq``): the new weights
    list, the group's other tensors (norms, router) and the statistics of every scaled weight."""
    from ernieq.calibration.awq import awq_group

    infos = {name: info for name, info, _ in weights}
    device = job.encoder.device  # the search runs there; the results come back to host memory
    named = {name: w.to(device) for name, _, w in weights}
    named.update({t.name: tensors[t.name].to(device) for t in group.tensors if not t.is_linear_weight})

    def stats(name: str) -> CalibrationStats | None:
        s = job.stats(name)
        return s.to(device) if s is not None else None

    def codec(name: str):
        choice = job.config.choose(name, infos[name], job.ordinals.get(infos[name].layer)) if name in infos else None
        return None if choice is None else codec_of(choice)

    named, scaled = awq_group(job.adapter, group.layer, named, codec, stats, group.key)
    named = {name: t.to(HOST) for name, t in named.items()}
    scaled = {name: s.to(HOST) if s is not None else None for name, s in scaled.items()}
    return [(name, info, named[name]) for name, info, _ in weights], named, scaled


def quantize_group(job: _Job, index: int, group: TensorGroup, tensors: Mapping[str, torch.Tensor],
                   keep=None) -> tuple[GroupTensors, dict, dict]:
    """Encode group ``index``'s linear weights; returns what to store, its summary rows by class and
    what it keeps as it is ({reason: [(name, weights)]}).
    ``keep(info)``: only the tensors of one part of the group (:func:`_in_part`)."""
    out = GroupTensors()
    rows: dict[str, ClassSummary] = {}
    kept: dict[str, list] = {}  # reason -> [(name, weights)] of what stays as it is
    weights = list(linear_weights(group.tensors, tensors, job.adapter, keep))  # routed experts under per-expert names
    stats = {}
    if job.awq and job.tuned is None:
        weights, tensors, stats = _awq(job, group, tensors, weights)

    def as_is(name: str, t: torch.Tensor) -> torch.Tensor:
        """A tensor stored as it is: the value the tuning pass left for it (AWQ's fold), else its own."""
        new = job.tuned.get_plain(name) if job.tuned is not None else None
        return t if new is None else new.to(t.dtype)

    todo = []  # (name, info, weight, choice) of the weights to encode, in order
    for name, info, weight in weights:
        row = rows.setdefault(info.cls.value, ClassSummary())
        row.weights += weight.numel()
        row.bytes_before += _nbytes(weight)
        choice = job.config.choose(name, info, job.ordinals.get(info.layer))
        if choice is None:
            out.add_plain(name, as_is(name, weight))
            row.bytes_after += _nbytes(weight)
            kept.setdefault(kept_reason(info), []).append((name, weight.numel()))
            job.bar.weights_done(weight.numel())
            continue
        todo.append((name, info, weight, choice))
    job.bar.start_group(index, group.key, len(todo))
    rotations = [job.rotation(group, choice, weight.shape[1]) for _, _, weight, choice in todo]
    for key, rotation in dict(rotations).items():
        if key is not None:
            out.add_rotation(key, rotation)
    total = sum(w.numel() for _, _, w, _ in todo)
    units = work_units(todo, [key for key, _ in rotations], job.method, job.encoder.slots(total),
                       job.encoder.device)
    encoded: dict[int, object] = {}
    if job.tuned is not None:  # weights block-output tuning kept: stored as they are, not encoded again
        for i, (name, _, weight, _) in enumerate(todo):
            q = job.tuned.get(name)
            if q is not None:
                encoded[i] = q
                job.bar.weights_done(weight.numel(), name)
        units = [kept for kept in ([i for i in unit if i not in encoded] for unit in units) if kept]
        total = sum(todo[i][2].numel() for unit in units for i in unit)

    def item(unit: list[int]) -> WorkItem:
        names = [todo[i][0] for i in unit]
        by_site: dict[str, CalibrationStats | None] = {}  # one statistics object per input: gate and up share it
        unit_stats = []
        for name in names:
            site = None if name in stats else job.site(name)
            if site is None:
                unit_stats.append(stats[name] if name in stats else job.stats(name))
            else:
                unit_stats.append(by_site[site] if site in by_site else by_site.setdefault(site, job.stats(name)))
        return WorkItem.of(todo[unit[0]][3], [todo[i][2] for i in unit], unit_stats, names, job.method,
                           rotations[unit[0]][1])

    current = 0
    try:
        for current, qs in enumerate(job.encoder.map((item(unit) for unit in units), weights=total)):
            for i, q in zip(units[current], qs):
                encoded[i] = q
                job.bar.weights_done(todo[i][2].numel(), todo[i][0])
    except CodecError as err:
        info = todo[units[current][0]][1]
        raise ErnieqError(f"{job.reader.file_of(_source_name(group, info))}: {err}") from None
    for i, (name, info, weight, choice) in enumerate(todo):  # in the group's order, however they were batched
        q = encoded[i]
        out.add_quantized(name, q, rotations[i][0])
        row = rows[info.cls.value]
        row.quantized_weights += weight.numel()
        row.bytes_after += q.nbytes
        row.codecs[choice.codec] = row.codecs.get(choice.codec, 0) + weight.numel()
    for info in group.tensors:
        if info.is_linear_weight or (keep is not None and not keep(info)):
            continue
        t = as_is(info.name, tensors[info.name])
        row = rows.setdefault(info.cls.value, ClassSummary())
        row.weights += t.numel()
        row.bytes_before += _nbytes(t)
        row.bytes_after += _nbytes(t)
        out.add_plain(info.name, t)
        kept.setdefault(kept_reason(info), []).append((info.name, t.numel()))
        job.bar.weights_done(t.numel())
    return out, {k: asdict(v) for k, v in sorted(rows.items())}, kept


def _pieces(reader: CheckpointReader, adapter: Adapter, group: TensorGroup, awq: bool) -> list[int]:
    """The group's weight counts where a plan may cut it: everything but its routed experts, then each
    routed expert; one piece with AWQ, whose scales are searched over the whole group."""
    total = _group_weights(reader, group)
    experts: dict[int, int] = {}
    for _, info, shape in linear_weight_shapes(reader, group.tensors, adapter):
        if info.cls is TensorClass.ROUTED_EXPERT:
            experts[info.expert] = experts.get(info.expert, 0) + shape[0] * shape[1]
    if awq or not experts:
        return [total]
    return [total - sum(experts.values()), *(experts[e] for e in sorted(experts))]


def _in_part(part: distributed.Part):
    """Whether a tensor of the group belongs to ``part``: piece 0 is everything but the routed experts,
    piece e + 1 routed expert e."""
    return lambda info: part.lo <= (0 if info.expert is None else info.expert + 1) < part.hi


def _merge_rows(extras: list[dict]) -> dict:
    """A cut group's summary rows by class (the sums of its parts' rows) and what it keeps as it is
    (each reason's (name, weights) of every part, in the parts' order)."""
    classes = QuantizeSummary.from_records("", [{"extra": e} for e in extras]).classes
    kept: dict[str, list] = {}
    for extra in extras:
        for reason, items in extra.get("kept", {}).items():
            kept.setdefault(reason, []).extend(tuple(item) for item in items)
    return {"classes": {k: asdict(v) for k, v in sorted(classes.items())}, "kept": kept}


def work_units(todo: list, rotation_keys: list, method: str, slots: int, device: torch.device) -> list[list[int]]:
    """Which weights of ``todo`` (name, info, weight, choice) are encoded together: with a method that
    batches (GPTQ), the routed experts of one codec, rotation and shape (a layer's gate and up
    projections, expert by expert, so that each expert's two share one Hessian factor; its down
    projections), in chunks that fit ``gptq_experts.chunk_budget`` and are spread evenly over ``slots``
    workers; every other weight alone. Returns lists of indices into ``todo``, ordered by their first.
    The bytes do not depend on this."""
    if method not in BATCHED_METHODS:
        return [[i] for i in range(len(todo))]
    batches: dict[tuple, list[int]] = {}
    units: list[list[int]] = []
    for i, (_, info, weight, choice) in enumerate(todo):
        if info.cls is TensorClass.ROUTED_EXPERT:
            batches.setdefault((choice, rotation_keys[i], tuple(weight.shape)), []).append(i)
        else:
            units.append([i])
    budget = chunk_budget(device)
    for (_, _, (n, k)), members in batches.items():
        chunks = -(-len(members) // experts_per_chunk(n, k, budget))  # ceil(E / experts per chunk)
        chunks = min(len(members), -(-chunks // slots) * slots)  # a multiple of the workers, where there are enough
        size, extra = divmod(len(members), chunks)
        start = 0
        for c in range(chunks):
            stop = start + size + (c < extra)
            units.append(members[start:stop])
            start = stop
    return sorted(units, key=lambda unit: unit[0])


def _source_name(group, info) -> str:
    """The source tensor a (possibly canonicalised) weight came from, for error messages."""
    names = {t.name for t in group.tensors}
    if info.name in names:
        return info.name
    return next(t.name for t in group.tensors if t.cls is TensorClass.ROUTED_EXPERT)


def _calibration_info(calib) -> dict | None:
    """What the checkpoint records of the calibration run: its info without wall times and machine."""
    if calib is None:
        return None
    return {k: v for k, v in calib.info.items() if k not in ("seconds", "runtime")}


def fingerprint(source: Path, config: QuantConfig, method: str, awq: bool, calib, device: torch.device,
                groups: list[TensorGroup]) -> dict:
    """What makes a run's bytes: ernieq's version, the source files (name, size, mtime), the recipe,
    the method (and AWQ's fold), the calibration, the encoding device and the groups. A leftover folder resumes only
    when this matches exactly."""
    files = sorted(p for p in source.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors"))
    return json.loads(json.dumps({
        "resume_version": RESUME_VERSION,
        "ernieq": ernieq.__version__,
        "source": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files],
        "recipe": repr(config),
        "method": method,
        "awq": awq,
        "calibration": _calibration_info(calib),
        "device": device.type,
        "groups": [g.key for g in groups],
    }, sort_keys=True, default=str))


def _check_out(out: Path, overwrite: bool) -> None:
    if not out.exists() or overwrite:
        return
    if not out.is_dir() or any(out.iterdir()):
        raise ErnieqError(f"{out}: output folder exists and is not empty (use --overwrite to replace it)")


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` to ``out``; an existing ``out`` (with --overwrite) goes only after."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        old = out.parent / f".{out.name}.ernieq-old"
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
        tmp.rename(out)
        if old.is_dir():
            shutil.rmtree(old)
        else:
            old.unlink()
    else:
        tmp.rename(out)


def check_classified(reader: CheckpointReader, adapter: Adapter, groups: list[TensorGroup], config: QuantConfig) -> None:
    """Fail, naming the first, on a tensor ernieq cannot classify that the recipe does not name: nothing
    is left unquantized in silence."""
    unknown = [t.name for g in groups for t in g.tensors
               if t.cls is TensorClass.UNCLASSIFIED and not config.names_kept(t.name)]
    if unknown:
        name = unknown[0]
        where = "is a matrix of" if adapter.in_model(name) else "has no place in"
        raise ErnieqError(f"{reader.file_of(name)}: tensor {name!r} {where} {adapter.model_class} that ernieq cannot "
                          f"classify ({len(unknown)} such tensor(s)); to keep it as it is, name it in the recipe: "
                          f"--override '^{re.escape(name)}$=none'")


def recipe_view(source: Path, config: QuantConfig):
    """What ``config`` would do to the plain checkpoint at ``source``, for ``ernieq inspect``'s accounting."""
    from ernieq.model.summary import RecipeView

    ordinals = _ordinals(source)

    def choose(name, info):
        choice = config.choose(name, info, ordinals.get(info.layer))
        return None if choice is None else choice.codec

    return RecipeView(choose, config.names_kept)


def _ordinals(source: Path) -> dict[int, int]:
    reader = CheckpointReader(source)
    return moe_ordinals(reader, adapter_for(reader.config, str(Path(source) / "config.json")))


def recipe_for(source: Path, options: QuantizeOptions, default_rotate: bool = False
               ) -> tuple[QuantConfig, QuantizeOptions]:
    """The recipe (``options.recipe``, else the ``--bits``/``--fp8`` preset) for the checkpoint at
    ``source`` (which needs its MoE layer count), and ``options`` completed from it
    (``ernieq.recipes.configure``)."""
    return configure(options, len(_ordinals(source)), default_rotate)


def sequential_plan(source: Path, config: QuantConfig, method: str, awq: bool = False):
    """What sequential calibration must simulate: this config's codec choices (and rotations), the method, and
    (``awq``) AWQ's fold before GPTQ."""
    from ernieq.calibration.sequential import SequentialPlan

    check_method(method)
    if method == "awq":
        raise ErnieqError("--sequential simulates per-weight rounding; it does not combine with --method awq")
    if method == "tune":
        method = "gptq"  # tuning starts from GPTQ's result (the pass adds the tuning)
    ordinals = _ordinals(source)

    def choose(name, info):
        choice = config.choose(name, info, ordinals.get(info.layer))
        return (None if choice is None else (choice.codec, choice.kwargs)), config.rotates(choice)

    return SequentialPlan(choose, method, key=repr(config), awq=awq)


def _quantize_part(job: _Job, writer: NativeWriter, group: TensorGroup, part: distributed.Part) -> None:
    """Encode and write ``part`` of ``group`` (its shard when whole), unless an earlier run did."""
    span = (part.lo, part.hi)
    if writer.finished(part.index) is not None or (not part.whole and writer.part_finished(part.index, span)):
        job.bar.skip_group(part.index, part.weight)
        log.debug("%s %s: written by an earlier run", group.key, "" if part.whole else span)
        return
    t0 = time.perf_counter()
    tensors = group.load(job.reader, lazy=True)  # a part reads only its own experts
    if part.whole:
        stored, rows, kept = quantize_group(job, part.index, group, tensors)
        writer.write_group(part.index, group.key, stored, {"classes": rows, "kept": kept})
    else:
        stored, rows, kept = quantize_group(job, part.index, group, tensors, keep=_in_part(part))
        writer.write_part(part.index, group.key, span, stored, {"classes": rows, "kept": kept})
    del tensors, stored
    job.reader.release()  # unmap the source pages this group read
    seconds = time.perf_counter() - t0
    log.debug("%s: %d weights in %.1f s (%.2f M weights/s)", group.key if part.whole else f"{group.key} {span}",
              part.weight, seconds, part.weight / seconds / 1e6)


def run_quantize(source: Path, out: Path, config: QuantConfig | None = None, options: QuantizeOptions | None = None,
                 calib=None, base_model: str | None = None, tuned=None, **fields) -> QuantizeSummary:
    """Quantize ``source`` into the native checkpoint ``out``, resuming a killed run with the same arguments.

    base_model: the name ``source`` was given by (``demo``, a hub id, a folder), recorded as
    ``quantization_config.base_model`` so that ``publish`` finds the base model's license without a report.

    options: :class:`QuantizeOptions` with ``fields`` replaced.
    config: the recipe (default: ``options``' recipe or preset); calib: calibration statistics for the method
    (``options.method``, default round to nearest); tuned: with method ``tune``, block-output tuning's
    results (``ernieq.calibration.tuned_store.TunedStore``), stored as they are. ``options.workers``:
    encoder processes on the CPU (default: every usable core); ``options.device`` a GPU: the weights are encoded there, in this process.
    """
    options = with_fields(options, fields)
    method = options.method or "rtn"
    check_method(method)
    awq = method == "awq" or options.awq
    source, out = Path(source), Path(out)
    reader = CheckpointReader(source)
    adapter = adapter_for(reader.config, str(source / "config.json"))
    groups = list(iter_groups(reader, adapter))
    ordinals = moe_ordinals(reader, adapter, groups)
    if config is None:
        config = configure(options, len(ordinals))[0]
    check_classified(reader, adapter, groups, config)
    _check_out(out, options.overwrite)
    tmp = out.parent / f".{out.name}.ernieq-tmp"
    start = time.perf_counter()
    placement = Placement.resolve(options.device, options.dtype)
    encoder = Encoder(options.workers, placement.device)
    world = distributed.world()
    try:
        writer = distributed.main_first(lambda: NativeWriter(
            tmp, reader.config, config.recipe, len(groups),
            fingerprint(source, config, method, awq, calib, encoder.device, groups)), "opening the output folder")
        if writer.resumed and world.main:
            log.info("resuming the run left in %s", tmp)
        plan = distributed.plan([_pieces(reader, adapter, g, awq and tuned is None) for g in groups])
        mine = plan[world.rank]
        with encoder, QuantizeProgress(options.progress, sum(p.weight for p in mine), len(groups)) as bar:
            job = _Job(reader, adapter, config, ordinals, calib, method, encoder, bar, tuned, awq)
            for part in mine:
                _quantize_part(job, writer, groups[part.index], part)
            distributed.barrier("encoding")
            for part in mine:  # the first part's rank joins a cut group
                if not part.whole and part.lo == 0 and writer.finished(part.index) is None:
                    spans = [(p.lo, p.hi) for rank in plan for p in rank if p.index == part.index]
                    writer.join_parts(part.index, groups[part.index].key, sorted(spans), _merge_rows)
        distributed.barrier("joining cut groups")
        summary = QuantizeSummary.from_records(config.recipe, writer.records())
        summary.runtime = placement.record(TORCH_KERNELS)
        distributed.barrier("reading the records")
        if world.main:  # what is written once
            extra = {"method": method, "summary": {"bits_per_weight_all": summary.to_json()["bits_per_weight_all"]},
                     SPEC_KEY: recipe_spec(config, with_fields(options, {"method": method}))}
            if calib is not None:
                extra["calibration"] = _calibration_info(calib)
            if base_model is not None:
                extra["base_model"] = base_model
            writer.close(extra)
            copy_side_files(source, tmp)
            write_json_atomic(tmp / SUMMARY_NAME, summary.to_json())
            kill_point("rename")
            writer.drop_state()
            kill_point("final-rename")
            _move_into_place(tmp, out)
        distributed.barrier("writing the index")
    except ErnieqError as err:
        if world.main and not isinstance(err, distributed.DistributedError):  # a lost rank keeps the work
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    except BaseException:
        if tmp.exists():
            log.warning("stopped; the groups written so far are kept in %s: the same command resumes from there", tmp)
        raise
    summary.seconds = time.perf_counter() - start
    log.debug("%s written in %.1f s", out, summary.seconds)
    return summary
