"""lm-evaluation-harness tasks on a model as ernieq loaded it (``ernieq eval --tasks``, ``report --tasks``).

lm-eval does everything that makes a task score: its task configs, prompts, requests,
metrics and standard errors (``lm_eval.simple_evaluate``). ernieq hands it the model it
already loaded — plain, or quantized with the runtime's packed modules (the Triton kernels
on a GPU) — wrapped in lm-eval's own ``HFLM``, and reads the results back.

Task names are lm-eval's (``--tasks lambada_openai``), those of ernieq's offline tasks
(``lm_tasks/``: ``wikitext2_lastword``, see ``ernieq.eval.lastword``), those in the task
folders given as ``include_paths``, or paths to task YAML files (lm-eval's custom-task
mechanism: ``dataset_path: json`` with ``data_files`` reads local data). lm-eval's built-in
index (thousands of tasks, about 20 s to build) is read only when a name is not found among
the others. A hub task whose data is not in the local cache fails, while offline, with one
line that says so.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ernieq.errors import ErnieqError
from ernieq.progress import progress_bar

log = logging.getLogger(__name__)

OFFLINE_TASKS = Path(__file__).resolve().parent / "lm_tasks"  # ernieq's task YAMLs (package data)
EXTRA = "ernieq[tasks]"
YAML_SUFFIXES = (".yaml", ".yml")
# lm-eval's standard error of perplexity-like metrics is a bootstrap; lm-eval's own default of
# 100000 draws takes minutes on a small CPU for little gain in a standard error's second digit
BOOTSTRAP_ITERS = 1000


class TaskError(ErnieqError, ValueError):
    """A task that cannot run: lm-eval missing, an unknown name, data that cannot be had offline."""


def require_lm_eval():
    """The ``lm_eval`` module, or a one-line error that says how to install it."""
    try:
        import lm_eval
    except ImportError:
        raise TaskError(f"--tasks needs lm-evaluation-harness: pip install '{EXTRA}' (or pip install lm-eval)") from None
    return lm_eval


@dataclass(frozen=True)
class MetricScore:
    """One metric of one task as lm-eval reported it; stderr None where lm-eval computed none.

    aggregation: the name of lm-eval's aggregation (``mean``, ``perplexity`` ...); per_sample: the
    per-example values lm-eval aggregated, in document order (empty for a group's row).
    """

    metric: str
    value: float
    stderr: float | None
    higher_is_better: bool | None
    aggregation: str | None = None
    per_sample: tuple[float, ...] = field(default=(), repr=False)

    def to_json(self) -> dict:
        return {"metric": self.metric, "value": self.value, "stderr": self.stderr,
                "higher_is_better": self.higher_is_better, "aggregation": self.aggregation}


@dataclass(frozen=True)
class TaskScore:
    """A task's (or a group's) metrics over ``samples`` examples with ``num_fewshot`` shots."""

    task: str
    samples: int | None
    num_fewshot: int | None
    version: str | None
    metrics: tuple[MetricScore, ...]

    def to_json(self) -> dict:
        return {"task": self.task, "samples": self.samples, "num_fewshot": self.num_fewshot, "version": self.version,
                "metrics": [m.to_json() for m in self.metrics]}


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _is_task_file(name: str) -> bool:
    return name.endswith(YAML_SUFFIXES)


@dataclass(frozen=True)
class TaskOptions:
    """What ``report --tasks`` runs: task names (or YAML files), more task folders, the first ``limit``
    examples of each, ``num_fewshot`` shots (None: each task's own) and ``batch_size`` requests per pass."""

    names: tuple[str, ...]
    include_paths: tuple[str, ...] = ()
    limit: int | None = None
    num_fewshot: int | None = None
    batch_size: int = 1

    def suite(self) -> TaskSuite:
        return TaskSuite(self.names, self.include_paths).load()


class TaskSuite:
    """The tasks ``names`` resolved once: an lm-eval TaskManager over ernieq's offline tasks, the
    folders ``include_paths`` and, only when a name needs them, lm-eval's built-in tasks.

    Building a suite checks every name (an unknown one fails at once, before any model is looked for);
    :meth:`load` then loads every task and its data, so that data that cannot be had offline fails
    before any model is loaded.
    """

    def __init__(self, names: tuple[str, ...], include_paths: tuple[str | Path, ...] = ()):
        if not names:
            raise TaskError("give at least one task (--tasks NAME[,NAME...])")
        require_lm_eval()
        from lm_eval.tasks import TaskManager

        for path in include_paths:
            if not Path(path).is_dir():
                raise TaskError(f"{path}: no such task folder (--include-path)")
        for name in names:
            if _is_task_file(name) and not Path(name).is_file():
                raise TaskError(f"{name}: no such task YAML file")
        self.names = tuple(names)
        paths = [str(OFFLINE_TASKS), *map(str, include_paths)]
        manager = TaskManager(include_path=paths, include_defaults=False)
        if any(n not in manager.all_tasks and not _is_task_file(n) for n in names):
            log.info("indexing lm-eval's built-in tasks")
            manager = TaskManager(include_path=paths, include_defaults=True)
        for name in names:
            if name not in manager.all_tasks and not _is_task_file(name):
                raise _unknown(name)
        self.manager = manager
        self._ready: list | None = None

    def load(self) -> TaskSuite:
        """Every task and its data loaded now (a TaskError for data that cannot be had offline)."""
        self._ready = self._load()
        return self

    def tasks(self) -> list:
        """lm-eval Task and Group objects for one run: those loaded first, then fresh ones (a run
        changes the objects it gets)."""
        ready, self._ready = self._ready, None
        return ready if ready is not None else self._load()

    def _load(self) -> list:
        objects = []
        for name in self.names:
            with _lm_eval_settings():
                loaded = self._load_one(name)
            groups = loaded["groups"]
            children = {c for g in groups.values() for c in g.child_names}
            top = [g for g in groups.values() if g.name not in children]
            objects += top or list(loaded["tasks"].values())
        return objects

    def _load_one(self, name: str) -> dict:
        try:
            return self.manager.load([name])
        except KeyError:
            raise _unknown(name) from None
        except ConnectionError as err:  # what datasets raises for a hub data set it cannot fetch
            raise TaskError(f"task {name!r}: its data is not in the local Hugging Face cache and the hub cannot "
                            f"be reached ({_one_line(err)}); run it once with network access to cache it, or give "
                            f"a task YAML over local files (--tasks FILE.yaml)") from None
        except (OSError, ValueError, TypeError) as err:  # a bad YAML, a missing data file, a bad config
            raise TaskError(f"task {name!r}: {type(err).__name__}: {_one_line(err)}") from None


def _unknown(name: str) -> TaskError:
    return TaskError(f"task {name!r}: not an lm-eval task, group or tag, nor a task YAML file "
                     f"(ernieq's offline tasks: {', '.join(offline_task_names())})")


def offline_task_names() -> list[str]:
    """The tasks ernieq ships (each runs without the hub)."""
    return sorted(p.stem for p in OFFLINE_TASKS.glob("*.yaml"))


@contextlib.contextmanager
def _lm_eval_settings() -> Iterator[None]:
    """lm-eval's log (warnings about a model passed as an object, custom data sets ...) only with
    ``-v``; its bootstrap in this process (no fork of a process that holds the model and, on a
    GPU, a CUDA context)."""
    logger = logging.getLogger("lm_eval")
    level, before = logger.level, os.environ.get("DISABLE_MULTIPROC")
    logger.setLevel(logging.DEBUG if logging.getLogger().getEffectiveLevel() <= logging.DEBUG else logging.ERROR)
    os.environ["DISABLE_MULTIPROC"] = "1"
    try:
        yield
    finally:
        logger.setLevel(level)
        if before is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = before


def _number(x) -> float | None:
    """lm-eval writes ``"N/A"`` for a standard error it did not compute."""
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def _aggregations(task) -> dict[str, str]:
    return {metric: getattr(fn, "__name__", str(fn)) for metric, fn in task.aggregation().items()}


def _scores(results: dict, tasks: dict) -> list[TaskScore]:
    """TaskScores from ``simple_evaluate``'s results, in lm-eval's order (groups included)."""
    out = []
    for name, row in results["results"].items():
        higher = results.get("higher_is_better", {}).get(name, {})
        samples = sorted(results.get("samples", {}).get(name, []), key=lambda s: s["doc_id"])
        aggregations = _aggregations(tasks[name]) if name in tasks else {}
        metrics = []
        for key, value in row.items():
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr") or _number(value) is None:
                continue
            per_sample = tuple(float(s[metric]) for s in samples if isinstance(s.get(metric), (int, float)))
            metrics.append(MetricScore(metric, float(value), _number(row.get(f"{metric}_stderr,{filt}")),
                                       higher.get(metric), aggregations.get(metric), per_sample))
        n = results.get("n-samples", {}).get(name, {})
        shots = results.get("n-shot", {}).get(name)
        version = results.get("versions", {}).get(name)
        out.append(TaskScore(name, n.get("effective"), shots if isinstance(shots, int) else None,
                             None if version is None else str(version), tuple(metrics)))
    return out


def run_tasks(model, tokenizer, suite: TaskSuite, *, device, limit: int | None = None,
              num_fewshot: int | None = None, batch_size: int = 1,
              bootstrap_iters: int = BOOTSTRAP_ITERS) -> list[TaskScore]:
    """lm-eval's scores of ``model`` (a transformers causal LM, already on ``device``) on the suite's tasks.

    limit: the first N examples of each task; num_fewshot: lm-eval's shots (None: each task's own);
    batch_size: requests per forward pass (lm-eval pads on the right).
    """
    lm_eval = require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    class CountedLM(HFLM):
        """lm-eval's HFLM, counting its forward passes on ernieq's bar (lm-eval's own tqdm writes no
        line to a pipe until it ends, and one pass can take a minute on a busy CPU)."""

        def _model_call(self, *args, **kwargs):
            out = super()._model_call(*args, **kwargs)
            bar.advance(counter)
            return out

        def _model_generate(self, *args, **kwargs):
            out = super()._model_generate(*args, **kwargs)
            bar.advance(counter)
            return out

    objects = suite.tasks()
    with _lm_eval_settings(), progress_bar() as bar:
        counter = bar.add_task(f"lm-eval: forward passes of up to {batch_size} requests", total=None)
        lm = CountedLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size,
                       device=str(device))
        results = lm_eval.simple_evaluate(model=lm, tasks=objects, num_fewshot=num_fewshot, limit=limit,
                                          batch_size=batch_size, device=str(device), log_samples=True,
                                          bootstrap_iters=bootstrap_iters, task_manager=suite.manager)
    tasks = {}
    for obj in objects:
        for task in obj.get_all_tasks() if hasattr(obj, "get_all_tasks") else [obj]:
            tasks[task.task_name] = task
    return _scores(results, tasks)


