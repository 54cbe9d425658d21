"""Analyses of loop-level IR (what lower-to-loops makes)."""
from __future__ import annotations

import numpy as np

from mlc.ir.types import i1, index


def peak_intermediate_bytes(func, dynamic_size: int = 1) -> int:
    """The most bytes held at once by buffers a lowered function allocates at its top level, walking
    allocations and deallocations in order (the `?` dims of arguments counted as `dynamic_size`, sizes
    computed from them evaluated; returned buffers count until the end)."""
    live = peak = 0
    sizes, known = {}, {}
    for op in func.body:
        if op.name == "mem.dim":
            known[op.results[0]] = op.operand_types[0].shape[op.attr("axis")] or dynamic_size
        elif op.name.startswith("arith.") and op.results and op.results[0].type in (index, i1) \
                and all(v in known for v in op.operands):
            known[op.results[0]] = int(op.opdef.interpret([np.int64(known[v]) for v in op.operands], op, None))
        elif op.name == "mem.alloc":
            t = op.results[0].type
            dynamic = iter(known.get(v, dynamic_size) for v in op.operands)
            count = int(np.prod([next(dynamic) if d is None else d for d in t.shape], dtype=np.int64))
            sizes[op.results[0]] = count * t.element.np_dtype.itemsize
            live += sizes[op.results[0]]
            peak = max(peak, live)
        elif op.name == "mem.dealloc":
            live -= sizes.pop(op.operands[0], 0)
    return peak
