"""The accuracy report of a quantized checkpoint against its baseline (``ernieq report``).

:func:`build_report` computes everything as one JSON-able dict (the content of
``report.json``); :func:`write_report` adds the plots and renders ``report.md``
and ``report.html`` from that dict alone. Sections:

- ``perplexity``: per corpus, the same windows scored once by every model in
  lock step (baseline, quantized, ``--compare`` checkpoints), with the token
  count; KL(baseline || model) and top-1 agreement of the next-token
  distributions from the same logits;
- ``weight_error``: per module, layer, expert and tensor class, the relative
  Frobenius error and SQNR, and the output error on calibration activations when
  statistics are given (``ernieq.eval.weight_error``);
- ``size``: weights, bytes and bits per weight by tensor class;
- ``calibration``: tokens per expert and cold experts, when statistics are given;
- ``tasks``: lm-evaluation-harness task metrics of every model, and each model's difference to the
  baseline with its standard error (``ernieq.eval.tasks``), when tasks are asked for;
- ``settings``: bits per weight and perplexity of every model (the trade-off plot);
- ``runtime``: the device and dtype every model ran on, and each one's kernel path;
- ``provenance``: command, versions, commit, times.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ernieq.device import Placement
from ernieq.errors import ErnieqError
from ernieq.eval.perplexity import PerplexityError, next_token_divergence, tokenize_text, window_count, window_logits
from ernieq.eval.tasks import TaskOptions, TaskSuite, compare_scores, run_tasks
from ernieq.provenance import now_iso, provenance
from ernieq.text import load_text
from ernieq.eval.weight_error import summarize_errors, weight_errors
from ernieq.formats.registry import checkpoint_summary, open_quantized, quantized_format
from ernieq.model.adapters import LINEAR_CLASSES
from ernieq.model.checkpoint import CheckpointReader
from ernieq.progress import progress_bar
from ernieq.recipes import SPEC_KEY
from ernieq.runtime.record import kernel_path, runtime_record
from ernieq.runtime.stream import no_tasks_when_streamed

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
BASELINE, QUANTIZED = "baseline", "quantized"
# The classes a report shows sizes for; every other tensor class (router, norms, embeddings, head) is "other".
REPORT_CLASSES = tuple(c.value for c in LINEAR_CLASSES)
OTHER_CLASS = "other"
JSON_NAME, MD_NAME, HTML_NAME, PLOTS_DIR = "report.json", "report.md", "report.html", "plots"

Loader = Callable[[Path], tuple]  # path -> (model, tokenizer), as ernieq.api.load


class ReportError(ErnieqError, ValueError):
    """A report that cannot be made: mismatched models, no windows, bad options."""


@dataclass
class CorpusScore:
    """One corpus: every model scored on the same ``windows`` windows of ``seq_len`` tokens.

    ppl, nll_mean: by model label. kl_mean (nats per token, KL(baseline || model)) and
    top1_agreement: by label, for every model but the baseline; all over ``tokens`` predictions.
    """

    corpus: str
    tokens: int
    windows: int
    seq_len: int
    ppl: dict[str, float] = field(default_factory=dict)
    nll_mean: dict[str, float] = field(default_factory=dict)
    kl_mean: dict[str, float] = field(default_factory=dict)
    top1_agreement: dict[str, float] = field(default_factory=dict)


def score_corpus(models: dict[str, object], ids: torch.Tensor, corpus: str, seq_len: int,
                 max_windows: int | None, progress: bool = True) -> CorpusScore:
    """Perplexity of every model (``BASELINE`` among them) over the same windows, each run once per window.

    ids: LongTensor [1, L] or [L]. Per window, every model's logits [L, V] are computed, scored
    (NLL of tokens 1..L-1) and compared with the baseline's at the same L-1 positions, then dropped.
    A streamed model runs all windows layer-major when its first window's logits are asked for
    (``window_logits``), keeping its final hidden states [W, L, H], not its logits.
    """
    ids = ids.reshape(-1)
    windows = window_count(ids.numel(), seq_len, max_windows)
    if windows == 0:
        raise PerplexityError(f"{corpus}: {ids.numel()} tokens make no full window of {seq_len}")
    nll = dict.fromkeys(models, 0.0)
    kl = dict.fromkeys([m for m in models if m != BASELINE], 0.0)
    agree = dict(kl)
    per_window = seq_len - 1  # every window predicts all but its first token
    cut = ids[: windows * seq_len].reshape(windows, seq_len)  # [W, L]
    streams = {label: window_logits(model, cut) for label, model in models.items()}
    with torch.inference_mode(), progress_bar(progress) as bar:
        task = bar.add_task(f"scoring {corpus}", total=windows)
        for w in range(windows):
            base = None
            for label, stream in streams.items():
                logits = next(stream)[:-1]  # [L-1, V]
                target = cut[w, 1:].to(logits.device)  # [L-1]
                if not torch.isfinite(logits).all():
                    raise PerplexityError(f"{corpus}: window {w}: {label} model returned non-finite logits")
                nll[label] += F.cross_entropy(logits, target, reduction="sum").item()  # sum of -log p(t_i | t_<i)
                if label == BASELINE:
                    base = logits
                    continue
                d = next_token_divergence(base, logits)
                kl[label] += d.kl_mean * per_window
                agree[label] += d.top1_agreement * per_window
            bar.advance(task)
    tokens = windows * per_window
    score = CorpusScore(corpus, tokens, windows, seq_len)
    for label, total in nll.items():
        score.nll_mean[label] = total / tokens
        score.ppl[label] = float(torch.tensor(total / tokens, dtype=torch.float64).exp())  # ppl = exp(mean NLL)
    score.kl_mean = {k: v / tokens for k, v in kl.items()}
    score.top1_agreement = {k: v / tokens for k, v in agree.items()}
    return score


def size_by_class(path: Path) -> dict:
    """Weights, bytes and bits per weight of a checkpoint by report class (every stored byte counted: the
    summary's overhead, bytes that are no model parameter, sits in the other class)."""
    s = checkpoint_summary(path)
    classes: dict[str, dict] = {}
    for cls in s.params_by_class:
        row = classes.setdefault(cls if cls in REPORT_CLASSES else OTHER_CLASS, {"weights": 0, "bytes": 0})
        row["weights"] += s.params_by_class[cls]
        row["bytes"] += s.bytes_by_class[cls]
    if s.overhead_bytes:  # stored bytes of no parameter (ernieq's rotations): counted, with no weights, under other
        classes.setdefault(OTHER_CLASS, {"weights": 0, "bytes": 0})["bytes"] += s.overhead_bytes
    for row in classes.values():
        row["bits_per_weight"] = 8.0 * row["bytes"] / row["weights"] if row["weights"] else 0.0  # bits = 8 B / n
    linear = [classes[c] for c in REPORT_CLASSES if c in classes]
    n_lin, b_lin = sum(r["weights"] for r in linear), sum(r["bytes"] for r in linear)
    n_all, b_all = sum(r["weights"] for r in classes.values()), sum(r["bytes"] for r in classes.values())
    return {
        "classes": dict(sorted(classes.items())),
        "weights": n_all,
        "bytes": b_all,
        "bits_per_weight_all": 8.0 * b_all / n_all if n_all else 0.0,
        "bits_per_weight_linear": 8.0 * b_lin / n_lin if n_lin else 0.0,
        "codecs": {k: {"weights": s.params_by_codec[k], "bytes": s.bytes_by_codec[k],
                       "bits_per_weight": s.codec_bits_per_weight(k)} for k in sorted(s.params_by_codec)},
    }


def calibration_section(cset) -> dict:
    """Tokens per routed expert and the cold experts of a :class:`~ernieq.calibration.CalibrationSet`."""
    cold = cset.cold_experts(cset.cold_share, cset.cold_min_tokens)
    return {
        "info": dict(cset.info),
        "cold_share": cset.cold_share,
        "cold_min_tokens": cset.cold_min_tokens,
        "experts": [asdict(r) for r in cset.experts],
        "cold_experts": [{"layer": r.layer, "expert": r.expert, "tokens": r.tokens, "share": r.share} for r in cold],
        "routed_experts": len(cset.experts),
    }


def _labels(compare: tuple[Path, ...]) -> dict[str, Path]:
    """A unique label per --compare checkpoint: its folder name (``name-2`` ... on clashes)."""
    labels: dict[str, Path] = {}
    for path in compare:
        label, i = path.name or str(path), 2
        while label in labels or label in (BASELINE, QUANTIZED):
            label, i = f"{path.name}-{i}", i + 1
        labels[label] = path
    return labels


def _hessian_reader(calib):
    """name -> the calibration Hessian of that weight's inputs, or None."""
    def hessian_of(name: str):
        stats = calib.stats(name)
        return None if stats is None else stats.hessian
    return hessian_of


def build_report(
    qdir: Path,
    baseline: Path,
    data: tuple[str, ...],
    load: Loader,
    *,
    baseline_name: str | None = None,
    calib=None,
    calib_source: str | None = None,
    compare: tuple[Path, ...] = (),
    seq_len: int = 2048,
    max_windows: int | None = 4,
    progress: bool = True,
    tasks: TaskOptions | None = None,
    placement: Placement,
) -> dict:
    """The report of the quantized checkpoint ``qdir`` (any format ernieq reads: native, FastDeploy)
    against ``baseline`` on the text sources ``data``.

    load: path -> (model, tokenizer), on ``placement`` (which the report records with every model's
    kernel path). calib: a CalibrationSet of the baseline, for the output error and the expert table
    (``calib_source`` names where it came from). tasks: lm-eval tasks every model runs (checked, and
    their data loaded, before any model is). All models are held at once so that each runs once per
    window (a streamed one, ``ernieq.runtime.stream``, holds one decoder layer at a time).
    """
    started = now_iso()
    if not data:
        raise ReportError("give at least one text source (--data)")
    suite = tasks.suite() if tasks is not None else None
    quantized = open_quantized(qdir)
    qc = quantized.quant_info
    paths = {BASELINE: baseline, QUANTIZED: qdir, **_labels(tuple(compare))}
    models, tokenizers = {}, {}
    for label, path in paths.items():
        models[label], tokenizers[label] = load(path)
        if suite is not None:
            no_tasks_when_streamed(models[label].stream_plan)
    corpora = []
    for source in data:
        ids = tokenize_text(tokenizers[BASELINE], load_text(source, split="eval"))
        corpora.append(asdict(score_corpus(models, ids, source, seq_len, max_windows, progress)))
    task_section = _task_section(models, tokenizers, suite, tasks) if suite is not None else None
    kernels = "; ".join(f"{label}: {kernel_path(m, placement.device)}" for label, m in models.items())
    stream = {label: m.stream_plan.record() for label, m in models.items() if hasattr(m, "stream_plan")}
    del models
    errors = weight_errors(CheckpointReader(baseline), quantized, None if calib is None else _hessian_reader(calib))
    sizes = {label: size_by_class(path) for label, path in paths.items()}
    settings = [{"label": label, "path": str(path), "bits_per_weight": sizes[label]["bits_per_weight_linear"],
                 "bits_per_weight_all": sizes[label]["bits_per_weight_all"],
                 "ppl": {c["corpus"]: c["ppl"][label] for c in corpora},
                 "recipe": _recipe_of(path)} for label, path in paths.items()]
    return {
        "schema": SCHEMA_VERSION,
        "model": {
            "quantized": str(qdir),
            "baseline": baseline_name or str(baseline),
            "baseline_path": str(baseline),
            "recipe": qc.get("recipe"),
            "recipe_spec": qc.get(SPEC_KEY),
            "method": qc.get("method"),
            "quantized_calibration": qc.get("calibration"),
            "architecture": (quantized.config.get("architectures") or [quantized.config.get("model_type")])[0],
        },
        "perplexity": corpora,
        "weight_error": {**summarize_errors(errors), "calib": calib_source},
        "size": {QUANTIZED: sizes[QUANTIZED], BASELINE: sizes[BASELINE]},
        "calibration": calibration_section(calib) if calib is not None else None,
        "tasks": task_section,
        "settings": settings,
        "options": {"data": list(data), "seq_len": seq_len, "max_windows": max_windows,
                    "compare": [str(p) for p in compare]},
        "runtime": runtime_record(placement, kernels, stream or None),
        "provenance": provenance(started),
    }


def _task_section(models: dict, tokenizers: dict, suite: TaskSuite, options: TaskOptions) -> dict:
    """Every model's lm-eval scores on the suite, as the task table's rows (``compare_scores``)."""
    scores = {label: run_tasks(model, tokenizers[label], suite, device=model.device, limit=options.limit,
                               num_fewshot=options.num_fewshot, batch_size=options.batch_size)
              for label, model in models.items()}
    return {"options": {**asdict(options), "names": list(options.names),
                        "include_paths": list(options.include_paths)},
            "rows": compare_scores(scores, BASELINE)}


def _recipe_of(path: Path) -> str:
    if quantized_format(path) is None:
        return "unquantized"
    qc = open_quantized(path).quant_info
    return qc.get("recipe") or qc.get("quant_method")


def write_report(report: dict, out: Path) -> dict[str, Path]:
    """report.json (sorted keys), the plots (PNG), report.md and report.html (images embedded) in ``out``."""
    from ernieq.eval.plots import report_plots
    from ernieq.eval.render import render_html, render_markdown

    out = Path(out)
    (out / PLOTS_DIR).mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2, sort_keys=True, allow_nan=False) + "\n"
    (out / JSON_NAME).write_text(text)
    images = report_plots(report)  # {name: PNG bytes}
    for name, png in images.items():
        (out / PLOTS_DIR / f"{name}.png").write_bytes(png)
    (out / MD_NAME).write_text(render_markdown(report, {n: f"{PLOTS_DIR}/{n}.png" for n in images}))
    (out / HTML_NAME).write_text(render_html(report, images))
    return {"json": out / JSON_NAME, "md": out / MD_NAME, "html": out / HTML_NAME}


def read_report(path: Path) -> dict:
    """report.json from a report folder (or the file itself)."""
    path = Path(path)
    file = path / JSON_NAME if path.is_dir() else path
    try:
        report = json.loads(file.read_text())
    except FileNotFoundError:
        raise ReportError(f"{file}: no report (run `ernieq report` first)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ReportError(f"{file}: not valid JSON ({err})") from None
    if not isinstance(report, dict) or report.get("schema") != SCHEMA_VERSION:
        raise ReportError(f"{file}: not an ernieq report of schema {SCHEMA_VERSION}")
    return report
