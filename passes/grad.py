"""grad{func=@loss}: reverse-mode autodiff on the tensor IR.

Adds `@loss_grad`, taking loss's arguments and returning the loss, then d loss / d x for each
floating-point argument x, in order. The forward ops are copied, then walked backwards: each op's
rule (`vjp` on its registry entry, next to its definition) maps the cotangent of its result to
cotangents of its operands, which are summed where a value has several uses. The result is ordinary
IR, so `grad` applies to it again.

A `?` dim is taken to be the same size wherever it meets another `?` (as JAX, which needs static
shapes, would have it): gradients through a `?` dim that is 1 at run time against a larger one are
not supported.
"""
from __future__ import annotations

import numpy as np

from mlc.ir.attributes import DenseAttr
from mlc.ir.core import Builder, FuncOp, Module, Value
from mlc.ir.diagnostics import error
from mlc.ir.types import TensorType, i1

from .manager import Pass


class Cotangents:
    """What a `vjp` rule builds with: `d(name, *operands, **attrs)` makes an op and returns its result."""

    def __init__(self, b: Builder):
        self.b = b

    def __call__(self, name, *operands, result_type=None, **attrs) -> Value:
        return self.b.create(name, list(operands), attrs or None, result_types=None if result_type is None else [result_type]).result

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

    def swap_last(self, v: Value) -> Value:
        r = v.type.rank
        return self("mlc.transpose", v, perm=list(range(r - 2)) + [r - 1, r - 2])

    def keepdims(self, g: Value, op) -> Value:
        """A reduction's cotangent with its reduced dims back as 1s."""
        x = op.operands[0]
        if op.attr("keepdims"):
            return g
        axes = op.opdef.axes(op, x.type.rank)
        return self.reshape(g, tuple(1 if i in axes else d for i, d in enumerate(x.type.shape)))

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


def differentiable(v: Value) -> bool:
    return isinstance(v.type, TensorType) and v.type.element.is_float


class Grad(Pass):
    name = "grad"
    summary = "add @f_grad returning f's scalar result and its gradients (reverse mode)"
    options = {"func": ""}

    def run(self, module: Module) -> None:
        name = self.option("func").lstrip("@")
        f = module.functions.get(name)
        if f is None:
            raise error(module.loc, f"grad: no function @{name} to differentiate (give func=@name)")
        results = f.type.results
        if len(results) != 1 or not isinstance(results[0], TensorType) or results[0].rank != 0 or not results[0].element.is_float:
            raise error(f.loc, f"grad: @{name} must return one floating-point scalar (tensor<f32>), not "
                               f"({', '.join(map(str, results))})")
        wrt = [i for i, a in enumerate(f.args) if differentiable(a)]
        g = FuncOp.build(f"{name}_grad", list(f.type.inputs), [results[0]] + [f.args[i].type for i in wrt],
                         [a.name_hint for a in f.args], loc=f.loc, private=f.is_private)
        module.body.insert_after(f, g)
        b = Builder.at_end(g.body, module)
        mapping = dict(zip(f.args, g.args))
        forward = []
        for op in f.body:
            if op.name == "func.return":
                loss = mapping[op.operands[0]]
                break
            forward.append(b.block.append(op.clone(mapping)))
        d = Cotangents(b)
        adjoint = {loss: d.scalar(1.0, loss)}
        for op in reversed(forward):
            cts = [adjoint.get(r) for r in op.results]
            if all(c is None for c in cts) or not any(differentiable(v) for v in op.operands):
                continue
            if op.opdef is None or op.opdef.vjp is None:
                raise error(op.loc, "grad: no gradient rule for this op yet", op.name)
            b.loc = op.loc
            for v, ct in zip(op.operands, op.opdef.vjp(d, op, cts[0])):
                if ct is not None and differentiable(v):
                    adjoint[v] = ct if v not in adjoint else d("mlc.add", adjoint[v], ct)
        grads = [adjoint.get(g.args[i]) or d.expand(d.scalar(0, g.args[i]), g.args[i]) for i in wrt]
        b.create("func.return", [loss] + grads, result_types=[])
