"""mlc.conv2d (a mem.conv2d, which the tile pass makes a register-tiled direct convolution or a
product; loops over a padded copy of the input for other element types) and mlc.conv2d_transpose
(gather form)."""
from __future__ import annotations

from mlc.ir.core import Block, Builder, Operation, Region
from mlc.ir.dialects import mlc as tensor_ops
from mlc.ir.types import index

from .. import gemm
from .core import FunctionLowering, apply_epilogue, rule
from .shape import padded
from .windows import guarded_load, source_index, window_size


@rule("mlc.conv2d")
def conv2d(L: FunctionLowering, op: Operation, epilogue=None):
    """Direct convolution on an explicitly padded copy of the input, so every read is in bounds
    without guards; the loops run n, o | c, i, j | y, x with x innermost (contiguous for stride 1)
    and the weight read once per (c, i, j)."""
    x, w = (L.buffers[v] for v in op.operands)
    t = op.results[0].type
    (sh, sw), (pt, pl, pb, pr), (dh, dw), groups = op.opdef.params(op)
    n, c_in, h, wd = L.dims(x)
    o_ch, cg, kh, kw = L.dims(w)
    e = t.element
    if gemm.supports(e) or e.name in ("f16", "bf16"):  # (half: GPU tensor cores; the CPU widens it first)
        return _tiled_conv2d(L, op, x, w, epilogue)
    xp = padded(L, x, [0, 0, pt, pl], [0, 0, pb, pr]) if pt or pl or pb or pr else x
    oh = L.idx(t.shape[2]) if t.shape[2] is not None else window_size(L, op, h, 2)
    ow = L.idx(t.shape[3]) if t.shape[3] is not None else window_size(L, op, wd, 3)
    out = L.alloc(t, [n, o_ch, oh, ow], op.results[0].name_hint)
    L.nest([n, o_ch, oh, ow], lambda b, ivs: b.create("mem.store", [L.const(b, 0, e), out] + ivs))
    per_group = L.idx(t.shape[1] // groups) if t.shape[1] is not None else L.op(L.b, "arith.div", o_ch, L.idx(groups))

    def body(b, ivs):
        bn, o, c, i, j = ivs
        channel = L.op(b, "arith.add", L.op(b, "arith.mul", L.op(b, "arith.div", o, per_group), cg), c)
        weight = b.create("mem.load", [w, o, c, i, j]).result

        def accumulate(ib, yx):
            oy, ox = yx
            iy = L.op(ib, "arith.add", L.op(ib, "arith.mul", oy, L.idx(sh)), L.op(ib, "arith.mul", i, L.idx(dh)))
            ix = L.op(ib, "arith.add", L.op(ib, "arith.mul", ox, L.idx(sw)), L.op(ib, "arith.mul", j, L.idx(dw)))
            v = ib.create("mem.load", [xp, bn, channel, iy, ix]).result
            at = [bn, o, oy, ox]
            ib.create("mem.store", [L.op(ib, "arith.add", ib.create("mem.load", [out] + at).result, L.op(ib, "arith.mul", v, weight)), out] + at)
        L.nest([oh, ow], accumulate, parallel=True, b=b)
    L.nest([n, o_ch, cg, kh, kw], body, parallel=[True, True, False, False, False])
    return apply_epilogue(L, out, [n, o_ch, oh, ow], epilogue)


def _tiled_conv2d(L: FunctionLowering, op: Operation, x, w, epilogue=None):
    """mem.conv2d (the tile pass makes a register-tiled kernel of it) on a copy of the input padded
    with zeros, and, where it will run as the direct convolution, with the spare columns on the right
    that its last tile's vectors read; the fused consumers are its epilogue."""
    t = op.results[0].type
    stride, (pt, pl, pb, pr), dilation, groups = op.opdef.params(op)
    n, c_in, h, wd = L.dims(x)
    e = t.element
    spare = 0 if gemm.conv_as_gemm(t.shape, groups, stride[1]) else gemm.DirectConv.extra_columns(e, stride[1])
    xp = padded(L, x, [0, 0, pt, pl], [0, 0, pb, pr + spare])
    o_ch = L.dim(w, 0)
    oh = L.idx(t.shape[2]) if t.shape[2] is not None else window_size(L, op, h, 2)
    ow = L.idx(t.shape[3]) if t.shape[3] is not None else window_size(L, op, wd, 3)
    out = L.alloc(t, [n, o_ch, oh, ow], op.results[0].name_hint)
    block = Block([index] * 4 + [e], ["n", "o", "y", "x", "acc"])
    attrs = {name: value for name, value, default in (("stride", list(stride), [1, 1]), ("dilation", list(dilation), [1, 1]), ("groups", groups, 1))
             if value != default}
    if op.attr("mlc.tile") is not None:  # (tile sizes `mlc tune` measured for this convolution)
        attrs["tile"] = op.attr("mlc.tile")
    L.b.create("mem.conv2d", [xp, w, out], attrs or None, regions=[Region([block])])
    eb = Builder.at_end(block, L.module, L.b.loc)
    eb.create("mem.yield", [epilogue(eb, block.args[4], list(block.args[:4])) if epilogue else block.args[4]])
    return [out]


@rule("mlc.conv2d_blocked")
def conv2d_blocked(L: FunctionLowering, op: Operation):
    """Channels in blocks, on a padded copy of the input: per output pixel, the output block's
    channels innermost, contiguous in the result and the weights (LLVM vectorises them). Plain loops:
    the tuned kernel is the CPU performance work's."""
    x, w = (L.buffers[v] for v in op.operands)
    t = op.results[0].type
    (sh, sw), (pt, pl, pb, pr), (dh, dw), _ = op.opdef.params(op)
    n, cblocks, h, wd, b = L.dims(x)
    oblocks, _, kh, kw, _, ob = L.dims(w)
    xp = padded(L, x, [0, 0, pt, pl, 0], [0, 0, pb, pr, 0]) if pt or pl or pb or pr else x
    oh = L.idx(t.shape[2]) if t.shape[2] is not None else window_size(L, op, h, 2)
    ow = L.idx(t.shape[3]) if t.shape[3] is not None else window_size(L, op, wd, 3)
    sizes = [n, oblocks, oh, ow, ob]
    out = L.alloc(t, sizes, op.results[0].name_hint)
    e = t.element

    def pixel(b_, ivs):
        bn, blk, oy, ox = ivs
        L.nest([ob], lambda zb, o: zb.create("mem.store", [L.const(zb, 0, e), out, bn, blk, oy, ox, o[0]]), b=b_)

        def accumulate(ab, kvs):
            cb, i, j, c = kvs
            iy = L.op(ab, "arith.add", L.op(ab, "arith.mul", oy, L.idx(sh)), L.op(ab, "arith.mul", i, L.idx(dh)))
            ix = L.op(ab, "arith.add", L.op(ab, "arith.mul", ox, L.idx(sw)), L.op(ab, "arith.mul", j, L.idx(dw)))
            v = ab.create("mem.load", [xp, bn, cb, iy, ix, c]).result

            def channel(ob_, o):
                at = [bn, blk, oy, ox, o[0]]
                product = L.op(ob_, "arith.mul", v, ob_.create("mem.load", [w, blk, cb, i, j, c, o[0]]).result)
                ob_.create("mem.store", [L.op(ob_, "arith.add", ob_.create("mem.load", [out] + at).result, product), out] + at)
            L.nest([ob], channel, parallel=False, b=ab)
        L.nest([cblocks, kh, kw, b], accumulate, parallel=False, b=b_)
    L.nest(sizes[:4], pixel)
    return [out]


@rule("mlc.conv2d_transpose")
def conv2d_transpose(L: FunctionLowering, op: Operation):
    """Gather form: out[n, g*O + o, y, x] = sum over c, i, j of in[n, g*C + c, (y + top - i*d) / s, ...]
    * w[g*C + c, o, i, j], where the division is exact and lands inside the input."""
    x, w = (L.buffers[v] for v in op.operands)
    t = op.results[0].type
    (sh, sw), pads, (dh, dw), groups = tensor_ops.Conv2d.params(op)
    pt, pl = pads[:2]
    n, c_in, h, wd = L.dims(x)
    _, og, kh, kw = L.dims(w)
    sizes = [n, L.op(L.b, "arith.mul", og, L.idx(groups)) if t.shape[1] is None else L.idx(t.shape[1])]
    for axis, (size, s, d, lo) in ((2, (h, sh, dh, pt)), (3, (wd, sw, dw, pl))):
        if t.shape[axis] is not None:
            sizes.append(L.idx(t.shape[axis]))
            continue
        k = op.operand_types[1].shape[axis]
        hi = pads[axis]
        extra = op.attr("output_padding")[axis - 2]
        grown = L.op(L.b, "arith.mul", L.op(L.b, "arith.sub", size, L.idx(1)), L.idx(s))
        sizes.append(L.op(L.b, "arith.add", grown, L.idx(d * (k - 1) + extra + 1 - lo - hi)))
    out = L.alloc(t, sizes, op.results[0].name_hint)
    cg = L.op(L.b, "arith.div", c_in, L.idx(groups))
    e = t.element

    def body(b, ivs):
        bn, oc, oy, ox = ivs
        b.create("mem.store", [L.const(b, 0, e), out] + ivs)
        g = L.op(b, "arith.div", oc, og)
        o = L.op(b, "arith.sub", oc, L.op(b, "arith.mul", g, og))

        def acc(ib, kvs):
            c, i, j = kvs
            iy, in_y = source_index(L, ib, oy, i, sh, dh, pt, h)
            ix, in_x = source_index(L, ib, ox, j, sw, dw, pl, wd)
            ci = L.op(ib, "arith.add", L.op(ib, "arith.mul", g, cg), c)
            v = guarded_load(L, ib, x, [bn, ci, iy, ix], L.op(ib, "arith.and", in_y, in_x), L.const(ib, 0, e))
            prod = L.op(ib, "arith.mul", v, ib.create("mem.load", [w, ci, o, i, j]).result)
            ib.create("mem.store", [L.op(ib, "arith.add", ib.create("mem.load", [out] + ivs).result, prod), out] + ivs)
        L.nest([cg, kh, kw], acc, parallel=False, b=b)
    L.nest(sizes, body)
    return [out]
