"""Collective ops: data shared between the processes of a distributed run.

    %s = mlc.all_reduce %g {reduction = "mean"} : (tensor<64x32xf32>) -> tensor<64x32xf32>
    %w = mlc.broadcast %w0 {root = 0} : (tensor<64x32xf32>) -> tensor<64x32xf32>
    %r = mlc.rank : tensor<i64>
    %n = mlc.world_size : tensor<i64>

They run on the process's communicator (ir/collectives.py): alone, or on the interpreter without one
installed, the world is one process, so an all-reduce and a broadcast are the identity, the rank is 0
and the world size 1. Every process must run the same collectives in the same order (as in MPI).

Collectives have effects beyond the process, as in MLIR: they are never folded, merged (cse), moved
or removed when unused (their declarations carry no PURE trait); rank and world size read the
communicator (READS: removable when unused, never merged).

Gradients take the objective to be the sum of every process's loss (data parallelism then averages
with an all-reduce mean of the gradients):
  all_reduce sum   the cotangent all-reduced with sum (mean: with mean)
  all_reduce max   the summed cotangent goes to the processes holding the extremum, split evenly on a
                   tie (min likewise), as torch.amax does among elements
  broadcast        the cotangents summed over processes, delivered to the root; the others get zeros

Their loop-level forms work on a buffer in place: `mem.all_reduce %buf {reduction}`,
`mem.broadcast %buf {root}`, and `mem.rank`, `mem.world_size` give an i64. An all-reduce may also be
split in two, `%r = mem.all_reduce_start %buf {reduction}` ... `mem.all_reduce_wait %r, %buf`, with
`mem.collective_progress` between the kernels that run meanwhile. The CPU backend calls the runtime
for each (codegen/llvm.py, runtime/jit.py).
"""
from __future__ import annotations

import numpy as np

from .. import collectives
from ..registry import READS, Attr, OpDef, VerifyError
from ..types import MemRefType, TensorType, i64, round_to_element
from .mlc import RuntimeCheck
from .shapes import require_element, tensor_type


def _communicate(fn, *args):
    try:
        return fn(*args)
    except ValueError as e:  # (a root outside the world)
        raise RuntimeCheck(str(e)) from None


class AllReduce(OpDef):
    """The operand combined elementwise over every process (`reduction`: sum, mean, max or min); every
    process gets the result. Like StableHLO's all_reduce over the whole world."""
    name = "mlc.all_reduce"
    operands = 1
    attrs = {"reduction": Attr("str", "sum", choices=collectives.REDUCTIONS)}

    @staticmethod
    def infer(op, ctx):
        t = tensor_type(op.operand_types[0], "operand 0")
        require_element(t, "float" if op.attr("reduction") == "mean" else "num")
        return [t]

    @staticmethod
    def interpret(ins, op, ctx):
        x = np.array(ins[0], order="C")  # (ascontiguousarray would make a rank-0 array rank 1)
        return np.array(_communicate(collectives.current().allreduce, x, op.attr("reduction")), dtype=x.dtype)

    @staticmethod
    def vjp(d, op, g):
        reduction = op.attr("reduction")
        if reduction in ("sum", "mean"):
            return [d("mlc.all_reduce", g, reduction=reduction)]
        x, y = op.operands[0], op.results[0]
        hit = d("mlc.eq", x, y)
        count = d("mlc.all_reduce", d("mlc.select", hit, d.scalar(1, x), d.scalar(0, x)), reduction="sum")
        total = d("mlc.all_reduce", g, reduction="sum")
        return [d("mlc.select", hit, d("mlc.div", total, count), d.scalar(0, g))]


class Broadcast(OpDef):
    """The root process's operand, on every process."""
    name = "mlc.broadcast"
    operands = 1
    attrs = {"root": Attr("int", 0)}

    @staticmethod
    def infer(op, ctx):
        t = tensor_type(op.operand_types[0], "operand 0")
        if op.attr("root") < 0:
            raise VerifyError(f"'root' must be a rank (>= 0), got {op.attr('root')}")
        return [t]

    @staticmethod
    def interpret(ins, op, ctx):
        x = np.array(ins[0], order="C")  # (ascontiguousarray would make a rank-0 array rank 1)
        return np.array(_communicate(collectives.current().bcast, x, op.attr("root")), dtype=x.dtype)

    @staticmethod
    def vjp(d, op, g):
        rank = d("mlc.rank", result_type=TensorType((), i64))
        total = d("mlc.all_reduce", g, reduction="sum")
        return [d("mlc.select", d("mlc.eq", rank, d.scalar(op.attr("root"), rank)), total, d.scalar(0, g))]


