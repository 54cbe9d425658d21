"""canonicalize: constant folding, per-op fold hooks (algebraic identities, see each op's `fold` in
the dialect), removal of dead pure ops and hoisting of loop-invariant ops out of scans, driven
greedily to a fixed point."""
from __future__ import annotations

import numpy as np

from mlc.ir.attributes import DenseAttr
from mlc.ir.core import BlockArgument, Module
from mlc.ir.diagnostics import DiagnosticError
from mlc.ir.registry import HAS_REGION, PURE
from mlc.ir.types import TensorType

from .effects import impure_functions, removable_if_unused
from .manager import Pass
from .patterns import apply_greedily


def constant_value(v):
    op = v.defining_op()
    if op is not None and op.name == "mlc.constant":
        return op.attributes["value"].value
    return None


class Canonicalize(Pass):
    name = "canonicalize"
    summary = "fold constants and algebraic identities, remove dead pure ops"
    options = {"max-iterations": 10, "fold-limit": 1 << 16}

    def run(self, module: Module) -> None:
        from mlc.ir.interpreter import Interpreter
        evaluator = Interpreter(Module())
        impure = impure_functions(module)
        limit = self.option("fold-limit")

        def fold(op, rw):
            d = op.opdef
            if d is None:
                return False
            if not any(r.uses for r in op.results) and removable_if_unused(op, impure):
                rw.erase_op(op)
                return True
            if PURE not in d.traits or HAS_REGION in d.traits or op.name == "mlc.constant":
                return False
            consts = [constant_value(v) for v in op.operands]
            if consts and all(c is not None for c in consts) and _foldable(op, limit):
                try:
                    values = evaluator.run_op(op, consts)
                except DiagnosticError:
                    return False  # leave the op for run time to report
                rw.replace_op(op, [_constant(rw, op, v, r) for v, r in zip(values, op.results)])
                return True
            old_operands = list(op.operands)
            replacement = d.fold(op, consts)
            if replacement is None:
                return False
            if all(a is b for a, b in zip(replacement, op.results)):  # updated in place
                for v in old_operands:
                    rw.push(v.defining_op())
                rw.push(op)
                rw.changed = True
                return True
            rw.replace_op(op, [_constant(rw, op, v, r) if isinstance(v, np.ndarray) else v
                               for v, r in zip(replacement, op.results)])
            return True

        apply_greedily(module, {"*": [fold, hoist_out_of_scan]}, self.option("max-iterations"))


def hoist_out_of_scan(op, rw) -> bool:
    """A pure op in a scan's body that uses only values from outside it (a transpose of a weight, a
    broadcast) is computed once, before the scan."""
    scan = op.parent_op
    if scan is None or scan.name != "mlc.scan" or op.opdef is None or PURE not in op.opdef.traits \
            or HAS_REGION in op.opdef.traits or not op.operands or any(_inside(v, scan) for v in op.operands):
        return False
    op.detach()
    scan.parent.insert_before(scan, op)
    for r in op.results:
        for user, _ in list(r.uses):
            rw.push(user)
    rw.changed = True
    return True


def _inside(v, region_op) -> bool:
    """Whether v is defined within region_op's regions."""
    block = v.owner if isinstance(v, BlockArgument) else v.defining_op().parent
    while block is not None:
        owner = block.parent.parent if block.parent is not None else None
        if owner is region_op:
            return True
        block = owner.parent if owner is not None else None
    return False


def _foldable(op, limit) -> bool:
    return all(isinstance(r.type, TensorType) and r.type.is_static and int(np.prod(r.type.shape)) <= limit
               for r in op.results)


def _constant(rw, op, value: np.ndarray, result):
    t = result.type
    c = rw.create_before(op, "mlc.constant", [], [t], {"value": DenseAttr(np.array(value, t.element.np_dtype).reshape(t.shape), t)},
                         name_hint=result.name_hint)
    return c.result
