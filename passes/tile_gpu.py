"""tile-gpu: each f32/f64 mem.matmul and mem.conv2d becomes one shared-memory tiled kernel (passes/gpu_gemm.py):

    mem.matmul %a, %b, %c { epilogue }
becomes
    gpu.launch ceil(M / bm) * ceil(N / bn) {block = [(bm / tm) * (bn / tn)]} {
      %a_tile, %b_tile = gpu.shared_alloc ...
      loop.for over slices of K { copy the slices, barrier, tm x tn multiply-adds per k, barrier }
      the epilogue's ops and the store, per element inside C
    }

A convolution is an implicit GEMM per group: rows are its output channels, columns its output
pixels (n, y, x), the reduction its (channel, ky, kx) window, read from the padded input in place.
f16 and bf16 products and convolutions run on tensor cores instead (gpu_gemm.MmaGemm: 64 x 64 tiles per four warps of
gpu.mma_sync). The options fix the SIMT tiles, so the same pipeline prints the same IR for every GPU.
Other element types are left to expand-products.
"""
from __future__ import annotations

from mlc.ir.core import Builder, Module, Operation
from mlc.ir.dialects.loops import Matmul

from .gpu_gemm import GpuGemm, MmaGemm
from .lowering.core import LoopBuilder, store_through_epilogue
from .manager import Pass, PipelineError


class TileGpu(Pass):
    name = "tile-gpu"
    summary = "each f32/f64 mem.matmul / mem.conv2d as one shared-memory tiled GPU kernel"
    options = {"bm": 64, "bn": 64, "bk": 8, "tm": 4, "tn": 4}

    def __init__(self, **options):
        super().__init__(**options)
        bm, bn, bk, tm, tn = (self.option(k) for k in ("bm", "bn", "bk", "tm", "tn"))
        threads = (bm // tm) * (bn // tn) if min(bm, bn, bk, tm, tn) > 0 else 0
        if (bm % tm or bn % tn or not 32 <= threads <= 1024 or threads % 32
                or (bk * bm) % threads or (bk * bn) % threads):
            raise PipelineError(f"tile-gpu needs tm | bm, tn | bn, (bm/tm)*(bn/tn) threads (32 to 1024, whole warps) "
                                f"dividing bk*bm and bk*bn, got {self}")

    def run(self, module: Module) -> None:
        for f in module.functions.values():
            L = LoopBuilder(module, f)
            for op in [o for o in f.body.walk() if o.name in ("mem.matmul", "mem.conv2d")]:
                if op.operand_types[2].element.name not in ("f16", "bf16", "f32", "f64"):
                    continue
                L.b = Builder.before(op, module)
                gemm = (self.matmul if op.name == "mem.matmul" else self.conv)(L, op)
                gemm.emit(L, L.b)
                op.erase()

    def tiles(self) -> dict:
        return {k: self.option(k) for k in ("bm", "bn", "bk", "tm", "tn")}

    def matmul(self, L: LoopBuilder, op: Operation) -> GpuGemm:
        ranks = [t.rank for t in op.operand_types[:3]]
        (a, b, c), (at_a, at_b, at_c) = Matmul.split(op.operands, ranks)
        ta, tb = bool(op.attr("transpose_a")), bool(op.attr("transpose_b"))
        kind, tiles = (MmaGemm, {}) if c.type.element.name in ("f16", "bf16") else (GpuGemm, self.tiles())
        piece = 16 // c.type.element.np_dtype.itemsize
        interleaved = any(op.attr(f"interleaved_{x}") for x in "abc")
        if kind is MmaGemm and not ta and not tb and not interleaved and \
                all(t.shape[-1] is not None and t.shape[-1] % piece == 0 for t in (a.type, b.type)):
            tiles = {"address_a": lambda kb, _, i, k: (a, at_a + [i, k]), "address_b": lambda kb, _, k, j: (b, at_b + [k, j]),
                     "n_tiles": 4, "bn": 64}  # (the copies leave registers for 2 x 4 tiles per warp)
        place = lambda which, lead, x, y: Matmul.place(op, which, lead, x, y)  # noqa: E731
        return kind(
            *(L.dim(c, axis) for axis in Matmul.matrix_axes(op, 2)), L.dim(a, Matmul.matrix_axes(op, 0)[0 if ta else 1]), L.idx(1),
            c.type.element,
            load_a=lambda kb, _, i, k: kb.create("mem.load", [a] + place(0, at_a, *((k, i) if ta else (i, k)))).result,
            load_b=lambda kb, _, k, j: kb.create("mem.load", [b] + place(1, at_b, *((j, k) if tb else (k, j)))).result,
            store=lambda kb, _, i, j, v: store_through_epilogue(kb, op, c, place(2, at_c, i, j), [i, j], v),
            a_along_k=not ta, **tiles)

    def conv(self, L: LoopBuilder, op: Operation) -> GpuGemm:
        x, w, out = op.operands
        n, o_ch, oh, ow = L.dims(out)
        _, channels, kh, kw = L.dims(w)
        (dh, dw), (sy, sx), groups = op.attr("dilation"), op.attr("stride"), op.attr("groups")
        per_group = L.op(L.b, "arith.div", o_ch, L.idx(groups))
        window = L.op(L.b, "arith.mul", kh, kw)
        pixels = L.op(L.b, "arith.mul", oh, ow)

        def split(b, value, size):
            q = L.op(b, "arith.div", value, size)
            return q, L.op(b, "arith.sub", value, L.op(b, "arith.mul", q, size))

        def tap(b, k):  # (c, ky, kx) of reduction index k
            c, rest = split(b, k, window)
            return (c, *split(b, rest, kw))

        def pixel(b, j):  # (n, y, x) of column j
            image, rest = split(b, j, pixels)
            return (image, *split(b, rest, ow))

        def channel(b, g, i):
            return L.op(b, "arith.add", L.op(b, "arith.mul", g, per_group), i)

        def load_b(b, g, k, j):
            c, ky, kx = tap(b, k)
            image, y, col = pixel(b, j)
            iy = L.op(b, "arith.add", L.op(b, "arith.mul", y, L.idx(sy)), L.op(b, "arith.mul", ky, L.idx(dh)))
            ix = L.op(b, "arith.add", L.op(b, "arith.mul", col, L.idx(sx)), L.op(b, "arith.mul", kx, L.idx(dw)))
            return b.create("mem.load", [x, image, L.op(b, "arith.add", L.op(b, "arith.mul", g, channels), c), iy, ix]).result

        def store(b, g, i, j, v):
            image, y, col = pixel(b, j)
            at = [image, channel(b, g, i), y, col]
            store_through_epilogue(b, op, out, at, at, v)

        kind, tiles = (MmaGemm, {}) if out.type.element.name in ("f16", "bf16") else (GpuGemm, self.tiles())
        return kind(per_group, L.op(L.b, "arith.mul", n, pixels), L.op(L.b, "arith.mul", channels, window), L.idx(groups),
                    out.type.element,
                    load_a=lambda b, g, i, k: b.create("mem.load", [w, channel(b, g, i), *tap(b, k)]).result,
                    load_b=load_b, store=store, **tiles)
