"""lower-to-loops: tensor ops become loop nests over buffers (the `mem`, `loop` and `arith` dialects).

Each tensor value gets a buffer; an op's rule allocates its result buffer and fills it with a loop
nest of scalar `arith` ops. Function signatures stay tensors: arguments are copied into buffers at
entry (`mem.from_tensor`) and results read back at exit (`mem.to_tensor`), so a lowered module runs on
the interpreter with the same inputs as the original — which is how it is tested. Calls and globals
cross the boundary the same way. An op without a rule is an error naming it, never skipped.

Broadcasting: a result dim that is `?` has the size of the largest operand dim there (they are equal
or 1); an operand dim that may be 1 at run time is read at `min(i, size - 1)`.

This module is what the rules share: the RULES table that `@rule` fills (one module per family of
ops, next to this one), the driver `FunctionLowering` with its loop builders, and the buffer views
and copy helpers several families use.
"""
from __future__ import annotations

from mlc.ir.attributes import BoolAttr, FloatAttr, IntAttr
from mlc.ir.core import Block, Builder, Module, Operation, Region, Value
from mlc.ir.diagnostics import error
from mlc.ir.dialects.mlc import Fusion
from mlc.ir.types import MemRefType, TensorType, index

RULES: dict[str, callable] = {}
IN_PLACE = "mlc.in_place"  # bufferize's choice: per result, the operand whose storage it is written over (-1: none)


def rule(*names):
    def register(fn):
        for n in names:
            RULES[n] = fn
        return fn
    return register


STORAGE_ELSEWHERE = ("mlc.constant", "mlc.global_load", "func.call")  # results not in a buffer of their own


class LoopBuilder:
    """Builds loop nests in a function: index constants made once at its top, loops, arithmetic.
    lower-to-loops and tile build with it."""

    def __init__(self, module: Module, func):
        self.module, self.func = module, func
        self.consts: dict = {}
        self.b = Builder(func.body, func.body.first, module)

    def idx(self, n: int) -> Value:
        """An index constant, made once per function at the very top (so it dominates every use)."""
        if n not in self.consts:
            top = Builder(self.func.body, self.func.body.first, self.module)
            self.consts[n] = top.create("arith.constant", attributes={"value": IntAttr(n, index)}).result
        return self.consts[n]

    def const(self, b: Builder, value, element) -> Value:
        attr = BoolAttr(bool(value)) if element.is_bool else \
            FloatAttr(float(value), element) if element.is_float else IntAttr(int(value), element)
        return b.create("arith.constant", attributes={"value": attr}).result

    def dim(self, buf, axis: int) -> Value:
        if isinstance(buf, BatchView):  # (it reads the dims of its buffer)
            buf, axis = buf.buf, buf.axes[axis]
        d = buf.type.shape[axis]
        return self.idx(d) if d is not None else self.b.create("mem.dim", [buf], {"axis": axis}).result

    def dims(self, buf: Value) -> list:
        return [self.dim(buf, i) for i in range(buf.type.rank)]

    def op(self, b: Builder, name: str, *operands, **attrs) -> Value:
        return b.create(name, list(operands), attrs or None).result

    def view(self, b: Builder, buf: Value, shape: tuple, sizes: list, name_hint=None) -> Value:
        """buf's elements as a buffer of `shape` (mem.reshape, no copy); `sizes` holds a value for each
        dim, read where the shape says `?`."""
        return b.create("mem.reshape", [buf] + [v for v, d in zip(sizes, shape) if d is None],
                        result_types=[MemRefType(tuple(shape), buf.type.element)], name_hint=name_hint).result

    def nest(self, sizes: list, body, parallel=True, b: Builder | None = None):
        """Loops over 0..size for each size; body(builder, ivs) fills the innermost block. `parallel`
        (one flag, or one per loop) marks loops whose iterations write disjoint elements."""
        flags = parallel if isinstance(parallel, (list, tuple)) else [parallel] * len(sizes)

        def level(b, ivs):
            if len(ivs) == len(sizes):
                body(b, ivs)
                return
            self.loop(b, self.idx(0), sizes[len(ivs)], lambda inner, iv: level(inner, ivs + [iv]), flags[len(ivs)])
        level(b or self.b, [])

    def loop(self, b: Builder, lb: Value, ub: Value, body, parallel: bool = False, step: int = 1, carried=(), compact=False):
        """One loop.for from lb to ub; body(builder, iv) fills it. With `carried` initial values,
        body(builder, iv, *values) returns their next values and the loop returns the last ones.
        `compact`: compiled for size (loops.For)."""
        block = Block([index] + [v.type for v in carried], ["i"] + ["acc"] * len(carried))
        attrs = {**({"parallel": True} if parallel else {}), **({"step": step} if step != 1 else {}),
                 **({"compact": True} if compact else {})}
        loop = b.create("loop.for", [lb, ub, *carried], attrs or None, regions=[Region([block])])
        inner = Builder.at_end(block, self.module, b.loc)
        out = body(inner, *block.args)
        inner.create("loop.yield", list(out) if carried else [])
        return loop.results