class ProcessInfo(OpDef):
    """A fact about the world as a tensor<i64>; no operands, no gradient."""
    traits = {READS}
    vjp = staticmethod(lambda d, op, g: [])

    @staticmethod
    def infer(op, ctx):
        return [TensorType((), i64)]


class Rank(ProcessInfo):
    """This process's index in the world, 0 <= rank < world_size."""
    name = "mlc.rank"

    @staticmethod
    def interpret(ins, op, ctx):
        return np.array(collectives.current().rank, np.int64)


class WorldSize(ProcessInfo):
    """The number of processes."""
    name = "mlc.world_size"

    @staticmethod
    def interpret(ins, op, ctx):
        return np.array(collectives.current().size, np.int64)


# ---------------------------------------------------------------------------------------------------
# Loop level: in place on a buffer

def _buffer(op, ctx) -> list:
    if not isinstance(op.operand_types[0], MemRefType):
        raise VerifyError(f"operand 0 must be a memref, got {op.operand_types[0]}")
    return []


class MemAllReduce(OpDef):
    """mlc.all_reduce written over its buffer."""
    name = "mem.all_reduce"
    operands = 1
    results = 0
    attrs = AllReduce.attrs
    infer = staticmethod(_buffer)

    @staticmethod
    def interpret(ins, op, ctx):
        ins[0][...] = _communicate(collectives.current().allreduce, ins[0].copy(), op.attr("reduction"))
        return []


class MemAllReduceStart(OpDef):
    """mem.all_reduce begun: the buffer is the communicator's until `mem.all_reduce_wait` on the
    request (an i64) this gives, so the work between them overlaps the communication
    (passes/overlap_collectives.py). The interpreter, like a communicator that only blocks, reduces at
    the wait."""
    name = "mem.all_reduce_start"
    operands = 1
    attrs = AllReduce.attrs

    @staticmethod
    def infer(op, ctx):
        _buffer(op, ctx)
        return [i64]

    @staticmethod
    def interpret(ins, op, ctx):
        return np.int64(_communicate(collectives.start_allreduce, ins[0], op.attr("reduction")))


class MemAllReduceWait(OpDef):
    """Waits for the all-reduce `request` of the buffer: `mem.all_reduce_wait %request, %buf`."""
    name = "mem.all_reduce_wait"
    operands = 2
    results = 0

    @staticmethod
    def infer(op, ctx):
        if op.operand_types[0] != i64:
            raise VerifyError(f"operand 0 must be the i64 request of a mem.all_reduce_start, got {op.operand_types[0]}")
        if not isinstance(op.operand_types[1], MemRefType):
            raise VerifyError(f"operand 1 must be a memref, got {op.operand_types[1]}")
        return []

    @staticmethod
    def interpret(ins, op, ctx):
        _communicate(collectives.finish, int(ins[0]))
        element = op.operand_types[1].element
        ins[1][...] = round_to_element(ins[1], element)  # (bf16 sums, held in f32)
        return []


class MemCollectiveProgress(OpDef):
    """Lets the collectives begun and not yet waited for advance (MPI's progress their waits would
    otherwise make all at once); placed between the kernels they overlap."""
    name = "mem.collective_progress"
    results = 0
    interpret = staticmethod(lambda ins, op, ctx: collectives.progress() or [])


class MemBroadcast(OpDef):
    """mlc.broadcast written over its buffer."""
    name = "mem.broadcast"
    operands = 1
    results = 0
    attrs = Broadcast.attrs
    infer = staticmethod(_buffer)

    @staticmethod
    def interpret(ins, op, ctx):
        ins[0][...] = _communicate(collectives.current().bcast, ins[0].copy(), op.attr("root"))
        return []


class MemRank(OpDef):
    name = "mem.rank"
    traits = {READS}
    infer = staticmethod(lambda op, ctx: [i64])
    interpret = staticmethod(lambda ins, op, ctx: np.int64(collectives.current().rank))


class MemWorldSize(OpDef):
    name = "mem.world_size"
    traits = {READS}
    infer = staticmethod(lambda op, ctx: [i64])
    interpret = staticmethod(lambda ins, op, ctx: np.int64(collectives.current().size))
