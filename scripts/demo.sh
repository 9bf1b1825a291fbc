#!/usr/bin/env bash
# The whole job on the offline demo model: build it, calibrate it on the demo text, quantize it to
# 2 bits (GPTQ with the calibration statistics, online rotations: ernieq's best measured setting),
# write the accuracy report against the unquantized model (WikiText-2, first $WINDOWS windows of
# 2048 tokens; the statistics give the output error and the expert table; lm-evaluation-harness on
# ernieq's offline task wikitext2_lastword, first $TASK_LIMIT examples in batches of $TASK_BATCH, for
# every model), publish a
# hub-ready folder, verify it, and print where the report is. Beside the native checkpoint it writes
# the same recipe in FastDeploy's 2-bit (wint2) layout, without rotations (the format cannot carry
# them), and the report scores it too (read back through ernieq's runtime, nothing re-encoded).
# WikiText-2 comes from $ERNIEQ_WIKITEXT2, else from ../shared/data beside the repo.
# COMPARE_BITS="8 4" also quantizes those settings and adds them to the report (perplexity vs bits).
# DEVICE (auto|cpu|cuda|cuda:N) and DTYPE (auto|bfloat16|float16|float32) go to every command that
# computes; auto: the first CUDA GPU in bfloat16 when there is one, else the CPU in float32.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export ERNIEQ_WIKITEXT2="${ERNIEQ_WIKITEXT2:-$(cd .. && pwd)/shared/data/wikitext-2-raw/wiki.test.raw}"
WINDOWS="${WINDOWS:-12}"
OUT="${OUT:-runs/demo}"
CALIB_TOKENS="${CALIB_TOKENS:-32768}"
TASK_LIMIT="${TASK_LIMIT:-100}"
TASK_BATCH="${TASK_BATCH:-16}"
on=(--device "${DEVICE:-auto}" --dtype "${DTYPE:-auto}")
mkdir -p "$OUT"
ernieq=.venv/bin/ernieq
$ernieq inspect demo
$ernieq calibrate demo --data demo --tokens "$CALIB_TOKENS" --out "$OUT/calib" "${on[@]}"
$ernieq quantize demo --bits 2 --calib "$OUT/calib" --out "$OUT/w2" --overwrite "${on[@]}"
$ernieq quantize demo --bits 2 --format fastdeploy --calib "$OUT/calib" --out "$OUT/w2-fastdeploy" --overwrite "${on[@]}"
compare=(--compare "$OUT/w2-fastdeploy")
for bits in ${COMPARE_BITS:-}; do
  $ernieq quantize demo --bits "$bits" --calib "$OUT/calib" --out "$OUT/w$bits" --overwrite "${on[@]}"
  compare+=(--compare "$OUT/w$bits")
done
$ernieq report "$OUT/w2" --baseline demo --data wikitext2 --max-windows "$WINDOWS" --calib "$OUT/calib" \
  --tasks wikitext2_lastword --limit "$TASK_LIMIT" --batch-size "$TASK_BATCH" ${compare[@]+"${compare[@]}"} --out "$OUT/report" "${on[@]}"
$ernieq publish "$OUT/w2" --report "$OUT/report" --name ernieq-demo-w2 --out "$OUT/ernieq-demo-w2" --overwrite
$ernieq verify "$OUT/ernieq-demo-w2" "${on[@]}"
$ernieq generate "$OUT/w2" --prompt "The capital of France is" --max-new-tokens 16 "${on[@]}"
echo "report: $OUT/report/report.html ($OUT/report/report.md, $OUT/report/report.json)"
echo "published: $OUT/ernieq-demo-w2 (model card README.md, SHA256SUMS)"
