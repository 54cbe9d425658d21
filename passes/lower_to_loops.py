"""lower-to-loops: tensor ops become loop nests over buffers (the `mem`, `loop` and `arith` dialects).

Each tensor value gets a buffer; an op's rule allocates its result buffer and fills it with a loop
nest of scalar `arith` ops. Function signatures stay tensors: arguments are copied into buffers at
entry (`mem.from_tensor`) and results read back at exit (`mem.to_tensor`), so a lowered module runs on
the interpreter with the same inputs as the original — which is how it is tested. Calls and globals
cross the boundary the same way. An op without a rule is an error naming it, never skipped.

Broadcasting: a result dim that is `?` has the size of the largest operand dim there (they are equal
or 1); an operand dim that may be 1 at run time is read at `min(i, size - 1)`.
"""
from __future__ import annotations

import numpy as np

from mlc.ir.attributes import BoolAttr, FloatAttr, IntAttr
from mlc.ir.core import Block, BlockArgument, Builder, Module, Operation, Region, Value, create_op
from mlc.ir.diagnostics import error
from mlc.ir.dialects import mlc as tensor_ops
from mlc.ir.dialects.shapes import norm_axis
from mlc.ir.types import ElementType, MemRefType, TensorType, f64, i1, i64, index

from . import gemm
from .fuse import ANCHORS, ROW_REDUCTIONS
from .manager import Pass

RULES: dict[str, callable] = {}


def rule(*names):
    def register(fn):
        for n in names:
            RULES[n] = fn
        return fn
    return register


class LowerToLoops(Pass):
    name = "lower-to-loops"
    summary = "lower tensor ops to loop nests over buffers"
    options = {"vector-bytes": gemm.VECTOR_BYTES}  # the GEMM micro-kernel's vector width (the driver gives the host's)

    def run(self, module: Module) -> None:
        for f in list(module.functions.values()):
            FunctionLowering(module, f, self.option("vector-bytes")).run()


class FunctionLowering:
    def __init__(self, module: Module, func, vector_bytes: int = gemm.VECTOR_BYTES):
        self.module, self.func, self.vector_bytes = module, func, vector_bytes
        self.buffers: dict[Value, Value] = {}
        self.consts: dict = {}
        self.allocs: list[Value] = []  # in order, so a loop body can free what it allocated
        self.fused: set[Operation] = set()
        self.order: dict[Operation, int] = {}  # the function's own tensor ops, in order
        self.b = Builder(func.body, func.body.first, module)

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
        self.free_after_last_use(ret)

    def free_after_last_use(self, ret):
        """Each function-level buffer is freed right after the last op that uses it (returned ones
        are handed to the caller), so intermediates do not all live until the end."""
        top = self.func.body
        position = {op: i for i, op in enumerate(top)}
        returned = {v.defining_op().operands[0] for v in ret.operands
                    if v.defining_op() is not None and v.defining_op().name == "mem.to_tensor"}
        for buf in self.allocs:
            alloc = buf.defining_op()
            if alloc.parent is not top or buf in returned:
                continue
            last = alloc
            users = list(buf.users)
            for u in list(users):  # mem.to_tensor aliases the buffer in native code: its users count too
                if u.name == "mem.to_tensor":
                    users.extend(u.results[0].users)
            for user in users:
                while user.parent is not top:
                    user = user.parent_op
                if position[user] > position[last]:
                    last = user
            if last is not ret:
                top.insert_after(last, create_op("mem.dealloc", [buf], [], loc=alloc.loc))

    def lower_ops(self, ops):
        """Lower tensor ops in order, then remove them (those left at the tensor level stay)."""
        if not self.order:  # the top-level call (scan bodies come later)
            self.order = {op: i for i, op in enumerate(ops)}
        for op in ops:
            if op in self.fused:  # computed inside its consumer's loop nest
                continue
            lower = widened if _accumulates_in_half(op) else RULES.get(op.name)
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
        if isinstance(buf, Transposed):
            return self.dim(buf.source, 1 - axis)
        buf = getattr(buf, "buf", buf)  # a batch view reads the dims of its buffer
        d = buf.type.shape[axis]
        return self.idx(d) if d is not None else self.b.create("mem.dim", [buf], {"axis": axis}).result

    def dims(self, buf: Value) -> list:
        return [self.dim(buf, i) for i in range(buf.type.rank)]

    def alloc(self, t: TensorType, sizes: list, name_hint=None) -> Value:
        dynamic = [s for s, d in zip(sizes, t.shape) if d is None]
        buf = self.b.create("mem.alloc", dynamic, result_types=[MemRefType(t.shape, t.element)], name_hint=name_hint).result
        self.allocs.append(buf)
        return buf

    def check(self, b: Builder, condition: Value, message: str):
        b.create("mem.check", [condition], {"message": message, "op": self.current.name})

    def op(self, b: Builder, name: str, *operands, **attrs) -> Value:
        return b.create(name, list(operands), attrs or None).result

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

    def loop(self, b: Builder, lb: Value, ub: Value, body, parallel: bool = False, step: int = 1, carried=()):
        """One loop.for from lb to ub; body(builder, iv) fills it. With `carried` initial values,
        body(builder, iv, *values) returns their next values and the loop returns the last ones."""
        block = Block([index] + [v.type for v in carried], ["i"] + ["acc"] * len(carried))
        attrs = {**({"parallel": True} if parallel else {}), **({"step": step} if step != 1 else {})}
        loop = b.create("loop.for", [lb, ub, *carried], attrs or None, regions=[Region([block])])
        inner = Builder.at_end(block, self.module, b.loc)
        out = body(inner, *block.args)
        inner.create("loop.yield", list(out) if carried else [])
        return loop.results

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
        """Sizes of a broadcast result: static dims as constants, `?` dims the largest operand dim.
        Operand dims known only at run time are checked: equal to the result's, or 1 (numpy's rule)."""
        sizes = []
        for i, d in enumerate(t.shape):
            aligned = [(v, v.type.rank - t.rank + i) for v in operands if v.type.rank - t.rank + i >= 0]
            candidates = [self.dim(v, a) for v, a in aligned if v.type.shape[a] != 1]
            if d is not None:
                size = self.idx(d)
            else:
                size = candidates[0]
                for c in candidates[1:]:
                    size = self.op(self.b, "arith.maximum", size, c)
            dynamic = [self.dim(v, a) for v, a in aligned if v.type.shape[a] is None]
            for c in dynamic if len(candidates) > 1 or d is not None else []:
                ok = self.op(self.b, "arith.or", self.op(self.b, "arith.eq", c, size), self.op(self.b, "arith.eq", c, self.idx(1)))
                self.check(self.b, ok, f"operand sizes along dim {i} cannot be broadcast together")
            sizes.append(size)
        return sizes


TENSOR_LEVEL = {"mlc.constant", "mlc.global_load", "func.call"}
HALF = ("f16", "bf16")
ACCUMULATING = {"mlc.matmul", "mlc.conv2d", "mlc.conv2d_transpose", "mlc.reduce_sum", "mlc.reduce_mean", "mlc.reduce_prod",
                "mlc.softmax", "mlc.log_softmax", "mlc.cross_entropy", "mlc.avg_pool2d"}


def _accumulates_in_half(op) -> bool:
    return op.name in ACCUMULATING and op.operands[0].type.element.name in HALF


def widened(L: FunctionLowering, op: Operation):
    """An op that sums f16/bf16 values runs in f32 and is rounded once at the end, as the
    interpreter (and PyTorch's CPU kernels) do: casts around an f32 twin, lowered in turn."""
    f32 = ElementType("f32")
    made = []

    def make(name, operands, result_types=None):
        made.append(L.b.create(name, operands, dict(op.attributes) if name == op.name else None, result_types=result_types))
        return made[-1].results
    wide = [make("mlc.cast", [v], [TensorType(v.type.shape, f32)])[0] if v.type.element.name in HALF else v for v in op.operands]
    results = make(op.name, wide)
    narrow = [make("mlc.cast", [r], [o.type])[0] for r, o in zip(results, op.results)]
    L.lower_ops(made)
    return [L.buffers[v] for v in narrow]


# ---------------------------------------------------------------------------------------------------
# Rules

SCALAR_TWIN = {name: f"arith.{name}" for name in [*tensor_ops.UNARY, *tensor_ops.BINARY, "select"]}


