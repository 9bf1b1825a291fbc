#!/usr/bin/env bash
# One GPU check (benchmarks/gpu_check.py says what it runs): the kernel tests on CUDA; the demo at
# --bits 8/4/2 and --fp8 through the Triton kernels against the reference path (perplexity within
# 0.5 %); the kernel benchmark at 21B-A3B and 300B-A47B shapes; `ernieq bench` on the demo and on a
# 4-layer synthetic 21B-shaped checkpoint, bf16 vs --bits 4 vs --bits 2. Under 8 minutes on one H200;
# writes benchmarks/results/gpu_*.json and prints the rows for benchmarks/BENCHMARKS.md.
#   bash scripts/gpu_check.sh [--device cuda:N] [--budget-s 450]
#   bash scripts/gpu_check.sh --dry-run [--out DIR]     # the same flow on the CPU, tiny shapes (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-.venv/bin/python}"
for arg in "$@"; do
  # Triton decides compiled or interpreted when a kernel is defined: set before python starts
  if [[ "$arg" == "--dry-run" ]]; then export TRITON_INTERPRET=1; fi
done
exec "$py" benchmarks/gpu_check.py "$@"
