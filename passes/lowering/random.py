"""Random numbers: the counter-based Philox generator of ir/random.py, computed per element."""
from __future__ import annotations

import numpy as np

from mlc.ir.core import Operation
from mlc.ir.types import f64, i64

from .core import FunctionLowering, rule


PHILOX_M = (0xD2511F53, 0xCD9E8D57)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)


def _philox_words(L, b, block, seed, offset):
    """The four 32-bit words of Philox-4x32-10 (ir/random.py) for counter block `block`, in i64 arithmetic."""
    c = lambda v: L.const(b, v, i64)  # noqa: E731
    op = lambda name, *xs: L.op(b, name, *xs)  # noqa: E731
    low, shift = c(0xFFFFFFFF), c(32)
    c0, c1 = op("arith.and", block, low), op("arith.shru", block, shift)
    c2, c3 = op("arith.and", offset, low), op("arith.shru", offset, shift)
    k0, k1 = op("arith.and", seed, low), op("arith.shru", seed, shift)
    for r in range(10):
        p0, p1 = op("arith.mul", c(PHILOX_M[0]), c0), op("arith.mul", c(PHILOX_M[1]), c2)
        hi0, lo0 = op("arith.shru", p0, shift), op("arith.and", p0, low)
        hi1, lo1 = op("arith.shru", p1, shift), op("arith.and", p1, low)
        c0, c1, c2, c3 = op("arith.xor", op("arith.xor", hi1, c1), k0), lo1, op("arith.xor", op("arith.xor", hi0, c3), k1), lo0
        if r < 9:
            k0 = op("arith.and", op("arith.add", k0, c(PHILOX_W[0])), low)
            k1 = op("arith.and", op("arith.add", k1, c(PHILOX_W[1])), low)
    return [c0, c1, c2, c3]


@rule("mlc.random_uniform", "mlc.random_normal")
def random(L: FunctionLowering, op: Operation):
    """Per element i: the Philox words of block i // 4 (ir/random.py defines the bits), computed in f64
    as the interpreter does, then rounded to the element type."""
    key = L.buffers[op.operands[0]]
    t = op.results[0].type
    sizes = L.dims(L.buffers[op.operands[1]]) if len(op.operands) == 2 else [L.idx(d) for d in t.shape]
    out = L.alloc(t, sizes, op.results[0].name_hint)
    seed = L.b.create("mem.load", [key, L.idx(0)]).result
    offset = L.b.create("mem.load", [key, L.idx(1)]).result
    uniform = op.name == "mlc.random_uniform"

    def word_at(b, words, lane):
        w = words[3]
        for k in (2, 1, 0):
            w = L.op(b, "arith.select", L.op(b, "arith.eq", lane, L.const(b, k, i64)), words[k], w)
        return w

    def unit(b, w, plus_one):
        bits = L.op(b, "arith.shru", w, L.const(b, 8, i64))
        if plus_one:
            bits = L.op(b, "arith.add", bits, L.const(b, 1, i64))
        return L.op(b, "arith.mul", b.create("arith.cast", [bits], result_types=[f64]).result, L.const(b, 2.0 ** -24, f64))

    def body(b, ivs):
        flat = L.idx(0)
        for iv, s in zip(ivs, sizes):
            flat = L.op(b, "arith.add", L.op(b, "arith.mul", flat, s), iv)
        i = b.create("arith.cast", [flat], result_types=[i64]).result
        four = L.const(b, 4, i64)
        block = L.op(b, "arith.div", i, four)
        lane = L.op(b, "arith.sub", i, L.op(b, "arith.mul", block, four))
        words = _philox_words(L, b, block, seed, offset)
        if uniform:
            lo, hi = op.attr("low"), op.attr("high")
            v = L.op(b, "arith.add", L.const(b, lo, f64), L.op(b, "arith.mul", L.const(b, hi - lo, f64), unit(b, word_at(b, words, lane), False)))
        else:
            second = L.op(b, "arith.ge", lane, L.const(b, 2, i64))
            u1 = unit(b, L.op(b, "arith.select", second, words[2], words[0]), True)
            u2 = unit(b, L.op(b, "arith.select", second, words[3], words[1]), False)
            r = L.op(b, "arith.sqrt", L.op(b, "arith.mul", L.const(b, -2.0, f64), L.op(b, "arith.log", u1)))
            angle = L.op(b, "arith.mul", L.const(b, 2 * np.pi, f64), u2)
            odd = L.op(b, "arith.eq", L.op(b, "arith.sub", lane, L.op(b, "arith.mul", L.op(b, "arith.div", lane, L.const(b, 2, i64)), L.const(b, 2, i64))), L.const(b, 1, i64))
            z = L.op(b, "arith.mul", r, L.op(b, "arith.select", odd, L.op(b, "arith.sin", angle), L.op(b, "arith.cos", angle)))
            v = L.op(b, "arith.add", L.const(b, op.attr("mean"), f64), L.op(b, "arith.mul", L.const(b, op.attr("std"), f64), z))
        b.create("mem.store", [b.create("arith.cast", [v], result_types=[t.element]).result, out] + ivs)
    L.nest(sizes, body)
    return [out]