ELEMENTWISE = {f"mlc.{n}" for n in SCALAR_TWIN} | {"mlc.clamp", "mlc.cast"}


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
        return row_kernel(L, [o for o in block if o is not block.last])
    if anchor is None:
        return elementwise(L, root, [v.defining_op() for v in block.last.operands[1:]])
    # The anchor writes the result buffer; epilogue(b, out, indices) then rewrites an element in place.
    leaves = _leaves(L, root)
    readers = {v: L.broadcast_reader(L.buffers[v], root.results[0].type.rank) for v in leaves if v is not anchor.results[0]}

    def epilogue(b, out, ivs):
        def value(v):
            if v is anchor.results[0]:
                return b.create("mem.load", [out] + ivs).result
            p = v.defining_op()
            if p is root or p in L.fused:
                return scalar(L, b, p, [value(o) for o in p.operands])
            return b.create("mem.load", [L.buffers[v]] + readers[v](b, ivs)).result
        b.create("mem.store", [value(root.results[0]), out] + ivs)

    return RULES[anchor.name](L, anchor, epilogue=epilogue)  # the anchor rules take an epilogue


def _leaves(L, op):
    """The values a fused group reads from buffers: operands of op and of its fused producers."""
    leaves = []

    def collect(o):
        for v in o.operands:
            p = v.defining_op()
            if p is not None and p in L.fused:
                collect(p)
            elif v not in leaves:
                leaves.append(v)
    collect(op)
    return leaves


@rule(*ELEMENTWISE, "mlc.broadcast_to")
def elementwise(L: FunctionLowering, op: Operation, extras=()):
    """One loop nest over the result; fused producers (inside an mlc.fusion) are computed in it from
    their own operands. `extras`: fused ops whose values the kernel also returns (of the same type),
    stored in the same pass after every value of the element is computed."""
    t = op.results[0].type
    leaves = _leaves(L, op)  # operands read from buffers (those of fused producers included)
    ins = [L.buffers[v] for v in op.operands if v in L.buffers]
    if op.name == "mlc.broadcast_to":
        sizes = [L.idx(d) if d is not None else L.dim(ins[0], ins[0].type.rank - t.rank + i) for i, d in enumerate(t.shape)]
    else:
        sizes = L.result_sizes(t, [L.buffers[v] for v in leaves])
    outs = [_global_updated_in_place(L, t, leaves, i) or (not i and _dying_operand_buffer(L, t, leaves)) or
            L.alloc(t, sizes, r.name_hint) for i, r in enumerate(L.current.results[:1 + len(extras)])]
    readers = {v: L.broadcast_reader(L.buffers[v], t.rank) for v in leaves}

    def value(b, v, ivs, memo):
        if v not in memo:
            p = v.defining_op()
            memo[v] = scalar(L, b, p, [value(b, o, ivs, memo) for o in p.operands]) if p is not None and p in L.fused else \
                b.create("mem.load", [L.buffers[v]] + readers[v](b, ivs)).result
        return memo[v]

    def element(b, ivs):
        memo = {}
        results = [scalar(L, b, o, [value(b, v, ivs, memo) for v in o.operands]) for o in [op, *extras]]
        for r, out in zip(results, outs):
            b.create("mem.store", [r, out] + ivs)
    L.nest(sizes, element)
    return outs


def _global_updated_in_place(L, t, leaves, result: int = 0):
    """The storage of global @g, when this kernel's result is stored into @g and the kernel reads @g's
    current value at the very index it writes, with nothing after it reading @g before the store (an
    optimiser's update: w = w - lr * g). The kernel then writes @g in place and the store copies
    nothing."""
    op = L.current
    if op.parent is not L.func.body:
        return None
    stores = [u for u, _ in op.results[result].uses if u.name == "mlc.global_store" and u.parent is op.parent]
    if len(stores) != 1:
        return None
    name, at = stores[0].attr("global"), L.order[op]
    loads = [o for o in L.order if o.name == "mlc.global_load" and o.attr("global") == name]
    if any(L.order[o] > at for o in L.order if o.name == "mlc.global_store" and o.attr("global") == name and o is not stores[0]):
        return None  # another store would overwrite the result while it is still a value
    if any(user.name == "func.return" for user in op.results[result].users):
        return None  # the caller frees what it is given
    for load in loads:  # no one reads @g's old value after this kernel
        for user, _ in load.results[0].uses:
            while user.parent is not op.parent:
                user = user.parent_op
            if L.order.get(user, -1) > at:  # (ops made by lowering read the buffer, not this value)
                return None
    for v in leaves:
        outer = op.operands[v.index] if op.regions and isinstance(v, BlockArgument) and v.owner is op.regions[0].blocks[0] else v
        if outer.defining_op() in loads and outer.type == TensorType(t.shape, t.element) and t.is_static:
            return L.buffers[v]
    return None


def _dying_operand_buffer(L, t, leaves):
    """An operand's buffer the result may be written into, in place: the operand is used only here,
    its buffer is a top-level intermediate of this function that no other value shares, and it has
    the result's type, so it is read at the very index being written. At a `?` result dim no other
    operand may be larger than it (each has 1 there, or does not reach that axis)."""
    if L.current.parent is not L.func.body:
        return None
    for v in leaves:
        fused_arg = L.current.name == "mlc.fusion" and isinstance(v, BlockArgument) and v.owner is L.current.regions[0].blocks[0]
        outer = L.current.operands[v.index] if fused_arg else v
        buf = L.buffers[v]
        if (len(outer.uses) != 1 or buf.type != MemRefType(t.shape, t.element) or buf not in L.allocs
                or buf.defining_op().parent is not L.func.body or sum(b is buf for b in L.buffers.values()) > 1 + (outer is not v)):
            continue
        others = [w.type.shape for w in leaves if w is not v]
        if all(all(len(s) < t.rank - axis or s[axis - t.rank] == 1 for s in others)
               for axis, d in enumerate(t.shape) if d is None):
            return buf
    return None


def scalar(L, b, op, xs) -> Value:
    """The scalar computation of an elementwise op on loaded values."""
    short = op.name[4:]
    if short in SCALAR_TWIN:
        attrs = {"approximate": op.attr("approximate")} if short == "gelu" else None
        return b.create(SCALAR_TWIN[short], xs, attrs).result
    if op.name == "mlc.cast":
        return b.create("arith.cast", xs, result_types=[op.results[0].type.element]).result
    if op.name == "mlc.broadcast_to":
        return xs[0]
    x, e = xs[0], op.results[0].type.element  # clamp
    if op.attr("min") is not None:
        x = L.op(b, "arith.maximum", x, L.const(b, op.attr("min"), e))
    if op.attr("max") is not None:
        x = L.op(b, "arith.minimum", x, L.const(b, op.attr("max"), e))
    return x


@rule("mlc.constant", "mlc.global_load", "func.call")
def boundary(L: FunctionLowering, op: Operation):
    """These stay tensor ops: their operands are read from buffers, their results copied into buffers."""
    for i, v in enumerate(op.operands):
        if v in L.buffers:
            op.set_operand(i, L.tensor(v))
    return [Builder.after(op, L.module).create("mem.from_tensor", [r], name_hint=r.name_hint).result for r in op.results]


@rule("mlc.global_store")
def global_store(L: FunctionLowering, op: Operation):
    new = op.clone()
    new.set_operand(0, L.tensor(op.operands[0]))
    op.parent.insert_before(op, new)
    return []


IDENTITY = {"mlc.reduce_sum": 0, "mlc.reduce_mean": 0, "mlc.reduce_prod": 1}
COMBINE = {"mlc.reduce_sum": "arith.add", "mlc.reduce_mean": "arith.add", "mlc.reduce_prod": "arith.mul",
           "mlc.reduce_max": "arith.maximum", "mlc.reduce_min": "arith.minimum"}


