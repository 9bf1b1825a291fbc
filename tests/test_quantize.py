import json

import pytest
import torch

from ernieq import api
from ernieq.codecs import decode
from ernieq.errors import ErnieqError
from ernieq.formats.native import NativeReader
from ernieq.model.checkpoint import CheckpointReader, CheckpointWriter
from ernieq.runtime.loader import load_quantized
from tests.tiny import tiny_ernie_model, write_tiny_ernie


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {layout: write_tiny_ernie(root / layout, layout) for layout in ("per_expert", "fused")}


def _decoded_reference_logits(qdir, ids):
    """Logits of the float model whose linear weights are replaced by the codec's decode
    (turned back by R^T where the weight was stored rotated)."""
    model = tiny_ernie_model()
    reader = NativeReader(qdir)
    state = model.state_dict()
    with torch.no_grad():
        for base in reader.modules:
            w = decode(reader.quantized(base))
            rotation = reader.rotation(base)
            if rotation is not None:
                w = rotation.apply_t(w)  # W_hat = Q(W R) R^T
            if ".experts." in base:
                prefix, e, proj = base.rsplit(".", 2)
                e = int(e)
                inter = state[f"{prefix}.gate_up_proj"].shape[1] // 2
                if proj == "gate_proj":
                    state[f"{prefix}.gate_up_proj"][e, :inter] = w
                elif proj == "up_proj":
                    state[f"{prefix}.gate_up_proj"][e, inter:] = w
                else:
                    state[f"{prefix}.down_proj"][e] = w
            else:
                state[f"{base}.weight"].copy_(w)
        return model(ids).logits


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
@pytest.mark.parametrize("options", [{"bits": 8}, {"bits": 4}, {"bits": 4, "rotate": False},
                                     {"bits": 4, "symmetric": False, "group_size": 32}, {"bits": 2}, {"fp8": True, "fp8_activations": "none"}])
