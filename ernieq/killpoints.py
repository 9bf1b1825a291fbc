"""A test-only hook that kills this process with SIGKILL at a named point of a long job.

    ERNIEQ_TEST_KILL_AT=<point>:<n>[@<rank>]    # SIGKILL on the n-th arrival at <point> (n >= 1)
                                                # [only in the process of that torchrun RANK]

The resume tests set it on an ``ernieq quantize`` subprocess to stop it where a
real crash, an out-of-memory kill or a pulled plug could: between groups,
mid-shard, mid-pool, before the index, before the final rename. Without the
variable :func:`kill_point` only counts. This module is the one place that
reads the variable.
"""

from __future__ import annotations

import os
import signal

from ernieq.errors import ErnieqError

ENV = "ERNIEQ_TEST_KILL_AT"
_arrivals: dict[str, int] = {}


def _target() -> tuple[str, int] | None:
    spec = os.environ.get(ENV)
    if not spec:
        return None
    where, _, rank = spec.partition("@")
    point, _, count = where.rpartition(":")
    if not point or not count.isdigit() or int(count) < 1 or (rank and not rank.isdigit()):
        raise ErnieqError(f"{ENV}={spec!r}: expected '<point>:<n>[@<rank>]' with n >= 1")
    if rank and rank != os.environ.get("RANK", "0"):
        return None
    return point, int(count)


def kill_point(point: str) -> None:
    """Count an arrival at ``point``; SIGKILL this process if it is the one ``$ERNIEQ_TEST_KILL_AT`` names."""
    _arrivals[point] = _arrivals.get(point, 0) + 1
    target = _target()
    if target is not None and target == (point, _arrivals[point]):
        os.kill(os.getpid(), signal.SIGKILL)
