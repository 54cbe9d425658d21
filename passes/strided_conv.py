"""strided-conv: a convolution with stride s becomes one with stride 1 over the input's s x s phases
("space to depth"), which the CPU backend's register-tiled direct convolution runs.

    out[y, x] = sum_{c,i,j} w[c, i, j] xp[c, s*y + i, s*x + j]            (xp: x padded)
    with i = s*i' + a, j = s*j' + b:
              = sum_{c,a,b,i',j'} w'[(c,a,b), i', j'] phase[(c,a,b), y + i', x + j']
    phase[(c,a,b), y, x] = xp[c, s*y + a, s*x + b]          (a reshape and a transpose of xp)
    w'[(c,a,b), i', j']  = w[c, s*i' + a, s*j' + b], zero past the kernel

A 1 x 1 kernel only needs the phase (0, 0): a strided slice of the input, then a 1 x 1 convolution.
It needs static spatial sizes and dilation 1; other convolutions are left as they are, and so are
those the CPU backend runs as products (small images: gemm.conv_as_gemm), which take any stride, and
those of stride 2 and a larger kernel, which the direct convolution runs as they are: the phases'
kernel has zero taps (a 7 x 7 kernel's phases are 4 x 4: 64 taps for 49) and the phases are a
transpose of the input, where the direct convolution reads every other element of a row's run
(ResNet's 7 x 7 stem: 1.73 -> 1.53 ms, and its input's 0.3 ms transpose gone).
"""
from __future__ import annotations

from mlc.ir.core import Builder, Module

from . import gemm
from .builder import OpBuilder
from .manager import Pass


class StridedConv(Pass):
    name = "strided-conv"
    summary = "rewrite strided convolutions as stride-1 convolutions over the input's phases"

    def run(self, module: Module) -> None:
        for f in module.functions.values():
            for op in [o for o in f.body.walk() if o.name == "mlc.conv2d" and _applies(o)]:
                b = Builder.before(op, module)
                b.loc = op.loc
                op.replace_with([_rewrite(OpBuilder(b), op)])


def _applies(op) -> bool:
    (sh, sw), _, dilation, groups = op.opdef.params(op)
    x, w = (v.type for v in op.operands)
    one_by_one = tuple(w.shape[2:]) == (1, 1)
    return (sh, sw) != (1, 1) and sh == sw and (one_by_one or sw > 2) and dilation == (1, 1) and None not in x.shape[1:] and \
        None not in w.shape and x.element.is_float and not gemm.conv_as_gemm(op.results[0].type.shape, groups, 1)


def _rewrite(d: OpBuilder, op):
    x, w = op.operands
    (s, _), (pt, pl, pb, pr), _, groups = op.opdef.params(op)
    n, c, h, wd = x.type.shape
    o, cg, kh, kw = w.type.shape
    out = op.results[0].type
    oh, ow = (h + pt + pb - kh) // s + 1, (wd + pl + pr - kw) // s + 1  # (the result type may say `?`)
    if (kh, kw) == (1, 1):  # only phase (0, 0) is read
        if pt or pl or pb or pr:
            x = d.pad(x, {2: (pt, pb), 3: (pl, pr)})
        x = d.slice(x, {2: (0, s * (oh - 1) + 1, s), 3: (0, s * (ow - 1) + 1, s)})
        return d("mlc.conv2d", x, w, result_type=out, **_groups(groups))
    kh2, kw2 = -(-kh // s), -(-kw // s)  # the phase kernel
    rows, cols = (oh + kh2 - 1) * s, (ow + kw2 - 1) * s  # padded input the phases need (a multiple of s)
    x = d.pad(x, {2: (pt, max(rows - h - pt, 0)), 3: (pl, max(cols - wd - pl, 0))})
    x = d.slice(x, {2: (0, rows, 1), 3: (0, cols, 1)})
    x = d.reshape(x, (n, c, rows // s, s, cols // s, s))
    x = d("mlc.transpose", x, perm=[0, 1, 3, 5, 2, 4])
    x = d.reshape(x, (n, c * s * s, rows // s, cols // s))
    w = d.pad(w, {2: (0, kh2 * s - kh), 3: (0, kw2 * s - kw)})
    w = d.reshape(w, (o, cg, kh2, s, kw2, s))
    w = d("mlc.transpose", w, perm=[0, 1, 3, 5, 2, 4])
    w = d.reshape(w, (o, cg * s * s, kh2, kw2))
    return d("mlc.conv2d", x, w, result_type=out, **_groups(groups))


def _groups(groups: int) -> dict:
    return {"groups": groups} if groups != 1 else {}
