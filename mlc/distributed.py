"""Data-parallel runs over MPI (mpi4py; `pip install 'mlc[dist]'`).

    import mlc.distributed
    mlc.distributed.init()                 # under `mpiexec -n N python train.py`
    mlc.distributed.rank(), mlc.distributed.world_size()

After `init`, the collective ops (`mlc.all_reduce`, `mlc.broadcast`, `mlc.rank`, `mlc.world_size`) span
the N processes, in the interpreter and in compiled code; without it (or with one process) they mean
a world of one. `using(communicator)` runs a block on any communicator (ir/collectives.py says what
one is), e.g. a simulated one in tests.
"""
from __future__ import annotations

from .ir.collectives import REDUCTIONS, SingleProcess, current, install, using  # noqa: F401
from .runtime.distributed import MPICommunicator, init, shutdown  # noqa: F401


def rank() -> int:
    return current().rank


def world_size() -> int:
    return current().size
