"""bufferize: decides, at the tensor level, which results are written over the storage of one of their
operands instead of into a new buffer, and says so on the op; lower-to-loops follows it.

    %y = mlc.fusion %h, %b {mlc.in_place = [0]} : ...     result 0 is written where operand 0 lives

One entry per result; -1 is a new buffer. Only kernels that read each operand at the very index they
write qualify (elementwise ops and fusions, row kernels that write whole rows without keeping a value
in their result row), at the top level of a function, with an operand of the result's type:

- a dying intermediate: the operand is used only here and made by a top-level op into a buffer of its
  own (not a constant, global, call or scan, nor itself written in place); at a `?` result dim no
  other operand may be larger (each has 1 there, or does not reach that axis);
- a global updated in place (an optimiser's update, w = w - lr * g): the result is stored into @g,
  the operand is @g's value loaded before, nothing after the kernel reads @g's old value or stores @g
  again, and the result is not returned. The store then copies nothing.
"""
from __future__ import annotations

from collections import defaultdict

from mlc.ir.core import Module, Operation

from .fuse import ANCHORS, ROW_REDUCTIONS
from .lowering.core import IN_PLACE, RULES, STORAGE_ELSEWHERE
from .lowering.elementwise import elementwise
from .lowering.rows import writes_whole_rows
from .manager import Pass

OWN_BUFFER_NOT = (*STORAGE_ELSEWHERE, "mlc.reshape")  # (a reshape may name its operand's buffer: lowering/shape.py)


class Bufferize(Pass):
    name = "bufferize"
    summary = "write results over a dying operand's or an updated global's storage (mlc.in_place)"

    def run(self, module: Module) -> None:
        for f in module.functions.values():
            order = {op: i for i, op in enumerate(f.body)}
            accesses = defaultdict(list)  # global -> its top-level loads and stores
            for op in f.body:
                if op.name in ("mlc.global_load", "mlc.global_store"):
                    accesses[op.attr("global")].append(op)
            written_in_place = set()
            for op in f.body:
                if not _reads_where_it_writes(op):
                    continue
                into = [_updated_global(op, i, order, accesses) for i in range(len(op.results))]
                if into[0] < 0:
                    into[0] = _dying_operand(op, written_in_place)
                if any(k >= 0 for k in into):
                    op.set_attr(IN_PLACE, into)
                    written_in_place.add(op)


def _reads_where_it_writes(op: Operation) -> bool:
    if RULES.get(op.name) is elementwise:
        return True
    if op.name != "mlc.fusion":
        return False
    members = [o for o in op.regions[0].blocks[0] if o.name != "mlc.yield"]
    if any(o.name == "mlc.slice" for o in members):  # (it reads its operand elsewhere than it writes)
        return False
    if any(o.name in ROW_REDUCTIONS for o in members):
        return writes_whole_rows(members)
    return not any(o.name in ANCHORS for o in members)


def _dying_operand(op: Operation, written_in_place: set) -> int:
    t = op.results[0].type
    for k, v in enumerate(op.operands):
        p = v.defining_op()
        if (p is None or p.parent is not op.parent or p.name in OWN_BUFFER_NOT or p in written_in_place
                or len(v.uses) != 1 or v.type != t):
            continue
        others = [w.type.shape for w in op.operands if w is not v]
        if all(all(len(s) < t.rank - axis or s[axis - t.rank] == 1 for s in others)
               for axis, d in enumerate(t.shape) if d is None):
            return k
    return -1


def _updated_global(op: Operation, result: int, order: dict, accesses: dict) -> int:
    r = op.results[result]
    stores = [u for u, _ in r.uses if u.name == "mlc.global_store" and u.parent is op.parent]
    if len(stores) != 1 or any(u.name == "func.return" for u in r.users) or not r.type.is_static:
        return -1
    at, others = order[op], accesses[stores[0].attr("global")]
    if any(o.name == "mlc.global_store" and o is not stores[0] and order[o] > at for o in others):
        return -1  # another store would overwrite the result while it is still a value
    loads = [o for o in others if o.name == "mlc.global_load"]
    for load in loads:  # no one reads @g's old value after this kernel
        for user in load.results[0].users:
            while user.parent is not op.parent:
                user = user.parent_op
            if order[user] > at:
                return -1
    return next((k for k, v in enumerate(op.operands) if v.defining_op() in loads and v.type == r.type), -1)
