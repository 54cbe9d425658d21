"""mlc.fusion, a kernel made by the fuse pass: one elementwise loop nest, a row kernel, or an anchor
(matmul, conv2d) whose rule applies the fused consumers as an epilogue."""
from __future__ import annotations

from mlc.ir.core import Operation

from ..fuse import ANCHORS, ROW_REDUCTIONS
from .core import RULES, FunctionLowering, rule
from .elementwise import elementwise, leaves_of, scalar
from .rows import row_kernel


@rule("mlc.fusion")
def fusion(L: FunctionLowering, op: Operation):
    """A kernel made by the fuse pass: one loop nest computing the root from the region's ops."""
    block = op.regions[0].blocks[0]
    for arg, v in zip(block.args, op.operands):
        L.buffers[arg] = L.buffers[v]
    root = block.last.operands[0].defining_op()
    anchor = next((o for o in block if o.name in ANCHORS), None)
    L.fused.update(o for o in block if o is not root and o is not block.last and o is not anchor)
    if any(o.name in ROW_REDUCTIONS for o in block):
        return row_kernel(L, [o for o in block if o is not block.last], [v.defining_op() for v in block.last.operands[1:]])
    if anchor is None:
        return elementwise(L, root, [v.defining_op() for v in block.last.operands[1:]])
    # The anchor's rule applies epilogue(b, product, indices) -> the kernel's element, in IR.
    leaves = leaves_of(L, root)
    readers = {v: L.broadcast_reader(L.buffers[v], root.results[0].type.rank) for v in leaves if v is not anchor.results[0]}

    def epilogue(b, product, ivs):
        def value(v):
            if v is anchor.results[0]:
                return product
            p = v.defining_op()
            if p is root or p in L.fused:
                return scalar(L, b, p, [value(o) for o in p.operands])
            return b.create("mem.load", [L.buffers[v]] + readers[v](b, ivs)).result
        return value(root.results[0])

    return RULES[anchor.name](L, anchor, epilogue=epilogue)  # the anchor rules take an epilogue
