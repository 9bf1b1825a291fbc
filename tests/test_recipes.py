"""Recipes as files: the shipped presets make today's checkpoints byte for byte, a user's recipe
round-trips through the checkpoint and ``ernieq inspect``, and a bad recipe is one line before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ernieq import api
from ernieq.config import ROTATED_CODECS, CodecChoice, QuantConfig, Rule
from ernieq.model.adapters import TensorClass
from ernieq.recipes import SPEC_KEY, load_recipe, shipped_names, shipped_text
from ernieq.recipes.schema import parse_recipe, parse_yaml
from tests.test_bad_input import assert_clean_failure
from tests.test_cli import run as run_cli
from tests.tiny import write_tiny_ernie

QUANTIZE = ("quantize", "--workers", "1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """Three layers: layer 0 dense, layers 1 and 2 MoE (per-expert layout)."""
    return write_tiny_ernie(tmp_path_factory.mktemp("tiny") / "m")


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _without_spec(config_bytes: bytes) -> dict:
    config = json.loads(config_bytes)
    config["quantization_config"].pop(SPEC_KEY)
    return config


def legacy_preset(bits: int, fp8: bool, group_size, symmetric: bool, w4_moe_layers, rotate: bool,
                  num_moe_layers: int) -> QuantConfig:
    """``ernieq.config.recipe`` as it was before recipe files (commit c2692aa), the rules written with
    today's fields: the oracle the shipped presets must reproduce."""
    clip = (("clip", True),) if rotate and symmetric else ()
    half = (("scale_dtype", "float16"),) if group_size else ()
    wint4 = CodecChoice("wint4", (("group_size", group_size), ("symmetric", symmetric)) + clip + half)
    wint4_per_channel = CodecChoice("wint4", (("group_size", None), ("symmetric", True)) + (("clip", True),) * rotate)
    if fp8:  # main's W8A8 default (commit 06451af)
        name, base = "fp8-w8a8", [Rule(CodecChoice("fp8", (("block_size", 128), ("activations", "dynamic"))))]
    elif bits == 8:
        name, base = "w8", [Rule(CodecChoice("wint8"))]
    elif bits == 4:
        name, base = f"w4g{group_size or 'channel'}{'' if symmetric else 'a'}", [Rule(wint4)]
    else:
        n4 = min(num_moe_layers, max(1, -(-4 * num_moe_layers // 51))) if w4_moe_layers is None else w4_moe_layers
        name = f"w2-w4x{n4}"
        base = [Rule(wint4_per_channel, classes=(TensorClass.ROUTED_EXPERT,), moe_layers=((0, n4 - 1),) if n4 else ()),
                Rule(CodecChoice("ccq2"), classes=(TensorClass.ROUTED_EXPERT,), moe_layers=((n4, None),)),
                Rule(CodecChoice("wint8"))]
    return QuantConfig(name, tuple(base), ROTATED_CODECS if rotate else ())


PRESETS = {
    "bits 2": dict(bits=2), "bits 2, one wint4 layer": dict(bits=2, w4_moe_layers=1),
    "bits 4": dict(bits=4), "bits 4 g32 asym": dict(bits=4, group_size=32, symmetric=False),
    "bits 4 channel": dict(bits=4, group_size=None), "bits 8": dict(bits=8), "fp8": dict(fp8=True),
}


@pytest.mark.parametrize("rotate", [True, False], ids=["rotated", "plain"])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets_make_todays_checkpoints_byte_for_byte(tiny, tmp_path, preset, rotate):
    kwargs = {**dict(bits=4, fp8=False, group_size=64, symmetric=True, w4_moe_layers=None), **PRESETS[preset]}
    oracle = legacy_preset(**kwargs, rotate=rotate, num_moe_layers=2)
    common = dict(rotate=rotate, workers=1, progress=False)
    api.quantize(tiny, tmp_path / "today", config=oracle, **common)
    api.quantize(tiny, tmp_path / "file", **kwargs, **common)
    today, now = _files(tmp_path / "today"), _files(tmp_path / "file")
    assert sorted(today) == sorted(now)
    for name in today:
        if name == "config.json":
            assert _without_spec(today[name]) == _without_spec(now[name])  # the recipe name included
        else:
            assert today[name] == now[name], name


def test_a_shipped_recipe_by_name_makes_what_its_preset_makes(tiny, tmp_path, monkeypatch, capsys):
    for how, out in ((("--bits", "8"), "bits"), (("--recipe", "w8"), "named")):
        code, _, err = run_cli(monkeypatch, capsys, *QUANTIZE, tiny, "--out", tmp_path / out, *how)
        assert code == 0, err
    bits, named = _files(tmp_path / "bits"), _files(tmp_path / "named")
    assert {k: v for k, v in bits.items() if k.endswith(".safetensors")} == \
           {k: v for k, v in named.items() if k.endswith(".safetensors")}


def test_every_shipped_recipe_reads_and_says_what_it_does(monkeypatch, capsys):
    assert {"w2", "w4", "w8", "fp8", "fastdeploy-300b"} <= set(shipped_names())
    for name in shipped_names():
        recipe = load_recipe(name, num_moe_layers=51)
        assert recipe.description and recipe.rules
    fd = load_recipe("fastdeploy-300b", num_moe_layers=51)
    assert fd.rotate is False and fd.rules[0].layers == ((0, 6),)
    assert [r.choice.codec for r in fd.rules] == ["wint4", "ccq2", "wint8"]
    code, out, _ = run_cli(monkeypatch, capsys, "recipes")
    assert code == 0 and all(name in out for name in shipped_names())
    code, out, _ = run_cli(monkeypatch, capsys, "recipes", "show", "fastdeploy-300b")
    assert code == 0 and out == shipped_text("fastdeploy-300b")


def test_the_fastdeploy_layout_on_a_deeper_model(tmp_path):
    model = write_tiny_ernie(tmp_path / "deep", num_hidden_layers=9)  # layer 0 dense, layers 1-8 MoE
    api.quantize(model, tmp_path / "q", recipe="fastdeploy-300b", workers=1, progress=False)
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    codecs = {(int(base.split(".")[2]), m["codec"]) for base, m in config["modules"].items() if ".experts." in base}
    assert codecs == {(layer, "wint4") for layer in range(1, 7)} | {(7, "ccq2"), (8, "ccq2")}
    assert not any(m.get("rotation") for m in config["modules"].values())  # rotate: false, for FastDeploy
    assert config["recipe"] == "fastdeploy-300b" and config[SPEC_KEY]["rotate"] is False


USER_RECIPE = """\
ernieq_recipe: 1
name: my-mix
description: attention and the dense MLP at 8 bits, the first MoE layer's experts at 4, the rest at 2
parameters:
  experts_group: 32
rotate: false
method: rtn
rules:
  - pattern: 'self_attn\\.o_proj'
    layers: 2
    codec: none                       # a per-layer exception: keep layer 2's o_proj
  - classes: [routed_experts]
    moe_layers: {first: 1}
    codec: wint4
    params: {group_size: $experts_group, symmetric: false}
  - classes: [routed_experts]
    codec: ccq2
  - classes: [attention, dense_mlp, shared_experts]
    codec: wint8
"""


def _inspect_recipe(monkeypatch, capsys, folder: Path) -> str:
    """The recipe ``ernieq inspect`` prints (everything after its header line)."""
    code, out, err = run_cli(monkeypatch, capsys, "inspect", folder)
    assert code == 0, err
    return out.split("makes this checkpoint again):\n", 1)[1]


def test_a_user_recipe_round_trips_through_the_checkpoint_and_inspect(tiny, tmp_path, monkeypatch, capsys):
    (tmp_path / "mine.yaml").write_text(USER_RECIPE)
    code, _, err = run_cli(monkeypatch, capsys, *QUANTIZE, tiny, "--out", tmp_path / "a", "--recipe",
                           tmp_path / "mine.yaml")
    assert code == 0, err
    qc = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]
    assert qc["recipe"] == "my-mix" and qc["method"] == "rtn"
    assert "model.layers.2.self_attn.o_proj" not in qc["modules"] and "model.layers.1.self_attn.o_proj" in qc["modules"]
    assert qc["modules"]["model.layers.1.mlp.experts.0.up_proj"]["params"]["group_size"] == 32
    assert qc["modules"]["model.layers.2.mlp.experts.0.up_proj"]["codec"] == "ccq2"
    printed = _inspect_recipe(monkeypatch, capsys, tmp_path / "a")
    assert yaml.safe_load(printed) == qc[SPEC_KEY]
    stored = parse_recipe(parse_yaml(printed, "printed"), "printed", num_moe_layers=2)
    original = parse_recipe(parse_yaml(USER_RECIPE, "mine"), "mine", num_moe_layers=2)
    assert stored.rules == original.rules and stored.name == original.name and stored.method == original.method
    (tmp_path / "printed.yaml").write_text(printed)
    code, _, err = run_cli(monkeypatch, capsys, *QUANTIZE, tiny, "--out", tmp_path / "b", "--recipe",
                           tmp_path / "printed.yaml")
    assert code == 0, err
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


def test_a_preset_checkpoint_records_its_recipe_for_the_report_and_inspect(tiny, tmp_path, monkeypatch, capsys):
    api.quantize(tiny, tmp_path / "q", bits=2, w4_moe_layers=1, workers=1, progress=False)
    spec = yaml.safe_load(_inspect_recipe(monkeypatch, capsys, tmp_path / "q"))
    assert spec["name"] == "w2-w4x1" and spec["rotate"] is True and spec["method"] == "rtn"
    assert [r["codec"] for r in spec["rules"]] == ["wint4", "ccq2", "wint8"]
    assert spec["rules"][0]["moe_layers"] == "0" and spec["rules"][0]["params"]["clip"] is True


# --- bad recipes: one line, before any work ----------------------------------------------------

BAD = {
    "an unknown top-level key": ("rules: [{codec: wint8}]\nrotations: true\n", ("rotations", "unknown key")),
    "an unknown rule key": ("rules: [{codec: wint8, layer: 3}]\n", ("rules[0].layer", "unknown key")),
    "an unknown codec": ("rules: [{codec: wint3}]\n", ("rules[0]", "wint3")),
    "a parameter the codec does not have": ("rules: [{codec: wint4, params: {groups: 64}}]\n", ("rules[0]", "groups")),
    "a group size the codec cannot take": ("rules: [{codec: wint4, params: {group_size: 48}}]\n",
                                           ("rules[0]", "group_size")),
    "a pattern that names no module": ("rules:\n  - {pattern: 'self_attn\\.qkv_proj', codec: wint4}\n"
                                       "  - {codec: wint8}\n", ("rules[0]", "matches no linear weight")),
    "a layer the model does not have": ("rules:\n  - {layers: 7-9, codec: wint4}\n  - {codec: wint8}\n",
                                        ("rules[0]", "matches no linear weight")),
    "a rule an earlier rule shadows": ("rules:\n  - {codec: wint8}\n  - {classes: [attention], codec: wint4}\n",
                                       ("rules[1]", "taken by an earlier rule")),
    "a bad regular expression": ("rules: [{pattern: '(', codec: wint8}]\n", ("rules[0].pattern",)),
    "a key given twice": ("rules: [{codec: wint8}]\nrules: [{codec: wint4}]\n", ("'rules' given twice",)),
    "a bad layer range": ("rules: [{layers: 5-2, codec: wint8}]\n", ("rules[0].layers", "ends before")),
    "a share in decoder layers": ("rules: [{layers: {first: 1/2}, codec: wint8}]\n", ("rules[0].layers",)),
    "a parameter nobody declared": ("rules: [{codec: wint4, params: {group_size: $g}}]\n", ("$g",)),
    "tuning settings without method tune": ("method: gptq\ntune: {steps: 5}\nrules: [{codec: wint8}]\n",
                                            ("tune", "applies to method: tune")),
    "an unknown tuning key": ("method: tune\ntune: {step: 5}\nrules: [{codec: wint8}]\n", ("tune.step", "unknown key")),
    "a bad tuning target": ("method: tune\ntune: {target: global}\nrules: [{codec: wint8}]\n", ("tune.target",)),
    "a negative step count": ("method: tune\ntune: {steps: -1}\nrules: [{codec: wint8}]\n", ("tune.steps",)),
    "a fractional model step count": ("method: tune\ntune: {model_steps: 2.5}\nrules: [{codec: wint8}]\n",
                                      ("tune.model_steps",)),
    "a negative model step size": ("method: tune\ntune: {model_lr: -0.1}\nrules: [{codec: wint8}]\n",
                                   ("tune.model_lr", "positive number")),
    "AWQ before GPTQ with round to nearest": ("method: rtn\nawq: true\nrules: [{codec: wint8}]\n",
                                              ("awq", "not with method rtn")),
    "AWQ not true or false": ("method: gptq\nawq: yes please\nrules: [{codec: wint8}]\n", ("awq", "true or false")),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_recipe_is_one_line_before_any_work(case, tiny, tmp_path, monkeypatch, capsys):
    body, needles = BAD[case]
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("ernieq_recipe: 1\nname: bad\n" + body)
    code, _, err = run_cli(monkeypatch, capsys, *QUANTIZE, tiny, "--out", tmp_path / "out", "--recipe", recipe)
    lines = [line for line in err.splitlines() if line.strip()]
    assert_clean_failure(code, lines, tmp_path / "out", str(recipe), *needles)


def test_other_bad_recipes_are_one_line(tiny, tmp_path, monkeypatch, capsys):
    cases = {
        "version.yaml": ("ernieq_recipe: 2\nname: x\nrules: [{codec: wint8}]\n", "ernieq_recipe"),
        "notyaml.yaml": ("rules: [\n", "not YAML"),
        "fastdeploy-300b": (None, "rules[1]"),  # on a 3-layer model every MoE layer is in 0-6: ccq2 decides nothing
        "no-such-recipe": (None, "not a file, nor a shipped recipe"),
    }
    for name, (text, needle) in cases.items():
        source = name
        if text is not None:
            source = tmp_path / name
            source.write_text(text)
        code, _, err = run_cli(monkeypatch, capsys, *QUANTIZE, tiny, "--out", tmp_path / "out", "--recipe", source)
        lines = [line for line in err.splitlines() if line.strip()]
        assert_clean_failure(code, lines, tmp_path / "out", needle)
    code, _, err = run_cli(monkeypatch, capsys, *QUANTIZE, tiny, "--out", tmp_path / "out", "--recipe", "w8",
                           "--bits", "2")
    assert code == 2 and "--bits" in err and "recipe" in err


def test_an_optional_rule_may_decide_nothing_and_overrides_are_held_to_the_same(tiny, tmp_path, monkeypatch,
                                                                                capsys):
    recipe = tmp_path / "ok.yaml"
    recipe.write_text("ernieq_recipe: 1\nname: ok\nrules:\n  - {pattern: 'qkv_proj', codec: wint4, optional: true}\n"
                      "  - {codec: wint8}\n")
    code, _, err = run_cli(monkeypatch, capsys, *QUANTIZE, tiny, "--out", tmp_path / "ok", "--recipe", recipe)
    assert code == 0, err
    code, _, err = run_cli(monkeypatch, capsys, *QUANTIZE, tiny, "--out", tmp_path / "out", "--bits", "8",
                           "--override", "qkv_proj=wint4")
    lines = [line for line in err.splitlines() if line.strip()]
    assert_clean_failure(code, lines, tmp_path / "out", "override 'qkv_proj=wint4'", "matches no linear weight")


def test_a_codec_that_cannot_take_a_weight_fails_before_any_work(tiny, tmp_path):
    config = QuantConfig("bad", (Rule(CodecChoice("wint4", (("group_size", 48),))),))  # built by hand: unchecked
    with pytest.raises(Exception, match="group_size") as err:
        api.quantize(tiny, tmp_path / "out", config=config, workers=1, progress=False)
    assert "safetensors" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_what_a_recipe_states_fills_what_the_command_leaves_open(tmp_path):
    from ernieq.config import QuantizeOptions
    from ernieq.recipes import configure

    recipe = tmp_path / "r.yaml"
    recipe.write_text("ernieq_recipe: 1\nname: r\nrotate: false\nmethod: gptq\n"
                      "calibration: {data: demo, tokens: 4096, sequential: true}\nrules: [{codec: wint8}]\n")
    config, o = configure(QuantizeOptions(recipe=str(recipe)), num_moe_layers=2, default_rotate=True)
    assert (o.rotate, o.method, o.calib_data, o.calib_tokens, o.calib_seq_len, o.sequential) == \
           (False, "gptq", "demo", 4096, 512, True)
    assert config.rotate == () and config.recipe == "r"
    given = QuantizeOptions(recipe=str(recipe), rotate=True, method="rtn", calib="stats/")
    config, o = configure(given, num_moe_layers=2)
    assert (o.rotate, o.method, o.calib_data, o.sequential) == (True, "rtn", None, False)  # the command wins
    assert config.recipe == "r-rot"


def test_a_recipe_states_its_tuning_and_the_command_wins_where_it_sets_one(tmp_path):
    from ernieq.config import QuantizeOptions
    from ernieq.recipes import configure

    recipe = tmp_path / "r.yaml"
    recipe.write_text("ernieq_recipe: 1\nname: r\nmethod: tune\ntune: {steps: 7, lr: 0.1, rounding: true, seed: 3, "
                      "target: model, model_steps: 0, model_lr: 0.01}\ncalibration: {data: demo}\nrules: [{codec: wint8}]\n")
    _, o = configure(QuantizeOptions(recipe=str(recipe)), num_moe_layers=2)
    assert (o.method, o.tune_steps, o.tune_lr, o.tune_rounding, o.tune_seed, o.tune_target, o.tune_model_steps,
            o.tune_model_lr) == ("tune", 7, 0.1, True, 3, "model", 0, 0.01)
    _, o = configure(QuantizeOptions(recipe=str(recipe), tune_steps=40, tune_seed=5), num_moe_layers=2)
    assert (o.tune_steps, o.tune_seed, o.tune_target) == (40, 5, "model")
    _, o = configure(QuantizeOptions(recipe=str(recipe), method="gptq"), num_moe_layers=2)
    assert (o.method, o.tune_steps) == ("gptq", 20)  # another method: the recipe's tuning does not apply


def test_a_tuned_checkpoint_records_its_tuning_and_its_recipe_makes_it_again(tmp_path, monkeypatch, capsys):
    """The recipe a ``--method tune --awq`` checkpoint stores (what its model card says makes it again) states the
    tuning settings, reads back as a recipe, and makes the same bytes."""
    from tests.tiny import write_char_tokenizer, write_tiny_ernie

    model = write_tiny_ernie(tmp_path / "m")
    write_char_tokenizer(model)
    text = tmp_path / "calib.txt"
    text.write_text("Calibration text about rivers, mountains, cities and the people who live there. " * 20)
    code, _, err = run_cli(monkeypatch, capsys, *QUANTIZE, model, "--out", tmp_path / "a", "--bits", "4",
                           "--method", "tune", "--calib-data", text, "--calib-tokens", "128", "--calib-seq-len", "32",
                           "--tune-steps", "3", "--tune-seed", "2", "--tune-target", "model", "--tune-model-steps", "4",
                           "--tune-model-lr", "0.05", "--awq")
    assert code == 0, err
    printed = _inspect_recipe(monkeypatch, capsys, tmp_path / "a")
    spec = yaml.safe_load(printed)
    assert spec["method"] == "tune" and spec["awq"] is True
    assert spec["tune"] == {"steps": 3, "lr": None, "rounding": False, "seed": 2, "target": "model", "model_steps": 4,
                            "model_lr": 0.05}
    (tmp_path / "printed.yaml").write_text(printed)
    code, _, err = run_cli(monkeypatch, capsys, *QUANTIZE, model, "--out", tmp_path / "b", "--recipe",
                           tmp_path / "printed.yaml")
    assert code == 0, err
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
