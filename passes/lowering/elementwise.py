"""Elementwise ops: one loop nest over the (broadcast) result, writing in place where an operand's
buffer or a global's storage can be reused; and the ops that stay tensor ops (constants, globals,
calls), whose values cross into buffers."""
from __future__ import annotations

from mlc.ir.core import BlockArgument, Builder, Operation, Value
from mlc.ir.dialects import mlc as tensor_ops
from mlc.ir.types import MemRefType, TensorType

from .core import FunctionLowering, rule


SCALAR_TWIN = {name: f"arith.{name}" for name in [*tensor_ops.UNARY, *tensor_ops.BINARY, "select"]}


ELEMENTWISE = {f"mlc.{n}" for n in SCALAR_TWIN} | {"mlc.clamp", "mlc.cast"}


@rule(*ELEMENTWISE, "mlc.broadcast_to")
def elementwise(L: FunctionLowering, op: Operation, extras=()):
    """One loop nest over the result; fused producers (inside an mlc.fusion) are computed in it from
    their own operands. `extras`: fused ops whose values the kernel also returns (of the same type),
    stored in the same pass after every value of the element is computed."""
    t = op.results[0].type
    leaves = leaves_of(L, op)  # operands read from buffers (those of fused producers included)
    ins = [L.buffers[v] for v in op.operands if v in L.buffers]
    if op.name == "mlc.broadcast_to":
        sizes = [L.idx(d) if d is not None else L.dim(ins[0], ins[0].type.rank - t.rank + i) for i, d in enumerate(t.shape)]
    else:
        sizes = L.result_sizes(t, [L.buffers[v] for v in leaves])
    outs = [_global_updated_in_place(L, t, leaves, i) or (not i and dying_operand_buffer(L, t, leaves)) or
            L.alloc(t, sizes, r.name_hint) for i, r in enumerate(L.current.results[:1 + len(extras)])]
    readers = {v: L.broadcast_reader(L.buffers[v], t.rank) for v in leaves}

    def value(b, v, ivs, memo):
        if v not in memo:
            p = v.defining_op()
            memo[v] = scalar(L, b, p, [value(b, o, ivs, memo) for o in p.operands]) if p is not None and p in L.fused else \
                b.create("mem.load", [L.buffers[v]] + readers[v](b, ivs)).result
        return memo[v]

    def element(b, ivs):
        memo = {}
        results = [scalar(L, b, o, [value(b, v, ivs, memo) for v in o.operands]) for o in [op, *extras]]
        for r, out in zip(results, outs):
            b.create("mem.store", [r, out] + ivs)
    L.nest(sizes, element)
    return outs


def leaves_of(L, op):
    """The values a fused group reads from buffers: operands of op and of its fused producers."""
    leaves = []

    def collect(o):
        for v in o.operands:
            p = v.defining_op()
            if p is not None and p in L.fused:
                collect(p)
            elif v not in leaves:
                leaves.append(v)
    collect(op)
    return leaves


def _global_updated_in_place(L, t, leaves, result: int = 0):
    """The storage of global @g, when this kernel's result is stored into @g and the kernel reads @g's
    current value at the very index it writes, with nothing after it reading @g before the store (an
    optimiser's update: w = w - lr * g). The kernel then writes @g in place and the store copies
    nothing."""
    op = L.current
    if op.parent is not L.func.body:
        return None
    stores = [u for u, _ in op.results[result].uses if u.name == "mlc.global_store" and u.parent is op.parent]
    if len(stores) != 1:
        return None
    name, at = stores[0].attr("global"), L.order[op]
    loads = [o for o in L.order if o.name == "mlc.global_load" and o.attr("global") == name]
    if any(L.order[o] > at for o in L.order if o.name == "mlc.global_store" and o.attr("global") == name and o is not stores[0]):
        return None  # another store would overwrite the result while it is still a value
    if any(user.name == "func.return" for user in op.results[result].users):
        return None  # the caller frees what it is given
    for load in loads:  # no one reads @g's old value after this kernel
        for user, _ in load.results[0].uses:
            while user.parent is not op.parent:
                user = user.parent_op
            if L.order.get(user, -1) > at:  # (ops made by lowering read the buffer, not this value)
                return None
    for v in leaves:
        outer = op.operands[v.index] if op.regions and isinstance(v, BlockArgument) and v.owner is op.regions[0].blocks[0] else v
        if outer.defining_op() in loads and outer.type == TensorType(t.shape, t.element) and t.is_static:
            return L.buffers[v]
    return None


def dying_operand_buffer(L, t, leaves):
    """An operand's buffer the result may be written into, in place: the operand is used only here,
    its buffer is a top-level intermediate of this function that no other value shares, and it has
    the result's type, so it is read at the very index being written. At a `?` result dim no other
    operand may be larger than it (each has 1 there, or does not reach that axis)."""
    if L.current.parent is not L.func.body:
        return None
    for v in leaves:
        fused_arg = L.current.name == "mlc.fusion" and isinstance(v, BlockArgument) and v.owner is L.current.regions[0].blocks[0]
        outer = L.current.operands[v.index] if fused_arg else v
        buf = L.buffers[v]
        if (len(outer.uses) != 1 or buf.type != MemRefType(t.shape, t.element) or buf not in L.allocs
                or buf.defining_op().parent is not L.func.body or sum(b is buf for b in L.buffers.values()) > 1 + (outer is not v)):
            continue
        others = [w.type.shape for w in leaves if w is not v]
        if all(all(len(s) < t.rank - axis or s[axis - t.rank] == 1 for s in others)
               for axis, d in enumerate(t.shape) if d is None):
            return buf
    return None


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
