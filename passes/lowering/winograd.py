"""Winograd F(m x m, 3 x 3)'s transforms (the winograd pass makes them): each a small matrix product with
constant coefficients, unrolled (zeros skipped, +-1 as adds), with the channels innermost: contiguous
in the product's operands and result, so the loop vectoriser runs along them."""
from __future__ import annotations

import functools

import numpy as np

from mlc.ir.core import Operation
from mlc.ir.dialects.mlc import winograd_matrices
from mlc.ir.dialects.shapes import pads4
from mlc.ir.types import TensorType

from .core import FunctionLowering, rule
from .windows import guarded_load, in_bounds


def _combine(L: FunctionLowering, b, coefficients, values, element):
    """sum_k coefficients[k] * values[k]: no multiply by 0 or +-1."""
    total = None
    for c, v in zip(coefficients, values):
        if c == 0:
            continue
        negative = c < 0
        if abs(c) != 1:
            v, negative = _arith(b, "arith.mul", v, L.const(b, abs(c), element)), negative
        if total is None:
            total = _arith(b, "arith.neg", v) if negative else v
        else:
            total = _arith(b, "arith.sub" if negative else "arith.add", total, v)
    return total if total is not None else L.const(b, 0, element)


def _arith(b, name, *operands):
    """A float op of the transforms' sums, its type its operands' (without inference: ResNet-18's
    transforms are ~8000 of them)."""
    return b.create(name, list(operands), result_types=[operands[0].type]).result


def _apply(L: FunctionLowering, b, matrix, values, element):
    """matrix @ values, by the plan for the matrix (_plan)."""
    pairs, rows = _plan(tuple(map(tuple, np.asarray(matrix, float))))
    values = list(values)
    for k, l, combine in pairs:
        values.append(_arith(b, combine, values[k], values[l]))
    return [_arith(b, op, *(_combine(L, b, c, values, element) for c in terms)) if op else _combine(L, b, terms[0], values, element)
            for op, terms in rows]


@functools.lru_cache(maxsize=None)
def _plan(matrix: tuple) -> tuple:
    """How to compute matrix @ v with the terms its rows share computed once (the transforms' structure:
    ~40% fewer ops for F(4, 3)'s): columns k, l that every row weighs alike or oppositely are read as
    v[k] + v[l] and v[k] - v[l] (`pairs`, appended to v); then rows that are e + o and e - o (e, o on
    disjoint columns) as e.v +- o.v. Each row: (op, coefficient rows) — ("arith.add", (e, o)), or (None, (row,))."""
    m, pairs = np.array(matrix, float), []
    for k in range(m.shape[1]):
        for l in range(k + 1, m.shape[1]):
            a, c = m[:, k].copy(), m[:, l]
            alike, opposite = (a == c) & (a != 0), (a == -c) & (a != 0)
            if np.count_nonzero(a) >= 3 and np.all(alike | opposite | (a == c)):
                for rows, combine in ((alike, "arith.add"), (opposite, "arith.sub")):
                    if rows.any():
                        m = np.column_stack([m, np.where(rows, a, 0)])
                        pairs.append((k, l, combine))
                m[:, k] = m[:, l] = 0
    out = [(None, (tuple(row),)) for row in m]
    done = set()
    for i in range(len(m)):
        for j in range(i + 1, len(m)):
            e, o = (m[i] + m[j]) / 2, (m[i] - m[j]) / 2
            if i in done or j in done or not e.any() or not o.any() or ((e != 0) & (o != 0)).any():
                continue
            out[i], out[j] = ("arith.add", (tuple(e), tuple(o))), ("arith.sub", (tuple(e), tuple(o)))
            done |= {i, j}
    return tuple(pairs), tuple(out)


def _sandwich(L, b, left, tile, right, element):
    """left @ tile @ right^T, for a tile of scalar values (a list of rows)."""
    columns = [_apply(L, b, left, [row[j] for row in tile], element) for j in range(len(tile[0]))]
    return [_apply(L, b, right, [column[i] for column in columns], element) for i in range(len(left))]


@rule("mlc.winograd_filter")
def winograd_filter(L: FunctionLowering, op: Operation):
    """G w G^T along the input channels, the 9 taps read in place (a copy with each tap contiguous along
    the channels first was slower: 0.40 vs 0.14 ms for 256 x 256 filters)."""
    w = L.buffers[op.operands[0]]
    t = op.results[0].type
    _, g, _ = winograd_matrices(op.opdef.m(op))
    a = len(g)
    o, c = L.dims(w)[:2]
    out = L.alloc(t, [o, L.idx(a * a), c], op.results[0].name_hint)

    def body(b, ivs):
        tile = [[b.create("mem.load", [w, *ivs, L.idx(i), L.idx(j)]).result for j in range(3)] for i in range(3)]
        u = _sandwich(L, b, g, tile, g, t.element)
        for i in range(a):
            for j in range(a):
                b.create("mem.store", [u[i][j], out, ivs[0], L.idx(i * a + j), ivs[1]])
    L.nest([o, c], body, [True, False])
    return [out]


