"""The transformers block-FP8 export, loaded back with transformers itself.

transformers computes this format two ways: on a GPU, W8A8 through its ``FP8Linear`` and
``FP8Experts`` modules and the hub kernel ``kernels-community/finegrained-fp8`` (activations
quantized per token and 128-channel group, as the export declares); without one, it
dequantizes the weights at load time (weight-only, whatever the config declares). Each is
compared with ernieq's runtime computing the same: W8A8 (``activations="dynamic"``) and
weight-only (``"none"``).
"""

import json
from unittest import mock

import pytest
import torch
from transformers import AutoModelForCausalLM, FineGrainedFP8Config
from transformers.integrations import finegrained_fp8
from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

from ernieq import api
from ernieq.codecs import decode
from ernieq.errors import ErnieqError
from ernieq.formats.native import NativeReader
from ernieq.formats.registry import export_checkpoint
from ernieq.runtime.loader import load_quantized
from tests.tiny import write_tiny_ernie

FORMAT = "hf-fp8"
# every quantized N and K a multiple of 128: transformers reads only whole 128 x 128 blocks
DIMS = {"hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 128, "num_key_value_heads": 4,
        "head_dim": 32}
E4M3_MAX = 448.0
# transformers' W8A8 modules (on ernieq's export) vs ernieq's runtime, float32 logits: the same
# quantized activations, sums in another order (measured 3.6e-7 with logits up to 1.26)
W8A8_TOL = dict(rtol=1e-5, atol=1e-5)
# transformers' dequantized model vs ernieq's weight-only runtime on the demo: sums in another order
# (measured 2.2e-5 in logits up to about 35; bit for bit on the tiny model)
WEIGHT_ONLY_TOL = dict(rtol=1e-5, atol=1e-4)


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


@pytest.fixture(scope="module")
def weight_only(exported, tmp_path_factory):
    """The same source quantized with --fp8-activations none: the same stored weights, computed weight-only."""
    native = tmp_path_factory.mktemp("hf_fp8_w16") / "q"
    api.quantize(exported[0], native, fp8=True, fp8_activations="none", progress=False)
    return native


def _ids() -> torch.Tensor:
    return torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(0))


def _finegrained_fp8_in_torch() -> finegrained_fp8.FineGrainedFP8:
    """The hub kernel's entry points transformers calls (``matmul``, ``grouped_matmul``), in plain torch and
    float64, after that kernel's convention: x_scale = amax / 448 per token and block_size[1] channels,
    x_q = e4m3(x / max(x_scale, 1e-12)); y = (x_q x_scale) @ (w_q w_scale).T per element."""

    def x_hat(x: torch.Tensor, group: int) -> torch.Tensor:
        g = x.float().unflatten(-1, (-1, group))  # [..., K/G, G]
        s = g.abs().amax(-1, keepdim=True) / E4M3_MAX
        return ((g / s.clamp(min=1e-12)).to(torch.float8_e4m3fn).double() * s.double()).flatten(-2)

    def matmul(x, weight, weight_scale_inv, block_size, output_dtype, activation_scale=None):
        assert activation_scale is None, "the export declares dynamic activations"
        bn, bk = block_size
        w_hat = weight.double() * weight_scale_inv.double().repeat_interleave(bn, 0).repeat_interleave(bk, 1)
        return (x_hat(x, bk) @ w_hat.T).to(output_dtype)

    def grouped_matmul(x, weight, weight_scale_inv, offsets, tokens_per_expert, block_size):
        rows, start = [], 0  # x's rows sorted by expert; offsets: where each expert's rows end
        for e, end in enumerate(offsets.tolist()):
            rows.append(matmul(x[start:end], weight[e], weight_scale_inv[e], block_size, x.dtype))
            start = end
        return torch.cat(rows)

    return finegrained_fp8.FineGrainedFP8(matmul=matmul, batched_matmul=None, grouped_matmul=grouped_matmul)


