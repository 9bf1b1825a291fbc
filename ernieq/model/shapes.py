"""What shape each tensor must have, by what ``config.json`` says: checked before any work.

Shape legend: H hidden size, V vocabulary, D head dim, Q attention heads, KV key/value heads,
I intermediate size (dense MLP), M routed-expert intermediate size, E routed experts.
Weights are ``[out, in]`` (transformers' order). A dimension the config does not state
is not checked (``None`` below); a config field of the wrong type is an error.
"""

from __future__ import annotations

from collections.abc import Iterable

from ernieq.model.checkpoint import CheckpointError, CheckpointReader

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


def expected_dims(config: dict, source: str = "config.json") -> dict[str, int | None]:
    """The dimensions named in the module doc, from ``config``."""
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


# (class, proj) -> expected shape in dimension names; "*" = not checked. Biases take the first entry.
_WEIGHT_SHAPES = {
    ("embedding", None): ("V", "H"),
    ("lm_head", None): ("V", "H"),
    ("attention", "q_proj"): ("Q*D", "H"),
    ("attention", "k_proj"): ("KV*D", "H"),
    ("attention", "v_proj"): ("KV*D", "H"),
    ("attention", "o_proj"): ("H", "Q*D"),
    ("dense_mlp", "gate_proj"): ("I", "H"),
    ("dense_mlp", "up_proj"): ("I", "H"),
    ("dense_mlp", "down_proj"): ("H", "I"),
    ("shared_experts", "gate_proj"): ("*", "H"),
    ("shared_experts", "up_proj"): ("*", "H"),
    ("shared_experts", "down_proj"): ("H", "*"),
    ("routed_experts", "gate_proj"): ("M", "H"),
    ("routed_experts", "up_proj"): ("M", "H"),
    ("routed_experts", "down_proj"): ("H", "M"),
    ("routed_experts", "gate_up_proj"): ("E", "2M", "H"),  # fused [gate | up]
    ("routed_experts", "fused_down_proj"): ("E", "H", "M"),
    ("router", None): ("*", "H"),
}


def expected_shape(info, dims: dict[str, int | None]) -> tuple[int | None, ...] | None:
    """The shape ``info`` (a TensorInfo) must have, None per unchecked dimension; None when its class is free."""
    cls = info.cls.value
    if cls == "norm":
        return (None,)  # 1-D (H, or D for q/k norms)
    proj = "fused_down_proj" if info.fused and info.proj == "down_proj" else info.proj
    if cls == "router" and not info.name.endswith(".weight"):
        return None  # e_score_correction_bias: [E] or [1, E] by checkpoint
    names = _WEIGHT_SHAPES.get((cls, proj if cls not in ("embedding", "lm_head", "router") else None))
    if names is None:
        return None
    if info.name.endswith(".bias"):
        names = names[:1]
    resolved = {**dims, "2M": 2 * dims["M"] if dims["M"] else None, "*": None}
    return tuple(resolved[n] for n in names)


def check_shapes(reader: CheckpointReader, infos: Iterable, config: dict, source: str) -> None:
    """Every tensor in ``infos`` has the shape ``config`` implies (and routed experts an index below E)."""
    dims = expected_dims(config, source)
    for info in infos:
        want = expected_shape(info, dims)
        if want is None:
            continue
        got = reader.shape(info.name)
        if len(got) != len(want) or any(w is not None and g != w for g, w in zip(got, want)):
            shown = "[" + ", ".join("*" if w is None else str(w) for w in want) + "]"
            raise CheckpointError(f"{reader.file_of(info.name)}: tensor {info.name!r} has shape {list(got)}, "
                                  f"{source} implies {shown}")
        if info.expert is not None and dims["E"] is not None and info.expert >= dims["E"]:
            raise CheckpointError(f"{reader.file_of(info.name)}: tensor {info.name!r} is expert {info.expert}, "
                                  f"{source} says {dims['E']} experts")
