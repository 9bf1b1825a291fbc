"""``ernieq bench MODEL [--baseline MODEL]``: whole-model throughput, the model and its baseline in one run.

    ernieq bench MODEL [--baseline MODEL] [--batch 1,8,32] [--prompt-len 512] [--new-tokens 128] [--json F]

Per batch size B, with a prompt of P random token ids [B, P] and N new tokens:

- prefill tokens/s = B P / seconds of one forward pass over the prompt into a static KV cache
  (transformers' ``StaticCache`` of P + N positions: the shapes of every decode step are fixed, which
  is what CUDA graphs need, and no step reallocates the cache);
- decode tokens/s = B N / seconds of N greedy steps of one token each;
- peak memory over the timed prefill and decode (``memory.py``: device memory on CUDA, peak RSS on
  the CPU) and the weight bytes the loaded model holds (parameters and buffers: packed weights,
  scales, embeddings, norms; the decode cache's decoded copies are not weights and are listed in the
  kernel path).

Each batch size runs once untimed with a few decode steps first, so what is timed is the steady
state: the decode cache has filled, ``torch.compile`` has compiled and CUDA graphs are recorded.
The decode step goes through ``torch.compile(mode="reduce-overhead")`` (CUDA graphs) on CUDA
unless ``compile`` is False; when compiling was not asked for explicitly and fails, the run goes
on eagerly and the row's note says why. The prefill always runs eagerly (one call per batch size).
A model too large for memory (``--stream``, or ``auto`` when its weights do not fit; see
``ernieq.runtime.stream``) runs streamed, one decoder layer resident at a time: a dynamic KV cache, no
warm-up and no compiling, every layer read from the checkpoint once for the prompt and once per decode
step, which the decode column says; its weight bytes are those it computes with, one layer at a time.
The model is freed before the baseline loads, so each peak is one model's. The ratio rows divide
the model's figures by the baseline's at the same batch size.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, ClassVar

import torch
from torch import nn

from ernieq.bench.memory import memory_kind, peak_bytes, reset_peak
from ernieq.bench.report import Report, significant
from ernieq.bench.timing import synchronize
from ernieq.device import Placement, describe
from ernieq.errors import ErnieqError
from ernieq.provenance import git_commit, machine, now_iso, package_versions
from ernieq.runtime.record import kernel_path, runtime_record
from ernieq.runtime.stream import StreamedLM

log = logging.getLogger(__name__)

CPU_LABEL = "reference path on CPU — no GPU: eager PyTorch, no CUDA graphs; these numbers are not GPU throughput"
COLUMNS = ("model", "batch", "prefill tok/s", "decode tok/s", "peak GiB", "weights GiB", "decode", "kernels", "note")
TEXT_COLUMNS = ("model", "decode", "kernels", "note")
EAGER = "eager"
COMPILED = "torch.compile(mode='reduce-overhead')"
STREAMED = "eager, streamed: every layer read per step"
WARMUP_STEPS = 3  # CUDA graph trees record on the second call of a shape and replay from the third
GIB = 2**30


@dataclass(frozen=True)
class ModelBenchOptions:
    """What to measure. compile: None compiles the decode step on CUDA only (and falls back to eager
    when that fails); True compiles it anywhere, failures included; False never."""

    batches: tuple[int, ...] = (1, 8, 32)
    prompt_len: int = 512
    new_tokens: int = 128
    compile: bool | None = None
    seed: int = 0

    def check(self) -> None:
        """One-line errors for values that cannot be measured, before any model loads."""
        if not self.batches or min(self.batches) < 1:
            raise ErnieqError(f"bench: --batch takes batch sizes >= 1, got {list(self.batches)}")
        if self.prompt_len < 1 or self.new_tokens < 1:
            raise ErnieqError(f"bench: --prompt-len and --new-tokens must be >= 1, got {self.prompt_len} and "
                              f"{self.new_tokens}")


@dataclass
class Throughput:
    """One model at one batch size: the timed prefill and decode, peak memory and weight bytes."""

    model: str
    batch: int
    prompt_len: int
    new_tokens: int
    prefill_s: float
    decode_s: float
    peak_memory_bytes: int
    weight_bytes: int
    decode: str  # EAGER, COMPILED or STREAMED
    kernels: str  # ``ernieq.runtime.record.kernel_path`` after the run
    note: str = ""
    failed: ClassVar[bool] = False

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.batch * self.prompt_len / self.prefill_s

    @property
    def decode_tokens_per_s(self) -> float:
        return self.batch * self.new_tokens / self.decode_s

    def to_json(self) -> dict:
        return {**asdict(self), "prefill_tokens_per_s": self.prefill_tokens_per_s,
                "decode_tokens_per_s": self.decode_tokens_per_s}

    def cells(self) -> list[str]:
        return [self.model, str(self.batch), significant(self.prefill_tokens_per_s),
                significant(self.decode_tokens_per_s), significant(self.peak_memory_bytes / GIB),
                significant(self.weight_bytes / GIB), self.decode, self.kernels, self.note]


@dataclass
class Ratio:
    """A model's figures over the baseline's at one batch size (> 1: faster, or more memory)."""

    model: str
    baseline: str
    batch: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    peak_memory_bytes: float
    weight_bytes: float
    failed: ClassVar[bool] = False

    @classmethod
    def of(cls, model: Throughput, baseline: Throughput) -> Ratio:
        return cls(model.model, baseline.model, model.batch, model.prefill_tokens_per_s / baseline.prefill_tokens_per_s,
                   model.decode_tokens_per_s / baseline.decode_tokens_per_s,
                   model.peak_memory_bytes / baseline.peak_memory_bytes, model.weight_bytes / baseline.weight_bytes)

    def cells(self) -> list[str]:
        figures = (self.prefill_tokens_per_s, self.decode_tokens_per_s, self.peak_memory_bytes, self.weight_bytes)
        return [f"{self.model} / {self.baseline}", str(self.batch), *(f"{significant(v)}x" for v in figures), "", "",
                ""]


@dataclass
class ModelBenchResult:
    """The table (``report``) and what the JSON file holds."""

    report: Report
    settings: dict
    models: list[dict] = field(default_factory=list)  # role, name, path, weight_bytes, runtime, rows
    ratios: list[Ratio] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"settings": self.settings, "models": self.models, "ratios": [asdict(r) for r in self.ratios]}


def weight_bytes(net: nn.Module) -> int:
    """Bytes of ``net``'s parameters and buffers, each storage once (tied embeddings count once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*net.parameters(), *net.buffers()]}
    return sum(storages.values())


