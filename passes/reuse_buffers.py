"""reuse-buffers: an allocation takes over a buffer freed earlier in the same block when their types
and run-time sizes (the same SSA values) match, instead of a fresh malloc.

lower-to-loops frees every buffer right after its last use, so the `mem.dealloc`s are the liveness
facts: a buffer freed before an allocation is dead there, and handing it over is safe. Fewer fresh
allocations means fewer page faults on the large buffers of a model's layers, and a lower peak.

    mem.dealloc %a : memref<?x32xf32>              (removed)
    %b = mem.alloc %n : (index) -> memref<?x32xf32> (removed; %b's uses now use %a)
"""
from __future__ import annotations

from mlc.ir.core import Block, Module

from .manager import Pass


def reuse_in_block(block: Block) -> int:
    free = []  # (key, buffer, its dealloc), in the order they were freed
    reused = 0
    for op in list(block):
        for region in op.regions:
            for inner in region.blocks:
                reused += reuse_in_block(inner)
        if op.name == "mem.dealloc":
            alloc = op.operands[0].defining_op()
            if alloc is not None and alloc.name == "mem.alloc" and alloc.parent is block:
                free.append(((alloc.results[0].type, tuple(alloc.operands)), op.operands[0], op))
        elif op.name == "mem.alloc":
            key = (op.results[0].type, tuple(op.operands))
            match = next((entry for entry in free if entry[0] == key), None)
            if match is not None:
                free.remove(match)
                _, buffer, dealloc = match
                dealloc.erase()
                op.results[0].replace_all_uses_with(buffer)
                op.erase()
                reused += 1
    return reused


class ReuseBuffers(Pass):
    name = "reuse-buffers"
    summary = "hand freed buffers to later allocations of the same type and size"

    def run(self, module: Module) -> None:
        for f in module.functions.values():
            reuse_in_block(f.body)