class FunctionLowering(LoopBuilder):
    """Lowers one function in place: `buffers` maps each tensor value to its buffer, and the rules
    build their loop nests with the helpers below, at `b` (before the op being lowered, `current`)."""

    def __init__(self, module: Module, func):
        super().__init__(module, func)
        self.buffers: dict[Value, Value] = {}
        self.fused: set[Operation] = set()

    # --- driving ---------------------------------------------------------------------------------------
    def run(self):
        for a in self.func.args:
            if isinstance(a.type, TensorType):
                self.buffers[a] = self.b.create("mem.from_tensor", [a], name_hint=a.name_hint).result
        originals = [op for op in self.func.body.ops if op.name.startswith("mlc.") or op.name == "func.call"]
        self.lower_ops(originals)
        ret = self.func.body.last
        self.b = Builder.before(ret, self.module)
        for i, v in enumerate(ret.operands):
            if v in self.buffers:
                ret.set_operand(i, self.tensor(v))

    def lower_ops(self, ops):
        """Lower tensor ops in order, then remove them (those left at the tensor level stay)."""
        for op in ops:
            if op in self.fused:  # computed inside its consumer's loop nest
                continue
            lower = RULES.get(op.name)
            if lower is None:
                raise error(op.loc, "cannot lower this op to loops yet", op.name)
            self.b = Builder.before(op, self.module)
            self.current = op
            for r, buf in zip(op.results, lower(self, op)):
                self.buffers[r] = buf
        for op in reversed(ops):
            if op.name in TENSOR_LEVEL and any(r.uses for r in op.results):
                continue
            op.drop_all_references()
            op.detach()

    # --- helpers ---------------------------------------------------------------------------------------
    def tensor(self, v: Value) -> Value:
        """The tensor value of v's buffer, read at the current point."""
        return self.b.create("mem.to_tensor", [self.buffers[v]]).result

    def result_buffer(self, result: int, t: TensorType, sizes: list, name_hint=None) -> Value:
        """Where the op being lowered writes result `result`: over an operand's storage where bufferize
        chose that (passes/bufferize.py), else a new buffer."""
        into = self.current.attr(IN_PLACE)
        if into is not None and into[result] >= 0:
            return self.buffers[self.current.operands[into[result]]]
        return self.alloc(t, sizes, name_hint)

    def alloc(self, t: TensorType, sizes: list, name_hint=None) -> Value:
        dynamic = [s for s, d in zip(sizes, t.shape) if d is None]
        origin = {"mlc.origin": self.origin()} if getattr(self, "current", None) else {}  # named in allocation errors
        return self.b.create("mem.alloc", dynamic, origin, result_types=[MemRefType(t.shape, t.element)],
                             name_hint=name_hint).result

    def origin(self) -> str:
        """The tensor op being lowered, as run-time errors name it: a fusion by its anchor (a product or a
        reduction with its epilogue), else by the op that makes its result."""
        op = self.current
        return Fusion.named_by(op).name if op.name == "mlc.fusion" else op.name

    def check(self, b: Builder, condition: Value, message: str):
        b.create("mem.check", [condition], {"message": message, "op": self.current.name})

    def broadcast_reader(self, buf, result_rank: int):
        """A function (builder, result ivs) -> the indices that read `buf` broadcast to the result."""
        lead = result_rank - buf.type.rank
        last = [self.op(self.b, "arith.sub", self.dim(buf, axis), self.idx(1)) if d is None else None
                for axis, d in enumerate(buf.type.shape)]

        def indices(b, ivs):
            out = []
            for axis, d in enumerate(buf.type.shape):
                iv = ivs[lead + axis]
                out.append(self.idx(0) if d == 1 else iv if d is not None else self.op(b, "arith.minimum", iv, last[axis]))
            return out
        return indices

    def result_sizes(self, t: TensorType, operands) -> list:
        """Sizes of a broadcast result: static dims as constants, `?` dims the operands' one that is not 1
        (0 where one is 0: numpy's rule, not the largest). Operand dims known only at run time are
        checked: equal to the result's, or 1."""
        sizes = []
        for i, d in enumerate(t.shape):
            aligned = [(v, v.type.rank - t.rank + i) for v in operands if v.type.rank - t.rank + i >= 0]
            candidates = [self.dim(v, a) for v, a in aligned if v.type.shape[a] != 1]
            if d is not None:
                size = self.idx(d)
            else:
                size = candidates[0]
                for c in candidates[1:]:
                    size = self.op(self.b, "arith.select", self.op(self.b, "arith.eq", size, self.idx(1)), c, size)
            dynamic = [self.dim(v, a) for v, a in aligned if v.type.shape[a] is None]
            for c in dynamic if len(candidates) > 1 or d is not None else []:
                ok = self.op(self.b, "arith.or", self.op(self.b, "arith.eq", c, size), self.op(self.b, "arith.eq", c, self.idx(1)))
                self.check(self.b, ok, f"operand sizes along dim {i} cannot be broadcast together")
            sizes.append(size)
        return sizes


