"""Kernel tests: on the GPU when there is one, else the same Triton kernels under the interpreter.

Triton decides interpreted or compiled when a kernel is defined, i.e. when
``ernieq.kernels.dequant_gemm`` is first imported, so TRITON_INTERPRET is set
here, at conftest import, before the test modules import the kernels, and only
when there is no GPU: on a GPU machine the kernels compile. Tests elsewhere
that run Triton later in the same process see the interpreter only on CPU-only
machines, where compiled Triton cannot run anyway.
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    if "ernieq.kernels.dequant_gemm" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "tests/kernels: ernieq's Triton kernels were imported before TRITON_INTERPRET=1 could be set; "
            "export TRITON_INTERPRET=1 to run the kernel tests on the CPU"
        )
    os.environ.setdefault("TRITON_INTERPRET", "1")
