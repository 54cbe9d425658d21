"""mlc.matmul: a mem.matmul over buffers where the tiled GEMM applies (f32/f64 matrices; the tile pass
blocks and packs it), else loops blocked over rows; and mlc.transpose."""
from __future__ import annotations

import math

from mlc.ir.core import Block, Builder, Operation, Region, Value
from mlc.ir.dialects.mlc import Matmul
from mlc.ir.types import TensorType, index

from .. import gemm
from .core import BatchView, FunctionLowering, apply_epilogue, copy_nest, rule


@rule("mlc.matmul")
def matmul(L: FunctionLowering, op: Operation, epilogue=None):
    """numpy `@`: a rank-1 operand is a row (left) or column (right) whose extra dim is dropped. An
    operand stored transposed or interleaved (layout's `transpose_a`, `interleaved_a`, ...) is read in
    place by the GEMM, which writes an interleaved result in place too; the other loops read and write
    copies."""
    a, bm = (L.buffers[v] for v in op.operands)
    ta, tb = Matmul.stored_transposed(op)
    ia, ib, ic = Matmul.interleaved(op)
    t = op.results[0].type
    ra, rb = a.type.rank, bm.type.rank
    batch_rank = t.rank - (ra > 1) - (rb > 1)
    logical = tuple(_swap(t.shape, -3, -2)) if ic else t.shape
    batch = TensorType(logical[:batch_rank], t.element)
    views = [BatchView(v, flag) for v, flag in ((a, ia), (bm, ib)) if v.type.rank > 2]
    sizes = L.result_sizes(batch, views) if batch_rank else []
    tiled_gemm = ra > 1 and rb > 1 and (gemm.supports(t.element) or t.element.name in ("f16", "bf16"))  # (half: GPU tensor cores)
    if not tiled_gemm:
        a, bm = (_swapped_copy(L, v, -3, -2) if flag else v for v, flag in ((a, ia), (bm, ib)))
        a, bm = (_swapped_copy(L, v, -2, -1) if flag else v for v, flag in ((a, ta), (bm, tb)))
        ta = tb = ia = ib = False
    (ax, ay), (bx, by) = ((r - 3 if flag else r - 2, r - 1) for r, flag in ((ra, ia), (rb, ib)))  # (the matrices' dims as stored)
    rows = [L.dim(a, ay if ta else ax)] if ra > 1 else []
    cols = [L.dim(bm, bx if tb else by)] if rb > 1 else []
    k = L.dim(a, ax if ta else ay)
    stored = lambda ivs: _swap(ivs, -3, -2) if ic else ivs  # noqa: E731  (result indices, logical -> as stored)
    out = L.alloc(t, stored(sizes + rows + cols), op.results[0].name_hint)
    read_a = L.broadcast_reader(views[0], batch_rank) if ra > 2 else (lambda b, ivs: [])
    read_b = L.broadcast_reader(views[-1], batch_rank) if rb > 2 else (lambda b, ivs: [])

    if tiled_gemm:  # the tile pass makes the blocked, packed loop nest of it
        def product(b, bi):
            block = Block([index, index, t.element], ["i", "j", "acc"])
            flags = {mark: True for mark in Matmul.MARKS if op.attr(mark)}  # (mem.matmul's are the same)
            if op.attr("mlc.tile") is not None:  # (tile sizes `mlc tune` measured for this product)
                flags["tile"] = op.attr("mlc.tile")
            b.create("mem.matmul", [a, bm, out, *read_a(b, bi), *read_b(b, bi), *bi], flags or None, regions=[Region([block])])
            i, j, acc = block.args
            eb = Builder.at_end(block, L.module, b.loc)
            eb.create("mem.yield", [epilogue(eb, acc, stored(bi + [i, j])) if epilogue else acc])
        if batch_rank:
            L.nest(sizes, product, parallel=True)
        else:
            product(L.b, [])
        return [out]
    if ic:  # the product into a buffer of its own, copied into the result's places
        logical_out = L.alloc(TensorType(logical, t.element), sizes + rows + cols)
        _loops(L, a, bm, logical_out, sizes, rows, cols, k, ra, rb, read_a, read_b)
        copy_nest(L, logical_out, out, sizes + rows + cols, lambda b, ivs: ivs, lambda b, ivs: stored(ivs))
        return apply_epilogue(L, out, stored(sizes + rows + cols), epilogue)
    _loops(L, a, bm, out, sizes, rows, cols, k, ra, rb, read_a, read_b)
    return apply_epilogue(L, out, sizes + rows + cols, epilogue)


