"""The calibration pass: run the unquantized model layer by layer and record what every linear layer sees.

Shape legend: T tokens, K input features.

``collect_stats`` loads one decoder layer at a time (``layerwise.py``), runs every
calibration sequence through it with the hooks of ``hooks.py`` attached, and
returns a :class:`CalibrationSet`: per-site Hessians ``X^T X / n`` and activation
statistics, the routed-expert table and the router statistics. With
``all_experts=True`` every routed expert also gets statistics from all of its
layer's tokens, while the layer's output stays the model's.
"""

from __future__ import annotations

import logging
import os
import time

import torch

from ernieq.progress import progress_bar

from ernieq.calibration.calibset import CalibrationSet
from ernieq.calibration.hooks import CalibrationError, Collector
from ernieq.calibration.layerwise import LayerwiseModel, run_layers

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
) -> CalibrationSet:
    """Calibration statistics of the unquantized checkpoint at ``model_path``.

    token_ids: int [n_seq, seq_len], the calibration text (never the evaluation text).
    all_experts: also collect all-token statistics for every routed expert (see module doc).
    batch_tokens: about how many tokens go through a layer per forward call.
    """
    start = time.perf_counter()
    model = LayerwiseModel(model_path)
    token_ids = _check_tokens(token_ids, getattr(model.config, "vocab_size", None))
    n_seq, seq_len = token_ids.shape
    batch = max(1, batch_tokens // seq_len)
    collector = Collector(model, all_experts)
    n_batches = -(-n_seq // batch)
    with progress_bar(progress) as bar:
        task = bar.add_task("calibrating", total=model.num_layers * n_batches)

        def observe(i, layer):
            bar.update(task, description=f"calibrating layer {i + 1}/{model.num_layers}")
            return collector.observe(i, layer)

        run_layers(model, token_ids, batch_size=batch, observe=observe, on_batch=lambda: bar.advance(task))
    seconds = time.perf_counter() - start
    cset = CalibrationSet(
        sites=collector.sites,
        routes=collector.routes,
        all_token_routes=collector.all_token_routes,
        expert_of=collector.expert_of,
        experts=collector.experts,
        routers=collector.routers,
        info={
            "model": str(model_path),
            "n_seq": n_seq,
            "seq_len": seq_len,
            "tokens": n_seq * seq_len,
            "all_experts": all_experts,
            "seconds": round(seconds, 2),
        },
    )
    cold = cset.cold_experts()
    log.info("calibrated %s on %d tokens in %.1f s; %d of %d routed experts cold",
             model_path, n_seq * seq_len, seconds, len(cold), len(cset.experts))
    return cset