TENSOR_LEVEL = {"mlc.constant", "mlc.global_load", "func.call"}  # kept as tensor ops (elementwise.boundary)


# --- buffer views, read by rules in place of a buffer (`dim` sees through them) -----------------------

class BatchView:
    """A buffer seen without its matrix dims: its batch dims, for broadcasting batch indices (an
    interleaved one's last batch dim lies between its matrix dims: mlc.matmul's `interleaved_a`)."""

    def __init__(self, buf, interleaved: bool = False):
        r = buf.type.rank
        self.buf, self.axes = buf, list(range(r - 3)) + [r - 2] if interleaved else list(range(r - 2))
        self.type = MemRefType(tuple(buf.type.shape[a] for a in self.axes), buf.type.element)


# --- helpers shared by several families of rules ------------------------------------------------------

def copy_nest(L: FunctionLowering, src, dst, sizes, src_index, dst_index, parallel=True):
    """dst[dst_index(ivs)] = src[src_index(ivs)] over `sizes`."""
    L.nest(sizes, lambda b, ivs: b.create("mem.store", [b.create("mem.load", [src] + src_index(b, ivs)).result, dst]
                                          + dst_index(b, ivs)), parallel)


def as_index(L, b, v):
    """An index read from data; `mlc.origin` names the op it serves, for the run-time bounds error."""
    return b.create("arith.cast", [v], {"mlc.origin": L.origin()}, result_types=[index]).result


def apply_epilogue(L, out, sizes, epilogue):
    """A fused elementwise chain as its own pass over the result (for lowerings without a hook)."""
    if epilogue is not None:
        L.nest(sizes, lambda b, ivs: b.create("mem.store", [epilogue(b, b.create("mem.load", [out] + ivs).result, ivs), out] + ivs))
    return [out]


def store_through_epilogue(b: Builder, op: Operation, out, at: list, indices: list, value: Value) -> None:
    """out[at] = the epilogue of a mem.matmul or mem.conv2d (its ops copied in) on `indices` and `value`."""
    block = op.regions[0].blocks[0]
    mapping = dict(zip(block.args, indices + [value]))
    for inner in block:
        if inner is not block.last:
            b.block.insert_before(b.anchor, inner.clone(mapping))
    b.create("mem.store", [mapping.get(block.last.operands[0], block.last.operands[0]), out] + at)
