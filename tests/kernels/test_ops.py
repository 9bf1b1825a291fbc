"""Backend dispatch, the torch.library custom ops (fake impls, torch.compile) and TRITON_INTERPRET handling."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ernieq import kernels
from ernieq.kernels import KernelError, reference
from ernieq.kernels.ops import from_op_args, resolve_backend, to_op_args
from ernieq.transforms import make_rotation
from tests.kernels.cases import (
    CCQ2_FAST,
    DEVICE,
    MOE_TOLERANCES,
    TOLERANCES,
    assert_close,
    encode,
    encode_stack,
    seeded,
)
from tests.kernels.test_moe_align import random_ids

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # interpreter sigmoid

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_backend_env(monkeypatch):
    monkeypatch.delenv("ERNIEQ_KERNELS", raising=False)


def small_moe(gen, dtype=torch.float32):
    """T=5 tokens, E=4 experts, top-2, H=64, I=32: gate/up wint4, down wint8."""
    gate = encode_stack("wint4", {"group_size": 32, "symmetric": False}, 4, 32, 64, gen)
    up = encode_stack("wint4", {"group_size": 32, "symmetric": False}, 4, 32, 64, gen)
    down = encode_stack("wint8", {}, 4, 64, 32, gen)
    x = torch.randn(5, 64, generator=gen).to(DEVICE, dtype)
    ids, w = random_ids(5, 2, 4, gen).to(DEVICE), torch.rand(5, 2, generator=gen).to(DEVICE)
    return x, ids, w, kernels.MoEWeights(gate, up, down)


def test_resolve_backend(no_backend_env, monkeypatch):
    assert resolve_backend(torch.device("cuda")) == "triton"  # what `ernieq eval` gets on a GPU
    assert resolve_backend(torch.device("cpu")) == "reference"
    assert resolve_backend(torch.device("cpu"), "triton") == "triton"
    monkeypatch.setenv("ERNIEQ_KERNELS", "reference")
    assert resolve_backend(torch.device("cuda")) == "reference"
    assert resolve_backend(torch.device("cuda"), "triton") == "triton"  # the argument wins
    monkeypatch.setenv("ERNIEQ_KERNELS", "cutlass")
    with pytest.raises(KernelError, match="ERNIEQ_KERNELS.*cutlass"):
        resolve_backend(torch.device("cpu"))
    with pytest.raises(KernelError, match="backend argument"):
        resolve_backend(torch.device("cpu"), "marlin")


def test_op_args_round_trip():
    q = encode("fp8", {"block_size": 128}, 16, 200, seeded("roundtrip"))
    back = from_op_args(*to_op_args(q))
    assert (back.codec, back.shape, back.params) == (q.codec, q.shape, q.params)
    assert back.tensors.keys() == q.tensors.keys()
    assert all(torch.equal(back.tensors[k].view(torch.uint8), q.tensors[k].view(torch.uint8)) for k in q.tensors)
    assert json.loads(to_op_args(q)[1]) == {"codec": "fp8", "params": [["activations", "dynamic"], ["block_size", 128]],
                                            "shape": [16, 200], "names": ["qweight", "scale"]}  # fmt: skip
    assert to_op_args(q)[1] is to_op_args(q.to(DEVICE))[1]  # built once per layout, not per call


def test_linear_dispatch(no_backend_env, monkeypatch):
    gen = seeded("dispatch")
    q = encode("ccq2", CCQ2_FAST, 24, 128, gen)
    x = torch.randn(3, 128, generator=gen).to(DEVICE, torch.bfloat16)
    bias = torch.randn(24, generator=gen).to(DEVICE)
    ref = reference.linear(x, q, bias)
    assert torch.equal(kernels.linear(x, q, bias, backend="reference"), ref)
    assert_close(kernels.linear(x, q, bias, backend="triton"), ref, TOLERANCES[torch.bfloat16])
    monkeypatch.setenv("ERNIEQ_KERNELS", "triton")
    from ernieq.kernels.dequant_gemm import linear as triton_linear

    assert torch.equal(kernels.linear(x, q, bias), triton_linear(x, q, bias))


def test_moe_dispatch(no_backend_env):
    args = small_moe(seeded("moe-dispatch"))
    ref = reference.moe(*args)
    assert torch.equal(kernels.moe(*args, backend="reference"), ref)
    assert_close(kernels.moe(*args, backend="triton"), ref, MOE_TOLERANCES[torch.float32])


def test_opcheck_linear_and_moe():
    """Schema, fake (meta) implementation and dispatch of ernieq::linear and ernieq::moe."""
    gen = seeded("opcheck")
    q = encode("wint4", {"group_size": 32, "symmetric": True}, 16, 64, gen)
    x = torch.randn(2, 64, generator=gen).to(DEVICE)
    for bias in (None, torch.randn(16, generator=gen).to(DEVICE)):
        torch.library.opcheck(torch.ops.ernieq.linear, (x, *to_op_args(q), bias))
    x, ids, w, experts = small_moe(gen)
    weights = [a for q in experts.projections for a in to_op_args(q)]
    torch.library.opcheck(torch.ops.ernieq.moe, (x, ids, w, *weights, []))
    rotation = make_rotation(experts.gate.shape[1])  # I inputs of down
    torch.library.opcheck(torch.ops.ernieq.moe, (x, ids, w, *weights, [rotation.signs, rotation.q]))


def test_torch_compile_traces_the_ops(no_backend_env, monkeypatch):
    """fullgraph: the ops are single graph nodes, the weight spec a constant, the backend read from
    the argument or $ERNIEQ_KERNELS while tracing; same numbers as eager."""
    monkeypatch.setenv("ERNIEQ_KERNELS", "triton")
    gen = seeded("compile")
    q = encode("fp8", {"block_size": None}, 48, 64, gen)  # N=48, K=64
    x, ids, w, experts = small_moe(gen)

    def block(x):
        h = kernels.moe(x, ids, w, experts, backend="triton")  # [T, H=64]
        return kernels.linear(torch.relu(h), q)  # [T, 48], triton by $ERNIEQ_KERNELS

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), block(x))


CHILD = """
import os, sys
import torch
{pre}
from ernieq import kernels
from ernieq.codecs import get_codec
q = get_codec("wint8").encode(torch.randn(8, 32))
x = torch.randn(2, 32)
try:
    y = kernels.linear(x, q)
