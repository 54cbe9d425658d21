"""Collectives (ir/dialects/collectives.py): the operand copied into the result's buffer, which the
collective then rewrites in place (`mem.all_reduce`, `mem.broadcast`); rank and world size stored
into a buffer of one element."""
from __future__ import annotations

from mlc.ir.core import Operation

from .core import FunctionLowering, copy_nest, rule


@rule("mlc.all_reduce", "mlc.broadcast")
def collective(L: FunctionLowering, op: Operation):
    x, t = L.buffers[op.operands[0]], op.results[0].type
    sizes = L.dims(x)
    out = L.alloc(t, sizes, op.results[0].name_hint)
    copy_nest(L, x, out, sizes, lambda b, ivs: ivs, lambda b, ivs: ivs)
    attrs = {"reduction": op.attr("reduction")} if op.name == "mlc.all_reduce" else {"root": op.attr("root")}
    L.b.create("mem." + op.name[len("mlc."):], [out], attrs)
    return [out]


@rule("mlc.rank", "mlc.world_size")
def process_info(L: FunctionLowering, op: Operation):
    out = L.alloc(op.results[0].type, [], op.results[0].name_hint)
    L.b.create("mem.store", [L.b.create("mem." + op.name[len("mlc."):]).result, out])
    return [out]
