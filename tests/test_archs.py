"""The architecture matrix: ernieq's generic path on tiny random models of every architecture in
``tests/archs.py`` (dense and MoE; MoE with fused [E, 2I, H], [E, H, 2I] and interleaved,
biased experts), each saved by ``save_pretrained`` as the hub holds it.

Per architecture: ``inspect`` accounts for every parameter; ``quantize --bits 4`` runs in ernieq's
runtime exactly as the transformers model with the decoded weights (the oracle) and evaluates;
``--bits 2`` (models with experts) stores ccq2 experts and evaluates; every AWQ fold set the
adapter derives keeps the function (random scales, no rounding); calibration feeds GPTQ and AWQ, and
sequential calibration runs a layer on its decoded weights; the compressed-tensors export
decompresses, by the compressed-tensors library, to ernieq's decode bit for bit, under the source
checkpoint's names. The hf-fp8 export loads in transformers (a few architectures at hidden 128).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer
from safetensors.torch import load_file, save_file

from ernieq import api
from ernieq.codecs import decode, get_codec
from ernieq.calibration.awq import fold_scale, group_folds
from ernieq.calibration.layerwise import LayerwiseModel
from ernieq.calibration.rounding import encode_weight
from ernieq.calibration.sequential import SequentialPlan, quantized_layer
from ernieq.device import Placement
from ernieq.errors import ErnieqError
from ernieq.formats.native import NativeReader
from ernieq.formats.registry import export_checkpoint
from ernieq.model.adapters import adapter_for, stream_groups
from ernieq.model.checkpoint import CheckpointReader
from ernieq.model.moe import linear_weights
from ernieq.model.tensor_info import TensorClass
from ernieq.publish.folder import SMOKE_TEXT
from ernieq.runtime.expert_loop import QuantExpertLoop
from ernieq.runtime.loader import load_quantized
from ernieq.runtime.modules import QuantMoEExperts
from ernieq.runtime.stream import StreamedLM, stream_plan
from tests.archs import ARCHS, write_tiny_arch

NAMES = sorted(ARCHS)
MOE = [a for a in NAMES if ARCHS[a].moe]
SEQ = 32
CALIB_TEXT = ("Calibration text is never the text a model is scored on. The river rises in the hills, turns west "
              "past the old mill and reaches the sea at a wide, shallow bay where ships once waited for the tide. "
              "Farmers grew wheat and barley on the slopes; the town kept a market every week. ") * 4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one thread is fastest, and on a shared 2-core machine far faster than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("texts")
    (root / "eval.txt").write_text(SMOKE_TEXT)
    (root / "calib.txt").write_text(CALIB_TEXT)
    return str(root / "eval.txt"), str(root / "calib.txt")


@pytest.fixture(scope="module", params=NAMES)
def arch(request, tmp_path_factory) -> tuple[str, Path]:
    root = tmp_path_factory.mktemp(request.param)
    return request.param, write_tiny_arch(request.param, root / "src")


def _ids() -> torch.Tensor:
    return torch.randint(3, 96, (1, 24), generator=torch.Generator().manual_seed(0))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(_ids()).logits


def _load_tensors(model, adapter, values: dict[str, torch.Tensor]) -> None:
    """Copy checkpoint (and canonical per-expert) tensors into ``model``; experts fused by their layout."""
    experts: dict[str, dict] = {}
    state = model.state_dict()
    for name, value in values.items():
        found = adapter.expert_of(name)
        if found is not None:
            experts.setdefault(found[0], {})[(found[1], found[2])] = value
        elif adapter.names.map(name).pattern is None:
            state[adapter.to_hf_name(name)].copy_(value)
    for container, weights in experts.items():
        layout = adapter.layouts[container]
        for p, t in layout.fuse(weights, layout.num_experts).items():
            state[f"{container}.{p}"].copy_(t)


def decoded_model(src: Path, native: Path):
    """The oracle: the transformers model of ``src`` holding every tensor of the native checkpoint, the
    quantized ones decoded (and turned back by their rotation)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    reader = NativeReader(native)
    values = {n: reader.plain(n).float() for n in reader.plain_names()}
    for base in reader.modules:
        w = decode(reader.quantized(base)).float()
        rotation = reader.rotation(base)
        values[f"{base}.weight"] = rotation.apply_t(w) if rotation is not None else w
    _load_tensors(model, adapter_for(reader.config), values)
    return model


def _perplexity(path: Path, eval_text: str) -> float:
    r = api.evaluate(path, eval_text, seq_len=SEQ, max_windows=1, progress=False)
    assert r.tokens == SEQ - 1
    return r.ppl