@rule("mlc.reduce_sum", "mlc.reduce_mean", "mlc.reduce_prod", "mlc.reduce_max", "mlc.reduce_min", "mlc.argmax", "mlc.argmin")
def reduction(L: FunctionLowering, op: Operation):
    x = L.buffers[op.operands[0]]
    t, e = op.results[0].type, x.type.element
    axes = op.opdef.axes(op, x.type.rank)
    keep = bool(op.attr("keepdims"))
    in_sizes = L.dims(x)
    out_sizes = [L.idx(1) if i in axes else s for i, s in enumerate(in_sizes)] if keep \
        else [s for i, s in enumerate(in_sizes) if i not in axes]
    out = L.alloc(t, out_sizes, op.results[0].name_hint)
    arg = op.name in ("mlc.argmax", "mlc.argmin")
    best = L.alloc(TensorType(t.shape, e), out_sizes) if arg else out

    def out_index(ivs):
        """Input indices -> result indices."""
        return [L.idx(0) if i in axes else iv for i, iv in enumerate(ivs)] if keep else \
            [iv for i, iv in enumerate(ivs) if i not in axes]

    def first_element(ivs):
        """Result indices -> the input indices of the first element reduced into them."""
        rest = iter(ivs)
        return [L.idx(0) if i in axes else (ivs[i] if keep else next(rest)) for i in range(x.type.rank)]

    def init(b, ivs):
        if op.name in IDENTITY:
            b.create("mem.store", [L.const(b, IDENTITY[op.name], e), out] + ivs)
            return
        b.create("mem.store", [b.create("mem.load", [x] + first_element(ivs)).result, best] + ivs)
        if arg:
            b.create("mem.store", [L.const(b, 0, i64), out] + ivs)
    L.nest(out_sizes, init)

    def body(b, ivs):
        o = out_index(ivs)
        v = b.create("mem.load", [x] + ivs).result
        acc = b.create("mem.load", [best] + o).result
        if not arg:
            b.create("mem.store", [L.op(b, COMBINE[op.name], acc, v), out] + o)
            return
        # strictly better, or a NaN where the best so far is not (numpy: NaN counts as extreme)
        better = L.op(b, "arith.gt" if op.name == "mlc.argmax" else "arith.lt", v, acc)
        nan_v, num_acc = L.op(b, "arith.ne", v, v), L.op(b, "arith.eq", acc, acc)
        take = L.op(b, "arith.or", better, L.op(b, "arith.and", nan_v, num_acc))
        position = b.create("arith.cast", [ivs[axes[0]]], result_types=[i64]).result
        b.create("mem.store", [L.op(b, "arith.select", take, v, acc), best] + o)
        old = b.create("mem.load", [out] + o).result
        b.create("mem.store", [L.op(b, "arith.select", take, position, old), out] + o)
    L.nest(in_sizes, body, parallel=[i not in axes for i in range(x.type.rank)])

    if op.name == "mlc.reduce_mean":
        count = L.idx(1)
        for a in axes:
            count = L.op(L.b, "arith.mul", count, in_sizes[a])
        n = L.b.create("arith.cast", [count], result_types=[e]).result
        L.nest(out_sizes, lambda b, ivs: b.create(
            "mem.store", [L.op(b, "arith.div", b.create("mem.load", [out] + ivs).result, n), out] + ivs))
    return [out]


@rule("mlc.matmul")
def matmul(L: FunctionLowering, op: Operation, epilogue=None):
    """numpy `@`: a rank-1 operand is a row (left) or column (right) whose extra dim is dropped."""
    a, bm = (L.buffers[v] for v in op.operands)
    t = op.results[0].type
    ra, rb = a.type.rank, bm.type.rank
    batch_rank = t.rank - (ra > 1) - (rb > 1)
    batch = TensorType(t.shape[:batch_rank], t.element)
    views = [_BatchView(v) for v in (a, bm) if v.type.rank > 2]
    sizes = L.result_sizes(batch, views) if batch_rank else []
    rows = [L.dim(a, ra - 2)] if ra > 1 else []
    cols = [L.dim(bm, rb - 1)] if rb > 1 else []
    k = L.dim(a, ra - 1)
    out = L.alloc(t, sizes + rows + cols, op.results[0].name_hint)
    read_a = L.broadcast_reader(_BatchView(a), batch_rank) if ra > 2 else (lambda b, ivs: [])
    read_b = L.broadcast_reader(_BatchView(bm), batch_rank) if rb > 2 else (lambda b, ivs: [])

    if ra > 1 and rb > 1 and gemm.supports(t.element):
        def load(buf, prefix):
            if isinstance(buf, Transposed):
                return lambda kb, x, y: kb.create("mem.load", [buf.source, y, x]).result
            return lambda kb, x, y: kb.create("mem.load", [buf] + prefix + [x, y]).result

        def tiled(b, bi):
            at_a, at_b = read_a(b, bi), read_b(b, bi)
            gemm.Gemm(rows[0], cols[0], k, t.element, load_a=load(a, at_a), load_b=load(bm, at_b),
                      load_b_vector=None if isinstance(bm, Transposed) else
                      lambda kb, kk, j, vt: kb.create("vector.load", [bm] + at_b + [kk, j], result_types=[vt]).result,
                      c=out, c_prefix=bi, epilogue=epilogue and (lambda rb, i: L.loop(
                          rb, L.idx(0), cols[0], lambda jb, j: epilogue(jb, out, bi + [i, j])))).emit(L, b, parallel=not batch_rank)
        if batch_rank:
            L.nest(sizes, tiled, parallel=True)
        else:
            tiled(L.b, [])
        return [out]

    # Zero the result, then accumulate with the reduction loop outside the column loop: the innermost
    # loop walks rows of b and out contiguously, which LLVM vectorises.
    L.nest(sizes + rows + cols, lambda b, ivs: b.create("mem.store", [L.const(b, 0, t.element), out] + ivs))

    def row_block(b, bi, first, count, kk):
        """out[first + r, :] += a[first + r, kk] * b[kk, :] for r < count: one pass over a row of b
        feeds `count` rows of the result (register blocking)."""
        xs = [b.create("mem.load", [a] + read_a(b, bi) + ([L.op(b, "arith.add", first, L.idx(r))] if ra > 1 else []) + [kk]).result
              for r in range(count)]

        def accumulate(ib, js):
            col = js if rb > 1 else []
            y = ib.create("mem.load", [bm] + read_b(ib, bi) + [kk] + col).result
            for r, x in enumerate(xs):
                at = bi + ([L.op(ib, "arith.add", first, L.idx(r))] if ra > 1 else []) + col
                acc = ib.create("mem.load", [out] + at).result
                ib.create("mem.store", [L.op(ib, "arith.add", acc, L.op(ib, "arith.mul", x, y)), out] + at)
        L.nest(cols or [L.idx(1)], accumulate, parallel=True, b=b)

    block_rows = 4

    def per_batch(b, bi):
        if ra == 1:
            L.loop(b, L.idx(0), k, lambda kb, kk: row_block(kb, bi, None, 1, kk))
            return
        m = rows[0]
        whole = L.op(b, "arith.mul", L.op(b, "arith.div", m, L.idx(block_rows)), L.idx(block_rows))
        for lb, ub, count, step in ((L.idx(0), whole, block_rows, block_rows), (whole, m, 1, 1)):
            L.loop(b, lb, ub, lambda ib, i, count=count: L.loop(ib, L.idx(0), k, lambda kb, kk: row_block(kb, bi, i, count, kk)),
                   parallel=True, step=step)
    if batch_rank:
        L.nest(sizes, per_batch, parallel=True)
    else:
        per_batch(L.b, [])
    return _apply_epilogue(L, out, sizes + rows + cols, epilogue)


def _apply_epilogue(L, out, sizes, epilogue):
    """A fused elementwise chain as its own pass over the result (for lowerings without a hook)."""
    if epilogue is not None:
        L.nest(sizes, lambda b, ivs: epilogue(b, out, ivs))
    return [out]


class _BatchView:
    """A buffer seen without its last two dims: its batch dims, for broadcasting batch indices."""

    def __init__(self, buf):
        self.buf = buf
        self.type = MemRefType(buf.type.shape[:-2], buf.type.element)



class Transposed:
    """A matrix read through its transpose: what `mlc.transpose {perm = [1, 0]}` lowers to when every
    use is a GEMM operand, which then reads the source with its indices swapped (no copy)."""

    def __init__(self, source):
        self.source = source
        self.type = MemRefType(source.type.shape[::-1], source.type.element)


def _only_gemm_operand(v: Value) -> bool:
    """Every use of v is a 2-d operand of a matmul the GEMM computes (inside a fusion or not)."""
    for user, index in v.uses:
        if user.name == "mlc.fusion":
            if not _only_gemm_operand(user.regions[0].blocks[0].args[index]):
                return False
        elif user.name != "mlc.matmul" or any(o.type.rank != 2 for o in user.operands) or not gemm.supports(v.type.element):
            return False
    return bool(v.uses)


@rule("mlc.transpose")
def transpose(L: FunctionLowering, op: Operation):
    x = L.buffers[op.operands[0]]
    perm = op.attr("perm")
    if list(perm) == [1, 0] and _only_gemm_operand(op.results[0]) and not isinstance(x, Transposed):
        return [Transposed(x)]
    sizes = [L.dim(x, p) for p in perm]
    out = L.alloc(op.results[0].type, sizes, op.results[0].name_hint)

    def body(b, ivs):
        src = [None] * len(perm)
        for out_axis, in_axis in enumerate(perm):
            src[in_axis] = ivs[out_axis]
        b.create("mem.store", [b.create("mem.load", [x] + src).result, out] + ivs)
    L.nest(sizes, body)
    return [out]


