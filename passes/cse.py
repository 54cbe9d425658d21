"""cse: merge pure, region-free ops that compute the same thing from the same operands. Scoped by
region: an op inside a scan body may reuse an equal op computed before the scan, not the reverse."""
from __future__ import annotations

from collections import ChainMap

from mlc.ir.core import Block, Module
from mlc.ir.registry import COMMUTATIVE, HAS_REGION, PURE

from .manager import Pass


def _key(op):
    operands = tuple(id(v) for v in op.operands)
    if COMMUTATIVE in op.opdef.traits:
        operands = tuple(sorted(operands))
    try:
        return (op.name, operands, tuple(op.result_types), tuple(sorted(op.attributes.items())))
    except TypeError:
        return None


def eliminate_common_subexpressions(block: Block, seen: ChainMap) -> int:
    merged = 0
    for op in block.ops:
        d = op.opdef
        if d is not None and PURE in d.traits and HAS_REGION not in d.traits and op.results:
            key = _key(op)
            if key is not None:
                earlier = seen.get(key)
                if earlier is not None:
                    op.replace_with(earlier.results)
                    merged += 1
                    continue
                seen[key] = op
        for region in op.regions:
            for b in region.blocks:
                merged += eliminate_common_subexpressions(b, seen.new_child())
    return merged


class CommonSubexpressionElimination(Pass):
    name = "cse"
    summary = "merge identical pure computations"

    def run(self, module: Module) -> None:
        for f in module.functions.values():
            eliminate_common_subexpressions(f.body, ChainMap())
