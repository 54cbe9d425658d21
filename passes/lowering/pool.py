"""Max and average pooling and their gradients."""
from __future__ import annotations

import numpy as np

from mlc.ir.core import Operation
from mlc.ir.types import TensorType

from .core import FunctionLowering, rule
from .windows import guarded_load, in_bounds, source_index, window_index, window_size


@rule("mlc.max_pool2d", "mlc.avg_pool2d")
def pool2d(L: FunctionLowering, op: Operation):
    x = L.buffers[op.operands[0]]
    t = op.results[0].type
    (kh, kw), (sh, sw), (pt, pl, _, _) = op.opdef.params(op)
    n, c, h, wd = L.dims(x)
    oh = L.idx(t.shape[2]) if t.shape[2] is not None else window_size(L, op, h, 2)
    ow = L.idx(t.shape[3]) if t.shape[3] is not None else window_size(L, op, wd, 3)
    out = L.alloc(t, [n, c, oh, ow], op.results[0].name_hint)
    e = t.element
    is_max = op.name == "mlc.max_pool2d"
    lowest = -np.inf if e.is_float else np.iinfo(e.np_dtype).min
    counts = L.alloc(TensorType((), e), []) if not is_max else None

    def body(b, ivs):
        bn, ch, oy, ox = ivs
        b.create("mem.store", [L.const(b, lowest if is_max else 0, e), out] + ivs)
        if counts is not None:
            b.create("mem.store", [L.const(b, 0, e), counts])

        def acc(ib, kvs):
            i, j = kvs
            iy, ix = window_index(L, ib, oy, i, sh, 1, pt), window_index(L, ib, ox, j, sw, 1, pl)
            inside = L.op(ib, "arith.and", in_bounds(L, ib, iy, h), in_bounds(L, ib, ix, wd))
            v = guarded_load(L, ib, x, [bn, ch, iy, ix], inside, L.const(ib, lowest if is_max else 0, e))
            cur = ib.create("mem.load", [out] + ivs).result
            ib.create("mem.store", [L.op(ib, "arith.maximum" if is_max else "arith.add", cur, v), out] + ivs)
            if counts is not None:
                one = ib.create("arith.cast", [inside], result_types=[e]).result
                ib.create("mem.store", [L.op(ib, "arith.add", ib.create("mem.load", [counts]).result, one), counts])
        L.nest([L.idx(kh), L.idx(kw)], acc, parallel=False, b=b)
        if not is_max:
            divisor = L.const(b, kh * kw, e) if op.attr("count_include_pad") else b.create("mem.load", [counts]).result
            b.create("mem.store", [L.op(b, "arith.div", b.create("mem.load", [out] + ivs).result, divisor), out] + ivs)
    L.nest([n, c, oh, ow], body, parallel=counts is None)
    return [out]


def _pool_grad_buffers(L: FunctionLowering, op: Operation):
    """(input, cotangent, the result buffer, kernel, stride, padding) of a pooling's gradient op."""
    x, g = (L.buffers[v] for v in op.operands)
    out = L.alloc(op.results[0].type, L.dims(x), op.results[0].name_hint)
    return (x, g, out) + tuple(op.opdef.params(op))


@rule("mlc.max_pool2d_grad")
def max_pool2d_grad(L: FunctionLowering, op: Operation):
    """Scatter form, one (n, c) plane per parallel iteration: for each window in order, find its
    first maximum (carried in registers) and add the window's cotangent there."""
    x, g, out, (kh, kw), (sh, sw), (pt, pl, _, _) = _pool_grad_buffers(L, op)
    n, c, h, wd = L.dims(x)
    oh, ow = L.dim(g, 2), L.dim(g, 3)
    e = out.type.element

    def plane(b, ivs):
        L.nest([h, wd], lambda zb, yx: zb.create("mem.store", [L.const(zb, 0, e), out] + ivs + yx), parallel=False, b=b)

        def window(wb, oyx):
            oy, ox = oyx
            top, left = (L.op(wb, "arith.maximum", L.op(wb, "arith.sub", L.op(wb, "arith.mul", o, L.idx(s)), L.idx(lo)), L.idx(0))
                         for o, s, lo in ((oy, sh, pt), (ox, sw, pl)))

            def row(rb, i, best, by, bx):
                def col(cb, j, best, by, bx):
                    iy, ix = window_index(L, cb, oy, i, sh, 1, pt), window_index(L, cb, ox, j, sw, 1, pl)
                    inside = L.op(cb, "arith.and", in_bounds(L, cb, iy, h), in_bounds(L, cb, ix, wd))
                    v = guarded_load(L, cb, x, ivs + [iy, ix], inside, L.const(cb, -np.inf, e))
                    better = L.op(cb, "arith.gt", v, best)
                    return [L.op(cb, "arith.select", better, v, best), L.op(cb, "arith.select", better, iy, by),
                            L.op(cb, "arith.select", better, ix, bx)]
                return L.loop(rb, L.idx(0), L.idx(kw), col, carried=[best, by, bx])
            _, by, bx = L.loop(wb, L.idx(0), L.idx(kh), row, carried=[L.const(wb, -np.inf, e), top, left])
            at = ivs + [by, bx]
            total = L.op(wb, "arith.add", wb.create("mem.load", [out] + at).result, wb.create("mem.load", [g] + ivs + oyx).result)
            wb.create("mem.store", [total, out] + at)
        L.nest([oh, ow], window, parallel=False, b=b)
    L.nest([n, c], plane)
    return [out]


@rule("mlc.avg_pool2d_grad")
def avg_pool2d_grad(L: FunctionLowering, op: Operation):
    """Gather form: each input element sums g / divisor over the windows that hold it."""
    x, g, out, (kh, kw), (sh, sw), (pt, pl, _, _) = _pool_grad_buffers(L, op)
    n, c, h, wd = L.dims(x)
    oh, ow = L.dim(g, 2), L.dim(g, 3)
    e = out.type.element

    def covered(b, o, s, lo, k, size):
        """How many of window o's rows (or columns) lie inside the input."""
        start = L.op(b, "arith.sub", L.op(b, "arith.mul", o, L.idx(s)), L.idx(lo))
        stop = L.op(b, "arith.minimum", L.op(b, "arith.add", start, L.idx(k)), size)
        return L.op(b, "arith.sub", stop, L.op(b, "arith.maximum", start, L.idx(0)))

    def element(b, ivs):
        bn, ch, iy, ix = ivs

        def row(rb, i, acc):
            oy, in_y = source_index(L, rb, iy, i, sh, 1, pt, oh)

            def col(cb, j, acc):
                ox, in_x = source_index(L, cb, ix, j, sw, 1, pl, ow)
                inside = L.op(cb, "arith.and", in_y, in_x)
                share = guarded_load(L, cb, g, [bn, ch, oy, ox], inside, L.const(cb, 0, e))
                if op.attr("count_include_pad"):
                    divisor = L.const(cb, kh * kw, e)
                else:
                    cells = L.op(cb, "arith.mul", covered(cb, oy, sh, pt, kh, h), covered(cb, ox, sw, pl, kw, wd))
                    divisor = cb.create("arith.cast", [L.op(cb, "arith.maximum", cells, L.idx(1))], result_types=[e]).result
                return [L.op(cb, "arith.add", acc, L.op(cb, "arith.div", share, divisor))]
            return L.loop(rb, L.idx(0), L.idx(kw), col, carried=[acc])
        total = L.loop(b, L.idx(0), L.idx(kh), row, carried=[L.const(b, 0, e)])[0]
        b.create("mem.store", [total, out] + ivs)
    L.nest([n, c, h, wd], element)
    return [out]