def _difference(base: MetricScore, other: MetricScore) -> tuple[float, float | None, bool]:
    """(other - base, its standard error, paired?). A mean over the same examples is paired: lm-eval's
    ``mean_stderr`` of the per-example differences. Otherwise sqrt(se_base² + se_other²), which
    ignores the pairing (and overstates the error of models that agree on most examples)."""
    diff = other.value - base.value
    n = len(base.per_sample)
    if base.aggregation == "mean" and other.aggregation == "mean" and n > 1 and len(other.per_sample) == n:
        from lm_eval.api.metrics import mean_stderr

        return diff, mean_stderr([o - b for b, o in zip(base.per_sample, other.per_sample)]), True
    if base.stderr is None or other.stderr is None:
        return diff, None, False
    return diff, math.hypot(base.stderr, other.stderr), False


def compare_scores(scores: dict[str, list[TaskScore]], baseline: str) -> list[dict]:
    """The rows of the report's task table: for every task and metric of the ``baseline`` label, every
    model's value and standard error, and every other model's difference to the baseline with its
    standard error (:func:`_difference`). ``scores``: label -> that model's TaskScores."""
    by_label = {label: {(t.task, m.metric): (t, m) for t in rows for m in t.metrics} for label, rows in scores.items()}
    out = []
    for task in scores[baseline]:
        for base in task.metrics:
            key = (task.task, base.metric)
            row = {"task": task.task, "metric": base.metric, "samples": task.samples,
                   "num_fewshot": task.num_fewshot, "higher_is_better": base.higher_is_better,
                   "aggregation": base.aggregation, "value": {}, "stderr": {}, "diff": {}, "diff_stderr": {},
                   "paired": {}}
            for label, found in by_label.items():
                if key not in found:
                    continue
                other = found[key][1]
                row["value"][label], row["stderr"][label] = other.value, other.stderr
                if label != baseline:
                    diff, se, paired = _difference(base, other)
                    row["diff"][label], row["diff_stderr"][label], row["paired"][label] = diff, se, paired
            out.append(row)
    return out
