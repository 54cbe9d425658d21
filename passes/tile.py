"""tile: each mem.matmul becomes the blocked, packed, register-tiled loop nest of gemm.py:

    mem.matmul %a, %b, %c {...} { epilogue }
becomes
    pack B into panels of 2 vectors' width; parallel over blocks of `mc` rows of C:
        zero them; for each `kc`-deep slice of K, micro-tiles of 6 rows x 2 vectors in registers
        (8 rows with 64-byte vectors); then the epilogue's ops, copied
        in, over each finished row

and each mem.conv2d the direct convolution: parallel over output rows, micro-tiles of 6 output
channels x 2 vectors along the row, reduced over blocks of input channels and the window in
registers, then the epilogue over the finished row; or, where the result image has at most
`conv-gemm-pixels` pixels (or the stride along x is neither 1 nor 2), the same product as a mem.matmul with
the weights as A and the im2col of the input packed as B's panels (gemm.ConvAsGemm).

The options fix the shape of the tiles, so the same pipeline prints the same IR on every machine; the
compiler driver (mlc/compiler.py) gives the host's vector width: `tile{vector-bytes=64}` with AVX-512.
An op's own `tile = [mc, kc]` (what `mlc tune` measured best for its shape on this host) replaces
the options for it.
`kc=0` (the default) takes gemm.py's depth for the vector width (256, or 512 with 64-byte vectors).

A product whose B is a matrix global that no function stores to (an inference model's weight; not
one marked `external`, which the host writes in place) reads it from a global of its own declared
here, `init = "panels"`: B already packed, which the runtime packs again whenever the matrix is set
(runtime/executable.py), instead of at every call. `packed-globals=0` packs at every call.
"""
from __future__ import annotations

import math

from mlc.ir.attributes import SymbolRefAttr
from mlc.ir.core import Builder, Module, Operation
from mlc.ir.diagnostics import error
from mlc.ir.dialects.loops import Matmul
from mlc.ir.dialects.mlc import Global
from mlc.ir.types import MemRefType

from . import gemm
from .effects import derived_global, read_only_globals
from .expand_products import expand_conv, expand_matmul
from .lowering.core import LoopBuilder, store_through_epilogue
from .manager import Pass, PipelineError


