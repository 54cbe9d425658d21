"""canonicalize: constant folding, per-op fold hooks (algebraic identities, see each op's `fold` in
the dialect) and removal of dead pure ops, driven greedily to a fixed point."""
from __future__ import annotations

import numpy as np

from mlc.ir.attributes import DenseAttr
from mlc.ir.core import Module
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

        apply_greedily(module, {"*": [fold]}, self.option("max-iterations"))


def _foldable(op, limit) -> bool:
    return all(isinstance(r.type, TensorType) and r.type.is_static and int(np.prod(r.type.shape)) <= limit
               for r in op.results)


def _constant(rw, op, value: np.ndarray, result):
    t = result.type
    c = rw.create_before(op, "mlc.constant", [], [t], {"value": DenseAttr(np.array(value, t.element.np_dtype).reshape(t.shape), t)},
                         name_hint=result.name_hint)
    return c.result
