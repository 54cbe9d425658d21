"""tile: each mem.matmul becomes the blocked, packed, register-tiled loop nest of lowering/gemm.py:

    mem.matmul %a, %b, %c {...} { epilogue }
becomes
    pack B into panels of 2 vectors' width; parallel over blocks of `mc` rows of C:
        zero them; for each `kc`-deep slice of K, micro-tiles of 6 rows x 2 vectors in registers;
        then the epilogue's ops, copied in, over each finished row

The options fix the shape of the tiles, so the same pipeline prints the same IR on every machine; the
compiler driver (mlc/compiler.py) gives the host's vector width: `tile{vector-bytes=64}` with AVX-512.
"""
from __future__ import annotations

from mlc.ir.core import Builder, Module, Operation
from mlc.ir.dialects.loops import Matmul

from .lowering import gemm
from .lowering.core import LoopBuilder
from .manager import Pass, PipelineError


class Tile(Pass):
    name = "tile"
    summary = "block, pack and register-tile each mem.matmul (its epilogue over each finished row)"
    options = {"vector-bytes": gemm.VECTOR_BYTES, "kc": gemm.KC, "mc": gemm.MC}

    def __init__(self, **options):
        super().__init__(**options)
        if self.option("vector-bytes") not in (16, 32, 64) or self.option("mc") % gemm.MR or self.option("kc") < 1:
            raise PipelineError(f"tile needs vector-bytes of 16, 32 or 64, mc a multiple of {gemm.MR} and kc >= 1, "
                                f"got {self}")

    def run(self, module: Module) -> None:
        for f in module.functions.values():
            builder = LoopBuilder(module, f)
            for op in [o for o in f.body.walk() if o.name == "mem.matmul"]:
                self.tile(builder, op)

    def tile(self, L: LoopBuilder, op: Operation) -> None:
        (a, b, c), (at_a, at_b, at_c) = Matmul.split(op.operands, [t.rank for t in op.operand_types[:3]])
        ta, tb = bool(op.attr("transpose_a")), bool(op.attr("transpose_b"))
        L.b = Builder.before(op, L.module)
        ra, rb = a.type.rank, b.type.rank
        m, k, n = L.dim(a, ra - 1 if ta else ra - 2), L.dim(a, ra - 2 if ta else ra - 1), L.dim(b, rb - 2 if tb else rb - 1)

        def load(buf, lead, transposed):
            return lambda kb, x, y: kb.create("mem.load", [buf] + lead + ([y, x] if transposed else [x, y])).result

        gemm.Gemm(m, n, k, c.type.element, load_a=load(a, at_a, ta), load_b=load(b, at_b, tb),
                  load_b_vector=None if tb else
                  lambda kb, kk, j, vt: kb.create("vector.load", [b] + at_b + [kk, j], result_types=[vt]).result,
                  c=c, c_prefix=at_c, epilogue=_row_epilogue(L, op, c, at_c, n),
                  vector_bytes=self.option("vector-bytes"), kc=self.option("kc"), mc=self.option("mc"),
                  ).emit(L, L.b, parallel=not _in_parallel_loop(op))
        op.erase()


def _row_epilogue(L: LoopBuilder, op: Operation, c, at_c: list, n):
    """(builder, i) -> the epilogue's ops applied over row i of C, or None for `mem.yield %acc`."""
    block = op.regions[0].blocks[0]
    if block.last.operands[0] is block.args[2]:
        return None

    def row(rb, i):
        def element(eb, j):
            at = at_c + [i, j]
            mapping = dict(zip(block.args, [i, j, eb.create("mem.load", [c] + at).result]))
            for inner in block:
                if inner is not block.last:
                    eb.block.insert_before(eb.anchor, inner.clone(mapping))
            eb.create("mem.store", [mapping.get(block.last.operands[0], block.last.operands[0]), c] + at)
        L.loop(rb, L.idx(0), n, element)
    return row


def _in_parallel_loop(op: Operation) -> bool:
    parent = op.parent_op
    while parent is not None:
        if parent.name == "loop.for" and parent.attr("parallel"):
            return True
        parent = parent.parent_op
    return False
