"""Ops that move elements without arithmetic: reshape, iota, slice, pad, concat, gather,
gather_elements, and scatter_add, scatter_add_elements (which add the updates in order)."""
from __future__ import annotations

import numpy as np

from mlc.ir.core import Operation
from mlc.ir.diagnostics import error
from mlc.ir.dialects.shapes import norm_axis
from mlc.ir.types import TensorType

from ..gemm import static_value
from .core import STORAGE_ELSEWHERE, FunctionLowering, as_index, copy_nest, rule


@rule("mlc.reshape")
def reshape(L: FunctionLowering, op: Operation):
    x = L.buffers[op.operands[0]]
    t = op.results[0].type
    in_sizes = L.dims(x)
    total = L.idx(1)
    for s in in_sizes:
        total = L.op(L.b, "arith.mul", total, s)
    # a `?` dim: the shape operand's entry there (or -1 without one); a -1 is what the known dims leave
    given = L.buffers[op.operands[1]] if len(op.operands) == 2 else None
    entries = [L.idx(d) if d is not None else L.idx(-1) if given is None else
               as_index(L, L.b, L.b.create("mem.load", [given, L.idx(i)]).result) for i, d in enumerate(t.shape)]
    known = L.idx(1)
    for d, e in zip(t.shape, entries):
        if d is None:
            e = L.op(L.b, "arith.select", L.op(L.b, "arith.eq", e, L.idx(-1)), L.idx(1), e)
        known = L.op(L.b, "arith.mul", known, e)
    solved = L.op(L.b, "arith.div", total, known)
    sizes = [e if d is not None else L.op(L.b, "arith.select", L.op(L.b, "arith.eq", e, L.idx(-1)), solved, e)
             for d, e in zip(t.shape, entries)]
    if given is not None:  # (the interpreter's check: the sizes must hold the elements)
        product = L.idx(1)
        for size in sizes:
            product = L.op(L.b, "arith.mul", product, size)
        L.check(L.b, L.op(L.b, "arith.eq", product, total), f"cannot reshape into {t}: the element count differs")
    if _may_view(op):
        return [L.view(L.b, x, t.shape, sizes, op.results[0].name_hint)]
    out = L.alloc(t, sizes, op.results[0].name_hint)
    # the elements in the same order: one flat copy, both buffers viewed as vectors (mem.reshape)
    static = None if None in x.type.shape else int(np.prod(x.type.shape, dtype=np.int64))
    src, dst = (L.view(L.b, v, (static,), [total]) for v in (x, out))
    copy_nest(L, src, dst, [total], lambda b, ivs: ivs, lambda b, ivs: ivs)
    return [out]


def _may_view(op: Operation) -> bool:
    """A reshape names its operand's buffer (no copy) where nothing can write that buffer while the
    result is alive: at the top level of a function (a scan's step copies its yields back one by one,
    so a carry viewed as another could be overwritten before it is read), of a buffer the function
    made or was given (not a global's or a constant's storage, which stores and in-place updates
    write), and not returned (a result owns its storage). bufferize never writes over a reshape's
    result in place."""
    while op.name == "mlc.reshape":
        if op.parent_op is None or op.parent_op.name != "func.func" or any(u.name == "func.return" for u in op.results[0].users):
            return False
        op = op.operands[0].defining_op()
        if op is None:  # an argument
            return True
    return op.name not in STORAGE_ELSEWHERE


@rule("mlc.shape_of")
def shape_of(L: FunctionLowering, op: Operation):
    x = L.buffers[op.operands[0]]
    t = op.results[0].type
    out = L.alloc(t, [L.idx(t.shape[0])], op.results[0].name_hint)
    for i, size in enumerate(L.dims(x)):
        L.b.create("mem.store", [L.b.create("arith.cast", [size], result_types=[t.element]).result, out, L.idx(i)])
    return [out]


@rule("mlc.iota")
def iota(L: FunctionLowering, op: Operation):
    t = op.results[0].type
    axis = norm_axis(op.attr("axis"), t.rank)
    sizes = [L.idx(d) for d in t.shape]
    out = L.alloc(t, sizes, op.results[0].name_hint)
    L.nest(sizes, lambda b, ivs: b.create("mem.store", [b.create("arith.cast", [ivs[axis]], result_types=[t.element]).result, out] + ivs))
    return [out]


@rule("mlc.slice")
def slice_(L: FunctionLowering, op: Operation):
    sizes, reader = slice_reader(L, op)
    out = L.alloc(op.results[0].type, sizes, op.results[0].name_hint)
    copy_nest(L, L.buffers[op.operands[0]], out, sizes, reader, lambda b, ivs: ivs)
    return [out]


