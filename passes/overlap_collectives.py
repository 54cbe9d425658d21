"""overlap-collectives: an all-reduce begins where it stands and is waited for only where its buffer
is next used, so that the kernels between run while the processes communicate (the gradient buckets
of a data-parallel step overlap the rest of the backward pass: passes/train_step.py).

    mem.all_reduce %g {reduction = "sum"} : memref<4096xf32>
    loop.for ... { ... }                       <- touches neither %g nor what aliases it
    ... mem.load %g[...] ...
becomes
    %request = mem.all_reduce_start %g {reduction = "sum"} : (memref<4096xf32>) -> i64
    loop.for ... { ... }
    mem.collective_progress
    mem.all_reduce_wait %request, %g : i64, memref<4096xf32>
    ... mem.load %g[...] ...

A use of the buffer inside a nested loop counts at that loop, and uses through its aliases
(mem.to_tensor, mem.from_tensor) count; the wait comes at the latest before the block's terminator.
MPI moves a collective along only while a process calls into it, so a `mem.collective_progress`
follows each loop nest run while an all-reduce is in flight.
"""
from __future__ import annotations

from mlc.ir.core import Block, Module, Operation, create_op
from mlc.ir.registry import TERMINATOR
from mlc.ir.types import i64

from .buffer_dealloc import uses_through_aliases
from .manager import Pass


class OverlapCollectives(Pass):
    name = "overlap-collectives"
    summary = "begin each all-reduce where it stands, wait for it where its buffer is next used"

    def run(self, module: Module) -> None:
        for f in module.functions.values():
            for block in {op.parent: None for op in f.body.walk() if op.name == "mem.all_reduce"}:
                overlap(block)


def overlap(block: Block) -> None:
    for op in [op for op in block if op.name == "mem.all_reduce"]:
        buffer = op.operands[0]
        start = create_op("mem.all_reduce_start", [buffer], [i64], op.attributes, loc=op.loc, result_names=["request"])
        block.insert_before(op, start)
        op.erase()
        wait = create_op("mem.all_reduce_wait", [start.results[0], buffer], loc=op.loc)
        block.insert_before(_next_use(block, start), wait)
    in_flight = 0
    for op in list(block):
        if op.name == "mem.all_reduce_start":
            in_flight += 1
        elif op.name == "mem.all_reduce_wait":
            in_flight -= 1
        elif op.regions and in_flight:
            block.insert_after(op, create_op("mem.collective_progress", loc=op.loc))


def _next_use(block: Block, start: Operation) -> Operation:
    """The first op after start in block that uses its buffer (at the level of block), else the terminator."""
    users = set()
    for user in uses_through_aliases(start.operands[0]):
        while user is not None and user.parent is not block:
            user = user.parent_op
        if user is not None:
            users.add(user)
    op = start.next
    while op is not None:
        if op in users or (op is block.last and TERMINATOR in op.opdef.traits):
            return op
        op = op.next
    raise AssertionError("a block ends with its terminator")