@rule("mlc.reshape")
def reshape(L: FunctionLowering, op: Operation):
    x = L.buffers[op.operands[0]]
    t = op.results[0].type
    in_sizes = L.dims(x)
    total = L.idx(1)
    for s in in_sizes:
        total = L.op(L.b, "arith.mul", total, s)
    known = L.idx(1)
    for d in t.shape:
        if d is not None:
            known = L.op(L.b, "arith.mul", known, L.idx(d))
    sizes = [L.idx(d) if d is not None else L.op(L.b, "arith.div", total, known) for d in t.shape]
    out = L.alloc(t, sizes, op.results[0].name_hint)

    def body(b, ivs):
        flat = L.idx(0)
        for iv, s in zip(ivs, sizes):
            flat = L.op(b, "arith.add", L.op(b, "arith.mul", flat, s), iv)
        src = []
        for s in reversed(in_sizes):
            q = L.op(b, "arith.div", flat, s)
            src.append(L.op(b, "arith.sub", flat, L.op(b, "arith.mul", q, s)))
            flat = q
        b.create("mem.store", [b.create("mem.load", [x] + src[::-1]).result, out] + ivs)
    L.nest(sizes, body)
    return [out]


@rule("mlc.iota")
def iota(L: FunctionLowering, op: Operation):
    t = op.results[0].type
    axis = norm_axis(op.attr("axis"), t.rank)
    sizes = [L.idx(d) for d in t.shape]
    out = L.alloc(t, sizes, op.results[0].name_hint)
    L.nest(sizes, lambda b, ivs: b.create("mem.store", [b.create("arith.cast", [ivs[axis]], result_types=[t.element]).result, out] + ivs))
    return [out]


@rule("mlc.softmax", "mlc.log_softmax")
def softmax(L: FunctionLowering, op: Operation):
    """Written out in tensor ops (max, sub, exp, sum, then div or log and sub) and lowered as a row
    kernel when the axis is the last with a static size, else op by op."""
    x = op.operands[0]
    axis = norm_axis(op.attr("axis"), x.type.rank)
    red = {"axes": [axis], "keepdims": True}
    made = []

    def make(name, *operands, **attrs):
        made.append(L.b.create(name, list(operands), attrs or None))
        return made[-1].result
    shifted = make("mlc.sub", x, make("mlc.reduce_max", x, **red))
    e = make("mlc.exp", shifted)
    z = make("mlc.reduce_sum", e, **red)
    y = make("mlc.div", e, z) if op.name == "mlc.softmax" else make("mlc.sub", shifted, make("mlc.log", z))
    if axis != x.type.rank - 1 or x.type.shape[axis] is None or x.type.element.name not in ("f32", "f64"):
        L.lower_ops(made)
        return [L.buffers[y]]
    out = row_kernel(L, made)
    for o in reversed(made):
        o.erase()
    return out


def row_kernel(L: FunctionLowering, members: list[Operation]):
    """A row kernel made by `fuse` (reductions over the trailing dims with their elementwise producers
    and consumers; the last op is the result): a parallel loop over rows and in it, per row, a loop per
    reduction carrying its accumulator in a register, then a loop writing the result row. Whole-row
    values are recomputed in each loop that needs them, except one expensive value that the result
    needs too (softmax's exp): the first reduction over it also stores it into the result row, and
    later loops read it back from there, in cache."""
    root = members[-1]
    inside = set(members)
    first = next(o for o in members if o.name in ROW_REDUCTIONS)
    full = first.operands[0].type
    inner = len(first.opdef.axes(first, full.rank))
    leaves = list(dict.fromkeys(v for o in members for v in o.operands if v.defining_op() not in inside))
    sizes = L.result_sizes(TensorType(full.shape, full.element), [L.buffers[v] for v in leaves])
    outer, row_sizes = sizes[:-inner], sizes[-inner:]
    t = root.results[0].type
    whole_rows = root.name not in ROW_REDUCTIONS and t.shape[-inner:] == full.shape[-inner:]
    stash = _stash(members, root, inner) if whole_rows else None
    out = (whole_rows and stash is None and _dying_operand_buffer(L, t, leaves)) or \
        L.alloc(t, sizes if whole_rows else outer + [L.idx(1)] * (t.rank - len(outer)), root.results[0].name_hint)
    readers = {v: L.broadcast_reader(L.buffers[v], full.rank) for v in leaves}

    def row(b, outer_ivs):
        known = {}  # per-row values (reductions and what is computed from them): scalars

        def value(b, v, ivs, memo):
            """v at ivs, computed in b; memo holds what b already computed."""
            if v in known:
                return known[v] if known[v] is not None else b.create("mem.load", [out] + ivs).result
            if v not in memo:
                p = v.defining_op()
                memo[v] = scalar(L, b, p, [value(b, o, ivs, memo) for o in p.operands]) if p in inside else \
                    b.create("mem.load", [L.buffers[v]] + readers[v](b, ivs)).result
            return memo[v]

        def needs_stash(v):
            p = v.defining_op()
            return v is stash or (v not in known and p in inside and any(needs_stash(o) for o in p.operands))

        row_start = outer_ivs + [L.idx(0)] * inner
        for o in members:
            if o.name in ROW_REDUCTIONS:
                keep = stash is not None and stash not in known and needs_stash(o.operands[0])
                known[o.results[0]] = _reduce_row(L, b, o, row_sizes, outer_ivs, value, stash if keep else None, out)
                if keep:
                    known[stash] = None  # read back from the result row from now on
            elif o is not root and o.results[0].type.shape[-inner:] != full.shape[-inner:]:
                known[o.results[0]] = value(b, o.results[0], row_start, {})
        if whole_rows:
            L.nest(row_sizes, lambda ib, ivs: ib.create(
                "mem.store", [value(ib, root.results[0], outer_ivs + ivs, {}), out] + outer_ivs + ivs), parallel=False, b=b)
        else:
            result = value(b, root.results[0], row_start, {})
            b.create("mem.store", [result, out] + outer_ivs + [L.idx(0)] * (t.rank - len(outer)))
    L.nest(outer, row)
    return [out]


IDENTITY_OF = {"mlc.reduce_sum": 0.0, "mlc.reduce_mean": 0.0, "mlc.reduce_prod": 1.0,
               "mlc.reduce_max": float("-inf"), "mlc.reduce_min": float("inf")}


def _stash(members, root, inner):
    """The latest expensive whole-row value, of the result's element type, that the result and some
    reduction both compute from (else None)."""
    def reaches(v, target):
        p = v.defining_op()
        return v is target or (p in members and p.name not in ROW_REDUCTIONS and any(reaches(o, target) for o in p.operands))
    reductions = [o for o in members if o.name in ROW_REDUCTIONS]
    element, row = root.results[0].type.element, root.results[0].type.shape[-inner:]
    for o in reversed(members[:-1]):
        v = o.results[0]
        if (getattr(o.opdef, "cost", None) == tensor_ops.EXPENSIVE and v.type.element == element and v.type.shape[-inner:] == row
                and reaches(root.results[0], v) and any(reaches(r.operands[0], v) for r in reductions)):
            return v
    return None


def _reduce_row(L, b, op, row_sizes, outer_ivs, value, stash, out):
    """One reduction over a row: nested loops carrying the accumulator, marked reassociable so they
    vectorise; with `stash`, each element of that value is also stored into the result row."""
    def level(b, ivs, acc):
        if len(ivs) < len(row_sizes):
            return L.loop(b, L.idx(0), row_sizes[len(ivs)], lambda ib, iv, a: [level(ib, ivs + [iv], a)], carried=[acc])[0]
        at, memo = outer_ivs + ivs, {}
        x = value(b, op.operands[0], at, memo)
        if stash is not None:
            b.create("mem.store", [value(b, stash, at, memo), out] + at)
        return b.create(COMBINE[op.name], [acc, x], {"reassoc": True}).result
    e = op.results[0].type.element
    total = level(b, [], L.const(b, IDENTITY_OF[op.name], e))
    if op.name == "mlc.reduce_mean":
        count = int(np.prod([s.defining_op().attr("value") for s in row_sizes]))
        total = L.op(b, "arith.div", total, L.const(b, count, e))
    return total


