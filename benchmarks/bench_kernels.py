"""GPU benchmark of ernieq's Triton kernels: correctness against the reference, then speed.

    python benchmarks/bench_kernels.py --out benchmarks/results/kernels_<gpu>.md [--quick] [--budget-s 420]
    python benchmarks/bench_kernels.py --out ... --sweep [--save-configs]   # also try tile configs per case
    TRITON_INTERPRET=1 python benchmarks/bench_kernels.py --out /tmp/b.md --dry-run   # the flow on the CPU

A thin wrapper: the benchmark lives in ``ernieq.bench.kernels`` (what it measures
and how is described there) so the installed ``ernieq bench`` command runs the same
code. Without CUDA this script exits with status 2; ``ernieq bench`` instead runs
the reference path on the CPU, labelled as such.
"""

from __future__ import annotations

import sys

from ernieq.bench.kernels import main
from ernieq.bench.inputs import CODECS, MODELS, route, synthetic

__all__ = ["CODECS", "MODELS", "main", "route", "synthetic"]

if __name__ == "__main__":
    sys.exit(main())
