"""buffer-dealloc: each buffer is freed right after its last use in the block that allocated it, so
intermediates do not all live until the end of the function (or of a loop's iteration).

    %a = mem.alloc %n : (index) -> memref<?x32xf32>
    loop.for ... { ... mem.load %a ... }          <- the last use (at the level of the alloc's block)
    mem.dealloc %a : memref<?x32xf32>              <- inserted here

A use inside a nested loop counts at that loop. `mem.to_tensor`, `mem.from_tensor`, `mem.reshape` and `mem.subview`
name the same memory in native code, so uses of what they make count too, and a buffer that reaches `func.return`
through them is handed to the caller, not freed. A buffer already freed is left alone.
"""
from __future__ import annotations

from mlc.ir.core import Block, Module, Operation, Value, create_op

from .manager import Pass

ALIASES = ("mem.to_tensor", "mem.from_tensor", "mem.reshape", "mem.subview")


class BufferDealloc(Pass):
    name = "buffer-dealloc"
    summary = "free each buffer after its last use in the block that allocated it"

    def run(self, module: Module) -> None:
        for f in module.functions.values():
            for block in f.body.nested_blocks():
                free_after_last_use(block)


def free_after_last_use(block: Block) -> None:
    position = {op: i for i, op in enumerate(block)}
    for alloc in [op for op in block if op.name == "mem.alloc"]:
        users = uses_through_aliases(alloc.results[0])
        if any(u.name in ("mem.dealloc", "func.return") for u in users):
            continue
        last = alloc
        for user in users:
            while user.parent is not block:
                user = user.parent_op
            if position[user] > position[last]:
                last = user
        dealloc = create_op("mem.dealloc", [alloc.results[0]], [], loc=alloc.loc)
        if last is block.last and last.opdef is not None and "terminator" in last.opdef.traits:
            block.insert_before(last, dealloc)
        else:
            block.insert_after(last, dealloc)


def uses_through_aliases(buffer: Value) -> list[Operation]:
    """The ops that use buffer, directly or through an alias of it."""
    users = []
    for user in buffer.users:
        users.append(user)
        if user.name in ALIASES:
            users += uses_through_aliases(user.results[0])
    return users
