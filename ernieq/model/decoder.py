"""A transformers causal LM's decoder stack: where its layers are, and what each layer is called with.

Every model computes the same things before its first decoder layer (the causal mask, per
layer type for sliding-window models; position ids; rotary embeddings, per layer type for
Gemma 3) but each in its own way. Rather than rebuild them, :func:`layer_calls` runs the
model's own forward over given input embeddings with every decoder layer replaced by a
stand-in that records its arguments, and stops after the last one: the arguments are the
model's, for any architecture, on any device (on the meta device too, for a shape-only run).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ernieq.model.checkpoint import CheckpointError


def hf_config(config: dict, source: str = "config.json"):
    """The transformers config object of a checkpoint's ``config.json`` (its quantization_config left out)."""
    from transformers import AutoConfig

    if not isinstance(config.get("model_type"), str):
        raise CheckpointError(f"{source}: no model_type string")
    cfg = {k: v for k, v in config.items() if k not in ("quantization_config", "model_type")}
    try:
        return AutoConfig.for_model(config["model_type"], **cfg)
    except (ValueError, TypeError, KeyError) as err:  # an unknown model_type, or a field transformers refuses
        raise CheckpointError(f"{source}: unknown architecture {config['model_type']!r}: transformers cannot build "
                              f"its config ({err})") from None


def meta_model(config, source: str = "config.json", dtype: torch.dtype = torch.float32) -> nn.Module:
    """The causal LM ``config`` describes, on the meta device (no memory for weights)."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (ValueError, KeyError) as err:  # not a causal LM transformers knows
        raise CheckpointError(f"{source}: unknown architecture {getattr(config, 'architectures', None) or config.model_type!r}:"
                              f" transformers has no causal LM for it ({err})") from None
    except (TypeError, AttributeError, RuntimeError, AssertionError, OverflowError, IndexError,
            ZeroDivisionError) as err:  # a config field of the wrong kind or size
        raise CheckpointError(f"{source}: transformers cannot build the model from it ({type(err).__name__}: {err})") from None


@dataclass(frozen=True)
class DecoderStack:
    """Where the decoder layers of a causal LM sit: ``base`` is the module that runs them (``model``),
    ``layers`` the path of its ``nn.ModuleList`` (``model.layers``)."""

    base: str
    layers: str

    def layer(self, i: int) -> str:
        return f"{self.layers}.{i}"


def decoder_stack(model: nn.Module, source: str = "config.json") -> DecoderStack:
    """The decoder stack of a transformers causal LM: the ``nn.ModuleList`` of its base model with
    one entry per hidden layer."""
    prefix = model.base_model_prefix
    base = getattr(model, prefix, None) if prefix else None
    if base is None:
        raise CheckpointError(f"{source}: {type(model).__name__} has no base model at {prefix!r}")
    num = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    lists = [(name, m) for name, m in base.named_children() if isinstance(m, nn.ModuleList) and len(m) == num]
    if len(lists) != 1:
        raise CheckpointError(f"{source}: {type(base).__name__} has {len(lists)} module lists of "
                              f"num_hidden_layers = {num} entries; ernieq needs exactly one decoder stack")
    return DecoderStack(prefix, f"{prefix}.{lists[0][0]}")


class _StopForward(Exception):
    """Raised by the last layer's stand-in: nothing after the decoder stack is computed."""


class _Recorder(nn.Module):
    def __init__(self, calls: list, last: bool):
        super().__init__()
        self.calls, self.last = calls, last

    def forward(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        if self.last:
            raise _StopForward
        return args[0]  # hidden states unchanged: the next layer's arguments do not depend on them


def layer_calls(model: nn.Module, stack: DecoderStack, inputs_embeds: torch.Tensor,
                cache=None) -> list[tuple[tuple, dict]]:
    """(args, kwargs) of every decoder layer when the model runs on ``inputs_embeds`` [B, L, H]:
    args[0] of layer 0 is what the first layer sees; the keyword arguments (masks, position
    embeddings ...) are the model's own. Modules before the stack must hold their values.
    ``cache``: a transformers KV cache holding the earlier positions; the stand-ins leave it as it
    is, so the arguments are those of the next positions, and each layer's carry the cache."""
    base = model.get_submodule(stack.base)
    layers = model.get_submodule(stack.layers)
    originals = list(layers)
    calls: list = []
    for i in range(len(layers)):
        layers[i] = _Recorder(calls, i == len(layers) - 1)
    try:
        # on the meta device a cache keeps transformers from reading position values (its packed-sequence
        # check needs them); with values, no cache: the layers see what a single forward gives them
        if cache is not None:
            base(inputs_embeds=inputs_embeds, cache=cache, use_cache=True)
        else:
            base(inputs_embeds=inputs_embeds, use_cache=inputs_embeds.is_meta)
    except _StopForward:
        pass
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    if len(calls) != len(originals):
        raise CheckpointError(f"{type(model).__name__}: ran {len(calls)} of {len(originals)} decoder layers")
    return calls


class _Emit(nn.Module):
    """Stands in for decoder layer 0 in :func:`after_layers`: gives out the stored last-layer output."""

    def __init__(self, hidden: torch.Tensor | None):
        super().__init__()
        self.hidden = hidden

    def forward(self, *args, **kwargs):
        return self.hidden if self.hidden is not None else args[0]


def after_layers(model: nn.Module, stack: DecoderStack, hidden: torch.Tensor) -> torch.Tensor:
    """What the base model makes of the last decoder layer's output ``hidden`` [B, L, H] (its final norm,
    whatever the architecture does there): its own forward runs with every decoder layer replaced by a
    stand-in, the first giving out ``hidden``. Modules outside the stack must hold their values."""
    base = model.get_submodule(stack.base)
    layers = model.get_submodule(stack.layers)
    originals = list(layers)
    for i in range(len(layers)):
        layers[i] = _Emit(hidden if i == 0 else None)
    try:
        out = base(inputs_embeds=hidden, use_cache=False)
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return out[0]


def rebuild_computed_buffers(model: nn.Module, config, device: torch.device | str) -> None:
    """Compute, on ``device``, the buffers a model built on the meta device does not store (rotary
    frequencies, Gemma's embedding scale): transformers' own ``_init_weights`` runs on a throwaway
    copy of each module holding them, whose buffers are then taken (its parameters are not: they
    come from the checkpoint). A module whose buffers that leaves unset (still NaN) is rebuilt
    from the config when it holds no parameters, else it is an error naming it."""
    for name, module in list(model.named_modules()):
        wanted = [b for b, t in module._buffers.items() if t is not None and t.is_meta]
        if not wanted:
            continue
        scratch = copy.deepcopy(module).to_empty(device=device, recurse=False)
        for b in wanted:
            if scratch._buffers[b].is_floating_point():
                scratch._buffers[b].fill_(float("nan"))
        with torch.no_grad():
            model._init_weights(scratch)
        unset = [b for b in wanted if scratch._buffers[b].is_floating_point() and scratch._buffers[b].isnan().any()]
        if not unset:
            for b in wanted:
                module._buffers[b] = scratch._buffers[b]
        elif not list(module.parameters(recurse=False)):
            try:
                with torch.device(device):
                    model.set_submodule(name, type(module)(config=config))
            except TypeError as err:
                raise CheckpointError(f"module {name} ({type(module).__name__}) has computed buffers ernieq cannot "
                                      f"rebuild ({err})") from None
        else:
            raise CheckpointError(f"module {name} ({type(module).__name__}): transformers does not compute its "
                                  f"buffers {unset}")
