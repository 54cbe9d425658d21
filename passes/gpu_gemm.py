"""The shared-memory tiled matrix product the tile-gpu pass emits, in loop IR with the gpu dialect:

    C[b, i, j] = epilogue(b, i, j, sum over k of A(b, i, k) * B(b, k, j))

one launch; each block computes a bm x bn tile of C for one batch entry b, its threads a tm x tn
micro-tile each, in registers carried over K:

    for each bk-deep slice of K:
        the block copies A's bm x bk and B's bk x bn slices into shared memory (each thread a few
        elements; reads past the edges clamped and replaced by zeros), barrier
        per k of the slice: tm values of A and tn of B from shared memory, tm x tn multiply-adds
        barrier (the next copy must not overwrite what a slower thread still reads)
    the epilogue and the store of each element inside C

A and B are read through callbacks, so one kernel serves plain and batched products, operands stored
transposed, and convolutions as implicit GEMMs (B(k, j) reads the input window at k for the output
pixel j: im2col addressing, no im2col copy).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from mlc.ir.core import Block, Builder, Region
from mlc.ir.types import ElementType, MemRefType, VectorType, index

from .lowering.core import LoopBuilder


@dataclass
class GpuGemm:
    m: object                     # index values: rows of C, columns of C, the reduction's length
    n: object
    k: object
    batch: object                 # index value: independent products (1 for one)
    element: object
    load_a: Callable              # (builder, b, i, k) -> A(b, i, k), for i < m, k < k
    load_b: Callable              # (builder, b, k, j) -> B(b, k, j)
    store: Callable               # (builder, b, i, j, sum): the epilogue and the store of C(b, i, j)
    a_along_k: bool = True        # whether A's consecutive elements run along k (so copies go that way)
    bm: int = 64
    bn: int = 64
    bk: int = 8
    tm: int = 4
    tn: int = 4

    @property
    def threads(self) -> int:
        return (self.bm // self.tm) * (self.bn // self.tn)

    def emit(self, L: LoopBuilder, b: Builder) -> None:
        def ceil_div(x, d):
            return L.op(b, "arith.div", L.op(b, "arith.add", x, L.idx(d - 1)), L.idx(d))
        self.L = L
        self.tiles_m, self.tiles_n = ceil_div(self.m, self.bm), ceil_div(self.n, self.bn)
        tiles = L.op(b, "arith.mul", self.tiles_m, self.tiles_n)
        blocks = b.create("arith.mul", [tiles, self.batch], name_hint="blocks").result
        self.last_m, self.last_k = (L.op(b, "arith.sub", v, L.idx(1)) for v in (self.m, self.k))
        self.last_n = L.op(b, "arith.sub", self.n, L.idx(1))
        self.k_tiles = ceil_div(self.k, self.bk)
        block = Block([index, index], ["bid", "tid"])
        b.create("gpu.launch", [blocks], {"block": [self.threads]}, regions=[Region([block])])
        kb = Builder.at_end(block, L.module, b.loc)
        self.kernel(kb, *block.args, tiles)
        kb.create("gpu.terminator", [])

    def shared(self, b: Builder, rows: int, cols: int, name: str):
        return b.create("gpu.shared_alloc", result_types=[MemRefType((rows, cols), self.element, "shared")], name_hint=name).result

    def block_tile(self, b: Builder, bid, tiles):
        """The batch entry of this block, and the first row and column of its tile of C."""
        L = self.L
        batch = L.op(b, "arith.div", bid, tiles)
        in_batch = L.op(b, "arith.sub", bid, L.op(b, "arith.mul", batch, tiles))
        tile_i = L.op(b, "arith.div", in_batch, self.tiles_n)
        tile_j = L.op(b, "arith.sub", in_batch, L.op(b, "arith.mul", tile_i, self.tiles_n))
        row0 = b.create("arith.mul", [tile_i, L.idx(self.bm)], name_hint="row0").result
        col0 = b.create("arith.mul", [tile_j, L.idx(self.bn)], name_hint="col0").result
        return batch, row0, col0

    def store_inside(self, b: Builder, batch, row, col, value):
        """The epilogue and store of C(row, col) when it is inside C."""
        L = self.L
        inside = L.op(b, "arith.and", L.op(b, "arith.lt", row, self.m), L.op(b, "arith.lt", col, self.n))
        then, other = Block(), Block()
        b.create("loop.if", [inside], regions=[Region([then]), Region([other])])
        tb = Builder.at_end(then, L.module, b.loc)
        if value.type != self.element:
            value = tb.create("arith.cast", [value], result_types=[self.element]).result
        self.store(tb, batch, row, col, value)
        tb.create("loop.yield", [])
        Builder.at_end(other, L.module, b.loc).create("loop.yield", [])

    def copy_slices(self, b: Builder, tid, batch, row0, col0, k0, a_tile, b_tile, a_rows_are_m: bool):
        """This k0 slice of A and of B into shared memory (A's tile m x k when a_rows_are_m, else k x m)."""
        L = self.L

        def a_value(cb, r, c):
            i, kk = (r, c) if a_rows_are_m else (c, r)
            return self.read(cb, lambda xb, x, y: self.load_a(xb, batch, x, y), L.op(cb, "arith.add", row0, i), self.last_m,
                             L.op(cb, "arith.add", k0, kk), self.last_k, self.m, self.k)
        a_shape = (self.bm, self.bk) if a_rows_are_m else (self.bk, self.bm)
        self.copy(b, tid, a_tile, *a_shape, self.a_along_k == a_rows_are_m, a_value)
        self.copy(b, tid, b_tile, self.bk, self.bn, True, lambda cb, r, c: self.read(
            cb, lambda xb, kk, j: self.load_b(xb, batch, kk, j), L.op(cb, "arith.add", k0, r), self.last_k,
            L.op(cb, "arith.add", col0, c), self.last_n, self.k, self.n))

    def kernel(self, b: Builder, bid, tid, tiles):
        L, e = self.L, self.element
        a_tile, b_tile = self.shared(b, self.bk, self.bm, "a_tile"), self.shared(b, self.bk, self.bn, "b_tile")
        batch, row0, col0 = self.block_tile(b, bid, tiles)
        per_row = self.bn // self.tn
        ty = L.op(b, "arith.div", tid, L.idx(per_row))
        tx = L.op(b, "arith.sub", tid, L.op(b, "arith.mul", ty, L.idx(per_row)))
        my_rows = L.op(b, "arith.mul", ty, L.idx(self.tm))
        my_cols = L.op(b, "arith.mul", tx, L.idx(self.tn))
        zero = L.const(b, 0, e)

        def slice_of_k(sb, kt, *acc):
            self.copy_slices(sb, tid, batch, row0, col0, L.op(sb, "arith.mul", kt, L.idx(self.bk)), a_tile, b_tile, False)
            sb.create("gpu.barrier", [])
            acc = list(acc)
            for kk in range(self.bk):
                a = [sb.create("mem.load", [a_tile, L.idx(kk), L.op(sb, "arith.add", my_rows, L.idx(i))]).result for i in range(self.tm)]
                bv = [sb.create("mem.load", [b_tile, L.idx(kk), L.op(sb, "arith.add", my_cols, L.idx(j))]).result for j in range(self.tn)]
                acc = [L.op(sb, "arith.add", acc[i * self.tn + j], L.op(sb, "arith.mul", a[i], bv[j]))
                       for i in range(self.tm) for j in range(self.tn)]
            sb.create("gpu.barrier", [])
            return acc
        acc = L.loop(b, L.idx(0), self.k_tiles, slice_of_k, carried=[zero] * (self.tm * self.tn))
        for i in range(self.tm):
            row = L.op(b, "arith.add", row0, L.op(b, "arith.add", my_rows, L.idx(i)))
            for j in range(self.tn):
                self.store_inside(b, batch, row, L.op(b, "arith.add", col0, L.op(b, "arith.add", my_cols, L.idx(j))), acc[i * self.tn + j])

    def copy(self, b: Builder, tid, tile, rows: int, cols: int, along_cols: bool, value):
        """tile[r, c] = value(r, c) for the rows x cols tile, each thread a few elements; consecutive
        threads take consecutive c (along_cols) or r, as the operand is contiguous, so reads coalesce."""
        L = self.L
        fast = cols if along_cols else rows
        for step in range(rows * cols // self.threads):
            e = L.op(b, "arith.add", tid, L.idx(step * self.threads))
            slow = L.op(b, "arith.div", e, L.idx(fast))
            quick = L.op(b, "arith.sub", e, L.op(b, "arith.mul", slow, L.idx(fast)))
            r, c = (slow, quick) if along_cols else (quick, slow)
            b.create("mem.store", [value(b, r, c), tile, r, c])

    def read(self, b: Builder, load, x, last_x, y, last_y, size_x, size_y):
        """load(x, y) where both are in range, else 0: the indices are clamped (every read stays inside
        the operand) and the value replaced."""
        L = self.L
        v = load(b, L.op(b, "arith.minimum", x, last_x), L.op(b, "arith.minimum", y, last_y))
        inside = L.op(b, "arith.and", L.op(b, "arith.lt", x, size_x), L.op(b, "arith.lt", y, size_y))
        return L.op(b, "arith.select", inside, v, L.const(b, 0, self.element))


@dataclass
class MmaGemm(GpuGemm):
    """The same product of f16 or bf16 operands on tensor cores: a 64 x (16 n_tiles) tile of C per block
    of four warps, each warp 32 x (8 n_tiles) of it as 2 x n_tiles tiles of gpu.mma_sync (m16n8k16, f32
    sums carried over K); the fragments come from the shared-memory slices (16 deep), by gpu.ldmatrix
    for f16. Given the operands' addresses (`address_a/b`: rows of A along k and of B along n, whole
    16-byte pieces), the slices arrive by gpu.copy_async into two stages: the next slice is in flight
    while the tensor cores work on this one."""
    address_a: Callable | None = None  # (builder, b, i, k) -> (buffer, indices) of A(b, i, k)
    address_b: Callable | None = None  # (builder, b, k, j) -> (buffer, indices) of B(b, k, j)
    n_tiles: int = 2
    bm: int = 64
    bn: int = 32
    bk: int = 16

    @property
    def threads(self) -> int:
        return 128

    @property
    def stages(self) -> int:
        return 2 if self.address_a is not None else 1

    def kernel(self, b: Builder, bid, tid, tiles):
        L = self.L
        a_tile = self.shared(b, self.stages * self.bm, self.bk, "a_tile")
        b_tile = self.shared(b, self.stages * self.bk, self.bn, "b_tile")
        batch, row0, col0 = self.block_tile(b, bid, tiles)
        warp = L.op(b, "arith.div", tid, L.idx(32))
        lane = L.op(b, "arith.sub", tid, L.op(b, "arith.mul", warp, L.idx(32)))
        warp_m = L.op(b, "arith.div", warp, L.idx(2))
        warp_rows = L.op(b, "arith.mul", warp_m, L.idx(32))
        warp_cols = L.op(b, "arith.mul", L.op(b, "arith.sub", warp, L.op(b, "arith.mul", warp_m, L.idx(2))), L.idx(8 * self.n_tiles))
        g = L.op(b, "arith.div", lane, L.idx(4))
        t2 = L.op(b, "arith.mul", L.op(b, "arith.sub", lane, L.op(b, "arith.mul", g, L.idx(4))), L.idx(2))
        # ldmatrix addresses: lane l gives row l % 8 of matrix l / 8; A's four are its 16 x 16 fragment
        # (rows +8 for matrices 1 and 3, columns +8 for 2 and 3), B's two the 16 rows of k, transposed
        l8 = L.op(b, "arith.div", lane, L.idx(8))
        l16 = L.op(b, "arith.div", lane, L.idx(16))
        a_row = L.op(b, "arith.add", warp_rows, L.op(b, "arith.add", L.op(b, "arith.sub", lane, L.op(b, "arith.mul", l8, L.idx(8))),
                                                     L.op(b, "arith.mul", L.op(b, "arith.sub", l8, L.op(b, "arith.mul", l16, L.idx(2))), L.idx(8))))
        a_col = L.op(b, "arith.mul", l16, L.idx(8))
        b_row = L.op(b, "arith.sub", lane, L.op(b, "arith.mul", l16, L.idx(16)))
        f32 = VectorType((4,), ElementType("f32"))
        zero = L.const(b, 0, ElementType("f32"))
        sums = b.create("vector.from_elements", [zero] * 4, result_types=[f32]).result

        def at(fb, base, k):
            return L.op(fb, "arith.add", base, L.idx(k)) if k else base

        def fragment(fb, tile, places, n):
            vt = VectorType((n,), self.element)
            return fb.create("vector.from_elements", [fb.create("mem.load", [tile, *p]).result for p in places], result_types=[vt]).result

        def products(sb, stage, acc):
            """This warp's tiles of sums, from the slices in `stage`."""
            a_base, b_base = L.op(sb, "arith.mul", stage, L.idx(self.bm)), L.op(sb, "arith.mul", stage, L.idx(self.bk))
            if self.element.name == "f16":  # ldmatrix: a warp's fragments in one instruction each
                rows, ks = L.op(sb, "arith.add", a_row, a_base), L.op(sb, "arith.add", b_row, b_base)
                a = [sb.create("gpu.ldmatrix", [a_tile, at(sb, rows, 16 * mi), a_col], {"count": 4},
                               result_types=[VectorType((8,), self.element)]).result for mi in range(2)]
                bs = [sb.create("gpu.ldmatrix", [b_tile, ks, at(sb, warp_cols, 8 * ni)], {"count": 2, "transpose": True},
                                result_types=[VectorType((4,), self.element)]).result for ni in range(self.n_tiles)]
            else:  # (bf16 lives in 32-bit storage: element by element)
                a = []
                for mi in range(2):
                    rows = L.op(sb, "arith.add", a_base, L.op(sb, "arith.add", warp_rows, L.op(sb, "arith.add", g, L.idx(16 * mi))))
                    a.append(fragment(sb, a_tile, [(at(sb, rows, 8 * (i // 2 % 2)), at(sb, t2, i % 2 + 8 * (i // 4))) for i in range(8)], 8))
                ks = L.op(sb, "arith.add", b_base, t2)
                bs = []
                for ni in range(self.n_tiles):
                    col = L.op(sb, "arith.add", warp_cols, L.op(sb, "arith.add", g, L.idx(8 * ni)))
                    bs.append(fragment(sb, b_tile, [(at(sb, ks, i % 2 + 8 * (i // 2)), col) for i in range(4)], 4))
            return [sb.create("gpu.mma_sync", [a[mi], bs[ni], acc[mi * self.n_tiles + ni]], result_types=[f32]).result
                    for mi in range(2) for ni in range(self.n_tiles)]

        def slice_of_k(sb, kt, *acc):
            if self.stages == 1:
                self.copy_slices(sb, tid, batch, row0, col0, L.op(sb, "arith.mul", kt, L.idx(self.bk)), a_tile, b_tile, True)
                sb.create("gpu.barrier", [])
                stage = L.idx(0)
            else:  # the next slice into the other stage, in flight; wait for this one
                following = L.op(sb, "arith.add", kt, L.idx(1))
                self.guarded(sb, L.op(sb, "arith.lt", following, self.k_tiles),
                             lambda gb: self.issue(gb, tid, batch, row0, col0, following, a_tile, b_tile))
                sb.create("gpu.async_commit", [])
                sb.create("gpu.async_wait", [], {"pending": 1})
                sb.create("gpu.barrier", [])
                stage = L.op(sb, "arith.sub", kt, L.op(sb, "arith.mul", L.op(sb, "arith.div", kt, L.idx(2)), L.idx(2)))
            out = products(sb, stage, acc)
            sb.create("gpu.barrier", [])
            return out
        if self.stages == 2:
            self.guarded(b, L.op(b, "arith.lt", L.idx(0), self.k_tiles),
                         lambda gb: self.issue(gb, tid, batch, row0, col0, L.idx(0), a_tile, b_tile))
            b.create("gpu.async_commit", [])
        acc = L.loop(b, L.idx(0), self.k_tiles, slice_of_k, carried=[sums] * (2 * self.n_tiles))
        for mi in range(2):
            for ni in range(self.n_tiles):
                for i in range(4):
                    row = L.op(b, "arith.add", row0, L.op(b, "arith.add", warp_rows, L.op(b, "arith.add", g, L.idx(16 * mi + 8 * (i // 2)))))
                    col = L.op(b, "arith.add", col0, L.op(b, "arith.add", warp_cols, L.op(b, "arith.add", t2, L.idx(8 * ni + i % 2))))
                    value = b.create("vector.extract", [acc[mi * self.n_tiles + ni]], {"position": i}).result
                    self.store_inside(b, batch, row, col, value)

    def guarded(self, b: Builder, condition, body):
        then, other = Block(), Block()
        b.create("loop.if", [condition], regions=[Region([then]), Region([other])])
        tb = Builder.at_end(then, self.L.module, b.loc)
        body(tb)
        tb.create("loop.yield", [])
        Builder.at_end(other, self.L.module, b.loc).create("loop.yield", [])

    def issue(self, b: Builder, tid, batch, row0, col0, kt, a_tile, b_tile):
        """gpu.copy_async of slice kt of A and of B into stage kt % 2, in 16-byte pieces: each thread a
        few; pieces past the edges are zeros (their addresses clamped, nothing read)."""
        L = self.L
        piece = 16 // self.element.np_dtype.itemsize
        k0 = L.op(b, "arith.mul", kt, L.idx(self.bk))
        stage = L.op(b, "arith.sub", kt, L.op(b, "arith.mul", L.op(b, "arith.div", kt, L.idx(2)), L.idx(2)))
        last_piece_k = L.op(b, "arith.sub", self.k, L.idx(piece))
        last_piece_n = L.op(b, "arith.sub", self.n, L.idx(piece))

        def pieces(rows: int, cols: int, copy):
            per_row = cols // piece
            total = rows * per_row
            for first in range(0, total, self.threads):
                e = L.op(b, "arith.add", tid, L.idx(first))
                r = L.op(b, "arith.div", e, L.idx(per_row))
                c = L.op(b, "arith.mul", L.op(b, "arith.sub", e, L.op(b, "arith.mul", r, L.idx(per_row))), L.idx(piece))
                if total - first < self.threads:
                    self.guarded(b, L.op(b, "arith.lt", e, L.idx(total)), lambda gb, r=r, c=c: copy(gb, r, c))
                else:
                    copy(b, r, c)

        def copy_a(cb, r, c):
            i, k = L.op(cb, "arith.add", row0, r), L.op(cb, "arith.add", k0, c)
            valid = L.op(cb, "arith.and", L.op(cb, "arith.lt", i, self.m), L.op(cb, "arith.lt", k, self.k))
            src, where = self.address_a(cb, batch, L.op(cb, "arith.minimum", i, self.last_m), L.op(cb, "arith.minimum", k, last_piece_k))
            cb.create("gpu.copy_async", [src, *where, a_tile, L.op(cb, "arith.add", L.op(cb, "arith.mul", stage, L.idx(self.bm)), r), c, valid])

        def copy_b(cb, r, c):
            k, j = L.op(cb, "arith.add", k0, r), L.op(cb, "arith.add", col0, c)
            valid = L.op(cb, "arith.and", L.op(cb, "arith.lt", k, self.k), L.op(cb, "arith.lt", j, self.n))
            src, where = self.address_b(cb, batch, L.op(cb, "arith.minimum", k, self.last_k), L.op(cb, "arith.minimum", j, last_piece_n))
            cb.create("gpu.copy_async", [src, *where, b_tile, L.op(cb, "arith.add", L.op(cb, "arith.mul", stage, L.idx(self.bk)), r), c, valid])
        pieces(self.bm, self.bk, copy_a)
        pieces(self.bk, self.bn, copy_b)
