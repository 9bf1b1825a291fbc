"""ernieq.device: --device and --dtype resolution, one-line errors, and what result files record."""

from __future__ import annotations

import pytest
import torch

from ernieq.device import HOST, DeviceError, Placement, available_memory, describe, resolve_device, resolve_dtype

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors of a machine without CUDA")


@pytest.fixture
def two_gpus(monkeypatch):
    """A pretend machine with CUDA devices 0 and 1 (only resolution is exercised, nothing runs there)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)


@pytest.mark.parametrize("spec", ["cpu", "CPU", " cpu ", HOST])
def test_cpu_is_the_host(spec):
    assert resolve_device(spec) == HOST


@no_cuda
def test_auto_is_the_cpu_without_cuda():
    assert resolve_device("auto") == HOST


@no_cuda
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda_is_one_line_naming_the_option(spec):
    with pytest.raises(DeviceError, match=rf"^--device {spec}: no CUDA GPU on this machine") as err:
        resolve_device(spec)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "cuda:-1", "mps:0", ""])
def test_unknown_device_names_the_choices(spec):
    with pytest.raises(DeviceError, match="expected one of auto, cpu, cuda, cuda:N"):
        resolve_device(spec)


def test_cuda_resolves_to_an_index_that_exists(two_gpus):
    assert resolve_device("auto") == torch.device("cuda", 1)  # the current device
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(DeviceError, match=r"^--device cuda:2: there is no CUDA device 2 \(2 visible: 0..1\)$"):
        resolve_device("cuda:2")


def test_dtype_auto_is_bfloat16_on_a_gpu_and_float32_on_the_cpu(monkeypatch):
    gpu = torch.device("cuda", 0)
    assert resolve_dtype("auto", HOST) is torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", gpu) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", gpu) is torch.float16


@pytest.mark.parametrize("spec, dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16),
                                         ("FLOAT32", torch.float32), (torch.float16, torch.float16)])
def test_named_dtypes_hold_on_any_device(spec, dtype):
    assert resolve_dtype(spec, HOST) is dtype
    assert resolve_dtype(spec, torch.device("cuda", 0)) is dtype


@pytest.mark.parametrize("spec", ["int8", "fp32", torch.int8, torch.float64])
def test_unknown_dtype_names_the_choices(spec):
    with pytest.raises(DeviceError, match="expected one of auto, bfloat16, float16, float32"):
        resolve_dtype(spec, HOST)


def test_placement_records_device_dtype_and_kernel_path():
    p = Placement.resolve("cpu", "bfloat16")
    assert p == Placement(HOST, torch.bfloat16)
    record = p.record("reference")
    assert record["device"] == "cpu" and record["dtype"] == "bfloat16" and record["kernels"] == "reference"
    assert record["device_name"]
    assert describe(record) == f"cpu ({record['device_name']}), bfloat16, kernels: reference"


def test_host_memory_is_measured():
    assert 0 < available_memory(HOST) < 2**50