def text_fields(config: dict) -> dict:
    """The language model's fields of a config.json: its ``text_config`` where it nests one (multimodal
    configs keep vocab_size and max_position_embeddings there), else the config itself."""
    text = config.get("text_config")
    return text if isinstance(text, dict) else config


def check_positions(name: str, config: dict, options: ModelBenchOptions) -> None:
    """A one-line error, before the model loads, when the prompt and new tokens do not fit its positions
    (``config``: its config.json)."""
    limit = text_fields(config).get("max_position_embeddings")
    if limit is not None and options.prompt_len + options.new_tokens > limit:
        raise ErnieqError(f"bench: {name}: --prompt-len {options.prompt_len} + --new-tokens {options.new_tokens} "
                          f"is more than its max_position_embeddings {limit}")


def _prompt(net, batch: int, options: ModelBenchOptions, device: torch.device) -> torch.Tensor:
    """Random token ids [B, P] on ``device``, the same for every model of a run (``options.seed``)."""
    gen = torch.Generator().manual_seed(options.seed)
    vocab = net.config.get_text_config().vocab_size  # a nested config (multimodal) holds it in its text config
    return torch.randint(vocab, (batch, options.prompt_len), generator=gen).to(device)


class _Run:
    """One batch size on one model: the prompt, the static KV cache and the timed passes."""

    def __init__(self, net: nn.Module, batch: int, options: ModelBenchOptions, device: torch.device):
        from transformers import StaticCache

        self.net, self.device, self.options = net, device, options
        p, n = options.prompt_len, options.new_tokens
        self.prompt = _prompt(net, batch, options, device)  # [B, P]
        self.positions = torch.arange(p + n, device=device)[None]  # [1, P + N]
        self.cache = StaticCache(config=net.config, max_cache_len=p + n)

    def __call__(self, step: Callable, steps: int) -> tuple[float, float]:
        """(prefill seconds, seconds of ``steps`` decode steps) from an empty cache."""
        p = self.options.prompt_len
        self.cache.reset()
        synchronize(self.device)
        t0 = time.perf_counter()
        logits = self.net(input_ids=self.prompt, position_ids=self.positions[:, :p], cache=self.cache,
                          use_cache=True, logits_to_keep=1).logits  # [B, 1, V]
        synchronize(self.device)
        t1 = time.perf_counter()
        tokens = [logits[:, -1].argmax(-1, keepdim=True)]  # [B, 1] greedy
        for i in range(steps):
            position = self.positions[:, p + i:p + i + 1].clone()  # [1, 1], own storage: no offset to guard on
            logits = step(input_ids=tokens[-1], position_ids=position, cache=self.cache,
                          use_cache=True).logits  # [B, 1, V]
            tokens.append(logits[:, -1].argmax(-1, keepdim=True))
        synchronize(self.device)
        seconds = t1 - t0, time.perf_counter() - t1
        self.tokens = torch.cat(tokens, dim=1)  # [B, steps + 1]: what greedy generation continues the prompt with
        return seconds


