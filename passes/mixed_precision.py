"""mixed-precision{type=bf16}: products and convolutions of f32 values run on half-precision copies of
their operands (as torch.autocast does), their sums still in f32 (widen-half, tensor cores) and
rounded once to half; the result goes back to f32, so everything else, the weights and the
optimiser's state stay f32.

    %y = mlc.matmul %x, %w : (tensor<?x64xf32>, tensor<64x32xf32>) -> tensor<?x32xf32>
becomes
    %xh = mlc.cast %x : (tensor<?x64xf32>) -> tensor<?x64xbf16>
    %wh = mlc.cast %w : (tensor<64x32xf32>) -> tensor<64x32xbf16>
    %yh = mlc.matmul %xh, %wh : (tensor<?x64xbf16>, tensor<64x32xbf16>) -> tensor<?x32xbf16>
    %y = mlc.cast %yh : (tensor<?x32xbf16>) -> tensor<?x32xf32>

Run after autodiff (the driver does: a training step's backward products are products too). bf16 keeps
f32's range; f16 has no loss scaling here, so small gradients may flush to zero.
"""
from __future__ import annotations

from mlc.ir.core import Builder, Module
from mlc.ir.types import TensorType, bf16, f16

from .manager import Pass, PipelineError

HALF_PRECISION_OPS = ("mlc.matmul", "mlc.conv2d", "mlc.conv2d_transpose")


class MixedPrecision(Pass):
    name = "mixed-precision"
    summary = "products and convolutions of f32 values on bf16 (or f16) copies of their operands"
    options = {"type": "bf16"}

    def __init__(self, **options):
        super().__init__(**options)
        if self.option("type") not in ("bf16", "f16"):
            raise PipelineError(f"mixed-precision takes type=bf16 or type=f16, got {self}")

    def run(self, module: Module) -> None:
        half = {"bf16": bf16, "f16": f16}[self.option("type")]
        for f in module.functions.values():
            for op in [o for o in f.body.walk() if o.name in HALF_PRECISION_OPS
                       and all(v.type.element.name == "f32" for v in o.operands)]:
                b = Builder.before(op, module)
                b.loc = op.loc
                narrow = [b.create("mlc.cast", [v], result_types=[TensorType(v.type.shape, half)]).result for v in op.operands]
                result = op.results[0]
                product = b.create(op.name, narrow, dict(op.attributes),
                                   result_types=[TensorType(result.type.shape, half)]).result
                op.replace_with([b.create("mlc.cast", [product], result_types=[result.type], name_hint=result.name_hint).result])