@rule("mlc.cross_entropy")
def cross_entropy(L: FunctionLowering, op: Operation):
    """Per row: log(sum(exp(x - max))) + max - x[label]; then the mean over rows."""
    x, labels = (L.buffers[v] for v in op.operands)
    if x.type.rank != 2:
        raise error(op.loc, "cannot lower cross_entropy over more than 2 dims to loops yet", op.name)
    e = x.type.element
    n, c = L.dims(x)
    out = L.alloc(op.results[0].type, [], op.results[0].name_hint)
    b = L.b
    b.create("mem.store", [L.const(b, 0, e), out])
    scratch = L.alloc(TensorType((2,), e), [])  # running max, running sum for one row

    def row(b, ivs):
        i = ivs[0]
        b.create("mem.store", [b.create("mem.load", [x, i, L.idx(0)]).result, scratch, L.idx(0)])
        b.create("mem.store", [L.const(b, 0, e), scratch, L.idx(1)])

        def find_max(ib, js):
            m = ib.create("mem.load", [scratch, L.idx(0)]).result
            v = ib.create("mem.load", [x, i, js[0]]).result
            ib.create("mem.store", [L.op(ib, "arith.maximum", m, v), scratch, L.idx(0)])
        L.nest([c], find_max, parallel=False, b=b)
        m = b.create("mem.load", [scratch, L.idx(0)]).result

        def add_exp(ib, js):
            s = ib.create("mem.load", [scratch, L.idx(1)]).result
            v = ib.create("mem.load", [x, i, js[0]]).result
            ib.create("mem.store", [L.op(ib, "arith.add", s, L.op(ib, "arith.exp", L.op(ib, "arith.sub", v, m))), scratch, L.idx(1)])
        L.nest([c], add_exp, parallel=False, b=b)
        label = _as_index(L, b, b.create("mem.load", [labels, i]).result)
        picked = b.create("mem.load", [x, i, label]).result
        s = b.create("mem.load", [scratch, L.idx(1)]).result
        loss = L.op(b, "arith.sub", L.op(b, "arith.add", L.op(b, "arith.log", s), m), picked)
        b.create("mem.store", [L.op(b, "arith.add", b.create("mem.load", [out]).result, loss), out])
    L.nest([n], row, parallel=False)
    count = L.b.create("arith.cast", [n], result_types=[e]).result
    L.b.create("mem.store", [L.op(L.b, "arith.div", L.b.create("mem.load", [out]).result, count), out])
    return [out]


def _copy_nest(L: FunctionLowering, src, dst, sizes, src_index, dst_index, parallel=True):
    """dst[dst_index(ivs)] = src[src_index(ivs)] over `sizes`."""
    L.nest(sizes, lambda b, ivs: b.create("mem.store", [b.create("mem.load", [src] + src_index(b, ivs)).result, dst]
                                          + dst_index(b, ivs)), parallel)


@rule("mlc.slice")
def slice_(L: FunctionLowering, op: Operation):
    x = L.buffers[op.operands[0]]
    t = op.results[0].type
    start, limit, stride = op.opdef.bounds(op, x.type.rank)
    first, sizes = [], []
    for axis, (d, s, lim, k) in enumerate(zip(x.type.shape, start, limit, stride)):
        if d is not None:
            lo, hi, _ = slice(s, lim, k).indices(d)
            first.append(L.idx(lo))
            sizes.append(L.idx(t.shape[axis]))
            continue
        if s < 0 or lim < 0:
            raise error(op.loc, "cannot lower a slice with negative bounds on a '?' dim to loops yet", op.name)
        dim = L.dim(x, axis)  # Python semantics: bounds clamp to the dim
        lo = L.op(L.b, "arith.minimum", L.idx(s), dim)
        hi = L.op(L.b, "arith.minimum", L.idx(lim), dim)
        span = L.op(L.b, "arith.add", L.op(L.b, "arith.sub", hi, lo), L.idx(k - 1))
        first.append(lo)
        sizes.append(L.op(L.b, "arith.div", span, L.idx(k)))
    out = L.alloc(t, sizes, op.results[0].name_hint)

    def src(b, ivs):
        return [L.op(b, "arith.add", f, L.op(b, "arith.mul", iv, L.idx(k))) for f, iv, k in zip(first, ivs, stride)]
    _copy_nest(L, x, out, sizes, src, lambda b, ivs: ivs)
    return [out]


@rule("mlc.pad")
def pad(L: FunctionLowering, op: Operation):
    x = L.buffers[op.operands[0]]
    t = op.results[0].type
    low, high = op.attr("low"), op.attr("high")
    in_sizes = L.dims(x)
    sizes = [L.op(L.b, "arith.add", s, L.idx(lo + hi)) if d is None else L.idx(d)
             for s, d, lo, hi in zip(in_sizes, t.shape, low, high)]
    out = L.alloc(t, sizes, op.results[0].name_hint)
    L.nest(sizes, lambda b, ivs: b.create("mem.store", [L.const(b, op.attr("value"), t.element), out] + ivs))
    _copy_nest(L, x, out, in_sizes, lambda b, ivs: ivs,
               lambda b, ivs: [L.op(b, "arith.add", iv, L.idx(lo)) for iv, lo in zip(ivs, low)])
    return [out]


@rule("mlc.concat")
def concat(L: FunctionLowering, op: Operation):
    t = op.results[0].type
    axis = norm_axis(op.attr("axis"), t.rank)
    ins = [L.buffers[v] for v in op.operands]
    total = L.idx(0)
    for v in ins:
        total = L.op(L.b, "arith.add", total, L.dim(v, axis))
    sizes = [L.idx(d) if d is not None else total if i == axis else L.dim(ins[0], i) for i, d in enumerate(t.shape)]
    out = L.alloc(t, sizes, op.results[0].name_hint)
    offset = L.idx(0)
    for v in ins:
        at = offset
        _copy_nest(L, v, out, L.dims(v), lambda b, ivs: ivs,
                   lambda b, ivs, at=at: [L.op(b, "arith.add", iv, at) if i == axis else iv for i, iv in enumerate(ivs)])
        offset = L.op(L.b, "arith.add", offset, L.dim(v, axis))
    return [out]


def _as_index(L, b, v):
    """An index read from data; `mlc.origin` names the op it serves, for the run-time bounds error."""
    return b.create("arith.cast", [v], {"mlc.origin": L.current.name}, result_types=[index]).result


@rule("mlc.gather")
def gather(L: FunctionLowering, op: Operation):
    x, idx = (L.buffers[v] for v in op.operands)
    t = op.results[0].type
    axis = norm_axis(op.attr("axis"), x.type.rank)
    k = idx.type.rank
    sizes = L.dims(x)[:axis] + L.dims(idx) + L.dims(x)[axis + 1:]
    out = L.alloc(t, sizes, op.results[0].name_hint)

    def src(b, ivs):
        i = _as_index(L, b, b.create("mem.load", [idx] + ivs[axis:axis + k]).result)
        return ivs[:axis] + [i] + ivs[axis + k:]
    _copy_nest(L, x, out, sizes, src, lambda b, ivs: ivs)
    return [out]


@rule("mlc.scatter_add")
def scatter_add(L: FunctionLowering, op: Operation):
    x, idx, upd = (L.buffers[v] for v in op.operands)
    t = op.results[0].type
    axis = norm_axis(op.attr("axis"), x.type.rank)
    k = idx.type.rank
    out = L.alloc(t, L.dims(x), op.results[0].name_hint)
    _copy_nest(L, x, out, L.dims(x), lambda b, ivs: ivs, lambda b, ivs: ivs)

    def body(b, ivs):
        i = _as_index(L, b, b.create("mem.load", [idx] + ivs[axis:axis + k]).result)
        at = ivs[:axis] + [i] + ivs[axis + k:]
        total = L.op(b, "arith.add", b.create("mem.load", [out] + at).result, b.create("mem.load", [upd] + ivs).result)
        b.create("mem.store", [total, out] + at)
    L.nest(L.dims(upd), body, parallel=False)  # repeated indices accumulate: in order
    return [out]


def _window_index(L, b, o, kk, stride, dilation, low):
    """o * stride + kk * dilation - low (may be outside the input: the caller guards it)."""
    at = L.op(b, "arith.add", L.op(b, "arith.mul", o, L.idx(stride)), L.op(b, "arith.mul", kk, L.idx(dilation)))
    return L.op(b, "arith.sub", at, L.idx(low))


def _inside(L, b, position, size):
    """0 <= position < size for an index that may have gone negative (index arithmetic wraps as i64)."""
    return L.op(b, "arith.and", L.op(b, "arith.ge", position, L.idx(0)), L.op(b, "arith.lt", position, size))


def _guarded_load(L, b, buf, indices, inside, fill):
    """buf[indices] where `inside`, else `fill`: the index is clamped so the load is always in bounds."""
    safe = [L.op(b, "arith.select", inside, i, L.idx(0)) for i in indices]
    return L.op(b, "arith.select", inside, b.create("mem.load", [buf] + safe).result, fill)