except kernels.KernelError as e:
    print("KernelError:", e)
    sys.exit(3)
torch.testing.assert_close(y, kernels.linear(x, q, backend="reference"), rtol=1e-4, atol=1e-4)
print("TRITON_INTERPRET=" + os.environ.get("TRITON_INTERPRET", ""))
"""


def _child(pre: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["ERNIEQ_KERNELS"] = "triton"
    code = textwrap.dedent(CHILD.format(pre=pre))
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(DEVICE.type == "cuda", reason="CPU-only behaviour")
def test_forcing_triton_on_cpu_turns_on_the_interpreter():
    run = _child("")
    assert run.returncode == 0, run.stderr
    assert "TRITON_INTERPRET=1" in run.stdout


@pytest.mark.skipif(DEVICE.type == "cuda", reason="CPU-only behaviour")
def test_forcing_triton_on_cpu_after_triton_was_imported():
    """torch.compile and transformers import triton early: the kernels still interpret."""
    run = _child("import triton")
    assert run.returncode == 0, run.stderr
    assert "TRITON_INTERPRET=1" in run.stdout


@pytest.mark.skipif(DEVICE.type == "cuda", reason="CPU-only behaviour")
def test_forcing_triton_on_cpu_after_compiled_kernels_fails_clearly():
    run = _child("import ernieq.kernels.dequant_gemm")
    assert run.returncode == 3, run.stderr
    assert "TRITON_INTERPRET=1" in run.stdout and "defined without it" in run.stdout
