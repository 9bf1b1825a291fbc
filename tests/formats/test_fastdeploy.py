"""The FastDeploy wint2 (w4w2) export of a 2-bit ERNIE 4.5 MoE checkpoint.

Every exported quantized tensor is decoded here by code written apart from
ernieq's (numpy, straight from DESIGN.md §3.1 and from Paddle's
``weight_quantize`` permutation kernels) and compared bit for bit with what
ernieq's own decode reads from the native checkpoint. Names, shapes, dtypes and
``quantization_config`` are checked against what FastDeploy's loader reads
(``FASTDEPLOY_*`` below, each with the FastDeploy file it comes from).

The Paddle layout hashes were made with Paddle 3.3.1 (CPU) itself::

    v = (arange(128)[:, None] * 37 + arange(192)[None, :] * 11) % (hi - lo + 1) + lo; v[:, 0] = hi
    q, s = paddle.nn.quant.weight_quantize(paddle.to_tensor(v.T.astype("float32")).astype("bfloat16"),
                                           algo=algo, arch=80)   # s == 1 everywhere
    hashlib.sha256(q.numpy().tobytes()).hexdigest()

(arch 86, 89 and 90 give the same bytes.)
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
from ernieq.formats.registry import export_checkpoint
from ernieq.model.checkpoint import CheckpointReader
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

PADDLE_331_INT8_SHA256 = "4112560fc2c9c62e895eb491a83e57f95ff4a133ab68c825c94baf85a7c2b126"
PADDLE_331_INT4_SHA256 = "0a23a215cc834b8bffa81f48fc5f3de9bd0b4ebed739b91efac766fdc47e953f"


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


# ------------------------------------------------------------ independent decoders (numpy)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.float().numpy() if t.dtype in (torch.bfloat16, torch.float16) else t.numpy()


def ccq2_decode(quant_weight, weight_scale, super_scales, code_scale, code_zp) -> np.ndarray:
    """DESIGN.md §3.1 written out: returns float32 W [K, N] (Paddle's [in, out] order)."""
    b = _np(quant_weight).astype(np.float32)  # [K/4, N]
    c = np.floor(b * _np(code_scale) + _np(code_zp) + np.float32(0.5)).astype(np.int32)  # 15-bit codes
    k4, n = b.shape
    w = np.zeros((4 * k4, n), np.float32)
    for j, shift in enumerate((9, 6, 3, 0)):
        w[j::4] = ((c >> shift) & 0x3F) - 32  # row 4r + j
    ws = _np(weight_scale)  # [K/128, N]
    for row in range(4 * k4):
        g = row // 64
        byte = ws[g // 2].astype(np.int32)
        nibble = byte >> 4 if g % 2 == 0 else byte & 0xF  # even group: high nibble
        w[row] *= nibble.astype(np.float32) * _np(super_scales)
    return w


def paddle_int8_values(quant_weight: torch.Tensor) -> np.ndarray:
    """Read Paddle's weight_only_int8 bytes back: int values [N, K] (weight_permute_kernel_wint8 inverted)."""
    flat = quant_weight.numpy().reshape(-1).view(np.uint8).astype(np.int32)
    n, k = quant_weight.shape
    order = np.array([0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15])
    kk = order[np.arange(k) % 16] + np.arange(k) // 16 * 16
    index = np.add.outer(64 * (np.arange(n) % 2) + 2 * k * (np.arange(n) // 2), kk % 64 + kk // 64 * 128)
    return flat[index] - 128


def paddle_int4_values(quant_weight: torch.Tensor) -> np.ndarray:
    """Read Paddle's weight_only_int4 bytes back: int values [N, K] (interval + permute kernels inverted)."""
    half_n, k = quant_weight.shape
    words = quant_weight.numpy().reshape(-1).view("<u4")
    stored = [(words >> (4 * i)) & 0xF for i in range(8)]
    original = [None] * 8
    for i, src in enumerate((0, 2, 4, 6, 1, 3, 5, 7)):  # nibble i holds (nibble src + 8) & 0xF
        original[src] = (stored[i] - 8) & 0xF
    word = sum(original[i].astype(np.uint64) << np.uint64(4 * i) for i in range(8)).astype("<u4")
    flat = word.view(np.uint8).astype(np.int32)  # the permuted packed bytes
    n = 2 * half_n
    order = np.array([0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15])
    j = np.arange(k // 2)
    jj = order[j % 16] + j // 16 * 16
    packed = flat[np.add.outer(32 * (np.arange(n) % 4) + 2 * k * (np.arange(n) // 4), jj % 32 + jj // 32 * 128)]
    nibbles = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(n, k)  # even row in the low nibble
    return np.where(nibbles >= 8, nibbles - 16, nibbles)  # two's complement


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
    assert rule.target == "lm_head.weight" and torch.equal(rule.convert(lm_head), lm_head.T)
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


def test_int4_layout_keeps_minus_eight():
    """ernieq's symmetric wint4 may use -8 (code 0); Paddle's quantizer never does but its kernels read it."""
    v = torch.arange(64 * 4 * 64).reshape(4 * 16, 4 * 64) % 16 - 8
    assert np.array_equal(paddle_int4_values(paddle_int4_layout(v.to(torch.int8))), v.numpy())


# ------------------------------------------------------------ what FastDeploy cannot take

SMALL = {"hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 64}
FAST_SEARCH = "grid_candidates=1,scale_steps=0,refine_steps=0"  # ccq2's layout with a quicker search
FAST_CCQ2 = rf"mlp\.experts\.=ccq2:{FAST_SEARCH}"


@pytest.fixture(scope="module")
def small_src(tmp_path_factory):
    return write_tiny_ernie(tmp_path_factory.mktemp("small") / "src", **SMALL)


@pytest.mark.parametrize("options, message", [
    ({"bits": 2, "w4_moe_layers": 0, "overrides": (FAST_CCQ2,)},
     r"model\.layers\.1\.mlp\.experts\.0\.down_proj is ccq2 with K=64; .*K % 128 == 0"),
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
