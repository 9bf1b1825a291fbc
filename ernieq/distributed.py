"""Processes in one place (STYLE 14): rank, world size, who does what, and the collectives between them.

``torchrun --nproc-per-node N [--nnodes M --node-rank R --master-addr HOST] -m ernieq calibrate|quantize``
starts N processes per node; :func:`init` finds this one's place in the environment torchrun sets
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and joins the job through
``torch.distributed``: NCCL carries CUDA tensors and gloo CPU ones (gloo alone without a GPU). Each
rank computes on GPU ``LOCAL_RANK``. Without that environment ernieq is one process: :func:`world`
is rank 0 of 1, every collective returns at once, and :func:`plan` keeps every item whole, in order.

Every rank decides the same work from the same sizes (:func:`plan`, :func:`share`): nothing about the
work travels between ranks, only statistics (:func:`all_reduce`) and barriers. Files go to a folder
every rank sees (one node, or a shared filesystem across nodes).

A rank that dies closes its connections: the others' next collective fails, and becomes one
:class:`DistributedError` line naming the rank that saw it; the launcher's report (torchrun's
"Root Cause") names the rank that died. A job stops as a whole, and the same command resumes.
"""

from __future__ import annotations

import atexit
import datetime
import math
import os
import signal
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch

from ernieq.errors import ErnieqError

ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Ranks wait at barriers for the slowest one: with the work balanced by the plan that is minutes, but one
# large layer can hold a barrier long; a node that vanishes without closing its sockets is caught at this limit.
TIMEOUT = datetime.timedelta(hours=6)
CUTS_PER_RANK = 8  # plan: no part above 1/(8 N) of the work, so the busiest rank has at most 1/8 more than its share
T = TypeVar("T")


class DistributedError(ErnieqError):
    """A job of several processes that cannot start, or that lost a rank: one line, naming the rank."""


@dataclass(frozen=True)
class World:
    """This process's place in the job: rank ``rank`` of ``size``, ``local_rank`` on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes what is written once (statistics, index, config)."""
        return self.rank == 0

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.size}"


_world = World()
_device = torch.device("cpu")  # where collectives run: this rank's GPU under NCCL, else the CPU
_stop: DistributedError | None = None  # set by the launcher's SIGTERM (``_stopped``)


def world() -> World:
    return _world


def local_ranks() -> int:
    """How many ranks torchrun started on this node (``LOCAL_WORLD_SIZE``; 1 outside a job): they share its cores."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))) if _world.size > 1 else 1


def init(required: bool = False) -> World:
    """Join the job this process was started in (see the module); one process when the environment is
    not there. ``required`` (``--distributed``): a missing variable is a one-line error."""
    global _world, _device
    if torch.distributed.is_initialized():
        return _world
    missing = [k for k in ENV if k not in os.environ]
    if missing:
        if required:
            raise DistributedError(f"--distributed: {', '.join(missing)} not set; start the job with torchrun "
                                   f"--nproc-per-node N -m ernieq ... (or a launcher that sets {', '.join(ENV)})")
        return _world
    try:
        me = World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    except ValueError:
        raise DistributedError(f"RANK, WORLD_SIZE, LOCAL_RANK must be integers, got "
                               f"{', '.join(os.environ[k] for k in ENV[:3])}") from None
    if not 0 <= me.rank < me.size:
        raise DistributedError(f"RANK={me.rank} is not below WORLD_SIZE={me.size}")
    if me.size == 1:
        return _world
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(me.local_rank % torch.cuda.device_count())  # "cuda" now means this rank's GPU
        backend, _device = "cpu:gloo,cuda:nccl", torch.device("cuda", torch.cuda.current_device())
    with _collective(me, "joining the job"):
        torch.distributed.init_process_group(backend, rank=me.rank, world_size=me.size, timeout=TIMEOUT)
    atexit.register(torch.distributed.destroy_process_group)
    signal.signal(signal.SIGTERM, _stopped)
    _world = me
    return me


def _stopped(signum, frame) -> None:
    """SIGTERM: the launcher ends the job because another rank ended; say so in one line, keep the work."""
    global _stop
    ending()
    _stop = DistributedError(f"{_world}: stopped by the launcher: another rank ended (the launcher's report names "
                             f"it); the same command resumes")
    raise _stop


def stopped() -> DistributedError | None:
    """The launcher's stop, once it came. Raised inside a library call (safetensors reading a tensor), it
    can come out as that library's own error, with this one lost: the entry point reports this instead."""
    return _stop


