"""mlc.scan: a loop over the steps with the body lowered inside it."""
from __future__ import annotations

from mlc.ir.core import Block, Builder, Operation, Region, Value
from mlc.ir.diagnostics import error
from mlc.ir.types import TensorType, i1, index

from .core import FunctionLowering, copy_nest, rule


@rule("mlc.scan")
def scan(L: FunctionLowering, op: Operation):
    """A loop over the steps. Carries live in buffers made before the loop; each step reads its
    sequence slices in place (mem.subview), runs the lowered body, copies the yielded carries back and
    the outputs into their slot of the stacked results (buffer-dealloc frees what the body allocated)."""
    k = op.attr("num_carries")
    carries, seqs = [L.buffers[v] for v in op.operands[:k]], [L.buffers[v] for v in op.operands[k:]]
    block = op.regions[0].blocks[0]
    yield_op = block.last
    steps = L.dim(seqs[0], 0) if seqs else L.idx(op.attr("length"))
    state = []
    for c, r in zip(carries, op.results[:k]):
        state.append(L.alloc(TensorType(c.type.shape, c.type.element), L.dims(c), r.name_hint))
        copy_nest(L, c, state[-1], L.dims(c), lambda b, ivs: ivs, lambda b, ivs: ivs)
    loop_block = Block([index], ["t"])
    loop = L.b.create("loop.for", [L.idx(0), steps], regions=[Region([loop_block])])
    before_loop = Builder.before(loop, L.module)
    L.b = Builder.at_end(loop_block, L.module, op.loc)
    t = loop_block.args[0]
    if op.attr("reverse"):
        t = L.op(L.b, "arith.sub", L.op(L.b, "arith.sub", steps, L.idx(1)), t)
    slices = [L.b.create("mem.subview", [s, t]).result for s in seqs]  # (read in place: the body writes none)
    for arg, buf in zip(block.args, state + slices):
        L.buffers[arg] = buf
    body_ops = [o for o in block.ops if o is not yield_op]
    for o in body_ops:  # the body is lowered inside the loop, in place
        o.detach()
        loop_block.append(o)
    L.lower_ops(body_ops)
    L.b = Builder.at_end(loop_block, L.module, op.loc)
    yielded = [L.buffers[v] for v in yield_op.operands]
    results = list(state)
    for i, (y, buf) in enumerate(zip(yielded[:k], state)):
        _check_same_sizes(L, y, L.dims(buf), f"carry {i}")
    for j, (r, y) in enumerate(zip(op.results[k:], yielded[k:])):  # outputs first: one may be a carry this step started from
        sizes = [steps] + [L.idx(d) if d is not None else _size_before(L, loop, before_loop, y, i, op)
                           for i, d in enumerate(r.type.shape[1:])]
        saved, L.b = L.b, before_loop
        stacked = L.alloc(r.type, sizes, r.name_hint)
        L.b = saved
        _check_same_sizes(L, y, sizes[1:], f"output {j}")
        copy_nest(L, y, stacked, L.dims(y), lambda b, ivs: ivs, lambda b, ivs: [t] + ivs)
        results.append(stacked)
    next_carries = []
    for i, y in enumerate(yielded[:k]):  # a carry passed on to another slot is read before it is overwritten
        if y in state and y is not state[i]:
            copy = L.alloc(TensorType(y.type.shape, y.type.element), L.dims(y))
            copy_nest(L, y, copy, L.dims(y), lambda b, ivs: ivs, lambda b, ivs: ivs)
            y = copy
        next_carries.append(y)
    for buf, y in zip(state, next_carries):
        if y is not buf:
            copy_nest(L, y, buf, L.dims(y), lambda b, ivs: ivs, lambda b, ivs: ivs)
    L.b.create("loop.yield")
    L.b = Builder.before(op, L.module)
    return results


def _check_same_sizes(L, y, sizes: list, what: str) -> None:
    """A run-time check that a step's yielded value has the sizes of the buffer it is copied into (the
    interpreter's: carries and outputs keep their shapes from step to step)."""
    for axis, d in enumerate(y.type.shape):
        if d is None:
            L.b.create("mem.check", [L.op(L.b, "arith.eq", L.dim(y, axis), sizes[axis])],
                       {"message": f"{what} changes shape from step to step (a scan's carries and outputs keep their shapes)",
                        "op": "mlc.scan"})


def _in_loop(loop: Operation, v: Value) -> bool:
    op = v.defining_op() if v.defining_op() is not None else v.owner.parent.parent
    while op is not None:
        if op is loop:
            return True
        op = op.parent_op
    return False


def _size_before(L, loop, b: Builder, buf: Value, axis: int, op):
    """Dim `axis` of a buffer made in the loop body, computed before the loop: the body's shape code
    uses only dims of buffers made before the loop (carries, slices, captured values) and arithmetic
    (comparisons and selects too: a broadcast `?` dim is the operands' one that is not 1)."""
    def size_of(buf, axis):
        if not _in_loop(loop, buf):
            return b.create("mem.dim", [buf], {"axis": axis}).result if buf.type.shape[axis] is None \
                else L.idx(buf.type.shape[axis])
        alloc = buf.defining_op()
        if alloc.name == "mem.subview":
            return size_of(alloc.operands[0], axis + 1)
        dynamic = [i for i, d in enumerate(buf.type.shape) if d is None]
        return expr(alloc.operands[dynamic.index(axis)])

    def expr(v):
        if not _in_loop(loop, v):
            return v
        d = v.defining_op()
        if d is not None and d.name == "mem.dim":
            return size_of(d.operands[0], d.attr("axis"))
        if d is not None and d.name.startswith("arith.") and v.type in (index, i1):
            return b.create(d.name, [expr(o) for o in d.operands], dict(d.attributes)).result
        raise error(op.loc, "cannot size this scan's outputs before its loop yet", op.name)
    return size_of(buf, axis)
