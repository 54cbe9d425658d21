"""The process-wide communicator that collective ops (`mlc.all_reduce`, `mlc.broadcast`, `mlc.rank`,
`mlc.world_size`; ir/dialects/collectives.py) run on, in the interpreter and in compiled code alike.

By default a program runs alone: world size 1, rank 0, an all-reduce or a broadcast is the identity.
`install(communicator)` replaces that for the whole process (runtime/distributed.py installs one over
MPI); a communicator is any object with

    rank: int, size: int, local_size: int    (local_size: the processes on this machine, which share its cores)
    allreduce(array, reduction) -> array    reduction one of REDUCTIONS; the result has array's shape and dtype
    bcast(array, root) -> array             root's array, on every rank

Both take and return numpy arrays and may return their argument (callers do not write into it).
A communicator may also offer

    iallreduce(buffer, reduction) -> pending    starts reducing the contiguous buffer in place;
                                                pending.test() -> bool (advances it), pending.wait()

which `start_allreduce` uses, so that work runs while the processes communicate; with the others the
all-reduce happens at `finish`.
"""
from __future__ import annotations

import itertools
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


# --- all-reduces begun and not yet waited for (mem.all_reduce_start / _wait) ---------------------------

class _AtTheWait:
    """An all-reduce on a communicator that only blocks: it runs when waited for."""

    def __init__(self, communicator, buffer: np.ndarray, reduction: str):
        self.communicator, self.buffer, self.reduction = communicator, buffer, reduction

    def test(self) -> bool:
        return False

    def wait(self) -> None:
        self.buffer[...] = self.communicator.allreduce(self.buffer.copy(), self.reduction)


_pending: dict[int, object] = {}
_requests = itertools.count(1)


def start_allreduce(buffer: np.ndarray, reduction: str) -> int:
    """Begins reducing buffer (contiguous; rewritten in place) over the world; returns the request
    `finish` takes. Every process must begin its collectives in the same order."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction '{reduction}' (known: {', '.join(REDUCTIONS)})")
    begin = getattr(_current, "iallreduce", None)
    request = next(_requests)
    _pending[request] = begin(buffer, reduction) if begin else _AtTheWait(_current, buffer, reduction)
    return request


def finish(request: int) -> None:
    """Waits until the all-reduce `request` has rewritten its buffer."""
    pending = _pending.pop(request, None)
    if pending is None:
        raise ValueError(f"no all-reduce in progress with request {request}")
    pending.wait()


def abandon(request: int) -> None:
    """Lets the all-reduce `request` (0: none) finish without waiting for its result where it is in
    flight (its buffer is about to be freed); one that runs at the wait is dropped."""
    pending = _pending.pop(request, None)
    if pending is not None and not isinstance(pending, _AtTheWait):
        pending.wait()


def progress() -> None:
    """Advances every all-reduce in progress (MPI's move only while a process tests them)."""
    for pending in list(_pending.values()):
        pending.test()
