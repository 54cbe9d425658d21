"""map-to-gpu: the loop nests of a lowered function become kernels (gpu.launch); what stays outside is
the host's part: allocations, sizes, checks on sizes, the order of the launches and the loops around them.

    loop.for %i = 0 to %m {parallel} { loop.for %j = 0 to %n {parallel} { body } }
becomes
    %threads = %m * %n                                  (on the host)
    %blocks = min(ceil(%threads / block), max-blocks)
    gpu.launch %blocks {block = [block]} {
    ^bb0(%bid, %tid):
      loop.for %r = 0 to %rounds {                      (grid-stride: enough rounds to cover %threads)
        %g = %bid * block + %tid + %r * %blocks * block
        loop.if %g < %threads { %i = %g / %n; %j = %g - %i * %n; body }
      }
    }

- a nest of parallel loops: one thread per iteration of its outer parallel loops (those whose bounds
  the host knows, collapsed into one range), the inner loops run by each thread; an elementwise
  innermost loop over f32 rows 4 iterations per thread, as 16-byte vector loads and stores; a row
  reduction a warp per iteration, combined with shuffles;
- a loop that allocates or holds parallel loops (a scan's steps, a row-blocked product) stays on the
  host, and its body is mapped in turn;
- other work on device data between kernels (a sequential loop, a scalar load or store): one thread.

A value computed on the device and needed by the host (a size read from data) is an error naming the op.
"""
from __future__ import annotations

from mlc.ir.core import Block, Builder, Module, Operation, Region
from mlc.ir.diagnostics import error
from mlc.ir.registry import PURE
from mlc.ir.dialects.mlc import BINARY, UNARY
from mlc.ir.types import VectorType, index

from .lowering.core import LoopBuilder
from .manager import Pass, PipelineError

DEVICE_MEMORY = ("mem.load", "mem.store", "vector.load", "vector.store")
HOST_ONLY = ("mem.alloc", "mem.dealloc", "mem.from_tensor", "mem.to_tensor", "mem.reshape", "mem.subview", "gpu.launch")


class MapToGpu(Pass):
    name = "map-to-gpu"
    summary = "parallel loop nests become gpu.launch kernels, a thread per iteration; the rest is host code"
    options = {"block": 256, "max-blocks": 4096}

    def __init__(self, **options):
        super().__init__(**options)
        if not 32 <= self.option("block") <= 1024 or self.option("block") % 32 or self.option("max-blocks") < 1:
            raise PipelineError(f"map-to-gpu needs a block of 32 to 1024 threads, a multiple of 32, and max-blocks >= 1, got {self}")

    def run(self, module: Module) -> None:
        for f in module.functions.values():
            Mapper(module, f, self.option("block"), self.option("max-blocks")).map_block(f.body)


def _stays_on_host(loop: Operation) -> bool:
    """A loop that allocates or calls, or a sequential loop holding parallel ones: the host runs it."""
    inner = list(loop.walk())[1:]
    if any(o.name in HOST_ONLY or o.name.startswith(("mlc.", "func.")) for o in inner):
        return True
    return not loop.attr("parallel") and any(o.name == "loop.for" and o.attr("parallel") for o in inner)


