"""Register-tiled matrix multiplication in loop IR, for lower-to-loops: C[M, N] = A[M, K] @ B[K, N].

The GotoBLAS/BLIS structure, spelled in loop IR so it prints, runs on the interpreter and is tested
like every other lowering:

    pack B into column panels Bp[N/NR][K][NR], zero-padded, so the kernel reads it contiguously
    parallel for each block of MC rows of C:
        zero the rows
        for each KC-deep slice of K (its panels stay in L1, the A rows in L2):
            for each panel of NR columns, for each MR rows:
                micro-kernel: MR x NR accumulators in vector registers, carried across the slice,
                one fma per (row, vector) per k; then added to C (through a scratch tile at the
                ragged right edge)
        epilogue, row by row, while the rows are still in cache (bias, activation, ...)

A and B are read through callbacks, so the same kernel serves batched matmul (with broadcasting)
and convolution, whose B is an im2col view of the input packed on the fly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from mlc.ir.types import MemRefType, VectorType

VECTOR_BYTES = 32  # AVX2
MR = 6             # rows per micro-tile: 6 x 2 vectors = 12 accumulators of the 16 ymm registers
KC = 256           # depth of a slice of K
MC = 48            # rows of C per parallel block (a multiple of MR)


def supports(element) -> bool:
    return element.name in ("f32", "f64")


@dataclass
class Gemm:
    M: object
    N: object
    K: object
    element: object
    load_a: Callable                      # (builder, i, k) -> scalar A[i, k]
    load_b: Callable                      # (builder, k, j) -> scalar B[k, j]
    c: object                             # the result buffer; C[i, j] is c[*c_prefix, i, j]
    c_prefix: list
    load_b_vector: Callable | None = None  # (builder, k, j, type) -> B[k, j:j+lanes], where contiguous
    epilogue: Callable | None = None      # (builder, i): row i of C is final

    def emit(self, L, b, parallel: bool):
        """The loop nest at b. `parallel`: the row-block loop may run on threads (top level only)."""
        e, self.L = self.element, L
        self.lanes = VECTOR_BYTES // {"f32": 4, "f64": 8}[e.name]
        self.nr = 2 * self.lanes
        self.vt = VectorType((self.lanes,), e)
        nr = L.idx(self.nr)
        panels = L.op(b, "arith.div", L.op(b, "arith.add", self.N, L.idx(self.nr - 1)), nr)
        self.full_panels = L.op(b, "arith.div", self.N, nr)
        self.packed = b.create("mem.alloc", [panels, self.K], result_types=[MemRefType((None, None, self.nr), e)],
                               name_hint="packed").result
        self.pack_b(b, panels, parallel)
        L.loop(b, L.idx(0), self.M, lambda ib, i0: self.row_block(ib, i0, panels), parallel=parallel, step=MC)
        b.create("mem.dealloc", [self.packed])

    # --- packing -------------------------------------------------------------------------------------
    def pack_b(self, b, panels, parallel):
        L, lanes = self.L, self.lanes

        def full(pb, jp):
            j0 = L.op(pb, "arith.mul", jp, L.idx(self.nr))

            def row(kb, k):
                for h in range(0, self.nr, lanes):
                    j = L.op(kb, "arith.add", j0, L.idx(h))
                    if self.load_b_vector is not None:
                        v = self.load_b_vector(kb, k, j, self.vt)
                        kb.create("vector.store", [v, self.packed, jp, k, L.idx(h)])
                    else:
                        for c in range(h, h + lanes):
                            jc = L.op(kb, "arith.add", j0, L.idx(c))
                            kb.create("mem.store", [self.load_b(kb, k, jc), self.packed, jp, k, L.idx(c)])
            L.loop(pb, L.idx(0), self.K, row)

        def ragged(pb, jp):  # the last panel: columns past N are zeros
            j0 = L.op(pb, "arith.mul", jp, L.idx(self.nr))
            last = L.op(pb, "arith.sub", self.N, L.idx(1))
            zero = L.const(pb, 0, self.element)

            def element(cb, k, c):
                j = L.op(cb, "arith.add", j0, c)
                inside = L.op(cb, "arith.lt", j, self.N)
                v = self.load_b(cb, k, L.op(cb, "arith.minimum", j, last))
                cb.create("mem.store", [L.op(cb, "arith.select", inside, v, zero), self.packed, jp, k, c])
            L.nest([self.K, L.idx(self.nr)], lambda cb, ivs: element(cb, *ivs), parallel=False, b=pb)
        L.loop(b, L.idx(0), self.full_panels, full, parallel=parallel)
        L.loop(b, self.full_panels, panels, ragged)

    # --- one block of rows ---------------------------------------------------------------------------
    def row_block(self, b, i0, panels):
        L = self.L
        end = L.op(b, "arith.minimum", L.op(b, "arith.add", i0, L.idx(MC)), self.M)
        tiled_end = L.op(b, "arith.add", i0, L.op(b, "arith.mul", L.op(b, "arith.div", L.op(b, "arith.sub", end, i0), L.idx(MR)), L.idx(MR)))
        zero = L.const(b, 0, self.element)
        L.loop(b, i0, end, lambda rb, i: L.loop(rb, L.idx(0), self.N, lambda cb, j: cb.create(
            "mem.store", [zero, self.c] + self.c_prefix + [i, j])))
        scratch = b.create("mem.alloc", result_types=[MemRefType((MR, self.nr), self.element)], name_hint="tile").result

        def k_slice(kb, k0):
            k1 = L.op(kb, "arith.minimum", L.op(kb, "arith.add", k0, L.idx(KC)), self.K)
            for lo, hi, ragged in ((L.idx(0), self.full_panels, None), (self.full_panels, panels, scratch)):
                def panel(pb, jp, ragged=ragged):
                    L.loop(pb, i0, tiled_end, lambda tb, i: self.tile(tb, i, jp, k0, k1, MR, ragged), step=MR)
                    L.loop(pb, tiled_end, end, lambda tb, i: self.tile(tb, i, jp, k0, k1, 1, ragged))
                L.loop(kb, lo, hi, panel)
        L.loop(b, L.idx(0), self.K, k_slice, step=KC)
        b.create("mem.dealloc", [scratch])
        if self.epilogue is not None:
            L.loop(b, i0, end, self.epilogue)

    def tile(self, b, i, jp, k0, k1, rows, scratch):
        """C[i:i+rows, panel jp] += A[i:i+rows, k0:k1] @ Bp[jp, k0:k1]."""
        L, lanes, vectors = self.L, self.lanes, self.nr // self.lanes
        row = [i] + [L.op(b, "arith.add", i, L.idx(r)) for r in range(1, rows)]
        zero = b.create("vector.broadcast", [L.const(b, 0, self.element)], result_types=[self.vt]).result

        def step(kb, k, *acc):
            bs = [kb.create("vector.load", [self.packed, jp, k, L.idx(h * lanes)], result_types=[self.vt]).result
                  for h in range(vectors)]
            out = []
            for r in range(rows):
                a = kb.create("vector.broadcast", [self.load_a(kb, row[r], k)], result_types=[self.vt]).result
                out += [kb.create("vector.fma", [a, bs[h], acc[r * vectors + h]]).result for h in range(vectors)]
            return out
        acc = L.loop(b, k0, k1, step, carried=[zero] * (rows * vectors))
        j0 = L.op(b, "arith.mul", jp, L.idx(self.nr))
        if scratch is None:
            for r in range(rows):
                for h in range(vectors):
                    at = self.c_prefix + [row[r], L.op(b, "arith.add", j0, L.idx(h * lanes))]
                    old = b.create("vector.load", [self.c] + at, result_types=[self.vt]).result
                    b.create("vector.store", [L.op(b, "arith.add", old, acc[r * vectors + h]), self.c] + at)
            return
        for r in range(rows):
            for h in range(vectors):
                b.create("vector.store", [acc[r * vectors + h], scratch, L.idx(r), L.idx(h * lanes)])
        width = L.op(b, "arith.sub", self.N, j0)
        for r in range(rows):
            def add(cb, c, r=r):
                at = self.c_prefix + [row[r], L.op(cb, "arith.add", j0, c)]
                old = cb.create("mem.load", [self.c] + at).result
                new = cb.create("mem.load", [scratch, L.idx(r), c]).result
                cb.create("mem.store", [L.op(cb, "arith.add", old, new), self.c] + at)
            L.loop(b, L.idx(0), width, add)
