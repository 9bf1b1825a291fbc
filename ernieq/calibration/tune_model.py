"""End-to-end tuning of the stored scales: after block tuning, every layer's scales tuned together against the
unquantized model's output distribution (the end-to-end phase of EfficientQAT; the method here is ours).

Shape legend: S calibration sequences, B sequences per step, L sequence length, H hidden size, V vocabulary.

Block tuning (``tune.py``) fits each layer to its own target; the error that remains adds up over the
layers. This pass moves what the formats store per group or channel — ccq2's local and super scales,
wint4's group scales — with every quantized layer in place, so each scale answers for what reaches
the output. The decoder layers are loaded one at a time, as in the calibration pass; what stays in
memory is every layer's input for the step's B sequences, the teacher's final states and the tuners,
which hold each tuned weight's codes as float32 (4 bytes per weight: 0.4 GB for the demo, about 80 GB
for ERNIE-4.5-21B-A3B, so models of that size need a GPU with room for them), and, where the whole
graph is kept (step 3), what autograd saves for every layer. Per step, on B training sequences:

1. forward without gradients through the quantized model (each weight decoded from its tuner),
   keeping each layer's input [B, L, H];
2. the loss: KL(teacher || model) per token, the teacher the unquantized model's distribution (its
   final hidden states [S, L, H] computed once, through the norm and head per step), and its
   gradient at the last layer's output;
3. backward one layer at a time from the last: layer i runs again on its kept input, with gradients,
   and hands the gradient of its input down; the tuners' gradients accumulate. Where every layer's
   graph fits in ``GRAPH_SHARE`` of the device's available memory (what autograd saves for one layer,
   measured once, times the layers), step 1 runs with gradients and keeps the whole graph instead: the
   same gradient without running each layer twice;
4. one signed-gradient step for every tuner, the step size (2 / steps at first) falling linearly to 0.

Then the KL on held-out sequences (never stepped on) for the scales before and after: the tuned ones
are kept only when they lower it, so the pass never leaves the model worse on held-out tokens.

After every step the tuners' parameters (the scales' factors: at most 4 bytes per 64 weights, a 64th of
the codes the tuners hold) go to the pass's folder; a killed run resumes after the last step every rank
saved, drawing the same batches, so it ends with the same bytes as one never stopped.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from ernieq import distributed
from ernieq.calibration.layerwise import LayerwiseModel, run_layers
from ernieq.calibration.sequential import SequentialPlan
from ernieq.calibration.tune import (TUNED, TUNED_CODECS, _digest, _forward, _LayerParams, same_on_every_rank,
                                    sum_gradients)
from ernieq.calibration.tune_weights import make_tuner
from ernieq.calibration.tuned_store import TunedStore
from ernieq.codecs import QuantizedTensor, decode
from ernieq.device import available_memory
from ernieq.killpoints import kill_point
from ernieq.model.moe import linear_weight_shapes
from ernieq.progress import progress_bar
from ernieq.transforms import make_rotation

log = logging.getLogger(__name__)
DONE_NAME = "done.json"
STEP_GLOB = "step-*.safetensors"  # the tuners' parameters after a step (step-000012: after 12)
GRAPH_SHARE = 0.5  # of the device's available memory that the whole model's autograd graph may fill


@dataclass(frozen=True)
class ModelTuneSettings:
    """steps: signed-gradient steps over the whole model; lr: every tuner's first step (None: 2 / steps, twice
    block tuning's, times the tuner's ``model_step``: ccq2's 1, the integer grids' 0.2; each parameter kind
    steps in proportion, ``tune_weights.REL_LR``, as in block tuning);
    batch_seqs: sequences per step; holdout: the share of this rank's sequences held out; seed: the order
    of the batches."""

    steps: int = 20
    lr: float | None = None
    batch_seqs: int = 4
    holdout: float = 0.125
    seed: int = 0

    def first_step(self, tuner) -> float:
        return self.lr if self.lr is not None else 2.0 / max(self.steps, 1) * tuner.model_step


@dataclass
class ModelTuneReport:
    kl_start: float
    kl_tuned: float
    kept: str  # "tuned" or "start"
    steps: int
    seconds: float


class _Layer:
    """One decoder layer's quantized weights as stored (host memory) and the tuned ones' parameters, which
    persist between steps; the layer itself is loaded when it runs (memory: one layer and the stored model)."""

    def __init__(self, model: LayerwiseModel, i: int, store: TunedStore, plan: SequentialPlan):
        self.model, self.i = model, i
        self.q: dict[str, QuantizedTensor] = {}
        self.rotation: dict[str, int | None] = {}  # K of the input rotation, or None
        lt = model.layer_tensors(i)
        for name, info, shape in linear_weight_shapes(model.reader, lt.infos, model.adapter):
            q = store.get(name)
            if q is not None:
                self.q[name] = q
                self.rotation[name] = shape[1] if plan.choose(name, info)[1] else None
        self.plain = {t.name: p for t in lt.infos if (p := store.get_plain(t.name)) is not None}  # AWQ's fold
        self.seed = plan.rotation_seed
        self.tuners = {n: make_tuner(q.to(model.device), torch.empty(q.shape, device="meta"), False)
                       for n, q in self.q.items() if q.codec in TUNED_CODECS}

    def _frame(self, name: str, w: torch.Tensor) -> torch.Tensor:
        k = self.rotation[name]
        return make_rotation(k, self.seed).to(w.device).apply_t(w, True) if k is not None else w

    def run(self, h: torch.Tensor, grad: bool) -> torch.Tensor:
        """The layer's output for inputs h [B, L, H], the tuned weights as their tuners make them (with
        gradients to their parameters when ``grad``)."""
        tuners = self.tuners
        with torch.set_grad_enabled(grad):
            tuned = {n: self._frame(n, tu.weight()) for n, tu in tuners.items()}
            fixed = {n: self._frame(n, decode(q).float().to(self.model.device)) for n, q in self.q.items()
                     if n not in tuners}
            layer = self.model.load_layer(self.i, {**self.plain, **fixed, **{n: w.detach() for n, w in tuned.items()}})
            layer.eval()
            try:
                for p in layer.parameters():
                    p.requires_grad_(False)
                params = _LayerParams(self.model, self.i, layer, self.q).params(tuned)
                return _forward(self.model, self.i, layer, params, h)
            finally:
                self.model.release_layer(self.i)

    def results(self) -> dict[str, QuantizedTensor]:
        return {**self.q, **{n: tu.result().to("cpu") for n, tu in self.tuners.items()}}


def _kl(logits: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of KL(teacher || model), logits [B, L, V] each."""
    t = F.log_softmax(teacher.float(), -1)
    return (t.exp() * (t - F.log_softmax(logits.float(), -1))).sum()


