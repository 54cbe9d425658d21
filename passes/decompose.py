"""decompose: replace each op that declares a `decompose` rule (mlc.batch_norm, mlc.dropout) by the
simpler ops it is made of, so later passes and the backends see only those."""
from __future__ import annotations

from mlc.ir.core import Builder, Module

from .builder import OpBuilder
from .manager import Pass


def decompose_ops(module: Module, ops) -> None:
    for op in ops:
        b = Builder.before(op, module)
        b.loc = op.loc
        op.replace_with(op.opdef.decompose(OpBuilder(b), op))


def decomposable(op) -> bool:
    return op.opdef is not None and op.opdef.decompose is not None


class Decompose(Pass):
    name = "decompose"
    summary = "rewrite batch_norm, dropout and other composite ops into simpler ops"

    def run(self, module: Module) -> None:
        for f in module.functions.values():
            decompose_ops(module, [op for op in f.body.walk() if decomposable(op)])
