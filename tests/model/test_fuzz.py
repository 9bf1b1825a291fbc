"""Fuzzing the readers: random and mutated safetensors headers, index files, configs and
calibration folders. Whatever the bytes, only ernieq's own error type may escape.

Fixed seeds, a few hundred small cases per test; each case writes a few KiB.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ernieq.errors import ErnieqError
from ernieq.model.adapters import adapter_for, iter_groups, stream_groups
from ernieq.model.checkpoint import INDEX_NAME, CheckpointReader

CONFIG = {
    "architectures": ["Ernie4_5_MoeForCausalLM"],
    "model_type": "ernie4_5_moe",
    "hidden_size": 8,
    "vocab_size": 16,
    "intermediate_size": 12,
    "moe_intermediate_size": 4,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 4,
    "moe_num_experts": 2,
    "num_hidden_layers": 2,
}


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    t = {"model.embed_tokens.weight": torch.randn(16, 8, generator=g), "model.norm.weight": torch.ones(8)}
    p = "model.layers.1."
    t[p + "self_attn.q_proj.weight"] = torch.randn(8, 8, generator=g)
    t[p + "self_attn.k_proj.weight"] = torch.randn(4, 8, generator=g)
    t[p + "mlp.gate.weight"] = torch.randn(2, 8, generator=g)
    for e in range(2):
        t[p + f"mlp.experts.{e}.gate_proj.weight"] = torch.randn(4, 8, generator=g).to(torch.bfloat16)
        t[p + f"mlp.experts.{e}.down_proj.weight"] = torch.randn(8, 4, generator=g).to(torch.bfloat16)
    return t


@pytest.fixture(scope="module")
def valid_shard(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("valid") / "model.safetensors"
    save_file(_tensors(), path, metadata={"format": "pt"})
    return path.read_bytes()


def _split(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def _join(header, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _random_json(rng: random.Random, depth: int = 0):
    kinds = ["int", "bigint", "float", "str", "bool", "null"] + (["list", "dict"] if depth < 3 else [])
    kind = rng.choice(kinds)
    if kind == "int":
        return rng.randint(-5, 40)
    if kind == "bigint":
        return rng.choice([2**31, 2**63, -(2**63), 10**30])
    if kind == "float":
        return rng.choice([0.5, -1.0, 1e300, float("nan"), float("inf")])
    if kind == "str":
        return rng.choice(["", "F32", "BF16", "U8", "x" * 50, "model.safetensors", "../config.json",
                           "Ernie4_5_MoeForCausalLM"])
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "list":
        return [_random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    keys = ["dtype", "shape", "data_offsets", "a", "__metadata__", "weight_map"]
    return {rng.choice(keys): _random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def _mutate_header(rng: random.Random, header: dict) -> dict:
    header = json.loads(json.dumps(header))
    names = [k for k in header if k != "__metadata__"]
    for _ in range(rng.randint(1, 3)):
        name = rng.choice(names)
        op = rng.randrange(7)
        if not isinstance(header[name], dict):
            header[name] = {}
        if op == 0:
            header[name][rng.choice(["dtype", "shape", "data_offsets"])] = _random_json(rng)
        elif op == 1:
            header[name].pop(rng.choice(["dtype", "shape", "data_offsets"]), None)
        elif op == 2:
            header[name] = _random_json(rng)
        elif op == 3:
            header[name]["shape"] = [rng.randint(-2, 20) for _ in range(rng.randint(0, 3))]
        elif op == 4:
            a, b = rng.randint(-4, 400), rng.randint(-4, 400)
            header[name]["data_offsets"] = [a, b]
        elif op == 5:
            header["__metadata__"] = _random_json(rng)
        else:
            header[name]["dtype"] = rng.choice(["F32", "F16", "BF16", "I8", "U8", "F64", "BOOL", "F8_E4M3", "Q4", "",
                                                "f32"])
    return header


def _mutate_bytes(rng: random.Random, blob: bytes) -> bytes:
    op = rng.randrange(5)
    b = bytearray(blob)
    if op == 0:  # truncate anywhere
        return bytes(b[: rng.randrange(len(b))])
    if op == 1:  # flip bytes inside the header
        (n,) = struct.unpack("<Q", blob[:8])
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(8, 8 + n)] = rng.randrange(256)
        return bytes(b)
    if op == 2:  # a wrong header length
        n = rng.choice([0, 1, 7, len(blob) - 8, len(blob), 2**40, 2**64 - 1, rng.randrange(len(blob))])
        return struct.pack("<Q", n) + bytes(b[8:])
    if op == 3:  # random bytes
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 64)))
    b += bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))  # trailing garbage
    return bytes(b)


def _exercise_checkpoint(folder: Path) -> None:
    """Everything the quantize path asks of a checkpoint: config, tensor names, shapes, dtypes, values, groups."""
    reader = CheckpointReader(folder)
    adapter = adapter_for(reader.config, str(folder / "config.json"))
    for name in reader.keys():
        reader.shape(name)
        reader.dtype(name)
    for _group, _tensors in stream_groups(reader, adapter):
        pass
    list(iter_groups(reader, adapter))


def _only_ernieq_errors(fn, *args) -> str:
    try:
        fn(*args)
    except ErnieqError as err:
        assert str(err), "an empty error message"
        return "error"
    return "ok"


def test_mutated_safetensors_headers(tmp_path, valid_shard):
    rng = random.Random(8)
    header, data = _split(valid_shard)
    outcomes = {"ok": 0, "error": 0}
    for i in range(240):
        folder = tmp_path / str(i)
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(CONFIG))
        blob = _join(_mutate_header(rng, header), data) if i % 2 else _mutate_bytes(rng, valid_shard)
        (folder / "model.safetensors").write_bytes(blob)
        outcomes[_only_ernieq_errors(_exercise_checkpoint, folder)] += 1
    assert outcomes["error"] > 100  # the mutations do break files, and each break is reported as ours


def test_the_valid_shard_passes(tmp_path, valid_shard):
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    (tmp_path / "model.safetensors").write_bytes(valid_shard)
    assert _only_ernieq_errors(_exercise_checkpoint, tmp_path) == "ok"


def test_random_configs_and_indexes(tmp_path, valid_shard):
    rng = random.Random(9)
    outcomes = {"ok": 0, "error": 0}
    for i in range(240):
        folder = tmp_path / str(i)
        folder.mkdir()
        config = dict(CONFIG)
        op = i % 4
        if op == 0:  # a config of random JSON
            text = json.dumps(_random_json(rng))
        elif op == 1:  # a config with a few fields of random type
            for key in rng.sample(sorted(CONFIG), rng.randint(1, 4)):
                config[key] = _random_json(rng)
            text = json.dumps(config)
        elif op == 2:  # a config with random bytes in it
            raw = bytearray(json.dumps(config).encode())
            for _ in range(rng.randint(1, 4)):
                raw[rng.randrange(len(raw))] = rng.randrange(256)
            text = bytes(raw)
        else:  # a valid config beside a random index
            text = json.dumps(config)
            index = {"weight_map": {n: _random_json(rng) if rng.random() < 0.5 else "model.safetensors"
                                    for n in _tensors()}} if rng.random() < 0.7 else _random_json(rng)
            (folder / INDEX_NAME).write_text(json.dumps(index))
        (folder / "config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
        (folder / "model.safetensors").write_bytes(valid_shard)
        outcomes[_only_ernieq_errors(_exercise_checkpoint, folder)] += 1
    assert outcomes["error"] > 100 and outcomes["ok"] > 0


# -- calibration statistics folders ------------------------------------------------------------


def _small_calibration_set():
    from ernieq.calibration import CalibrationSet, ExpertRow, RouterStats, SiteStats

    g = torch.Generator().manual_seed(3)

    def site(k, tokens):
        x = torch.randn(tokens, k, generator=g)
        return SiteStats(x.T @ x / tokens, x.abs().mean(0), x.abs().amax(0), tokens)

    q = "model.layers.0.self_attn.q_proj.weight"
    experts = [f"model.layers.1.mlp.experts.{e}.{p}.weight" for e in range(2) for p in ("gate_proj", "down_proj")]
    sites = {q: site(8, 12), **{name: site(8 if "gate" in name else 4, 5 + i) for i, name in enumerate(experts)}}
    routes = {q: q, "model.layers.0.self_attn.k_proj.weight": q, **{n: n for n in experts}}
    rows = [ExpertRow(1, e, 5 + e, 0.5, 0.25, 0.5) for e in range(2)]
    router = RouterStats(1, 12, 1, [5, 7], [0.4, 0.6], [0.45, 0.55], 0.6, 0.69, 0.1, 0.01)
    return CalibrationSet(sites=sites, routes=routes, expert_of={n: (1, int(n.split(".")[5])) for n in experts},
                          experts=rows, routers={1: router}, info={"model": "fuzz"})


def _exercise_stats(folder: Path) -> None:
    """Everything quantize and report ask of saved statistics."""
    from ernieq.calibration import load_stats

    cset = load_stats(folder)
    for name in cset.weight_names():
        stats = cset.stats(name)
        if stats is not None:
            stats.hessian.sum()
            stats.act_abs_mean.sum()
    for s in cset.sites.values():
        s.abs_max.sum()
    cset.cold_experts()
    cset.summary()


def test_mutated_calibration_folders(tmp_path):
    from ernieq.calibration import save_stats
    from ernieq.calibration.stats import SUMMARY_NAME

    base = save_stats(_small_calibration_set(), tmp_path / "base")
    assert _only_ernieq_errors(_exercise_stats, base) == "ok"
    (stats_file,) = base.glob("stats-*.safetensors")
    summary = json.loads((base / SUMMARY_NAME).read_text())
    rng = random.Random(10)
    outcomes = {"ok": 0, "error": 0}
    for i in range(240):
        folder = tmp_path / str(i)
        shutil.copytree(base, folder)
        op = i % 4
        if op == 0:  # one field of the summary replaced by random JSON, or dropped
            mutated = json.loads(json.dumps(summary))
            key = rng.choice(sorted(mutated))
            if rng.random() < 0.2:
                del mutated[key]
            else:
                mutated[key] = _random_json(rng)
            (folder / SUMMARY_NAME).write_text(json.dumps(mutated))
        elif op == 1:  # one entry deep inside the summary replaced
            mutated = json.loads(json.dumps(summary))
            key = rng.choice(["sites", "routes", "expert_of", "experts", "routers", "files", "all_token_routes"])
            inner = mutated[key]
            if isinstance(inner, dict) and inner:
                inner[rng.choice(sorted(inner))] = _random_json(rng)
            elif isinstance(inner, list) and inner:
                inner[rng.randrange(len(inner))] = _random_json(rng)
            (folder / SUMMARY_NAME).write_text(json.dumps(mutated))
        elif op == 2:  # the statistics file's bytes
            (folder / stats_file.name).write_bytes(_mutate_bytes(rng, stats_file.read_bytes()))
        else:  # the summary's bytes
            raw = bytearray((base / SUMMARY_NAME).read_bytes())
            for _ in range(rng.randint(1, 4)):
                raw[rng.randrange(len(raw))] = rng.randrange(256)
            (folder / SUMMARY_NAME).write_bytes(bytes(raw))
        outcomes[_only_ernieq_errors(_exercise_stats, folder)] += 1
    assert outcomes["error"] > 100 and outcomes["ok"] > 0


def test_random_quantization_configs(tmp_path, valid_shard):
    from ernieq.formats.native import NativeReader

    def read_all(folder: Path) -> None:
        reader = NativeReader(folder)
        for base in reader.modules:
            reader.quantized(base)
        reader.plain_names()

    good = {"quant_method": "ernieq", "format_version": 1, "recipe": "w8",
            "modules": {"model.layers.1.self_attn.q_proj": {"codec": "wint8", "params": {}, "shape": [8, 8]}}}
    rng = random.Random(11)
    outcomes = {"ok": 0, "error": 0}
    for i in range(120):
        folder = tmp_path / str(i)
        folder.mkdir()
        qc = json.loads(json.dumps(good))
        target = qc if i % 2 else qc["modules"]["model.layers.1.self_attn.q_proj"]
        if i % 7 == 0:
            target = qc["modules"]
        key = rng.choice(sorted(target))
        target[key] = _random_json(rng)
        (folder / "config.json").write_text(json.dumps({**CONFIG, "quantization_config": qc}))
        (folder / "model.safetensors").write_bytes(valid_shard)
        outcomes[_only_ernieq_errors(read_all, folder)] += 1
    assert outcomes["error"] > 40
