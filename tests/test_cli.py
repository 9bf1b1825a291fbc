import json
import os
import sys

import pytest
import torch

from ernieq.cli import main
from ernieq.model.checkpoint import CheckpointWriter
from tests.tiny import write_tiny_ernie


def run(monkeypatch, capsys, *args):
    """Run the console entry point; returns (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["ernieq", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as exit_:
        code = exit_.code or 0
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_ernie(tmp_path_factory.mktemp("tiny") / "m")


def test_inspect_lists_dense_and_moe_layers(tiny, monkeypatch, capsys):
    code, out, _ = run(monkeypatch, capsys, "inspect", tiny)
    assert code == 0
    assert "1 dense and 2 MoE layers" in out
    assert "4 +shared" in out
    # every parameter in one row, those the --bits 4 recipe keeps with the reason, adding up to the model's
    assert "where every parameter goes" in out and "= the model's parameters" in out
    assert "router or gate (selects experts; never quantized)" in out


def test_quantize_then_inspect(tiny, tmp_path, monkeypatch, capsys):
    code, out, err = run(monkeypatch, capsys, "quantize", tiny, "--out", tmp_path / "q", "--bits", "8")
    assert code == 0, err
    assert "bits per weight" in out
    assert "left as they are, and why" in out and "model.embed_tokens.weight" in out
    assert (tmp_path / "q" / "config.json").exists()


def _broken_checkpoints(root):
    cases = {}
    d = root / "no_config"
    d.mkdir()
    with CheckpointWriter(d) as w:
        w.add("x", torch.zeros(4))
    cases["no_config"] = (d, "config.json")
    d = root / "truncated"
    write_tiny_ernie(d)
    shard = sorted(d.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])
    cases["truncated"] = (d, shard.name)
    d = root / "unknown_arch"
    write_tiny_ernie(d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(architectures=["NoSuchModelForCausalLM"], model_type="no_such_model")
    (d / "config.json").write_text(json.dumps(cfg))
    cases["unknown_arch"] = (d, "unknown architecture")
    return cases


@pytest.mark.parametrize("case", ["no_config", "truncated", "unknown_arch"])
@pytest.mark.parametrize("command", ["inspect", "quantize"])
def test_bad_input_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys, case, command):
    path, needle = _broken_checkpoints(tmp_path)[case]
    extra = ["--out", tmp_path / "out"] if command == "quantize" else []
    code, _, err = run(monkeypatch, capsys, command, path, *extra)
    assert code == 1
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert needle in lines[0]
    assert not (tmp_path / "out").exists()


def test_help_explains_every_command(monkeypatch, capsys):
    code, out, _ = run(monkeypatch, capsys, "--help")
    assert code == 0
    for command in ("demo-model", "inspect", "eval", "quantize", "generate"):
        assert command in out


def test_inspect_reports_bits_per_weight_of_a_quantized_checkpoint(tiny, tmp_path, monkeypatch, capsys):
    from ernieq import api

    api.quantize(tiny, tmp_path / "q", bits=8, progress=False)
    summary = api.inspect(tmp_path / "q")
    # wint8: one int8 per weight plus a float32 scale per output channel (N = 32 for routed gate/up, 64 for down)
    n_weights = summary.params_by_class["routed_experts"]
    scale_bytes = 4 * (2 * (4 * 32 + 4 * 32) + 2 * 4 * 64)
    assert summary.bytes_by_class["routed_experts"] == n_weights + scale_bytes
    code, out, _ = run(monkeypatch, capsys, "inspect", tmp_path / "q")
    assert code == 0 and "wint8" in out and "bits/weight" in out


def test_quantize_straight_to_compressed_tensors(tiny, tmp_path, monkeypatch, capsys):
    out = tmp_path / "ct"
    code, _, err = run(monkeypatch, capsys, "quantize", tiny, "--out", out, "--bits", "4", "--group-size", "32",
                       "--format", "compressed-tensors")
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "compressed-tensors"
    assert not list(tmp_path.glob(".*"))  # the intermediate native checkpoint is gone


def test_inspect_reports_ccq2_storage_per_codec(tmp_path):
    from ernieq import api

    src = write_tiny_ernie(tmp_path / "m", hidden_size=128, moe_intermediate_size=128, intermediate_size=256)
    api.quantize(src, tmp_path / "q", bits=2, w4_moe_layers=1, progress=False)
    summary = api.inspect(tmp_path / "q")
    # ccq2 experts of the last MoE layer: gate/up [128, 128] and down [128, 128], E = 4
    n_weights = summary.params_by_codec["ccq2"]
    assert n_weights == 4 * 3 * 128 * 128
    per_channel = summary.bytes_by_codec["ccq2"] - n_weights * 2.0625 / 8
    assert 0 < per_channel <= 10 * 4 * 3 * 128  # at most 10 bytes per output channel


def test_piped_tables_are_never_cut(tiny, tmp_path, monkeypatch, capsys):
    """Output that is not a terminal gets every table at full width: no cell ends in an ellipsis."""
    code, out, err = run(monkeypatch, capsys, "quantize", tiny, "--out", tmp_path / "q", "--bits", "2",
                         "--w4-moe-layers", "1")
    assert code == 0, err
    code, out2, _ = run(monkeypatch, capsys, "inspect", tmp_path / "q")
    assert code == 0
    for text in (out, out2):
        assert "…" not in text
        assert "routed_experts" in text


@pytest.mark.parametrize("flags, activations", [((), "dynamic"), (("--fp8-activations", "none"), "none")])
def test_quantize_fp8_records_how_activations_are_computed(tiny, tmp_path, monkeypatch, capsys, flags, activations):
    code, _, err = run(monkeypatch, capsys, "quantize", tiny, "--out", tmp_path / "q", "--fp8", *flags)
    assert code == 0, err
    modules = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["modules"]
    assert {m["params"]["activations"] for m in modules.values()} == {activations}


def _device_cases(tiny, tmp):
    """Every command that computes, with arguments that would otherwise start its work."""
    (tmp / "dir").mkdir(exist_ok=True)
    return {
        "calibrate": ["calibrate", tiny, "--data", "demo", "--out", tmp / "calib"],
        "quantize": ["quantize", tiny, "--out", tmp / "q"],
        "eval": ["eval", tiny, "--data", "demo"],
        "report": ["report", tmp / "dir", "--baseline", tiny, "--data", "demo", "--out", tmp / "report"],
        "generate": ["generate", tiny, "--prompt", "hi"],
        "verify": ["verify", tmp / "dir"],
        "bench": ["bench", tiny, "--baseline", tiny],
        "bench --kernels": ["bench", "--kernels", "--quick"],
    }


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
@pytest.mark.parametrize("command", ["calibrate", "quantize", "eval", "report", "generate", "verify", "bench",
                                     "bench --kernels"])
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_cuda_is_one_line_for_every_command(tiny, tmp_path, monkeypatch, capsys, command, device):
    args = _device_cases(tiny, tmp_path)[command]
    code, out, err = run(monkeypatch, capsys, *args, "--device", device)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1, err
    assert lines[0].startswith(f"error: --device {device}: no CUDA GPU on this machine"), lines[0]
    assert not (tmp_path / "q").exists() and not (tmp_path / "calib").exists() and not (tmp_path / "report").exists()


@pytest.mark.parametrize("command", ["calibrate", "quantize", "eval", "report", "generate", "verify", "bench"])
def test_every_command_takes_device_and_dtype(monkeypatch, capsys, command):
    code, out, _ = run(monkeypatch, capsys, command, "--help")
    assert code == 0
    assert "--device" in out and "auto|cpu|cuda|cuda:N" in out and "--dtype" in out
    assert ("--decode-cache" in out) == (command in ("eval", "report", "generate", "verify", "bench"))
    assert ("--stream / --no-stream" in out) == (command in ("eval", "report", "generate", "verify", "bench"))


@pytest.mark.parametrize("option, value, message", [("--dtype", "int8", "'int8' is not one of"),
                                                     ("--device", "tpu", "--device tpu: expected one of"),
                                                     ("--decode-cache", "lots", "--decode-cache lots: expected")])
def test_bad_placement_options_are_one_line(tiny, monkeypatch, capsys, option, value, message):
    code, _, err = run(monkeypatch, capsys, "eval", tiny, "--data", "demo", option, value)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and message in lines[0], err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_api_functions_refuse_cuda_without_cuda_before_any_work(tiny, tmp_path):
    from ernieq import api
    from ernieq.device import DeviceError

    calls = [lambda: api.quantize(tiny, tmp_path / "q", device="cuda", progress=False),
             lambda: api.calibrate(tiny, "demo", out=tmp_path / "calib", device="cuda", progress=False),
             lambda: api.evaluate(tiny, "demo", device="cuda:0"),
             lambda: api.generate(tiny, "hi", device="cuda"),
             lambda: api.load(tiny, device="cuda"),
             lambda: api.bench(device="cuda", quick=True),
             lambda: api.bench_model(tiny, tiny, device="cuda")]
    for call in calls:
        with pytest.raises(DeviceError, match="no CUDA GPU on this machine"):
            call()
    assert not list(tmp_path.iterdir())


def test_demo_model_prints_the_weights_hash(tmp_path, monkeypatch, capsys):
    import ernieq.demo
    from ernieq.model.checkpoint import weights_sha256

    monkeypatch.setattr(ernieq.demo, "build_demo_model", lambda out, variant, **options: write_tiny_ernie(out))
    code, out, err = run(monkeypatch, capsys, "demo-model", "--out", tmp_path / "demo")
    assert code == 0, err
    assert f"weights sha256 {weights_sha256(tmp_path / 'demo')}" in out.replace("\n", " ")


def test_log_lines_into_a_pipe_are_plain(tiny, tmp_path):
    """Off a terminal a log line is one line as long as its message, not padded to a full-width console."""
    import shutil
    import subprocess

    from tests.conftest import REPO

    shutil.copytree(tiny, tmp_path / "demo")  # `demo` then names this folder, and the log says so
    proc = subprocess.run([sys.executable, "-c", "from ernieq.cli import main; main()", "inspect", "demo"],
                          cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    line = next(line for line in proc.stderr.splitlines() if "using the local folder" in line)
    assert " INFO demo: using the local folder " in line and line == line.rstrip() and len(line) < 300
