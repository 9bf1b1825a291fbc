#!/usr/bin/env bash
# The main job on the offline demo model: build it, quantize it to 2 bits, and
# evaluate both on WikiText-2 (first $WINDOWS windows of 2048 tokens).
# WikiText-2 comes from $ERNIEQ_WIKITEXT2, else from ../shared/data beside the repo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export ERNIEQ_WIKITEXT2="${ERNIEQ_WIKITEXT2:-$(cd .. && pwd)/shared/data/wikitext-2-raw/wiki.test.raw}"
WINDOWS="${WINDOWS:-12}"
OUT="${OUT:-runs/demo}"
mkdir -p "$OUT"
.venv/bin/ernieq inspect demo
.venv/bin/ernieq quantize demo --bits 2 --out "$OUT/w2" --overwrite
.venv/bin/ernieq inspect "$OUT/w2"
.venv/bin/ernieq eval demo --data wikitext2 --max-windows "$WINDOWS" --json "$OUT/eval-unquantized.json"
.venv/bin/ernieq eval "$OUT/w2" --data wikitext2 --max-windows "$WINDOWS" --json "$OUT/eval-w2.json"
.venv/bin/ernieq generate "$OUT/w2" --prompt "The capital of France is" --max-new-tokens 16
echo "results: $OUT/eval-unquantized.json $OUT/eval-w2.json"