class Tile(Pass):
    name = "tile"
    summary = "block, pack and register-tile each mem.matmul (its epilogue over each finished row)"
    options = {"vector-bytes": gemm.VECTOR_BYTES, "kc": 0, "mc": gemm.MC, "conv-gemm-pixels": gemm.CONV_GEMM_PIXELS,
               "packed-globals": 1}

    def __init__(self, **options):
        super().__init__(**options)
        if self.option("vector-bytes") not in (16, 32, 64) or self.option("mc") % gemm.MR_AVX512 or self.option("kc") < 0:
            raise PipelineError(f"tile needs vector-bytes of 16, 32 or 64, mc a multiple of {gemm.MR_AVX512} and kc >= 0, "
                                f"got {self}")

    def run(self, module: Module) -> None:
        self.read_only = read_only_globals(module) if self.option("packed-globals") else set()
        for f in module.functions.values():
            builder = LoopBuilder(module, f)
            for op in [o for o in f.body.walk() if o.name in ("mem.matmul", "mem.conv2d")]:
                builder.b = Builder.before(op, module)
                if not gemm.supports(op.operand_types[2].element):  # (f16, left in half for GPUs): plain loops
                    (expand_matmul if op.name == "mem.matmul" else expand_conv)(builder, op)
                else:
                    (self.tile_matmul if op.name == "mem.matmul" else self.tile_conv)(builder, op)
                op.erase()

    def sizes(self, op: Operation) -> dict:
        """mc and kc: the op's `tile` (measured by `mlc tune`) where it has one, else the options."""
        mc, kc = op.attr("tile") or (self.option("mc"), self.option("kc"))
        if mc <= 0 or mc % gemm.MR_AVX512 or kc < 0:
            raise error(op.loc, f"{op.name}'s tile = [mc, kc] needs mc a positive multiple of {gemm.MR_AVX512} and kc >= 0 "
                                f"(0: by the vector width), got [{mc}, {kc}]")
        return {"mc": mc, "kc": kc}

    def tile_conv(self, L: LoopBuilder, op: Operation) -> None:
        """The direct convolution of gemm.py (micro-tiles of 6 output channels x 2 vectors of 32 bytes
        along an output row: image rows are often narrower than wider tiles), or, for small images,
        strides along x and inputs without the direct convolution's spare columns, the convolution as
        a product (gemm.ConvAsGemm)."""
        x, w, out = op.operands
        n, o_ch, oh, ow = L.dims(out)
        (dh, dw), (sy, sx), e = op.attr("dilation"), op.attr("stride"), out.type.element
        widths = x.type.shape[3], out.type.shape[3], w.type.shape[3]
        no_spare = None not in widths and widths[0] < sx * (widths[1] - 1) + 1 + (widths[2] - 1) * dw + gemm.DirectConv.extra_columns(e, sx)
        if no_spare or gemm.conv_as_gemm(out.type.shape, op.attr("groups"), sx, self.option("conv-gemm-pixels")):
            # (no_spare: the lowering padded the input for the product, lowering/conv.py)
            gemm.ConvAsGemm(x, w, out, [n, o_ch, oh, ow], (sy, sx), (dh, dw), op.attr("groups"), e,
                            None if _is_identity(op) else lambda eb, flat, at, indices, value: store_through_epilogue(eb, op, flat, at, indices, value),
                            vector_bytes=self.option("vector-bytes"), **self.sizes(op)).emit(L, L.b)
            return
        span = L.op(L.b, "arith.add", L.op(L.b, "arith.mul", L.op(L.b, "arith.sub", ow, L.idx(1)), L.idx(sx)),
                    L.op(L.b, "arith.add", L.idx(1), L.op(L.b, "arith.mul", L.op(L.b, "arith.sub", L.dim(w, 3), L.idx(1)), L.idx(dw))))
        needed = L.op(L.b, "arith.add", span, L.idx(gemm.DirectConv.extra_columns(e, sx)))
        L.b.create("mem.check", [L.op(L.b, "arith.ge", L.dim(x, 3), needed)],
                   {"message": "the input lacks the spare columns the tiled convolution reads", "op": op.name})
        gemm.DirectConv(x, w, out, [n, o_ch, oh, ow], L.dim(w, 1), op.attr("groups"), sy, (dh, dw), e,
                        _conv_row_epilogue(L, op, out, o_ch, ow), stride_x=sx).emit(L, L.b)

    def tile_matmul(self, L: LoopBuilder, op: Operation) -> None:
        (a, b, c), (at_a, at_b, at_c) = Matmul.split(op.operands, [t.rank for t in op.operand_types[:3]])
        ta, tb = bool(op.attr("transpose_a")), bool(op.attr("transpose_b"))
        m, n = (L.dim(c, axis) for axis in Matmul.matrix_axes(op, 2))
        k = L.dim(a, Matmul.matrix_axes(op, 0)[0 if ta else 1])

        def load(which, buf, lead, transposed):
            return lambda kb, x, y: kb.create("mem.load", [buf] + Matmul.place(op, which, lead, *((y, x) if transposed else (x, y)))).result

        def load_vector(which, buf, lead, transposed):  # (along the buffer's last dim: None where it runs the other way)
            return None if transposed else \
                lambda kb, x, y, vt: kb.create("vector.load", [buf] + Matmul.place(op, which, lead, x, y), result_types=[vt]).result

        bt = load_vector(1, b, at_b, not tb)
        at = load_vector(0, a, at_a, not ta)
        outermost = _loop_leaving_unchanged(op, b) if not at_b and None not in b.type.shape else None
        c_at = lambda i, j: Matmul.place(op, 2, at_c, i, j)  # noqa: E731
        gemm.Gemm(m, n, k, c.type.element, load_a=load(0, a, at_a, ta), load_b=load(1, b, at_b, tb),
                  load_b_vector=load_vector(1, b, at_b, tb), c=c, c_at=c_at,
                  epilogue=None if _is_identity(op) else lambda eb, i, j: _epilogue_at(eb, op, c, c_at(i, j), [i, j]),
                  load_a_vector=load_vector(0, a, at_a, ta), load_bt_vector=bt and (lambda kb, kk, j, vt: bt(kb, j, kk, vt)),
                  load_at_vector=at and (lambda kb, i, kk, vt: at(kb, kk, i, vt)),
                  a_row=_row_elements(a.type.shape, Matmul.matrix_axes(op, 0)[0]),
                  a_column=_row_elements(a.type.shape, Matmul.matrix_axes(op, 0)[0]) if ta else None,
                  b_column=_row_elements(b.type.shape, Matmul.matrix_axes(op, 1)[0]) if tb else None,
                  vector_bytes=self.option("vector-bytes"), **self.sizes(op),
                  pack_at=outermost and (Builder.before(outermost, L.module), not _in_parallel_loop(outermost)),
                  b_panels=self.global_panels(L.module, b, tb),
                  ).emit(L, L.b, parallel=not _in_parallel_loop(op))

    def global_panels(self, module: Module, b, transposed: bool):
        """Where B is a matrix global no function stores to: (nr) -> its panels of nr columns,
        a global declared (once) the first time a product packs it."""
        made = b.defining_op()
        loaded = made.operands[0].defining_op() if made is not None and made.name == "mem.from_tensor" else None
        if loaded is None or loaded.name != "mlc.global_load" or loaded.attr("global") not in self.read_only or b.type.rank != 2:
            return None
        source = module.globals[loaded.attr("global")]

        def panels(nr: int):
            t = Global.panels_type(source.attr("type"), nr, transposed)
            name = derived_global(module, source, "panels", t, ".panels" + ("_t" if transposed else ""), transposed)
            pb = Builder.after(made, module)  # (where the matrix is read: outside the loops the product may be in)
            value = pb.create("mlc.global_load", [], {"global": SymbolRefAttr(name)}, result_types=[t], name_hint=name).result
            return pb.create("mem.from_tensor", [value], result_types=[MemRefType(t.shape, t.element)]).result
        return panels