class _StreamedRun:
    """One batch size on a ``StreamedLM``: the same prompt, a dynamic KV cache (the layers come and go, so
    nothing is preallocated), every layer read once for the prompt and once per decode step."""

    def __init__(self, net: StreamedLM, batch: int, options: ModelBenchOptions, device: torch.device):
        self.net, self.device = net, device
        self.prompt = _prompt(net, batch, options, device)  # [B, P]

    def __call__(self, step: Callable, steps: int) -> tuple[float, float]:
        """(prefill seconds, seconds of ``steps`` decode steps) from an empty cache (``step`` is unused)."""
        from transformers import DynamicCache

        net, batch = self.net, self.prompt.shape[0]
        cache = DynamicCache(config=net.config)
        synchronize(self.device)
        t0 = time.perf_counter()
        tokens = [net.logits(net.final_hidden(self.prompt, batch, cache)[:, -1:]).argmax(-1)]  # [B, 1] greedy
        synchronize(self.device)
        t1 = time.perf_counter()
        for _ in range(steps):
            tokens.append(net.logits(net.final_hidden(tokens[-1], batch, cache)).argmax(-1))  # [B, 1]
        synchronize(self.device)
        seconds = t1 - t0, time.perf_counter() - t1
        self.tokens = torch.cat(tokens, dim=1)  # [B, steps + 1]
        return seconds


def _decode_step(net: nn.Module, compile: bool) -> tuple[Callable, str]:
    return (torch.compile(net, mode="reduce-overhead"), COMPILED) if compile else (net, EAGER)


