"""winograd: a 3 x 3 convolution with stride 1 becomes Winograd's F(m x m, 3 x 3): its filters and its input
tiles transformed, one batched product over the a x a positions of a tile (a = m + 2), the products
transformed back. With m = 4 the product does 36 multiplies for 16 outputs where the convolution
does 144 (ResNet's 56 x 56 and 28 x 28 convolutions spend most of their time there):

    %y = mlc.conv2d %x, %w {padding = [1, 1]} : (tensor<1x64x56x56xf32>, tensor<64x64x3x3xf32>) -> tensor<1x64x56x56xf32>
becomes
    %u = mlc.winograd_filter %w {m = 4} : (tensor<64x64x3x3xf32>) -> tensor<64x36x64xf32>
    %v = mlc.winograd_input %x {m = 4, padding = [1, 1]} : (tensor<1x64x56x56xf32>) -> tensor<196x36x64xf32>
    %p = mlc.matmul %v, %u {transpose_b, interleaved_a, interleaved_b, interleaved_c} : (tensor<196x36x64xf32>, tensor<64x36x64xf32>) -> tensor<196x36x64xf32>
    %y = mlc.winograd_output %p {m = 4, size = [56, 56]} : (tensor<196x36x64xf32>) -> tensor<1x64x56x56xf32>

The product's rows are the tiles and its columns the output channels: the transforms run along the
channels (contiguous), and a small image's 49 tiles fill 12-row micro-tiles better than 32-wide panels.
The operands and the result are stored with the positions second (`interleaved`: the product reads
each position's rows 36 apart): a tile's, or a filter's, values together.

It applies where the channels fill a product's rows and depth (`min-channels`) and a result image has
at least `min-tiles` tiles (the product's rows per image), with the largest m up to `output-tile`
that has so many: F(4, 3) for ResNet's 56 x 56 and 28 x 28 images, F(2, 3) for its 14 x 14 ones, none
for 7 x 7. The filters are transformed at every call (a^2 / 9 times the weights' size, written and
read once), which fewer tiles do not repay. F(4, 3) rounds differently from the direct sum (its
transforms multiply by up to 8 and divide by 24): errors of a few float32 ulps of the inputs'
magnitude. `output-tile=0` leaves every convolution as it is (the cuda pipeline).
"""
from __future__ import annotations

from mlc.ir.attributes import UNIT, SymbolRefAttr
from mlc.ir.core import Builder, Module
from mlc.ir.dialects.mlc import WINOGRAD_TILES, Global, winograd_tiles

from . import gemm
from .builder import OpBuilder
from .effects import derived_global, read_only_globals
from .manager import Pass, PipelineError


class Winograd(Pass):
    name = "winograd"
    summary = "3 x 3 stride-1 convolutions as Winograd F(m x m, 3 x 3): transforms around one batched product"
    options = {"output-tile": 4, "min-tiles": 32, "min-channels": 32, "transformed-globals": 1}

    def __init__(self, **options):
        super().__init__(**options)
        if self.option("output-tile") not in (0, *WINOGRAD_TILES):
            raise PipelineError(f"winograd's output-tile must be 0 (off) or one of {list(WINOGRAD_TILES)}, got {self}")

    def run(self, module: Module) -> None:
        read_only = read_only_globals(module) if self.option("transformed-globals") else set()
        for f in module.functions.values():
            for op in [o for o in f.body.walk() if o.name == "mlc.conv2d"]:
                m = self.output_tile(op)
                if not m:
                    continue
                b = Builder.before(op, module)
                b.loc = op.loc
                d = OpBuilder(b)
                x, w = op.operands
                _, pads, _, _ = op.opdef.params(op)
                y = op.results[0].type
                u = self.transformed_global(module, d, w, m, read_only) or d("mlc.winograd_filter", w, m=m)
                v = d("mlc.winograd_input", x, m=m, padding=list(pads))
                p = d("mlc.matmul", v, u, transpose_b=UNIT, interleaved_a=UNIT, interleaved_b=UNIT, interleaved_c=UNIT)
                op.replace_with([d("mlc.winograd_output", p, m=m, size=list(y.shape[2:]), result_type=y)])

    @staticmethod
    def transformed_global(module: Module, d: OpBuilder, w, m: int, read_only: set):
        """Where the filters are a global nothing writes: its transform, a global of its own declared
        (once) here, `init = "winograd"`, which the runtime computes whenever the filters are set."""
        loaded = w.defining_op()
        if loaded is None or loaded.name != "mlc.global_load" or loaded.attr("global") not in read_only:
            return None
        source = module.globals[loaded.attr("global")]
        t = Global.winograd_type(source.attr("type"), m)
        name = derived_global(module, source, "winograd", t, f".winograd{m}")
        return d("mlc.global_load", result_type=t, **{"global": SymbolRefAttr(name)})

    def output_tile(self, op) -> int:
        """The largest m up to `output-tile` whose tiles are at least `min-tiles` per image, or 0 where
        Winograd does not apply."""
        stride, _, dilation, groups = op.opdef.params(op)
        x, w = op.operands[0].type, op.operands[1].type
        if (stride, dilation, groups) != ((1, 1), (1, 1), 1) or w.shape[2:] != (3, 3) or not gemm.supports(x.element):
            return 0
        (o, c, _, _), (_, _, h, wd) = w.shape, op.results[0].type.shape
        if None in (o, c, h, wd, *x.shape[1:]) or min(o, c) < self.option("min-channels"):
            return 0
        return max((m for m in WINOGRAD_TILES if m <= self.option("output-tile")
                    and winograd_tiles(h, m) * winograd_tiles(wd, m) >= self.option("min-tiles")), default=0)

