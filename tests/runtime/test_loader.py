import pytest
import torch

from ernieq import api
from ernieq.runtime.loader import load_quantized
from ernieq.runtime.modules import QuantLinear, QuantMoEExperts
from tests.tiny import write_tiny_ernie


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    root = tmp_path_factory.mktemp("rt")
    src = write_tiny_ernie(root / "src")
    api.quantize(src, root / "q", bits=4, group_size=32, progress=False)
    return root / "q"


def test_loaded_model_keeps_packed_modules(quantized):
    model = load_quantized(quantized)
    kinds = {type(m) for m in model.modules()}
    assert QuantLinear in kinds and QuantMoEExperts in kinds
    plain = [name for name, m in model.named_modules() if type(m) is torch.nn.Linear]
    assert plain == ["lm_head"]  # every decoder linear layer computes from packed weights


def test_whole_model_through_the_triton_kernels_matches_the_reference(quantized, monkeypatch):
    """ERNIEQ_KERNELS=triton runs every layer through the Triton kernels (the interpreter on a CPU)."""
    model = load_quantized(quantized)
    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        monkeypatch.setenv("ERNIEQ_KERNELS", "reference")
        want = model(ids).logits
        monkeypatch.setenv("ERNIEQ_KERNELS", "triton")
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
