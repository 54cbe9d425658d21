"""Reductions, softmax, cross-entropy and topk, and the row kernels the fuse pass makes (reductions
over the trailing dims with their elementwise producers and consumers)."""
from __future__ import annotations

import numpy as np

from mlc.ir.core import Operation
from mlc.ir.diagnostics import error
from mlc.ir.dialects import mlc as tensor_ops
from mlc.ir.dialects.shapes import norm_axis
from mlc.ir.types import TensorType, i64

from ..builder import OpBuilder
from ..fuse import ROW_REDUCTIONS
from .core import FunctionLowering, as_index, rule
from .elementwise import scalar


IDENTITY = {"mlc.reduce_sum": 0, "mlc.reduce_mean": 0, "mlc.reduce_prod": 1}
COMBINE = {"mlc.reduce_sum": "arith.add", "mlc.reduce_mean": "arith.add", "mlc.reduce_prod": "arith.mul",
           "mlc.reduce_max": "arith.maximum", "mlc.reduce_min": "arith.minimum"}


@rule("mlc.reduce_sum", "mlc.reduce_mean", "mlc.reduce_prod", "mlc.reduce_max", "mlc.reduce_min", "mlc.argmax", "mlc.argmin")
def reduction(L: FunctionLowering, op: Operation):
    x = L.buffers[op.operands[0]]
    t, e = op.results[0].type, x.type.element
    axes = op.opdef.axes(op, x.type.rank)
    trailing = list(axes) == list(range(x.type.rank - len(axes), x.type.rank))
    if (op.name in COMBINE and e.is_float and axes and trailing
            and (op.name != "mlc.reduce_mean" or all(x.type.shape[a] is not None for a in axes))):
        return row_kernel(L, [op])  # the sum of each row in a register
    keep = bool(op.attr("keepdims"))
    in_sizes = L.dims(x)
    out_sizes = [L.idx(1) if i in axes else s for i, s in enumerate(in_sizes)] if keep \
        else [s for i, s in enumerate(in_sizes) if i not in axes]
    out = L.alloc(t, out_sizes, op.results[0].name_hint)
    arg = op.name in ("mlc.argmax", "mlc.argmin")
    best = L.alloc(TensorType(t.shape, e), out_sizes) if arg else out

    def out_index(ivs):
        """Input indices -> result indices."""
        return [L.idx(0) if i in axes else iv for i, iv in enumerate(ivs)] if keep else \
            [iv for i, iv in enumerate(ivs) if i not in axes]

    def first_element(ivs):
        """Result indices -> the input indices of the first element reduced into them."""
        rest = iter(ivs)
        return [L.idx(0) if i in axes else (ivs[i] if keep else next(rest)) for i in range(x.type.rank)]

    def init(b, ivs):
        if op.name in IDENTITY:
            b.create("mem.store", [L.const(b, IDENTITY[op.name], e), out] + ivs)
            return
        b.create("mem.store", [b.create("mem.load", [x] + first_element(ivs)).result, best] + ivs)
        if arg:
            b.create("mem.store", [L.const(b, 0, i64), out] + ivs)
    L.nest(out_sizes, init)

    def body(b, ivs):
        o = out_index(ivs)
        v = b.create("mem.load", [x] + ivs).result
        acc = b.create("mem.load", [best] + o).result
        if not arg:
            b.create("mem.store", [L.op(b, COMBINE[op.name], acc, v), out] + o)
            return
        # strictly better, or a NaN where the best so far is not (numpy: NaN counts as extreme)
        better = L.op(b, "arith.gt" if op.name == "mlc.argmax" else "arith.lt", v, acc)
        nan_v, num_acc = L.op(b, "arith.ne", v, v), L.op(b, "arith.eq", acc, acc)
        take = L.op(b, "arith.or", better, L.op(b, "arith.and", nan_v, num_acc))
        position = b.create("arith.cast", [ivs[axes[0]]], result_types=[i64]).result
        b.create("mem.store", [L.op(b, "arith.select", take, v, acc), best] + o)
        old = b.create("mem.load", [out] + o).result
        b.create("mem.store", [L.op(b, "arith.select", take, position, old), out] + o)
    L.nest(in_sizes, body, parallel=[i not in axes for i in range(x.type.rank)])

    if op.name == "mlc.reduce_mean":
        count = L.idx(1)
        for a in axes:
            count = L.op(L.b, "arith.mul", count, in_sizes[a])
        n = L.b.create("arith.cast", [count], result_types=[e]).result
        L.nest(out_sizes, lambda b, ivs: b.create(
            "mem.store", [L.op(b, "arith.div", b.create("mem.load", [out] + ivs).result, n), out] + ivs))
    return [out]


