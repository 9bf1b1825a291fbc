"""Issue 13's acceptance on the demo: the FastDeploy 2-bit export, read back, scores what its native source does.

    python benchmarks/fastdeploy_roundtrip.py --calib STATS --data ../shared/data/wikitext-2-raw/wiki.test.raw \
        --max-windows 12 --out benchmarks/results/demo_fastdeploy_roundtrip.json

STATS is a folder written by ``ernieq calibrate demo --data demo`` (``--tokens``: its size). The script
quantizes the demo with ``--bits 2`` and GPTQ from STATS without rotations (what FastDeploy can carry, as
``--format fastdeploy`` does), exports that native checkpoint to FastDeploy's layout, and evaluates both on
the same windows through ernieq's runtime: the export's codes are read back as stored, nothing re-encoded.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from datetime import date
from pathlib import Path

from ernieq import api
from ernieq.model.checkpoint import weights_sha256
from ernieq.provenance import git_commit, machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--calib", type=Path, required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--max-windows", type=int, default=12)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        native, exported = Path(tmp) / "native", Path(tmp) / "fastdeploy"
        api.quantize(args.model, native, bits=2, calib=args.calib, rotate=False, progress=False)
        api.export(native, exported, "fastdeploy")
        rows = {}
        for name, folder in (("native, no rotations", native), ("fastdeploy export", exported)):
            r = api.evaluate(folder, args.data, max_windows=args.max_windows, progress=False)
            rows[name] = {"ppl": r.ppl, "tokens": r.tokens, "eval_seconds": r.seconds}
            print(name, json.dumps(rows[name]), flush=True)
    a, b = (row["ppl"] for row in rows.values())
    result = {"date": str(date.today()), "commit": git_commit(), "machine": machine(), "model": args.model,
              "model_weights_sha256": weights_sha256(api.resolve_model(args.model)), "calib": str(args.calib),
              "data": Path(args.data).name, "max_windows": args.max_windows, "rows": rows,
              "relative_difference": b / a - 1}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"fastdeploy export vs native: {100 * (b / a - 1):+.4f} % perplexity")


if __name__ == "__main__":
    main()
