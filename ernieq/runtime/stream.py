"""Models larger than memory: one decoder layer resident at a time, every window through layer i, then i + 1.

A :class:`StreamedLM` keeps the parts outside the decoder layers (embeddings, final norm, head) on the
device and loads each decoder layer from the checkpoint when it runs, then drops it: a plain checkpoint
through ``LayerwiseModel`` (calibration's own loader), a quantized one through ``QuantizedLayerwise``
(the packed ernieq modules ``load_quantized`` builds, one layer's worth). Evaluation runs layer-major:
all windows' hidden states [W, L, H] go through layer i before layer i + 1 is loaded, so every weight
is read once per evaluation, and they wait on the device, or in host memory when they do not fit
(``hidden_store``). Token-by-token generation runs the same way with a KV cache, and so reads every
layer once per new token: slow, with bounded memory.

Why ernieq's own streaming and not accelerate's big-model inference (``device_map="auto"`` with CPU or
disk offload, what transformers offers):

- accelerate runs the model as it is called, window by window (and token by token), and its hooks bring
  each offloaded module's weights to the device for every call: a perplexity pass over W windows reads
  every weight W times. Layer-major order reads it once;
- with nothing but a CPU, "CPU offload" keeps every weight in host memory (no saving); only disk offload
  helps, and it needs an offload folder for every tensor not stored as the model holds it (bf16 weights
  computed in float32, per-expert tensors fused into transformers' [E, 2I, H]): another full copy on disk;
- ernieq's quantized modules (``QuantLinear``, ``QuantMoEExperts``) would have to be built whole first and
  then offloaded; here one layer's packed tensors are read from the checkpoint's own files, and the decode
  cache holds that layer's decoded weights only while it runs;
- calibration already streams this way (``ernieq.calibration.layerwise``): one loader, one mask and rotary
  path, device-agnostic, no hooks.

:func:`stream_plan` decides: ``--stream`` / ``--no-stream``, or by default stream when the weights as the
model computes with them (plain: every weight in the compute dtype; quantized: decoded on the reference
path, packed on the Triton path) exceed ``STREAM_SHARE`` of the memory available on the device.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ernieq.calibration.layerwise import LayerwiseModel, MetaModel, hidden_store
from ernieq.device import Placement, available_memory
from ernieq.errors import ErnieqError
from ernieq.runtime.expert_loop import QuantExpertLoop
from ernieq.runtime.modules import QuantLinear, QuantMoEExperts

log = logging.getLogger(__name__)

STREAM_SHARE = 0.5  # of the device's available memory a resident model's weights may fill before auto streams
STREAMED, RESIDENT = "streamed", "resident"


@dataclass(frozen=True)
class StreamPlan:
    """Whether a model runs streamed, and why: ``weight_bytes`` (as the model computes with them) against
    ``limit_bytes`` (``STREAM_SHARE`` of the device's available memory) when the choice was ``auto``."""

    path: str  # STREAMED or RESIDENT
    choice: str  # "auto", "--stream" or "--no-stream"
    weight_bytes: int
    limit_bytes: int

    @property
    def streamed(self) -> bool:
        return self.path == STREAMED

    def record(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        why = {"--stream": "as asked (--stream)", "--no-stream": "as asked (--no-stream)"}.get(self.choice)
        if why is None:
            rel = "exceed" if self.streamed else "fit in"
            why = (f"its weights ({self.weight_bytes / 2**30:.2f} GiB as computed) {rel} {STREAM_SHARE:.0%} of the "
                   f"{self.limit_bytes / STREAM_SHARE / 2**30:.2f} GiB available")
        how = "one decoder layer resident at a time" if self.streamed else "the whole model resident"
        return f"{how}: {why}"


def weight_bytes(path: Path, placement: Placement, quantized: bool) -> int:
    """Bytes of the weights of the checkpoint at ``path`` as the model computes with them on ``placement``:
    every weight in the compute dtype, except a quantized model on the Triton path, which keeps its packed bytes."""
    from ernieq.formats.registry import checkpoint_summary
    from ernieq.kernels import resolve_backend

    summary = checkpoint_summary(path)
    if quantized and resolve_backend(placement.device) != "reference":
        return summary.stored_bytes  # the rotations go to the device too
    return sum(summary.params_by_class.values()) * placement.dtype.itemsize


def stream_plan(path: Path, placement: Placement, stream: bool | None, quantized: bool) -> StreamPlan:
    """Stream when asked (``stream`` True/False), else when the weights exceed ``STREAM_SHARE`` of what is available."""
    need = weight_bytes(path, placement, quantized)
    limit = int(STREAM_SHARE * available_memory(placement.device))
    if stream is None:
        return StreamPlan(STREAMED if need > limit else RESIDENT, "auto", need, limit)
    return StreamPlan(STREAMED if stream else RESIDENT, "--stream" if stream else "--no-stream", need, limit)


@dataclass
class QuantizedUse:
    """How many quantized modules ran, how many from decoded weights, and the most bytes decoded at once."""

    modules: int = 0
    held: int = 0
    held_bytes: int = 0


def quantized_use(modules) -> QuantizedUse:
    """QuantizedUse of the ernieq modules among ``modules`` (after they ran: the decode cache fills on use)."""
    quantized = [m for m in modules if isinstance(m, (QuantLinear, QuantMoEExperts, QuantExpertLoop))]
    held = [getattr(m, "cached_bytes", 0) for m in quantized]
    held = [b for b in held if b]
    return QuantizedUse(len(quantized), len(held), sum(held))


class StreamedLM:
    """A causal LM of which only the embeddings, final norm, head and one decoder layer are resident.

    ``final_hidden(ids [W, L])`` runs every window layer-major and returns the final hidden states
    [W, L, H]; ``logits(h)`` applies the head; calling it (``model(input_ids=[B, L])``) does both;
    ``generate`` is greedy decoding with a KV cache, every layer read once per new token.
    """

    def __init__(self, layers: MetaModel, plan: StreamPlan):
        self.layers, self.stream_plan = layers, plan
        self.config, self.device, self.dtype = layers.config, layers.device, layers.dtype
        self.use: dict[int, QuantizedUse] = {}  # by layer, from its last pass
        layers.load_outer()

    @classmethod
    def open(cls, path: Path, placement: Placement, plan: StreamPlan, quantized: bool) -> StreamedLM:
        if quantized:
            from ernieq.runtime.loader import QuantizedLayerwise

            return cls(QuantizedLayerwise(path, placement.dtype, placement.device), plan)
        return cls(LayerwiseModel(path, placement.dtype, placement.device), plan)

    def eval(self) -> StreamedLM:
        return self

    def _through_layers(self, hidden: list[torch.Tensor], inputs: list[list[dict]], store: torch.device) -> None:
        """Every decoder layer over the batches ``hidden`` ([B, L, H] each, on ``store``), in place, layer-major;
        ``inputs[j][i]``: layer i's keyword arguments for batch j (the model's own, ``MetaModel.enter``)."""
        m = self.layers
        for i in range(m.num_layers):
            layer = m.load_layer(i).eval()
            try:
                for j, h in enumerate(hidden):
                    h = h.to(self.device)
                    out = layer(h, **inputs[j][i])
                    hidden[j] = (out[0] if isinstance(out, tuple) else out).to(store)  # [B, L, H]
                self.use[i] = quantized_use(layer.modules())
            finally:
                m.release_layer(i)

    @torch.no_grad()
    def final_hidden(self, token_ids: torch.Tensor, batch_size: int = 1, cache=None) -> torch.Tensor:
        """token_ids: int64 [W, L]. The final-norm hidden states [W, L, H], where ``hidden_store`` keeps them."""
        m = self.layers
        store = hidden_store(self.device, token_ids.numel() * m.hidden_size * self.dtype.itemsize)
        hidden, inputs = [], []  # the layers' arguments are taken before layer 0 runs (the cache then holds the past)
        for ids in token_ids.split(batch_size):
            h, kwargs = m.enter(ids, cache)
            hidden.append(h.to(store))
            inputs.append(kwargs)
        self._through_layers(hidden, inputs, store)
        return torch.cat([m.leave(h).to(store) for h in hidden])  # [W, L, H]

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., L, H] -> logits [..., L, V] on the device."""
        return self.layers.logits(hidden)

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, L] -> logits [B, L, V]: one layer-major pass (every layer read once)."""
        return self.logits(self.final_hidden(input_ids, batch_size=input_ids.shape[0]))

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, streamer=None) -> torch.Tensor:
        """Greedy continuation of input_ids [1, L] -> [1, L + n], n <= max_new_tokens (it stops after the
        config's end-of-sequence token, as transformers' ``generate`` does); every layer is read from the
        checkpoint once for the prompt and once per new token. ``streamer``: transformers' streamer
        interface (``put`` the prompt, then each new token; ``end``)."""
        from transformers import DynamicCache

        eos = self.config.eos_token_id
        eos = set(eos) if isinstance(eos, list) else {eos}
        cache = DynamicCache(config=self.config)
        ids = step = input_ids.to(self.device)
        if streamer is not None:
            streamer.put(ids)
        for _ in range(max_new_tokens):
            h = self.final_hidden(step, batch_size=step.shape[0], cache=cache)[:, -1:]  # [1, 1, H]
            step = self.logits(h).argmax(-1)  # [1, 1]
            ids = torch.cat([ids, step], dim=1)
            if streamer is not None:
                streamer.put(step)
            if step.item() in eos:
                break
        if streamer is not None:
            streamer.end()
        return ids

    def kernel_use(self) -> QuantizedUse:
        """QuantizedUse summed over the layers' last passes (decoded bytes: the largest layer's, one at a time)."""
        uses = list(self.use.values())
        return QuantizedUse(sum(u.modules for u in uses), sum(u.held for u in uses),
                            max((u.held_bytes for u in uses), default=0))


def no_tasks_when_streamed(plan: StreamPlan) -> None:
    """lm-evaluation-harness drives a resident transformers model: a one-line error for a model whose plan streams."""
    if plan.streamed:
        raise ErnieqError(f"lm-eval tasks need the whole model resident, and this one streams ({plan.describe()}); "
                          f"use --no-stream where it fits, or perplexity (--data) alone")