@rule("mlc.softmax", "mlc.log_softmax")
def softmax(L: FunctionLowering, op: Operation):
    """The op's decomposition (max, sub, exp, sum, then div or log and sub; see its `decompose`),
    lowered as one row kernel when the axis is the last with a static size, else op by op. (The cpu
    pipeline decomposes softmax at the tensor level already; this is for lower-to-loops alone.)"""
    x = op.operands[0]
    axis = norm_axis(op.attr("axis"), x.type.rank)
    first = op.prev
    op.opdef.decompose(OpBuilder(L.b), op)
    made = []
    o = first.next if first is not None else op.parent.first
    while o is not op:
        made.append(o)
        o = o.next
    if axis != x.type.rank - 1 or x.type.shape[axis] is None:
        L.lower_ops(made)
        return [L.buffers[made[-1].results[0]]]
    out = row_kernel(L, made)
    for o in reversed(made):
        o.erase()
    return out


def row_kernel(L: FunctionLowering, members: list[Operation], extras=()):
    """A row kernel made by `fuse` (reductions over the trailing dims with their elementwise producers
    and consumers; the last op is the result): a parallel loop over rows and in it, per row, a loop per
    reduction carrying its accumulator in a register, then a loop writing the result row. Whole-row
    values are recomputed in each loop that needs them, except one expensive value that the result
    needs too (softmax's exp): the first reduction over it also stores it into the result row, and
    later loops read it back from there, in cache. `extras`: members whose values the kernel returns
    too, a value per row stored once the row's reductions are done, whole rows in the result's loop."""
    root = members[-1]
    inside = set(members)
    first = next(o for o in members if o.name in ROW_REDUCTIONS)
    full = first.operands[0].type
    inner = len(first.opdef.axes(first, full.rank))
    leaves = list(dict.fromkeys(v for o in members for v in o.operands if v.defining_op() not in inside))
    sizes = L.result_sizes(TensorType(full.shape, full.element), [L.buffers[v] for v in leaves])
    outer, row_sizes = sizes[:-inner], sizes[-inner:]
    t = root.results[0].type
    whole_rows = _whole_rows(members)
    stash = _stash(members, root, inner) if whole_rows else None
    out = L.result_buffer(0, t, sizes if whole_rows else outer + [L.idx(1)] * (t.rank - len(outer)), root.results[0].name_hint)
    readers = {v: L.broadcast_reader(L.buffers[v], full.rank) for v in leaves}
    per_row = outer + [L.idx(1)] * inner
    whole = [e.results[0].type.shape[-inner:] == full.shape[-inner:] for e in extras]
    extra_outs = [L.result_buffer(1 + i, e.results[0].type, sizes if w else per_row, e.results[0].name_hint)
                  for i, (e, w) in enumerate(zip(extras, whole))]

    def row(b, outer_ivs):
        known = {}  # per-row values (reductions and what is computed from them): scalars

        def value(b, v, ivs, memo):
            """v at ivs, computed in b; memo holds what b already computed."""
            if v in known:
                return known[v] if known[v] is not None else b.create("mem.load", [out] + ivs).result
            if v not in memo:
                p = v.defining_op()
                memo[v] = scalar(L, b, p, [value(b, o, ivs, memo) for o in p.operands]) if p in inside else \
                    b.create("mem.load", [L.buffers[v]] + readers[v](b, ivs)).result
            return memo[v]

        def needs_stash(v):
            p = v.defining_op()
            return v is stash or (v not in known and p in inside and any(needs_stash(o) for o in p.operands))

        row_start = outer_ivs + [L.idx(0)] * inner
        for o in members:
            if o.name in ROW_REDUCTIONS:
                keep = stash is not None and stash not in known and needs_stash(o.operands[0])
                known[o.results[0]] = _reduce_row(L, b, o, row_sizes, outer_ivs, value, stash if keep else None, out)
                if keep:
                    known[stash] = None  # read back from the result row from now on
            elif o is not root and o.results[0].type.shape[-inner:] != full.shape[-inner:]:
                known[o.results[0]] = value(b, o.results[0], row_start, {})
        for e, w, buf in zip(extras, whole, extra_outs):
            if not w:
                b.create("mem.store", [value(b, e.results[0], row_start, {}), buf] + row_start)

        def element(ib, ivs):
            at, memo = outer_ivs + ivs, {}
            values = [value(ib, o.results[0], at, memo) for o in [root] + [e for e, w in zip(extras, whole) if w]]
            for v, buf in zip(values, [out] + [buf for buf, w in zip(extra_outs, whole) if w]):
                ib.create("mem.store", [v, buf] + at)
        if whole_rows:
            L.nest(row_sizes, element, parallel=False, b=b)
        else:
            result = value(b, root.results[0], row_start, {})
            b.create("mem.store", [result, out] + outer_ivs + [L.idx(0)] * (t.rank - len(outer)))
    L.nest(outer, row)
    return [out] + extra_outs


