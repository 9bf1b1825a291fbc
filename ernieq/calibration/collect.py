"""The calibration pass: run the unquantized model layer by layer and record what every linear layer sees.

Shape legend: T tokens, K input features.

``collect_stats`` loads one decoder layer at a time (``layerwise.py``), runs every
calibration sequence through it with the hooks of ``hooks.py`` attached, and
returns a :class:`CalibrationSet`: per-site Hessians ``X^T X / n`` and activation
statistics, the routed-expert table and the router statistics. With
``all_experts=True`` every routed expert also gets statistics from all of its
layer's tokens, while the layer's output stays the model's.

With ``out=DIR`` the statistics stream to disk: each decoder layer's sites are
written to their own file as soon as the layer is done and dropped from memory
(``stats.py``), the summary goes last, and the returned set reads its tensors
back lazily. Peak memory then follows the largest layer, not the model.

With ``out=DIR`` the pass also resumes: after each decoder layer it saves the hidden states the next
layer needs beside the statistics (``resume.py``), and the same call started again after a kill
continues after the last layer saved, with the same bytes as a run never stopped; a pass that
finished is read back instead of run again.

Under torchrun the pass is data-parallel (``ernieq.distributed``): each rank runs its
share of the sequences through every layer, the layer's sums are added over the
ranks before they are normalised (``LayerHooks._finish``), so every rank holds the
statistics of all the sequences; rank 0 alone writes ``out``, which every rank then reads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from pathlib import Path

import torch

from ernieq.device import HOST, TORCH_KERNELS, Placement, dtype_name
from ernieq import distributed
from ernieq.progress import progress_bar

from ernieq.calibration import resume
from ernieq.calibration.calibset import CalibrationSet
from ernieq.calibration.hooks import CalibrationError, Collector
from ernieq.calibration.layerwise import LayerwiseModel, run_layers
from ernieq.calibration.sequential import SequentialPlan, encode_layer, quantized_layer
from ernieq.calibration.stats import begin_stats, from_summary, load_stats, save_stats, summary_of
from ernieq.errors import ErnieqError

log = logging.getLogger(__name__)

BATCH_TOKENS = 4096  # tokens per forward call (whole sequences)


def _check_tokens(token_ids: torch.Tensor, vocab: int | None) -> torch.Tensor:
    if not isinstance(token_ids, torch.Tensor) or token_ids.ndim != 2 or token_ids.numel() == 0:
        shape = tuple(token_ids.shape) if isinstance(token_ids, torch.Tensor) else type(token_ids).__name__
        raise CalibrationError(f"calibration tokens must be a non-empty [n_seq, seq_len] tensor, got {shape}")
    if token_ids.is_floating_point() or token_ids.is_complex():
        raise CalibrationError(f"calibration tokens must be integers, got {token_ids.dtype}")
    lo, hi = int(token_ids.min()), int(token_ids.max())
    if lo < 0 or (vocab is not None and hi >= vocab):
        raise CalibrationError(f"calibration token ids span [{lo}, {hi}], outside the vocabulary [0, {vocab})")
    return token_ids.long()


def collect_stats(
    model_path: str | os.PathLike,
    token_ids: torch.Tensor,
    *,
    all_experts: bool = False,
    progress: bool = True,
    batch_tokens: int = BATCH_TOKENS,
    out: str | os.PathLike | None = None,
    info: dict | None = None,
    sequential: SequentialPlan | None = None,
    device: torch.device = HOST,
    dtype: torch.dtype = torch.float32,
) -> CalibrationSet:
    """Calibration statistics of the unquantized checkpoint at ``model_path``.

    token_ids: int [n_seq, seq_len], the calibration text (never the evaluation text).
    all_experts: also collect all-token statistics for every routed expert (see module doc).
    batch_tokens: about how many tokens go through a layer per forward call.
    out: a folder to stream the statistics into, layer by layer, and to resume from (see module doc);
    complete on return.
    info: extra entries for the set's ``info`` (e.g. the calibration data's name).
    sequential: quantize each layer as the plan says once its statistics are in, so that the next
    layer is calibrated on the quantized layer's outputs (``sequential.py``).
    device, dtype: where each layer runs and in which dtype (statistics accumulate in float32 there
    and are handed over in host memory); recorded in the set's ``info["runtime"]``.
    """
    start = time.perf_counter()
    model = LayerwiseModel(model_path, dtype, device)
    token_ids = _check_tokens(token_ids, model.config.get_text_config().vocab_size)
    n_seq, seq_len = token_ids.shape
    world = distributed.world()
    if n_seq < world.size:
        raise CalibrationError(f"{n_seq} calibration sequences for {world.size} ranks: give at least one per rank")
    batch = max(1, batch_tokens // seq_len)
    collector = Collector(model, all_experts)
    store, checkpoint, saved = None, None, None
    sink = sequential.sink if sequential is not None else None
    if out is not None:
        fresh = not Path(out).exists()
        checkpoint = resume.PassCheckpoint(out, resume.fingerprint(
            model_path, token_ids, batch=batch, all_experts=all_experts, device=device.type, dtype=str(dtype),
            plan=sequential.describe() if sequential is not None else None, info=info))
        saved = checkpoint.load()
        if saved is not None and saved.done:
            log.info("%s: calibrated by an earlier run with the same inputs and settings; read back", out)
            if sink is not None:
                sink.restore(model.num_layers)
            return load_stats(out)
        if saved is not None:
            log.info("%s: resuming the calibration pass at layer %d of %d", out, saved.next_layer + 1,
                     model.num_layers)
            restored = from_summary(Path(out), saved.state, Path(out) / resume.STATE_NAME)
            _restore(collector, restored)
            store = collector.sites = restored.sites if world.main else _LastLayer()
        else:  # finished sites go to the store, which writes them per layer (rank 0), or keeps the last layer's
            store = collector.sites = begin_stats(out) if world.main else _LastLayer()
            if world.main:
                resume.clear(out)
    if sink is not None:
        sink.restore(saved.next_layer if saved is not None else 0)
    try:
        cset = _run(model, token_ids[distributed.share(n_seq)], collector, store, batch, progress, start, {
            "model": str(model_path), "n_seq": n_seq, "seq_len": seq_len, "tokens": n_seq * seq_len,
            "all_experts": all_experts, "sequential": sequential is not None,
            "runtime": Placement(device, dtype).record(TORCH_KERNELS), **(info or {})}, sequential, checkpoint, saved)
    except BaseException as err:
        if isinstance(err, ErnieqError) and not isinstance(err, distributed.DistributedError):
            if store is not None and fresh and world.main:  # bad input: a folder this call made holds nothing
                shutil.rmtree(out, ignore_errors=True)
        elif checkpoint is not None and world.main:
            log.warning("stopped; the layers finished so far are kept in %s: the same command resumes from there", out)
        raise
    if out is not None and world.size > 1:
        distributed.barrier("writing the statistics")
        return cset if world.main else load_stats(out)
    return cset


class _LastLayer(dict):
    """The sites of a rank that does not write the statistics: each layer's kept until the next layer is
    done (sequential calibration reads them after the flush), so memory follows one layer here too."""

    _flushed: tuple[str, ...] = ()

    def flush(self) -> None:
        for site in self._flushed:
            del self[site]
        self._flushed = tuple(self)


def _restore(collector: Collector, cset: CalibrationSet) -> None:
    """The collector as an earlier run left it after its last saved layer (its statistics: ``cset``)."""
    collector.routes, collector.all_token_routes = cset.routes, cset.all_token_routes
    collector.expert_of, collector.experts, collector.routers = cset.expert_of, cset.experts, cset.routers


def _collected(collector: Collector, info: dict) -> CalibrationSet:
    """The statistics the collector holds so far (every finished layer's)."""
    return CalibrationSet(
        sites=collector.sites,
        routes=collector.routes,
        all_token_routes=collector.all_token_routes,
        expert_of=collector.expert_of,
        experts=collector.experts,
        routers=collector.routers,
        info=info,
    )


def _tuned_layer(model, i, stats_of, plan: SequentialPlan, inputs, targets, on_step):
    """Layer i encoded by GPTQ (after AWQ's fold with ``plan.awq``), then tuned against the unquantized layer's
    outputs (``tune.py``); what it keeps, and the tensors the fold changed, go to ``plan.sink``, and the layer
    returned holds them."""
    from ernieq.calibration.tune import tune_layer

    encoded, plain = encode_layer(model, i, stats_of, plan)
    layer = model.load_layer(i, {**plain, **{name: e.decoded() for name, e in encoded.items()}})
    kept, weights, report = tune_layer(model, i, layer, encoded, inputs, targets, plan.tune, on_step)
    if plan.sink is not None:
        plan.sink(i, {name: q.to(HOST) for name, q in kept.items()}, report,
                  {name: t.to(HOST) for name, t in plain.items()})
    return model.load_layer(i, {**plain, **weights})


def _run(model, token_ids, collector, store, batch, progress, start, info, sequential=None, checkpoint=None,
         saved=None) -> CalibrationSet:
    """The pass itself: every layer over every batch, hooks on, the store flushed after each layer;
    ``checkpoint`` saves each finished layer, ``saved`` is where an earlier run stopped."""
    n_seq = token_ids.shape[0]
    n_batches = -(-n_seq // batch)
    first = saved.next_layer if saved is not None else 0
    main = distributed.world().main
    with progress_bar(progress) as bar:
        # layers an earlier run finished leave the totals, so that the ETA counts only this run's work
        task = bar.add_task("calibrating", total=(model.num_layers - first) * n_batches)

        @contextlib.contextmanager
        def observe(i, layer):
            bar.update(task, description=f"calibrating layer {i + 1}/{model.num_layers}")
            with collector.observe(i, layer):
                yield
            if store is not None:
                store.flush()  # layer i's sites to their file; only their names stay in memory

        tuning = sequential is not None and sequential.tune is not None
        if tuning:
            tune_task = bar.add_task("tuning", total=(model.num_layers - first) * max(sequential.tune.steps, 1))

        def adjust(i, layer, inputs=None, targets=None):
            bar.update(task, description=f"quantizing layer {i + 1}/{model.num_layers} (sequential)")
            if not tuning:
                return quantized_layer(model, i, _collected(collector, info).stats, sequential)
            bar.update(tune_task, description=f"tuning layer {i + 1}/{model.num_layers}")
            return _tuned_layer(model, i, _collected(collector, info).stats, sequential, inputs, targets,
                                lambda: bar.advance(tune_task))

        def save(i, hidden, plain):
            state = summary_of(_collected(collector, info), store) if main else {}
            checkpoint.save(i, state, hidden, plain)

        run_layers(model, token_ids, batch_size=batch, observe=observe, adjust=adjust if sequential else None,
                   on_batch=lambda: bar.advance(task), targets=sequential.tune.target if tuning else None,
                   resume_from=(first, saved.hidden, saved.plain) if saved is not None else None,
                   on_layer=save if checkpoint is not None else None)
    seconds = time.perf_counter() - start
    cset = _collected(collector, {**info, "seconds": round(seconds, 2)})
    if store is not None and main:
        save_stats(cset, store.folder)
    if checkpoint is not None:
        checkpoint.finish(model.num_layers - 1, {})
    cold = cset.cold_experts()
    log.info("calibrated %s on %d tokens in %.1f s on %s in %s; %d of %d routed experts cold", info["model"],
             info["tokens"], seconds, model.device, dtype_name(model.dtype), len(cold), len(cset.experts))
    return cset