def test_quantized_model_computes_with_the_decoded_weights(tiny, tmp_path, layout, options):
    out = tmp_path / "q"
    summary = api.quantize(tiny[layout], out, progress=False, workers=1, **options)
    ids = torch.randint(0, 96, (1, 24), generator=torch.Generator().manual_seed(0))
    model = load_quantized(out)
    with torch.no_grad():
        got = model(ids).logits
    want = _decoded_reference_logits(out, ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # every linear weight of the decoder layers is quantized, the rest kept
    modules = NativeReader(out).modules
    n_experts, n_layers = 4, 3
    expected = 4 * n_layers + 3 * 1 + (3 + 3 * n_experts) * (n_layers - 1)
    assert len(modules) == expected
    data = json.loads((out / "quantize_summary.json").read_text())
    assert data["classes"]["routed_experts"]["quantized_weights"] == data["classes"]["routed_experts"]["weights"]
    assert data["classes"]["router"]["bytes_after"] == data["classes"]["router"]["bytes_before"]
    assert summary.to_json() == data and "seconds" not in data  # nothing time-dependent in the checkpoint
    assert summary.seconds > 0
    assert data["runtime"]["device"] == "cpu" and data["runtime"]["kernels"] == "torch"


def test_both_layouts_give_the_same_checkpoint_tensors(tiny, tmp_path):
    outs = [tmp_path / layout for layout in ("per_expert", "fused")]
    for layout, out in zip(("per_expert", "fused"), outs):
        api.quantize(tiny[layout], out, bits=4, progress=False, workers=1)
    readers = [NativeReader(o) for o in outs]
    assert readers[0].modules == readers[1].modules
    for base in readers[0].modules:
        a, b = (r.quantized(base) for r in readers)
        assert a.tensors.keys() == b.tensors.keys()
        assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def test_config_records_codecs_and_side_files_are_copied(tiny, tmp_path):
    src = tiny["per_expert"]
    (src / "tokenizer_config.json").write_text("{}")
    out = tmp_path / "q"
    api.quantize(src, out, bits=4, overrides=(r"self_attn\.q_proj=wint8", r"layers\.1\..*o_proj=none"), progress=False,
                 workers=1)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "ernieq" and qc["format_version"] == 1
    assert qc["modules"]["model.layers.0.self_attn.q_proj"]["codec"] == "wint8"
    assert qc["modules"]["model.layers.0.self_attn.k_proj"] == {
        "codec": "wint4", "params": {"group_size": 64, "symmetric": True, "clip": True, "scale_dtype": "float16"},
        "shape": [32, 64],
        "rotation": "layers.0.attention.k64"}  # wint4 is stored rotated (and clips) by default; wint8 is not
    assert "rotation" not in qc["modules"]["model.layers.0.self_attn.q_proj"]
    assert "ernieq_rotations.layers.0.attention.k64.signs" in CheckpointReader(out)
    assert "model.layers.1.self_attn.o_proj" not in qc["modules"]
    assert "model.layers.1.self_attn.o_proj.weight" in CheckpointReader(out)
    assert (out / "tokenizer_config.json").exists()


def test_existing_output_is_refused_and_failed_runs_leave_nothing(tiny, tmp_path):
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(ErnieqError, match="exists"):
        api.quantize(tiny["per_expert"], out, bits=8, progress=False, workers=1)
    assert (out / "keep").exists()
    with pytest.raises(ErnieqError, match="--bits 3"):
        api.quantize(tiny["per_expert"], tmp_path / "r", bits=3, progress=False, workers=1)
    assert not (tmp_path / "r").exists()
    assert not list(tmp_path.glob(".*ernieq-tmp"))


def test_nan_weight_is_named(tiny, tmp_path):
    from ernieq.model.checkpoint import CheckpointWriter

    src = tmp_path / "bad"
    reader = CheckpointReader(tiny["per_expert"])
    with CheckpointWriter(src) as w:
        for name in reader.keys():
            t = reader.get(name).clone()
            if name == "model.layers.2.mlp.experts.3.up_proj.weight":
                t[0, 0] = float("nan")
            w.add(name, t)
    (src / "config.json").write_text((tiny["per_expert"] / "config.json").read_text())
    with pytest.raises(ErnieqError, match=r"model\.safetensors.*experts\.3\.up_proj.*NaN"):
        api.quantize(src, tmp_path / "q", bits=4, progress=False, workers=1)
    assert not (tmp_path / "q").exists()


def _loud_channels(src, dst):
    """A copy of ``src`` whose norms make 4 input channels 10x louder: the activation outliers AWQ is for."""
    reader = CheckpointReader(src)
    with CheckpointWriter(dst) as w:
        for key in reader.keys():
            t = reader.get(key).clone()
            if key.endswith("layernorm.weight"):
                t[:4] *= 10.0
            w.add(key, t)
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst


def test_gptq_and_awq_with_calibration_beat_round_to_nearest_on_calibration_inputs(tiny, tmp_path):
    from ernieq.calibration import collect_stats
    from ernieq.quantize import run_quantize

    src = _loud_channels(tiny["per_expert"], tmp_path / "src")
    ids = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(1))
    cset = collect_stats(src, ids, progress=False)
    outs = {}
    for method in ("rtn", "gptq", "awq"):
        outs[method] = tmp_path / method
        run_quantize(src, outs[method], bits=4, group_size=32, calib=cset, method=method, progress=False, workers=1)
    base = tiny_ernie_model()
    with torch.no_grad():
        for name, p in base.named_parameters():
            if name.endswith("layernorm.weight"):
                p[:4] *= 10.0  # as _loud_channels did to the checkpoint
        want = base(ids).logits
        errors = {m: (load_quantized(o)(ids).logits - want).pow(2).mean().item() for m, o in outs.items()}
    assert errors["gptq"] < errors["rtn"] and errors["awq"] < errors["rtn"], errors
    norm = "model.layers.1.post_attention_layernorm.weight"  # AWQ folded 1 / s into it
    assert not torch.equal(CheckpointReader(outs["awq"]).get(norm), CheckpointReader(src).get(norm))
    assert torch.equal(CheckpointReader(outs["rtn"]).get(norm), CheckpointReader(src).get(norm))
    qc = json.loads((outs["gptq"] / "config.json").read_text())["quantization_config"]
    assert qc["method"] == "gptq" and qc["calibration"]["tokens"] == 128
    assert "runtime" not in qc["calibration"]  # where calibration ran is not part of the checkpoint
    for method in ("gptq", "awq"):  # the same functions with the device given: the same bytes
        again = tmp_path / f"{method}-cpu"
        run_quantize(src, again, bits=4, group_size=32, calib=cset, method=method, progress=False, workers=1,
                     device="cpu", dtype="float32")
        for f in sorted(outs[method].iterdir()):
            assert f.read_bytes() == (again / f.name).read_bytes(), f.name