def measure(name: str, net: nn.Module, options: ModelBenchOptions, device: torch.device) -> list[Throughput]:
    """Every batch size of ``options`` on the loaded ``net`` (see the module doc)."""
    streamed = isinstance(net, StreamedLM)
    if streamed and options.compile:
        raise ErnieqError(f"bench: {name} streams ({net.stream_plan.describe()}): --compile needs the model "
                          f"resident (--no-stream where it fits)")
    nbytes = net.stream_plan.weight_bytes if streamed else weight_bytes(net)
    if streamed:
        step, decode = net, STREAMED
    else:
        step, decode = _decode_step(net, options.compile if options.compile is not None else device.type == "cuda")
    rows, note = [], ""  # the note stays on every later row once compiling failed
    with torch.inference_mode():
        for batch in options.batches:
            run = (_StreamedRun if streamed else _Run)(net, batch, options, device)
            try:
                if not streamed:  # a streamed model reads every layer anew each step: nothing to warm
                    run(step, min(WARMUP_STEPS, options.new_tokens))
            except Exception as err:  # torch.compile fails in many types (BackendCompilerFailed, Unsupported, ...)
                if options.compile is not None or step is net:
                    raise
                log.warning("bench: %s: torch.compile of the decode step failed (%s: %s); decoding eagerly",
                            name, type(err).__name__, err)
                note = f"torch.compile failed ({type(err).__name__}): eager"
                step, decode = net, EAGER
                run(step, min(WARMUP_STEPS, options.new_tokens))
            reset_peak(device)
            prefill_s, decode_s = run(step, options.new_tokens)
            rows.append(Throughput(name, batch, options.prompt_len, options.new_tokens, prefill_s, decode_s,
                                   peak_bytes(device), nbytes, decode, kernel_path(net, device), note))
            log.info("bench: %s, batch %d: prefill %.0f tok/s, decode %.1f tok/s", name, batch,
                     rows[-1].prefill_tokens_per_s, rows[-1].decode_tokens_per_s)
            del run
    return rows


def run_model_bench(models: list[tuple[str, str, Callable[[], nn.Module]]], placement: Placement,
                    options: ModelBenchOptions, command: str) -> ModelBenchResult:
    """Measure each of ``models`` — (role, name, load) with role "model" or "baseline" (one at most), load
    returning the model on ``placement`` — one after the other, freeing each before the next loads; then
    every model's ratios to the baseline."""
    options.check()
    device = placement.device
    banner = CPU_LABEL if device.type != "cuda" else ""
    settings = {"batches": list(options.batches), "prompt_len": options.prompt_len,
                "new_tokens": options.new_tokens, "static_kv_cache": True, "warmup_steps": WARMUP_STEPS,
                "peak_memory": memory_kind(device), "label": banner, "command": command, "date": now_iso(),
                "commit": git_commit(), "machine": machine(), "versions": package_versions()}
    result = ModelBenchResult(Report(columns=COLUMNS, text_columns=TEXT_COLUMNS, banner=banner), settings)
    if sum(role == "baseline" for role, _, _ in models) > 1:
        raise ErnieqError("bench: one baseline at most")
    measured: list[tuple[str, list[Throughput]]] = []
    for role, name, load in models:
        net = load()
        rows = measure(name, net, options, device)
        runtime = runtime_record(placement, rows[-1].kernels, stream=net.stream_plan.record())
        result.models.append({"role": role, "name": name, "weight_bytes": rows[0].weight_bytes,
                              "runtime": runtime, "rows": [r.to_json() for r in rows]})
        result.report.rows += rows
        measured.append((role, rows))
        del net
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = next((rows for role, rows in measured if role == "baseline"), None)
    if base is not None:
        result.ratios = [Ratio.of(m, b) for role, rows in measured if role != "baseline"
                         for m, b in zip(rows, base, strict=True)]
        result.report.rows += result.ratios
    result.report.header = _header(result, placement)
    return result


def _header(result: ModelBenchResult, placement: Placement) -> list[str]:
    s = result.settings
    runtimes = "; ".join(f"{m['role']} {m['name']}: {describe(m['runtime'])}" for m in result.models)
    return ["# ernieq whole-model benchmark", "",
            f"- runtime: {runtimes}",
            f"- date: {s['date']}; commit: {s['commit']}; machine: {s['machine']}",
            f"- command: `{s['command']}`",
            f"- prompt {s['prompt_len']} random tokens, {s['new_tokens']} new tokens (greedy), static KV cache; "
            f"prefill tok/s = batch x prompt / prefill s, decode tok/s = batch x new tokens / decode s; "
            f"after a warm-up of {s['warmup_steps']} decode steps",
            f"- peak GiB: {s['peak_memory']} over the timed prefill and decode; weights GiB: parameters and buffers "
            f"as loaded on {placement.device}"]
