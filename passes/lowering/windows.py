"""Index arithmetic of sliding windows, shared by the convolutions and the pools."""
from __future__ import annotations


def window_index(L, b, o, kk, stride, dilation, low):
    """o * stride + kk * dilation - low (may be outside the input: the caller guards it)."""
    at = L.op(b, "arith.add", L.op(b, "arith.mul", o, L.idx(stride)), L.op(b, "arith.mul", kk, L.idx(dilation)))
    return L.op(b, "arith.sub", at, L.idx(low))


def in_bounds(L, b, position, size):
    """0 <= position < size for an index that may have gone negative (index arithmetic wraps as i64)."""
    return L.op(b, "arith.and", L.op(b, "arith.ge", position, L.idx(0)), L.op(b, "arith.lt", position, size))


def guarded_load(L, b, buf, indices, inside, fill):
    """buf[indices] where `inside`, else `fill`: the index is clamped so the load is always in bounds."""
    safe = [L.op(b, "arith.select", inside, i, L.idx(0)) for i in indices]
    return L.op(b, "arith.select", inside, b.create("mem.load", [buf] + safe).result, fill)


def source_index(L, b, position, kk, s, d, lo, size):
    """The window (or transposed-convolution input) index q with q * s + kk * d - lo == position, and
    whether there is one inside 0..size."""
    num = L.op(b, "arith.sub", L.op(b, "arith.add", position, L.idx(lo)), L.op(b, "arith.mul", kk, L.idx(d)))
    q = L.op(b, "arith.div", num, L.idx(s))
    exact = L.op(b, "arith.eq", L.op(b, "arith.mul", q, L.idx(s)), num)
    inside = L.op(b, "arith.and", L.op(b, "arith.ge", num, L.idx(0)), L.op(b, "arith.and", exact, L.op(b, "arith.lt", q, size)))
    return q, inside


def window_size(L, op, size, axis):
    """A pooled/convolved output size at run time: (size + lo + hi - span) / stride + 1."""
    params = op.opdef.params(op)
    if op.name in ("mlc.conv2d", "mlc.conv2d_blocked"):
        (sh, sw), (pt, pl, pb, pr), (dh, dw), _ = params
        kernel = op.operand_types[1].shape[axis]
    else:
        (kh, kw), (sh, sw), (pt, pl, pb, pr) = params
        kernel, dh, dw = (kh if axis == 2 else kw), 1, 1
    lo, hi, s, d = (pt, pb, sh, dh) if axis == 2 else (pl, pr, sw, dw)
    span = d * (kernel - 1) + 1
    grown = L.op(L.b, "arith.sub", L.op(L.b, "arith.add", size, L.idx(lo + hi)), L.idx(span))
    return L.op(L.b, "arith.add", L.op(L.b, "arith.div", grown, L.idx(s)), L.idx(1))
