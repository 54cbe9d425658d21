"""Distributed runs over MPI, and the calls compiled code makes for collective ops.

    from mlc.runtime import distributed
    distributed.init()        # under `mpiexec -n N`: collectives now span the N processes

`init` installs an `MPICommunicator` (mpi4py, imported only then) as the process's communicator
(ir/collectives.py) when the world has more than one process; the interpreter and compiled code both
run their collectives on it.

Compiled code (codegen/llvm.py) calls back into Python for each collective; `CALLBACKS` holds the
functions runtime/jit.py hands the JIT:

    i32 mlc_all_reduce(ptr data, i64 count, i32 dtype, i32 reduction)   in place; 0, or 1 on failure
    i32 mlc_broadcast(ptr data, i64 count, i32 dtype, i64 root)         in place; 0, or 1 on failure
    i64 mlc_all_reduce_start(ptr data, i64 count, i32 dtype, i32 reduction)   a request, or -1 on failure
    i32 mlc_all_reduce_wait(i64 request, ptr data, i64 count, i32 dtype)      0, or 1 on failure
    void mlc_collective_progress()                                            advances what is in flight
    void mlc_all_reduce_abandon(i64 request)     on a failure: lets it finish (0: none)
    i64 mlc_rank()
    i64 mlc_world_size()

`dtype` indexes ELEMENT_CODES and `reduction` REDUCTIONS (ir/collectives.py). A failure is reported
on standard error and the compiled function stops with a located error.

A process that waits too long in a collective ends the job: MPI's collectives block until every
process joins, so one hung process (alive, not crashed: a deadlock, a stopped process, a lost host)
would otherwise hold the others forever. Every collective is started non-blocking (Iallreduce,
Ibcast) and waited for with Test: in a tight loop for the first SPIN_S seconds (the waits of a
healthy run; MPI's collectives progress only while a process tests, so sleeping here would stall
them: a 200 kB all-reduce took 8 ms instead of 0.2-1 ms), yielding the core every 64 tests as MPI's
own waits do (on a shared machine that doubled the steps per second of the worst runs), then with
sleeps growing to 1 ms, up to MLC_COLLECTIVE_TIMEOUT seconds (default 600, as
torch.distributed's; 0: wait forever). Past it the process prints which collective, how large and
how long it waited, and calls MPI Abort.
"""
from __future__ import annotations

import ctypes
import os
import sys
import time

import numpy as np

from mlc.ir import collectives
from mlc.ir.collectives import ELEMENT_CODES, REDUCTIONS, check_root
from mlc.ir.types import ElementType, round_to_element

TIMEOUT_VARIABLE = "MLC_COLLECTIVE_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
SPIN_S = 0.2  # waits shorter than this spin on Test (no sleep between tests)
LONGEST_SLEEP_S = 1e-3
ABORT_GRACE_S = 0.5  # between a process's last message and MPI Abort

_MPI_NATIVE = {np.dtype(t) for t in (np.float32, np.float64, np.int8, np.int16, np.int32, np.int64,
                                     np.uint8, np.uint16, np.uint32, np.uint64)}


class MPICommunicator:
    """A communicator over an mpi4py one (by default COMM_WORLD). All-reduces run in place on the
    buffer (f16 and other narrow floats summed in f32 on a copy, booleans as bytes); mean is the sum
    divided by the world size; broadcasts move raw bytes."""

    def __init__(self, comm=None):
        try:
            from mpi4py import MPI
        except ImportError as e:
            raise ImportError(f"distributed runs need mpi4py (pip install 'mlc[dist]'): {e}") from None
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.local_size = self.comm.Split_type(MPI.COMM_TYPE_SHARED).Get_size()  # (they share this machine's cores)
        self.timeout = collective_timeout()

    def allreduce(self, array: np.ndarray, reduction: str) -> np.ndarray:
        work = np.array(array, order="C")
        self.iallreduce(work, reduction).wait()
        return work

    def iallreduce(self, buffer: np.ndarray, reduction: str) -> "_Reduction":
        """Starts reducing the contiguous buffer in place (ir/collectives.py's protocol)."""
        if reduction not in REDUCTIONS:
            raise ValueError(f"unknown reduction '{reduction}' (known: {', '.join(REDUCTIONS)})")
        wire = buffer.dtype if buffer.dtype in _MPI_NATIVE else np.dtype(np.uint8) if buffer.dtype == np.bool_ \
            else np.dtype(np.float32)
        in_place = wire == buffer.dtype and buffer.flags.c_contiguous
        work = buffer.reshape(-1) if in_place else np.array(buffer, dtype=wire, order="C").reshape(-1)
        op = {"sum": self.MPI.SUM, "mean": self.MPI.SUM, "max": self.MPI.MAX, "min": self.MPI.MIN}[reduction]
        return _Reduction(self, self.comm.Iallreduce(self.MPI.IN_PLACE, work, op=op), None if in_place else buffer,
                          work, reduction)

    def bcast(self, array: np.ndarray, root: int) -> np.ndarray:
        check_root(root, self.size)
        work = np.array(array, order="C")
        self.wait(self.comm.Ibcast([work.reshape(-1).view(np.uint8), self.MPI.BYTE], root=root), "broadcast", work.nbytes)
        return work

    def wait(self, request, what: str, nbytes: int) -> None:
        """Until request completes (see the module docstring); past the timeout, ends the job."""
        if request.Test():
            return
        started = time.monotonic()
        pause = 0.0
        while True:
            for _ in range(64):
                if request.Test():
                    return
                if pause:
                    time.sleep(pause)
            if not pause:
                os.sched_yield()  # (as MPI's own waits do now and then: a process sharing this core may run)
            waited = time.monotonic() - started
            if self.timeout and waited >= self.timeout:
                self.give_up(what, nbytes, waited)
            if waited >= SPIN_S:
                pause = min(LONGEST_SLEEP_S, max(pause * 2, 5e-5))

    def give_up(self, what: str, nbytes: int, waited: float) -> None:
        print(f"mlc: rank {self.rank}: {what} of {_size(nbytes)} waited {_seconds(waited)} s for the other processes "
              f"({TIMEOUT_VARIABLE}={self.timeout:g}); ending the job", file=sys.stderr, flush=True)
        abort(self.comm)