def _gradients(model: LayerwiseModel, layers: list[_Layer], ids: torch.Tensor, teacher: torch.Tensor,
               whole_graph: bool = False) -> float:
    """Accumulate into every tuner's parameters the gradient of the mean KL(teacher || model) per token on
    ``ids`` [B, L] (``teacher``: the unquantized logits [B, L, V]), one layer in the graph at a time: a
    forward without gradients keeps each layer's input, then each layer from the last runs again with
    gradients and hands the gradient of its input to the one before. ``whole_graph``: one forward with
    gradients through every layer and one backward instead (the same gradient; memory: every layer's
    graph). Returns the loss."""
    if whole_graph:
        with torch.enable_grad():
            h = model.enter(ids)[0]
            for layer in layers:
                h = layer.run(h, grad=True)
            loss = _kl(model.logits(model.leave(h)), teacher) / ids.numel()
            loss.backward()
        return loss.item()
    lowest = min((i for i, layer in enumerate(layers) if layer.tuners), default=len(layers))
    inputs = []
    with torch.no_grad():
        h = model.enter(ids)[0]
        for layer in layers:
            inputs.append(h)
            h = layer.run(h, grad=False)
    h = h.detach().requires_grad_()
    with torch.enable_grad():
        loss = _kl(model.logits(model.leave(h)), teacher) / ids.numel()
        loss.backward()
    grad = h.grad
    for i in reversed(range(lowest, len(layers))):  # below the lowest tuned layer nothing is asked for
        x = inputs[i].detach().requires_grad_(i > lowest)
        with torch.enable_grad():
            layers[i].run(x, grad=True).backward(grad)
        grad = x.grad
    return loss.item()


