"""One small report case shared by the report and publish tests: built once per test session.

A reduced routed demo (4 layers) quantized with the 2-bit recipe and with wint8, calibration
statistics of the baseline, a short slice of WikiText-2 and the first examples of the offline
task; folders are kept under the session's base temp folder, so a second test module reuses them.
Everything runs on the CPU in float32 (``device="cpu"``), also on a machine with a GPU, so the
tests' tolerances hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ernieq import api
from ernieq.eval.lastword import TASK_NAME
from ernieq.eval.tasks import TaskOptions

SEQ_LEN = 32
MAX_WINDOWS = 2
TEXT_CHARS = 4000
TASK_LIMIT = 4


@dataclass(frozen=True)
class ReportCase:
    baseline: Path
    q2: Path
    q8: Path
    calib: Path
    text: Path
    report: Path  # the report folder of q2 (with --calib and --compare q8)


def report_case(tmp_path_factory, baseline: Path, wikitext2: Path) -> ReportCase:
    root = tmp_path_factory.getbasetemp() / "report-case"
    case = ReportCase(baseline, root / "q2", root / "q8", root / "calib", root / "text.txt", root / "report")
    root.mkdir(exist_ok=True)
    if not case.text.exists():
        case.text.write_text(wikitext2.read_text(encoding="utf-8")[:TEXT_CHARS])
    if not case.q2.exists():
        api.quantize(baseline, case.q2, bits=2, progress=False)
    if not case.q8.exists():
        api.quantize(baseline, case.q8, bits=8, progress=False)
    if not case.calib.exists():
        api.calibrate(baseline, "demo", tokens=512, seq_len=128, out=case.calib, progress=False, device="cpu")
    if not (case.report / "report.json").exists():
        api.report(case.q2, baseline, (str(case.text),), case.report, calib=case.calib, compare=(case.q8,),
                   seq_len=SEQ_LEN, max_windows=MAX_WINDOWS, progress=False, device="cpu",
                   tasks=TaskOptions((TASK_NAME,), limit=TASK_LIMIT))
    return case