def slice_reader(L: FunctionLowering, op: Operation):
    """A slice's result sizes, and reader(builder, result indices) -> the operand's indices there (an
    elementwise kernel that fuses the slice reads its operand through it: passes/fuse.py)."""
    x = L.buffers[op.operands[0]]
    t = op.results[0].type
    start, limit, stride = op.opdef.bounds(op, x.type.rank)
    first, sizes = [], []
    for axis, (d, s, lim, k) in enumerate(zip(x.type.shape, start, limit, stride)):
        if d is not None:
            lo, hi, _ = slice(s, lim, k).indices(d)
            first.append(L.idx(lo))
            sizes.append(L.idx(t.shape[axis]))
            continue
        if s < 0 or lim < 0:
            raise error(op.loc, "cannot lower a slice with negative bounds on a '?' dim to loops yet", op.name)
        dim = L.dim(x, axis)  # Python semantics: bounds clamp to the dim
        lo = L.op(L.b, "arith.minimum", L.idx(s), dim)
        hi = L.op(L.b, "arith.minimum", L.idx(lim), dim)
        span = L.op(L.b, "arith.add", L.op(L.b, "arith.sub", hi, lo), L.idx(k - 1))
        first.append(lo)
        sizes.append(L.op(L.b, "arith.div", span, L.idx(k)))

    def reader(b, ivs):
        return [L.op(b, "arith.add", f, L.op(b, "arith.mul", iv, L.idx(k))) for f, iv, k in zip(first, ivs, stride)]
    return sizes, reader


@rule("mlc.pad")
def pad(L: FunctionLowering, op: Operation):
    return [padded(L, L.buffers[op.operands[0]], op.attr("low"), op.attr("high"), op.attr("value"), op.results[0].name_hint)]


def padded(L: FunctionLowering, x, low, high, value=0, name_hint=None):
    """A new buffer holding x with `low`/`high` elements of `value` before/after each dim (each element
    written once: the border filled slab by slab, the rest copied)."""
    t = TensorType(tuple(None if d is None else d + lo + hi for d, lo, hi in zip(x.type.shape, low, high)), x.type.element)
    in_sizes = L.dims(x)
    sizes = [L.op(L.b, "arith.add", s, L.idx(lo + hi)) if d is None else L.idx(d) for s, d, lo, hi in zip(in_sizes, t.shape, low, high)]
    out = L.alloc(t, sizes, name_hint)
    for k in (k for k, (lo, hi) in enumerate(zip(low, high)) if lo or hi):  # the border, once: per padded
        # axis k, its low and high slabs, spanning the axes before it inside only (their slabs have the rest)
        for start, size in ((L.idx(0), L.idx(low[k])), (L.op(L.b, "arith.add", in_sizes[k], L.idx(low[k])), L.idx(high[k]))):
            if static_value(size) == 0:
                continue
            slab = [in_sizes[j] if j < k else size if j == k else sizes[j] for j in range(len(sizes))]
            at = [L.idx(low[j]) if j < k else start if j == k else None for j in range(len(sizes))]
            L.nest(slab, lambda b, ivs, at=at: b.create("mem.store", [L.const(b, value, t.element), out] + [
                iv if a is None or static_value(a) == 0 else L.op(b, "arith.add", iv, a) for iv, a in zip(ivs, at)]))
    copy_nest(L, x, out, in_sizes, lambda b, ivs: ivs,
              lambda b, ivs: [L.op(b, "arith.add", iv, L.idx(lo)) if lo else iv for iv, lo in zip(ivs, low)])
    return out


@rule("mlc.concat")
def concat(L: FunctionLowering, op: Operation):
    t = op.results[0].type
    axis = norm_axis(op.attr("axis"), t.rank)
    ins = [L.buffers[v] for v in op.operands]
    total = L.idx(0)
    for v in ins:
        total = L.op(L.b, "arith.add", total, L.dim(v, axis))
    sizes = [L.idx(d) if d is not None else total if i == axis else L.dim(ins[0], i) for i, d in enumerate(t.shape)]
    out = L.alloc(t, sizes, op.results[0].name_hint)
    offset = L.idx(0)
    for v in ins:
        at = offset
        copy_nest(L, v, out, L.dims(v), lambda b, ivs: ivs,
                   lambda b, ivs, at=at: [L.op(b, "arith.add", iv, at) if i == axis else iv for i, iv in enumerate(ivs)])
        offset = L.op(L.b, "arith.add", offset, L.dim(v, axis))
    return [out]


