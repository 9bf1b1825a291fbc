import gc
import json
import subprocess
import weakref

import pytest
import torch

from ernieq.model.adapters import iter_groups, stream_groups
from ernieq.model.checkpoint import CheckpointError, CheckpointReader, CheckpointWriter, weights_sha256


def _ernie_config(layers=3):
    """An ERNIE 4.5 MoE config whose shapes are _layered_tensors'."""
    return {"architectures": ["Ernie4_5_MoeForCausalLM"], "model_type": "ernie4_5_moe", "num_hidden_layers": layers,
            "hidden_size": 16, "vocab_size": 32, "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 8,
            "intermediate_size": 8, "moe_intermediate_size": 8, "moe_num_experts": 2, "moe_k": 1,
            "moe_layer_start_index": 0, "moe_num_shared_experts": 0}


def _write(tmp_path, tensors, config, max_shard_bytes=2**30):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with CheckpointWriter(tmp_path, max_shard_bytes=max_shard_bytes) as w:
        for k, v in tensors.items():
            w.add(k, v)
    return tmp_path


def _layered_tensors(layers=3, h=16, i=8, experts=2):
    t = {"model.embed_tokens.weight": torch.randn(32, h), "model.norm.weight": torch.randn(h)}
    for layer in range(layers):
        p = f"model.layers.{layer}."
        t[p + "self_attn.q_proj.weight"] = torch.randn(h, h)
        t[p + "input_layernorm.weight"] = torch.randn(h)
        for e in range(experts):
            for proj, shape in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))):
                t[p + f"mlp.experts.{e}.{proj}.weight"] = torch.randn(shape)
        t[p + "mlp.gate.weight"] = torch.randn(experts, h)
    return t


def test_multi_shard_round_trip_is_exact(tmp_path):
    tensors = _layered_tensors()
    _write(tmp_path, tensors, _ernie_config(), max_shard_bytes=2000)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1
    assert (tmp_path / "model.safetensors.index.json").exists()
    r = CheckpointReader(tmp_path)
    assert sorted(r.keys()) == sorted(tensors)
    for k, v in tensors.items():
        assert torch.equal(r.get(k), v)
        assert r.shape(k) == tuple(v.shape)
        assert r.dtype(k) == "F32"


def test_single_shard_has_no_index(tmp_path):
    _write(tmp_path, {"a": torch.arange(4.0)}, _ernie_config())
    assert (tmp_path / "model.safetensors").exists()
    assert not (tmp_path / "model.safetensors.index.json").exists()


def test_streaming_keeps_at_most_one_group_beyond_the_current(tmp_path):
    _write(tmp_path, _layered_tensors(layers=4), _ernie_config(4), max_shard_bytes=1500)
    reader = CheckpointReader(tmp_path)
    alive: list[list[weakref.ref]] = []
    steps = 0
    for _, tensors in stream_groups(reader):
        gc.collect()
        # every group older than the previous one is gone
        for refs in alive[:-1]:
            assert all(r() is None for r in refs)
        alive.append([weakref.ref(t) for t in tensors.values()])
        del tensors
        steps += 1
    assert steps == len(list(iter_groups(reader))) >= 8


def test_missing_config_names_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        CheckpointReader(tmp_path)


def test_truncated_shard_names_the_file(tmp_path):
    _write(tmp_path, {"a": torch.randn(64, 64)}, _ernie_config())
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        CheckpointReader(tmp_path)


@pytest.mark.parametrize("blob", [b"", b"\x01\x02", b"\xff" * 8 + b"{}", b"\x04\x00\x00\x00\x00\x00\x00\x00[1,2"])
def test_corrupt_header_names_the_file(tmp_path, blob):
    (tmp_path / "config.json").write_text(json.dumps(_ernie_config()))
    (tmp_path / "model.safetensors").write_bytes(blob)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        CheckpointReader(tmp_path)


def test_missing_shard_from_index(tmp_path):
    _write(tmp_path, _layered_tensors(), _ernie_config(), max_shard_bytes=2000)
    next(tmp_path.glob("model-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        CheckpointReader(tmp_path)


def test_writer_refuses_duplicates_and_cleans_up_on_error(tmp_path):
    with pytest.raises(CheckpointError, match="twice"):
        with CheckpointWriter(tmp_path, max_shard_bytes=10) as w:
            w.add("a", torch.zeros(8))
            w.add("b", torch.zeros(8))
            w.add("a", torch.zeros(8))
    assert not list(tmp_path.glob("*.safetensors"))


def test_writer_turns_a_full_disk_into_an_error_naming_the_file(tmp_path, monkeypatch):
    import errno

    from ernieq.model import checkpoint

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(CheckpointError, match=r"\.part-00000\.safetensors: cannot write .*No space left"):
        with CheckpointWriter(tmp_path) as w:
            w.add("a", torch.zeros(8))
    assert not list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob(".part-*"))


def test_weights_sha256_is_what_sha256sum_prints(tmp_path):
    with CheckpointWriter(tmp_path, max_shard_bytes=64) as writer:  # two shards and an index
        writer.add("a", torch.arange(16, dtype=torch.float32))
        writer.add("b", torch.ones(16))
    (tmp_path / "config.json").write_text("{}")  # not a weight: left out
    shell = subprocess.run("LC_ALL=C sha256sum *.safetensors | sha256sum", shell=True, cwd=tmp_path,
                           capture_output=True, text=True, check=True).stdout.split()[0]
    assert weights_sha256(tmp_path) == shell
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"changed")
    assert weights_sha256(tmp_path) != shell
