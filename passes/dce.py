"""dce: delete ops whose results are unused and whose removal cannot change behaviour (pure ops,
global loads, calls of functions without stores, scans with pure bodies)."""
from __future__ import annotations

from mlc.ir.core import Block, Module

from .effects import impure_functions, removable_if_unused
from .manager import Pass


def eliminate_dead_ops(block: Block, impure: set[str]) -> int:
    removed = 0
    for op in reversed(block.ops):  # users before their operands' producers
        for region in op.regions:
            for b in region.blocks:
                removed += eliminate_dead_ops(b, impure)
        if removable_if_unused(op, impure):
            op.erase()
            removed += 1
    return removed


class DeadCodeElimination(Pass):
    name = "dce"
    summary = "remove unused side-effect-free ops"

    def run(self, module: Module) -> None:
        impure = impure_functions(module)
        for f in module.functions.values():
            eliminate_dead_ops(f.body, impure)