@rule("mlc.conv2d")
def conv2d(L: FunctionLowering, op: Operation, epilogue=None):
    """Direct convolution on an explicitly padded copy of the input, so every read is in bounds
    without guards; the loops run n, o | c, i, j | y, x with x innermost (contiguous for stride 1)
    and the weight read once per (c, i, j)."""
    x, w = (L.buffers[v] for v in op.operands)
    t = op.results[0].type
    (sh, sw), (pt, pl, pb, pr), (dh, dw), groups = op.opdef.params(op)
    n, c_in, h, wd = L.dims(x)
    o_ch, cg, kh, kw = L.dims(w)
    e = t.element
    if sw == 1 and gemm.supports(e):
        return _tiled_conv2d(L, op, x, w, epilogue)
    if pt or pl or pb or pr:
        padded_type = TensorType((x.type.shape[0], x.type.shape[1],
                                  None if x.type.shape[2] is None else x.type.shape[2] + pt + pb,
                                  None if x.type.shape[3] is None else x.type.shape[3] + pl + pr), e)
        psizes = [n, c_in, L.op(L.b, "arith.add", h, L.idx(pt + pb)), L.op(L.b, "arith.add", wd, L.idx(pl + pr))]
        xp = L.alloc(padded_type, psizes)
        L.nest(psizes, lambda b, ivs: b.create("mem.store", [L.const(b, 0, e), xp] + ivs))
        _copy_nest(L, x, xp, [n, c_in, h, wd], lambda b, ivs: ivs,
                   lambda b, ivs: ivs[:2] + [L.op(b, "arith.add", ivs[2], L.idx(pt)), L.op(b, "arith.add", ivs[3], L.idx(pl))])
    else:
        xp = x
    oh = L.idx(t.shape[2]) if t.shape[2] is not None else _window_size(L, op, h, 2)
    ow = L.idx(t.shape[3]) if t.shape[3] is not None else _window_size(L, op, wd, 3)
    out = L.alloc(t, [n, o_ch, oh, ow], op.results[0].name_hint)
    L.nest([n, o_ch, oh, ow], lambda b, ivs: b.create("mem.store", [L.const(b, 0, e), out] + ivs))
    per_group = L.idx(t.shape[1] // groups) if t.shape[1] is not None else L.op(L.b, "arith.div", o_ch, L.idx(groups))

    def body(b, ivs):
        bn, o, c, i, j = ivs
        channel = L.op(b, "arith.add", L.op(b, "arith.mul", L.op(b, "arith.div", o, per_group), cg), c)
        weight = b.create("mem.load", [w, o, c, i, j]).result

        def accumulate(ib, yx):
            oy, ox = yx
            iy = L.op(ib, "arith.add", L.op(ib, "arith.mul", oy, L.idx(sh)), L.op(ib, "arith.mul", i, L.idx(dh)))
            ix = L.op(ib, "arith.add", L.op(ib, "arith.mul", ox, L.idx(sw)), L.op(ib, "arith.mul", j, L.idx(dw)))
            v = ib.create("mem.load", [xp, bn, channel, iy, ix]).result
            at = [bn, o, oy, ox]
            ib.create("mem.store", [L.op(ib, "arith.add", ib.create("mem.load", [out] + at).result, L.op(ib, "arith.mul", v, weight)), out] + at)
        L.nest([oh, ow], accumulate, parallel=True, b=b)
    L.nest([n, o_ch, cg, kh, kw], body, parallel=[True, True, False, False, False])
    return _apply_epilogue(L, out, [n, o_ch, oh, ow], epilogue)


def _tiled_conv2d(L: FunctionLowering, op: Operation, x, w, epilogue=None):
    """Stride 1 along x: the register-tiled direct convolution of passes/gemm.py, on a copy of the
    input padded with zeros (and with spare columns on the right for the last tile's lanes)."""
    t = op.results[0].type
    (sh, _), (pt, pl, pb, pr), dilation, groups = op.opdef.params(op)
    n, c_in, h, wd = L.dims(x)
    e = t.element
    spare = gemm.DirectConv.extra_columns(e)
    shape = x.type.shape
    padded_type = TensorType((shape[0], shape[1], None if shape[2] is None else shape[2] + pt + pb,
                              None if shape[3] is None else shape[3] + pl + pr + spare), e)
    psizes = [n, c_in, L.op(L.b, "arith.add", h, L.idx(pt + pb)), L.op(L.b, "arith.add", wd, L.idx(pl + pr + spare))]
    xp = L.alloc(padded_type, psizes)
    L.nest(psizes, lambda b, ivs: b.create("mem.store", [L.const(b, 0, e), xp] + ivs))
    _copy_nest(L, x, xp, [n, c_in, h, wd], lambda b, ivs: ivs,
               lambda b, ivs: ivs[:2] + [L.op(b, "arith.add", ivs[2], L.idx(pt)), L.op(b, "arith.add", ivs[3], L.idx(pl))])
    o_ch = L.dim(w, 0)
    oh = L.idx(t.shape[2]) if t.shape[2] is not None else _window_size(L, op, h, 2)
    ow = L.idx(t.shape[3]) if t.shape[3] is not None else _window_size(L, op, wd, 3)
    out = L.alloc(t, [n, o_ch, oh, ow], op.results[0].name_hint)
    row_epilogue = epilogue and (lambda b, bn, y: L.nest([o_ch, ow], lambda eb, ivs: epilogue(eb, out, [bn, ivs[0], y, ivs[1]]), b=b))
    gemm.DirectConv(xp, w, out, [n, o_ch, oh, ow], L.dim(w, 1), groups, sh, dilation, e, row_epilogue).emit(L, L.b)
    return [out]


def _window_size(L, op, size, axis):
    """A pooled/convolved output size at run time: (size + lo + hi - span) / stride + 1."""
    params = op.opdef.params(op)
    if op.name == "mlc.conv2d":
        (sh, sw), (pt, pl, pb, pr), (dh, dw), _ = params
        kernel = op.operand_types[1].shape[axis]
    else:
        (kh, kw), (sh, sw), (pt, pl, pb, pr) = params
        kernel, dh, dw = (kh if axis == 2 else kw), 1, 1
    lo, hi, s, d = (pt, pb, sh, dh) if axis == 2 else (pl, pr, sw, dw)
    span = d * (kernel - 1) + 1
    grown = L.op(L.b, "arith.sub", L.op(L.b, "arith.add", size, L.idx(lo + hi)), L.idx(span))
    return L.op(L.b, "arith.add", L.op(L.b, "arith.div", grown, L.idx(s)), L.idx(1))


@rule("mlc.max_pool2d", "mlc.avg_pool2d")
def pool2d(L: FunctionLowering, op: Operation):
    x = L.buffers[op.operands[0]]
    t = op.results[0].type
    (kh, kw), (sh, sw), (pt, pl, _, _) = op.opdef.params(op)
    n, c, h, wd = L.dims(x)
    oh = L.idx(t.shape[2]) if t.shape[2] is not None else _window_size(L, op, h, 2)
    ow = L.idx(t.shape[3]) if t.shape[3] is not None else _window_size(L, op, wd, 3)
    out = L.alloc(t, [n, c, oh, ow], op.results[0].name_hint)
    e = t.element
    is_max = op.name == "mlc.max_pool2d"
    lowest = -np.inf if e.is_float else np.iinfo(e.np_dtype).min
    counts = L.alloc(TensorType((), e), []) if not is_max else None

    def body(b, ivs):
        bn, ch, oy, ox = ivs
        b.create("mem.store", [L.const(b, lowest if is_max else 0, e), out] + ivs)
        if counts is not None:
            b.create("mem.store", [L.const(b, 0, e), counts])

        def acc(ib, kvs):
            i, j = kvs
            iy, ix = _window_index(L, ib, oy, i, sh, 1, pt), _window_index(L, ib, ox, j, sw, 1, pl)
            inside = L.op(ib, "arith.and", _inside(L, ib, iy, h), _inside(L, ib, ix, wd))
            v = _guarded_load(L, ib, x, [bn, ch, iy, ix], inside, L.const(ib, lowest if is_max else 0, e))
            cur = ib.create("mem.load", [out] + ivs).result
            ib.create("mem.store", [L.op(ib, "arith.maximum" if is_max else "arith.add", cur, v), out] + ivs)
            if counts is not None:
                one = ib.create("arith.cast", [inside], result_types=[e]).result
                ib.create("mem.store", [L.op(ib, "arith.add", ib.create("mem.load", [counts]).result, one), counts])
        L.nest([L.idx(kh), L.idx(kw)], acc, parallel=False, b=b)
        if not is_max:
            divisor = L.const(b, kh * kw, e) if op.attr("count_include_pad") else b.create("mem.load", [counts]).result
            b.create("mem.store", [L.op(b, "arith.div", b.create("mem.load", [out] + ivs).result, divisor), out] + ivs)
    L.nest([n, c, oh, ow], body, parallel=counts is None)
    return [out]


def _pool_grad_buffers(L: FunctionLowering, op: Operation):
    """(input, cotangent, the result buffer, kernel, stride, padding) of a pooling's gradient op."""
    x, g = (L.buffers[v] for v in op.operands)
    out = L.alloc(op.results[0].type, L.dims(x), op.results[0].name_hint)
    return (x, g, out) + tuple(op.opdef.params(op))


@rule("mlc.max_pool2d_grad")
def max_pool2d_grad(L: FunctionLowering, op: Operation):
    """Scatter form, one (n, c) plane per parallel iteration: for each window in order, find its
    first maximum (carried in registers) and add the window's cotangent there."""
    x, g, out, (kh, kw), (sh, sw), (pt, pl, _, _) = _pool_grad_buffers(L, op)
    n, c, h, wd = L.dims(x)
    oh, ow = L.dim(g, 2), L.dim(g, 3)
    e = out.type.element

    def plane(b, ivs):
        L.nest([h, wd], lambda zb, yx: zb.create("mem.store", [L.const(zb, 0, e), out] + ivs + yx), parallel=False, b=b)

        def window(wb, oyx):
            oy, ox = oyx
            top, left = (L.op(wb, "arith.maximum", L.op(wb, "arith.sub", L.op(wb, "arith.mul", o, L.idx(s)), L.idx(lo)), L.idx(0))
                         for o, s, lo in ((oy, sh, pt), (ox, sw, pl)))

            def row(rb, i, best, by, bx):
                def col(cb, j, best, by, bx):
                    iy, ix = _window_index(L, cb, oy, i, sh, 1, pt), _window_index(L, cb, ox, j, sw, 1, pl)
                    inside = L.op(cb, "arith.and", _inside(L, cb, iy, h), _inside(L, cb, ix, wd))
                    v = _guarded_load(L, cb, x, ivs + [iy, ix], inside, L.const(cb, -np.inf, e))
                    better = L.op(cb, "arith.gt", v, best)
                    return [L.op(cb, "arith.select", better, v, best), L.op(cb, "arith.select", better, iy, by),
                            L.op(cb, "arith.select", better, ix, bx)]
                return L.loop(rb, L.idx(0), L.idx(kw), col, carried=[best, by, bx])
            _, by, bx = L.loop(wb, L.idx(0), L.idx(kh), row, carried=[L.const(wb, -np.inf, e), top, left])
            at = ivs + [by, bx]
            total = L.op(wb, "arith.add", wb.create("mem.load", [out] + at).result, wb.create("mem.load", [g] + ivs + oyx).result)
            wb.create("mem.store", [total, out] + at)
        L.nest([oh, ow], window, parallel=False, b=b)
    L.nest([n, c], plane)
    return [out]


@rule("mlc.avg_pool2d_grad")
def avg_pool2d_grad(L: FunctionLowering, op: Operation):
    """Gather form: each input element sums g / divisor over the windows that hold it."""
    x, g, out, (kh, kw), (sh, sw), (pt, pl, _, _) = _pool_grad_buffers(L, op)
    n, c, h, wd = L.dims(x)
    oh, ow = L.dim(g, 2), L.dim(g, 3)
    e = out.type.element

    def covered(b, o, s, lo, k, size):
        """How many of window o's rows (or columns) lie inside the input."""
        start = L.op(b, "arith.sub", L.op(b, "arith.mul", o, L.idx(s)), L.idx(lo))
        stop = L.op(b, "arith.minimum", L.op(b, "arith.add", start, L.idx(k)), size)
        return L.op(b, "arith.sub", stop, L.op(b, "arith.maximum", start, L.idx(0)))

    def element(b, ivs):
        bn, ch, iy, ix = ivs

        def row(rb, i, acc):
            oy, in_y = _source_index(L, rb, iy, i, sh, 1, pt, oh)

            def col(cb, j, acc):
                ox, in_x = _source_index(L, cb, ix, j, sw, 1, pl, ow)
                inside = L.op(cb, "arith.and", in_y, in_x)
                share = _guarded_load(L, cb, g, [bn, ch, oy, ox], inside, L.const(cb, 0, e))
                if op.attr("count_include_pad"):
                    divisor = L.const(cb, kh * kw, e)
                else:
                    cells = L.op(cb, "arith.mul", covered(cb, oy, sh, pt, kh, h), covered(cb, ox, sw, pl, kw, wd))
                    divisor = cb.create("arith.cast", [L.op(cb, "arith.maximum", cells, L.idx(1))], result_types=[e]).result
                return [L.op(cb, "arith.add", acc, L.op(cb, "arith.div", share, divisor))]
            return L.loop(rb, L.idx(0), L.idx(kw), col, carried=[acc])
        total = L.loop(b, L.idx(0), L.idx(kh), row, carried=[L.const(b, 0, e)])[0]
        b.create("mem.store", [total, out] + ivs)
    L.nest([n, c, h, wd], element)
    return [out]


def _source_index(L, b, position, kk, s, d, lo, size):
    """The window (or transposed-convolution input) index q with q * s + kk * d - lo == position, and
    whether there is one inside 0..size."""
    num = L.op(b, "arith.sub", L.op(b, "arith.add", position, L.idx(lo)), L.op(b, "arith.mul", kk, L.idx(d)))
    q = L.op(b, "arith.div", num, L.idx(s))
    exact = L.op(b, "arith.eq", L.op(b, "arith.mul", q, L.idx(s)), num)
    inside = L.op(b, "arith.and", L.op(b, "arith.ge", num, L.idx(0)), L.op(b, "arith.and", exact, L.op(b, "arith.lt", q, size)))
    return q, inside


@rule("mlc.conv2d_transpose")
def conv2d_transpose(L: FunctionLowering, op: Operation):
    """Gather form: out[n, g*O + o, y, x] = sum over c, i, j of in[n, g*C + c, (y + top - i*d) / s, ...]
    * w[g*C + c, o, i, j], where the division is exact and lands inside the input."""
    x, w = (L.buffers[v] for v in op.operands)
    t = op.results[0].type
    (sh, sw), pads, (dh, dw), groups = tensor_ops.Conv2d.params(op)
    pt, pl = pads[:2]
    n, c_in, h, wd = L.dims(x)
    _, og, kh, kw = L.dims(w)
    sizes = [n, L.op(L.b, "arith.mul", og, L.idx(groups)) if t.shape[1] is None else L.idx(t.shape[1])]
    for axis, (size, s, d, lo) in ((2, (h, sh, dh, pt)), (3, (wd, sw, dw, pl))):
        if t.shape[axis] is not None:
            sizes.append(L.idx(t.shape[axis]))
            continue
        k = op.operand_types[1].shape[axis]
        hi = pads[axis]
        extra = op.attr("output_padding")[axis - 2]
        grown = L.op(L.b, "arith.mul", L.op(L.b, "arith.sub", size, L.idx(1)), L.idx(s))
        sizes.append(L.op(L.b, "arith.add", grown, L.idx(d * (k - 1) + extra + 1 - lo - hi)))
    out = L.alloc(t, sizes, op.results[0].name_hint)
    cg = L.op(L.b, "arith.div", c_in, L.idx(groups))
    e = t.element

    def body(b, ivs):
        bn, oc, oy, ox = ivs
        b.create("mem.store", [L.const(b, 0, e), out] + ivs)
        g = L.op(b, "arith.div", oc, og)
        o = L.op(b, "arith.sub", oc, L.op(b, "arith.mul", g, og))

        def acc(ib, kvs):
            c, i, j = kvs
            iy, in_y = _source_index(L, ib, oy, i, sh, dh, pt, h)
            ix, in_x = _source_index(L, ib, ox, j, sw, dw, pl, wd)
            ci = L.op(ib, "arith.add", L.op(ib, "arith.mul", g, cg), c)
            v = _guarded_load(L, ib, x, [bn, ci, iy, ix], L.op(ib, "arith.and", in_y, in_x), L.const(ib, 0, e))
            prod = L.op(ib, "arith.mul", v, ib.create("mem.load", [w, ci, o, i, j]).result)
            ib.create("mem.store", [L.op(ib, "arith.add", ib.create("mem.load", [out] + ivs).result, prod), out] + ivs)
        L.nest([cg, kh, kw], acc, parallel=False, b=b)
    L.nest(sizes, body)
    return [out]


@rule("mlc.scan")
def scan(L: FunctionLowering, op: Operation):
    """A loop over the steps. Carries live in buffers made before the loop; each step copies its
    sequence slices into per-step buffers, runs the lowered body, copies the yielded carries back and
    the outputs into their slot of the stacked results, and frees what the body allocated."""
    k = op.attr("num_carries")
    carries, seqs = [L.buffers[v] for v in op.operands[:k]], [L.buffers[v] for v in op.operands[k:]]
    block = op.regions[0].blocks[0]
    yield_op = block.last
    steps = L.dim(seqs[0], 0) if seqs else L.idx(op.attr("length"))
    state = []
    for c, r in zip(carries, op.results[:k]):
        state.append(L.alloc(TensorType(c.type.shape, c.type.element), L.dims(c), r.name_hint))
        _copy_nest(L, c, state[-1], L.dims(c), lambda b, ivs: ivs, lambda b, ivs: ivs)
    slices = [L.alloc(TensorType(s.type.shape[1:], s.type.element), L.dims(s)[1:]) for s in seqs]
    loop_block = Block([index], ["t"])
    loop = L.b.create("loop.for", [L.idx(0), steps], regions=[Region([loop_block])])
    before_loop = Builder.before(loop, L.module)
    L.b = Builder.at_end(loop_block, L.module, op.loc)
    t = loop_block.args[0]
    if op.attr("reverse"):
        t = L.op(L.b, "arith.sub", L.op(L.b, "arith.sub", steps, L.idx(1)), t)
    for s, sl in zip(seqs, slices):
        _copy_nest(L, s, sl, L.dims(sl), lambda b, ivs: [t] + ivs, lambda b, ivs: ivs)
    for arg, buf in zip(block.args, state + slices):
        L.buffers[arg] = buf
    first_alloc = len(L.allocs)
    body_ops = [o for o in block.ops if o is not yield_op]
    for o in body_ops:  # the body is lowered inside the loop, in place
        o.detach()
        loop_block.append(o)
    L.lower_ops(body_ops)
    L.b = Builder.at_end(loop_block, L.module, op.loc)
    yielded = [L.buffers[v] for v in yield_op.operands]
    results = list(state)
    for r, y in zip(op.results[k:], yielded[k:]):  # outputs first: one may be a carry this step started from
        sizes = [steps] + [L.idx(d) if d is not None else _size_before(L, loop, before_loop, y, i, op)
                           for i, d in enumerate(r.type.shape[1:])]
        saved, L.b = L.b, before_loop
        stacked = L.alloc(r.type, sizes, r.name_hint)
        L.b = saved
        _copy_nest(L, y, stacked, L.dims(y), lambda b, ivs: ivs, lambda b, ivs: [t] + ivs)
        results.append(stacked)
    next_carries = []
    for i, y in enumerate(yielded[:k]):  # a carry passed on to another slot is read before it is overwritten
        if y in state and y is not state[i]:
            copy = L.alloc(TensorType(y.type.shape, y.type.element), L.dims(y))
            _copy_nest(L, y, copy, L.dims(y), lambda b, ivs: ivs, lambda b, ivs: ivs)
            y = copy
        next_carries.append(y)
    for buf, y in zip(state, next_carries):
        if y is not buf:
            _copy_nest(L, y, buf, L.dims(y), lambda b, ivs: ivs, lambda b, ivs: ivs)
    for buf in L.allocs[first_alloc:]:
        if buf.defining_op().parent is loop_block:
            L.b.create("mem.dealloc", [buf])
    L.b.create("loop.yield")
    L.b = Builder.before(op, L.module)
    return results


def _in_loop(loop: Operation, v: Value) -> bool:
    op = v.defining_op() if v.defining_op() is not None else v.owner.parent.parent
    while op is not None:
        if op is loop:
            return True
        op = op.parent_op
    return False


def _size_before(L, loop, b: Builder, buf: Value, axis: int, op):
    """Dim `axis` of a buffer made in the loop body, computed before the loop: the body's shape code
    uses only dims of buffers made before the loop (carries, slices, captured values) and arithmetic."""
    def size_of(buf, axis):
        if not _in_loop(loop, buf):
            return b.create("mem.dim", [buf], {"axis": axis}).result if buf.type.shape[axis] is None \
                else L.idx(buf.type.shape[axis])
        alloc = buf.defining_op()
        dynamic = [i for i, d in enumerate(buf.type.shape) if d is None]
        return expr(alloc.operands[dynamic.index(axis)])

    def expr(v):
        if not _in_loop(loop, v):
            return v
        d = v.defining_op()
        if d is not None and d.name == "mem.dim":
            return size_of(d.operands[0], d.attr("axis"))
        if d is not None and d.name.startswith("arith.") and v.type == index:
            return b.create(d.name, [expr(o) for o in d.operands], dict(d.attributes)).result
        raise error(op.loc, "cannot size this scan's outputs before its loop yet", op.name)
    return size_of(buf, axis)


PHILOX_M = (0xD2511F53, 0xCD9E8D57)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)


