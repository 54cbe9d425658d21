"""lower-to-loops: tensor ops become loop nests over buffers (the `mem`, `loop` and `arith` dialects).

The driver and its helpers are in passes/lowering/core.py, the rules in passes/lowering/, one module
per family of ops. Ops that accumulate f16/bf16 values are lowered as they are: widen-half, which the
cpu pipeline runs first, makes them f32.
"""
from __future__ import annotations

from mlc.ir.core import Module

from .lowering import FunctionLowering
from .lowering import conv, elementwise, fusion, matmul, pool, random, rows, scan, shape  # noqa: F401  (each registers its rules)
from .manager import Pass


class LowerToLoops(Pass):
    name = "lower-to-loops"
    summary = "lower tensor ops to loop nests over buffers"

    def run(self, module: Module) -> None:
        for f in list(module.functions.values()):
            FunctionLowering(module, f).run()