@rule("mlc.winograd_input")
def winograd_input(L: FunctionLowering, op: Operation):
    """BT d B for each tile d, over a copy of x with the channels last (so the transform runs along them,
    as the tiles' rows of the product want them) padded to whole tiles (no read of it is guarded)."""
    x = L.buffers[op.operands[0]]
    t = op.results[0].type
    m = op.opdef.m(op)
    _, _, bt = winograd_matrices(m)
    a = m + 2
    pt, pl, _, _ = pads4(op.attr("padding"))
    h, w = x.type.shape[2:]
    th, tw = op.opdef.grid(op, h, w)
    n, c = L.dims(x)[:2]
    rows, cols = L.idx(m * th + 2), L.idx(m * tw + 2)
    xp = L.alloc(TensorType((x.type.shape[0], m * th + 2, m * tw + 2, x.type.shape[1]), t.element), [n, rows, cols, c], "channels_last")

    def copy(b, ivs):
        y, bn, col, ch = ivs
        sy, sx = L.op(b, "arith.sub", y, L.idx(pt)), L.op(b, "arith.sub", col, L.idx(pl))
        inside = L.op(b, "arith.and", in_bounds(L, b, sy, L.idx(h)), in_bounds(L, b, sx, L.idx(w)))
        b.create("mem.store", [guarded_load(L, b, x, [bn, ch, sy, sx], inside, L.const(b, 0, t.element)), xp, bn, y, col, ch])
    L.nest([rows, n, cols, c], copy, [True, False, False, False])
    out = L.alloc(t, [L.op(L.b, "arith.mul", n, L.idx(th * tw)), L.idx(a * a), c], op.results[0].name_hint)

    def tile(b, ivs):
        ty, bn, tx, ch = ivs
        top, left = L.op(b, "arith.mul", ty, L.idx(m)), L.op(b, "arith.mul", tx, L.idx(m))
        d = [[b.create("mem.load", [xp, bn, L.op(b, "arith.add", top, L.idx(i)), L.op(b, "arith.add", left, L.idx(j)), ch]).result
              for j in range(a)] for i in range(a)]
        v = _sandwich(L, b, bt, d, bt, t.element)
        at = _tile_index(L, b, bn, ty, tx, th, tw)
        for i in range(a):
            for j in range(a):
                b.create("mem.store", [v[i][j], out, at, L.idx(i * a + j), ch])
    L.nest([L.idx(th), n, L.idx(tw), c], tile, [True, False, False, False])
    return [out]


@rule("mlc.winograd_output")
def winograd_output(L: FunctionLowering, op: Operation, epilogue=None):
    """AT p A for each tile's products, along the output channels into a channels-last image of whole
    tiles; then that image copied out as NCHW (cropped where the tiles overhang it), through the fused
    consumers' epilogue (batch norm, residual, ReLU)."""
    p = L.buffers[op.operands[0]]
    t = op.results[0].type
    m = op.opdef.m(op)
    at_, _, _ = winograd_matrices(m)
    a = m + 2
    h, w, th, tw = op.opdef.grid(op)
    tiles, _, o = L.dims(p)
    n = L.idx(t.shape[0]) if t.shape[0] is not None else L.op(L.b, "arith.div", tiles, L.idx(th * tw))
    if t.shape[0] is None:
        L.check(L.b, L.op(L.b, "arith.eq", L.op(L.b, "arith.mul", n, L.idx(th * tw)), tiles),
                f"winograd_output: the tiles are not a whole number of images of {th} x {tw} tiles")
    image = L.alloc(TensorType((t.shape[0], m * th, m * tw, t.shape[1]), t.element), [n, L.idx(m * th), L.idx(m * tw), o],
                    "channels_last")

    def tile(b, ivs):
        ty, bn, tx, ch = ivs
        at = _tile_index(L, b, bn, ty, tx, th, tw)
        products = [[b.create("mem.load", [p, at, L.idx(i * a + j), ch]).result for j in range(a)] for i in range(a)]
        y = _sandwich(L, b, at_, products, at_, t.element)
        top, left = L.op(b, "arith.mul", ty, L.idx(m)), L.op(b, "arith.mul", tx, L.idx(m))
        for i in range(m):
            for j in range(m):
                b.create("mem.store", [y[i][j], image, bn, L.op(b, "arith.add", top, L.idx(i)), L.op(b, "arith.add", left, L.idx(j)), ch])
    L.nest([L.idx(th), n, L.idx(tw), o], tile, [True, False, False, False])
    out = L.alloc(t, [n, o, L.idx(h), L.idx(w)], op.results[0].name_hint)

    def copy(b, ivs):
        ch, bn, y, x = ivs
        value = b.create("mem.load", [image, bn, y, x, ch]).result
        b.create("mem.store", [epilogue(b, value, [bn, ch, y, x]) if epilogue else value, out, bn, ch, y, x])
    L.nest([o, n, L.idx(h), L.idx(w)], copy, [True, False, False, False])
    return [out]


def _tile_index(L, b, bn, ty, tx, th, tw):
    """(n * TH + ty) * TW + tx: the tile's row of the product."""
    return L.op(b, "arith.add", L.op(b, "arith.mul", L.op(b, "arith.add", L.op(b, "arith.mul", bn, L.idx(th)), ty), L.idx(tw)), tx)
