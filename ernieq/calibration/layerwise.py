"""Run a checkpoint's decoder layers one at a time, with only the current layer in memory.

The transformers model is built on the meta device (no memory for weights);
embeddings, then each decoder layer in turn, are loaded from the checkpoint with
``load_state_dict(assign=True)`` onto the compute device, run over every
calibration sequence, and sent back to the meta device: one layer's weights on
the device at a time. Hidden states [n_seq, L, H] are carried from one layer to
the next, on the device when they fit in ``HIDDEN_SHARE`` of its available
memory, else in host memory with one batch at a time on the device (the log says
which); rotary embeddings and the causal mask are computed as the transformers
model computes them.

Checkpoint names become transformers names through the adapter
(``Adapter.to_hf_name``); per-expert routed weights are fused into
transformers' ``experts.gate_up_proj [E, 2I, H]`` (``[gate | up]``) and
``experts.down_proj [E, H, I]``.
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
from ernieq.errors import ErnieqError
from ernieq.model.adapters import TensorClass, TensorInfo, adapter_for, hf_config
from ernieq.model.checkpoint import CheckpointError, CheckpointReader
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
    ``load_outer``. The rotary embeddings and causal masks are computed here, as the transformers model
    computes them. ``reader``: a ``CheckpointReader`` or a quantized format's reader (``path``, ``config``,
    ``release()``)."""

    def __init__(self, reader, dtype: torch.dtype, device: torch.device):
        from transformers import AutoModelForCausalLM

        self.reader = reader
        self.path = Path(reader.path)
        self.dtype = dtype
        self.device = device
        self.config = hf_config(reader.config)
        self.config._attn_implementation = "sdpa"
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(self.config, dtype=dtype)
        self.base = self.model.get_submodule(_base_prefix(self.model))
        self.layers: nn.ModuleList = self.base.layers
        self.rotary = type(self.base.rotary_emb)(config=self.config).to(device)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def layers_prefix(self) -> str:
        """What the transformers names of the decoder layers' tensors start with, e.g. ``model.layers.``."""
        return f"{_base_prefix(self.model)}.layers."

    def layer_prefix(self, i: int) -> str:
        """The transformers module path of decoder layer i, e.g. ``model.layers.3``."""
        return f"{self.layers_prefix}{i}"

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
        missing = [n for n, p in self.model.named_parameters() if p.is_meta and not n.startswith(self.layers_prefix)]
        if missing:
            raise CheckpointError(f"{self.path}: no stored values for {missing[:4]}")

    def position_ids(self, seq_len: int, start: int = 0) -> torch.Tensor:
        return torch.arange(start, start + seq_len, device=self.device).unsqueeze(0)  # [1, L]

    def layer_inputs(self, hidden: torch.Tensor, cache=None) -> dict:
        """The keyword arguments a decoder layer takes besides the hidden states [B, L, H]; ``cache``: a
        transformers KV cache holding the earlier positions (taken before the first layer of the step)."""
        from transformers.masking_utils import create_causal_mask

        position_ids = self.position_ids(hidden.shape[1], cache.get_seq_length() if cache is not None else 0)
        mask = create_causal_mask(
            config=self.config, inputs_embeds=hidden, attention_mask=None, cache=cache, position_ids=position_ids
        )
        extra = {"cache": cache, "use_cache": True} if cache is not None else {}
        return {
            "attention_mask": mask,
            "position_ids": position_ids,
            "position_embeddings": self.rotary(hidden, position_ids),
            **extra,
        }


