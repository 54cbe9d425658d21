"""widen-half: an op that sums f16/bf16 values runs in f32 and is rounded once at the end, as the
interpreter (and PyTorch's CPU kernels) do.

    %y = mlc.matmul %a, %b : (tensor<4x8xf16>, tensor<8x2xf16>) -> tensor<4x2xf16>
becomes
    %a32 = mlc.cast %a : (tensor<4x8xf16>) -> tensor<4x8xf32>
    %b32 = mlc.cast %b : ...
    %y32 = mlc.matmul %a32, %b32 : (...) -> tensor<4x2xf32>
    %y = mlc.cast %y32 : (tensor<4x2xf32>) -> tensor<4x2xf16>

Elementwise ops need no widening: the code generators compute each half element in f32 already.
With `tensor-cores=1` (the cuda pipeline) f16/bf16 products and convolutions stay in half: tensor
cores multiply half values exactly and sum them in f32, which is what the widened op means.
"""
from __future__ import annotations

from mlc.ir.core import Builder, Module
from mlc.ir.types import TensorType, f32

from .manager import Pass

ACCUMULATING = {"mlc.matmul", "mlc.conv2d", "mlc.conv2d_transpose", "mlc.reduce_sum", "mlc.reduce_mean", "mlc.reduce_prod",
                "mlc.softmax", "mlc.log_softmax", "mlc.cross_entropy", "mlc.avg_pool2d"}
HALF = ("f16", "bf16")


class WidenHalf(Pass):
    name = "widen-half"
    summary = "run ops that accumulate f16/bf16 values in f32, rounding their results once"
    options = {"tensor-cores": 0}

    def run(self, module: Module) -> None:
        keep = {"mlc.matmul", "mlc.conv2d"} if self.option("tensor-cores") else set()
        for f in module.functions.values():
            for op in [o for o in f.body.walk() if o.name in ACCUMULATING and _half(o.operands[0].type)
                       and not (o.name in keep and len({v.type.element for v in o.operands}) == 1)]:
                b = Builder.before(op, module)
                b.loc = op.loc
                wide = [b.create("mlc.cast", [v], result_types=[TensorType(v.type.shape, f32)]).result if _half(v.type) else v
                        for v in op.operands]
                results = b.create(op.name, wide, dict(op.attributes)).results
                op.replace_with([b.create("mlc.cast", [r], result_types=[o.type], name_hint=o.name_hint).result
                                 for r, o in zip(results, op.results)])


def _half(t) -> bool:
    return t.element.name in HALF
