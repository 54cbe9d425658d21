"""The register-tiled kernels the tile pass emits, in loop IR: matrix multiplication (mem.matmul),
C[M, N] = A[M, K] @ B[K, N], and the direct convolution (mem.conv2d).

The GotoBLAS/BLIS structure, spelled in loop IR so it prints, runs on the interpreter and is tested
like every other lowering:

    pack B into column panels Bp[N/NR][K][NR], zero-padded, so the kernel reads it contiguously
        (once, before the loops around the product that leave B unchanged: a scan's steps)
    parallel for each block of MC rows of C:
        zero the rows
        for each KC-deep slice of K (its panels stream from L1 or L2, the A rows stay in L2):
            for each panel of NR columns, for each MR rows:
                micro-kernel: MR x NR accumulators in vector registers, carried across the slice,
                one fma per (row, vector) per k; then added to C (through a scratch tile at the
                ragged right edge)
        epilogue, row by row, while the rows are still in cache (bias, activation, ...)

A and B are read through callbacks, so the same kernel serves batched matmul (with broadcasting) and
operands read through their transpose (no copy); A is copied too, per block of rows and slice of K,
into rows a cache line longer than the slice, only where its rows lie a multiple of 4 KB apart (a_rows_collide). A product of at most STREAM_ROWS rows (a batch of 1, a GEMV)
packs nothing: packing would read and write all of B to use it once, so B is streamed in place instead,
along its rows (tiles of up to 8 vectors of C's row; where B's rows are longer, C's rows summed in
memory as B's rows stream by in order, K split over threads) or, where B is read through its transpose (the weight of
nn.Linear), as dot products along K of A's rows with B's columns. DirectConv, below, reuses the micro-kernel's parts for
a convolution with stride 1 along x: its B vectors are contiguous runs of a padded input row, so it
packs nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from mlc.ir.core import Block, Builder, Region
from mlc.ir.types import MemRefType, VectorType

VECTOR_BYTES = 32  # AVX2; the GEMM takes tile's `vector-bytes` (the driver gives the host's widest)
MR = 6             # rows per micro-tile: 6 x 2 vectors = 12 accumulators of the 16 ymm registers
MR_AVX512 = 8      # with AVX-512's 32 registers: 16 accumulators (12 rows ran no faster, and 64, 128, 256, 512,
#                    1024 or 2048 rows, most products' and convolutions', then ended in a ragged tile: 18% more
#                    code for LLVM in ResNet-18, SGEMM 512 160-187 -> 204-208 GFLOP/s)
STREAM_ROWS = 6    # a product of at most this many static rows streams B in place (packing it would not pay)
FEW_ROWS = 3       # a product with rows known at run time streams B once per row up to this many
KC = 256           # depth of a slice of K (0 in the tile pass's options: by the vector width, as below)
KC_AVX512 = 512    # with 64-byte vectors: C's tiles pass through memory once per 512 of K; the slice's panel
#                    (64 KB) streams from L2 (192, panel and A rows in L1: SGEMM 1024 182 -> 188 GFLOP/s, ResNet-18 -1%)
MC = 48            # rows of C per parallel block (a multiple of MR and MR_AVX512)
CHANNEL_BLOCK = 16  # input channels per slice of a convolution's reduction
UNROLLED_WINDOW = 25  # taps of a window (5 x 5) up to which the direct convolution unrolls them (ResNet's 7 x 7
#                      stem as loops: as fast, and 537 -> 35 KB of LLVM IR, 0.5 s less of LLVM's work)
SPLIT_K = 4         # tasks a few-rows product with long rows of B splits K into (each a block of B's rows)
CONV_GEMM_PIXELS = 3136  # a convolution's result image of at most this many pixels (56 x 56) runs as a product
#                        (ResNet-18's 56 x 56 x 64 convolutions: 5-25% faster than the direct one)
IM2COL_COLUMNS = 8  # columns of a panel the im2col gathers side by side (all 32: 3x the code to compile, no faster)
GATHER_COLLIDING = 8  # columns of a transposed B gathered at once where they share L1 sets (8: the cache's ways)
DOT_TAIL = 2        # columns past the whole vectors done as dot products along K (more: a masked vector tile)
B_IN_L1 = 16384     # bytes of a B read in place, unpacked (rows contiguous, whole panels)
A_ROW_PAD = 16      # elements a copied row of A is longer than the slice of K (a line: rows not 4 KB apart)
AXPY_DEPTH = 8      # rows of B per pass over the partial sum, for one row of C (fewer for more rows: registers)


def supports(element) -> bool:
    return element.name in ("f32", "f64")


def lanes(element, vector_bytes: int = VECTOR_BYTES) -> int:
    """Elements of one vector register."""
    return vector_bytes // element.np_dtype.itemsize


@dataclass
class Gemm:
    M: object
    N: object
    K: object
    element: object
    load_a: Callable                      # (builder, i, k) -> scalar A[i, k]
    load_b: Callable                      # (builder, k, j) -> scalar B[k, j]
    load_b_vector: Callable | None        # (builder, k, j, type) -> B[k, j:j+lanes] where rows of B are
    #                                       contiguous; None where columns are (a transposed operand)
    c: object                             # the result buffer
    c_at: Callable                        # (i, j) -> the indices of C[i, j] in c
    epilogue: Callable | None = None      # (builder, i, j): C[i, j] is final; its epilogue, in place
    load_a_vector: Callable | None = None  # (builder, i, k, type) -> A[i, k:k+lanes] where rows of A are contiguous
    load_bt_vector: Callable | None = None  # (builder, k, j, type) -> B[k:k+lanes, j] where columns of B are
    load_at_vector: Callable | None = None  # (builder, i, k, type) -> A[i:i+lanes, k] where columns of A are
    #                                         contiguous (A read through its transpose)
    vector_bytes: int = VECTOR_BYTES      # 64: AVX-512's 32 registers hold 8 x 32 f32 tiles (MR_AVX512)
    kc: int = 0                           # 0: KC, or KC_AVX512 with 64-byte vectors
    mc: int = MC
    pack_at: tuple | None = None          # (builder, parallel) where B is packed when not just before the
    #                                       product: before the loops (a scan's steps) that leave B unchanged
    a_row: int | None = None              # elements from one row of A to the next in memory (None: K)
    a_column: int | None = None           # elements from one column of A read through its transpose to the next
    b_column: int | None = None           # elements from one column of B read through its transpose to the next (None: unknown)
    pack_panel: Callable | None = None    # (gemm, builder, jp, j0): packs panel jp of B (columns j0 .. j0 + nr) itself,
    #                                       where B is not in memory: a convolution's im2col (ConvAsGemm)
    b_panels: Callable | None = None      # (nr) -> B packed already (a weight's panels global, packed when set)

    def emit(self, L, b, parallel: bool):
        """The loop nest at b, built with L (a LoopBuilder). `parallel`: the row-block loop may run on
        threads (not inside another parallel loop). The direct convolution stays at 32-byte vectors:
        its tiles run along image rows, often narrower."""
        e, self.L = self.element, L
        self.lanes = lanes(e, self.vector_bytes)
        self.nr = 2 * self.lanes
        self.vt = VectorType((self.lanes,), e)
        wide = self.vector_bytes >= 64
        self.mr, self.kc = (MR_AVX512 if wide else MR), self.kc or (KC_AVX512 if wide else KC)
        self.a_copy = "rows" if self.a_rows_collide() else "columns" if self.a_columns_collide() else None  # (A in place)
        rows = static_value(self.M)
        stream = self.stream_b_rows if self.load_b_vector is not None else \
            self.stream_b_columns if self.load_bt_vector is not None and self.load_a_vector is not None else None
        if stream and rows is not None and rows <= STREAM_ROWS:
            return stream(b, rows, parallel)
        few = None
        if stream and rows is None:  # rows known at run time: a few (a batch of 1) are streamed one by one,
            # and the packed product below then packs and computes nothing (its loops stay at the top
            # level, where LLVM optimises them best)
            few = L.op(b, "arith.lt", self.M, L.idx(FEW_ROWS + 1))
            if_else(L, b, few, lambda fb: L.loop(fb, L.idx(0), self.M, lambda rb, i: stream(rb, 1, parallel, first=i)))
            self.M = L.op(b, "arith.select", few, L.idx(0), self.M)
        self.few = few
        nr = L.idx(self.nr)
        pb, pack_parallel = self.pack_at or (b, parallel)
        panels = L.op(pb, "arith.div", L.op(pb, "arith.add", self.N, L.idx(self.nr - 1)), nr)
        self.full_panels = L.op(pb, "arith.div", self.N, nr)
        if few is not None and self.pack_at is None:
            panels, self.full_panels = (L.op(pb, "arith.select", few, L.idx(0), v) for v in (panels, self.full_panels))
        if self.b_panels is not None:
            self.packed = self.b_panels(self.nr)
        elif self.b_fits_l1():
            self.packed = None
        else:
            self.packed = pb.create("mem.alloc", [panels, self.K], result_types=[MemRefType((None, None, self.nr), e)],
                                    name_hint="packed").result
            self.pack_b(pb, panels, pack_parallel)
        self.tail = self.copy_tail(pb) if self.dot_tail() else None
        n = static_value(self.N)
        if parallel and n is not None and n > self.nr:
            # two column halves per block of rows (whole panels; the second holds the ragged ones), so
            # that a product of few rows (a batch of 32, a convolution's 128 channels) has a task per
            # core: 3 blocks of rows on 2 cores ran no faster than on 1; and twice the tasks even out
            # (ResNet's 7 x 7 convolutions, 49 columns in 11 blocks: 145-147 -> 154-155 GFLOP/s)
            half = -(-n // (2 * self.nr)) * self.nr
            blocks = L.op(b, "arith.div", L.op(b, "arith.add", self.M, L.idx(self.mc - 1)), L.idx(self.mc))

            def task(tb, t):
                block = L.op(tb, "arith.div", t, L.idx(2))
                i0 = L.op(tb, "arith.mul", block, L.idx(self.mc))
                j0 = L.op(tb, "arith.mul", L.op(tb, "arith.sub", t, L.op(tb, "arith.mul", block, L.idx(2))), L.idx(half))
                if n == 2 * half:
                    return self.row_block(tb, i0, j0, L.op(tb, "arith.add", j0, L.idx(half)), half)
                # (each half its own static width: only the kinds of tile it has are emitted, and LLVM
                # took 0.5 s over the one with every kind a width known at run time needs)
                if_else(L, tb, L.op(tb, "arith.lt", j0, L.idx(half)), lambda fb: self.row_block(fb, i0, L.idx(0), L.idx(half), half),
                        lambda sb: self.row_block(sb, i0, L.idx(half), L.idx(n), n - half))
            L.loop(b, L.idx(0), L.op(b, "arith.mul", blocks, L.idx(2)), task, parallel=True)
        else:
            L.loop(b, L.idx(0), self.M, lambda ib, i0: self.row_block(ib, i0), parallel=parallel, step=self.mc)

    # --- packing -------------------------------------------------------------------------------------
    def pack_b(self, b, panels, parallel):
        L, lanes = self.L, self.lanes
        if self.pack_panel is not None:  # (an im2col: scalar gathers, compiled for size, 4x faster to compile, as fast to run)
            L.loop(b, L.idx(0), panels, lambda pb, jp: self.pack_panel(self, pb, jp, L.op(pb, "arith.mul", jp, L.idx(self.nr))),
                   parallel=parallel, compact=True)
            return

        def whole(pb, jp):  # a whole panel, a vector of a row of it at a time
            j0 = L.op(pb, "arith.mul", jp, L.idx(self.nr))
            if self.load_b_vector is not None:  # loaded from B's row
                def row(kb, k):
                    for h in range(0, self.nr, lanes):
                        v = self.load_b_vector(kb, k, L.op(kb, "arith.add", j0, L.idx(h)), self.vt)
                        kb.create("vector.store", [v, self.packed, jp, k, L.idx(h)])
                L.loop(pb, L.idx(0), self.K, row)
                return
            # B's columns contiguous: gathered from them, `width` at a time (was element by element down each
            # column: attention's 32 x 32 panels of keys 1 KB apart 0.47-0.51 -> 0.39 ms for the scores of
            # 32 x 8 heads; a 1024 x 1024 weight's 2.77 -> 2.56 ms)
            width = GATHER_COLLIDING if self.b_columns_collide() else lanes
            vt = VectorType((width,), self.element)
            columns = [L.op(pb, "arith.add", j0, L.idx(c)) for c in range(self.nr)]
            for h in range(0, self.nr, width):
                L.loop(pb, L.idx(0), self.K, lambda kb, k, h=h: kb.create("vector.store", [kb.create(
                    "vector.from_elements", [self.load_b(kb, k, j) for j in columns[h:h + width]], result_types=[vt]).result,
                    self.packed, jp, k, L.idx(h)]))

        def ragged(pb, jp, down_columns=False):  # element by element; columns past N are zeros
            j0 = L.op(pb, "arith.mul", jp, L.idx(self.nr))
            last = L.op(pb, "arith.sub", self.N, L.idx(1))
            zero = L.const(pb, 0, self.element)

            def element(cb, k, c):
                j = L.op(cb, "arith.add", j0, c)
                v = self.load_b(cb, k, L.op(cb, "arith.minimum", j, last))
                cb.create("mem.store", [L.op(cb, "arith.select", L.op(cb, "arith.lt", j, self.N), v, zero), self.packed, jp, k, c])
            sizes = [self.K, L.idx(self.nr)]
            L.nest(sizes[::-1] if down_columns else sizes, lambda cb, ivs: element(cb, *(ivs[::-1] if down_columns else ivs)),
                   parallel=False, b=pb)
        L.loop(b, L.idx(0), self.full_panels, whole, parallel=parallel)
        L.loop(b, self.full_panels, panels, lambda pb, jp: ragged(pb, jp, down_columns=self.load_b_vector is None))

    # --- one block of rows ---------------------------------------------------------------------------
    def row_block(self, b, i0, lo=None, hi=None, width=None):
        """Rows i0 .. i0 + mc of C, columns lo .. hi (all when None; `width`: hi - lo where static)."""
        L = self.L
        end = L.op(b, "arith.minimum", L.op(b, "arith.add", i0, L.idx(self.mc)), self.M)
        lo, hi = (L.idx(0), self.N) if lo is None else (lo, hi)
        k = static_value(self.K)
        one_slice = k is not None and 0 < k <= self.kc  # (then each tile is stored, not added to zeroed rows)
        if not one_slice:
            zero = L.const(b, 0, self.element)
            L.loop(b, i0, end, lambda rb, i: L.loop(rb, lo, hi, lambda cb, j: cb.create(
                "mem.store", [zero, self.c] + self.c_at(i, j))))
        scratch = b.create("mem.alloc", result_types=[MemRefType((self.mr, self.nr), self.element)], name_hint="tile").result
        packed_a = None
        if self.a_copy == "rows":
            packed_a = b.create("mem.alloc", result_types=[MemRefType((self.mc, self.kc + A_ROW_PAD), self.element)],
                                name_hint="packed_a").result
        elif self.a_copy == "columns":  # (the copy holds a column of the block per row: [k][i])
            packed_a = b.create("mem.alloc", result_types=[MemRefType((self.kc, self.mc + A_ROW_PAD), self.element)],
                                name_hint="packed_at").result

        m = static_value(self.M)
        left = m % self.mr if m is not None and self.mc % self.mr == 0 else None  # (blocks but the last hold whole tiles)

        def k_slice(kb, k0):
            k1 = L.op(kb, "arith.minimum", L.op(kb, "arith.add", k0, L.idx(self.kc)), self.K)
            if packed_a is not None:
                (self.pack_a if self.a_copy == "rows" else self.pack_a_columns)(kb, packed_a, i0, end, k0, k1)
            def tile(tb, i, rows, j, vectors, w):
                if w is not None and self.tail is not None:
                    return self.dot_tile(tb, i, i0, rows, j, k0, k1, packed_a, not one_slice)
                return self.tile(tb, i, i0, rows, j, vectors, k0, k1, w, scratch, packed_a, not one_slice)
            split_columns(L, kb, lo, hi, self.lanes, lambda pb, j, vectors, w: split_rows(
                L, pb, i0, end, lambda tb, i, rows: tile(tb, i, rows, j, vectors, w), self.mr, left), span=width)
        L.loop(b, L.idx(0), self.K, k_slice, step=self.kc)
        if self.epilogue is not None:
            L.loop(b, i0, end, lambda rb, i: L.loop(rb, lo, hi, lambda eb, j: self.epilogue(eb, i, j)))

    def dot_tail(self) -> bool:
        """Whether the last few columns past the whole vectors (ResNet's 7 x 7 images: 49 = 3 x 16 + 1)
        are dot products along K, A's rows (in place or copied by rows) by B's columns (copy_tail),
        instead of a tile of whole vectors mostly masked off: the 7 x 7 convolutions' products used 49
        of 64 lanes."""
        n = static_value(self.N)
        return n is not None and 0 < n % self.lanes <= DOT_TAIL and self.packed is not None \
            and self.load_a_vector is not None and self.a_copy != "columns"

    def copy_tail(self, b):
        """B's last n % lanes columns, each contiguous along K: tail[c, k], copied from the last panel."""
        L, n = self.L, static_value(self.N)
        self.tail_width = n % self.lanes
        first = n - self.tail_width
        tail = b.create("mem.alloc", [self.K], result_types=[MemRefType((self.tail_width, None), self.element)],
                        name_hint="tail").result
        jp = L.idx(first // self.nr)
        depth = self.K if self.few is None else L.op(b, "arith.select", self.few, L.idx(0), self.K)  # (no panels then)
        L.loop(b, L.idx(0), depth, lambda kb, k: [kb.create("mem.store", [kb.create(
            "mem.load", [self.packed, jp, k, L.idx(first % self.nr + c)]).result, tail, L.idx(c), k]) for c in range(self.tail_width)])
        return tail

    def dot_tile(self, b, i, i0, rows, j0, k0, k1, packed_a, add):
        """C[i:i+rows, j0:j0+tail_width] (+)= A[i:i+rows, k0:k1] @ B[k0:k1, j0:...]: a vector of K per row
        and column, summed across lanes at the end; K's last k1 - k0 mod lanes one by one."""
        L, lanes, w, vt = self.L, self.lanes, self.tail_width, self.vt
        row = [i] + [L.op(b, "arith.add", i, L.idx(r)) for r in range(1, rows)]

        def a_at(kb, r, k, vector):
            if packed_a is None:
                return self.load_a_vector(kb, row[r], k, vt) if vector else self.load_a(kb, row[r], k)
            at = [L.op(kb, "arith.sub", row[r], i0), L.op(kb, "arith.sub", k, k0)]
            return kb.create("vector.load" if vector else "mem.load", [packed_a] + at, result_types=[vt] if vector else None).result

        def vectors(kb, k, *acc):
            t = [kb.create("vector.load", [self.tail, L.idx(c), k], result_types=[vt]).result for c in range(w)]
            out = []
            for r in range(rows):
                a = a_at(kb, r, k, True)
                out += [kb.create("vector.fma", [a, t[c], acc[r * w + c]]).result for c in range(w)]
            return out

        def scalars(kb, k, *acc):
            t = [kb.create("mem.load", [self.tail, L.idx(c), k]).result for c in range(w)]
            return [L.op(kb, "arith.add", acc[r * w + c], L.op(kb, "arith.mul", a_at(kb, r, k, False), t[c]))
                    for r in range(rows) for c in range(w)]
        whole = whole_steps(L, b, k0, k1, lanes)
        acc = L.loop(b, k0, whole, vectors, step=lanes, carried=zero_tile(L, b, vt, rows * w))
        rest = L.loop(b, whole, k1, scalars, carried=[L.const(b, 0, self.element)] * (rows * w))
        for r in range(rows):
            for c in range(w):
                at = self.c_at(row[r], L.op(b, "arith.add", j0, L.idx(c)))
                v = L.op(b, "arith.add", b.create("vector.reduce_add", [acc[r * w + c]]).result, rest[r * w + c])
                if add:
                    v = L.op(b, "arith.add", b.create("mem.load", [self.c] + at).result, v)
                b.create("mem.store", [v, self.c] + at)

    def b_fits_l1(self) -> bool:
        """Whether B is read in place rather than packed: its rows contiguous, whole panels wide, and small
        enough to stay in L1 (a batched product's B: attention's values, 64 x 32 per head)."""
        k, n = static_value(self.K), static_value(self.N)
        return self.load_b_vector is not None and self.pack_panel is None and k is not None and n is not None \
            and n % self.nr == 0 and k * n * self.element.np_dtype.itemsize <= B_IN_L1

    def b_columns_collide(self) -> bool:
        """Whether the columns of B read through its transpose lie a multiple of 2 KB apart, in at most two
        sets of the L1 cache: a panel's 32 columns, gathered side by side, evicted each other (a 1024 x 1024
        weight's: 16% slower), so they are gathered GATHER_COLLIDING at a time."""
        return self.b_column is None or self.b_column * self.element.np_dtype.itemsize % 2048 == 0

    def a_rows_collide(self) -> bool:
        """Whether the micro-kernel's rows of A, read in place, fall into so few sets of the L1 cache
        (64 sets of 8 lines, 4 KB apart) that they evict each other: rows a multiple of 4 KB apart all
        share one set (at 1024 floats, 1024^3 ran a fifth slower, and 512 x 2048 x 2048 a third). Then A
        is copied, a block of rows per slice of K, into rows a line longer than the slice (pack_a);
        other rows are read in place (copying gained nothing at 2 KB apart: two sets)."""
        k = static_value(self.K) if self.a_row is None else self.a_row
        return self.load_a_vector is not None and k is not None and k * self.element.np_dtype.itemsize % 4096 == 0

    def a_columns_collide(self) -> bool:
        """a_rows_collide for A read through its transpose: the micro-kernel walks K along A's columns,
        each a run of A's rows; a multiple of 4 KB apart, every step of K fell into one set of the
        L1 cache (the transformer's [2048 x 1024]^T x [2048 x 256] weight gradient: 160 GFLOP/s where
        the others ran 190-200). Then each slice of the block is copied (pack_a_columns) into runs a line longer."""
        return self.load_at_vector is not None and self.a_column is not None and \
            self.a_column * self.element.np_dtype.itemsize % 4096 == 0

    def pack_a_columns(self, b, packed_a, i0, end, k0, k1):
        """A[i0:end, k0:k1], read through its transpose, copied into packed_a[k - k0, i - i0], a column at
        a time in vectors."""
        self.copy_runs(b, packed_a, (k0, k1), (i0, end), lambda vb, k, i, vt: self.load_at_vector(vb, i, k, vt),
                       lambda sb, k, i: self.load_a(sb, i, k))

    def pack_a(self, b, packed_a, i0, end, k0, k1):
        """A[i0:end, k0:k1] copied into packed_a[i - i0, k - k0], row by row in vectors: its rows, a
        line longer than the slice, fall into sets of the L1 cache of their own. (Interleaving a tile's
        rows instead, element by element, cost a sixth of a 2048 x 1024 x 256 product.)"""
        self.copy_runs(b, packed_a, (i0, end), (k0, k1), self.load_a_vector, self.load_a)

    def copy_runs(self, b, packed, outer, inner, load_vector, load):
        """packed[o - outer[0], i - inner[0]] = element (o, i) for o, i in those ranges: each run along i
        in vectors (load_vector(builder, o, i, type)), its ragged end element by element (load)."""
        L, lanes, vt = self.L, self.lanes, self.vt
        (o0, o1), (lo, hi) = outer, inner
        whole = whole_steps(L, b, lo, hi, lanes)

        def run(rb, o):
            at = L.op(rb, "arith.sub", o, o0)
            L.loop(rb, lo, whole, lambda vb, i: vb.create("vector.store", [load_vector(vb, o, i, vt), packed, at,
                                                                            L.op(vb, "arith.sub", i, lo)]), step=lanes)
            L.loop(rb, whole, hi, lambda sb, i: sb.create("mem.store", [load(sb, o, i), packed, at, L.op(sb, "arith.sub", i, lo)]))
        L.loop(b, o0, o1, run)

    def tile(self, b, i, i0, rows, j0, vectors, k0, k1, width, scratch, packed_a, add=True):
        """C[i:i+rows, j0:j0+vectors*lanes] += A[i:i+rows, k0:k1] @ B[k0:k1, j0:...] (= without `add`), from
        B's packed panels and A in place or its block's copy (rows i - i0 ..)."""
        L, lanes = self.L, self.lanes
        row = [i] + [L.op(b, "arith.add", i, L.idx(r)) for r in range(1, rows)]
        if packed_a is not None:
            rows_a = [L.op(b, "arith.sub", r, i0) for r in row]
        jp = L.op(b, "arith.div", j0, L.idx(self.nr))
        lane0 = L.op(b, "arith.sub", j0, L.op(b, "arith.mul", jp, L.idx(self.nr)))
        offsets = [lane0] + [L.op(b, "arith.add", lane0, L.idx(h * lanes)) for h in range(1, vectors)]

        def step(kb, k, *acc):
            if self.packed is None:
                bs = [self.load_b_vector(kb, k, L.op(kb, "arith.add", j0, L.idx(h * lanes)), self.vt) for h in range(vectors)]
            else:
                bs = [kb.create("vector.load", [self.packed, jp, k, off], result_types=[self.vt]).result for off in offsets]
            if packed_a is None:
                return fma_tile(kb, [self.load_a(kb, r, k) for r in row], bs, acc)
            kk = L.op(kb, "arith.sub", k, k0)
            at = (lambda r: [r, kk]) if self.a_copy == "rows" else (lambda r: [kk, r])
            return fma_tile(kb, [kb.create("mem.load", [packed_a] + at(r)).result for r in rows_a], bs, acc)
        acc = L.loop(b, k0, k1, step, carried=zero_tile(L, b, self.vt, rows * vectors))
        store_tile(L, b, acc, rows, self.c, lambda r, j: self.c_at(row[r], j), j0, self.vt, width, scratch, add=add)


    # --- few rows: B streamed in place ---------------------------------------------------------------
    def stream_b_rows(self, b, rows, parallel, first=None):
        """C[0:rows] for rows <= STREAM_ROWS, B's rows contiguous: tiles of rows x up to 8 vectors of C in registers
        (12 accumulators), each k one broadcast of A[i, k] per row and a run of B[k] read in place;
        columns past the last whole vector one at a time. Where B's rows are longer than two such tiles,
        the tile would walk down B a row's length apart (a page per k at 1024 columns), so C is
        accumulated in memory instead (sum_rows_of_b)."""
        L, lanes = self.L, self.lanes
        vectors = max(1, min(8, 12 // rows))
        row = _rows(L, b, first, rows)
        n = static_value(self.N)
        if n is None or n > 2 * vectors * lanes:
            return self.sum_rows_of_b(b, row, SPLIT_K if parallel else 1)

        def tile(tb, j0, vectors):
            def step(kb, k, *acc):
                bs = [self.load_b_vector(kb, k, L.op(kb, "arith.add", j0, L.idx(h * lanes)), self.vt) for h in range(vectors)]
                return fma_tile(kb, [self.load_a(kb, i, k) for i in row], bs, acc)
            acc = L.loop(tb, L.idx(0), self.K, step, carried=zero_tile(L, tb, self.vt, rows * vectors))
            store_tile(L, tb, acc, rows, self.c, lambda r, j: self.c_at(row[r], j), j0, self.vt)
            self.tile_epilogue(tb, rows, j0, vectors * lanes, first)

        self.column_tiles(b, [vectors * lanes, lanes], lambda tb, j0, width: tile(tb, j0, width // lanes), parallel, row)

    def sum_rows_of_b(self, b, row, tasks):
        """C[row] = A[row] @ B as a sum of B's rows scaled by A's elements, k outer, so that B is read
        once and in order: K is split into `tasks` blocks (on threads), each streaming its block of B's
        rows into a partial sum of C's rows, which stays in L1 (several rows of B per pass over it, so
        that a vector of it is loaded and stored once per several fmas); the partial sums are added at
        the end, with the epilogue. Split along K, not N, a thread reads one run of memory: split
        along N, both threads read every page of B, and the second thread gained nothing."""
        L, lanes, vt, e = self.L, self.lanes, self.vt, self.element
        rows = len(row)
        parts = b.create("mem.alloc", [self.N], result_types=[MemRefType((tasks, rows, None), e)], name_hint="partial").result
        share = L.op(b, "arith.div", L.op(b, "arith.add", self.K, L.idx(tasks - 1)), L.idx(tasks))
        vectors_end = L.op(b, "arith.mul", L.op(b, "arith.div", self.N, L.idx(lanes)), L.idx(lanes))

        def task(tb, t):
            k0 = L.op(tb, "arith.minimum", L.op(tb, "arith.mul", t, share), self.K)
            k1 = L.op(tb, "arith.minimum", L.op(tb, "arith.add", k0, share), self.K)
            L.loop(tb, L.idx(0), self.N, lambda zb, j: [zb.create("mem.store", [L.const(zb, 0, e), parts, t, L.idx(r), j])
                                                        for r in range(rows)])  # (LLVM vectorises it)

            def rows_of_b(kb, k, depth):
                ks = [k] + [L.op(kb, "arith.add", k, L.idx(u)) for u in range(1, depth)]
                a = [[self.load_a(kb, i, kk) for kk in ks] for i in row]
                wide = [[kb.create("vector.broadcast", [x], result_types=[vt]).result for x in xs] for xs in a]

                def columns(jb, j):
                    bs = [self.load_b_vector(jb, kk, j, vt) for kk in ks]
                    for r in range(rows):
                        acc = jb.create("vector.load", [parts, t, L.idx(r), j], result_types=[vt]).result
                        for u in range(depth):
                            acc = jb.create("vector.fma", [wide[r][u], bs[u], acc]).result
                        jb.create("vector.store", [acc, parts, t, L.idx(r), j])
                L.loop(kb, L.idx(0), vectors_end, columns, step=lanes)

                def column(jb, j):
                    for r in range(rows):
                        acc = jb.create("mem.load", [parts, t, L.idx(r), j]).result
                        for u, kk in enumerate(ks):
                            acc = L.op(jb, "arith.add", acc, L.op(jb, "arith.mul", a[r][u], self.load_b(jb, kk, j)))
                        jb.create("mem.store", [acc, parts, t, L.idx(r), j])
                L.loop(kb, vectors_end, self.N, column)
            depth = max(2, AXPY_DEPTH // rows)
            whole = whole_steps(L, tb, k0, k1, depth)
            L.loop(tb, k0, whole, lambda kb, k: rows_of_b(kb, k, depth), step=depth)
            L.loop(tb, whole, k1, lambda kb, k: rows_of_b(kb, k, 1))
        L.loop(b, L.idx(0), L.idx(tasks), task, parallel=tasks > 1)

        def total(rb, r, i):
            def column(cb, j):
                acc = cb.create("mem.load", [parts, L.idx(0), L.idx(r), j]).result
                for t in range(1, tasks):
                    acc = L.op(cb, "arith.add", acc, cb.create("mem.load", [parts, L.idx(t), L.idx(r), j]).result)
                cb.create("mem.store", [acc, self.c] + self.c_at(i, j))
                if self.epilogue is not None:
                    self.epilogue(cb, i, j)
            L.loop(rb, L.idx(0), self.N, column)
        for r, i in enumerate(row):
            total(b, r, i)
        b.create("mem.dealloc", [parts])

    def stream_b_columns(self, b, rows, parallel, first=None):
        """C[0:rows] for rows <= STREAM_ROWS, B read through its transpose (columns contiguous): tiles of rows x up
        to 8 columns of C, each element a dot product along K of A's row with B's column, in vectors
        summed across their lanes at the end (and the last K % lanes products added one by one)."""
        L, lanes, vt = self.L, self.lanes, self.vt
        columns = max(1, min(8, 12 // rows))
        row = _rows(L, b, first, rows)
        k_vectors = L.op(b, "arith.mul", L.op(b, "arith.div", self.K, L.idx(lanes)), L.idx(lanes))

        def tile(tb, j0, width):
            cols = [j0] + [L.op(tb, "arith.add", j0, L.idx(t)) for t in range(1, width)]

            def step(kb, k, *acc):
                a = [self.load_a_vector(kb, i, k, vt) for i in row]
                out = list(acc)
                for t, j in enumerate(cols):
                    bv = self.load_bt_vector(kb, k, j, vt)
                    for r in range(rows):
                        out[r * width + t] = kb.create("vector.fma", [a[r], bv, acc[r * width + t]]).result
                return out
            acc = L.loop(tb, L.idx(0), k_vectors, step, carried=zero_tile(L, tb, vt, rows * width), step=lanes)
            sums = [tb.create("vector.reduce_add", [v]).result for v in acc]

            def tail(kb, k, *s):
                return [L.op(kb, "arith.add", s[r * width + t], L.op(kb, "arith.mul", self.load_a(kb, i, k), self.load_b(kb, k, j)))
                        for r, i in enumerate(row) for t, j in enumerate(cols)]
            sums = L.loop(tb, k_vectors, self.K, tail, carried=sums)
            for r, i in enumerate(row):
                for t, j in enumerate(cols):
                    tb.create("mem.store", [sums[r * width + t], self.c] + self.c_at(i, j))
            self.tile_epilogue(tb, rows, j0, width, first)

        self.column_tiles(b, [columns, 1], tile, parallel, row)

    def column_tiles(self, b, widths, body, parallel, rows):
        """body(builder, j0, width) over C's columns: tiles of widths[0] (the parallel loop), then of each
        narrower width for what is left."""
        L, lo = self.L, self.L.idx(0)
        for n, width in enumerate(widths):
            end = L.op(b, "arith.mul", L.op(b, "arith.div", self.N, L.idx(width)), L.idx(width))
            L.loop(b, lo, end, lambda tb, j0, width=width: body(tb, j0, width), parallel=parallel and n == 0, step=width)
            lo = end
        if widths[-1] > 1:  # (the last columns, fewer than a vector: element by element)
            L.loop(b, lo, self.N, lambda cb, j: [self.dot_element(cb, i, j) for i in rows])

    def dot_element(self, b, i, j):
        """C[i, j] alone: a scalar dot product."""
        L = self.L
        total = L.loop(b, L.idx(0), self.K, lambda kb, k, s: [L.op(kb, "arith.add", s, L.op(
            kb, "arith.mul", self.load_a(kb, i, k), self.load_b(kb, k, j)))], carried=[L.const(b, 0, self.element)])[0]
        b.create("mem.store", [total, self.c] + self.c_at(i, j))
        if self.epilogue is not None:
            self.epilogue(b, i, j)

    def tile_epilogue(self, b, rows, j0, width, first=None):
        if self.epilogue is not None:
            L = self.L
            start = first or L.idx(0)
            L.loop(b, start, L.op(b, "arith.add", start, L.idx(rows)), lambda rb, i: L.loop(
                rb, j0, L.op(rb, "arith.add", j0, L.idx(width)), lambda eb, j: self.epilogue(eb, i, j)))


def _rows(L, b, first, count):
    """Indices of `count` rows from `first` (0 when None)."""
    if first is None:
        return [L.idx(r) for r in range(count)]
    return [first] + [L.op(b, "arith.add", first, L.idx(r)) for r in range(1, count)]


# --- the micro-kernel's parts, shared with the direct convolution ----------------------------------------

def whole_steps(L, b, lo, hi, step: int):
    """lo + the whole steps of `step` that fit in hi - lo: where a loop by `step` ends and its remainder begins."""
    return L.op(b, "arith.add", lo, L.op(b, "arith.mul", L.op(b, "arith.div", L.op(b, "arith.sub", hi, lo), L.idx(step)), L.idx(step)))


def split_rows(L, b, lo, hi, body, mr=MR, left=None):
    """body(builder, i, rows) over lo..hi in tiles of mr rows, then of 8 (when mr is 12), 4, 2 and 1.
    `left`: the rows past the last whole tile where that is the same static count in every call that
    leaves any: only the tiles those rows need are emitted (less code: LLVM's loop strength reduction
    alone spent ~0.05 s on each kind of tile of a convolution)."""
    sizes = [mr] + [s for s in (8, 4, 2, 1) if s < mr]
    if left is not None:
        needed = [mr]
        for size in sizes[1:]:
            if left >= size:
                needed.append(size)
                left %= size
        sizes = needed
    for size in sizes:
        end = whole_steps(L, b, lo, hi, size)
        L.loop(b, lo, end, lambda tb, i, size=size: body(tb, i, size), step=size)
        lo = end


def split_columns(L, b, lo, hi, lanes, body, span=None):
    """body(builder, j0, vectors, width) over lo..hi: tiles of two vectors, then one of one vector,
    then a ragged one (width = the columns left, fewer than lanes; None for the whole ones). With
    static bounds (or a static `span` = hi - lo) only the kinds of tile that occur are emitted (less code
    for LLVM to optimise)."""
    if span is None and static_value(hi) is not None and static_value(lo) is not None:
        span = static_value(hi) - static_value(lo)
    for vectors in (2, 1):
        end = whole_steps(L, b, lo, hi, vectors * lanes)
        if span is None or span >= vectors * lanes:
            L.loop(b, lo, end, lambda tb, j0, vectors=vectors: body(tb, j0, vectors, None), step=vectors * lanes)
        lo = end
        span = None if span is None else span % (vectors * lanes)
    if span is None or span:
        L.loop(b, lo, hi, lambda tb, j0: body(tb, j0, 1, L.op(tb, "arith.sub", hi, j0)), step=lanes)


def if_else(L, b, condition, then, otherwise=None):
    """loop.if: then(builder) where condition holds, else otherwise(builder)."""
    blocks = Block([], []), Block([], [])
    b.create("loop.if", [condition], regions=[Region([blocks[0]]), Region([blocks[1]])])
    for block, body in zip(blocks, (then, otherwise)):
        bb = Builder.at_end(block, L.module, b.loc)
        if body is not None:
            body(bb)
        bb.create("loop.yield", [])


def static_value(v):
    op = v.defining_op()
    return op.attr("value") if op is not None and op.name == "arith.constant" else None


def zero_tile(L, b, vt, count):
    zero = b.create("vector.broadcast", [L.const(b, 0, vt.element)], result_types=[vt]).result
    return [zero] * count


def fma_tile(b, a_scalars, b_vectors, acc):
    """acc[r][h] += a[r] * b[h]: one broadcast per row, one fma per accumulator."""
    out = []
    for r, a in enumerate(a_scalars):
        a = b.create("vector.broadcast", [a], result_types=[b_vectors[0].type]).result
        out += [b.create("vector.fma", [a, bv, acc[r * len(b_vectors) + h]]).result for h, bv in enumerate(b_vectors)]
    return out


def store_tile(L, b, acc, rows, c, at, j0, vt, width=None, scratch=None, add=False):
    """Writes (or with `add`, adds) `rows` rows of accumulators to c at columns j0...; at(r, j) gives
    the indices of row r, column j. With `width`, only that many columns exist: the tile goes through
    `scratch` and is copied element by element."""
    lanes, per_row = vt.shape[0], len(acc) // rows
    if width is None:
        for r in range(rows):
            for h in range(per_row):
                where = at(r, L.op(b, "arith.add", j0, L.idx(h * lanes)))
                v = acc[r * per_row + h]
                if add:
                    v = L.op(b, "arith.add", b.create("vector.load", [c] + where, result_types=[vt]).result, v)
                b.create("vector.store", [v, c] + where)
        return
    for r in range(rows):
        for h in range(per_row):
            b.create("vector.store", [acc[r * per_row + h], scratch, L.idx(r), L.idx(h * lanes)])
    for r in range(rows):
        def copy(cb, j, r=r):
            where = at(r, L.op(cb, "arith.add", j0, j))
            v = cb.create("mem.load", [scratch, L.idx(r), j]).result
            if add:
                v = L.op(cb, "arith.add", cb.create("mem.load", [c] + where).result, v)
            cb.create("mem.store", [v, c] + where)
        L.loop(b, L.idx(0), width, copy)


# --- direct convolution ------------------------------------------------------------------------------------

@dataclass
class DirectConv:
    """conv2d with stride 1 or 2 along x, on an input padded with at least `extra_columns()` zero
    columns on the right: out[n, o, y, x:x+NR] is one micro-tile row, and its B vectors are runs of
    an input row (every other element of a run twice as long at stride 2: no phase split, no zero
    taps), so nothing is packed. Micro-tiles are MR output channels x NR output columns, reduced over
    (channel, ky, kx) in registers; rows (n, y) are the parallel loop."""
    xp: object
    w: object
    out: object
    sizes: list            # n, out channels, oh, ow
    channels_per_group: object
    groups: int
    stride_y: int
    dilation: tuple
    element: object
    epilogue: Callable | None = None  # (builder, n, y): output row (n, :, y, :) is final
    stride_x: int = 1

    @staticmethod
    def extra_columns(element, stride_x: int = 1) -> int:
        """Columns past the last one a window reads that the last tile's vectors read too."""
        return stride_x * 2 * lanes(element)

    def emit(self, L, b):
        self.L = L
        self.lanes = lanes(self.element)
        self.nr = 2 * self.lanes
        self.vt = VectorType((self.lanes,), self.element)
        n, o_ch, oh, ow = self.sizes
        # the weights as [c, ky, kx, o]: a tile's rows are consecutive, one base address per (c, ky, kx)
        o_dim, c_dim, kh_dim, kw_dim = self.w.type.shape
        wsizes = [L.dim(self.w, a) for a in range(4)]
        self.wt = b.create("mem.alloc", [d for d, s in zip(wsizes[1:] + wsizes[:1], (c_dim, kh_dim, kw_dim, o_dim)) if s is None],
                           result_types=[MemRefType((c_dim, kh_dim, kw_dim, o_dim), self.element)], name_hint="wt").result
        L.nest(wsizes, lambda wb, ivs: wb.create("mem.store", [wb.create("mem.load", [self.w] + ivs).result, self.wt] + ivs[1:] + ivs[:1]))
        rows = L.op(b, "arith.mul", n, oh)
        def row(rb, t):
            bn = L.op(rb, "arith.div", t, oh)
            self.output_row(rb, bn, L.op(rb, "arith.sub", t, L.op(rb, "arith.mul", bn, oh)))
        L.loop(b, L.idx(0), rows, row, parallel=True)

    def output_row(self, b, bn, y):
        L = self.L
        _, o_ch, _, ow = self.sizes
        per_group = L.op(b, "arith.div", o_ch, L.idx(self.groups))
        static_per_group = static_value(o_ch) // self.groups if static_value(o_ch) is not None else None
        scratch = b.create("mem.alloc", result_types=[MemRefType((MR, self.nr), self.element)], name_hint="tile").result

        zero = L.const(b, 0, self.element)

        def group(gb, g):
            o0 = L.op(gb, "arith.mul", g, per_group)
            o1 = L.op(gb, "arith.add", o0, per_group)
            L.loop(gb, o0, o1, lambda ob, o: L.loop(ob, L.idx(0), ow, lambda xb, x: xb.create("mem.store", [zero, self.out, bn, o, y, x])))

            def channel_block(cb, c0):  # the input rows of a block of channels stay in L1
                c1 = L.op(cb, "arith.minimum", L.op(cb, "arith.add", c0, L.idx(CHANNEL_BLOCK)), self.channels_per_group)
                split_columns(L, cb, L.idx(0), ow, self.lanes, lambda xb, x0, vectors, width: split_rows(
                    L, xb, o0, o1, lambda tb, o, rows: self.tile(tb, bn, y, g, o, x0, rows, vectors, width, scratch, c0, c1),
                    left=None if static_per_group is None else static_per_group % MR))
            L.loop(gb, L.idx(0), self.channels_per_group, channel_block, step=CHANNEL_BLOCK)
        L.loop(b, L.idx(0), L.idx(self.groups), group)
        if self.epilogue is not None:
            self.epilogue(b, bn, y)

    def tile(self, b, bn, y, g, o, x0, rows, vectors, width, scratch, c0, c1):
        L, lanes = self.L, self.lanes
        dh, dw = self.dilation
        kh, kw = (L.dim(self.w, a) for a in (2, 3))
        outs = [o] + [L.op(b, "arith.add", o, L.idx(r)) for r in range(1, rows)]
        first_channel = L.op(b, "arith.mul", g, self.channels_per_group)
        top = L.op(b, "arith.mul", y, L.idx(self.stride_y))

        sx = self.stride_x

        def step(jb, c, i, j, acc):
            channel = L.op(jb, "arith.add", first_channel, c)
            iy = L.op(jb, "arith.add", top, L.op(jb, "arith.mul", i, L.idx(dh)))
            ix = L.op(jb, "arith.add", L.op(jb, "arith.mul", x0, L.idx(sx)), L.op(jb, "arith.mul", j, L.idx(dw)))
            bs = [jb.create("vector.load", [self.xp, bn, channel, iy, L.op(jb, "arith.add", ix, L.idx(h * lanes * sx))],
                            {"stride": sx} if sx != 1 else None, result_types=[self.vt]).result for h in range(vectors)]
            a = [jb.create("mem.load", [self.wt, c, i, j, oo]).result for oo in outs]
            return fma_tile(jb, a, bs, acc)

        def over_c(cb, c, *acc):
            window = self.w.type.shape[2:]
            if None not in window and window[0] * window[1] <= UNROLLED_WINDOW:  # unrolled: addresses are base + constant
                for i in range(window[0]):
                    for j in range(window[1]):
                        acc = step(cb, c, L.idx(i), L.idx(j), acc)
                return acc
            return L.loop(cb, L.idx(0), kh, lambda ib, i, *acc: L.loop(
                ib, L.idx(0), kw, lambda jb, j, *acc: step(jb, c, i, j, acc), carried=acc), carried=acc)
        acc = L.loop(b, c0, c1, over_c, carried=zero_tile(L, b, self.vt, rows * vectors))
        store_tile(L, b, acc, rows, self.out, lambda r, x: [bn, outs[r], y, x], x0, self.vt, width, scratch, add=True)


# --- convolution as a product ------------------------------------------------------------------------

def conv_as_gemm(out_shape, groups: int, stride_x: int, pixels: int | None = None) -> bool:
    """Whether a convolution runs as ConvAsGemm rather than DirectConv: a stride along x other than 1
    or 2, or one group and a result image of at most `pixels` (by default CONV_GEMM_PIXELS). The lowering
    asks too: the direct convolution's input has spare columns on the right, the product's has none."""
    pixels = CONV_GEMM_PIXELS if pixels is None else pixels
    return stride_x not in (1, 2) or groups == 1 and None not in out_shape[2:] and out_shape[2] * out_shape[3] <= pixels


@dataclass
class ConvAsGemm:
    """conv2d as a product per image and group ("implicit GEMM"):

        out[n] as [O, OH*OW] = w as [O, C*KH*KW] @ cols[C*KH*KW, OH*OW]
        cols[(c, i, j), (y, x)] = xp[n, c, y*sy + i*dh, x*sx + j*dw]

    The weights are A, read in place (OIHW is already [O, C*KH*KW] row-major); the columns are never
    made: packing B's panels is the im2col. Where the image is small (7 x 7, 14 x 14 at ResNet's
    depth) the direct convolution's tiles along a row are mostly empty; the product's are full, its
    rows being output channels and its columns every pixel of the image. Any stride: no phase split.

    With stride 1 the columns are the pixels of the padded input's grid instead (OH x the padded width
    Wp: a few more columns, whose results are dropped): then cols[(c, i, j), p] = xp[n, c][p + i*dh*Wp + j*dw]
    and each row of a panel is a run of the input, copied with vector loads. The product goes to a
    scratch [O, OH*Wp], copied (through the epilogue) into the result's pixels."""
    xp: object             # the input, padded (reads stay in bounds)
    w: object
    out: object
    sizes: list            # n, out channels, oh, ow (index values)
    stride: tuple
    dilation: tuple
    groups: int
    element: object
    epilogue: Callable | None = None  # (builder, outflat, at, [n, o, y, x], value): stores out[n, o, y, x] (outflat[at])
    vector_bytes: int = VECTOR_BYTES
    kc: int = 0
    mc: int = MC

    def emit(self, L, b):
        n, o_ch, oh, ow = self.sizes
        groups = L.idx(self.groups)
        per_group = L.idx(self.out.type.shape[1] // self.groups) if self.out.type.shape[1] is not None else \
            L.op(b, "arith.div", o_ch, groups)
        k = _product(L, b, [L.dim(self.w, a) for a in (1, 2, 3)])
        pixels = _product(L, b, [oh, ow])
        (o, c, kh, kw), (n_, _, oh_, ow_) = self.w.type.shape, self.out.type.shape
        pg = o and o // self.groups
        self.wflat = L.view(b, self.w, (self.groups, pg, _static_product([c, kh, kw])), [groups, per_group, k], "wflat")
        self.outflat = L.view(b, self.out, (n_, self.groups, pg, _static_product([oh_, ow_])), [n, groups, per_group, pixels], "outflat")

        grid = tuple(self.stride) == (1, 1) and not self.pixels_are_fewer_vectors(oh_, ow_, self.xp.type.shape[3])
        if grid:
            hp, wp = L.dim(self.xp, 2), L.dim(self.xp, 3)
            (xn, xc, xh, xw), plane = self.xp.type.shape, _product(L, b, [hp, wp])
            self.xflat = L.view(b, self.xp, (xn, xc, _static_product([xh, xw])), [L.dim(self.xp, 0), L.dim(self.xp, 1), plane], "xflat")
            columns = _product(L, b, [oh, wp])
            acc = b.create("mem.alloc", [v for v, d in ((per_group, pg), (columns, _static_product([oh_, xw]))) if d is None],
                           result_types=[MemRefType((pg, _static_product([oh_, xw])), self.element)], name_hint="grid").result
            # panels whose reads all lie in the input's plane copy runs; the last one or two gather
            dh, dw = self.dilation
            reach = L.op(b, "arith.add", L.op(b, "arith.mul", L.op(b, "arith.mul", L.op(b, "arith.sub", L.dim(self.w, 2), L.idx(1)), L.idx(dh)), wp),
                         L.op(b, "arith.mul", L.op(b, "arith.sub", L.dim(self.w, 3), L.idx(1)), L.idx(dw)))
            runs = L.op(b, "arith.div", L.op(b, "arith.maximum", L.op(b, "arith.sub", plane, reach), L.idx(0)), L.idx(2 * lanes(self.element, self.vector_bytes)))

        def store(eb, bn, g, i, y, x, value):  # out[bn, g * per_group + i, y, x] = value (through the epilogue)
            at = [bn, g, i, L.op(eb, "arith.add", L.op(eb, "arith.mul", y, ow), x)]
            indices = [bn, L.op(eb, "arith.add", L.op(eb, "arith.mul", g, per_group), i), y, x]
            if self.epilogue:
                self.epilogue(eb, self.outflat, at, indices, value)
            else:
                eb.create("mem.store", [value, self.outflat] + at)

        def group(gb, bn, g):
            def epilogue(eb, i, j):
                y = L.op(eb, "arith.div", j, ow)
                x = L.op(eb, "arith.sub", j, L.op(eb, "arith.mul", y, ow))
                store(eb, bn, g, i, y, x, eb.create("mem.load", [self.outflat, bn, g, i, j]).result)

            def pack(gm, pb, jp, j0):
                if not grid:
                    return self.im2col(L, gm, pb, bn, g, jp, j0, pixels, ow)
                if_else(L, pb, L.op(pb, "arith.lt", jp, runs), lambda rb: self.copy_runs(L, gm, rb, bn, g, jp, j0, wp),
                        lambda rb: self.im2col(L, gm, rb, bn, g, jp, j0, columns, wp, last_x=L.op(rb, "arith.sub", wp, L.idx(1))))
            Gemm(per_group, columns if grid else pixels, k, self.element,
                 load_a=lambda kb, i, kk: kb.create("mem.load", [self.wflat, g, i, kk]).result, load_b=None, load_b_vector=None,
                 c=acc if grid else self.outflat, c_at=lambda i, j: [i, j] if grid else [bn, g, i, j], epilogue=epilogue if self.epilogue and not grid else None,
                 load_a_vector=lambda kb, i, kk, vt: kb.create("vector.load", [self.wflat, g, i, kk], result_types=[vt]).result,
                 vector_bytes=self.vector_bytes, kc=self.kc, mc=self.mc, pack_panel=pack).emit(L, gb, parallel=True)
            if grid:  # the result's pixels of the grid
                L.nest([per_group, oh, ow], lambda eb, iyx: store(eb, bn, g, *iyx, eb.create(
                    "mem.load", [acc, iyx[0], L.op(eb, "arith.add", L.op(eb, "arith.mul", iyx[1], wp), iyx[2])]).result), b=gb)
        L.nest([n, groups], lambda gb, ivs: group(gb, *ivs), parallel=False, b=b)

    def pixels_are_fewer_vectors(self, oh, ow, wp) -> bool:
        """Whether the image's pixels as columns take clearly fewer vectors per row of the product than
        the grid's (which has wp - ow spare columns per image row), its last few columns dot products
        (Gemm.dot_tail): a 7 x 7 image, 49 pixels = 3 vectors and a column, against 63 = 4 vectors."""
        if None in (oh, ow, wp):
            return False
        n = lanes(self.element, self.vector_bytes)
        vectors = lambda columns: columns // n + (0 if columns % n == 0 else 0.25 if columns % n <= DOT_TAIL else 1)  # noqa: E731
        return vectors(oh * ow) + 0.5 < vectors(oh * wp)  # (0.5: the gather of each pixel's window costs more than runs)

    def copy_runs(self, L, g, b, bn, group, jp, j0, wp):
        """Panel jp of cols on the grid: row (c, i, j) is the run of the input plane from j0 + i*dh*Wp + j*dw."""
        (dh, dw), lanes_ = self.dilation, g.lanes
        channels, kh, kw = (L.dim(self.w, a) for a in (1, 2, 3))
        first = L.op(b, "arith.mul", group, channels)
        down = L.op(b, "arith.mul", wp, L.idx(dh))

        def row(rb, c, i, j):
            kk = L.op(rb, "arith.add", L.op(rb, "arith.mul", L.op(rb, "arith.add", L.op(rb, "arith.mul", c, kh), i), kw), j)
            start = L.op(rb, "arith.add", j0, L.op(rb, "arith.add", L.op(rb, "arith.mul", i, down), L.op(rb, "arith.mul", j, L.idx(dw))))
            channel = L.op(rb, "arith.add", first, c)
            for h in range(0, g.nr, lanes_):
                v = rb.create("vector.load", [self.xflat, bn, channel, L.op(rb, "arith.add", start, L.idx(h))], result_types=[g.vt]).result
                rb.create("vector.store", [v, g.packed, jp, kk, L.idx(h)])
        L.nest([channels, kh, kw], lambda rb, cij: row(rb, *cij), parallel=False, b=b)

    def im2col(self, L, g, b, bn, group, jp, j0, pixels, ow, last_x=None):
        """Panel jp of cols: per column of the panel its pixel, then for each (c, i, j) a row of the
        panel gathered from the input (columns past the last pixel are zeros). With last_x, the columns
        are the grid's (`ow` its width): a read right of the input's last column reads that column (its
        result is dropped)."""
        (sy, sx), (dh, dw) = self.stride, self.dilation
        last = L.op(b, "arith.sub", pixels, L.idx(1))
        zero = L.const(b, 0, self.element)
        channels, kh, kw = (L.dim(self.w, a) for a in (1, 2, 3))
        first = L.op(b, "arith.mul", group, channels)

        def part(pb, t0):  # columns t0 .. t0 + IM2COL_COLUMNS of the panel
            columns = []
            for t in range(IM2COL_COLUMNS):
                j = L.op(pb, "arith.add", L.op(pb, "arith.add", j0, t0), L.idx(t))
                inside = L.op(pb, "arith.lt", j, pixels)
                j = L.op(pb, "arith.minimum", j, last)
                y = L.op(pb, "arith.div", j, ow)
                x = L.op(pb, "arith.sub", j, L.op(pb, "arith.mul", y, ow))
                columns.append((L.op(pb, "arith.mul", y, L.idx(sy)), L.op(pb, "arith.mul", x, L.idx(sx)), inside))

            def row(rb, c, i, j):
                kk = L.op(rb, "arith.add", L.op(rb, "arith.mul", L.op(rb, "arith.add", L.op(rb, "arith.mul", c, kh), i), kw), j)
                channel = L.op(rb, "arith.add", first, c)
                dy, dx = L.op(rb, "arith.mul", i, L.idx(dh)), L.op(rb, "arith.mul", j, L.idx(dw))
                for t, (ty, tx, inside) in enumerate(columns):
                    x = L.op(rb, "arith.add", tx, dx)
                    x = x if last_x is None else L.op(rb, "arith.minimum", x, last_x)
                    v = rb.create("mem.load", [self.xp, bn, channel, L.op(rb, "arith.add", ty, dy), x]).result
                    rb.create("mem.store", [L.op(rb, "arith.select", inside, v, zero), g.packed, jp, kk, L.op(rb, "arith.add", t0, L.idx(t))])
            L.nest([channels, kh, kw], lambda rb, cij: row(rb, *cij), parallel=False, b=pb)
        # (IM2COL_COLUMNS columns unrolled, the window not, in a loop compiled for size: pack_b)
        L.loop(b, L.idx(0), L.idx(g.nr), part, step=IM2COL_COLUMNS)


def _static_product(dims):
    return None if None in dims else int(np.prod(dims))


def _product(L, b, values):
    out = values[0]
    for v in values[1:]:
        a, c = static_value(out), static_value(v)
        out = L.idx(a * c) if a is not None and c is not None else L.op(b, "arith.mul", out, v)
    return out