def _graph_bytes(layer: _Layer, h: torch.Tensor) -> int:
    """Bytes autograd saves for the backward of ``layer`` on inputs h [B, L, H] (tensors counted once per
    storage; the tuners' own tensors included, so an over-estimate)."""
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer.run(h.detach().requires_grad_(), grad=True)  # no backward: the graph goes with the output
    return sum(saved.values())


def tune_model(source, store: TunedStore, plan: SequentialPlan, token_ids: torch.Tensor,
               settings: ModelTuneSettings, device: torch.device, folder: Path, run_id: str,
               progress: bool = True) -> tuple[TunedStore, ModelTuneReport | None]:
    """Tune the scales of every weight in ``store`` (block tuning's results for the checkpoint at ``source``)
    end to end on the calibration tokens ``token_ids`` [S, L] (this rank takes its share; see the module
    docstring). The tuned tensors go to a store in ``folder``, marked done with ``settings`` and ``run_id``
    (the pass's, whose results they start from): a rerun with both the same reads them back.

    Returns the store to write the checkpoint from (``store`` where tuning did not lower the held-out KL)
    and the report (None when read back)."""
    mark = folder / DONE_NAME
    key = {"settings": repr(settings), "run_id": run_id}
    out = TunedStore(folder)
    done = json.loads(mark.read_text()) if mark.is_file() else {}
    if done.get("key") == key:
        log.info("model tuning: read back what an earlier run kept (%s)", done["kept"])
        if done["kept"] != TUNED:
            return store, None
        out.restore(len(list(folder.glob("layer-*.safetensors"))))
        out.reports = store.reports  # what block tuning kept, layer by layer
        return out, None
    mark.unlink(missing_ok=True)
    out.restore(0)
    report, layers = _tune(source, store, plan, token_ids, settings, device, folder, key, progress)
    if report.kept == TUNED:
        for layer in layers:
            out.put(layer.i, layer.results(), plain=layer.plain)
    out.reports = store.reports
    digest = _digest({n: q for layer in layers for n, q in layer.results().items()}) if report.kept == TUNED else "-"
    same_on_every_rank("the model", digest)
    tmp = mark.with_name(mark.name + ".tmp")
    tmp.write_text(json.dumps({"key": key, "kept": report.kept, "report": asdict(report)}))
    os.replace(tmp, mark)
    for path in folder.glob(STEP_GLOB):  # done: the steps' parameters are not needed again
        path.unlink()
    return (out if report.kept == TUNED else store), report


def _save_step(folder: Path, key: dict, step: int, kl_start: float, params: list[torch.Tensor]) -> None:
    """``params`` after ``step`` steps and the start's held-out KL, written atomically. The save before it
    stays (under torchrun a rank killed mid-save is one save behind the others); older ones go."""
    path = folder / f"step-{step:06d}.safetensors"
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({str(j): p.detach().cpu().contiguous() for j, p in enumerate(params)}, str(tmp),
              metadata={"key": json.dumps(key), "kl_start": repr(kl_start)})
    os.replace(tmp, path)
    for old in sorted(folder.glob(STEP_GLOB))[:-2]:
        old.unlink()
    kill_point("model-tuning-step")


def _resume(folder: Path, key: dict, steps: int, params: list[torch.Tensor]) -> tuple[int, float | None]:
    """The last of the ``steps`` that every rank saved in a run with ``key``, its parameters loaded into
    ``params``, and the start's held-out KL that run measured; (0, None) with none. Saves of another run go."""
    saved = {}
    for path in folder.glob(STEP_GLOB):
        with safe_open(str(path), framework="pt") as f:
            if json.loads((f.metadata() or {}).get("key", "null")) != key:
                path.unlink()
                continue
        saved[int(path.stem.split("-")[1])] = path
    have = torch.zeros(steps + 1)  # have[t]: this rank saved step t (t = 0: nothing to load)
    have[[t for t in saved if t <= steps]] = 1
    have[0] = 1
    distributed.all_reduce([have], op="min", what="agreeing on the step to resume after")
    step = int(have.nonzero().max())
    if step == 0:
        return 0, None
    with safe_open(str(saved[step]), framework="pt") as f, torch.no_grad():
        for j, p in enumerate(params):
            p.copy_(f.get_tensor(str(j)))
        kl_start = float(f.metadata()["kl_start"])
    return step, kl_start


