import pytest

from ernieq.errors import ErnieqError
from ernieq.formats import registry
from ernieq.formats.registry import export_checkpoint, format_names, get_format, register_format


@pytest.fixture
def formats(monkeypatch):
    """Register test formats without leaking them into the process-wide registry."""
    registry._load_builtin_formats()  # first: a module registers itself only on its first import
    monkeypatch.setattr(registry, "_FORMATS", dict(registry._FORMATS))
    return registry._FORMATS


def _native(tmp_path):
    native = tmp_path / "native"
    native.mkdir()
    (native / "config.json").write_text("{}")
    return native


def test_builtin_formats_are_registered():
    assert {"compressed-tensors", "hf-fp8"} <= set(format_names())
    assert format_names() == sorted(format_names())


def test_unknown_format_names_the_known_ones(tmp_path):
    with pytest.raises(ErnieqError, match=r"unknown export format 'gguf'; known: .*compressed-tensors.*hf-fp8"):
        export_checkpoint(_native(tmp_path), tmp_path / "out", "gguf")
    assert not (tmp_path / "out").exists()


def test_registering_a_name_twice_fails(formats):
    with pytest.raises(ValueError, match="registered twice"):
        register_format("compressed-tensors")(lambda native_dir, out: out)


def test_output_appears_only_when_the_export_succeeds(tmp_path, formats):
    seen = {}

    @register_format("test-ok")
    def ok(native_dir, out):
        seen["tmp"] = out
        assert out.is_dir() and not any(out.iterdir()) and out != tmp_path / "out"
        (out / "model.safetensors").write_bytes(b"x")
        return out

    @register_format("test-fails")
    def fails(native_dir, out):
        (out / "model.safetensors").write_bytes(b"half")
        raise ErnieqError("disk full")

    with pytest.raises(ErnieqError, match="disk full"):
        export_checkpoint(_native(tmp_path), tmp_path / "out", "test-fails")
    assert not (tmp_path / "out").exists()
    assert get_format("test-ok") is ok
    assert export_checkpoint(tmp_path / "native", tmp_path / "out", "test-ok") == tmp_path / "out"
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == b"x"
    assert not seen["tmp"].exists()
    assert not list(tmp_path.glob(".*ernieq-export-tmp"))


def test_existing_output_is_kept_unless_overwrite(tmp_path, formats):
    @register_format("test-ok")
    def ok(native_dir, out):
        (out / "new").write_text("new")
        return out

    native, out = _native(tmp_path), tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("old")
    with pytest.raises(ErnieqError, match="exists and is not empty"):
        export_checkpoint(native, out, "test-ok")
    assert (out / "old").exists()
    export_checkpoint(native, out, "test-ok", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["new"]
    with pytest.raises(ErnieqError, match="cannot replace the checkpoint it reads"):
        export_checkpoint(native, native, "test-ok", overwrite=True)
    with pytest.raises(ErnieqError, match="no such checkpoint folder"):
        export_checkpoint(tmp_path / "missing", tmp_path / "o2", "test-ok")


@pytest.mark.parametrize("fmt", ["compressed-tensors", "hf-fp8"])
def test_a_checkpoint_that_is_not_native_is_refused(tmp_path, fmt):
    native = _native(tmp_path)
    (native / "config.json").write_text('{"quantization_config": {"quant_method": "fp8"}}')
    (native / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(ErnieqError, match="not an ernieq checkpoint"):
        export_checkpoint(native, tmp_path / "out", fmt)
    assert not (tmp_path / "out").exists()
