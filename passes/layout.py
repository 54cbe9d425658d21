"""layout: how tensors are stored, decided at the tensor level, where every choice prints and runs
on the interpreter.

Transposes into products: a transpose of the last two dims (of a matrix, or of a stack of them: the
attention's keys) whose every use is an operand of a floating-point matmul of that rank is not
computed; each such matmul reads the transpose's source in place, marked `transpose_a` or
`transpose_b` (a matmul already so marked reads it straight, and loses the mark):

    %wt = mlc.transpose %w {perm = [1, 0]} : (tensor<32x64xf32>) -> tensor<64x32xf32>
    %y = mlc.matmul %x, %wt : (tensor<?x64xf32>, tensor<64x32xf32>) -> tensor<?x32xf32>
becomes
    %y = mlc.matmul %x, %w {transpose_b} : (tensor<?x64xf32>, tensor<32x64xf32>) -> tensor<?x32xf32>

A transpose with any other use is left to be computed once, and the products read the copy (their
kernel packs contiguous rows faster than it gathers columns).

Stacks of rows times one matrix: a matmul of A[..., M, K] (at most one `?`, not transposed) by a matrix B is one
product of A's rows, so B is packed once rather than once per matrix of the stack (an RNN's input
projection for all its steps, a Transformer's projections over batch x tokens). The reshape back moves
past the elementwise ops that follow (whose other operands broadcast along the last dim only: a bias),
so they still join the product as its epilogue:

    %y = mlc.matmul %x, %w : (tensor<4x8x16xf32>, tensor<16x32xf32>) -> tensor<4x8x32xf32>
    %z = mlc.add %y, %bias : (tensor<4x8x32xf32>, tensor<32xf32>) -> tensor<4x8x32xf32>
becomes
    %x2 = mlc.reshape %x : (tensor<4x8x16xf32>) -> tensor<32x16xf32>
    %y2 = mlc.matmul %x2, %w : (tensor<32x16xf32>, tensor<16x32xf32>) -> tensor<32x32xf32>
    %z2 = mlc.add %y2, %bias : (tensor<32x32xf32>, tensor<32xf32>) -> tensor<32x32xf32>
    %z = mlc.reshape %z2 : (tensor<32x32xf32>) -> tensor<4x8x32xf32>

Convolutions in channel blocks, with `conv-block=b` (off by default: the blocked kernel is not tuned
yet): a conv2d (groups 1, channels divisible by b) becomes mlc.conv2d_blocked on the input as
N x C/b x H x W x b and the weights as O/b x C/b x kh x kw x b x b, with conversions (a reshape and a
transpose each way) only at its boundaries; where one blocked convolution feeds another, the
conversion back and the conversion in cancel (canonicalize composes them away).
"""
from __future__ import annotations

import numpy as np

from mlc.ir.attributes import UNIT
from mlc.ir.core import Builder, Module, Operation

from .builder import OpBuilder
from .canonicalize import Canonicalize
from .fuse import elementwise
from .manager import Pass, PipelineError

FLAGS = ("transpose_a", "transpose_b")


class Layout(Pass):
    name = "layout"
    summary = ("one product for a stack of rows times a matrix; absorb transposes of the last two dims into the matmuls that read them; "
               "convolutions in channel blocks (conv-block)")
    options = {"conv-block": 0}

    def __init__(self, **options):
        super().__init__(**options)
        if self.option("conv-block") < 0:
            raise PipelineError(f"layout's conv-block is a number of channels (0: off), got {self.option('conv-block')}")

    def run(self, module: Module) -> None:
        for f in module.functions.values():
            for product in [o for o in f.body.walk() if _stacked_rows_times_matrix(o)]:
                _one_product(product)
            for transpose in [o for o in f.body.walk() if o.name == "mlc.transpose" and _only_feeds_products(o)]:
                source = transpose.operands[0]
                for user, index in list(transpose.results[0].uses):
                    user.set_operand(index, source)
                    _toggle(user, FLAGS[index])
                transpose.erase()
        block = self.option("conv-block")
        convs = [o for f in module.functions.values() for o in f.body.walk() if o.name == "mlc.conv2d" and _blockable(o, block)]
        for conv in convs:
            b = Builder.before(conv, module)
            b.loc = conv.loc
            conv.replace_with([_blocked_conv(OpBuilder(b), conv, block)])
        if convs:
            Canonicalize().run(module)  # conversions back to back cancel