def _tune(source, store: TunedStore, plan: SequentialPlan, token_ids: torch.Tensor, settings: ModelTuneSettings,
          device: torch.device, folder: Path, key: dict, progress: bool) -> tuple[ModelTuneReport, list[_Layer]]:
    start = time.perf_counter()
    model = LayerwiseModel(source, torch.float32, device)
    s = token_ids.shape[0]
    token_ids = token_ids[distributed.share(s)]  # this rank's sequences
    s = token_ids.shape[0]
    n_hold = max(1, round(s * settings.holdout)) if s > 1 else 0
    train = torch.arange(s - n_hold)
    hold = torch.arange(s - n_hold, s) if n_hold else train
    with torch.no_grad():
        final = run_layers(model, token_ids, batch_size=settings.batch_seqs)  # the unquantized model's [S, L, H]
    model.load_outer()  # embeddings, final norm and head resident from here on
    for p in model.model.parameters():
        if not p.is_meta:
            p.requires_grad_(False)
    layers = [_Layer(model, i, store, plan) for i in range(model.num_layers)]
    params = [p for layer in layers for tu in layer.tuners.values() for p in tu.parameters()]

    def teacher(idx):
        with torch.no_grad():
            return model.logits(model.leave(final[idx].to(device)))

    def held_out() -> float:
        sums = torch.zeros(2, dtype=torch.float64)  # KL summed over tokens, tokens: over every rank's share
        with torch.no_grad():
            for j in range(0, hold.numel(), settings.batch_seqs):
                idx = hold[j : j + settings.batch_seqs]
                h = model.enter(token_ids[idx])[0]
                for layer in layers:
                    h = layer.run(h, grad=False)
                sums[0] += float(_kl(model.logits(model.leave(h)), teacher(idx)))
                sums[1] += idx.numel() * token_ids.shape[1]
        distributed.all_reduce([sums], what="summing held-out KL")
        return float(sums[0] / sums[1].clamp(min=1))

    done, kl_start = _resume(folder, key, settings.steps, params)
    if kl_start is None:
        kl_start = held_out()
    else:
        log.info("model tuning: resuming after step %d of %d (saved by an earlier run)", done, settings.steps)
    tuned_layers = [layer for layer in layers if layer.tuners]
    whole_graph = False
    if tuned_layers and train.numel():
        per_layer = _graph_bytes(tuned_layers[0], model.enter(token_ids[train[: settings.batch_seqs]])[0])
        room = GRAPH_SHARE * available_memory(device)
        whole_graph = per_layer * len(tuned_layers) <= room
        log.info("model tuning: the whole graph (%.2f GiB) %s %.2f GiB of %s memory: %s", per_layer *
                 len(tuned_layers) / 2**30, "fits in" if whole_graph else "exceeds", room / 2**30, device.type,
                 "kept for each step" if whole_graph else "each layer run again for the backward")
    gen = torch.Generator().manual_seed(settings.seed)
    with progress_bar(progress) as bar:
        task = bar.add_task("tuning the model", total=settings.steps)
        for t in range(settings.steps):
            idx = train[torch.randperm(train.numel(), generator=gen)[: settings.batch_seqs]]  # drawn as before
            if t < done:
                bar.advance(task)
                continue
            loss = _gradients(model, layers, token_ids[idx], teacher(idx), whole_graph)
            sum_gradients(params)  # under torchrun: one step, the same on every rank
            decay = 1 - t / settings.steps  # linear to 0
            for layer in layers:
                for tu in layer.tuners.values():
                    tu.step(settings.first_step(tu) * decay)
            log.debug("model tuning step %d: KL %.5f", t, loss)
            _save_step(folder, key, t + 1, kl_start, params)
            bar.advance(task)
    kl_tuned = held_out()
    kept = TUNED if kl_tuned < kl_start else "start"
    report = ModelTuneReport(kl_start, kl_tuned, kept, settings.steps, time.perf_counter() - start)
    log.info("model tuning: held-out KL %.6g -> %.6g (%s kept) in %.1f s", kl_start, kl_tuned, kept, report.seconds)
    return report, layers