IDENTITY_OF = {"mlc.reduce_sum": 0.0, "mlc.reduce_mean": 0.0, "mlc.reduce_prod": 1.0,
               "mlc.reduce_max": float("-inf"), "mlc.reduce_min": float("inf")}


def _whole_rows(members) -> bool:
    """Whether the row kernel's result has whole rows (else one value per row)."""
    root = members[-1]
    first = next(o for o in members if o.name in ROW_REDUCTIONS)
    full, inner = first.operands[0].type, len(first.opdef.axes(first, first.operands[0].type.rank))
    return root.name not in ROW_REDUCTIONS and root.results[0].type.shape[-inner:] == full.shape[-inner:]


def writes_whole_rows(members) -> bool:
    """Whether the row kernel of these ops (the last is the result) writes each element of its result
    once, at the index its operands are read, keeping nothing in the result row: so it may write over
    an operand (bufferize)."""
    if not _whole_rows(members):
        return False
    first = next(o for o in members if o.name in ROW_REDUCTIONS)
    return _stash(members, members[-1], len(first.opdef.axes(first, first.operands[0].type.rank))) is None


def _stash(members, root, inner):
    """The latest expensive whole-row value, of the result's element type, that the result and some
    reduction both compute from (else None)."""
    def reaches(v, target):
        p = v.defining_op()
        return v is target or (p in members and p.name not in ROW_REDUCTIONS and any(reaches(o, target) for o in p.operands))
    reductions = [o for o in members if o.name in ROW_REDUCTIONS]
    element, row = root.results[0].type.element, root.results[0].type.shape[-inner:]
    for o in reversed(members[:-1]):
        v = o.results[0]
        if (getattr(o.opdef, "cost", None) == tensor_ops.EXPENSIVE and v.type.element == element and v.type.shape[-inner:] == row
                and reaches(root.results[0], v) and any(reaches(r.operands[0], v) for r in reductions)):
            return v
    return None


def _reduce_row(L, b, op, row_sizes, outer_ivs, value, stash, out):
    """One reduction over a row: nested loops carrying the accumulator, marked reassociable so they
    vectorise; with `stash`, each element of that value is also stored into the result row."""
    def level(b, ivs, acc):
        if len(ivs) < len(row_sizes):
            return L.loop(b, L.idx(0), row_sizes[len(ivs)], lambda ib, iv, a: [level(ib, ivs + [iv], a)], carried=[acc])[0]
        at, memo = outer_ivs + ivs, {}
        x = value(b, op.operands[0], at, memo)
        if stash is not None:
            b.create("mem.store", [value(b, stash, at, memo), out] + at)
        return b.create(COMBINE[op.name], [acc, x], {"reassoc": True}).result
    e = op.results[0].type.element
    total = level(b, [], L.const(b, IDENTITY_OF[op.name], e))
    if op.name == "mlc.reduce_mean":
        count = int(np.prod([s.defining_op().attr("value") for s in row_sizes]))
        total = L.op(b, "arith.div", total, L.const(b, count, e))
    return total


