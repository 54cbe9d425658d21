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

import functools

from mlc.ir.core import Builder, FuncOp, Module, Value
from mlc.ir.diagnostics import error
from mlc.ir.dialects.mlc import captured
from mlc.ir.registry import VerifyError
from mlc.ir.types import TensorType

from .builder import OpBuilder
from .decompose import decomposable, decompose_ops

from .inline import inline_call, recursive_functions
from .manager import Pass


def differentiable(v: Value) -> bool:
    return isinstance(v.type, TensorType) and v.type.element.is_float


class Grad(Pass):
    name = "grad"
    summary = "add @f_grad returning f's scalar result and its gradients (reverse mode)"
    options = {"func": "", "wrt": "args"}

    def run(self, module: Module) -> None:
        name = self.option("func").lstrip("@")
        f = module.functions.get(name)
        if f is None:
            raise error(module.loc, f"grad: no function @{name} to differentiate (give func=@name)")
        results = f.type.results
        if len(results) != 1 or not isinstance(results[0], TensorType) or results[0].rank != 0 or not results[0].element.is_float:
            raise error(f.loc, f"grad: @{name} must return one floating-point scalar (tensor<f32>), not "
                               f"({', '.join(map(str, results))})")
        differentiate(module, f, self.option("wrt"))


def differentiate(module: Module, f, wrt: str = "args") -> FuncOp:
    """Adds and returns @f_grad (see the module docstring); wrt is "args" (every floating-point
    argument), "globals" (every trainable global, in declaration order) or a list of argument names."""
    arg_indices, globals_ = _targets(module, f, wrt)
    grad_types = [f.args[i].type for i in arg_indices] + [module.globals[s].attr("type") for s in globals_]
    g = FuncOp.build(f"{f.sym_name}_grad", list(f.type.inputs), [f.type.results[0]] + grad_types,
                     [a.name_hint for a in f.args], loc=f.loc, private=f.is_private)
    module.body.insert_after(f, g)
    b = Builder.at_end(g.body, module)
    mapping = dict(zip(f.args, g.args))
    for op in f.body:
        b.block.append(op.clone(mapping))
    _inline_calls(module, g)
    decompose_ops(module, [op for op in g.body if decomposable(op) and op.opdef.vjp is None])
    ret = g.body.last
    loss = ret.operands[0]
    ret.erase()
    forward = list(g.body)
    d = OpBuilder(b)
    adjoint = backprop(d, forward, {loss: d.scalar(1.0, loss)})
    grads = [adjoint.get(g.args[i]) or d.zeros(g.args[i]) for i in arg_indices]
    for sym in globals_:  # a global loaded several times: the loads' cotangents add up
        cts = [adjoint[op.results[0]] for op in forward
               if op.name == "mlc.global_load" and op.attr("global") == sym and op.results[0] in adjoint]
        grads.append(functools.reduce(lambda x, y: d("mlc.add", x, y), cts) if cts else d.zeros_of(module.globals[sym].attr("type")))
    b.create("func.return", [loss] + grads, result_types=[])
    return g


def backprop(d: OpBuilder, ops, adjoint: dict) -> dict:
    """Walks ops backwards from the seeded cotangents in `adjoint` (value -> cotangent), adding the
    cotangent of every value they depend on; returns adjoint. A rule returns one cotangent (or None)
    per operand, or a {value: cotangent} dict when it has more to give (a scan's captured values)."""
    for op in reversed(ops):
        cts = [adjoint.get(r) for r in op.results]
        if all(c is None for c in cts) or not any(differentiable(v) for v in _inputs(op)):
            continue
        if op.opdef is None or op.opdef.vjp is None:
            raise error(op.loc, "grad: no gradient rule for this op yet", op.name)
        d.b.loc = op.loc
        try:
            given = op.opdef.vjp(d, op, cts[0]) if len(op.results) == 1 else op.opdef.vjp(d, op, cts)
        except VerifyError as e:
            raise error(op.loc, str(e), op.name) from None
        for v, ct in (given.items() if isinstance(given, dict) else zip(op.operands, given)):
            if ct is not None and differentiable(v):
                adjoint[v] = ct if v not in adjoint else d("mlc.add", adjoint[v], ct)
    return adjoint


def _inputs(op):
    return op.operands + captured(op) if op.regions else op.operands


def _targets(module: Module, f, wrt: str):
    """(indices of the arguments, names of the globals) whose gradients are asked for."""
    if wrt == "globals":
        return [], [op.attr("sym_name") for op in module.body if op.name == "mlc.global" and op.attr("trainable")]
    if wrt == "args":
        return [i for i, a in enumerate(f.args) if differentiable(a)], []
    names = [n.strip().lstrip("%") for n in wrt.strip("[]").split(",") if n.strip()]
    by_name = {a.name_hint: i for i, a in enumerate(f.args)}
    indices = []
    for n in names:
        if n not in by_name:
            raise error(f.loc, f"grad: @{f.sym_name} has no argument %{n} (wrt=args, globals or [names])")
        a = f.args[by_name[n]]
        if not differentiable(a):
            raise error(f.loc, f"grad: %{n} has type {a.type}; only floating-point values have gradients")
        indices.append(by_name[n])
    return indices, []


def _inline_calls(module: Module, g) -> None:
    """Calls are differentiated through: their bodies are inlined into the copy first."""
    recursive = recursive_functions(module)
    while True:
        calls = [op for op in g.body if op.name == "func.call"]
        if not calls:
            return
        for call in calls:
            if call.attr("callee") in recursive:
                raise error(call.loc, "grad: cannot differentiate a recursive call", call.name)
            inline_call(call, module.functions[call.attr("callee")])
