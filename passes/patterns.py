"""A tiny rewrite-pattern API and one greedy driver (as MLIR's applyPatternsGreedily).

A pattern is a function `(op, rewriter) -> bool` registered for op names ("*" for every op); it
rewrites through the rewriter and returns True when it changed something.
"""
from __future__ import annotations

from mlc.ir.core import Module, Operation, Value, create_op


class Rewriter:
    def __init__(self):
        self.worklist: list[Operation] = []
        self.queued: set[int] = set()
        self.changed = False

    def push(self, op: Operation | None):
        if op is not None and id(op) not in self.queued:
            self.queued.add(id(op))
            self.worklist.append(op)

    def replace_op(self, op: Operation, values):
        """Replace op's results by `values` (Values), then erase op."""
        for r, v in zip(op.results, values):
            for user, _ in list(r.uses):
                self.push(user)
            r.replace_all_uses_with(v)
        self.erase_op(op)

    def erase_op(self, op: Operation):
        for v in op.operands:
            d = v.defining_op()
            self.push(d)
        op.erase()
        self.changed = True

    def create_before(self, anchor: Operation, name, operands, result_types, attributes=None, name_hint=None) -> Operation:
        new = create_op(name, operands, result_types, attributes, loc=anchor.loc,
                        result_names=[name_hint] * len(result_types) if name_hint else None)
        anchor.parent.insert_before(anchor, new)
        self.push(new)
        self.changed = True
        return new

    def set_operand(self, op: Operation, i: int, v: Value):
        old = op.operands[i].defining_op()
        op.set_operand(i, v)
        self.push(op)
        self.push(old)
        self.changed = True


def apply_greedily(module: Module, patterns: dict, max_iterations: int = 10) -> bool:
    """Apply patterns until nothing changes (or max_iterations sweeps); returns whether anything did."""
    any_change = False
    for _ in range(max_iterations):
        rw = Rewriter()
        for op in reversed(list(module.walk())):  # popped in program order
            rw.push(op)
        while rw.worklist:
            op = rw.worklist.pop()
            rw.queued.discard(id(op))
            if op.parent is None:  # erased meanwhile
                continue
            for pattern in [*patterns.get(op.name, ()), *patterns.get("*", ())]:
                if op.parent is not None and pattern(op, rw):
                    break
        any_change |= rw.changed
        if not rw.changed:
            break
    return any_change