def _loops(L: FunctionLowering, a, bm, out, sizes, rows, cols, k, ra, rb, read_a, read_b):
    """out = a @ bm in plain loops (element types the GEMM does not take)."""

    # Zero the result, then accumulate with the reduction loop outside the column loop: the innermost
    # loop walks rows of b and out contiguously, which LLVM vectorises.
    L.nest(sizes + rows + cols, lambda b, ivs: b.create("mem.store", [L.const(b, 0, out.type.element), out] + ivs))

    def row_block(b, bi, first, count, kk):
        """out[first + r, :] += a[first + r, kk] * b[kk, :] for r < count: one pass over a row of b
        feeds `count` rows of the result (register blocking)."""
        xs = [b.create("mem.load", [a] + read_a(b, bi) + ([L.op(b, "arith.add", first, L.idx(r))] if ra > 1 else []) + [kk]).result
              for r in range(count)]

        def accumulate(ib, js):
            col = js if rb > 1 else []
            y = ib.create("mem.load", [bm] + read_b(ib, bi) + [kk] + col).result
            for r, x in enumerate(xs):
                at = bi + ([L.op(ib, "arith.add", first, L.idx(r))] if ra > 1 else []) + col
                acc = ib.create("mem.load", [out] + at).result
                ib.create("mem.store", [L.op(ib, "arith.add", acc, L.op(ib, "arith.mul", x, y)), out] + at)
        L.nest(cols or [L.idx(1)], accumulate, parallel=True, b=b)

    block_rows = 4

    def per_batch(b, bi):
        if ra == 1:
            L.loop(b, L.idx(0), k, lambda kb, kk: row_block(kb, bi, None, 1, kk))
            return
        m = rows[0]
        whole = L.op(b, "arith.mul", L.op(b, "arith.div", m, L.idx(block_rows)), L.idx(block_rows))
        for lb, ub, count, step in ((L.idx(0), whole, block_rows, block_rows), (whole, m, 1, 1)):
            L.loop(b, lb, ub, lambda ib, i, count=count: L.loop(ib, L.idx(0), k, lambda kb, kk: row_block(kb, bi, i, count, kk)),
                   parallel=True, step=step)
    if sizes:
        L.nest(sizes, per_batch, parallel=True)
    else:
        per_batch(L.b, [])


def _swap(items, i: int, j: int) -> list:
    items = list(items)
    items[i], items[j] = items[j], items[i]
    return items


def _swapped_copy(L: FunctionLowering, buf: Value, i: int, j: int) -> Value:
    """A buffer holding buf with dims i and j swapped."""
    sizes = _swap(L.dims(buf), i, j)
    out = L.alloc(TensorType(tuple(_swap(buf.type.shape, i, j)), buf.type.element), sizes)
    copy_nest(L, buf, out, sizes, lambda b, ivs: _swap(ivs, i, j), lambda b, ivs: ivs)
    return out


TRANSPOSE_TILE = 16  # a tile's rows are read along the input's last dim, its columns written along the output's
NEAR_READS = 4       # reads along the output's last dim at most this many elements apart share cache lines: no tiles
#                      (a stride-2 convolution's phase split: 0.11 -> 0.07 ms)


@rule("mlc.transpose")
def transpose(L: FunctionLowering, op: Operation):
    """A copy in tiles of TRANSPOSE_TILE x TRANSPOSE_TILE where the input's last dim moves: each tile
    reads whole cache lines of the input and writes whole lines of the output (element by element,
    one of the two would stride a row's length per element); in the output's order where its reads
    lie a few elements apart."""
    x = L.buffers[op.operands[0]]
    perm = op.attr("perm")
    r = len(perm)
    sizes = [L.dim(x, p) for p in perm]
    out = L.alloc(op.results[0].type, sizes, op.results[0].name_hint)

    def copy(b, ivs):
        src = [None] * r
        for out_axis, in_axis in enumerate(perm):
            src[in_axis] = ivs[out_axis]
        b.create("mem.store", [b.create("mem.load", [x] + src).result, out] + ivs)
    along = perm.index(r - 1)  # the output axis the input is contiguous along
    step = x.type.shape[perm[-1] + 1:]  # (input elements between two reads along the output's last dim)
    if along == r - 1 or None not in step and math.prod(step) <= NEAR_READS:
        L.nest(sizes, copy)
        return [out]
    others = [i for i in range(r) if i not in (along, r - 1)]
    tile = L.idx(TRANSPOSE_TILE)

    def tiles(b, outer):
        def one(tb, a0, c0):
            a1, c1 = (L.op(tb, "arith.minimum", L.op(tb, "arith.add", v, tile), sizes[axis]) for v, axis in ((a0, along), (c0, r - 1)))

            def element(eb, a, c):
                ivs = [None] * r
                for axis, v in list(zip(others, outer)) + [(along, a), (r - 1, c)]:
                    ivs[axis] = v
                copy(eb, ivs)
            L.loop(tb, a0, a1, lambda ab, a: L.loop(ab, c0, c1, lambda cb, c: element(cb, a, c)))
        L.loop(b, L.idx(0), sizes[along], lambda ab, a0: L.loop(ab, L.idx(0), sizes[r - 1], lambda cb, c0: one(cb, a0, c0),
                                                                 step=TRANSPOSE_TILE), parallel=not others, step=TRANSPOSE_TILE)
    L.nest([sizes[i] for i in others], tiles)
    return [out]
