"""The compressed-tensors export, checked by the compressed-tensors library itself.

Every exported checkpoint is decompressed with compressed-tensors' model-free
``CompressedTensorsDequantizer`` (its ``validate`` also fails on any quantized
tensor that no config group targets) and compared bit for bit with ernieq's
``decode`` of the native checkpoint.
"""

import json

import pytest
import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer
from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme
from compressed_tensors.utils.match import match_name
from safetensors.torch import load_file

from ernieq import api
from ernieq.codecs import decode
from ernieq.errors import ErnieqError
from ernieq.formats.compressed_tensors import CtScheme, config_targets, ct_scheme, pack_int8_int32
from ernieq.formats.native import ModuleSpec, NativeReader
from ernieq.formats.registry import export_checkpoint
from tests.tiny import write_tiny_ernie

FORMAT = "compressed-tensors"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_ernie(tmp_path_factory.mktemp("tiny") / "src")


def _quantize(tiny, tmp_path, **options):
    native = tmp_path / "q"
    api.quantize(tiny, native, progress=False, rotate=False, **options)  # exports hold no rotations
    return native


def _stored(out) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def _decompressed(out, dtype=torch.float32) -> dict[str, torch.Tensor]:
    return CompressedTensorsDequantizer(out, dtype=dtype).validate(_stored(out))


def _ct_config(out) -> dict:
    return json.loads((out / "config.json").read_text())["quantization_config"]