def _philox_words(L, b, block, seed, offset):
    """The four 32-bit words of Philox-4x32-10 (ir/random.py) for counter block `block`, in i64 arithmetic."""
    c = lambda v: L.const(b, v, i64)  # noqa: E731
    op = lambda name, *xs: L.op(b, name, *xs)  # noqa: E731
    low, shift = c(0xFFFFFFFF), c(32)
    c0, c1 = op("arith.and", block, low), op("arith.shru", block, shift)
    c2, c3 = op("arith.and", offset, low), op("arith.shru", offset, shift)
    k0, k1 = op("arith.and", seed, low), op("arith.shru", seed, shift)
    for r in range(10):
        p0, p1 = op("arith.mul", c(PHILOX_M[0]), c0), op("arith.mul", c(PHILOX_M[1]), c2)
        hi0, lo0 = op("arith.shru", p0, shift), op("arith.and", p0, low)
        hi1, lo1 = op("arith.shru", p1, shift), op("arith.and", p1, low)
        c0, c1, c2, c3 = op("arith.xor", op("arith.xor", hi1, c1), k0), lo1, op("arith.xor", op("arith.xor", hi0, c3), k1), lo0
        if r < 9:
            k0 = op("arith.and", op("arith.add", k0, c(PHILOX_W[0])), low)
            k1 = op("arith.and", op("arith.add", k1, c(PHILOX_W[1])), low)
    return [c0, c1, c2, c3]


