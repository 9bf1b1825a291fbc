"""The transformers block-FP8 export, loaded back with transformers itself."""

import json
from unittest import mock

import pytest
import torch
from transformers import AutoModelForCausalLM, FineGrainedFP8Config
from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

from ernieq import api
from ernieq.codecs import decode
from ernieq.errors import ErnieqError
from ernieq.formats.native import NativeReader
from ernieq.formats.registry import export_checkpoint
from tests.tiny import write_tiny_ernie

FORMAT = "hf-fp8"
# every quantized N and K a multiple of 128: transformers reads only whole 128 x 128 blocks
DIMS = {"hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 128, "num_key_value_heads": 4,
        "head_dim": 32}


@pytest.fixture(scope="module", params=["tiny", "demo"])
def exported(request, tmp_path_factory):
    """(source, native, export) of the tiny model and of the reduced demo (hidden 640, 12 + 4 heads of 64)."""
    root = tmp_path_factory.mktemp("hf_fp8")
    if request.param == "tiny":
        src = write_tiny_ernie(root / "src", **DIMS)
    else:
        src = request.getfixturevalue("demo_routed_dir")
    native = root / "q"
    api.quantize(src, native, fp8=True, progress=False)
    return src, native, export_checkpoint(native, root / "hf", FORMAT)


def _expert_slice(state: dict, module: str) -> torch.Tensor:
    """The per-expert weight ``...experts.E.proj`` inside transformers' fused expert params."""
    prefix, e, proj = module.rsplit(".", 2)
    gate_up = state[f"{prefix}.gate_up_proj"][int(e)]  # [2I, H]: gate rows, then up rows
    inter = gate_up.shape[0] // 2
    if proj == "down_proj":
        return state[f"{prefix}.down_proj"][int(e)]
    return gate_up[:inter] if proj == "gate_proj" else gate_up[inter:]


def _weight(state: dict, module: str) -> torch.Tensor:
    return _expert_slice(state, module) if ".experts." in module else state[f"{module}.weight"]


def test_transformers_dequantizes_to_ernieq_decode_bit_for_bit(exported):
    src, native, out = exported
    model = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, quantization_config=FineGrainedFP8Config(dequantize=True)).eval()
    reader = NativeReader(native)
    state = model.state_dict()
    for module in reader.modules:
        assert torch.equal(_weight(state, module), decode(reader.quantized(module))), module
    # the same logits as the float model carrying the decoded weights
    reference = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ref_state = reference.state_dict()
    with torch.no_grad():
        for module in reader.modules:
            _weight(ref_state, module).copy_(decode(reader.quantized(module)))
        ids = torch.randint(0, 96, (1, 20), generator=torch.Generator().manual_seed(0))
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_fp8_modules_hold_the_stored_weights_and_block_scales(exported):
    """The GPU load path (FP8Linear, fused FP8Experts), built on CPU: only its kernels need a GPU."""
    _, native, out = exported
    # transformers falls back to dequantizing when no GPU is found; skip that check to build the FP8 modules
    with mock.patch.object(FineGrainedFP8HfQuantizer, "validate_environment", lambda self, *a, **k: None):
        model = AutoModelForCausalLM.from_pretrained(
            out, dtype=torch.float32, quantization_config=FineGrainedFP8Config())
    state = model.state_dict()
    reader = NativeReader(native)
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.2.mlp.shared_experts.down_proj"):
        q = reader.quantized(module)
        assert torch.equal(state[f"{module}.weight"].view(torch.uint8), q.tensors["qweight"].view(torch.uint8))
        assert torch.equal(state[f"{module}.weight_scale_inv"], q.tensors["scale"])
    prefix, e = "model.layers.1.mlp.experts", 3
    gate, up, down = (reader.quantized(f"{prefix}.{e}.{p}") for p in ("gate_proj", "up_proj", "down_proj"))
    fused = torch.cat([gate.tensors["qweight"], up.tensors["qweight"]]).view(torch.uint8)
    assert torch.equal(state[f"{prefix}.gate_up_proj"][e].view(torch.uint8), fused)
    fused_scale = torch.cat([gate.tensors["scale"], up.tensors["scale"]])  # [2 I/128, H/128]
    assert torch.equal(state[f"{prefix}.gate_up_proj_scale_inv"][e], fused_scale)
    assert torch.equal(state[f"{prefix}.down_proj_scale_inv"][e], down.tensors["scale"])
    assert state["model.layers.1.mlp.gate.weight"].dtype == torch.float32  # the router stays unquantized


def test_config_follows_transformers_fp8_convention(exported):
    _, _, out = exported
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "fp8" and qc["weight_block_size"] == [128, 128]
    assert qc["activation_scheme"] == "dynamic"
    assert {"lm_head", "model.layers.1.mlp.gate"} <= set(qc["modules_to_not_convert"])
    FineGrainedFP8Config.from_dict(qc)


@pytest.mark.parametrize("options, message", [
    ({"bits": 4}, r"model\..*is wint4 .*only fp8 with block_size=128"),
    ({"fp8": True, "overrides": (".*=fp8:block_size=none",)}, r"is fp8 \{'block_size': None\}"),
])
def test_other_codecs_are_refused(tmp_path, options, message):
    src = write_tiny_ernie(tmp_path / "src", **DIMS)
    api.quantize(src, tmp_path / "q", progress=False, rotate=False, **options)
    with pytest.raises(ErnieqError, match=message):
        export_checkpoint(tmp_path / "q", tmp_path / "hf", FORMAT)
    assert not (tmp_path / "hf").exists()


def test_partial_blocks_are_refused(tmp_path):
    src = write_tiny_ernie(tmp_path / "src")  # hidden size 64: partial 128 x 128 blocks
    api.quantize(src, tmp_path / "q", fp8=True, progress=False)
    with pytest.raises(ErnieqError, match=r"mlp\.down_proj has shape \[N=64, K=96\]; .*whole 128x128 blocks"):
        export_checkpoint(tmp_path / "q", tmp_path / "hf", FORMAT)