def _fp8_modules(out):
    """transformers' GPU load path (FP8Linear, fused FP8Experts), built on the CPU."""
    # transformers falls back to dequantizing when no GPU is found; skip that check to build the FP8 modules
    with mock.patch.object(FineGrainedFP8HfQuantizer, "validate_environment", lambda self, *a, **k: None):
        return AutoModelForCausalLM.from_pretrained(
            out, dtype=torch.float32, quantization_config=FineGrainedFP8Config()).eval()


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
    """transformers' CPU path: the weights dequantized at load time, so it computes weight-only."""
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


def test_transformers_on_a_cpu_computes_what_ernieq_does_weight_only(exported, weight_only):
    """transformers' dequantized model and ernieq's weight-only runtime: the same logits but for the order of
    sums."""
    _, native, out = exported
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.experts.2.down_proj"):
        a, b = NativeReader(native).quantized(module), NativeReader(weight_only).quantized(module)
        assert all(torch.equal(a.tensors[k].view(torch.uint8), b.tensors[k].view(torch.uint8)) for k in a.tensors)
    dequantized = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, quantization_config=FineGrainedFP8Config(dequantize=True)).eval()
    with torch.no_grad():
        torch.testing.assert_close(dequantized(_ids()).logits, load_quantized(weight_only)(_ids()).logits,
                                   **WEIGHT_ONLY_TOL)


def test_transformers_fp8_modules_compute_what_ernieq_does_w8a8(exported, weight_only):
    """transformers' W8A8 path on the export (its hub kernel replaced by the torch version above) and
    ernieq's runtime on the native checkpoint: every linear layer gives the same output for the same input,
    weight-only ones do not; on the tiny model the whole logits agree too. (On the demo's wider layers the
    fp8 rounding of activations turns a sum-order difference of 3e-6 into rounding flips that grow through
    the layers, measured 3.4 apart in logits after four, so there the layers are compared one by one.)"""
    src, native, out = exported
    model, ours, ours_weight_only = _fp8_modules(out), load_quantized(native), load_quantized(weight_only)
    linears = [n for n, m in model.named_modules() if type(m).__name__ == "FP8Linear"]
    assert linears
    x_by_k = {}
    with torch.no_grad(), mock.patch.object(finegrained_fp8, "load_finegrained_fp8_kernel", _finegrained_fp8_in_torch):
        for name in linears:
            theirs = model.get_submodule(name)
            x = x_by_k.setdefault(theirs.in_features, torch.randn(5, theirs.in_features,
                                                                  generator=torch.Generator().manual_seed(1)))
            torch.testing.assert_close(ours.get_submodule(name)(x), theirs(x), **W8A8_TOL)
            with pytest.raises(AssertionError):
                torch.testing.assert_close(ours_weight_only.get_submodule(name)(x), theirs(x), **W8A8_TOL)
        if src.name == "src":  # the tiny model
            theirs = model(_ids()).logits
            torch.testing.assert_close(ours(_ids()).logits, theirs, **W8A8_TOL)
            with pytest.raises(AssertionError):  # measured 0.039 apart
                torch.testing.assert_close(ours_weight_only(_ids()).logits, theirs, **W8A8_TOL)


def test_fp8_modules_hold_the_stored_weights_and_block_scales(exported):
    """The GPU load path (FP8Linear, fused FP8Experts), built on CPU: only its kernels need a GPU."""
    _, native, out = exported
    state = _fp8_modules(out).state_dict()
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
    _, native, out = exported
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "fp8" and qc["weight_block_size"] == [128, 128]
    assert qc["activation_scheme"] == "dynamic"  # what ernieq computes: --fp8 records activations "dynamic"
    assert {spec.params["activations"] for spec in NativeReader(native).modules.values()} == {"dynamic"}
    assert {"lm_head", "model.layers.1.mlp.gate"} <= set(qc["modules_to_not_convert"])
    FineGrainedFP8Config.from_dict(qc)


@pytest.mark.parametrize("options, message", [
    ({"bits": 4}, r"model\..*is wint4 .*only fp8 with block_size=128"),
    ({"fp8": True, "overrides": (".*=fp8:block_size=none",)}, r"is fp8 \{.*'block_size': None\}"),
    ({"fp8": True, "fp8_activations": "none"}, r"is weight-only fp8 \(activations='none'\); .*no weight-only scheme"),
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
