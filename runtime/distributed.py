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
    i64 mlc_rank()
    i64 mlc_world_size()

`dtype` indexes ELEMENT_CODES and `reduction` REDUCTIONS (ir/collectives.py). A failure is reported
on standard error and the compiled function stops with a located error.
"""
from __future__ import annotations

import ctypes
import sys

import numpy as np

from mlc.ir import collectives
from mlc.ir.collectives import ELEMENT_CODES, REDUCTIONS, check_root
from mlc.ir.types import ElementType, round_to_element

_MPI_NATIVE = {np.dtype(t) for t in (np.float32, np.float64, np.int8, np.int16, np.int32, np.int64,
                                     np.uint8, np.uint16, np.uint32, np.uint64)}


class MPICommunicator:
    """A communicator over an mpi4py one (by default COMM_WORLD). All-reduces run in place on a
    contiguous copy (f16 and other narrow floats summed in f32, booleans as bytes); mean is the sum
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

    def allreduce(self, array: np.ndarray, reduction: str) -> np.ndarray:
        if reduction not in REDUCTIONS:
            raise ValueError(f"unknown reduction '{reduction}' (known: {', '.join(REDUCTIONS)})")
        array = np.asarray(array)
        wire = array.dtype if array.dtype in _MPI_NATIVE else np.dtype(np.uint8) if array.dtype == np.bool_ \
            else np.dtype(np.float32)
        work = np.array(array, dtype=wire, order="C").reshape(-1)
        op = {"sum": self.MPI.SUM, "mean": self.MPI.SUM, "max": self.MPI.MAX, "min": self.MPI.MIN}[reduction]
        self.comm.Allreduce(self.MPI.IN_PLACE, work, op=op)
        if reduction == "mean":
            work = work / self.size if work.dtype.kind == "f" else work // self.size
        return work.astype(array.dtype).reshape(array.shape)

    def bcast(self, array: np.ndarray, root: int) -> np.ndarray:
        check_root(root, self.size)
        work = np.array(array, order="C")
        self.comm.Bcast([work.reshape(-1).view(np.uint8), self.MPI.BYTE], root=root)
        return work


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


def _all_reduce(data, count, code, reduction) -> int:
    try:
        buf, element = _view(data, count, code)
        buf[...] = round_to_element(np.asarray(collectives.current().allreduce(buf.copy(), REDUCTIONS[reduction])), element)
        return 0
    except Exception as e:  # (never into native code)
        print(f"mlc: mlc.all_reduce failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


def _broadcast(data, count, code, root) -> int:
    try:
        buf, _ = _view(data, count, code)
        buf[...] = collectives.current().bcast(buf.copy(), int(root))
        return 0
    except Exception as e:
        print(f"mlc: mlc.broadcast failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


_COLLECTIVE = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_int32)
_BROADCAST = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_int64)
_INFO = ctypes.CFUNCTYPE(ctypes.c_int64)

CALLBACKS = {  # symbol -> ctypes function (kept alive here for the life of the process)
    "mlc_all_reduce": _COLLECTIVE(_all_reduce),
    "mlc_broadcast": _BROADCAST(_broadcast),
    "mlc_rank": _INFO(lambda: collectives.current().rank),
    "mlc_world_size": _INFO(lambda: collectives.current().size),
}