def _row_elements(shape, axis: int) -> int | None:
    """Elements from one index of dim `axis` to the next (row-major; None where a later dim is `?`)."""
    after = shape[axis + 1:]
    return None if None in after else math.prod(after)


def _conv_row_epilogue(L: LoopBuilder, op: Operation, out, o_ch, ow):
    """(builder, n, y) -> mem.conv2d's epilogue over output row (n, :, y, :), or None."""
    if _is_identity(op):
        return None
    return lambda rb, n, y: L.nest([o_ch, ow], lambda eb, ox: _epilogue_at(eb, op, out, [n, ox[0], y, ox[1]]), b=rb)


def _is_identity(op: Operation) -> bool:
    block = op.regions[0].blocks[0]
    return block.last.operands[0] is block.args[-1]


def _epilogue_at(b: Builder, op: Operation, out, at: list, indices: list | None = None) -> None:
    """out[at] = the epilogue on its indices (those of `at` unless given) and the value at `at`."""
    store_through_epilogue(b, op, out, at, at if indices is None else indices, b.create("mem.load", [out] + at).result)


_READ_ONLY = {"mem.load", "vector.load", "mem.dim", "mem.dealloc"}


def _loop_leaving_unchanged(op: Operation, buf) -> Operation | None:
    """The outermost loop.for around op (a mem.matmul reading buf) with buf made before it, where buf
    is a buffer nothing writes: read by loads and products only, never viewed under another name
    (made by mem.from_tensor of a tensor with no other buffer). None when there is none."""
    made = buf.defining_op()
    if made is None or made.name != "mem.from_tensor" or len(made.operands[0].users) != 1:
        return None
    for user in buf.users:
        if user.name in _READ_ONLY or (user.name in ("mem.matmul", "mem.conv2d") and user.operands[2] is not buf):
            continue
        return None
    outermost, parent = None, op.parent_op
    while parent is not None and parent.name == "loop.for" and not made.is_within({parent}):
        outermost, parent = parent, parent.parent_op
    return outermost


def _in_parallel_loop(op: Operation) -> bool:
    parent = op.parent_op
    while parent is not None:
        if parent.name == "loop.for" and parent.attr("parallel"):
            return True
        parent = parent.parent_op
    return False
