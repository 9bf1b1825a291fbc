"""The demo's bytes do not depend on the machine: thread counts and CPU kernels leave them as they are.

ATEN_CPU_CAPABILITY picks torch's vectorised CPU kernels (their float32 sums round
differently), the closest thing to another machine here. A float32 build differed
in its experts under it; the float64 build must not differ in a single byte.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from ernieq.model.checkpoint import weights_sha256
from tests.conftest import DEMO_TEST_CALIB_TOKENS, DEMO_TEST_LAYERS, REPO

BUILD = """
import sys, torch
torch.set_num_threads(int(sys.argv[2]))
from ernieq.demo import build_demo_model
build_demo_model(sys.argv[1], variant="routed", num_layers={layers}, calib_tokens={tokens})
print(torch.get_num_threads(), torch.backends.cpu.get_cpu_capability())
""".format(layers=DEMO_TEST_LAYERS, tokens=DEMO_TEST_CALIB_TOKENS)


def test_reduced_demo_bytes_do_not_depend_on_threads_or_cpu_kernels(demo_routed_dir, tmp_path):
    want = weights_sha256(demo_routed_dir)  # built in this process: its own threads, the best kernels
    assert json.loads((demo_routed_dir / "demo_recipe.json").read_text())["weights_sha256"] == want
    for threads, kernels in ((1, "default"), (2, "avx2")):
        out = tmp_path / f"{threads}-{kernels}"
        env = {**os.environ, "ATEN_CPU_CAPABILITY": kernels, "PYTHONPATH": str(REPO)}
        run = subprocess.run([sys.executable, "-c", BUILD, str(out), str(threads)], env=env, capture_output=True,
                             text=True)
        assert run.returncode == 0, run.stderr[-2000:]
        assert weights_sha256(out) == want, (threads, kernels, run.stdout)
