"""Reading FastDeploy's ERNIE 4.5 MoE wint2 checkpoints: a hand-built folder, ernieq's own export, TP splits.

The hand-built folder is made here without ernieq's writer: random codes and scales
for every linear layer, laid out by ``tests.formats.fastdeploy_np`` (numpy; its
Paddle layouts hash-checked against Paddle's own bytes in ``test_fastdeploy.py``),
under the names, dtypes and ``quantization_config`` FastDeploy's loader reads
(Baidu's published config: no ``moe_quant_config.quant_type``, ``quant_start_layer 0``),
and split for two ranks by the same module's numpy version of FastDeploy's TP rules.
Its reference logits come from a plain transformers checkpoint of the numpy-decoded
weights; ernieq's reader and runtime must reproduce them.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ernieq import api
from ernieq.codecs import decode
from ernieq.errors import ErnieqError
from ernieq.formats.registry import export_checkpoint, open_quantized, quantized_format
from ernieq.model.checkpoint import CheckpointReader, CheckpointWriter
from ernieq.runtime.loader import load_quantized
from tests.formats.fastdeploy_np import (
    ccq2_decode,
    paddle_int4_bytes,
    paddle_int8_bytes,
    tp_split,
)
from tests.tiny import reload_logits, tiny_ernie_model, write_char_tokenizer, write_tiny_ernie

FORMAT = "fastdeploy"
# every dimension a multiple of what Paddle's layouts and the wint2 kernels need, for TP 1 and 2
HAND = {"hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 256, "head_dim": 32,
        "tie_word_embeddings": False}
W4_END = 1  # layer 1's experts wint4 (FastDeploy: layer_idx <= quant_end_layer), layer 2's wint2
IDS = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(7))
# FastDeploy docs/quantization/wint2.md (Baidu's ERNIE-4.5-300B-A47B-2Bits-Paddle), layers scaled down
QUANTIZATION_CONFIG = {
    "dense_quant_type": "wint8", "moe_quant_type": "w4w2", "quantization": "wint2",
    "moe_quant_config": {
        "moe_w4_quant_config": {"quant_type": "wint4", "quant_granularity": "per_channel",
                                "quant_start_layer": 0, "quant_end_layer": W4_END},
        "moe_w2_quant_config": {"quant_type": "wint2", "quant_granularity": "pp_acc", "quant_group_size": 64,
                                "quant_start_layer": W4_END + 1, "quant_end_layer": 2},
    },
}


def _save(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    with CheckpointWriter(folder, max_shard_bytes=256 * 1024) as w:
        for name, t in tensors.items():
            w.add(name, t)


# ------------------------------------------------------------ the hand-built folder


class HandBuilt:
    """FastDeploy's tensors (TP 1), the decoded weights under native names, and the config."""

    def __init__(self, seed: int = 0):
        self.model = tiny_ernie_model(seed, **HAND)
        self.cfg = self.model.config.to_dict()
        self.rng = np.random.default_rng(seed)
        self.fd: dict[str, torch.Tensor] = {}
        self.ref: dict[str, torch.Tensor] = {}  # native name -> the weight FastDeploy's tensors decode to
        self.modules: set[str] = set()  # the quantized ones among them (module names, no ``.weight``)
        self._build()

    def _wint8(self, name: str, n: int, k: int) -> np.ndarray:
        v = self.rng.integers(-127, 128, (n, k))
        scale = torch.tensor(self.rng.uniform(0.5, 1.5, n) * 0.03 / 127).to(torch.bfloat16)  # [N]
        self.fd[f"{name}.quant_weight"] = paddle_int8_bytes(v)
        self.fd[f"{name}.weight_scale"] = scale
        return v * scale.float().numpy()[:, None]  # W [N, K]

    def _wint4(self, name: str, n: int, k: int) -> np.ndarray:
        v = self.rng.integers(-8, 8, (n, k))
        scale = torch.tensor(self.rng.uniform(0.5, 1.5, n) * 0.03 / 7).to(torch.bfloat16)
        self.fd[f"{name}.quant_weight"] = paddle_int4_bytes(v)
        self.fd[f"{name}.weight_scale"] = scale
        return v * scale.float().numpy()[:, None]

    def _ccq2(self, name: str, n: int, k: int) -> np.ndarray:
        t = {"quant_weight": torch.from_numpy(self.rng.integers(0, 256, (k // 4, n)).astype(np.uint8)),
             "weight_scale": torch.from_numpy(self.rng.integers(17, 256, (k // 128, n)).astype(np.uint8)),
             "super_scales": torch.tensor(self.rng.uniform(0.5, 1.5, n) * 2e-4).to(torch.bfloat16),
             "code_scale": torch.tensor(self.rng.choice([120.0, 121.0, 120.875], n), dtype=torch.float32),
             "code_zp": torch.tensor(self.rng.choice([540.0, 1100.0], n), dtype=torch.float32)}
        self.fd.update({f"{name}.{local}": v for local, v in t.items()})
        return ccq2_decode(*t.values()).T  # [K, N] -> W [N, K]

    def _fused(self, encode, fd_name: str, natives: list[str], sizes: list[int], k: int) -> None:
        w = encode(fd_name, sum(sizes), k)
        start = 0
        for native, size in zip(natives, sizes):
            self.ref[native] = torch.from_numpy(np.ascontiguousarray(w[start:start + size])).float()
            self.modules.add(native)
            start += size

    def _build(self) -> None:
        c = self.cfg
        h, qd, kvd = c["hidden_size"], c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
        inter, m, s = c["intermediate_size"], c["moe_intermediate_size"], c["moe_num_shared_experts"] * c["moe_intermediate_size"]
        state = self.model.state_dict()
        bf16 = {k: v.to(torch.bfloat16) for k, v in state.items()}  # Paddle checkpoints keep bf16 weights
        self.fd["ernie.embed_tokens.weight"] = bf16["model.embed_tokens.weight"]
        self.fd["ernie.norm.weight"] = bf16["model.norm.weight"]
        self.fd["lm_head.weight"] = bf16["lm_head.weight"].t().contiguous()  # [H, V]
        self.ref |= {"model.embed_tokens.weight": bf16["model.embed_tokens.weight"].float(),
                     "model.norm.weight": bf16["model.norm.weight"].float(),
                     "lm_head.weight": bf16["lm_head.weight"].float()}
        for layer in range(c["num_hidden_layers"]):
            fd, nat = f"ernie.layers.{layer}.", f"model.layers.{layer}."
            for norm in ("input_layernorm", "post_attention_layernorm"):
                self.fd[f"{fd}{norm}.weight"] = bf16[f"{nat}{norm}.weight"]
                self.ref[f"{nat}{norm}.weight"] = bf16[f"{nat}{norm}.weight"].float()
            self._fused(self._wint8, fd + "self_attn.qkv_proj", [nat + f"self_attn.{p}_proj" for p in "qkv"],
                        [qd, kvd, kvd], h)
            self._fused(self._wint8, fd + "self_attn.o_proj", [nat + "self_attn.o_proj"], [h], qd)
            if layer < c["moe_layer_start_index"]:
                self._fused(self._wint8, fd + "mlp.up_gate_proj", [nat + "mlp.gate_proj", nat + "mlp.up_proj"],
                            [inter, inter], h)
                self._fused(self._wint8, fd + "mlp.down_proj", [nat + "mlp.down_proj"], [h], inter)
                continue
            gate = state[nat + "mlp.gate.weight"].float()  # [E, H]
            self.fd[fd + "mlp.gate.weight"] = gate.t().contiguous()  # Paddle [H, E], float32
            self.ref[nat + "mlp.gate.weight"] = gate
            bias = state[nat + "mlp.gate.moe_statics.e_score_correction_bias"].float()
            self.fd[fd + "mlp.moe_statics.e_score_correction_bias"] = bias
            self.ref[nat + "mlp.moe_statics.e_score_correction_bias"] = bias
            sh = nat + "mlp.shared_experts."
            self._fused(self._wint8, fd + "mlp.shared_experts.up_gate_proj", [sh + "gate_proj", sh + "up_proj"],
                        [s, s], h)
            self._fused(self._wint8, fd + "mlp.shared_experts.down_proj", [sh + "down_proj"], [h], s)
            encode = self._wint4 if layer <= W4_END else self._ccq2
            for e in range(c["moe_num_experts"]):
                ex = f"{nat}mlp.experts.{e}."
                self._fused(encode, f"{fd}mlp.experts.{e}.up_gate_proj", [ex + "gate_proj", ex + "up_proj"],
                            [m, m], h)
                self._fused(encode, f"{fd}mlp.experts.{e}.down_proj", [ex + "down_proj"], [h], m)

    def paddle_config(self) -> dict:
        """config.json as a Paddle checkpoint has it: ``dtype``, no torch markers, no model_type."""
        config = {k: v for k, v in self.cfg.items() if k not in ("torch_dtype", "transformers_version", "model_type")}
        return {**config, "dtype": "bfloat16", "is_quantized": True, "quantization_config": QUANTIZATION_CONFIG}

    def write(self, root: Path) -> tuple[Path, Path, Path]:
        """(reference plain checkpoint, FastDeploy folder TP 1, FastDeploy folder split for 2 ranks)."""
        ref, fd1, fd2 = root / "ref", root / "fd-tp1", root / "fd-tp2"
        _save(ref, {f"{k}.weight" if k in self.modules else k: v.contiguous() for k, v in self.ref.items()})
        (ref / "config.json").write_text(json.dumps(self.cfg))
        _save(fd1, self.fd)
        fd2.mkdir()
        for r, tensors in enumerate(tp_split(self.fd, self.cfg, 2)):
            _save(fd2 / f"rank{r}", tensors)
        for folder in (fd1, fd2):
            (folder / "config.json").write_text(json.dumps(self.paddle_config()))
        return ref, fd1, fd2


@pytest.fixture(scope="module")
def hand(tmp_path_factory):
    built = HandBuilt()
    return built, *built.write(tmp_path_factory.mktemp("fd_hand"))


@pytest.mark.parametrize("which", ["fd-tp1", "fd-tp2"])
def test_hand_built_folder_decodes_to_the_numpy_weights(hand, which):
    built, _, fd1, fd2 = hand
    reader = open_quantized(fd1 if which == "fd-tp1" else fd2)
    assert reader.tp == (1 if which == "fd-tp1" else 2)
    codecs = {m: s.codec for m, s in reader.modules.items()}
    assert codecs["model.layers.1.self_attn.q_proj"] == "wint8"
    assert codecs["model.layers.1.mlp.experts.3.down_proj"] == "wint4"  # layer_idx <= quant_end_layer
    assert codecs["model.layers.2.mlp.experts.0.up_proj"] == "ccq2"
    assert set(reader.modules) | set(reader.plain_names()) == set(built.ref)
    for module in reader.modules:
        assert torch.equal(decode(reader.quantized(module)), built.ref[module]), module
    for name in reader.plain_names():
        assert torch.equal(reader.plain(name).float(), built.ref[name]), name


@pytest.mark.parametrize("which", ["fd-tp1", "fd-tp2"])
def test_hand_built_folder_runs_to_the_reference_logits(hand, which):
    _, ref, fd1, fd2 = hand
    want = reload_logits(ref, IDS)
    with torch.no_grad():
        got = load_quantized(fd1 if which == "fd-tp1" else fd2)(IDS).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # same float32 weights; sums in other orders


def test_hand_built_folder_inspects_by_its_stored_bytes(hand):
    built, _, fd1, fd2 = hand
    one, two = api.inspect(fd1), api.inspect(fd2)
    assert one.params_by_codec == two.params_by_codec
    m, h = built.cfg["moe_intermediate_size"], built.cfg["hidden_size"]
    assert one.params_by_codec["ccq2"] == built.cfg["moe_num_experts"] * 3 * m * h
    assert one.codec_bits_per_weight("ccq2") == pytest.approx(2 + 4 / 64 + 80 * (2 / h + 1 / m) / 3)
    stored = sum(t.numel() * t.element_size() for name, t in built.fd.items() if ".experts." in name
                 and name.startswith("ernie.layers.2."))
    assert one.bytes_by_codec["ccq2"] == stored


# ------------------------------------------------------------ ernieq's own export, read back


def _dims(**extra):
    return {"hidden_size": 128, "moe_intermediate_size": 512, "intermediate_size": 256, "head_dim": 64,
            "tie_word_embeddings": False, **extra}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny ERNIE MoE (with a tokenizer), its native 2-bit checkpoint (no rotations) and the FastDeploy
    export of it for 1, 2 and 4 ranks."""
    root = tmp_path_factory.mktemp("fd_export")
    src = write_tiny_ernie(root / "src", **_dims())
    write_char_tokenizer(src)
    native = root / "native"
    api.quantize(src, native, bits=2, w4_moe_layers=1, rotate=False, progress=False)
    folders = {tp: export_checkpoint(native, root / f"fd-tp{tp}", FORMAT, options={"tp": tp} if tp > 1 else {})
               for tp in (1, 2, 4)}
    return src, native, folders


def _bf16_scales(q):
    """The native tensor with its wint8 / wint4 scales as FastDeploy stores them (the serving dtype)."""
    if q.codec not in ("wint8", "wint4"):
        return q
    return type(q)(q.codec, q.shape, {**q.tensors, "scale": q.tensors["scale"].to(torch.bfloat16).float()}, q.params)


def test_export_reads_back_to_the_native_quantized_tensors(exported):
    _, native_dir, folders = exported
    native, fd = open_quantized(native_dir), open_quantized(folders[1])
    assert quantized_format(native_dir) == "native" and quantized_format(folders[1]) == FORMAT
    assert set(fd.modules) == set(native.modules)
    assert set(fd.plain_names()) == set(native.plain_names())
    for module, spec in native.modules.items():
        want, got = _bf16_scales(native.quantized(module)), fd.quantized(module)
        assert (got.codec, got.shape, fd.modules[module].shape) == (spec.codec, spec.shape, spec.shape)
        assert got.tensors.keys() == want.tensors.keys()
        for name, t in want.tensors.items():  # codes bit for bit; scales the bf16 rounding FastDeploy stores
            assert torch.equal(got.tensors[name], t), (module, name)
        assert torch.equal(decode(got), decode(want)), module
        if spec.codec == "ccq2":  # nothing rounded at all
            assert torch.equal(decode(got), decode(native.quantized(module)))
    for name in native.plain_names():
        assert torch.equal(fd.plain(name).float(), native.plain(name).float()), name


def _round_scales_like_fastdeploy(model) -> None:
    for module in model.modules():
        packed = [m for m in module.children() if type(m).__name__ == "_Packed" and m.codec in ("wint8", "wint4")]
        for p in packed:
            p.scale.copy_(p.scale.to(torch.bfloat16).float())


def test_export_reads_back_to_the_native_logits(exported):
    _, native_dir, folders = exported
    with torch.no_grad():
        exact = load_quantized(native_dir)(IDS).logits
        native = load_quantized(native_dir)  # a fresh model: one that ran keeps its weights decoded
        _round_scales_like_fastdeploy(native)
        want = native(IDS).logits
        got = load_quantized(folders[1])(IDS).logits
    assert torch.equal(got, want)  # the same codes and scales through the same runtime
    assert (got - exact).abs().max() <= 1e-2 * exact.abs().max()  # bf16 scales: a relative 2^-9 each


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_splits_read_back_to_the_tp1_logits(exported, tp):
    _, _, folders = exported
    with torch.no_grad():
        want = load_quantized(folders[1])(IDS).logits
        got = load_quantized(folders[tp])(IDS).logits
    assert torch.equal(got, want)


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_split_is_fastdeploys(exported, tp):
    """Every rank's files hold exactly what FastDeploy's TP layers take of the TP-1 tensors."""
    src, _, folders = exported
    one = CheckpointReader(folders[1])
    config = json.loads((src / "config.json").read_text())
    want = tp_split({name: one.get(name) for name in one.keys()}, config, tp)
    assert sorted(p.name for p in folders[tp].iterdir() if p.is_dir()) == [f"rank{r}" for r in range(tp)]
    assert not list(folders[tp].glob("*.safetensors"))
    for r in range(tp):
        rank = CheckpointReader(folders[tp] / f"rank{r}", config=config)
        assert set(rank.keys()) == set(want[r])
        for name, t in want[r].items():
            got = rank.get(name)
            assert got.dtype == t.dtype and torch.equal(got, t), (r, name)


def test_fastdeploy_folders_go_through_the_api(exported, tmp_path):
    src, native, folders = exported
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    r1 = api.evaluate(folders[1], str(text), seq_len=32, max_windows=2, progress=False)
    r4 = api.evaluate(folders[4], str(text), seq_len=32, max_windows=2, progress=False)
    assert r1.tokens == r4.tokens == 2 * 31 and r1.ppl == r4.ppl
    assert api.generate(folders[2], "The quick", max_new_tokens=4).startswith("The quick")
    assert api.inspect(folders[1]).params_by_codec == api.inspect(native).params_by_codec
    report = api.report(folders[1], src, (str(text),), tmp_path / "report", compare=(native, folders[4]),
                        seq_len=32, max_windows=2, progress=False)
    (corpus,) = report["perplexity"]
    assert corpus["ppl"]["quantized"] == pytest.approx(r1.ppl, rel=1e-6)
    assert corpus["ppl"]["fd-tp4"] == corpus["ppl"]["quantized"]
    assert corpus["ppl"]["native"] == pytest.approx(r1.ppl, rel=1e-2)
    assert report["model"]["recipe"].startswith("fastdeploy wint2")
    assert {m["codec"] for m in report["weight_error"]["modules"]} == {"wint8", "wint4", "ccq2"}


def test_cli_quantizes_to_a_split_fastdeploy_checkpoint_and_evaluates_it(exported, tmp_path, monkeypatch, capsys):
    from ernieq.cli import main

    src, _, _ = exported
    text = tmp_path / "text.txt"
    text.write_text("Some text to score, twice over. " * 20)

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["ernieq", "-q", *map(str, args)])
        try:
            main()
        except SystemExit as exit_:
            return exit_.code or 0, *capsys.readouterr()
        return 0, *capsys.readouterr()

    code, _, err = run("quantize", src, "--bits", "2", "--w4-moe-layers", "1", "--format", FORMAT, "--tp", "2",
                         "--out", tmp_path / "f")
    assert code == 0, err
    assert (tmp_path / "f" / "rank1" / "model.safetensors").is_file()
    code, _, err = run("eval", tmp_path / "f", "--data", text, "--seq-len", "32", "--max-windows", "1",
                         "--json", tmp_path / "j.json")
    assert code == 0, err
    assert json.loads((tmp_path / "j.json").read_text())["tokens"] == 31
    code, _, err = run("quantize", src, "--bits", "2", "--tp", "2", "--out", tmp_path / "n")
    assert code == 1 and "--tp applies to the fastdeploy format" in err


# ------------------------------------------------------------ what the reader refuses


def _copy(folder: Path, tmp_path: Path) -> Path:
    out = tmp_path / folder.name
    shutil.copytree(folder, out)
    return out


def _rewrite(shard: Path, change) -> None:
    """Rewrite one safetensors file with ``change(tensors)`` applied."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(shard)
    change(tensors)
    save_file(tensors, shard)


def test_a_missing_rank_is_named(exported, tmp_path):
    folder = _copy(exported[2][4], tmp_path)
    shutil.rmtree(folder / "rank1")
    with pytest.raises(ErnieqError, match=r"rank1: missing; the checkpoint is split for 4"):
        open_quantized(folder)


def test_a_wrong_shape_is_named_with_its_file(exported, tmp_path):
    folder = _copy(exported[2][2], tmp_path)
    name = "ernie.layers.0.self_attn.o_proj.weight_scale"
    shard = CheckpointReader(folder / "rank1", config={}).file_of(name)

    def trim(tensors):
        tensors[name] = tensors[name][:-2].clone()

    _rewrite(shard, trim)
    with pytest.raises(ErnieqError, match=rf"{shard}: tensor '{name}' is BF16 \[126\], expected .* \(rank 1 of 2\)"):
        open_quantized(folder)


def test_a_rank_missing_a_tensor_is_named(exported, tmp_path):
    folder = _copy(exported[2][2], tmp_path)
    name = "ernie.layers.2.mlp.experts.1.down_proj.code_zp"
    shard = CheckpointReader(folder / "rank0", config={}).file_of(name)
    _rewrite(shard, lambda tensors: tensors.pop(name))
    with pytest.raises(ErnieqError, match=rf"rank1: holds tensor '{name}', unlike rank0"):
        open_quantized(folder)


def test_a_config_that_disagrees_with_the_tensors_is_named(exported, tmp_path):
    folder = _copy(exported[2][1], tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["moe_quant_config"]["moe_w4_quant_config"]["quant_end_layer"] = 2
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ErnieqError, match=r"ernie\.layers\.2\.mlp\.experts\.0\.down_proj holds code_scale, code_zp, "
                                          r"quant_weight, super_scales, weight_scale; FastDeploy runs wint4 there"):
        open_quantized(folder)
    config["quantization_config"]["quantization"] = "wint4"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ErnieqError, match=r"quantization 'wint4'; ernieq reads FastDeploy's 'wint2'"):
        api.load(folder)


def test_a_missing_expert_is_named(exported, tmp_path):
    folder = _copy(exported[2][1], tmp_path)
    reader = CheckpointReader(folder)
    gone = [n for n in reader.keys() if n.startswith("ernie.layers.1.mlp.experts.3.down_proj.")]
    for shard in {reader.file_of(n) for n in gone}:
        _rewrite(shard, lambda tensors: [tensors.pop(n) for n in gone if n in tensors])
    (folder / "model.safetensors.index.json").unlink(missing_ok=True)
    with pytest.raises(ErnieqError, match=r"no tensors of ernie\.layers\.1\.mlp\.experts\.3\.down_proj"):
        open_quantized(folder)


def test_a_fastdeploy_folder_runs_through_the_triton_kernels(hand, monkeypatch):
    """ERNIEQ_KERNELS=triton (the interpreter on a CPU) on what the reader presents, against the reference path."""
    _, _, _, fd2 = hand
    model = load_quantized(fd2)
    ids = IDS[:1, :6]
    with torch.no_grad():
        monkeypatch.setenv("ERNIEQ_KERNELS", "reference")
        want = model(ids).logits
        monkeypatch.setenv("ERNIEQ_KERNELS", "triton")
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