def test_gptq_without_statistics_is_refused(tiny, tmp_path):
    with pytest.raises(ErnieqError, match="needs calibration"):
        api.quantize(tiny["per_expert"], tmp_path / "q", bits=4, method="gptq", progress=False, workers=1)


def test_batched_experts_write_the_bytes_of_each_weight_alone(tiny, tmp_path, monkeypatch):
    """quantize encodes a layer's experts in batched GPTQ items (here one or two experts per chunk):
    every stored tensor is what ``encode_weight`` (sequential calibration's path) gives that weight alone."""
    from ernieq.calibration import collect_stats, gptq_experts
    from ernieq.calibration.rounding import encode_weight
    from ernieq.codecs import get_codec
    from ernieq.formats.native import NativeReader
    from ernieq.config import QuantizeOptions
    from ernieq.quantize import recipe_for, run_quantize

    src = tiny["per_expert"]
    cset = collect_stats(src, torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(1)), progress=False)
    monkeypatch.setattr(gptq_experts, "CPU_CHUNK_BYTES", 150_000)  # a few experts per chunk
    config = recipe_for(src, QuantizeOptions(bits=2, rotate=True))[0]
    run_quantize(src, tmp_path / "q", config, calib=cset, method="gptq", progress=False, workers=1)
    reader, weights = NativeReader(tmp_path / "q"), CheckpointReader(src)
    checked = 0
    for base in reader.modules:
        if ".experts." not in base or ".shared_experts." in base:
            continue
        q = reader.quantized(base)
        rotation = reader.rotation(base)
        name = f"{base}.weight"
        alone = encode_weight(get_codec(q.codec, **q.params), weights.get(name).float(), cset.stats(name), name,
                              "gptq", rotation)
        assert all(torch.equal(q.tensors[key], alone.tensors[key]) for key in alone.tensors), base
        checked += 1
    assert checked == 2 * 4 * 3  # two MoE layers of 4 experts, gate/up/down


def test_work_units_batch_a_projections_experts_and_spread_them_over_the_workers():
    from ernieq.config import CodecChoice
    from ernieq.model.adapters import TensorClass, TensorInfo
    from ernieq.quantize import work_units

    ccq2, wint8 = CodecChoice("ccq2"), CodecChoice("wint8")
    todo = [("attn", TensorInfo("attn", TensorClass.ATTENTION, 1), torch.zeros(8, 8), wint8)]
    for e in range(5):
        for proj in ("gate_proj", "down_proj"):
            info = TensorInfo(f"e{e}.{proj}", TensorClass.ROUTED_EXPERT, 1, e, proj)
            todo.append((info.name, info, torch.zeros(16, 8) if proj == "gate_proj" else torch.zeros(8, 16), ccq2))
    keys = [None] * len(todo)
    assert work_units(todo, keys, "rtn", 2, torch.device("cpu")) == [[i] for i in range(len(todo))]
    units = work_units(todo, keys, "gptq", 2, torch.device("cpu"))  # all 5 experts fit one chunk: 2 for 2 workers
    assert units == [[0], [1, 3, 5], [2, 4, 6], [7, 9], [8, 10]]
    assert work_units(todo, keys, "gptq", 1, torch.device("cpu")) == [[0], [1, 3, 5, 7, 9], [2, 4, 6, 8, 10]]
    up = TensorInfo("e0.up_proj", TensorClass.ROUTED_EXPERT, 1, 0, "up_proj")
    todo.insert(2, (up.name, up, torch.zeros(16, 8), ccq2))  # gate and up of a shape go together
    assert work_units(todo, keys + [None], "gptq", 1, torch.device("cpu"))[1] == [1, 2, 4, 6, 8, 10]