@rule("mlc.cross_entropy")
def cross_entropy(L: FunctionLowering, op: Operation):
    """Per row, in parallel: log(sum(exp(x - max))) + max - x[label], the max and the sum each carried
    in a register over the row (a warp per row on a GPU); then the mean of the rows' losses."""
    x, labels = (L.buffers[v] for v in op.operands)
    if x.type.rank != 2:
        raise error(op.loc, "cannot lower cross_entropy over more than 2 dims to loops yet", op.name)
    e = x.type.element
    n, c = L.dims(x)
    L.check(L.b, L.op(L.b, "arith.eq", L.dim(labels, 0), n), "labels and logits have different batch sizes")
    losses = L.alloc(TensorType((x.type.shape[0],), e), [n])

    def row(b, ivs):
        i = ivs[0]
        biggest = L.loop(b, L.idx(0), c, lambda jb, j, m: [jb.create("arith.maximum", [m, jb.create("mem.load", [x, i, j]).result],
                                                                     {"reassoc": True}).result],
                         carried=[L.const(b, float("-inf"), e)])[0]

        def add_exp(jb, j, s):
            shifted = L.op(jb, "arith.sub", jb.create("mem.load", [x, i, j]).result, biggest)
            return [jb.create("arith.add", [s, L.op(jb, "arith.exp", shifted)], {"reassoc": True}).result]
        total = L.loop(b, L.idx(0), c, add_exp, carried=[L.const(b, 0, e)])[0]
        label = as_index(L, b, b.create("mem.load", [labels, i]).result)
        picked = b.create("mem.load", [x, i, label]).result
        b.create("mem.store", [L.op(b, "arith.sub", L.op(b, "arith.add", L.op(b, "arith.log", total), biggest), picked), losses, i])
    L.nest([n], row)
    out = L.alloc(op.results[0].type, [], op.results[0].name_hint)
    mean = L.loop(L.b, L.idx(0), n, lambda rb, i, s: [L.op(rb, "arith.add", s, rb.create("mem.load", [losses, i]).result)],
                  carried=[L.const(L.b, 0, e)])[0]
    L.b.create("mem.store", [L.op(L.b, "arith.div", mean, L.b.create("arith.cast", [n], result_types=[e]).result), out])
    return [out]


@rule("mlc.topk")
def topk(L: FunctionLowering, op: Operation):
    """Per row along the axis, k rounds of selection: round r scans the row for the best element that
    comes after round r - 1's pick in the output order (better value, or an equal one at a higher
    index), so nothing needs marking; O(k n) per row."""
    x = L.buffers[op.operands[0]]
    e, k = x.type.element, op.attr("k")
    axis = norm_axis(op.attr("axis"), x.type.rank)
    sizes = L.dims(x)
    n = sizes[axis]
    if x.type.shape[axis] is None:
        L.check(L.b, L.op(L.b, "arith.le", L.idx(k), n), f"k = {k} exceeds the size of axis {axis}")
    out_sizes = sizes[:axis] + [L.idx(k)] + sizes[axis + 1:]
    values, indices = (L.alloc(r.type, out_sizes, r.name_hint) for r in op.results)

    def nan(b, v):
        return L.op(b, "arith.ne", v, v)

    def better(b, a, c):
        """a comes before c by value: NaN is the largest (as the interpreter's numpy sort)."""
        first, last = (a, c) if op.attr("largest") else (c, a)
        beats = L.op(b, "arith.gt", first, last)
        if not e.is_float:
            return beats
        return L.op(b, "arith.or", beats, L.op(b, "arith.and", nan(b, first), L.op(b, "arith.not", nan(b, last))))

    def same(b, a, c):
        eq = L.op(b, "arith.eq", a, c)
        return L.op(b, "arith.or", eq, L.op(b, "arith.and", nan(b, a), nan(b, c))) if e.is_float else eq

    def row(b, ivs):
        at = lambda i: ivs[:axis] + [i] + ivs[axis:]  # noqa: E731

        def pick(rb, r, prev_v, prev_i):
            first = L.op(rb, "arith.eq", r, L.idx(0))

            def scan(sb, j, best_v, best_i):
                v = sb.create("mem.load", [x] + at(j)).result
                later = L.op(sb, "arith.and", same(sb, prev_v, v), L.op(sb, "arith.gt", j, prev_i))
                after_prev = L.op(sb, "arith.or", first, L.op(sb, "arith.or", better(sb, prev_v, v), later))
                none_yet = L.op(sb, "arith.eq", best_i, n)
                take = L.op(sb, "arith.and", after_prev, L.op(sb, "arith.or", none_yet, better(sb, v, best_v)))
                return [L.op(sb, "arith.select", take, v, best_v), L.op(sb, "arith.select", take, j, best_i)]
            best_v, best_i = L.loop(rb, L.idx(0), n, scan, carried=[L.const(rb, 0, e), n])
            rb.create("mem.store", [best_v, values] + at(r))
            rb.create("mem.store", [rb.create("arith.cast", [best_i], result_types=[i64]).result, indices] + at(r))
            return [best_v, best_i]
        L.loop(b, L.idx(0), L.idx(k), pick, carried=[L.const(b, 0, e), L.idx(0)])
    L.nest(sizes[:axis] + sizes[axis + 1:], row)
    return [values, indices]