class LayerwiseModel(MetaModel):
    """A plain checkpoint's transformers model, materialised one piece at a time on ``device`` in ``dtype``."""

    def __init__(self, path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: torch.device = HOST):
        super().__init__(CheckpointReader(path), dtype, device)
        self.adapter = adapter_for(self.reader.config, str(self.path / "config.json"))
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
        experts = ExpertGroup.from_infos(infos)
        return LayerTensors(i, infos, experts.with_reader(self.reader) if experts else None)

    def embed(self, token_ids: torch.Tensor, batch_size: int, store: torch.device) -> list[torch.Tensor]:
        """token_ids: int64 [n_seq, L]. Returns the input embeddings in batches of [B, L, H], on ``store``."""
        emb = self.base.embed_tokens
        names = [t.name for t in self._by_layer.get(None, []) if t.cls is TensorClass.EMBEDDING]
        if not names:
            raise CheckpointError(f"{self.path}: no embedding tensor")
        state = {"weight": self.reader.get(names[0])}
        module = _materialise(emb, state, self.device, f"{self.path}: embeddings")
        try:
            with torch.no_grad():
                return [module(ids.to(self.device)).to(store) for ids in token_ids.split(batch_size)]
        finally:
            module.to("meta")

    def load_layer(self, i: int, replaced: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """Decoder layer i with its weights from the checkpoint (in the model's dtype, on its device); ``replaced``
        gives other values for some checkpoint tensors (by name; routed experts by per-expert name)."""
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
            state.update(_fused_experts(self.reader, self.adapter.to_hf_name(lt.experts.prefix), lt.experts, prefix,
                                        replaced, self.dtype, self.device))
        return _materialise(self.layers[i], state, self.device, f"{self.path}: decoder layer {i}")


def _base_prefix(model: nn.Module) -> str:
    """The path of the decoder stack (``model`` for *ForCausalLM)."""
    for name in ("model", "transformer"):
        sub = getattr(model, name, None)
        if sub is not None and hasattr(sub, "layers"):
            return name
    raise ErnieqError(f"{type(model).__name__}: no decoder stack with .layers found")


def _fused_experts(reader: CheckpointReader, hf_prefix: str, experts: ExpertGroup, layer_prefix: str,
                   replaced: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device) -> dict:
    """transformers' fused expert parameters (relative to the layer) from either checkpoint layout,
    with the per-expert weights named in ``replaced`` taking those values. Per-expert tensors are copied
    straight into place in ``dtype`` on ``device``: no stored-dtype copy of the whole block beside it."""
    rel = hf_prefix[len(layer_prefix):]
    if experts.fused:
        copy = bool(replaced)  # written into below: not the file's pages
        gate_up = reader.get(f"{experts.prefix}.gate_up_proj").to(device, dtype, copy=copy)  # [E, 2I, H]
        down = reader.get(f"{experts.prefix}.down_proj").to(device, dtype, copy=copy)  # [E, H, I]
        inter = gate_up.shape[1] // 2
    else:
        first_gate, first_down = (reader.get(experts.canonical_name(0, p)) for p in ("gate_proj", "down_proj"))
        inter, hidden = first_gate.shape
        gate_up = torch.empty(experts.num_experts, 2 * inter, hidden, dtype=dtype, device=device)  # [E, 2I, H]
        down = torch.empty(experts.num_experts, *first_down.shape, dtype=dtype, device=device)  # [E, H, I]
    for e in range(experts.num_experts):  # copied once into place: [gate | up] along dim 1
        for proj, dst in (("gate_proj", gate_up[e, :inter]), ("up_proj", gate_up[e, inter:]), ("down_proj", down[e])):
            name = experts.canonical_name(e, proj)
            if name in replaced:
                src = replaced[name]
            elif experts.fused:
                continue
            else:
                src = reader.get(name)
            if src.shape != dst.shape:
                raise CheckpointError(f"{reader.file_of(name) if name in reader else reader.path}: {name} has shape "
                                      f"{tuple(src.shape)}, expert 0 has {tuple(dst.shape)}")
            dst.copy_(src)
        reader.release()  # unmap as we go: the pages read do not sit in memory beside the copy
    return {f"{rel}.gate_up_proj": gate_up, f"{rel}.down_proj": down}


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
    Returns the last layer's output [n_seq, L, H] (before the final norm), where the hidden
    states were kept (``hidden_store``).
    """
    copies = 2 if adjust is not None else 1  # the second pass builds the next states beside the old
    copies += 2 if targets == "model" else 1 if targets == "local" else 0  # the unquantized stream or the targets
    itemsize = torch.empty(0, dtype=model.dtype).element_size()
    store = hidden_store(model.device, copies * token_ids.numel() * model.config.hidden_size * itemsize)
    hidden = model.embed(token_ids, batch_size, store)
    plain = list(hidden) if targets == "model" else None  # the unquantized model's states

    def forward(layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        h = h.to(model.device)  # a batch of offloaded states comes to the device for the layer
        out = layer(h, **model.layer_inputs(h))
        return (out[0] if isinstance(out, tuple) else out).to(store)  # [B, L, H]

    for i in range(model.num_layers):
        layer = model.load_layer(i).eval()
        try:
            ctx = observe(i, layer) if observe is not None else contextlib.nullcontext()
            first = []
            with ctx, torch.no_grad():
                for j, h in enumerate(hidden):
                    out = forward(layer, h)
                    if adjust is None:
                        hidden[j] = out
                    elif targets == "local":
                        first.append(out)
                    if on_batch is not None:
                        on_batch()
            if targets is not None:
                if targets == "model":
                    with torch.no_grad():
                        first = plain = [forward(layer, h) for h in plain]  # the unquantized layer's outputs
                layer = adjust(i, layer, torch.cat(hidden), torch.cat(first)).eval()
                del first
            elif adjust is not None:
                layer = adjust(i, layer).eval()
                with torch.no_grad():
                    hidden = [forward(layer, h) for h in hidden]
        finally:
            model.release_layer(i)
        if on_output is not None:
            on_output(i, torch.cat(hidden))
    return torch.cat(hidden)
