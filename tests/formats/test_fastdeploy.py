"""The FastDeploy wint2 (w4w2) export of a 2-bit ERNIE 4.5 MoE checkpoint.

Every exported quantized tensor is decoded here by code written apart from
ernieq's (``tests.formats.fastdeploy_np``: numpy, straight from DESIGN.md §3.1
and from Paddle's ``weight_quantize`` permutation kernels) and compared bit for
bit with what ernieq's own decode reads from the native checkpoint. Names,
shapes, dtypes and ``quantization_config`` are checked against what FastDeploy's
loader reads (``FASTDEPLOY_*`` below, each with the FastDeploy file it comes from).
The Paddle layouts are checked against hashes of Paddle 3.3.1's own bytes.
"""

import hashlib
import json
import re
import shutil

import numpy as np
import pytest
import torch

from ernieq import api
from ernieq.codecs import decode
from ernieq.codecs.packing import unpack_int4_k_major
from ernieq.errors import ErnieqError
from ernieq.formats.fastdeploy import rename_plain
from ernieq.formats.native import NativeReader
from ernieq.formats.paddle_layout import paddle_int4_layout, paddle_int8_layout
from ernieq.formats.paddle_layout import paddle_int4_values as paddle_values4
from ernieq.formats.paddle_layout import paddle_int8_values as paddle_values
from ernieq.formats.registry import export_checkpoint
from ernieq.model.checkpoint import CheckpointReader
from tests.formats.fastdeploy_np import (
    PADDLE_331_INT4_SHA256,
    PADDLE_331_INT8_SHA256,
    ccq2_decode,
    paddle_int4_bytes,
    paddle_int4_values,
    paddle_int8_bytes,
    paddle_int8_values,
)
from tests.tiny import write_tiny_ernie

FORMAT = "fastdeploy"
# ccq2 needs K % 128 == 0 on every routed expert: hidden and expert intermediate size 128
DIMS = {"hidden_size": 128, "moe_intermediate_size": 128, "intermediate_size": 256}

# fastdeploy/model_executor/models/ernie4_5_moe.py: Ernie4_5_Model prefix_name, Ernie4_5_MoE weight_key_map
# for moe_quant_type "w4w2", LinearBase keys with is_quantized (layers/linear.py), lm_head (weight_infos).
FASTDEPLOY_PREFIX = "ernie"
FASTDEPLOY_DENSE = ("self_attn.qkv_proj", "self_attn.o_proj")
FASTDEPLOY_DENSE_MLP = ("mlp.up_gate_proj", "mlp.down_proj")
FASTDEPLOY_SHARED = ("mlp.shared_experts.up_gate_proj", "mlp.shared_experts.down_proj")
FASTDEPLOY_PREQUANT = ("quant_weight", "weight_scale")  # LinearBase: {prefix}.quant_weight / .weight_scale
FASTDEPLOY_EXPERT = "mlp.experts.{e}.{proj}.{tensor}"  # up_gate_proj_expert_*_key templates
FASTDEPLOY_WINT2 = ("quant_weight", "weight_scale", "super_scales", "code_scale", "code_zp")
FASTDEPLOY_ROUTER = ("mlp.gate.weight", "mlp.moe_statics.e_score_correction_bias")
FASTDEPLOY_NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight")
# layers/quantization/wint2.py, WINT2Config.from_config: the keys it reads
FASTDEPLOY_W4_KEYS = {"quant_type", "quant_granularity", "quant_start_layer", "quant_end_layer"}
FASTDEPLOY_W2_KEYS = FASTDEPLOY_W4_KEYS | {"quant_group_size"}



@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_tiny_ernie(tmp_path_factory.mktemp("fastdeploy_src") / "src", **DIMS)


