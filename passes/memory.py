"""Memory analyses: the peak of a lowered function's buffers, and what a module cannot fit in a machine's memory."""
from __future__ import annotations

import math

import numpy as np

from mlc.ir.core import Module
from mlc.ir.diagnostics import UNKNOWN, Diagnostic, Sources, format_bytes
from mlc.ir.types import TensorType, i1, index


def peak_intermediate_bytes(func, dynamic_size: int = 1) -> int:
    """The most bytes held at once by buffers a lowered function allocates at its top level (and in the
    branch of a loop.if its sizes take), walking allocations and deallocations in order (the `?` dims of
    arguments counted as `dynamic_size`, sizes computed from them evaluated; returned buffers count
    until the end)."""
    live = peak = 0
    sizes, known = {}, {}

    def walk(ops):
        nonlocal live, peak
        for op in ops:
            if op.name == "mem.dim":
                known[op.results[0]] = op.operand_types[0].shape[op.attr("axis")] or dynamic_size
            elif op.name.startswith("arith.") and op.results and op.results[0].type in (index, i1) \
                    and all(v in known for v in op.operands):
                known[op.results[0]] = int(op.opdef.interpret([np.int64(known[v]) for v in op.operands], op, None))
            elif op.name == "loop.if" and op.operands[0] in known:
                walk(op.regions[0 if known[op.operands[0]] else 1].blocks[0])
            elif op.name == "mem.alloc":
                t = op.results[0].type
                dynamic = iter(known.get(v, dynamic_size) for v in op.operands)
                count = int(np.prod([next(dynamic) if d is None else d for d in t.shape], dtype=np.int64))
                sizes[op.results[0]] = count * t.element.np_dtype.itemsize
                live += sizes[op.results[0]]
                peak = max(peak, live)
            elif op.name == "mem.dealloc":
                live -= sizes.pop(op.operands[0], 0)
    walk(func.body)
    return peak


def memory_warnings(module: Module, memory_bytes: int) -> list[Diagnostic]:
    """Warnings for what cannot fit in `memory_bytes` (the machine's, which the caller knows: no pass
    asks the host): a global, the globals together, or a statically shaped value a function makes."""
    out = []

    def warn(loc, prefix, what, nbytes):
        message = f"{prefix}{what} takes {format_bytes(nbytes)}, more than the {format_bytes(memory_bytes)} of memory here"
        out.append(Diagnostic(loc or UNKNOWN, message, "warning", Sources.line(loc or UNKNOWN)))
    sizes = {name: _bytes(op.attr("type")) for name, op in module.globals.items()}
    for name, op in module.globals.items():
        if sizes[name] > memory_bytes:
            warn(op.loc, "'mlc.global': ", f"@{name}", sizes[name])
    if sum(sizes.values()) > memory_bytes and all(n <= memory_bytes for n in sizes.values()):
        warn(module.loc, "", "the globals together", sum(sizes.values()))
    for f in module.functions.values():
        for op in f.body.walk():
            for r in op.results:
                if isinstance(r.type, TensorType) and r.type.is_static and _bytes(r.type) > memory_bytes:
                    what = f"its result %{r.name_hint}" if r.name_hint else "its result"
                    warn(op.loc, f"'{op.name}': ", what, _bytes(r.type))
    return out


def _bytes(t: TensorType) -> int:
    return math.prod(t.shape) * t.element.np_dtype.itemsize