@rule("mlc.random_uniform", "mlc.random_normal")
def random(L: FunctionLowering, op: Operation):
    """Per element i: the Philox words of block i // 4 (ir/random.py defines the bits), computed in f64
    as the interpreter does, then rounded to the element type."""
    key = L.buffers[op.operands[0]]
    t = op.results[0].type
    sizes = L.dims(L.buffers[op.operands[1]]) if len(op.operands) == 2 else [L.idx(d) for d in t.shape]
    out = L.alloc(t, sizes, op.results[0].name_hint)
    seed = L.b.create("mem.load", [key, L.idx(0)]).result
    offset = L.b.create("mem.load", [key, L.idx(1)]).result
    uniform = op.name == "mlc.random_uniform"

    def word_at(b, words, lane):
        w = words[3]
        for k in (2, 1, 0):
            w = L.op(b, "arith.select", L.op(b, "arith.eq", lane, L.const(b, k, i64)), words[k], w)
        return w

    def unit(b, w, plus_one):
        bits = L.op(b, "arith.shru", w, L.const(b, 8, i64))
        if plus_one:
            bits = L.op(b, "arith.add", bits, L.const(b, 1, i64))
        return L.op(b, "arith.mul", b.create("arith.cast", [bits], result_types=[f64]).result, L.const(b, 2.0 ** -24, f64))

    def body(b, ivs):
        flat = L.idx(0)
        for iv, s in zip(ivs, sizes):
            flat = L.op(b, "arith.add", L.op(b, "arith.mul", flat, s), iv)
        i = b.create("arith.cast", [flat], result_types=[i64]).result
        four = L.const(b, 4, i64)
        block = L.op(b, "arith.div", i, four)
        lane = L.op(b, "arith.sub", i, L.op(b, "arith.mul", block, four))
        words = _philox_words(L, b, block, seed, offset)
        if uniform:
            lo, hi = op.attr("low"), op.attr("high")
            v = L.op(b, "arith.add", L.const(b, lo, f64), L.op(b, "arith.mul", L.const(b, hi - lo, f64), unit(b, word_at(b, words, lane), False)))
        else:
            second = L.op(b, "arith.ge", lane, L.const(b, 2, i64))
            u1 = unit(b, L.op(b, "arith.select", second, words[2], words[0]), True)
            u2 = unit(b, L.op(b, "arith.select", second, words[3], words[1]), False)
            r = L.op(b, "arith.sqrt", L.op(b, "arith.mul", L.const(b, -2.0, f64), L.op(b, "arith.log", u1)))
            angle = L.op(b, "arith.mul", L.const(b, 2 * np.pi, f64), u2)
            odd = L.op(b, "arith.eq", L.op(b, "arith.sub", lane, L.op(b, "arith.mul", L.op(b, "arith.div", lane, L.const(b, 2, i64)), L.const(b, 2, i64))), L.const(b, 1, i64))
            z = L.op(b, "arith.mul", r, L.op(b, "arith.select", odd, L.op(b, "arith.sin", angle), L.op(b, "arith.cos", angle)))
            v = L.op(b, "arith.add", L.const(b, op.attr("mean"), f64), L.op(b, "arith.mul", L.const(b, op.attr("std"), f64), z))
        b.create("mem.store", [b.create("arith.cast", [v], result_types=[t.element]).result, out] + ivs)
    L.nest(sizes, body)
    return [out]


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
