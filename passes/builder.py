"""OpBuilder: how `vjp` and `decompose` rules (declared beside each op) build IR."""
from __future__ import annotations

import numpy as np

from mlc.ir.attributes import DenseAttr
from mlc.ir.core import Builder, Value
from mlc.ir.dialects.mlc import END
from mlc.ir.types import TensorType, element_of, i1, round_to_element


class OpBuilder:
    """What `vjp` and `decompose` rules build with: `d(name, *operands, **attrs)` makes an op, returns its result."""

    def __init__(self, b: Builder):
        self.b = b

    def __call__(self, name, *operands, result_type=None, **attrs) -> Value:
        return self.b.create(name, list(operands), attrs or None, result_types=None if result_type is None else [result_type]).result

    def op(self, name, operands, result_types, regions=(), **attrs):
        """An op with several results or regions (returns the op)."""
        return self.b.create(name, list(operands), attrs or None, result_types=list(result_types), regions=regions)

    def inside(self, block) -> "OpBuilder":
        """A builder appending to block (a region's body being built)."""
        b = Builder.at_end(block, None, self.b.loc)
        b.symbols = self.b.symbols
        return OpBuilder(b)

    def before(self, op) -> "OpBuilder":
        """A builder inserting just before op."""
        b = Builder.before(op)
        b.symbols = self.b.symbols
        return OpBuilder(b)

    def backprop(self, ops, adjoint: dict) -> dict:
        """Reverse mode over ops from the seeded cotangents (passes/grad.py); for rules of region ops."""
        from .grad import backprop
        return backprop(self, ops, adjoint)

    def scalar(self, value, like: Value) -> Value:
        """A rank-0 constant of like's element type (it broadcasts)."""
        t = TensorType((), like.type.element)
        return self("mlc.constant", result_type=t, value=DenseAttr(np.array(value, t.element.np_dtype), t))

    def expand(self, small: Value, like: Value) -> Value:
        """small broadcast to like's shape (where(true, small, like) keeps like's values out of it)."""
        true = self("mlc.constant", result_type=TensorType((), i1), value=DenseAttr(np.array(True), TensorType((), i1)))
        return self("mlc.select", true, small, like)

    def reshape(self, v: Value, shape) -> Value:
        return v if v.type.shape == tuple(shape) else self("mlc.reshape", v, result_type=v.type.with_shape(tuple(shape)))

    def swap_last(self, v: Value, dims: int = 1) -> Value:
        """v with its last two dims swapped (dims=2: the two before its last)."""
        r = v.type.rank
        perm = list(range(r))
        perm[r - 1 - dims], perm[r - dims] = perm[r - dims], perm[r - 1 - dims]
        return self("mlc.transpose", v, perm=perm)

    def keepdims(self, g: Value, op) -> Value:
        """A reduction's cotangent with its reduced dims back as 1s."""
        x = op.operands[0]
        if op.attr("keepdims"):
            return g
        axes = op.opdef.axes(op, x.type.rank)
        return self.reshape(g, tuple(1 if i in axes else d for i, d in enumerate(x.type.shape)))

    def const(self, array: np.ndarray) -> Value:
        t = TensorType(array.shape, element_of(array.dtype))
        return self("mlc.constant", result_type=t, value=DenseAttr(round_to_element(array, t.element), t))

    def zeros_of(self, t: TensorType) -> Value:
        """Zeros of a static tensor type."""
        zero = TensorType((), t.element)
        return self("mlc.broadcast_to", self("mlc.constant", result_type=zero, value=DenseAttr(np.zeros((), t.element.np_dtype), zero)),
                    result_type=t)

    def zeros(self, like: Value, resized: dict | None = None) -> Value:
        """Zeros of like's shape, with dims {axis: size} replaced."""
        if not resized:
            return self.expand(self.scalar(0, like), like)
        shape = tuple(resized.get(i, s) for i, s in enumerate(like.type.shape))
        if None not in shape:
            return self.zeros_of(like.type.with_shape(shape))
        one = self.slice(like, {axis: (0, 1, 1) for axis in resized})
        return self("mlc.broadcast_to", self.expand(self.scalar(0, like), one), result_type=like.type.with_shape(shape))

    def slice(self, v: Value, bounds: dict) -> Value:
        """v[start:limit:stride] along the dims in bounds ({axis: (start, limit, stride)})."""
        rank = v.type.rank
        full = [bounds.get(i, (0, END, 1)) for i in range(rank)]
        if all(b == (0, END, 1) or (b[0], b[2]) == (0, 1) and b[1] == v.type.shape[i] for i, b in enumerate(full)):
            return v
        return self("mlc.slice", v, start=[b[0] for b in full], limit=[b[1] for b in full], stride=[b[2] for b in full])

    def pad(self, v: Value, widths: dict) -> Value:
        """v with zeros (low, high) around the dims in widths ({axis: (low, high)})."""
        rank = v.type.rank
        return self("mlc.pad", v, low=[widths.get(i, (0, 0))[0] for i in range(rank)],
                    high=[widths.get(i, (0, 0))[1] for i in range(rank)])

    def sum_to(self, g: Value | None, t: TensorType) -> Value | None:
        """g summed over the dims along which a value of type t was broadcast to g's shape."""
        if g is None or g.type.shape == t.shape:
            return g
        lead = g.type.rank - t.rank
        if lead:
            g = self("mlc.reduce_sum", g, axes=list(range(lead)))
        ones = [i for i, (d, e) in enumerate(zip(t.shape, g.type.shape)) if d == 1 and e != 1]
        if ones:
            g = self("mlc.reduce_sum", g, axes=ones, keepdims=True)
        return g