def test_inspect_accounts_for_every_parameter(arch):
    name, src = arch
    summary = api.inspect(src)
    assert summary.accounted("quantized", "kept") == summary.model_params, summary.accounting
    assert not [k for k in summary.accounting if k[0] in ("extra", "tied")]
    reasons = {reason for status, reason in summary.accounting if status == "kept"}
    assert {"embedding", "norm"} <= reasons
    assert any(status == "quantized" for status, _ in summary.accounting)
    adapter = adapter_for(json.loads((src / "config.json").read_text()))
    classes = {adapter.classify(n).cls for n in adapter.shapes}
    assert TensorClass.UNCLASSIFIED not in classes
    assert (TensorClass.ROUTED_EXPERT in classes) == ARCHS[name].moe


def test_readme_lists_every_architecture_of_the_matrix():
    """Issue 17's acceptance: the README names the architectures tested (by their transformers class)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    section = (Path(__file__).resolve().parents[1] / "README.md").read_text().split("## Architectures\n", 1)[1]
    section = section.split("\n## ", 1)[0]
    for name, spec in ARCHS.items():
        if name == "list_moe":
            assert "`tests/list_moe.py`" in section
        else:
            assert f"(`{MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[spec.model_type]}`) |" in section, name
    rows = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + len(ARCHS)  # the head and one row per architecture
    assert f"{len(ARCHS)} architectures, {len(ARCHS) - 1} of them transformers' own, {len(MOE)} with experts" in section


def test_inspect_counts_a_stored_copy_of_a_tied_weight_once(tmp_path):
    """Some hub checkpoints store lm_head beside the embedding it is tied to: a row of its own, counted once."""
    src = write_tiny_arch("gemma3", tmp_path / "src")  # tied: save_pretrained writes the embedding alone
    tensors = load_file(src / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, src / "model.safetensors")
    summary = api.inspect(src)
    assert summary.accounting["tied", "tied to model.embed_tokens.weight"].names == ["lm_head.weight"]
    assert summary.accounted("quantized", "kept") == summary.model_params


def test_bits4_runs_as_the_decoded_model_and_evaluates(arch, texts, tmp_path):
    name, src = arch
    done = api.quantize(src, tmp_path / "q4", bits=4, progress=False)  # wint4 g64, rotations on
    summary = api.inspect(tmp_path / "q4")  # the quantized checkpoint accounts for every parameter too
    assert summary.accounted("quantized", "kept") == summary.model_params, summary.accounting
    # and quantize listed, with a reason, every weight it did not quantize
    kept = sum(row["params"] for row in done.kept.values())
    assert kept + sum(c.quantized_weights for c in done.classes.values()) == summary.model_params
    model = load_quantized(tmp_path / "q4")
    adapter = adapter_for(NativeReader(tmp_path / "q4").config)
    plain = {adapter.classify(f"{n}.weight").cls for n, m in model.named_modules() if type(m) is torch.nn.Linear}
    assert plain <= {TensorClass.LM_HEAD, TensorClass.ROUTER}  # every other linear layer computes packed
    if adapter.layouts:
        kernel = all(layout.kernel_ok for layout in adapter.layouts.values())
        assert (QuantMoEExperts if kernel else QuantExpertLoop) in {type(m) for m in model.modules()}
    torch.testing.assert_close(_logits(model), _logits(decoded_model(src, tmp_path / "q4")), rtol=1e-4, atol=1e-4)
    assert math.isfinite(_perplexity(tmp_path / "q4", texts[0]))
    # streamed (one layer's packed modules at a time, QuantizedLayerwise): what the resident model computes
    streamed = _streamed(tmp_path / "q4", quantized=True)
    torch.testing.assert_close(streamed(_ids()), _logits(model), rtol=1e-5, atol=1e-5)
    assert streamed.generate(_ids()[:, :8], 4).tolist() == model.generate(_ids()[:, :8], max_new_tokens=4,
                                                                          do_sample=False).tolist()


def _streamed(path: Path, quantized: bool) -> StreamedLM:
    placement = Placement(torch.device("cpu"), torch.float32)
    return StreamedLM.open(path, placement, stream_plan(path, placement, True, quantized), quantized)


def test_streamed_model_computes_what_the_resident_one_does(arch):
    """One decoder layer resident at a time (MetaModel): every layer's arguments from the model's own forward
    (sliding windows, per-type rotary, a KV cache when generating), the final norm and head as the model has them."""
    from transformers import AutoModelForCausalLM

    _, src = arch
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ids = torch.cat([_ids(), _ids().flip(1)])  # [2, 24]: two windows in one batch
    streamed = _streamed(src, quantized=False)
    with torch.no_grad():
        torch.testing.assert_close(streamed(ids), ref(ids).logits, rtol=1e-5, atol=1e-5)
    prompt = ids[:1, :20]  # past gemma3's and gpt_oss's sliding window (16) while generating
    assert streamed.generate(prompt, 6).tolist() == ref.generate(prompt, max_new_tokens=6, do_sample=False).tolist()


@pytest.mark.parametrize("arch", MOE, indirect=True)
def test_bits2_stores_ccq2_experts_and_evaluates(arch, texts, tmp_path):
    _, src = arch
    planned = api.inspect(src, bits=2, w4_moe_layers=1)  # the plain checkpoint, accounted by the --bits 2 recipe
    assert planned.accounted("quantized", "kept") == planned.model_params, planned.accounting
    api.quantize(src, tmp_path / "q2", bits=2, w4_moe_layers=1, progress=False)
    codecs = {spec.codec for spec in NativeReader(tmp_path / "q2").modules.values()}
    assert codecs == {"wint8", "wint4", "ccq2"}
    summary = api.inspect(tmp_path / "q2")  # and the checkpoint it wrote: every parameter, quantized or kept
    assert summary.accounted("quantized", "kept") == summary.model_params, summary.accounting
    assert {r for s, r in summary.accounting if s == "quantized"} == codecs
    assert {k: v.params for k, v in summary.accounting.items()} == {k: v.params for k, v in planned.accounting.items()}
    torch.testing.assert_close(_logits(load_quantized(tmp_path / "q2")),
                               _logits(decoded_model(src, tmp_path / "q2")), rtol=1e-4, atol=1e-4)
    assert math.isfinite(_perplexity(tmp_path / "q2", texts[0]))


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss", "aria_text"], indirect=True)
def test_experts_the_recipe_keeps_go_back_into_the_modules_parameters(arch, tmp_path):
    """Routed experts kept by an override stay stored per expert; the loader copies them, one expert at a
    time, into the class's own fused parameters (per-expert pieces on the hub, interleaved with biases,
    K-major): resident and streamed, the model computes what the decoded one does."""
    _, src = arch
    q = tmp_path / "q4"
    api.quantize(src, q, bits=4, overrides=(r"\.experts\.=none",), progress=False)
    reader = NativeReader(q)
    adapter = adapter_for(reader.config)
    assert not [m for m in reader.modules if adapter.expert_of(f"{m}.weight")]
    assert any(adapter.expert_of(n) for n in reader.plain_names())
    model = load_quantized(q)
    assert not {QuantMoEExperts, QuantExpertLoop} & {type(m) for m in model.modules()}
    torch.testing.assert_close(_logits(model), _logits(decoded_model(src, q)), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(_streamed(q, quantized=True)(_ids()), _logits(model), rtol=1e-5, atol=1e-5)


def test_awq_folds_keep_the_function(arch):
    """Every fold set the adapter derives, each with a random scale: the model computes what it did."""
    from transformers import AutoModelForCausalLM

    _, src = arch
    reader = CheckpointReader(src)
    adapter = adapter_for(reader.config)
    gen = torch.Generator().manual_seed(0)
    tensors, folded = {}, 0
    for group, loaded in stream_groups(reader, adapter):
        named = {n: w.float() for n, _, w in linear_weights(group.tensors, loaded, adapter)}
        named.update({t.name: loaded[t.name].float() for t in group.tensors if not t.is_linear_weight})
        folds, _ = group_folds(adapter, group.layer, list(named)) if group.layer is not None else ([], [])
        for fold in folds:
            fold_scale(fold, named, torch.rand(named[fold.consumers[0]].shape[1], generator=gen) + 0.5)
        folded += len(folds)
        tensors.update(named)
    if adapter.untraced:  # AWQ is off for those layers, with the reason
        assert folded == sum(1 for layer in adapter.flows for _ in adapter.fold_sets(layer)[0])
    else:
        assert folded >= 2 * adapter.hf.num_hidden_layers  # at least the two norms of every layer
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    want = _logits(model)
    _load_tensors(model, adapter, tensors)
    torch.testing.assert_close(_logits(model), want, rtol=1e-4, atol=1e-5)


def test_calibration_feeds_gptq_and_awq(arch, texts, tmp_path):
    """GPTQ and AWQ from one calibration pass, each run by ernieq's runtime as the decoded model."""
    _, src = arch
    api.calibrate(src, texts[1], tokens=4 * SEQ, seq_len=SEQ, out=tmp_path / "calib", progress=False)
    for method in ("gptq", "awq"):
        q = tmp_path / method
        api.quantize(src, q, bits=4, calib=tmp_path / "calib", method=method, rotate=method == "gptq", progress=False)
        torch.testing.assert_close(_logits(load_quantized(q)), _logits(decoded_model(src, q)), rtol=1e-4, atol=1e-4)
        assert math.isfinite(_perplexity(q, texts[0]))


