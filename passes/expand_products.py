"""expand-products: each mem.matmul and mem.conv2d as plain loops, one parallel loop per dim of the
result, the reduction carried in a register (f32 for f16/bf16 data), then the epilogue's ops:

    mem.matmul %a, %b, %c { epilogue }
becomes
    loop.for %i {parallel} { loop.for %j {parallel} {
      %sum = loop.for %k, %zero { %acc + %a[%i, %k] * %b[%k, %j] }
      %c[%i, %j] = epilogue(%i, %j, %sum) } }

The simplest correct form of a product: where `tile` gives the CPU its blocked kernels, this is what
the GPU pipeline maps to threads (one per element of the result) until it has tiled kernels of its own.
"""
from __future__ import annotations

from mlc.ir.core import Builder, Module, Operation
from mlc.ir.dialects.loops import Matmul
from mlc.ir.types import f32

from .lowering.core import LoopBuilder, store_through_epilogue
from .manager import Pass


class ExpandProducts(Pass):
    name = "expand-products"
    summary = "each mem.matmul / mem.conv2d as a parallel loop per result element, the sum in a register"

    def run(self, module: Module) -> None:
        for f in module.functions.values():
            L = LoopBuilder(module, f)
            for op in [o for o in f.body.walk() if o.name in ("mem.matmul", "mem.conv2d")]:
                L.b = Builder.before(op, module)
                (expand_matmul if op.name == "mem.matmul" else expand_conv)(L, op)
                op.erase()


def _accumulator(e):
    return f32 if e.name in ("f16", "bf16") else e


def _product(L: LoopBuilder, b: Builder, acc, x, y):
    """acc + x * y, in acc's type."""
    widen = [b.create("arith.cast", [v], result_types=[acc.type]).result if v.type != acc.type else v for v in (x, y)]
    return L.op(b, "arith.add", acc, L.op(b, "arith.mul", *widen))


def _finish(L: LoopBuilder, b: Builder, op: Operation, out, at: list, indices: list, total) -> None:
    e = out.type.element
    if total.type != e:
        total = b.create("arith.cast", [total], result_types=[e]).result
    store_through_epilogue(b, op, out, at, indices, total)


def expand_matmul(L: LoopBuilder, op: Operation) -> None:
    ranks = [t.rank for t in op.operand_types[:3]]
    (a, b, c), (at_a, at_b, at_c) = Matmul.split(op.operands, ranks)
    ta, tb = bool(op.attr("transpose_a")), bool(op.attr("transpose_b"))
    m, n = (L.dim(c, axis) for axis in Matmul.matrix_axes(op, 2))
    k = L.dim(a, Matmul.matrix_axes(op, 0)[0 if ta else 1])
    acc_type = _accumulator(c.type.element)

    def element(eb: Builder, ivs):
        i, j = ivs

        def step(kb, kk, acc):
            x = kb.create("mem.load", [a] + Matmul.place(op, 0, at_a, *((kk, i) if ta else (i, kk)))).result
            y = kb.create("mem.load", [b] + Matmul.place(op, 1, at_b, *((j, kk) if tb else (kk, j)))).result
            return [_product(L, kb, acc, x, y)]
        (total,) = L.loop(eb, L.idx(0), k, step, carried=[L.const(eb, 0, acc_type)])
        _finish(L, eb, op, c, Matmul.place(op, 2, at_c, i, j), [i, j], total)
    L.nest([m, n], element, parallel=True)


def expand_conv(L: LoopBuilder, op: Operation) -> None:
    """out[n, o, y, x] = sum over c, i, j of x[n, g*C + c, y*sy + i*dh, x*sx + j*dw] * w[o, c, i, j]."""
    x, w, out = op.operands
    sizes = L.dims(out)
    _, channels, kh, kw = L.dims(w)
    (dh, dw), (sy, sx) = op.attr("dilation"), op.attr("stride")
    per_group = L.op(L.b, "arith.div", sizes[1], L.idx(op.attr("groups")))
    acc_type = _accumulator(out.type.element)

    def element(eb: Builder, ivs):
        bn, o, y, col = ivs
        first = L.op(eb, "arith.mul", L.op(eb, "arith.div", o, per_group), channels)
        top = L.op(eb, "arith.mul", y, L.idx(sy))

        def tap(jb, c, i, j, acc):
            iy = L.op(jb, "arith.add", top, L.op(jb, "arith.mul", i, L.idx(dh)))
            ix = L.op(jb, "arith.add", L.op(jb, "arith.mul", col, L.idx(sx)), L.op(jb, "arith.mul", j, L.idx(dw)))
            v = jb.create("mem.load", [x, bn, L.op(jb, "arith.add", first, c), iy, ix]).result
            return [_product(L, jb, acc, v, jb.create("mem.load", [w, o, c, i, j]).result)]
        (total,) = L.loop(eb, L.idx(0), channels, lambda cb, c, acc: L.loop(
            cb, L.idx(0), kh, lambda ib, i, acc: L.loop(
                ib, L.idx(0), kw, lambda jb, j, acc: tap(jb, c, i, j, acc), carried=[acc]), carried=[acc]),
            carried=[L.const(eb, 0, acc_type)])
        _finish(L, eb, op, out, ivs, ivs, total)
    L.nest(sizes, element, parallel=True)
