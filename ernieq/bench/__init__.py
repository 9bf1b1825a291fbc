"""Benchmarks that ship with ernieq: ``ernieq bench --kernels`` (per-kernel timings, ``kernels.py``) and
``ernieq bench MODEL`` (whole-model throughput, ``model.py``).

Above the runtime in the floors (docs/ARCHITECTURE.md): a benchmark may import kernels,
runtime and eval; nothing below imports a benchmark.
"""