def test_sequential_calibration_runs_a_layer_on_its_decoded_weights(arch):
    """--sequential reloads each decoder layer with its weights quantized: whatever the layout, the layer
    computes with the decoded value of every linear layer and expert (read back through its layout)."""
    _, src = arch
    model = LayerwiseModel(src)
    adapter, i = model.adapter, model.num_layers - 1  # the last layer: a MoE layer where the model has experts
    wint4 = ("wint4", {"group_size": 32, "symmetric": True})
    layer = quantized_layer(model, i, lambda name: None, SequentialPlan(lambda name, info: (wint4, False), "rtn"))
    state = {f"{model.layer_prefix(i)}.{k}": v for k, v in layer.state_dict().items()}
    infos = model.layer_tensors(i).infos
    source = {t.name: model.reader.get(t.name) for t in infos if t.is_linear_weight}
    checked = 0
    for name, _, w in linear_weights(infos, source, adapter):
        want = decode(encode_weight(get_codec(wint4[0], **wint4[1]), w.float(), None, name, "rtn", None)).float()
        expert = adapter.expert_of(name)
        if expert is None:
            got = state[adapter.to_hf_name(name)]
        else:
            layout = adapter.layouts[expert[0]]
            fused = {p: state[f"{expert[0]}.{p}"] for p in layout.params}
            got = {(e, proj): t for e, proj, t in layout.weights(fused)}[expert[1:]]
        assert torch.equal(got, want), name
        checked += 1
    assert checked >= 4  # attention and MLP (or every expert's three)
    model.release_layer(i)