@rule("mlc.gather")
def gather(L: FunctionLowering, op: Operation):
    x, idx = (L.buffers[v] for v in op.operands)
    t = op.results[0].type
    axis = norm_axis(op.attr("axis"), x.type.rank)
    k = idx.type.rank
    sizes = L.dims(x)[:axis] + L.dims(idx) + L.dims(x)[axis + 1:]
    out = L.alloc(t, sizes, op.results[0].name_hint)

    def src(b, ivs):
        i = as_index(L, b, b.create("mem.load", [idx] + ivs[axis:axis + k]).result)
        return ivs[:axis] + [i] + ivs[axis + k:]
    copy_nest(L, x, out, sizes, src, lambda b, ivs: ivs)
    return [out]


@rule("mlc.scatter_add")
def scatter_add(L: FunctionLowering, op: Operation):
    x, idx, upd = (L.buffers[v] for v in op.operands)
    t = op.results[0].type
    axis = norm_axis(op.attr("axis"), x.type.rank)
    k = idx.type.rank
    out = L.alloc(t, L.dims(x), op.results[0].name_hint)
    copy_nest(L, x, out, L.dims(x), lambda b, ivs: ivs, lambda b, ivs: ivs)

    def body(b, ivs):
        i = as_index(L, b, b.create("mem.load", [idx] + ivs[axis:axis + k]).result)
        at = ivs[:axis] + [i] + ivs[axis + k:]
        total = L.op(b, "arith.add", b.create("mem.load", [out] + at).result, b.create("mem.load", [upd] + ivs).result)
        b.create("mem.store", [total, out] + at)
    L.nest(L.dims(upd), body, parallel=False)  # repeated indices accumulate: in order
    return [out]


def element_position(L: FunctionLowering, b, idx, axis: int, size, ivs: list) -> list:
    """Where gather_elements / scatter_add_elements reach in x (`size` along axis) for position ivs
    of the indices: ivs with the index read there along axis, a negative one counting from the end.
    (The load or store through it checks the range.)"""
    i = as_index(L, b, b.create("mem.load", [idx] + ivs).result)
    wrapped = L.op(b, "arith.add", i, size)
    i = b.create("arith.select", [L.op(b, "arith.lt", i, L.idx(0)), wrapped, i], {"mlc.origin": L.current.name}).result
    return ivs[:axis] + [i] + ivs[axis + 1:]


def check_indices_fit(L: FunctionLowering, x, idx, axis: int) -> None:
    """Off the axis, the indices' positions are x's: they must not run past x's dims (checked at
    run time where a dim is `?`; static ones are verified)."""
    for i, (n, m) in enumerate(zip(x.type.shape, idx.type.shape)):
        if i != axis and (n is None or m is None):
            fits = L.op(L.b, "arith.le", L.dim(idx, i), L.dim(x, i))
            L.check(L.b, fits, f"indices are larger than operand 0 along dim {i}")


@rule("mlc.gather_elements")
def gather_elements(L: FunctionLowering, op: Operation):
    x, idx = (L.buffers[v] for v in op.operands)
    axis = norm_axis(op.attr("axis"), x.type.rank)
    check_indices_fit(L, x, idx, axis)
    sizes = L.dims(idx)
    out = L.alloc(op.results[0].type, sizes, op.results[0].name_hint)
    size = L.dim(x, axis)
    copy_nest(L, x, out, sizes, lambda b, ivs: element_position(L, b, idx, axis, size, ivs), lambda b, ivs: ivs)
    return [out]


@rule("mlc.scatter_add_elements")
def scatter_add_elements(L: FunctionLowering, op: Operation):
    x, idx, upd = (L.buffers[v] for v in op.operands)
    axis = norm_axis(op.attr("axis"), x.type.rank)
    check_indices_fit(L, x, idx, axis)
    out = L.alloc(op.results[0].type, L.dims(x), op.results[0].name_hint)
    copy_nest(L, x, out, L.dims(x), lambda b, ivs: ivs, lambda b, ivs: ivs)
    size = L.dim(x, axis)

    def body(b, ivs):
        at = element_position(L, b, idx, axis, size, ivs)
        total = L.op(b, "arith.add", b.create("mem.load", [out] + at).result, b.create("mem.load", [upd] + ivs).result)
        b.create("mem.store", [total, out] + at)
    L.nest(L.dims(idx), body, parallel=False)  # repeated positions accumulate: in order
    return [out]
