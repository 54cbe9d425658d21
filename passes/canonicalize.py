"""canonicalize: constant folding, per-op fold hooks (algebraic identities, see each op's `fold` in
the dialect), removal of dead pure ops and hoisting of loop-invariant ops out of scans, driven
greedily to a fixed point."""
from __future__ import annotations

import numpy as np

from mlc.ir.attributes import UNIT, DenseAttr, to_attr
from mlc.ir.core import BlockArgument, Module
from mlc.ir.diagnostics import DiagnosticError
from mlc.ir.dialects.mlc import constant_value
from mlc.ir.registry import HAS_REGION, PURE
from mlc.ir.types import TensorType

from .effects import impure_functions, removable_if_unused
from .manager import Pass
from .patterns import apply_greedily


class Canonicalize(Pass):
    name = "canonicalize"
    summary = "fold constants and algebraic identities, remove dead pure ops"
    options = {"max-iterations": 10, "fold-limit": 1 << 16}

    def run(self, module: Module) -> None:
        from mlc.ir.interpreter import Interpreter
        evaluator = Interpreter(Module())
        impure = impure_functions(module)
        limit = self.option("fold-limit")
        effectful = set()  # ids of ops with regions found to have effects: kept by every sweep (none is removed)

        def removable(op):
            if id(op) in effectful:
                return False
            if removable_if_unused(op, impure):
                return True
            if op.regions:  # (a loop nest's walk for a store, once, not once per sweep and per enclosing loop)
                effectful.add(id(op))
            return False

        def fold(op, rw):
            d = op.opdef
            if d is None:
                return False
            if not any(r.uses for r in op.results) and removable(op):
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

        apply_greedily(module, {"mlc.add": [adjoining_pads_as_concat], "mlc.transpose": [transposed_product], "*": [fold, hoist_out_of_scan]}, self.option("max-iterations"))


def adjoining_pads_as_concat(op, rw) -> bool:
    """pad(x) + pad(y), zero pads along one axis whose unpadded ranges adjoin, is one pad of
    concat(x, y) (concats of concats flattened): the gradient of a tensor split into slices, an LSTM's
    four gates, is put together without adding whole tensors of zeros."""
    pads = [v.defining_op() for v in op.operands]
    t = op.results[0].type
    if any(p is None or p.name != "mlc.pad" or p.attr("value") != 0.0 or np.signbit(p.attr("value"))
           or len(p.results[0].uses) != 1 or p.results[0].type != t for p in pads):
        return False
    axes = {k for p in pads for k, (lo, hi) in enumerate(zip(p.attr("low"), p.attr("high"))) if lo or hi}
    if len(axes) != 1 or t.shape[next(iter(axes))] is None:
        return False
    (k,) = axes
    n = t.shape[k]
    (lo, mid, i), (mid2, hi, j) = sorted((p.attr("low")[k], n - p.attr("high")[k], i) for i, p in enumerate(pads))
    if mid != mid2:
        return False
    parts = []
    for p in (pads[i], pads[j]):
        x = p.operands[0]
        inner = x.defining_op()
        spliced = inner is not None and inner.name == "mlc.concat" and inner.attr("axis") == k and len(x.uses) == 1
        parts += list(inner.operands) if spliced else [x]
    joined = t.with_shape(tuple(hi - lo if a == k else d for a, d in enumerate(t.shape)))
    value = rw.create_before(op, "mlc.concat", parts, [joined], {"axis": to_attr(k)}).results[0]
    if lo or hi != n:
        low, high = [0] * t.rank, [0] * t.rank
        low[k], high[k] = lo, n - hi
        attrs = {"low": to_attr(low), "high": to_attr(high), "value": to_attr(0.0)}
        value = rw.create_before(op, "mlc.pad", [value], [t], attrs).results[0]
    rw.replace_op(op, [value])
    return True


def transposed_product(op, rw) -> bool:
    """transpose(a @ b) over the last two dims is b^T @ a^T: the product with its operands swapped and
    read the other way round (their `transpose_*` flags flipped), and no copy of its result: a weight's
    gradient through nn.Linear's transposed weight, (g^T x)^T, is x^T g."""
    x = op.operands[0]
    product, r = x.defining_op(), x.type.rank
    if product is None or product.name != "mlc.matmul" or len(x.uses) != 1 or r < 2 \
            or list(op.attr("perm")) != list(range(r - 2)) + [r - 1, r - 2] or min(v.type.rank for v in product.operands) < 2 \
            or any(product.opdef.interleaved(product)):
        return False
    a, b = product.operands
    ta, tb = product.opdef.stored_transposed(product)
    flags = {name: UNIT for name, flag in (("transpose_a", not tb), ("transpose_b", not ta)) if flag}
    rw.replace_op(op, rw.create_before(op, "mlc.matmul", [b, a], [op.results[0].type], flags).results)
    return True


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
