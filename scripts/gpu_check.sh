#!/usr/bin/env bash
# What only a CUDA GPU can check, in one short run (about 10 minutes on one H200 with the demo
# cached; a session lent a GPU runs this first): the kernel and runtime tests with the Triton kernels
# compiled, then the demo through calibrate -> quantize -> eval -> generate on --device $DEVICE
# (calibration one layer at a time on the GPU, GPTQ and encoding there, evaluation through the
# Triton kernels), the unquantized demo on the same windows, and the quick kernel benchmark. Every
# JSON it writes records the device, dtype and kernel path. Results go to $OUT.
#   DEVICE=cuda:0 OUT=runs/gpu-check bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-.venv/bin/python}"
DEVICE="${DEVICE:-cuda}"
OUT="${OUT:-runs/gpu-check}"
WINDOWS="${WINDOWS:-4}"
export ERNIEQ_WIKITEXT2="${ERNIEQ_WIKITEXT2:-$(cd .. && pwd)/shared/data/wikitext-2-raw/wiki.test.raw}"
mkdir -p "$OUT"
ernieq() { "$py" -m ernieq.cli "$@"; }
step() { echo "== $(date +%T) $*"; }

step "device"
"$py" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'; print(torch.cuda.get_device_name())"
step "tests: kernels (compiled), runtime, devices"
"$py" -m pytest -q -x tests/kernels tests/runtime tests/test_device.py
step "calibrate on $DEVICE"
ernieq calibrate demo --data demo --tokens 16384 --device "$DEVICE" --out "$OUT/calib"
step "quantize --bits 2 (GPTQ, rotations) on $DEVICE"
ernieq quantize demo --bits 2 --calib "$OUT/calib" --device "$DEVICE" --out "$OUT/w2" --overwrite
step "eval through the Triton kernels"
ernieq eval "$OUT/w2" --data wikitext2 --max-windows "$WINDOWS" --device "$DEVICE" --json "$OUT/eval-w2.json"
ernieq eval demo --data wikitext2 --max-windows "$WINDOWS" --device "$DEVICE" --json "$OUT/eval-demo.json"
ernieq generate "$OUT/w2" --prompt "The capital of France is" --max-new-tokens 16 --device "$DEVICE"
step "kernel benchmark"
"$py" benchmarks/bench_kernels.py --out "$OUT/kernels.md" --quick --budget-s 240 --device "$DEVICE"
step "done: $OUT (calib/summary.json, w2/quantize_summary.json, eval-*.json, kernels.md)"
