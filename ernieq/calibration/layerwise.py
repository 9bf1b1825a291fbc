"""Run a checkpoint's decoder layers one at a time, with only the current layer in memory.

The transformers model is built on the meta device (no memory for weights);
embeddings, then each decoder layer in turn, are loaded from the checkpoint with
``load_state_dict(assign=True)`` onto the compute device, run over every
calibration sequence, and sent back to the meta device: one layer's weights on
the device at a time. Hidden states [n_seq, L, H] are carried from one layer to
the next, on the device when they fit in ``HIDDEN_SHARE`` of its available
memory, else in host memory with one batch at a time on the device (the log says
which); what each layer is called with besides them (masks per layer type,
rotary embeddings, position ids) is what the model's own forward gives it
(``ernieq.model.decoder.layer_calls``), for any architecture.

Checkpoint names become transformers names through the adapter
(``Adapter.to_hf_name``); routed experts become the experts module's own
parameters: as stored when the checkpoint holds them fused, else (per-expert tensors,
or per-expert replacements) copied into place one expert at a time by the module's
layout (``ExpertLayout.fill``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ernieq.device import HOST, available_memory, trim_host_memory
from ernieq.model.adapters import BIAS, WEIGHT, TensorClass, TensorInfo, adapter_for
from ernieq.model.checkpoint import CheckpointError, CheckpointReader
from ernieq.model.decoder import after_layers, hf_config, layer_calls, meta_model, rebuild_computed_buffers
from ernieq.model.expert_layout import PROJECTIONS
from ernieq.model.moe import ExpertGroup

log = logging.getLogger(__name__)

HIDDEN_SHARE = 0.5  # of the compute device's available memory that the hidden states may fill between layers


@dataclass(frozen=True)
class LayerTensors:
    """The checkpoint tensors of one decoder layer: their infos, and the routed experts if any."""

    layer: int
    infos: tuple[TensorInfo, ...]
    experts: ExpertGroup | None


class MetaModel:
    """A transformers causal LM built on the meta device from the config of a checkpoint ``reader`` (no memory
    for weights), whose parts a subclass materialises on ``device`` in ``dtype``: decoder layers one at a time
    (``load_layer``/``release_layer``), and the parts outside them (embeddings, final norm, head) with
    ``load_outer``. Any architecture: where the layers are is the adapter's ``stack``, and what each layer is
    called with (masks per layer type, rotary embeddings, a KV cache) is what the model's own forward gives it
    (``layer_calls``). ``reader``: a ``CheckpointReader`` or a quantized format's reader (``path``, ``config``,
    ``release()``)."""

    def __init__(self, reader, dtype: torch.dtype, device: torch.device):
        self.reader = reader
        self.path = Path(reader.path)
        source = str(self.path / "config.json")
        self.adapter = adapter_for(reader.config, source)
        self.dtype = dtype
        self.device = device
        self.config = hf_config(reader.config, source)
        self.model = meta_model(self.config, source, dtype)
        self.stack = self.adapter.stack
        self.layers: nn.ModuleList = self.model.get_submodule(self.stack.layers)
        rebuild_computed_buffers(self.model, self.config, device)  # rotary embeddings, embedding scales
        self._calls: dict[tuple, list[dict]] = {}  # (batch shape, dtype) -> every layer's keyword arguments

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return self.config.get_text_config().hidden_size

    @property
    def layers_prefix(self) -> str:
        """What the transformers names of the decoder layers' tensors start with, e.g. ``model.layers.``."""
        return f"{self.stack.layers}."

    def layer_prefix(self, i: int) -> str:
        """The transformers module path of decoder layer i, e.g. ``model.layers.3``."""
        return self.stack.layer(i)

    def load_layer(self, i: int) -> nn.Module:
        raise NotImplementedError

    def release_layer(self, i: int) -> None:
        """Send layer i's weights back to the meta device (frees their memory) and unmap the shards read."""
        self.layers[i].to("meta")
        self.reader.release()  # unmap the files read: their pages stop counting in this process's memory
        trim_host_memory()

    def place_outer(self) -> None:
        """Put the checkpoint's tensors outside the decoder layers into the model, on the device."""
        raise NotImplementedError

    def load_outer(self) -> None:
        """Materialise everything outside the decoder layers (embeddings, final norm, head) on the device."""
        self.place_outer()
        if getattr(self.config, "tie_word_embeddings", False):
            self.model.tie_weights()
        rebuild_computed_buffers(self.model, self.config, self.device)
        missing = [n for n, p in self.model.named_parameters() if p.is_meta and not n.startswith(self.layers_prefix)]
        if missing:
            raise CheckpointError(f"{self.path}: no stored values for {missing[:4]}")

    def _calls_for(self, inputs_embeds: torch.Tensor, cache=None) -> list[tuple[tuple, dict]]:
        """The model's own (args, kwargs) of every decoder layer for input embeddings [B, L, H] (on the device);
        ``cache``: a transformers KV cache holding the earlier positions (taken before the first layer runs)."""
        calls = layer_calls(self.model, self.stack, inputs_embeds, cache)
        if cache is None:
            self._calls[(tuple(inputs_embeds.shape), inputs_embeds.dtype)] = [kwargs for _, kwargs in calls]
        return calls

    def layer_inputs(self, i: int, hidden: torch.Tensor) -> dict:
        """The keyword arguments decoder layer i takes besides the hidden states [B, L, H] (no KV cache)."""
        key = (tuple(hidden.shape), hidden.dtype)
        if key not in self._calls:
            self._calls_for(hidden)
        return self._calls[key][i]

    def enter(self, token_ids: torch.Tensor, cache=None) -> tuple[torch.Tensor, list[dict]]:
        """token_ids int64 [B, L] (embeddings resident: ``load_outer``) -> what the first decoder layer sees
        [B, L, H] and every layer's keyword arguments, with ``cache`` when given."""
        calls = self._calls_for(self.model.get_input_embeddings()(token_ids.to(self.device)), cache)
        return calls[0][0][0], [kwargs for _, kwargs in calls]

    def leave(self, hidden: torch.Tensor) -> torch.Tensor:
        """What the decoder stack makes of the last layer's output [B, L, H] (the final norm), on the device."""
        return after_layers(self.model, self.stack, hidden.to(self.device))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head on final hidden states [..., L, H] -> logits [..., L, V] (with the config's final
        logit soft-capping, as Gemma's forward applies it)."""
        logits = self.model.get_output_embeddings()(hidden.to(self.device))
        cap = getattr(self.config.get_text_config(), "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits


class LayerwiseModel(MetaModel):
    """A plain checkpoint's transformers model, materialised one piece at a time on ``device`` in ``dtype``."""

    def __init__(self, path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: torch.device = HOST):
        super().__init__(CheckpointReader(path), dtype, device)
        self._by_layer: dict[int | None, list[TensorInfo]] = {}
        for name in self.reader.keys():
            info = self.adapter.classify(name)
            self._by_layer.setdefault(info.layer, []).append(info)

    def place_outer(self) -> None:
        expected = self.model.state_dict()
        state = {self.adapter.to_hf_name(t.name): self.reader.get(t.name) for t in self._by_layer.get(None, [])}
        unexpected = sorted(k for k in state if k not in expected or k.startswith(self.layers_prefix))
        if unexpected:
            raise CheckpointError(f"{self.path}: tensors the model has no place for outside its layers: "
                                  f"{unexpected[:4]}")
        self.model.load_state_dict({k: v.to(self.device, expected[k].dtype if v.is_floating_point() else v.dtype)
                                    for k, v in state.items()}, strict=False, assign=True)

    def layer_tensors(self, i: int) -> LayerTensors:
        infos = tuple(sorted(self._by_layer.get(i, []), key=lambda t: t.name))
        if not infos:
            raise CheckpointError(f"{self.path}: no tensors for decoder layer {i}")
        return LayerTensors(i, infos, ExpertGroup.from_infos(infos, self.adapter))

    def embed(self, token_ids: torch.Tensor, batch_size: int, store: torch.device) -> list[torch.Tensor]:
        """token_ids: int64 [n_seq, L]. Returns what the first decoder layer sees, in batches of [B, L, H],
        on ``store``."""
        emb = self.model.get_input_embeddings()
        names = [t.name for t in self._by_layer.get(None, []) if t.cls is TensorClass.EMBEDDING]
        if not names:
            raise CheckpointError(f"{self.path}: no embedding tensor")
        module = _materialise(emb, {"weight": self.reader.get(names[0])}, self.device, f"{self.path}: embeddings")
        try:
            with torch.no_grad():
                return [self._calls_for(module(ids.to(self.device)))[0][0][0].to(store)
                        for ids in token_ids.split(batch_size)]
        finally:
            module.to("meta")

    def load_layer(self, i: int, replaced: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """Decoder layer i with its weights from the checkpoint (in the model's dtype, on its device); ``replaced``
        gives other values for some checkpoint tensors (by name; routed experts by canonical name)."""
        replaced = replaced or {}
        lt = self.layer_tensors(i)
        prefix = self.layer_prefix(i) + "."
        state = {}
        routed = {t.name for t in lt.experts.infos} if lt.experts else set()
        for info in lt.infos:
            if info.name in routed:
                continue
            hf = self.adapter.to_hf_name(info.name)
            if not hf.startswith(prefix):
                raise CheckpointError(f"{self.reader.file_of(info.name)}: tensor {info.name!r} maps to {hf!r}, "
                                      f"outside decoder layer {prefix[:-1]}")
            state[hf[len(prefix):]] = replaced[info.name] if info.name in replaced else self.reader.get(info.name)
        if lt.experts:
            module = self.model.get_submodule(lt.experts.container)
            state.update(_experts_state(self.reader, lt.experts, prefix, replaced, module, self.device))
        layer = _materialise(self.layers[i], state, self.device, f"{self.path}: decoder layer {i}")
        rebuild_computed_buffers(self.model, self.config, self.device)  # a layer sent back to meta lost its own
        return layer


def _experts_state(reader: CheckpointReader, experts: ExpertGroup, layer_prefix: str,
                   replaced: dict[str, torch.Tensor], module: nn.Module, device: torch.device) -> dict:
    """The experts module's parameters (relative to the layer) from the checkpoint, with the per-expert
    weights named in ``replaced`` (canonical names) taking those values. ``module``: the (meta) experts
    module, whose parameters' dtypes the weights take. Stored fused and not replaced, the parameters are
    the file's own tensors; else every expert is copied straight into place on ``device``, one expert read
    at a time (``ExpertLayout.fill``; the same copy ``QuantizedParts`` makes of experts a recipe kept)."""
    rel = experts.container[len(layer_prefix):]
    layout = experts.layout
    names = [experts.canonical_name(e, p) for e in range(layout.num_experts) for p in PROJECTIONS]
    biases = experts.params({t.name: reader.get(t.name) for t in experts.infos if t.kind == BIAS}, (BIAS,))
    if experts.stored_fused and not any(n in replaced for n in names):
        params = experts.params({t.name: reader.get(t.name) for t in experts.infos if t.kind == WEIGHT}, (WEIGHT,))
    else:
        stored = experts.expert_weights(reader.get)

        def weight(e: int, proj: str) -> torch.Tensor:
            name = experts.canonical_name(e, proj)
            return replaced[name] if name in replaced else stored(e, proj)

        params = layout.fill(weight, getattr(module, layout.gate_up).dtype, device,
                             after_expert=None if experts.stored_fused else reader.release,
                             where=f"{reader.path}: {experts.container}")
    return {f"{rel}.{p}": t for p, t in {**params, **biases}.items()}


def _materialise(module: nn.Module, state: dict, device: torch.device, what: str) -> nn.Module:
    """Load ``state`` into a meta-device ``module`` on ``device`` (strict: every tensor, nothing else)."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{what}: checkpoint and model disagree: missing {missing[:4]}, unexpected {unexpected[:4]}")
    out = {}
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise CheckpointError(f"{what}: tensor {k!r} has shape {tuple(v.shape)}, the model wants {tuple(expected[k].shape)}")
        out[k] = v.to(device, expected[k].dtype if v.is_floating_point() else v.dtype)  # the model's dtype
    module.load_state_dict(out, strict=True, assign=True)
    return module


def hidden_store(device: torch.device, nbytes: int) -> torch.device:
    """Where the hidden states (``nbytes`` in all) wait between layers: on ``device`` when they fit in
    ``HIDDEN_SHARE`` of its available memory, else in host memory, moved to the device one batch at a time."""
    room = int(HIDDEN_SHARE * available_memory(device))
    if nbytes <= room:
        return device
    log.info("the hidden states (%.2f GiB) do not fit in %.2f GiB of %s memory; they wait in host "
             "memory and go to %s one batch at a time", nbytes / 2**30, room / 2**30, device, device)
    return HOST


def run_layers(
    model: LayerwiseModel,
    token_ids: torch.Tensor,
    *,
    batch_size: int,
    observe: Callable[[int, nn.Module], object] | None = None,
    adjust: Callable[..., nn.Module] | None = None,
    on_output: Callable[[int, torch.Tensor], None] | None = None,
    on_batch: Callable[[], None] | None = None,
    targets: str | None = None,
    resume_from: tuple[int, list[torch.Tensor], list[torch.Tensor] | None] | None = None,
    on_layer: Callable[[int, list[torch.Tensor], list[torch.Tensor] | None], None] | None = None,
) -> torch.Tensor:
    """Run every decoder layer over ``token_ids`` [n_seq, L], one layer in memory at a time.

    observe(i, layer): a context manager entered around layer i's whole pass (hooks go there).
    adjust(i, layer) -> layer: called after that pass; the layer it returns (e.g. with quantized
    weights) computes layer i's output in a second pass, which is what layer i + 1 then sees.
    on_output(i, hidden [n_seq, L, H]): called with layer i's output.
    on_batch(): called after every batch of every layer's first pass (progress).
    targets: adjust is called as ``adjust(i, layer, inputs, targets)`` with layer i's inputs
    [n_seq, L, H] (the adjusted stream's) and outputs of the layer as loaded [n_seq, L, H]
    (block-output tuning's target): on those same inputs (``"local"``: the first pass's outputs,
    kept), or on the unquantized model's own hidden states (``"model"``: that stream is carried
    beside the adjusted one, each layer as loaded on the outputs of the one before).
    on_layer(i, hidden, plain): called once layer i is done with the batches [B, L, H] layer i + 1
    will see, and (``"model"``) the unquantized stream's; resume_from: (first layer, hidden, plain)
    as on_layer gave them for the layer before it, to run from there (``resume.py``).
    Returns the last layer's output [n_seq, L, H] (before the final norm), where the hidden
    states were kept (``hidden_store``).
    """
    copies = 2 if adjust is not None else 1  # the second pass builds the next states beside the old
    copies += 2 if targets == "model" else 1 if targets == "local" else 0  # the unquantized stream or the targets
    itemsize = torch.empty(0, dtype=model.dtype).element_size()
    store = hidden_store(model.device, copies * token_ids.numel() * model.config.get_text_config().hidden_size * itemsize)
    if resume_from is None:
        first_layer, hidden = 0, model.embed(token_ids, batch_size, store)
        plain = list(hidden) if targets == "model" else None  # the unquantized model's states
    else:
        first_layer, hidden, plain = resume_from
        hidden = [h.to(store) for h in hidden]
        plain = [h.to(store) for h in plain] if plain is not None else None
        if len(hidden) != len(token_ids.split(batch_size)) or (plain is None) != (targets != "model"):
            raise ValueError("the saved hidden states do not match the batches of this pass")

    def forward(i: int, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        h = h.to(model.device)  # a batch of offloaded states comes to the device for the layer
        out = layer(h, **model.layer_inputs(i, h))
        return (out[0] if isinstance(out, tuple) else out).to(store)  # [B, L, H]

    for i in range(first_layer, model.num_layers):
        layer = model.load_layer(i).eval()
        try:
            ctx = observe(i, layer) if observe is not None else contextlib.nullcontext()
            first = []
            with ctx, torch.no_grad():
                for j, h in enumerate(hidden):
                    out = forward(i, layer, h)
                    if adjust is None:
                        hidden[j] = out
                    elif targets == "local":
                        first.append(out)
                    if on_batch is not None:
                        on_batch()
            if targets is not None:
                if targets == "model":
                    with torch.no_grad():
                        first = plain = [forward(i, layer, h) for h in plain]  # the unquantized layer's outputs
                layer = adjust(i, layer, torch.cat(hidden), torch.cat(first)).eval()
                del first
            elif adjust is not None:
                layer = adjust(i, layer).eval()
            if adjust is not None:  # the next layer's inputs: this one's outputs, as adjusted
                with torch.no_grad():
                    hidden = [forward(i, layer, h) for h in hidden]
        finally:
            model.release_layer(i)
        if on_output is not None:
            on_output(i, torch.cat(hidden))
        if on_layer is not None:
            on_layer(i, hidden, plain)
    return torch.cat(hidden)