@pytest.fixture(scope="module", params=["tiny", "demo"])
def exported(request, tmp_path_factory, src):
    """The tiny model, and the reduced demo (hidden 640, experts of 128): `quantize --bits 2 --format fastdeploy`."""
    model = src if request.param == "tiny" else request.getfixturevalue("demo_routed_dir")
    root = tmp_path_factory.mktemp("fastdeploy")
    native = root / "q"
    api.quantize(model, native, bits=2, w4_moe_layers=1, progress=False, rotate=False)
    (native / "generation_config.json").write_text(json.dumps({"top_p": 0.8}))  # a side file to carry over
    out = export_checkpoint(native, root / "fd", FORMAT)
    reader = CheckpointReader(out)
    return NativeReader(native), {name: reader.get(name) for name in reader.keys()}, out


# ------------------------------------------------------------ tests


def _expert_modules(reader, layer, e):
    base = f"model.layers.{layer}.mlp.experts.{e}"
    return [f"{base}.{p}" for p in ("gate_proj", "up_proj", "down_proj")]


def _layers_with(reader, codec):
    return sorted({int(m.split(".")[2]) for m, s in reader.modules.items() if ".experts." in m and s.codec == codec})


def test_ccq2_experts_decode_bit_for_bit(exported):
    reader, tensors, _ = exported
    ccq2_layers = _layers_with(reader, "ccq2")
    assert ccq2_layers
    inter = reader.config["moe_intermediate_size"]
    for layer in ccq2_layers:
        for e in range(reader.config["moe_num_experts"]):
            gate, up, down = (decode(reader.quantized(m)).numpy() for m in _expert_modules(reader, layer, e))
            base = f"{FASTDEPLOY_PREFIX}.layers.{layer}.mlp.experts.{e}"
            fused = ccq2_decode(*(tensors[f"{base}.up_gate_proj.{t}"] for t in FASTDEPLOY_WINT2))  # [H, 2I]
            assert np.array_equal(fused[:, :inter].T, gate) and np.array_equal(fused[:, inter:].T, up)
            assert np.array_equal(ccq2_decode(*(tensors[f"{base}.down_proj.{t}"] for t in FASTDEPLOY_WINT2)).T, down)


def test_wint4_experts_hold_ernieq_codes_in_paddle_layout(exported):
    reader, tensors, _ = exported
    w4_layers = _layers_with(reader, "wint4")
    assert w4_layers
    for layer in w4_layers:
        for e in range(reader.config["moe_num_experts"]):
            gate, up, down = (reader.quantized(m) for m in _expert_modules(reader, layer, e))
            base = f"{FASTDEPLOY_PREFIX}.layers.{layer}.mlp.experts.{e}"
            for fd_name, parts in (("up_gate_proj", (gate, up)), ("down_proj", (down,))):
                k = parts[0].shape[1]
                codes = np.concatenate([unpack_int4_k_major(q.tensors["qweight"], k).numpy() for q in parts])
                assert np.array_equal(paddle_int4_values(tensors[f"{base}.{fd_name}.quant_weight"]),
                                      codes.astype(np.int32) - 8)
                scale = torch.cat([q.tensors["scale"][:, 0] for q in parts]).to(torch.bfloat16)
                assert torch.equal(tensors[f"{base}.{fd_name}.weight_scale"], scale)


def test_wint8_layers_hold_ernieq_codes_in_paddle_layout(exported):
    reader, tensors, _ = exported
    fused = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
             "gate_proj": ("up_gate_proj", 0), "up_proj": ("up_gate_proj", 1)}
    targets: dict[str, list] = {}
    for module, spec in sorted(reader.modules.items()):
        if spec.codec == "wint8":
            head, proj = module.rsplit(".", 1)
            fd_proj, part = fused.get(proj, (proj, 0))
            targets.setdefault(FASTDEPLOY_PREFIX + head[len("model"):] + "." + fd_proj, {})[part] = module
    assert targets
    for name, parts in targets.items():
        qs = [reader.quantized(parts[i]) for i in sorted(parts)]  # q | k | v and gate | up along N
        values = torch.cat([q.tensors["qweight"] for q in qs]).numpy().astype(np.int32)
        assert np.array_equal(paddle_int8_values(tensors[f"{name}.quant_weight"]), values), name
        scale = torch.cat([q.tensors["scale"] for q in qs]).to(torch.bfloat16)
        assert torch.equal(tensors[f"{name}.weight_scale"], scale), name