def _blockable(op: Operation, block: int) -> bool:
    x, w = (v.type for v in op.operands)
    return block > 0 and op.opdef.params(op)[3] == 1 and x.element.name in ("f32", "f64") and \
        None not in x.shape[1:] + op.results[0].type.shape[1:] and x.shape[1] % block == 0 and w.shape[0] % block == 0


def _blocked_conv(d: OpBuilder, op: Operation, b: int):
    x, w = op.operands
    n, c, h, wd = x.type.shape
    o, _, kh, kw = w.type.shape
    xb = d("mlc.transpose", d.reshape(x, (n, c // b, b, h, wd)), perm=[0, 1, 3, 4, 2])
    wb = d("mlc.transpose", d.reshape(w, (o // b, b, c // b, b, kh, kw)), perm=[0, 2, 4, 5, 3, 1])
    attrs = {k: op.attributes[k] for k in ("stride", "padding", "dilation") if k in op.attributes}
    yb = d("mlc.conv2d_blocked", xb, wb, **attrs)
    return d.reshape(d("mlc.transpose", yb, perm=[0, 1, 4, 2, 3]), op.results[0].type.shape)


def _stacked_rows_times_matrix(op: Operation) -> bool:
    if op.name != "mlc.matmul" or op.attr("transpose_a"):
        return False
    a, b = (v.type for v in op.operands)
    return a.rank > 2 and b.rank == 2 and a.element.name in ("f32", "f64") \
        and a.shape.count(None) <= 1 and op.results[0].type.shape.count(None) <= 1  # (a reshape infers one `?`)


def _one_product(op: Operation) -> None:
    """op (A[..., M, K] @ B) as a product of A's rows, with the elementwise chain after it on the rows."""
    d = OpBuilder(Builder.before(op))
    d.b.loc = op.loc
    a, b = op.operands
    rows = None if None in a.type.shape[:-1] else int(np.prod(a.type.shape[:-1]))
    value = d("mlc.matmul", d.reshape(a, (rows, a.type.shape[-1])), b, result_type=op.results[0].type.with_shape(
        (rows, op.results[0].type.shape[-1])), **{k: v for k, v in op.attributes.items() if k in FLAGS})
    chain = [op]
    while (len(chain[-1].results[0].uses) == 1 and _on_rows(next(iter(chain[-1].results[0].uses))[0], chain[-1])):
        user, index = next(iter(chain[-1].results[0].uses))
        operands = [value if i == index else v for i, v in enumerate(user.operands)]
        d = OpBuilder(Builder.before(user))
        d.b.loc = user.loc
        value = d(user.name, *operands, result_type=user.results[0].type.with_shape(value.type.shape), **user.attributes)
        chain.append(user)
    last = chain[-1]
    last.results[0].replace_all_uses_with(OpBuilder(Builder.before(last)).reshape(value, last.results[0].type.shape))
    for o in reversed(chain):
        o.erase()


def _on_rows(user: Operation, producer: Operation) -> bool:
    """user, an elementwise op of producer's result, computes the same on the stacked rows: its result
    has that shape and its other operands broadcast along the last dim at most."""
    shape = producer.results[0].type.shape
    return (elementwise(user) and user.parent is producer.parent and len(user.results) == 1
            and user.results[0].type.shape == shape
            and all(v is producer.results[0] or v.type.rank <= 1 for v in user.operands))


def _only_feeds_products(op: Operation) -> bool:
    """A transpose of the last two dims (a matrix, or a stack of them) whose every use is an operand of a
    matmul of that rank (whose batch dims then line up as the source's)."""
    uses, r = op.results[0].uses, op.operands[0].type.rank
    return r >= 2 and list(op.attr("perm")) == [*range(r - 2), r - 1, r - 2] and op.operands[0].type.element.name in ("f32", "f64") \
        and bool(uses) and all(user.name == "mlc.matmul" and all(v.type.rank == r for v in user.operands) for user, _ in uses)


def _toggle(op: Operation, flag: str) -> None:
    if op.attr(flag):
        del op.attributes[flag]
    else:
        op.attributes[flag] = UNIT