# K of the tiny model is 64 (attention, gate/up), 96 (dense down_proj) or 32 (expert down_proj):
# wint4 with G=128 is one partial group per row (channel strategy), G=32 divides every K (group).
CASES = {
    "wint4-sym-g128": ({"bits": 4, "group_size": 128}, "pack-quantized"),
    "wint4-asym-g32": ({"bits": 4, "symmetric": False, "group_size": 32}, "pack-quantized"),
    "wint8": ({"bits": 8}, "pack-quantized"),
    "fp8-block128": ({"fp8": True}, "float-quantized"),
    "fp8-block128-weight-only": ({"fp8": True, "fp8_activations": "none"}, "float-quantized"),
    "fp8-channel": ({"fp8": True, "overrides": (".*=fp8:block_size=none",)}, "float-quantized"),
    "wint8-attention+wint4-asym": (
        {"bits": 4, "symmetric": False, "group_size": 32, "overrides": (r"self_attn=wint8",)}, "pack-quantized"),
    "wint4+fp8-experts": ({"bits": 4, "group_size": 128, "overrides": (r"mlp\.experts\.=fp8",)}, "mixed-precision"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_compressed_tensors_decompresses_to_ernieq_decode_bit_for_bit(tiny, tmp_path, case):
    options, fmt = CASES[case]
    native = _quantize(tiny, tmp_path, **options)
    out = export_checkpoint(native, tmp_path / "ct", FORMAT)
    reader = NativeReader(native)
    weights = _decompressed(out)
    # every quantized module comes back as its decoded weight; everything else as stored
    assert set(weights) == {f"{m}.weight" for m in reader.modules} | set(reader.plain_names())
    for module in reader.modules:
        assert torch.equal(weights[f"{module}.weight"], decode(reader.quantized(module))), module
    for name in reader.plain_names():
        assert torch.equal(weights[name], reader.reader.get(name)), name
    qc = _ct_config(out)
    QuantizationConfig.model_validate(qc)
    assert (qc["quant_method"], qc["quantization_status"], qc["format"]) == ("compressed-tensors", "compressed", fmt)
    assert {"lm_head", "model.embed_tokens", "model.layers.1.mlp.gate", "model.layers.2.mlp.gate"} <= set(qc["ignore"])
    n_codecs = len({(s.codec, tuple(sorted(s.params.items()))) for s in reader.modules.values()})
    assert len(qc["config_groups"]) >= n_codecs


def test_moe_experts_are_stored_per_expert_as_vllm_loads_them(tiny, tmp_path):
    native = _quantize(tiny, tmp_path, bits=4, symmetric=False, group_size=32)
    stored = _stored(export_checkpoint(native, tmp_path / "ct", FORMAT))
    base = "model.layers.2.mlp.experts.3.down_proj"  # [N=64, K=32]
    assert stored[f"{base}.weight_packed"].dtype == torch.int32
    assert stored[f"{base}.weight_packed"].shape == (64, 32 // 8)
    assert stored[f"{base}.weight_scale"].shape == (64, 1)
    assert stored[f"{base}.weight_zero_point"].shape == (64 // 8, 1)
    assert stored[f"{base}.weight_shape"].tolist() == [64, 32]
    assert not any(".experts.gate_up_proj" in name or name.endswith("experts.down_proj") for name in stored)


@pytest.mark.parametrize("options", [{"bits": 4, "symmetric": False, "group_size": 32}, {"bits": 8}])
def test_compressed_tensors_own_compressor_packs_the_same_tensors(tiny, tmp_path, options):
    """compress(decode(q)) by compressed-tensors reproduces the exported packed weight and zero point."""
    native = _quantize(tiny, tmp_path, **options)
    out = export_checkpoint(native, tmp_path / "ct", FORMAT)
    stored, reader = _stored(out), NativeReader(native)
    scheme = QuantizationConfig.model_validate(_ct_config(out)).config_groups["group_0"]
    compressor = BaseCompressor.get_value_from_registry("pack-quantized")
    for module in ("model.layers.0.self_attn.k_proj", "model.layers.0.mlp.down_proj",
                   "model.layers.1.mlp.experts.2.up_proj"):
        q = reader.quantized(module)
        state = {"weight": decode(q), "weight_scale": stored[f"{module}.weight_scale"]}
        if "zero" in q.tensors:
            state["weight_zero_point"] = q.tensors["zero"].to(torch.int8) - 8  # compressed-tensors' signed zero point
        packed = compressor.compress(state, scheme)
        for key in ("weight_packed", "weight_zero_point"):
            if key in packed:
                assert torch.equal(packed[key], stored[f"{module}.{key}"]), (module, key)


def test_scales_take_the_model_dtype_and_round_only_there(tiny, tmp_path):
    native = _quantize(tiny, tmp_path, bits=4, symmetric=False, group_size=32)
    config = json.loads((native / "config.json").read_text())
    (native / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    out = export_checkpoint(native, tmp_path / "ct", FORMAT)
    stored, reader = _stored(out), NativeReader(native)
    weights = _decompressed(out, dtype=torch.bfloat16)
    for module in reader.modules:
        assert stored[f"{module}.weight_scale"].dtype == torch.bfloat16
        # compressed-tensors computes (v - zero) * scale in bf16: ernieq's decode with the scale rounded
        # to bf16 is exact in float32 (4-bit x 8-bit significands), so cast once it must match bit for bit
        q = reader.quantized(module)
        scale = q.tensors["scale"]  # float16 (the --bits 4 recipe's): bf16 values are float16 values here
        q.tensors["scale"] = scale.to(torch.bfloat16).to(scale.dtype)
        assert torch.equal(weights[f"{module}.weight"], decode(q).to(torch.bfloat16)), module


def test_pack_int8_int32_matches_compressed_tensors(tmp_path):
    for k in (1, 7, 33, 64):
        values = torch.randint(-128, 128, (5, k), generator=torch.Generator().manual_seed(k), dtype=torch.int8)
        codes = (values.to(torch.int16) + 128).to(torch.uint8)
        assert torch.equal(pack_int8_int32(codes), pack_to_int32(values, 8)), k


def test_partial_group_is_refused_with_the_module_named(tiny, tmp_path):
    native = _quantize(tiny, tmp_path, bits=4, group_size=64)  # dense down_proj: K = 96 = 1.5 x 64
    with pytest.raises(ErnieqError, match=r"model\.layers\.0\.mlp\.down_proj: K=96 .*group size 64"):
        export_checkpoint(native, tmp_path / "ct", FORMAT)
    assert not (tmp_path / "ct").exists()
    assert not list(tmp_path.glob(".*ernieq-export-tmp"))


def test_codec_without_compressed_tensors_form_is_named(tiny, tmp_path):
    native = _quantize(tiny, tmp_path, bits=4, group_size=32)
    config = json.loads((native / "config.json").read_text())
    config["quantization_config"]["modules"]["model.layers.2.mlp.experts.1.up_proj"]["codec"] = "ccq2"
    (native / "config.json").write_text(json.dumps(config))
    with pytest.raises(ErnieqError, match=r"experts\.1\.up_proj: codec 'ccq2' has no compressed-tensors form"):
        export_checkpoint(native, tmp_path / "ct", FORMAT)
    assert not (tmp_path / "ct").exists()


@pytest.mark.parametrize("override, fused", [
    (r"layers\.2\.mlp\.experts\.0\.=wint8", r"layers\.2\.mlp\.experts"),  # vLLM's FusedMoE
    (r"layers\.1\.mlp\.experts\.3\.down_proj=none", r"layers\.1\.mlp\.experts"),
    (r"layers\.0\.self_attn\.k_proj=wint8", r"layers\.0\.self_attn\.qkv_proj"),  # vLLM's QKVParallelLinear
    (r"shared_experts\.up_proj=none", r"layers\.1\.mlp\.shared_experts\.gate_up_proj"),
])
def test_modules_vllm_fuses_need_one_scheme(tiny, tmp_path, override, fused):
    native = _quantize(tiny, tmp_path, bits=4, group_size=32, overrides=(override,))
    with pytest.raises(ErnieqError, match=rf"{fused} runs as one fused module"):
        export_checkpoint(native, tmp_path / "ct", FORMAT)


def test_targets_generalise_indices_only_where_unambiguous():
    a = CtScheme("pack-quantized", (("num_bits", 4), ("type", "int"), ("symmetric", True), ("strategy", "channel")))
    b = CtScheme("pack-quantized", (("num_bits", 8), ("type", "int"), ("symmetric", True), ("strategy", "channel")))
    schemes = {f"model.layers.{layer}.mlp.experts.{e}.{p}": (a if layer == 1 else b)
               for layer in (1, 2, 3) for e in range(3) for p in ("gate_proj", "down_proj")}
    schemes |= {f"model.layers.{layer}.self_attn.q_proj": b for layer in (1, 2, 3)}
    schemes["model.layers.3.self_attn.o_proj"] = a
    kept = ["lm_head", "model.layers.1.self_attn.o_proj", "model.layers.2.self_attn.o_proj"]
    targets = config_targets(schemes, kept)
    assert r"re:model\.layers\.1\.mlp\.experts\.\d+\.gate_proj$" in targets[a]
    assert r"re:model\.layers\.\d+\.self_attn\.q_proj$" in targets[b]
    assert "model.layers.3.self_attn.o_proj" in targets[a]
    for module, scheme in [*schemes.items(), *((k, None) for k in kept)]:
        owners = {s for s, ts in targets.items() if any(match_name(module, t) for t in ts)}
        assert owners == ({scheme} if scheme else set()), module
    assert config_targets({m: a for m in schemes}, kept) == {a: ["Linear"]}


@pytest.mark.parametrize("block_size, preset", [(128, "FP8_BLOCK"), (None, "FP8_DYNAMIC")])
def test_fp8_schemes_are_compressed_tensors_presets(block_size, preset):
    """W8A8: vLLM sees exactly what llm-compressor writes for these presets (dynamic fp8 activations
    per token and group of 128, or per token); weight-only: the same weights and no input activations."""
    params = {"block_size": block_size, "activations": "dynamic"}
    ours = ct_scheme("m", ModuleSpec("fp8", params, (256, 256))).build(["Linear"])
    theirs = preset_name_to_scheme(preset, ["Linear"])
    assert (ours.weights, ours.input_activations) == (theirs.weights, theirs.input_activations)
    assert ours.format == "float-quantized"
    weight_only = ct_scheme("m", ModuleSpec("fp8", {**params, "activations": "none"}, (256, 256))).build(["Linear"])
    assert (weight_only.weights, weight_only.input_activations) == (theirs.weights, None)


@pytest.mark.parametrize("activations", ["dynamic", "none"])
def test_fp8_export_declares_the_activations_ernieq_computes(tiny, tmp_path, activations):
    native = _quantize(tiny, tmp_path, fp8=True, fp8_activations=activations)
    (group,) = _ct_config(export_checkpoint(native, tmp_path / "ct", FORMAT))["config_groups"].values()
    if activations == "none":
        assert group["input_activations"] is None
    else:
        inputs = group["input_activations"]
        assert (inputs["type"], inputs["num_bits"], inputs["dynamic"]) == ("float", 8, True)
        assert (inputs["strategy"], inputs["group_size"]) == ("group", 128)


def test_fp8_params_from_before_w8a8_are_refused(tiny, tmp_path):
    """A checkpoint whose fp8 params do not say how activations are computed is not exported as if they did."""
    native = _quantize(tiny, tmp_path, fp8=True)
    config = json.loads((native / "config.json").read_text())
    for module in config["quantization_config"]["modules"].values():
        del module["params"]["activations"]
    (native / "config.json").write_text(json.dumps(config))
    with pytest.raises(ErnieqError, match=r"do not say how activations are computed"):
        export_checkpoint(native, tmp_path / "ct", FORMAT)


@pytest.mark.parametrize("options", [{"bits": 4}, {"bits": 8}, {"fp8": True}])
def test_demo_model_export_round_trips_through_compressed_tensors(demo_routed_dir, tmp_path, options):
    """The reduced demo checkpoint (hidden 640, experts of 128): every module comes back bit for bit."""
    native = _quantize(demo_routed_dir, tmp_path, **options)
    out = export_checkpoint(native, tmp_path / "ct", FORMAT)
    reader = NativeReader(native)
    weights = _decompressed(out)
    for module in reader.modules:
        assert torch.equal(weights[f"{module}.weight"], decode(reader.quantized(module))), module
    assert {n for n in weights if not n.endswith(".weight") or n[: -len(".weight")] not in reader.modules} == set(
        reader.plain_names())