def test_names_shapes_and_dtypes_are_what_fastdeploy_reads(exported):
    reader, tensors, out = exported
    cfg = reader.config
    h, inter, e_num = cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["moe_num_experts"]
    qkv_n = (cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"]) * cfg["head_dim"]
    bf16, i8, u8, f32 = torch.bfloat16, torch.int8, torch.uint8, torch.float32
    expected = {f"{FASTDEPLOY_PREFIX}.embed_tokens.weight": ((cfg["vocab_size"], h), f32),
                f"{FASTDEPLOY_PREFIX}.norm.weight": ((h,), f32)}
    w4, w2 = _layers_with(reader, "wint4"), _layers_with(reader, "ccq2")
    for layer in range(cfg["num_hidden_layers"]):
        p = f"{FASTDEPLOY_PREFIX}.layers.{layer}."
        expected |= {p + n: ((h,), f32) for n in FASTDEPLOY_NORMS}
        attn_o = cfg["num_attention_heads"] * cfg["head_dim"]
        mlps = FASTDEPLOY_SHARED if layer in w4 + w2 else FASTDEPLOY_DENSE_MLP
        mlp_i = inter * cfg["moe_num_shared_experts"] if layer in w4 + w2 else cfg["intermediate_size"]
        for mod, (n, k) in zip(FASTDEPLOY_DENSE + mlps, ((qkv_n, h), (h, attn_o), (2 * mlp_i, h), (h, mlp_i))):
            expected[f"{p}{mod}.{FASTDEPLOY_PREQUANT[0]}"] = ((n, k), i8)  # [N, K]
            expected[f"{p}{mod}.{FASTDEPLOY_PREQUANT[1]}"] = ((n,), bf16)
        if layer not in w4 + w2:
            continue
        expected[p + FASTDEPLOY_ROUTER[0]] = ((h, e_num), f32)  # Paddle order [H, E]
        expected[p + FASTDEPLOY_ROUTER[1]] = ((1, e_num), f32)
        for e in range(e_num):
            for proj, (n, k) in (("up_gate_proj", (2 * inter, h)), ("down_proj", (h, inter))):
                name = p + FASTDEPLOY_EXPERT.format(e=e, proj=proj, tensor="{}")
                if layer in w4:
                    expected[name.format("quant_weight")] = ((n // 2, k), i8)  # two int4 per byte along N
                    expected[name.format("weight_scale")] = ((n,), bf16)
                else:
                    shapes = (((k // 4, n), u8), ((k // 128, n), u8), ((n,), bf16), ((n,), f32), ((n,), f32))
                    expected |= {name.format(t): s for t, s in zip(FASTDEPLOY_WINT2, shapes)}
    got = {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}
    assert got == expected
    # FastDeploy's check_unified_ckpt: model.safetensors or model-0000i-of-0000n.safetensors
    assert all(re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors", f.name) for f in out.glob("*.safetensors"))


def test_router_and_lm_head_are_in_paddle_order(exported):
    reader, tensors, _ = exported
    routers = [n for n in reader.plain_names() if n.endswith("mlp.gate.weight")]
    assert routers
    for name in routers:  # FastDeploy's FusedMoE computes x @ gate_weight: [H, E]
        assert torch.equal(tensors[FASTDEPLOY_PREFIX + name[len("model"):]], reader.reader.get(name).float().T)
    lm_head = torch.randn(96, 128)  # [V, H]; the tiny model ties it, so the rule is checked on its own
    rule = rename_plain("lm_head.weight", tuple(lm_head.shape))
    assert rule.target == "lm_head.weight" and torch.equal(rule.to_target(lm_head), lm_head.T)
    assert rename_plain("model.mtp_linear_proj.0.weight", (128, 256)) is None  # FastDeploy's separate MTP model
    with pytest.raises(ErnieqError, match=r"model\.vision_proj\.bias has no place"):
        rename_plain("model.vision_proj.bias", (128,))


def test_config_is_a_paddle_wint2_config(exported):
    reader, _, out = exported
    config = json.loads((out / "config.json").read_text())
    # fastdeploy/config.py read_model_config: torch_dtype, or dtype with transformers_version > 4.56, means torch
    assert "torch_dtype" not in config and "transformers_version" not in config
    assert config["dtype"] == "bfloat16" and config["is_quantized"] is True
    assert config["rope_theta"] == reader.config["rope_parameters"]["rope_theta"]
    assert config["moe_use_aux_free"] is True
    qc = config["quantization_config"]
    assert qc["quantization"] == "wint2" and qc["dense_quant_type"] == "wint8"
    moe = qc["moe_quant_config"]
    assert moe["quant_type"] == "w4w2"
    w4, w2 = moe["moe_w4_quant_config"], moe["moe_w2_quant_config"]
    assert set(w4) == FASTDEPLOY_W4_KEYS and set(w2) == FASTDEPLOY_W2_KEYS
    assert (w4["quant_type"], w4["quant_granularity"]) == ("wint4", "per_channel")
    assert (w2["quant_type"], w2["quant_granularity"], w2["quant_group_size"]) == ("wint2", "pp_acc", 64)
    w4_layers, w2_layers = _layers_with(reader, "wint4"), _layers_with(reader, "ccq2")
    # WINT2Config.get_quant_method: wint4 where layer_idx <= moe_w4 quant_end_layer, wint2 after
    assert all(layer <= w4["quant_end_layer"] for layer in w4_layers)
    assert all(layer > w4["quant_end_layer"] for layer in w2_layers)
    assert (w2["quant_start_layer"], w2["quant_end_layer"]) == (w2_layers[0], w2_layers[-1])
    assert w4["quant_start_layer"] == reader.config["moe_layer_start_index"]
    assert json.loads((out / "generation_config.json").read_text()) == {"top_p": 0.8}


@pytest.mark.parametrize("layout, lo, hi, digest", [
    (paddle_int8_layout, -127, 127, PADDLE_331_INT8_SHA256),
    (paddle_int4_layout, -7, 7, PADDLE_331_INT4_SHA256),
])
def test_layouts_match_paddle_weight_quantize(layout, lo, hi, digest):
    v = (np.arange(128)[:, None] * 37 + np.arange(192)[None, :] * 11) % (hi - lo + 1) + lo
    v[:, 0] = hi
    packed = layout(torch.from_numpy(v.astype(np.int8)))
    assert hashlib.sha256(packed.numpy().tobytes()).hexdigest() == digest
    reread = paddle_int8_values(packed) if layout is paddle_int8_layout else paddle_int4_values(packed)
    assert np.array_equal(reread, v)
    # ernieq's reader undoes the layout exactly, and the tests' own numpy encoder makes Paddle's bytes too
    ernieq_values = paddle_values(packed) if layout is paddle_int8_layout else paddle_values4(packed)
    assert np.array_equal(ernieq_values.numpy(), v)
    np_bytes = paddle_int8_bytes(v) if layout is paddle_int8_layout else paddle_int4_bytes(v)
    assert hashlib.sha256(np_bytes.numpy().tobytes()).hexdigest() == digest


def test_int4_layout_keeps_minus_eight():
    """ernieq's symmetric wint4 may use -8 (code 0); Paddle's quantizer never does but its kernels read it."""
    v = torch.arange(64 * 4 * 64).reshape(4 * 16, 4 * 64) % 16 - 8
    assert np.array_equal(paddle_int4_values(paddle_int4_layout(v.to(torch.int8))), v.numpy())
    assert torch.equal(paddle_values4(paddle_int4_layout(v.to(torch.int8))), v.to(torch.int8))


# ------------------------------------------------------------ what FastDeploy cannot take

SMALL = {"hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 64}
FAST_SEARCH = "grid_candidates=1,scale_steps=0,refine_steps=0"  # ccq2's layout with a quicker search
FAST_CCQ2 = rf"mlp\.experts\.=ccq2:{FAST_SEARCH}"


@pytest.fixture(scope="module")
def small_src(tmp_path_factory):
    return write_tiny_ernie(tmp_path_factory.mktemp("small") / "src", **SMALL)


@pytest.mark.parametrize("options, message", [
    ({"bits": 2, "w4_moe_layers": 0, "overrides": (FAST_CCQ2,)},
     r"model\.layers\.1\.mlp\.experts\.0\.down_proj\): ccq2 with K=64; .*K % 128 == 0"),
    ({"bits": 4}, r"model\.layers\.0\.mlp\.down_proj is wint4; FastDeploy's w4w2 path reads wint8 there"),
    ({"bits": 2, "w4_moe_layers": 2, "overrides": (r"mlp\.experts\.=wint4:group_size=32",)},
     r"experts\.0\.down_proj is wint4 .*'group_size': 32.* K=64; .*per channel"),
    ({"bits": 2, "w4_moe_layers": 2}, r"no ccq2 routed experts"),
    ({"bits": 8, "overrides": (r"shared_experts=none",)},
     r"model\.layers\.1\.mlp\.shared_experts\.\w+\.weight is stored unquantized"),
])
def test_checkpoints_fastdeploy_cannot_serve_are_refused(small_src, tmp_path, options, message):
    api.quantize(small_src, tmp_path / "q", progress=False, rotate=False, **options)
    with pytest.raises(ErnieqError, match=message):
        export_checkpoint(tmp_path / "q", tmp_path / "fd", FORMAT)
    assert not (tmp_path / "fd").exists()


def test_wint4_after_ccq2_is_refused(src, tmp_path):
    api.quantize(src, tmp_path / "q", bits=2, w4_moe_layers=0, progress=False, rotate=False,
                 overrides=(rf"layers\.1\.mlp\.experts\.=ccq2:{FAST_SEARCH}", r"layers\.2\.mlp\.experts\.=wint4"))
    with pytest.raises(ErnieqError, match=r"wint4 experts in layer 2 follow ccq2 experts in layer 1"):
        export_checkpoint(tmp_path / "q", tmp_path / "fd", FORMAT)


def test_other_architectures_are_refused(exported, tmp_path):
    reader, _, _ = exported
    native = tmp_path / "q"
    shutil.copytree(reader.reader.path, native)
    config = json.loads((native / "config.json").read_text())
    config["model_type"] = "qwen3_moe"
    (native / "config.json").write_text(json.dumps(config))
    with pytest.raises(ErnieqError, match=r"only ERNIE 4.5 MoE \(ernie4_5_moe\).*'qwen3_moe'"):
        export_checkpoint(native, tmp_path / "fd", FORMAT)
    assert not (tmp_path / "fd").exists()


def test_the_hand_written_fastdeploy_table_agrees_with_the_generic_adapter():
    """FastDeploy's Paddle names cannot be derived (fastdeploy_names.SLOTS is written by hand): every
    native module it places has the class and [N, K] the generic adapter derives from transformers."""
    from ernieq.formats.fastdeploy_names import DENSE, ROUTED, SLOTS, model_dims
    from ernieq.model.adapters import LINEAR_CLASSES, TensorClass, adapter_for
    from tests.tiny import TINY_ERNIE

    adapter, dims = adapter_for(TINY_ERNIE), model_dims(TINY_ERNIE)
    for slot in SLOTS:
        layer = 0 if re.search(r"\.mlp\.(gate|up|down)_proj$", slot.module) else 1  # layer 0 is TINY_ERNIE's dense one
        name = slot.module.format(layer=layer, expert=2) + ".weight"
        info = adapter.classify(name)
        assert info.cls in LINEAR_CLASSES and (info.cls is TensorClass.ROUTED_EXPERT) == (slot.role == ROUTED), name
        assert slot.role in (DENSE, ROUTED)
        assert adapter.expected_shape(name) == tuple(dims[d] for d in slot.shape), name
