"""ernieq publish / verify: the card carries report.json's numbers; verify names the file it rejects."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from ernieq import api
from ernieq.errors import ErnieqError
from ernieq.eval.report import read_report
from ernieq.publish.folder import SUMS_NAME, push_to_hub, write_sums
from ernieq.publish.verify import VerifyError, verify_files
from tests.eval.report_case import report_case


@pytest.fixture(scope="module")
def published(tmp_path_factory, demo_routed_dir, wikitext2_path):
    case = report_case(tmp_path_factory, demo_routed_dir, wikitext2_path)
    out = api.publish(case.q2, tmp_path_factory.mktemp("pub") / "demo-w2", report_dir=case.report)
    return case, out


@pytest.fixture
def copy(published, tmp_path):
    """A fresh copy of the published folder to damage."""
    return shutil.copytree(published[1], tmp_path / "copy")


def test_untouched_folder_verifies_with_a_smoke_test(published):
    _, out = published
    # the 4-layer test model is no language model (perplexity above its vocabulary): bound it loosely here
    r = api.verify(out, max_ppl=float("inf"), device="cpu")
    assert r.files == len((out / SUMS_NAME).read_text().splitlines())
    assert r.modules > 0 and r.tensors > r.modules
    assert r.smoke_tokens > 16 and r.smoke_ppl > 1.0
    assert r.runtime["device"] == "cpu" and r.runtime["kernels"].startswith("reference")
    with pytest.raises(VerifyError, match="smoke-test perplexity"):
        api.verify(out, max_ppl=1.0, device="cpu")


def test_card_numbers_equal_report_json(published):
    case, out = published
    card = (out / "README.md").read_text()
    report = read_report(out / "report")
    assert report == read_report(case.report)
    rows = [line.split("|")[1:-1] for line in card.splitlines() if line.startswith(f"| {case.text} |")]
    assert len(rows) == 3  # baseline, quantized, the --compare model
    (corpus,) = report["perplexity"]
    bits = {s["label"]: s["bits_per_weight"] for s in report["settings"]}
    for cells in rows:
        label, bpw, tokens, ppl, change, kl, top1 = (c.strip() for c in cells[1:])
        assert float(bpw) == pytest.approx(bits[label], abs=5e-4)
        assert int(tokens.replace(",", "")) == corpus["tokens"]
        assert float(ppl.replace(",", "")) == pytest.approx(corpus["ppl"][label], abs=5e-5)
        if label != "baseline":
            assert float(kl) == pytest.approx(corpus["kl_mean"][label], abs=5e-5)
            assert float(top1.rstrip(" %")) == pytest.approx(100 * corpus["top1_agreement"][label], abs=5e-3)
    task_rows = [[c.strip() for c in line.split("|")[1:-1]] for line in card.splitlines()
                 if line.startswith("| wikitext2_lastword |")]
    assert len(task_rows) == 2 * 3  # acc and perplexity of three models
    values = {(r["metric"], label): v for r in report["tasks"]["rows"] for label, v in r["value"].items()}
    for _, metric, label, examples, value, *_ in task_rows:
        assert float(value.replace(",", "")) == pytest.approx(values[metric, label], rel=1e-3, abs=5e-5)
        assert int(examples) == report["tasks"]["options"]["limit"]
    size = report["size"]["quantized"]
    assert f"{size['bits_per_weight_linear']:.3f} bits per weight over the linear layers" in card
    assert "license: apache-2.0" in card  # the demo's source package is Apache-2.0
    assert (out / "LICENSE").is_file() and (out / "tokenizer.json").is_file()
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "ernieq"


def _license_fields(folder):
    card = (folder / "README.md").read_text()
    front = [line for line in card.split("---")[1].splitlines() if line.startswith("license:")]
    return front, card.split("## License", 1)[1], (folder / "LICENSE").read_bytes()


def test_license_is_the_base_models_with_or_without_a_report(published, tmp_path):
    """The checkpoint records its base model, so a publish without --report finds the same license."""
    case, out = published
    qc = json.loads((case.q2 / "config.json").read_text())["quantization_config"]
    assert qc["base_model"] == str(case.baseline.resolve())
    bare = api.publish(case.q2, tmp_path / "bare")
    assert "No accuracy report was given" in (bare / "README.md").read_text()
    assert _license_fields(bare) == _license_fields(out)
    assert _license_fields(out)[0] == ["license: apache-2.0"]


def test_card_installs_as_the_readme_does_and_names_the_tested_runtimes(published, tmp_path):
    from tests.conftest import REPO

    case, out = published
    card = (out / "README.md").read_text()
    assert "pip install ernieq" not in card  # no package index has it
    for script in re.findall(r"^bash (\S+)", card, re.M):
        assert (REPO / script).is_file(), script
    assert "bash scripts/setup.sh" in (REPO / "README.md").read_text()
    runtimes = card.split("Runtimes that ernieq's tests load this checkpoint with:", 1)[1].split("##", 1)[0]
    assert "ernieq's runtime" in runtimes and "online input rotations" in card  # rotated: no export takes it
    assert "ernieq export" not in card
    assert [line for line in runtimes.splitlines() if line.startswith("- ")] == [runtimes.strip()]  # ernieq only
    q8_card = (api.publish(case.q8, tmp_path / "q8") / "README.md").read_text()
    assert "the compressed-tensors library" in q8_card and "FastDeploy's layout" not in q8_card


def test_flipped_byte_in_a_tensor_file_is_named(copy):
    shard = sorted(copy.glob("*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(VerifyError, match=f"{shard.name}: SHA-256 differs"):
        verify_files(copy)


def test_missing_file_is_named(copy):
    (copy / "tokenizer.json").unlink()
    with pytest.raises(VerifyError, match="tokenizer.json: listed in SHA256SUMS but missing"):
        verify_files(copy)


def test_unlisted_file_is_named(copy):
    (copy / "extra.bin").write_bytes(b"x")
    with pytest.raises(VerifyError, match="extra.bin: not listed"):
        verify_files(copy)


def test_config_shape_disagreeing_with_the_tensors_is_named(copy):
    config = json.loads((copy / "config.json").read_text())
    modules = config["quantization_config"]["modules"]
    base = next(b for b in modules if b.endswith("q_proj"))
    modules[base]["shape"][1] += 4
    (copy / "config.json").write_text(json.dumps(config))
    write_sums(copy)  # the sums agree: the shape check must catch it
    with pytest.raises(VerifyError, match=rf"safetensors: module {base}: .*do not match"):
        verify_files(copy)


def test_stored_tensor_disagreeing_with_the_config_is_named(copy):
    shard = sorted(copy.glob("*.safetensors"))[0]
    with safe_open(shard, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    name = next(k for k in tensors if k.endswith("norm.weight") or k.endswith("embed_tokens.weight"))
    tensors[name] = tensors[name][:-1].clone()
    save_file(tensors, shard, metadata=meta)
    write_sums(copy)
    with pytest.raises(VerifyError, match=rf"{shard.name}: tensor {name}: shape"):
        verify_files(copy)


def test_push_to_hub_offline_fails_with_a_clear_message(published, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("HF_TOKEN", "hf_test_token_not_real")
    with pytest.raises(ErnieqError, match="push to someone/demo-w2: the Hugging Face hub is unreachable"):
        push_to_hub(published[1], "someone/demo-w2")


def test_cli_verify_exit_codes(copy, monkeypatch, capsys):
    from ernieq.cli import main

    def run(*args):
        monkeypatch.setattr("sys.argv", ["ernieq", *map(str, args)])
        with pytest.raises(SystemExit) as exit_:
            main()
            raise SystemExit(0)
        return exit_.value.code or 0, capsys.readouterr()

    code, out = run("verify", copy, "--no-smoke")
    assert code == 0 and "ok" in out.out
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")
    code, out = run("verify", copy, "--no-smoke")
    assert code == 1 and "config.json: SHA-256 differs" in out.err
