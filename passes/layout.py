"""layout: how tensors are stored, decided at the tensor level, where every choice prints and runs
on the interpreter.

Transposes into products: a transpose whose every use is an operand of a floating-point matmul of
its rank is not computed where each such matmul can read the transpose's source in place instead:
stored transposed (`transpose_a`/`transpose_b`: the last two dims swapped, a weight or attention's
keys), interleaved (`interleaved_a`/`interleaved_b`: a [batch, tokens, heads, features] projection
read as [batch, heads, tokens, features]), or both; the marks compose with those the matmul has:

    %wt = mlc.transpose %w {perm = [1, 0]} : (tensor<32x64xf32>) -> tensor<64x32xf32>
    %y = mlc.matmul %x, %wt : (tensor<?x64xf32>, tensor<64x32xf32>) -> tensor<?x32xf32>
becomes
    %y = mlc.matmul %x, %w {transpose_b} : (tensor<?x64xf32>, tensor<32x64xf32>) -> tensor<?x32xf32>

Likewise a product whose one use is a transpose of its last batch dim with its rows (attention's
heads merged back) writes its result interleaved (`interleaved_c`) in place of the transpose. A
transpose with any other use is left to be computed once, and the products read the copy (their
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
from mlc.ir.dialects.mlc import Matmul

from .builder import OpBuilder
from .canonicalize import Canonicalize
from .fuse import elementwise
from .manager import Pass, PipelineError



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
            for transpose in [o for o in f.body.walk() if o.name == "mlc.transpose"]:
                _into_products(transpose)
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
    if op.name != "mlc.matmul" or op.attr("transpose_a") or any(Matmul.interleaved(op)):
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
        (rows, op.results[0].type.shape[-1])), **{k: v for k, v in op.attributes.items() if k in Matmul.MARKS})
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


def _into_products(transpose: Operation) -> None:
    """The transpose read in place by the matmuls it feeds, or written in place by the one that feeds it."""
    source, perm, r = transpose.operands[0], list(transpose.attr("perm")), transpose.operands[0].type.rank
    if source.type.element.name not in ("f32", "f64"):
        return
    uses = list(transpose.results[0].uses)
    marks = [_marks_reading(user, index, perm) for user, index in uses]
    if uses and None not in marks:
        for (user, index), (t, i) in zip(uses, marks):
            user.set_operand(index, source)
            _mark(user, "transpose_" + "ab"[index], t)
            _mark(user, "interleaved_" + "ab"[index], i)
        transpose.erase()
        return
    product = source.defining_op()
    if product is not None and product.name == "mlc.matmul" and len(source.uses) == 1 and r >= 3 and \
            perm == _reading(r, False, True) and not product.attr("interleaved_c"):
        _mark(product, "interleaved_c", True)
        product.results[0].type = transpose.results[0].type
        transpose.results[0].replace_all_uses_with(product.results[0])
        transpose.erase()


def _reading(r: int, transposed: bool, interleaved: bool) -> list:
    """p such that a matmul operand of rank r with these marks is read as transpose(stored, p): the
    interleaving undone (the two dims before the last swapped), then the transposition (the last two)."""
    inner, outer = list(range(r)), list(range(r))
    if interleaved:
        outer[r - 3], outer[r - 2] = r - 2, r - 3
    if transposed:
        inner[r - 2], inner[r - 1] = r - 1, r - 2
    return [outer[x] for x in inner]


def _marks_reading(user: Operation, index: int, perm: list) -> tuple[bool, bool] | None:
    """(transposed, interleaved): the marks that make operand `index` of matmul `user`, now read through
    its own marks, read the source of a transpose by `perm` in place; None if none do."""
    r = len(perm)
    if user.name != "mlc.matmul" or any(v.type.rank != r for v in user.operands):
        return None
    now = _reading(r, bool(user.attr("transpose_" + "ab"[index])), bool(user.attr("interleaved_" + "ab"[index])))
    wanted = [perm[x] for x in now]
    return next(((t, i) for t in (False, True) for i in (False, True) if r >= 2 + i and _reading(r, t, i) == wanted), None)


def _mark(op: Operation, flag: str, on: bool) -> None:
    """Sets or clears a matmul's mark (the marks kept in one order, as they print)."""
    marks = {m for m in Matmul.MARKS if op.attr(m)}
    marks = marks | {flag} if on else marks - {flag}
    op.attributes = {**{k: v for k, v in op.attributes.items() if k not in Matmul.MARKS}, **{m: UNIT for m in Matmul.MARKS if m in marks}}
