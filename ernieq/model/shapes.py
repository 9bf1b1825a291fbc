"""The dimensions ``config.json`` states, each a positive integer or absent.

Shape legend: H hidden size, V vocabulary, D head dim, Q attention heads, KV key/value heads,
I intermediate size (dense MLP), M routed-expert intermediate size, E routed experts.
Every tensor's expected shape comes from the transformers model itself
(``Adapter.expected_shape``); these dimensions are what the FastDeploy layout names, and
checking them first turns a config field of the wrong type into a one-line error.
"""

from __future__ import annotations

from collections.abc import Iterable

from ernieq.model.checkpoint import CheckpointError

# config keys, first present wins: routed experts' M and the number of routed experts E
EXPERT_INTER_KEYS = ("moe_intermediate_size",)
NUM_EXPERT_KEYS = ("moe_num_experts", "num_local_experts", "num_experts")


def config_int(config: dict, keys: Iterable[str], source: str) -> int | None:
    """The first of ``keys`` present in ``config`` as a positive int, None when none is present."""
    for key in keys:
        if key in config and config[key] is not None:
            value = config[key]
            if isinstance(value, list) and key in EXPERT_INTER_KEYS + NUM_EXPERT_KEYS:
                return None  # ERNIE 4.5 VL: one value per modality; not checked
            if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
                raise CheckpointError(f"{source}: {key} must be a positive integer, got {value!r}")
            return value
    return None


MAX_LAYERS = 4096  # a config beyond this is damaged, not large (the largest published models have ~100)


def expected_dims(config: dict, source: str = "config.json") -> dict[str, int | None]:
    """The dimensions named in the module doc, from ``config`` (and its layer count checked)."""
    layers = config_int(config, ("num_hidden_layers",), source)
    if layers is not None and layers > MAX_LAYERS:
        raise CheckpointError(f"{source}: num_hidden_layers {layers} is implausible (more than {MAX_LAYERS})")
    h = config_int(config, ("hidden_size",), source)
    q = config_int(config, ("num_attention_heads",), source)
    kv = config_int(config, ("num_key_value_heads",), source) or q
    d = config_int(config, ("head_dim",), source) or (h // q if h and q and h % q == 0 else None)
    return {
        "H": h,
        "V": config_int(config, ("vocab_size",), source),
        "Q*D": q * d if q and d else None,
        "KV*D": kv * d if kv and d else None,
        "I": config_int(config, ("intermediate_size",), source),
        "M": config_int(config, EXPERT_INTER_KEYS, source),
        "E": config_int(config, NUM_EXPERT_KEYS, source),
    }
