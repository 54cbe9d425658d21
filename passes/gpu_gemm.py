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
from mlc.ir.types import MemRefType, index

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

    def kernel(self, b: Builder, bid, tid, tiles):
        L, e = self.L, self.element
        a_tile = b.create("gpu.shared_alloc", result_types=[MemRefType((self.bk, self.bm), e, "shared")], name_hint="a_tile").result
        b_tile = b.create("gpu.shared_alloc", result_types=[MemRefType((self.bk, self.bn), e, "shared")], name_hint="b_tile").result
        batch = L.op(b, "arith.div", bid, tiles)
        in_batch = L.op(b, "arith.sub", bid, L.op(b, "arith.mul", batch, tiles))
        tile_i = L.op(b, "arith.div", in_batch, self.tiles_n)
        tile_j = L.op(b, "arith.sub", in_batch, L.op(b, "arith.mul", tile_i, self.tiles_n))
        row0 = b.create("arith.mul", [tile_i, L.idx(self.bm)], name_hint="row0").result
        col0 = b.create("arith.mul", [tile_j, L.idx(self.bn)], name_hint="col0").result
        per_row = self.bn // self.tn
        ty = L.op(b, "arith.div", tid, L.idx(per_row))
        tx = L.op(b, "arith.sub", tid, L.op(b, "arith.mul", ty, L.idx(per_row)))
        my_rows = L.op(b, "arith.mul", ty, L.idx(self.tm))
        my_cols = L.op(b, "arith.mul", tx, L.idx(self.tn))
        zero = L.const(b, 0, e)

        def slice_of_k(sb, kt, *acc):
            k0 = L.op(sb, "arith.mul", kt, L.idx(self.bk))
            self.copy(sb, tid, a_tile, self.bm, self.a_along_k, lambda cb, r, c: self.read(
                cb, lambda xb, i, kk: self.load_a(xb, batch, i, kk), L.op(cb, "arith.add", row0, c), self.last_m,
                L.op(cb, "arith.add", k0, r), self.last_k, self.m, self.k))
            self.copy(sb, tid, b_tile, self.bn, False, lambda cb, r, c: self.read(
                cb, lambda xb, kk, j: self.load_b(xb, batch, kk, j), L.op(cb, "arith.add", k0, r), self.last_k,
                L.op(cb, "arith.add", col0, c), self.last_n, self.k, self.n))
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
                col = L.op(b, "arith.add", col0, L.op(b, "arith.add", my_cols, L.idx(j)))
                inside = L.op(b, "arith.and", L.op(b, "arith.lt", row, self.m), L.op(b, "arith.lt", col, self.n))
                then, other = Block(), Block()
                b.create("loop.if", [inside], regions=[Region([then]), Region([other])])
                tb = Builder.at_end(then, L.module, b.loc)
                self.store(tb, batch, row, col, acc[i * self.tn + j])
                tb.create("loop.yield", [])
                Builder.at_end(other, L.module, b.loc).create("loop.yield", [])

    def copy(self, b: Builder, tid, tile, width: int, along_r: bool, value):
        """tile[r, c] = value(r, c) for the bk x width tile, each thread a few elements; consecutive
        threads take consecutive r (along_r) or c, as the operand is contiguous, so reads coalesce."""
        L = self.L
        fast = self.bk if along_r else width
        for step in range(self.bk * width // self.threads):
            e = L.op(b, "arith.add", tid, L.idx(step * self.threads))
            slow = L.op(b, "arith.div", e, L.idx(fast))
            quick = L.op(b, "arith.sub", e, L.op(b, "arith.mul", slow, L.idx(fast)))
            r, c = (quick, slow) if along_r else (slow, quick)
            b.create("mem.store", [value(b, r, c), tile, r, c])

    def read(self, b: Builder, load, x, last_x, y, last_y, size_x, size_y):
        """load(x, y) where both are in range, else 0: the indices are clamped (every read stays inside
        the operand) and the value replaced."""
        L = self.L
        v = load(b, L.op(b, "arith.minimum", x, last_x), L.op(b, "arith.minimum", y, last_y))
        inside = L.op(b, "arith.and", L.op(b, "arith.lt", x, size_x), L.op(b, "arith.lt", y, size_y))
        return L.op(b, "arith.select", inside, v, L.const(b, 0, self.element))