def test_compressed_tensors_round_trip(arch, tmp_path):
    _, src = arch
    native = tmp_path / "q"
    api.quantize(src, native, bits=4, rotate=False, progress=False)
    out = export_checkpoint(native, tmp_path / "ct", "compressed-tensors")
    stored = {}
    for shard in sorted(out.glob("*.safetensors")):
        stored.update(load_file(shard))
    weights = CompressedTensorsDequantizer(out, dtype=torch.float32).validate(stored)
    reader = NativeReader(native)
    adapter = adapter_for(reader.config)
    hub = {adapter.checkpoint_name(f"{m}.weight") or f"{m}.weight": m for m in reader.modules}  # or: fused on the hub
    assert set(weights) == set(hub) | set(reader.plain_names())
    source = CheckpointReader(src).keys()
    if not any(adapter.classify(n).fused for n in source):  # the experts are per expert on the hub: its names
        assert set(weights) == set(source)
    for name, module in hub.items():
        assert torch.equal(weights[name], decode(reader.quantized(module))), module


# every N and K a multiple of 128: transformers' fp8 format holds whole 128 x 128 blocks only
FP8_DIMS = {"hidden_size": 128, "intermediate_size": 128, "moe_intermediate_size": 128, "num_attention_heads": 4,
            "num_key_value_heads": 4, "head_dim": 32}


@pytest.mark.parametrize("name", ["llama", "mixtral", "qwen3_moe"])
def test_hf_fp8_export_loads_in_transformers_as_the_decoded_model(name, tmp_path):
    """transformers reads the export (dequantized, on the CPU) into the model ernieq decodes: every expert
    under the name the hub gives it (Mixtral's block_sparse_moe.experts.M.w1), none left at its init."""
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    src = write_tiny_arch(name, tmp_path / "src", **FP8_DIMS)
    api.quantize(src, tmp_path / "q", fp8=True, progress=False)
    out = export_checkpoint(tmp_path / "q", tmp_path / "hf", "hf-fp8")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                 quantization_config=FineGrainedFP8Config(dequantize=True)).eval()
    assert torch.equal(_logits(model), _logits(decoded_model(src, tmp_path / "q")))


def test_hf_fp8_refuses_experts_the_hub_holds_fused(tmp_path):
    src = write_tiny_arch("gpt_oss", tmp_path / "src", **FP8_DIMS)
    api.quantize(src, tmp_path / "q", fp8=True, progress=False)
    with pytest.raises(ErnieqError, match=r"experts\.0\.down_proj is a routed expert .* only inside a fused"):
        export_checkpoint(tmp_path / "q", tmp_path / "hf", "hf-fp8")


def test_fastdeploy_export_is_for_ernie_only(tmp_path):
    src = write_tiny_arch("qwen3_moe", tmp_path / "src")
    with pytest.raises(ErnieqError, match="fastdeploy"):
        api.quantize(src, tmp_path / "fd", bits=2, w4_moe_layers=1, format="fastdeploy", progress=False)
