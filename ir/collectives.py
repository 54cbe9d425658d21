"""The process-wide communicator that collective ops (`mlc.all_reduce`, `mlc.broadcast`, `mlc.rank`,
`mlc.world_size`; ir/dialects/collectives.py) run on, in the interpreter and in compiled code alike.

By default a program runs alone: world size 1, rank 0, an all-reduce or a broadcast is the identity.
`install(communicator)` replaces that for the whole process (runtime/distributed.py installs one over
MPI); a communicator is any object with

    rank: int, size: int, local_size: int    (local_size: the processes on this machine, which share its cores)
    allreduce(array, reduction) -> array    reduction one of REDUCTIONS; the result has array's shape and dtype
    bcast(array, root) -> array             root's array, on every rank

Both take and return numpy arrays and may return their argument (callers do not write into it).
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np

REDUCTIONS = ("sum", "mean", "max", "min")
ELEMENT_CODES = ("f16", "bf16", "f32", "f64", "i1", "i8", "i32", "i64")  # dtype codes compiled code passes


class SingleProcess:
    """The world of one process."""
    rank = 0
    size = local_size = 1

    def allreduce(self, array: np.ndarray, reduction: str) -> np.ndarray:
        return array

    def bcast(self, array: np.ndarray, root: int) -> np.ndarray:
        check_root(root, self.size)
        return array


def check_root(root: int, size: int) -> None:
    if not 0 <= root < size:
        raise ValueError(f"root {root} is not a rank of a world of {size} process{'es' if size != 1 else ''}")


_current = SingleProcess()


def current():
    """The communicator collectives run on now."""
    return _current


def install(communicator) -> object:
    """Make `communicator` (None: the single process) the process's; returns the one it replaces."""
    global _current
    previous, _current = _current, communicator if communicator is not None else SingleProcess()
    return previous


@contextmanager
def using(communicator):
    """`with using(c):` runs collectives on c, then restores the previous communicator."""
    previous = install(communicator)
    try:
        yield communicator
    finally:
        install(previous)
