"""lower-to-loops: tensor ops become loop nests over buffers (the `mem`, `loop` and `arith` dialects).

The driver and its helpers are in passes/lowering/core.py, the rules in passes/lowering/, one module
per family of ops. What the passes around it decide, it follows or leaves to them: widen-half has
made sums of f16/bf16 values f32, bufferize has said which results are written in place; products
and stride-1 convolutions become mem.matmul / mem.conv2d for tile, and buffer-dealloc frees buffers.
"""
from __future__ import annotations

from mlc.ir.core import Module

from .lowering import FunctionLowering
from .lowering import collectives, conv, elementwise, fusion, matmul, pool, random, rows, scan, shape, winograd  # noqa: F401  (each registers its rules)
from .manager import Pass


class LowerToLoops(Pass):
    name = "lower-to-loops"
    summary = "lower tensor ops to loop nests over buffers"

    def run(self, module: Module) -> None:
        for f in list(module.functions.values()):
            FunctionLowering(module, f).run()
