"""Elementwise ops: one loop nest over the (broadcast) result, written where bufferize says (a new
buffer, or over an operand's storage); and the ops that stay tensor ops (constants, globals, calls),
whose values cross into buffers."""
from __future__ import annotations

from mlc.ir.core import Builder, Operation, Value
from mlc.ir.dialects import mlc as tensor_ops

from .core import FunctionLowering, rule
from .shape import slice_reader


SCALAR_TWIN = {name: f"arith.{name}" for name in [*tensor_ops.UNARY, *tensor_ops.BINARY, "select"]}


ELEMENTWISE = {f"mlc.{n}" for n in SCALAR_TWIN} | {"mlc.clamp", "mlc.cast"}


@rule(*ELEMENTWISE, "mlc.broadcast_to")
def elementwise(L: FunctionLowering, op: Operation, extras=()):
    """One loop nest over the result; fused producers (inside an mlc.fusion) are computed in it from
    their own operands. `extras`: fused ops whose values the kernel also returns (of the same type),
    stored in the same pass after every value of the element is computed."""
    t = op.results[0].type
    leaves = leaves_of(L, op, extras)  # operands read from buffers (those of fused producers included)
    ins = [L.buffers[v] for v in op.operands if v in L.buffers]
    if op.name == "mlc.broadcast_to":
        sizes = [L.idx(d) if d is not None else L.dim(ins[0], ins[0].type.rank - t.rank + i) for i, d in enumerate(t.shape)]
    else:
        sizes = L.result_sizes(t, [L.buffers[v] for v in leaves])
    outs = [L.result_buffer(i, r.type, sizes, r.name_hint) for i, r in enumerate(L.current.results[:1 + len(extras)])]
    readers = {v: L.broadcast_reader(L.buffers[v], t.rank) for v in leaves}
    slices = {p: slice_reader(L, p)[1] for p in _fused_producers(L, [op, *extras]) if p.name == "mlc.slice"}

    def value(b, v, ivs, memo):
        if v not in memo:
            p = v.defining_op()
            if p in slices:  # (its operand read where the slice takes the element from)
                memo[v] = b.create("mem.load", [L.buffers[p.operands[0]]] + slices[p](b, ivs)).result
            elif p is not None and p in L.fused:
                memo[v] = scalar(L, b, p, [value(b, o, ivs, memo) for o in p.operands])
            else:
                memo[v] = b.create("mem.load", [L.buffers[v]] + readers[v](b, ivs)).result
        return memo[v]

    def element(b, ivs):
        memo = {}
        results = [scalar(L, b, op, [value(b, v, ivs, memo) for v in op.operands])] + \
            [value(b, o.results[0], ivs, memo) for o in extras]  # (each value once, extras too)
        for r, out in zip(results, outs):
            b.create("mem.store", [r, out] + ivs)
    L.nest(sizes, element)
    return outs


def _fused_producers(L, ops) -> list:
    """The fused ops the kernel computing `ops` computes their operands with (and theirs), each once."""
    seen, stack = {}, list(ops)
    while stack:
        for v in stack.pop().operands:
            p = v.defining_op()
            if p is not None and p in L.fused and p not in seen:
                seen[p] = None
                stack.append(p)
    return list(seen)


def leaves_of(L, op, extras=()):
    """The values a fused group reads from buffers: operands of op (and the extra results' ops) and of
    their fused producers."""
    leaves = []

    def collect(o):
        for v in o.operands:
            p = v.defining_op()
            if p is not None and p in L.fused:
                collect(p)
            elif v not in leaves:
                leaves.append(v)
    for o in [op, *extras]:
        collect(o)
    return leaves


def scalar(L, b, op, xs) -> Value:
    """The scalar computation of an elementwise op on loaded values."""
    short = op.name[4:]
    if short in SCALAR_TWIN:
        attrs = {"approximate": op.attr("approximate")} if short == "gelu" else None
        return b.create(SCALAR_TWIN[short], xs, attrs).result
    if op.name == "mlc.cast":
        return b.create("arith.cast", xs, result_types=[op.results[0].type.element]).result
    if op.name == "mlc.broadcast_to":
        return xs[0]
    x, e = xs[0], op.results[0].type.element  # clamp
    if op.attr("min") is not None:
        x = L.op(b, "arith.maximum", x, L.const(b, op.attr("min"), e))
    if op.attr("max") is not None:
        x = L.op(b, "arith.minimum", x, L.const(b, op.attr("max"), e))
    return x


@rule("mlc.constant", "mlc.global_load", "func.call")
def boundary(L: FunctionLowering, op: Operation):
    """These stay tensor ops: their operands are read from buffers, their results copied into buffers."""
    for i, v in enumerate(op.operands):
        if v in L.buffers:
            op.set_operand(i, L.tensor(v))
    return [Builder.after(op, L.module).create("mem.from_tensor", [r], name_hint=r.name_hint).result for r in op.results]


@rule("mlc.global_store")
def global_store(L: FunctionLowering, op: Operation):
    new = op.clone()
    new.set_operand(0, L.tensor(op.operands[0]))
    op.parent.insert_before(op, new)
    return []
