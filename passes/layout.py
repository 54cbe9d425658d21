"""layout: how tensors are stored, decided at the tensor level, where every choice prints and runs
on the interpreter.

Transposes into products: a 2-d transpose whose every use is an operand of a 2-d floating-point
matmul is not computed; each such matmul reads the transpose's source in place, marked
`transpose_a` or `transpose_b` (a matmul already so marked reads it straight, and loses the mark):

    %wt = mlc.transpose %w {perm = [1, 0]} : (tensor<32x64xf32>) -> tensor<64x32xf32>
    %y = mlc.matmul %x, %wt : (tensor<?x64xf32>, tensor<64x32xf32>) -> tensor<?x32xf32>
becomes
    %y = mlc.matmul %x, %w {transpose_b} : (tensor<?x64xf32>, tensor<32x64xf32>) -> tensor<?x32xf32>

A transpose with any other use is left to be computed once, and the products read the copy (their
kernel packs contiguous rows faster than it gathers columns).
"""
from __future__ import annotations

from mlc.ir.attributes import UNIT
from mlc.ir.core import Module, Operation

from .manager import Pass

FLAGS = ("transpose_a", "transpose_b")


class Layout(Pass):
    name = "layout"
    summary = "absorb 2-d transposes into the matmuls that read them (transpose_a / transpose_b)"

    def run(self, module: Module) -> None:
        for f in module.functions.values():
            for transpose in [o for o in f.body.walk() if o.name == "mlc.transpose" and _only_feeds_products(o)]:
                source = transpose.operands[0]
                for user, index in list(transpose.results[0].uses):
                    user.set_operand(index, source)
                    _toggle(user, FLAGS[index])
                transpose.erase()


def _only_feeds_products(op: Operation) -> bool:
    uses = op.results[0].uses
    return list(op.attr("perm")) == [1, 0] and op.operands[0].type.element.name in ("f32", "f64") and bool(uses) and \
        all(user.name == "mlc.matmul" and all(v.type.rank == 2 for v in user.operands) for user, _ in uses)


def _toggle(op: Operation, flag: str) -> None:
    if op.attr(flag):
        del op.attributes[flag]
    else:
        op.attributes[flag] = UNIT
