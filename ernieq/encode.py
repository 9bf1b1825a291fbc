"""Encoding weights: one function per weight, and a pool that runs it across CPU cores.

``ernieq.calibration.rounding.encode_weight`` is the one call that turns a linear
weight ``W [N, K]`` into a :class:`QuantizedTensor` (codec, weight, calibration
statistics, name, rounding method, optional rotation); ``encode_experts`` does the
same for E weights of one shape at once (a layer's experts: GPTQ's loop then runs
once for all of them), with the same bytes. A :class:`WorkItem` carries the
arguments of one such call (E >= 1), the codec as its registry choice, and pickles,
so the same call runs in this process (on the GPU the caller chose, or with one
worker) or in a pool of worker processes.

Every CPU encode runs on one torch thread, in a worker and in this process
alike: the parallelism is across weights, and the bytes do not depend on the
number of workers or the order in which they finish (results come back in the
order the items went in).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import pickle
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ernieq.calibration.rounding import METHODS, encode_experts
from ernieq.codecs import CalibrationStats, Codec, QuantizedTensor, get_codec
from ernieq.config import CodecChoice
from ernieq.device import HOST
from ernieq.distributed import local_ranks
from ernieq.errors import ErnieqError
from ernieq.killpoints import kill_point

_codecs: dict[CodecChoice, Codec] = {}  # built codecs, per process


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ErnieqError(f"--method {method}: expected one of {', '.join(METHODS)}")


def codec_of(choice: CodecChoice) -> Codec:
    """The codec a choice names, built once per process."""
    return _codecs.get(choice) or _codecs.setdefault(choice, get_codec(choice.codec, **choice.kwargs))


@dataclass(frozen=True)
class WorkItem:
    """The arguments of one ``encode_experts`` call (E = 1: one ``encode_weight``); pickles into a
    worker process.

    weights: E tensors [N, K] of one shape, each owning its storage (a view would pickle its whole base).
    """

    choice: CodecChoice
    weights: tuple[torch.Tensor, ...]
    stats: tuple[CalibrationStats | None, ...]
    names: tuple[str, ...]
    method: str
    rotation: object | None = None  # an ernieq.transforms.Rotation, passed through to encode_experts

    @classmethod
    def of(cls, choice: CodecChoice, weights: list[torch.Tensor], stats: list, names: list[str], method: str,
           rotation=None) -> WorkItem:
        return cls(choice, tuple(_owned(w) for w in weights), tuple(stats), tuple(names), method, rotation)

    def run(self, device: torch.device | None = None) -> list[QuantizedTensor]:
        """The E encoded weights, in host memory; encoded on ``device`` (default: where the weights are)."""
        weights = self.weights if device is None else [w.to(device) for w in self.weights]
        qs = encode_experts(codec_of(self.choice), weights, self.stats, self.names, self.method, self.rotation)
        return [q.to(HOST) for q in qs]


def _owned(weight: torch.Tensor) -> torch.Tensor:
    """``weight``, or a copy of it when it is a view into a larger storage."""
    own = weight.untyped_storage().nbytes() == weight.numel() * weight.element_size()
    return weight if own and weight.is_contiguous() else weight.clone()


@contextmanager
def _one_thread():
    """torch on one thread inside the block (reductions then sum in one fixed order)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _exit_with_parent() -> None:
    """Block until the parent process is gone, then end this worker.

    A worker holds both ends of the pool's queues, so a parent killed with
    SIGKILL would leave it waiting for work forever.
    """
    parent = multiprocessing.parent_process()
    if parent is not None:
        multiprocessing.connection.wait([parent.sentinel])
    os._exit(1)


def _init_worker() -> None:
    torch.set_num_threads(1)
    threading.Thread(target=_exit_with_parent, name="exit-with-parent", daemon=True).start()


def _run_in_worker(item: bytes) -> bytes:
    """A pickled WorkItem in, its pickled list of QuantizedTensors out.

    Items and results cross the process boundary as plain pickles: through the
    pool's own pickler, torch would move every tensor, the source weights of the
    whole group included, into shared memory and keep it there.
    """
    kill_point("worker-encode")
    return pickle.dumps(pickle.loads(item).run(), protocol=pickle.HIGHEST_PROTOCOL)


def usable_cores() -> int:
    """The CPU cores this process may run on: its share when torchrun started several ranks on this node."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // local_ranks())


# With the default worker count, a group smaller than this is encoded in this process: starting
# the pool (a fresh interpreter per worker, torch imported in each) costs seconds.
POOL_MIN_WEIGHTS = 1 << 24


class Encoder:
    """Runs :class:`WorkItem` s in order on ``device``: on a GPU in this process; on the CPU in this
    process or in ``workers`` processes.

    ``workers`` None: every usable core, for groups of at least ``POOL_MIN_WEIGHTS``
    weights. Use as a context manager; the pool starts on the first group that uses it.
    """

    def __init__(self, workers: int | None, device: torch.device):
        self.device = device
        self.workers = 1 if self.device.type != "cpu" else max(1, workers or usable_cores())
        self.auto = workers is None
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> Encoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn: a forked child would inherit torch's OpenMP pool and the reader's memory maps
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_init_worker)
        return self._pool

    def slots(self, weights: int | None = None) -> int:
        """How many items run at once for a group of ``weights`` weights: 1 in this process, else the workers."""
        if self.workers == 1 or (self.auto and weights is not None and weights < POOL_MIN_WEIGHTS):
            return 1
        return self.workers

    def map(self, items: Iterable[WorkItem], weights: int | None = None) -> Iterator[list[QuantizedTensor]]:
        """The encoded tensors of each of ``items`` (``weights`` weights in all), item by item in their
        order; at most 2 x workers items in flight."""
        if self.slots(weights) == 1:
            for item in items:
                if self.device.type == "cpu":
                    with _one_thread():
                        q = item.run()
                else:
                    q = item.run(self.device)
                kill_point("encode")
                yield q
            return
        pool = self._executor()
        pending: deque[Future] = deque()
        try:
            for item in items:
                pending.append(pool.submit(_run_in_worker, pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)))
                if len(pending) >= 2 * self.workers:
                    yield pickle.loads(pending.popleft().result())
                    kill_point("encode")
            while pending:
                yield pickle.loads(pending.popleft().result())
                kill_point("encode")
        finally:
            for future in pending:
                future.cancel()