def ending() -> None:
    """This rank is on its way out with its one error line: the launcher's SIGTERM, which follows a lost peer,
    must not interrupt that line (it would replace it with a traceback)."""
    if _world.size > 1:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


@contextmanager
def _collective(me: World, what: str):
    """A failed collective becomes one line: this rank, what it was doing, why."""
    try:
        yield
    except (RuntimeError, ValueError) as err:  # what torch.distributed raises for a lost peer or a bad address
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        ending()
        raise DistributedError(f"{me}: {what}: another rank stopped or cannot be reached ({first[:200]}); "
                               f"the launcher's report names it; the same command resumes") from None


def barrier(what: str) -> None:
    """Wait for every rank (``what``: the step, for the error line)."""
    if _world.size > 1:
        with _collective(_world, what):
            torch.distributed.barrier()


def main_first(fn: Callable[[], T], what: str) -> T:
    """``fn()`` on rank 0, then on the others (e.g. rank 0 prepares a folder the others then open)."""
    if _world.main:
        result = fn()
    barrier(what)
    return result if _world.main else fn()


def all_reduce(tensors: Sequence[torch.Tensor], op: str = "sum", what: str = "summing statistics") -> None:
    """Every tensor, in place, reduced over the ranks (``op``: sum, max or min); every rank passes the
    same shapes in the same order. Each crosses on this rank's collective device and comes back."""
    if _world.size == 1:
        return
    reduce_op = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX,
                 "min": torch.distributed.ReduceOp.MIN}[op]
    with _collective(_world, what):
        for t in tensors:
            buf = t.to(_device)
            torch.distributed.all_reduce(buf, reduce_op)
            if buf is not t:
                t.copy_(buf)


def share(n: int) -> slice:
    """This rank's contiguous share of ``n`` items (e.g. calibration sequences); sizes differ by at most one."""
    size, extra = divmod(n, _world.size)
    start = _world.rank * size + min(_world.rank, extra)
    return slice(start, start + size + (_world.rank < extra))


@dataclass(frozen=True)
class Part:
    """Pieces ``lo .. hi - 1`` of item ``index``, which the plan cut into ``parts`` parts; ``weight``: their size."""

    index: int
    lo: int
    hi: int
    parts: int
    weight: int

    @property
    def whole(self) -> bool:
        return self.parts == 1


def plan(pieces: Sequence[Sequence[int]], ranks: int | None = None) -> list[list[Part]]:
    """Who does what: for each rank, its parts of the items, in item order (the same on every rank).

    pieces[i]: the sizes (e.g. weight counts) of item i's pieces, where it may be cut (a tensor group:
    everything but its routed experts, then one piece per expert). One rank takes every item whole.
    With N ranks, an item above 1/(8 N) of the total is cut into that many contiguous runs of pieces
    (as many as it has pieces at most), and the parts go, largest first, to the rank with the least
    work so far (longest processing time first; ties to the lower item and rank): the busiest rank
    ends with at most about 1/8 more than an even share, whatever the item sizes.
    """
    ranks = _world.size if ranks is None else ranks
    total = sum(map(sum, pieces))
    cap = total / (CUTS_PER_RANK * ranks) if ranks > 1 else float("inf")
    parts = [p for i, sizes in enumerate(pieces) for p in _cut(i, list(sizes), cap)]
    load = [0] * ranks
    mine: list[list[Part]] = [[] for _ in range(ranks)]
    for part in sorted(parts, key=lambda p: (-p.weight, p.index, p.lo)):
        rank = min(range(ranks), key=lambda r: (load[r], r))
        load[rank] += part.weight
        mine[rank].append(part)
    return [sorted(m, key=lambda p: (p.index, p.lo)) for m in mine]


def _cut(index: int, sizes: list[int], cap: float) -> list[Part]:
    """Item ``index`` in ``ceil(size / cap)`` contiguous runs of its pieces (at most one per piece), each
    ending at the first piece that reaches its even share of the item."""
    size = sum(sizes)
    n = 1 if cap == float("inf") else max(1, min(len(sizes), math.ceil(size / cap)))
    ends, done = [], 0
    for j, s in enumerate(sizes[:-1]):
        done += s
        k = len(ends) + 1  # the cut that would end part k
        if k < n and (done * n >= k * size or len(sizes) - (j + 1) == n - k):  # its share, or one piece a part
            ends.append(j + 1)
    ends.append(len(sizes))
    return [Part(index, lo, hi, n, sum(sizes[lo:hi])) for lo, hi in zip([0, *ends[:-1]], ends)]
