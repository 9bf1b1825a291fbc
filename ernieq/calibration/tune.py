"""Block-output tuning after GPTQ: each decoder layer's stored quantities tuned against its real output.

Shape legend: T tokens, E experts, A active experts per token, K input features, N output features,
S calibration sequences, L sequence length, H hidden size.

Per decoder layer (driven by the sequential calibration pass, ``collect.py``), with X [S, L, H] the
layer's inputs in the quantized model (the outputs of the already quantized, tuned layers before it)
and Y [S, L, H] the target: the unquantized layer's outputs on the same X (``target="local"``, the
default), or on the unquantized model's own hidden states (``"model"``, AutoRound's, which also asks
the layer to undo the error the earlier layers left):

1. every weight starts at its GPTQ result; a *tuner* (``tune_weights.py``) exposes what its codec
   stores and nothing else (integer grids: per-weight rounding offsets, group scales, zero points;
   ccq2: local and super scales). Only the codecs in ``settings.codecs`` are tuned (wint4 and
   ccq2: wint8's GPTQ error is already small); when every tuned weight sits in the MLP/MoE block,
   only that block runs (``_Block``: the attention's output is fixed, computed once);
2. ``steps`` signed-gradient steps (AutoRound) on ``mean ||block(X_b; W_hat) - Y_b||^2`` over a
   random batch of training sequences each; the step size falls linearly to 0. A routed expert's
   contribution enters the output weighted by its routing weight, so each expert's error counts on
   the tokens routed to it, in proportion to their weight;
3. on held-out sequences (never stepped on), per routed expert: the held-out output loss with only
   that expert swapped into GPTQ's layer, tuned or (ccq2) with its tuned scales and the bytes chosen
   again by GPTQ at those scales (``tune_weights.rebyte``). The swap changes the output only on the
   tokens routed to the expert, by their routing weights: the expert's own, routing-weighted loss.
   It is computed from one forward of GPTQ's layer (``_ExpertSwap``: the loss moves by
   ``sum 2 r.d + |d|^2`` over the expert's tokens, r the output's error, d the swap's routing-weighted
   change), checked once per layer against a whole forward; the cost does not grow with the number of
   experts. The expert takes the candidate that lowers it most, else keeps GPTQ's result (so does an
   expert no held-out token reached);
4. the layer's held-out output loss for GPTQ's weights, everything tuned, the per-expert choice with
   the other weights at GPTQ, and with them tuned; the least wins (GPTQ on ties), so a layer is never
   worse than its GPTQ start on held-out tokens.

What a layer keeps is a set of QuantizedTensors the format stores as they are.

Under torchrun (data-parallel calibration, ``ernieq.distributed``) each rank holds its share of the
sequences and splits it into training and held-out sequences the same way; every step's gradients
and every held-out loss are summed over the ranks, so each rank takes the same steps and the same
choices and keeps the same tensors (not those of one process, whose batches differ).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ernieq import distributed
from ernieq.calibration.layerwise import LayerwiseModel
from ernieq.calibration.sequential import Encoded
from ernieq.calibration.tune_weights import can_tune, make_tuner, rebyte
from ernieq.codecs import QuantizedTensor
from ernieq.config import TUNE_TARGETS
from ernieq.errors import ErnieqError
from ernieq.model.expert_layout import gate_function

log = logging.getLogger(__name__)

GPTQ, TUNED, REBYTE = "gptq", "tuned", "rebyte"
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# wint8's GPTQ error is already small (~1e-4 of the weight's energy): tuning it costs the backward pass
# through attention (in the --bits 2 recipe) and buys nothing measurable.
TUNED_CODECS = ("wint4", "ccq2")
MLP, MLP_NORM = "mlp", "post_attention_layernorm"  # the decoder layer's MLP/MoE block and the norm before it


@dataclass(frozen=True)
class TuneSettings:
    """steps: signed-gradient steps per layer; lr: the rounding offsets' first step (None: 1 / steps,
    AutoRound's; other parameter kinds step in proportion, ``tune_weights.REL_LR``); batch_seqs:
    calibration sequences per step; holdout: the share of sequences held out for the checks (at least
    one when there are two or more); seed: the batches' order; codecs: the codecs whose weights are
    tuned (the others keep GPTQ's result); target: ``"local"``, the unquantized layer's outputs on
    the same inputs X, or ``"model"``, its outputs on the unquantized model's own hidden states
    (AutoRound's, which also asks the layer to undo the earlier layers' error); round_weights: integer
    grids (wint4, wint8) also tune per-weight rounding offsets and zero points (AutoRound); off, their
    codes stay GPTQ's and only the group scales move (``--tune-rounding`` turns it on; off by default:
    on the demo it made ``--bits 4`` worse, 27.132 against 26.774 with scales alone,
    benchmarks/results/demo_tune_variants.json)."""

    steps: int = 20
    lr: float | None = None
    batch_seqs: int = 2
    holdout: float = 0.125
    seed: int = 0
    codecs: tuple[str, ...] = TUNED_CODECS
    target: str = "local"
    round_weights: bool = False

    def __post_init__(self):
        if self.steps < 0 or self.batch_seqs < 1 or not 0 < self.holdout < 1 or (self.lr is not None and self.lr <= 0) \
                or self.target not in TUNE_TARGETS:
            raise ErnieqError(f"tuning settings out of range: {self}")

    @property
    def step_size(self) -> float:
        return self.lr if self.lr is not None else 1.0 / max(self.steps, 1)


@dataclass
class LayerReport:
    """What tuning did to one layer: held-out output losses, the choice, experts by candidate."""

    layer: int
    loss_gptq: float
    loss_kept: float
    kept: str  # "gptq", "tuned" or "experts" (tuned experts, other weights at GPTQ)
    experts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


class _LayerParams:
    """Where each checkpoint weight of decoder layer i sits among the layer module's parameters, and
    the parameter dict ``torch.func.functional_call`` takes for a set of weights (model frame)."""

    def __init__(self, model: LayerwiseModel, i: int, layer: nn.Module, names):
        lt = model.layer_tensors(i)
        prefix = model.layer_prefix(i) + "."
        self.layer = layer
        self.plain: dict[str, str] = {}  # checkpoint name -> parameter name (relative to the layer)
        self.routed: dict[str, tuple[int, str]] = {}  # per-expert name -> (expert, projection)
        self.experts_path = None
        if lt.experts is not None:
            self.experts_path = model.adapter.to_hf_name(lt.experts.prefix)[len(prefix):]
            for e in range(lt.experts.num_experts):
                for proj in PROJECTIONS:
                    self.routed[lt.experts.canonical_name(e, proj)] = (e, proj)
        for name in names:
            if name not in self.routed:
                self.plain[name] = model.adapter.to_hf_name(name)[len(prefix):]
        own = dict(layer.named_parameters())
        self.base = {k: v.detach() for k, v in own.items()}

    def relative(self, name: str) -> str:
        """The layer-relative parameter a checkpoint weight lives in (routed experts: the fused ones' module)."""
        return self.experts_path if name in self.routed else self.plain[name]

    def experts_module(self) -> nn.Module | None:
        return self.layer.get_submodule(self.experts_path) if self.experts_path else None

    def params(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The layer's parameters with ``weights`` (checkpoint name -> [N, K]) in place; fused experts
        (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``) rebuilt where one of theirs is given."""
        out = {self.plain[n]: w for n, w in weights.items() if n in self.plain}
        mine = {self.routed[n]: w for n, w in weights.items() if n in self.routed}
        if mine:
            gate_up = self.base[f"{self.experts_path}.gate_up_proj"]  # [E, 2I, H]
            down = self.base[f"{self.experts_path}.down_proj"]  # [E, H, I]
            inter = gate_up.shape[1] // 2
            rows = []
            for e in range(gate_up.shape[0]):
                gate = mine.get((e, "gate_proj"), gate_up[e, :inter])
                up = mine.get((e, "up_proj"), gate_up[e, inter:])
                rows.append(torch.cat([gate, up]))  # [gate | up]  [2I, H]
            out[f"{self.experts_path}.gate_up_proj"] = torch.stack(rows)
            out[f"{self.experts_path}.down_proj"] = torch.stack(
                [mine.get((e, "down_proj"), down[e]) for e in range(down.shape[0])])
        return out


def _forward(model: LayerwiseModel, i: int, layer: nn.Module, params: dict, h: torch.Tensor) -> torch.Tensor:
    """Layer output [B, L, H] for inputs h [B, L, H] with ``params`` in place of the layer's own."""
    out = torch.func.functional_call(layer, params, (h,), model.layer_inputs(i, h), strict=False)
    return out[0] if isinstance(out, tuple) else out


class _Block:
    """What the tuning runs: the whole decoder layer on its inputs X [S, L, H], or, when every tuned
    weight sits in the MLP/MoE block, only that block on its fixed inputs (attention keeps GPTQ's
    weights, so the residual h = X + attn(X) [S, L, H] and the normed z = norm(h) are computed once):
    ``out = h + mlp(z)``. The short form is used only where it reproduces the layer's output."""

    def __init__(self, model: LayerwiseModel, i: int, layer: nn.Module, inputs: torch.Tensor, tuned: list[str],
                 device: torch.device, batch: int):
        self.model, self.i, self.layer, self.device = model, i, layer, device
        self.inputs: tuple[torch.Tensor, ...] = (inputs,)
        self.mlp_only = False
        if tuned and all(name.startswith(MLP + ".") for name in tuned) and hasattr(layer, MLP_NORM) \
                and hasattr(layer, MLP):
            self._to_mlp(inputs, batch)

    def _to_mlp(self, inputs: torch.Tensor, batch: int) -> None:
        seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        hook = getattr(self.layer, MLP_NORM).register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
        full = []
        try:
            with torch.no_grad():
                for x in _batches(inputs, batch):
                    full.append(_forward(self.model, self.i, self.layer, {}, x.to(self.device)).to(inputs.device))
        finally:
            hook.remove()
        if len(seen) != len(full):
            return
        h = torch.cat([a.to(inputs.device) for a, _ in seen])  # [S, L, H]
        z = torch.cat([b.to(inputs.device) for _, b in seen])
        with torch.no_grad():
            short = self.forward({}, (h[:batch].to(self.device), z[:batch].to(self.device)), mlp_only=True)
        if torch.allclose(short.to(inputs.device), full[0], rtol=1e-5, atol=1e-5 * float(full[0].abs().max())):
            self.inputs, self.mlp_only = (h, z), True

    def forward(self, params: dict, x: tuple[torch.Tensor, ...], mlp_only: bool | None = None) -> torch.Tensor:
        """The block's output [B, L, H] with ``params`` (names relative to the layer) for inputs ``x``."""
        if not (self.mlp_only if mlp_only is None else mlp_only):
            return _forward(self.model, self.i, self.layer, params, x[0])
        h, z = x
        inner = {k[len(MLP) + 1 :]: v for k, v in params.items() if k.startswith(MLP + ".")}  # attention: fixed
        return h + torch.func.functional_call(getattr(self.layer, MLP), inner, (z,), strict=False)  # h + mlp(z)

    def take(self, idx: torch.Tensor | slice) -> tuple[torch.Tensor, ...]:
        return tuple(t[idx].to(self.device) for t in self.inputs)


def _batches(x: torch.Tensor, size: int):
    return [x[j : j + size] for j in range(0, x.shape[0], size)]


def tune_layer(
    model: LayerwiseModel,
    i: int,
    layer: nn.Module,
    encoded: dict[str, Encoded],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    settings: TuneSettings,
    on_step: Callable[[], None] | None = None,
) -> tuple[dict[str, QuantizedTensor], dict[str, torch.Tensor], LayerReport]:
    """Tune decoder layer i (``layer``: the module, holding GPTQ's weights) from GPTQ's results
    ``encoded``, on inputs X and targets Y [S, L, H] (see the module docstring).

    Returns the QuantizedTensors kept (by checkpoint name, on the layer's device), their decoded
    weights in the model's frame, and the report.
    """
    start = time.perf_counter()
    device = next(iter(encoded.values())).weight.device if encoded else inputs.device
    for p in layer.parameters():
        p.requires_grad_(False)
    slots = _LayerParams(model, i, layer, encoded)
    gptq_q = {n: e.q for n, e in encoded.items()}
    gptq_w = {n: e.decoded() for n, e in encoded.items()}
    tuners = {n: make_tuner(e.q, e.weight, settings.round_weights) for n, e in encoded.items()
              if e.q.codec in settings.codecs and can_tune(e.q.codec)}
    if not tuners or settings.steps == 0:
        for _ in range(max(settings.steps, 1)):  # the bar counts max(steps, 1) per layer
            if on_step is not None:
                on_step()
        log.info("layer %d: nothing to tune; GPTQ's result kept", i)
        return gptq_q, gptq_w, LayerReport(i, math.nan, math.nan, "gptq", {}, time.perf_counter() - start)
    block = _Block(model, i, layer, inputs, [slots.relative(n) for n in tuners], device, settings.batch_seqs)
    s = inputs.shape[0]
    n_hold = max(1, round(s * settings.holdout)) if s > 1 else 0
    if not n_hold:
        log.warning("layer %d: one calibration sequence; tuning is checked on the tokens it was tuned on", i)
    train = torch.arange(s - n_hold) if n_hold else torch.arange(s)
    hold = torch.arange(s - n_hold, s) if n_hold else torch.arange(s)

    def held_out_loss(weights: dict[str, torch.Tensor], on_error: Callable[[torch.Tensor], None] | None = None
                      ) -> float:
        """The mean squared output error on the held-out sequences; ``on_error``: called with each batch's error."""
        params = slots.params(weights)
        sums = torch.zeros(2, dtype=torch.float64)  # squared error, elements: over every rank's held-out share
        with torch.no_grad():
            for idx in _batches(hold, settings.batch_seqs):
                err = block.forward(params, block.take(idx)) - targets[idx].to(device)  # [B, L, H]
                sums[0] += float(err.double().square().sum())
                sums[1] += err.numel()
                if on_error is not None:
                    on_error(err)
        distributed.all_reduce([sums], what="summing held-out losses")
        return float(sums[0] / sums[1].clamp(min=1))

    gen = torch.Generator().manual_seed(settings.seed * 1_000_003 + i)
    curve = []
    for t in range(settings.steps):
        idx = train[torch.randperm(train.numel(), generator=gen)[: settings.batch_seqs]]
        y = targets[idx].to(device)
        with torch.enable_grad():
            weights = {n: encoded[n].model_frame(tu.weight(), dense=True) for n, tu in tuners.items()}
            loss = (block.forward(slots.params(weights), block.take(idx)) - y).square().mean()
            loss.backward()
        sum_gradients([p for tu in tuners.values() for p in tu.parameters()])
        curve.append(loss.item())
        lr = settings.step_size * (1 - t / settings.steps)  # linear decay to 0
        for tu in tuners.values():
            tu.step(lr)
        if on_step is not None:
            on_step()

    k = max(1, len(curve) // 4)
    log.debug("layer %d: training loss %.4g (first quarter) -> %.4g (last quarter)", i, sum(curve[:k]) / k,
              sum(curve[-k:]) / k)
    candidates: dict[str, dict[str, QuantizedTensor]] = {GPTQ: gptq_q}
    decoded: dict[str, dict[str, torch.Tensor]] = {GPTQ: gptq_w}
    for n, tu in tuners.items():
        e = encoded[n]
        _offer(candidates, decoded, TUNED, n, tu.result(), e)
        if n in candidates[TUNED] and e.q.codec == "ccq2":  # tuned scales: the bytes chosen again by GPTQ at them
            fresh = rebyte(candidates[TUNED][n], e.weight, e.stats, act_order=e.rotation is None, name=n)
            _offer(candidates, decoded, REBYTE, n, fresh, e)
    swap = _ExpertSwap(i, slots, held_out_loss, gptq_w)
    loss_gptq = swap.loss_gptq
    per_expert = _choose_experts(slots, encoded, decoded, swap.checked(held_out_loss, decoded), loss_gptq)

    routed = set(slots.routed)

    def pick(experts: bool, others: bool) -> tuple[dict, dict]:
        """Routed experts at their choice (or GPTQ), the other weights tuned (or GPTQ)."""
        kinds = {n: (per_expert.get(n, GPTQ) if experts else GPTQ) if n in routed else (TUNED if others else GPTQ)
                 for n in encoded}
        kinds = {n: k if n in decoded.get(k, {}) else GPTQ for n, k in kinds.items()}
        return {n: candidates[k][n] for n, k in kinds.items()}, {n: decoded[k][n] for n, k in kinds.items()}

    everything = {n: TUNED if n in decoded[TUNED] else GPTQ for n in encoded}
    options = [("gptq", gptq_q, gptq_w),
               ("tuned", {n: candidates[k][n] for n, k in everything.items()},
                {n: decoded[k][n] for n, k in everything.items()}),
               ("experts", *pick(True, False)), ("mixed", *pick(True, True))]
    losses = [loss_gptq] + [held_out_loss(w) for _, _, w in options[1:]]
    log.debug("layer %d: held-out output loss by option %s", i, dict(zip([o[0] for o in options], losses)))
    best = min(range(len(options)), key=lambda j: (losses[j], j))  # GPTQ first on ties
    kind, kept_q, kept_w = options[best]
    if kind == "tuned":
        per_expert = {n: TUNED for n in routed if n in decoded[TUNED]}
    counts: dict[str, int] = {}
    for e in sorted({slots.routed[n][0] for n in encoded if n in routed}):
        first = next(n for n in encoded if n in routed and slots.routed[n][0] == e)
        c = per_expert.get(first, GPTQ) if kind != "gptq" else GPTQ
        counts[c] = counts.get(c, 0) + 1
    report = LayerReport(i, losses[0], losses[best], kind, counts, time.perf_counter() - start)
    same_on_every_rank(f"layer {i}", _digest(kept_q))
    log.info("layer %d tuned%s: held-out output loss %.4g (GPTQ) -> %.4g (%s); experts %s; %.1f s", i,
             " (MLP block)" if block.mlp_only else "", losses[0], losses[best], kind, counts or "-", report.seconds)
    return kept_q, kept_w, report


def _digest(tensors: dict[str, QuantizedTensor]) -> str:
    """sha256 (first 16 hex digits) of the stored bytes of ``tensors``, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        for key, t in sorted(tensors[name].tensors.items()):
            h.update(f"{name}{key}".encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # [N, 1]: any stride
    return h.hexdigest()[:16]


def sum_gradients(params: list[torch.Tensor]) -> None:
    """Sum the gradients of ``params`` over the ranks (none: zeros), so that every rank takes the same step:
    the same tensors in the same order on each."""
    if distributed.world().size == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    distributed.all_reduce([p.grad for p in params], what="summing tuning gradients")


def same_on_every_rank(what: str, digest: str) -> None:
    """Fail unless every rank keeps the same tensors for ``what`` (``digest``: their :func:`_digest`)."""
    log.debug("%s: what it keeps hashes to %s", what, digest)
    if distributed.world().size == 1:
        return
    value = int(digest[:15], 16) if digest != "-" else -1  # < 2^60: an int64
    low, high = torch.tensor([value]), torch.tensor([value])
    distributed.all_reduce([low], op="min", what=f"comparing what tuning kept for {what}")
    distributed.all_reduce([high], op="max", what=f"comparing what tuning kept for {what}")
    if low.item() != high.item():
        raise ErnieqError(f"tuning {what}: the ranks kept different tensors; their steps diverged")


def _offer(candidates: dict, decoded: dict, kind: str, name: str, q: QuantizedTensor, e: Encoded) -> None:
    """Add ``q`` as weight ``name``'s candidate ``kind`` with its weight in the model's frame (decoded once),
    unless that weight is not finite."""
    candidates.setdefault(kind, {})
    decoded.setdefault(kind, {})
    w = e.decoded(q)
    if bool(torch.isfinite(w).all()):
        candidates[kind][name], decoded[kind][name] = q, w


class _ExpertSwap:
    """The held-out output loss of GPTQ's layer (``loss_gptq``) and, from that one forward, the loss with one
    routed expert's weights swapped. The experts module adds ``w_te f_e(x_t)`` to the output of each token t
    routed to expert e (routing weight w_te), so a swap to f'_e moves token t's output by
    ``d_t = w_te (f'_e(x_t) - f_e(x_t))`` and the summed squared error by ``2 r_t.d_t + |d_t|^2``, r_t the
    output's error under GPTQ: T_e tokens of one expert's work per swap, not a forward of the whole layer.
    The experts' inputs, choices and routing weights are what the experts module is called with."""

    def __init__(self, i: int, slots: _LayerParams, held_out_loss: Callable, gptq_w: dict[str, torch.Tensor]):
        self.i, self.slots = i, slots
        self.calls: list[tuple[torch.Tensor, ...]] = []  # (x [T, H], experts [T, A], weights [T, A], r [T, H])
        module = slots.experts_module()
        self.gate_fn = gate_function(module) if module is not None else None
        seen: list[tuple] = []
        errors: list[torch.Tensor] = []
        hook = module.register_forward_hook(lambda m, args, out: seen.append(args)) if module is not None else None
        try:
            self.loss_gptq = held_out_loss(gptq_w, errors.append)
        finally:
            if hook is not None:
                hook.remove()
        usable = len(seen) == len(errors) and all(len(args) == 3 for args in seen)  # one experts call per batch
        if usable:
            self.calls = [(*args, err.reshape(-1, err.shape[-1])) for args, err in zip(seen, errors)]
        flag = torch.tensor([float(usable)])
        distributed.all_reduce([flag], op="min", what="checking the experts' calls")  # every rank alike
        self.usable = bool(flag.item())

    def _output(self, w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """One expert's output [T, H] for rows x [T, H], its weights ``w`` by projection (as ``_LayerParams``
        stacks them: [gate | up] then the module's own gate function)."""
        gate_up = torch.cat([w["gate_proj"], w["up_proj"]])  # [2I, H]
        return self.gate_fn(x @ gate_up.T) @ w["down_proj"].T

    def loss(self, expert: int, new: dict[str, torch.Tensor], old: dict[str, torch.Tensor]) -> float:
        """The held-out loss with expert ``expert``'s weights (by projection) ``old`` swapped for ``new``."""
        sums = torch.zeros(2, dtype=torch.float64)  # change of the squared error, elements: over every rank's share
        with torch.no_grad():
            for x, experts, weights, r in self.calls:
                sums[1] += r.numel()
                tok, slot = torch.where(experts == expert)  # [T_e]
                if tok.numel():
                    xe = x[tok]
                    d = (self._output(new, xe) - self._output(old, xe)) * weights[tok, slot, None]  # [T_e, H]
                    sums[0] += float((2 * r[tok] * d + d * d).double().sum())
        distributed.all_reduce([sums], what="summing held-out losses")
        return self.loss_gptq + float(sums[0] / sums[1].clamp(min=1))

    def checked(self, full: Callable[[dict[str, torch.Tensor]], float], decoded: dict) -> Callable:
        """The loss of a swap, ``fn(names, kind)``: this measure, checked on the first swap against one whole
        forward (``full``); where they differ, ``full`` for that swap and every later one."""
        state = {"checked": not self.usable, "trusted": self.usable}

        def by_forward(names, kind):
            return full({**decoded[GPTQ], **{n: decoded[kind][n] for n in names}})

        def swapped(names, kind):
            if not state["trusted"] or len(names) != len(PROJECTIONS):  # (an expert not encoded whole)
                return by_forward(names, kind)
            expert = self.slots.routed[names[0]][0]
            by_proj = {kind_: {self.slots.routed[n][1]: decoded[kind_][n] for n in names} for kind_ in (kind, GPTQ)}
            got = self.loss(expert, by_proj[kind], by_proj[GPTQ])
            if not state["checked"]:
                state["checked"] = True
                want = by_forward(names, kind)
                if abs(got - want) > 1e-3 * abs(want - self.loss_gptq) + 1e-5 * abs(want):  # float32 noise: ~2e-6
                    log.warning("layer %d: the one-expert swap measures %.6g where a whole forward gives %.6g; "
                                "every swap is measured by a whole forward", self.i, got, want)
                    state["trusted"] = False
                    return want
            return got

        return swapped


def _choose_experts(slots: _LayerParams, encoded, decoded, swapped_loss, loss_gptq: float) -> dict[str, str]:
    """Per routed expert (all its projections together): the candidate (tuned, or ccq2's tuned scales with
    fresh bytes) whose swap into GPTQ's layer lowers the held-out output loss most (``swapped_loss(names,
    kind)``), else GPTQ. An expert no held-out token reached keeps GPTQ's result.
    Returns checkpoint name -> candidate."""
    by_expert: dict[int, list[str]] = {}
    for n in encoded:
        if n in slots.routed:
            by_expert.setdefault(slots.routed[n][0], []).append(n)
    chosen: dict[str, str] = {}
    for _, names in sorted(by_expert.items()):
        best, best_loss = GPTQ, loss_gptq
        for kind in (TUNED, REBYTE):
            if all(n in decoded.get(kind, {}) for n in names):
                loss = swapped_loss(names, kind)
                if loss < best_loss:
                    best, best_loss = kind, loss
        chosen.update({n: best for n in names})
    return chosen