class Mapper:
    def __init__(self, module: Module, func, block: int, max_blocks: int):
        self.module, self.block, self.max_blocks = module, block, max_blocks
        self.L = LoopBuilder(module, func)
        self.on_device: set = set()  # values computed by device code outside any launch so far

    def map_block(self, block: Block) -> None:
        group: list[Operation] = []  # device work waiting to become one single-thread launch
        for op in list(block):
            if op.name == "loop.for" and _stays_on_host(op):
                self.one_thread(group)
                self.map_block(op.regions[0].blocks[0])
            elif op.name == "loop.for" and op.attr("parallel"):
                prelude = _rematerialisable(group, op)
                self.one_thread([o for o in group if o not in prelude])
                self.parallel_nest(op, prelude)
                group = [o for o in prelude if any(r.uses for r in o.results)]
                for o in reversed([o for o in prelude if o not in group]):
                    o.erase()
            elif op.name == "loop.for" or op.name in DEVICE_MEMORY or any(v in self.on_device for v in op.operands):
                group.append(op)
                self.on_device.update(op.results)
            elif group and PURE in op.opdef.traits and not op.regions:
                op.detach()  # host arithmetic between device work: done before it
                group[0].parent.insert_before(group[0], op)
            else:
                self.one_thread(group)
        self.one_thread(group)

    # --- kernels -----------------------------------------------------------------------------------------
    def launch(self, before: Operation, blocks, threads: int, body) -> None:
        """gpu.launch `blocks` x `threads` before `before`; body(builder, bid, tid) fills it."""
        block = Block([index, index], ["bid", "tid"])
        b = Builder.before(before, self.module)
        b.create("gpu.launch", [blocks], {"block": [threads]}, regions=[Region([block])])
        inner = Builder.at_end(block, self.module, before.loc)
        body(inner, *block.args)
        inner.create("gpu.terminator", [])

    def one_thread(self, group: list) -> None:
        """The group's ops, in order, as a launch of one thread."""
        if not group:
            return
        members = set(group)
        for op in group:
            for r in op.results:
                outside = [u for u in r.users if not u.is_within(members)]
                if outside:
                    raise error(outside[0].loc, "map-to-gpu: this host op needs a value computed on the GPU", outside[0].name)

        def body(b, bid, tid):
            for op in group:
                op.detach()
                b.block.insert_before(b.anchor, op)
        self.launch(group[0], self.L.idx(1), 1, body)
        group.clear()

    def parallel_nest(self, outer: Operation, prelude: list) -> None:
        """A launch of a thread per iteration of outer's collapsible loops; each thread first
        recomputes the prelude (device values the nest reads: loads of a random key, say)."""
        loops = self.collapsible(outer, {r for o in prelude for r in o.results})
        L, b = self.L, Builder.before(outer, self.module)
        trips = []
        for loop in loops:
            lb, ub = loop.operands[:2]
            span = L.op(b, "arith.sub", ub, lb)
            step = loop.attr("step")
            trips.append(span if step == 1 else L.op(b, "arith.div", L.op(b, "arith.add", span, L.idx(step - 1)), L.idx(step)))
        innermost = loops[-1].regions[0].blocks[0]
        warp = _warp_per_iteration(innermost)
        lanes = 1 if warp else _vector_lanes(loops[-1])
        if lanes > 1:  # each thread takes `lanes` consecutive iterations of the innermost loop
            trips[-1] = L.idx(_constant(loops[-1].operands[1]) // lanes)
        total = trips[0]
        for t in trips[1:] + ([L.idx(WARP)] if warp else []):
            total = b.create("arith.mul", [total, t], name_hint="threads").result
        rounded_up = L.op(b, "arith.add", total, L.idx(self.block - 1))
        needed = L.op(b, "arith.div", rounded_up, L.idx(self.block))
        blocks = b.create("arith.minimum", [needed, L.idx(self.max_blocks)], name_hint="blocks").result
        stride = L.op(b, "arith.maximum", L.op(b, "arith.mul", blocks, L.idx(self.block)), L.idx(1))
        rounds = b.create("arith.div", [L.op(b, "arith.add", total, L.op(b, "arith.sub", stride, L.idx(1))), stride],
                          name_hint="rounds").result

        def body(kb, bid, tid):
            mapping = {}
            for op in prelude:
                kb.block.insert_before(kb.anchor, op.clone(mapping))
            first = L.op(kb, "arith.add", L.op(kb, "arith.mul", bid, L.idx(self.block)), tid)
            L.loop(kb, L.idx(0), rounds, lambda rb, r: iteration(rb, rb.create(
                "arith.add", [first, L.op(rb, "arith.mul", r, stride)], name_hint="g").result, mapping))

        def iteration(kb, g, mapping):
            """Thread g's iteration of the nest (a grid of at most max-blocks blocks strides over them)."""
            then, other = Block(), Block()
            in_range = kb.create("arith.lt", [g, total], name_hint="in_range").result
            kb.create("loop.if", [in_range], regions=[Region([then]), Region([other])])
            Builder.at_end(other, self.module).create("loop.yield", [])
            tb = Builder.at_end(then, self.module, outer.loc)
            ivs, rest = [], g
            if warp:
                rest = tb.create("arith.div", [g, L.idx(WARP)], name_hint="row").result
                lane = tb.create("arith.sub", [g, L.op(tb, "arith.mul", rest, L.idx(WARP))], name_hint="lane").result
            for loop, trip in reversed(list(zip(loops, trips))):
                if loop is loops[0]:
                    position = rest
                else:
                    quotient = L.op(tb, "arith.div", rest, trip)
                    position = L.op(tb, "arith.sub", rest, L.op(tb, "arith.mul", quotient, trip))
                    rest = quotient
                step = loop.attr("step") * (lanes if loop is loops[-1] else 1)
                scaled = position if step == 1 else L.op(tb, "arith.mul", position, L.idx(step))
                ivs.insert(0, L.op(tb, "arith.add", loop.operands[0], scaled))
            mapping.update(zip([lp.regions[0].blocks[0].args[0] for lp in loops], ivs))
            vectors: set = set()
            for op in innermost:
                if op is innermost.last:
                    continue
                if warp:
                    self.across_warp(tb, op, mapping, lane)
                elif lanes > 1:
                    self.as_vectors(tb, op, mapping, innermost.args[0], lanes, vectors)
                else:
                    then.insert_before(tb.anchor, op.clone(mapping))
            tb.create("loop.yield", [])
        self.launch(outer, blocks, self.block, body)
        outer.drop_all_references()
        outer.detach()

    def as_vectors(self, b: Builder, op: Operation, mapping: dict, iv, lanes: int, vectors: set) -> None:
        """op of an iteration a thread runs `lanes` of at once (see _vector_lanes): accesses along
        the innermost index as aligned vector loads and stores, the arithmetic on what they read as
        vector arithmetic, everything else (the same for all the lanes) as it is."""
        def mapped(v):
            return mapping.get(v, v)

        def vector(v):
            if v in vectors:
                return mapped(v)
            return b.create("vector.broadcast", [mapped(v)], result_types=[VectorType((lanes,), v.type)]).result
        access = _access_indices(op)
        if access is not None and access and access[-1] is iv:
            at = [mapped(v) for v in access]
            if op.name == "mem.load":
                t = VectorType((lanes,), op.results[0].type)
                mapping[op.results[0]] = b.create("vector.load", [mapped(op.operands[0])] + at, {"aligned": True}, result_types=[t]).result
                vectors.add(op.results[0])
            else:
                b.create("vector.store", [vector(op.operands[0]), mapped(op.operands[1])] + at, {"aligned": True})
            return
        if any(v in vectors for v in op.operands):
            t = VectorType((lanes,), op.results[0].type)
            mapping[op.results[0]] = b.create(op.name, [vector(v) for v in op.operands], dict(op.attributes), result_types=[t]).result
            vectors.add(op.results[0])
            return
        b.block.insert_before(b.anchor, op.clone(mapping))

    def across_warp(self, b: Builder, op: Operation, mapping: dict, lane) -> None:
        """op of an iteration that a warp runs: its loops strided over the lanes (a reduction then
        combined across them with shuffles, so every lane has the total), its stores made by lane 0."""
        L = self.L
        if op.name == "mem.store":
            then, other = Block(), Block()
            b.create("loop.if", [L.op(b, "arith.eq", lane, L.idx(0))], regions=[Region([then]), Region([other])])
            then.append(op.clone(mapping))
            Builder.at_end(then, self.module).create("loop.yield", [])
            Builder.at_end(other, self.module).create("loop.yield", [])
            return
        if op.name != "loop.for":
            b.block.insert_before(b.anchor, op.clone(mapping))
            return
        step = op.attr("step")
        strided = op.clone(mapping)
        strided.set_operand(0, L.op(b, "arith.add", strided.operands[0], L.op(b, "arith.mul", lane, L.idx(step))))
        strided.set_attr("step", step * WARP)
        combines = _reduction_combines(op)
        for k, name in enumerate(combines):
            strided.set_operand(2 + k, L.const(b, IDENTITY[name], op.results[k].type))
        b.block.insert_before(b.anchor, strided)
        for k, name in enumerate(combines):
            total = strided.results[k]
            for distance in (16, 8, 4, 2, 1):
                other = b.create("gpu.shuffle", [total, L.idx(distance)], {"mode": "xor"}).result
                total = b.create(name, [total, other], {"reassoc": True}).result
            mapping[op.results[k]] = b.create(name, [mapping.get(op.operands[2 + k], op.operands[2 + k]), total],
                                              {"reassoc": True}).result

    def collapsible(self, outer: Operation, on_device: set) -> list:
        """outer and the parallel loops perfectly nested in it whose bounds do not depend on it. The
        pure ops between two such loops move out: before outer if they are loop-invariant, else
        into the inner loop's body (recomputed per iteration: an index clamp, say)."""
        loops = [outer]
        while True:
            body = loops[-1].regions[0].blocks[0]
            inner = [o for o in body if o is not body.last]
            nested = [o for o in inner if o.name == "loop.for"]
            if len(nested) != 1 or not nested[0].attr("parallel") or nested[0].operands[2:]:
                return loops
            rest = [o for o in inner if o is not nested[0]]
            if any(PURE not in o.opdef.traits or o.regions or o.name in DEVICE_MEMORY for o in rest):
                return loops
            varying = on_device | {lp.regions[0].blocks[0].args[0] for lp in loops}
            sink = []
            for o in rest:  # in order: an op using one that sinks sinks too
                if any(v in varying for v in o.operands):
                    sink.append(o)
                    varying.update(o.results)
            if any(v in varying for v in nested[0].operands[:2]):
                return loops
            inner_body = nested[0].regions[0].blocks[0]
            first = inner_body.first
            for o in rest:
                o.detach()
                if o in sink:
                    inner_body.insert_before(first, o)
                else:
                    outer.parent.insert_before(outer, o)
            loops.append(nested[0])


WARP = 32
IDENTITY = {"arith.add": 0.0, "arith.mul": 1.0, "arith.maximum": float("-inf"), "arith.minimum": float("inf")}


def _reduction_combines(loop: Operation) -> list | None:
    """For a loop whose carried values are each folded with one associative op (`{reassoc}`, f32,
    the value used nowhere else), those ops' names; else None."""
    body = loop.regions[0].blocks[0]
    names = []
    for acc, out in zip(body.args[1:], body.last.operands):
        p = out.defining_op()
        if (p is None or p.parent is not body or p.name not in IDENTITY or not p.attr("reassoc")
                or acc not in p.operands or len(acc.uses) != 1 or out.type.name != "f32" or len(out.uses) != 1):
            return None
        names.append(p.name)
    return names


def _warp_per_iteration(body) -> bool:
    """Whether a warp, rather than a thread, should run each iteration of this loop body: it reduces
    rows (a loop folding f32 values), and each of its loops either reduces so or carries nothing."""
    loops = [o for o in body if o.name == "loop.for"]
    reductions = [o for o in loops if o.results and _reduction_combines(o)]
    return bool(reductions) and all(not o.results or o in reductions for o in loops)


VECTOR_BYTES = 16  # the widest global load and store of a GPU thread


def _constant(v) -> int | None:
    p = v.defining_op()
    return p.attr("value") if p is not None and p.name == "arith.constant" else None


def _access_indices(op: Operation) -> list | None:
    if op.name == "mem.load":
        return list(op.operands[1:])
    if op.name == "mem.store":
        return list(op.operands[2:])
    return None


def _vector_lanes(loop: Operation) -> int:
    """How many consecutive iterations of this innermost loop one thread can run as vector ops (16
    bytes of f32: 4), else 1. It takes: a loop from 0 to a constant multiple of that, whose body
    only loads, stores and computes elementwise in f32, reads and writes along its index only as the
    last index of buffers whose rows are a multiple of that long (so each access is aligned), uses
    its index for nothing else, and writes only there (a store elsewhere would be made by every lane)."""
    body = loop.regions[0].blocks[0]
    iv, lanes = body.args[0], VECTOR_BYTES // 4
    trip = _constant(loop.operands[1])
    if loop.attr("step") != 1 or _constant(loop.operands[0]) != 0 or trip is None or trip % lanes:
        return 1
    varying, vector_access = set(), False
    for op in body:
        if op is body.last:
            continue
        access = _access_indices(op)
        if access is not None:
            buffer = op.operands[0 if op.name == "mem.load" else 1].type
            if buffer.element.name != "f32" or any(v is iv for v in access[:-1]):
                return 1
            along = bool(access) and access[-1] is iv
            if along and (buffer.shape[-1] is None or buffer.shape[-1] % lanes):
                return 1
            if op.name == "mem.store" and not along:
                return 1
            if op.name == "mem.load" and along:
                varying.add(op.results[0])
            vector_access |= along
            continue
        name = op.name[len("arith."):]
        if op.name == "arith.constant":
            continue
        if not op.name.startswith("arith.") or not (name in UNARY or name in BINARY or name == "select") or iv in op.operands:
            return 1
        if any(v in varying for v in op.operands):
            if any(t.name not in ("f32", "i1") for t in [*op.operand_types, op.results[0].type]):
                return 1
            varying.add(op.results[0])
    return lanes if vector_access else 1


def _rematerialisable(group: list, nest: Operation) -> list:
    """The pending device ops that every thread of the nest can recompute for itself: loads and pure
    ops, when the nest uses them and writes none of the buffers they read."""
    if not group or any(o.name not in ("mem.load", "vector.load") and (PURE not in o.opdef.traits or o.regions)
                        for o in group):
        return []
    written = {o.operands[1] for o in nest.walk() if o.name in ("mem.store", "vector.store")}
    if any(o.operands[0] in written for o in group if o.name in ("mem.load", "vector.load")):
        return []
    return list(group)
