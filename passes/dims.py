"""Which `?` dims are equal at run time. Each `?` dim of a value is traced back to an origin, a dim it
is a static multiple of, through the ops that carry dims over: elementwise ops (where their operands'
`?` dims are already known equal), reshapes, reductions, slices and pads that keep the dim whole,
transposes, products (rows, columns, batch), fusion kernels and scans (whose carries and outputs keep
their shapes from step to step: checked as they run); where the trace stops, the dim is its own origin. Ops that check at run time that two dims are equal (cross_entropy's logits and labels)
then join their origins' classes. Two dims are the same size when their origins are, in one class.

    x: tensor<?x64x256xf32>             (x, 0) x 1
    reshape x -> tensor<?x256xf32>      (x, 0) x 64
    matmul .. -> tensor<?x1024xf32>     (x, 0) x 64: its rows are its A's
"""
from __future__ import annotations

import math
from fractions import Fraction

from mlc.ir.core import BlockArgument, Operation, Value
from mlc.ir.dialects.mlc import END
from mlc.ir.registry import ELEMENTWISE

ONE = Fraction(1)


class Dims:
    def __init__(self, func: Operation | None = None):
        self.memo: dict = {}
        self.joined: dict = {}  # origin dim -> (the dim of its class it was joined to, size ratio)
        for op in func.walk() if func is not None else ():
            if op.name == "mlc.cross_entropy":  # (checked equal at run time: labels [N, d...], logits [N, C, d...])
                logits, labels = op.operands
                for axis in range(labels.type.rank):
                    self._join(logits, axis + (axis > 0), labels, axis)

    def same(self, a: Value, axis_a: int, b: Value, axis_b: int) -> bool:
        """Whether dim axis_a of a and axis_b of b are the same size at run time (proven, not assumed)."""
        da, db = a.type.shape[axis_a], b.type.shape[axis_b]
        if da is not None or db is not None:
            return da == db
        return self.origin(a, axis_a) == self.origin(b, axis_b)

    def origin(self, v: Value, axis: int) -> tuple:
        """((value, axis) of the dim that stands for the class, factor) of a `?` dim: it is factor x that dim."""
        key = (v, axis)
        if key not in self.memo:
            self.memo[key] = (key, ONE)  # (while tracing: a cycle ends at the dim itself)
            self.memo[key] = self._trace(v, axis) or (key, ONE)
        root, factor = self.memo[key]
        while root in self.joined:
            root, ratio = self.joined[root]
            factor *= ratio
        return root, factor

    def _join(self, a: Value, axis_a: int, b: Value, axis_b: int) -> None:
        if a.type.shape[axis_a] is not None or b.type.shape[axis_b] is not None:
            return
        (ra, fa), (rb, fb) = self.origin(a, axis_a), self.origin(b, axis_b)
        if ra != rb:
            self.joined[rb] = (ra, fa / fb)  # (fb x rb = fa x ra)

    def _trace(self, v: Value, axis: int):
        if isinstance(v, BlockArgument):
            region = v.owner.parent
            kernel = region.parent if region is not None else None
            if kernel is not None and kernel.name == "mlc.fusion":  # (a kernel's argument: its operand)
                return self.origin(kernel.operands[v.index], axis)
            if kernel is not None and kernel.name == "mlc.scan":  # (a carry keeps its shape: checked per step)
                carry = v.index < kernel.attr("num_carries")
                return self.origin(kernel.operands[v.index], axis if carry else axis + 1)
            return None
        op = v.defining_op()
        if op.name == "mlc.fusion":
            return self.origin(op.regions[0].blocks[0].last.operands[v.index], axis)
        if op.name == "mlc.scan":
            k = op.attr("num_carries")
            if v.index < k:
                return self.origin(op.operands[v.index], axis)
            return None if axis == 0 else self.origin(op.regions[0].blocks[0].last.operands[v.index], axis - 1)
        if op.opdef is not None and ELEMENTWISE in op.opdef.traits:
            return self._agreed(op.operands, v.type.rank, axis)
        rule = RULES.get(op.name) or (Dims._reduction if op.name.startswith("mlc.reduce_") else None)
        return rule(self, op, v, axis) if rule is not None else None

    def _agreed(self, operands, rank: int, axis: int):
        """The origin all `?` dims of broadcast operands share along result axis `axis`, else None."""
        found = {self.origin(o, at) for o in operands
                 for at in [axis - rank + o.type.rank] if at >= 0 and o.type.shape[at] is None}
        return found.pop() if len(found) == 1 else None

    def _reshape(self, op, v, axis):
        x = op.operands[0]
        if len(op.operands) == 2:  # reshaped to shape_of(y), of y's type: y's dims
            made = op.operands[1].defining_op()
            y = made.operands[0] if made is not None and made.name == "mlc.shape_of" else None
            return self.origin(y, axis) if y is not None and y.type.shape == v.type.shape else None
        unknown = [a for a, d in enumerate(x.type.shape) if d is None]
        before, after = (math.prod(d for d in t.shape if d is not None) for t in (x.type, v.type))
        if len(unknown) != 1 or not before or not after:
            return None
        root, factor = self.origin(x, unknown[0])
        return root, factor * Fraction(before, after)

    def _reduction(self, op, v, axis):
        x = op.operands[0]
        reduced = op.opdef.axes(op, x.type.rank)
        kept = range(x.type.rank) if op.attr("keepdims") else [a for a in range(x.type.rank) if a not in reduced]
        return self.origin(x, list(kept)[axis])

    def _slice(self, op, v, axis):
        start, limit, stride = (bounds[axis] for bounds in op.opdef.bounds(op, v.type.rank))
        return self.origin(op.operands[0], axis) if (start, stride) == (0, 1) and limit >= END else None

    def _pad(self, op, v, axis):
        return self.origin(op.operands[0], axis) if op.attr("low")[axis] == op.attr("high")[axis] == 0 else None

    def _concat(self, op, v, axis):  # (along another axis: the operands' dim, checked equal)
        return None if axis == op.attr("axis") % v.type.rank else self._agreed(op.operands, v.type.rank, axis)

    def _transpose(self, op, v, axis):
        return self.origin(op.operands[0], op.attr("perm")[axis])

    def _matmul(self, op, v, axis):
        """Rows from A, columns from B, batch dims from both (broadcast): through the operands' marks."""
        a, b = op.operands
        if a.type.rank < 2 or b.type.rank < 2:
            return None
        ia, ib, ic = (bool(op.attr(f"interleaved_{w}")) for w in "abc")
        ta, tb = bool(op.attr("transpose_a")), bool(op.attr("transpose_b"))
        axes_a, axes_b = (_swapped(_swapped(list(range(t.type.rank)), -3, -2, i), -1, -2, t_) for t, i, t_ in ((a, ia, ta), (b, ib, tb)))
        rank = v.type.rank
        at = _swapped(list(range(rank)), -3, -2, ic)[axis]  # (the result's axis, as computed before interleaving)
        if at == rank - 2:
            return self.origin(a, axes_a[-2])
        if at == rank - 1:
            return self.origin(b, axes_b[-1])
        found = {self.origin(t, axes[at - rank + len(axes)]) for t, axes in ((a, axes_a), (b, axes_b))
                 if at - rank + len(axes) >= 0 and t.type.shape[axes[at - rank + len(axes)]] is None}
        return found.pop() if len(found) == 1 else None


def _swapped(axes: list, i: int, j: int, swap: bool) -> list:
    if swap:
        axes = list(axes)
        axes[i], axes[j] = axes[j], axes[i]
    return axes


RULES = {"mlc.reshape": Dims._reshape, "mlc.slice": Dims._slice, "mlc.pad": Dims._pad, "mlc.concat": Dims._concat,
         "mlc.transpose": Dims._transpose, "mlc.matmul": Dims._matmul}