class _Reduction:
    """An all-reduce in flight on an MPICommunicator."""

    def __init__(self, communicator: MPICommunicator, request, copied_from, work: np.ndarray, reduction: str):
        self.communicator, self.request, self.reduction = communicator, request, reduction
        self.work, self.copied_from = work, copied_from  # (the buffer, when work is a copy of it in another type)

    def test(self) -> bool:
        return self.request.Test()

    def wait(self) -> None:
        work = self.work
        self.communicator.wait(self.request, "all_reduce", work.nbytes)
        if self.reduction == "mean":
            if work.dtype.kind == "f":
                work /= self.communicator.size
            else:
                work //= self.communicator.size
        if self.copied_from is not None:
            self.copied_from[...] = work.reshape(self.copied_from.shape)


def abort(comm=None, code: int = 1) -> None:
    """MPI Abort: every process of the job ends. The launcher forwards what this process wrote before
    it ends them, given a moment (without it a process's last words were sometimes lost)."""
    if comm is None:
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
    sys.stdout.flush()
    sys.stderr.flush()
    time.sleep(ABORT_GRACE_S)
    comm.Abort(code)


def collective_timeout() -> float:
    """Seconds a process waits in a collective before ending the job (MLC_COLLECTIVE_TIMEOUT; 0: no limit)."""
    text = os.environ.get(TIMEOUT_VARIABLE, "").strip()
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"{TIMEOUT_VARIABLE} must be a number of seconds (0: no limit), got '{text}'")
    return value


def _seconds(s: float) -> str:
    return f"{s:.0f}" if s >= 10 else f"{s:.1f}"


def _size(nbytes: int) -> str:
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.0f} {unit}"
    return f"{nbytes} bytes"


def init(comm=None):
    """Join the MPI world (mpi4py's COMM_WORLD, or `comm`): with more than one process, collectives
    run across them from now on. Returns the process's communicator (rank, size)."""
    communicator = MPICommunicator(comm)
    if communicator.size > 1:
        collectives.install(communicator)
    return collectives.current()


def shutdown() -> None:
    """Back to a world of one process (MPI itself is finalised when the process exits)."""
    collectives.install(None)


# --- what compiled code calls ------------------------------------------------------------------------

def _view(data: int, count: int, code: int) -> tuple[np.ndarray, ElementType]:
    """The buffer at `data` as a writable numpy array (bf16 is stored as f32, i1 as bytes, as numpy
    holds them)."""
    element = ElementType(ELEMENT_CODES[code])
    dtype = element.np_dtype
    if count == 0:
        return np.empty(0, dtype), element
    return np.frombuffer((ctypes.c_uint8 * (count * dtype.itemsize)).from_address(data), dtype), element


def _all_reduce_start(data, count, code, reduction) -> int:
    try:
        return collectives.start_allreduce(_view(data, count, code)[0], REDUCTIONS[reduction])
    except BaseException as e:  # (never into native code: ctypes would drop it, an interrupt included)
        _report("all_reduce", e)
        return -1


def _all_reduce_wait(request, data, count, code) -> int:
    try:
        collectives.finish(request)
        buf, element = _view(data, count, code)
        buf[...] = round_to_element(buf, element)  # (bf16 sums, held in f32)
        return 0
    except BaseException as e:  # (an interrupt in the wait included)
        _report("all_reduce", e)
        return 1


def _all_reduce(data, count, code, reduction) -> int:
    request = _all_reduce_start(data, count, code, reduction)
    return 1 if request < 0 else _all_reduce_wait(request, data, count, code)


def _abandon(request) -> None:
    try:
        collectives.abandon(request)
    except BaseException as e:
        _report("all_reduce", e)


def _progress() -> None:
    try:
        collectives.progress()
    except BaseException as e:  # (the wait reports it again)
        _report("collective_progress", e)


def _report(op: str, e: BaseException) -> None:
    print(f"mlc: mlc.{op} failed: {type(e).__name__}: {e}", file=sys.stderr)


def _broadcast(data, count, code, root) -> int:
    try:
        buf, _ = _view(data, count, code)
        buf[...] = collectives.current().bcast(buf.copy(), int(root))
        return 0
    except BaseException as e:
        _report("broadcast", e)
        return 1


_COLLECTIVE = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_int32)
_BROADCAST = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_int64)
_INFO = ctypes.CFUNCTYPE(ctypes.c_int64)
_START = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_int32)
_WAIT = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32)
_PROGRESS = ctypes.CFUNCTYPE(None)
_ABANDON = ctypes.CFUNCTYPE(None, ctypes.c_int64)

CALLBACKS = {  # symbol -> ctypes function (kept alive here for the life of the process)
    "mlc_all_reduce": _COLLECTIVE(_all_reduce),
    "mlc_all_reduce_start": _START(_all_reduce_start),
    "mlc_all_reduce_wait": _WAIT(_all_reduce_wait),
    "mlc_collective_progress": _PROGRESS(_progress),
    "mlc_all_reduce_abandon": _ABANDON(_abandon),
    "mlc_broadcast": _BROADCAST(_broadcast),
    "mlc_rank": _INFO(lambda: collectives.current().rank),
    "mlc_world_size": _INFO(lambda: collectives.current().size),
}
