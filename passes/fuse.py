"""fuse: groups chains of elementwise ops into `mlc.fusion` ops, one kernel (loop nest) each.

An elementwise op joins its consumer's group when it has exactly one use, that use is elementwise,
in the same block, and of the same rank and shape (so nothing is recomputed and nothing broadcast up);
so does a slice, which the kernel then reads its operand through (an LSTM's gates, sliced from one
product, are read where they lie instead of copied out first).
A matmul or conv2d joins the same way as the group's *anchor* (at most one per group, and only when
the group's result has its element type): the chain becomes its epilogue, applied to each block of
the result while it is in cache, in place — bias + activation cost no extra pass over memory.
Its other inputs' `?` dims must be proven the result's (passes/dims.py: a training step's batch), and
a chain on a product's result seen through a reshape (a stack of rows' product) is first done in the
product's shape, so that it can join (lift_through_reshapes).
Row kernels come first: a reduction over trailing (static) dims joins, as one kernel, its elementwise
producers and consumers of the full row shape and the reduced values computed from it (softmax or
layer norm written out in ops), as long as every value but the last is used only inside, or also after
the kernel: then the kernel returns it too (what a training step keeps for the backward pass). Lowered,
each row is read in a few passes while it is in cache, rather than each op making a pass over memory.
An op that is also stored to a global after the group (an optimiser's new moment, which the new weight
uses too) joins as a second result of the kernel: the update is one pass over memory, not one per value.
Last, elementwise kernels over the same elements that follow each other, with nothing between them
reading what one made, merge into one that returns every value used outside it (merge_elementwise_kernels).
A kernel runs where its last op stood, so it takes no op from before a store to a global (a value
loaded from @g names @g's storage: moved past a store, it would read the new value).
Groups of one op are left alone. The kernel boundaries then print and can be read in `mlc opt`."""
from __future__ import annotations

from mlc.ir.core import Block, Builder, Module, Operation, Region, create_op
from mlc.ir.dialects.mlc import END
from mlc.ir.registry import ELEMENTWISE
from mlc.ir.types import TensorType

from .dce import eliminate_dead_ops
from .dims import Dims
from .effects import impure_functions
from .manager import Pass


def elementwise(op: Operation) -> bool:
    return op.name.startswith("mlc.") and op.opdef is not None and ELEMENTWISE in op.opdef.traits


ANCHORS = ("mlc.matmul", "mlc.conv2d", "mlc.winograd_output")  # kernels that apply fused consumers to what they write


def read_through(op: Operation) -> bool:
    """A slice that an elementwise kernel reads its operand through, element by element (no copy):
    one that takes every element along each `?` dim (so the kernel's sizes stay its operands')."""
    if op.name != "mlc.slice":
        return False
    x = op.operands[0].type
    return all(d is not None or (s, k) == (0, 1) and l >= END for d, s, l, k in zip(x.shape, *op.opdef.bounds(op, x.rank)))


def joins_consumer(op: Operation) -> bool:
    if not (elementwise(op) or op.name in ANCHORS or read_through(op)) or len(op.results[0].uses) != 1:
        return False
    (user, _), = op.results[0].uses
    mine = op.results[0].type
    theirs = user.results[0].type if user.results else None
    return (elementwise(user) and user.parent is op.parent and theirs.rank == mine.rank
            and all(a is None or b is None or a == b for a, b in zip(mine.shape, theirs.shape)))


def stored_after(op: Operation, root: Operation, members, order) -> bool:
    """op can be a second result of root's kernel: of root's type, used inside the group and otherwise
    only by global_stores after root (an optimiser's new moments, stored and used for the weight)."""
    if not elementwise(op) or op.parent is not root.parent or op.results[0].type != root.results[0].type:
        return False
    outside = [u for u, _ in op.results[0].uses if u not in members]
    return 0 < len(outside) < len(op.results[0].uses) and all(
        u.name == "mlc.global_store" and u.parent is root.parent and order[u] > order[root] for u in outside)


WRITERS = ("mlc.global_store", "func.call")  # (a global's loaded value names its storage: these change it)


def write_epochs(block: Block) -> dict:
    """op -> how many ops that may write a global's storage come before it (or are it): a kernel runs
    where its last op stood, so it may only take ops of its last op's epoch (a value loaded from @g,
    read after a store to @g, would read the new value)."""
    epochs, n = {}, 0
    for op in block:
        n += op.name in WRITERS
        epochs[op] = n
    return epochs


def lift_through_reshapes(block: Block, dims: Dims) -> bool:
    """An elementwise op on a product's (or a lifted op's) result reshaped, e.g. a stack of rows'
    product [? x 64, 1024] seen as [?, 64, 1024], is done in the product's shape instead, its other
    operands reshaped to it (views) and its own result reshaped back: so it can join the product as
    its epilogue (a Transformer's residual adds, ReLU's gradient). Only where the reshape keeps the
    last dim and the other operands are whole (their `?` dims proven the result's: nothing is
    broadcast along them) or broadcast along that dim alone. Whether any was (the ops it replaced are
    left unused)."""
    lifted, epochs = set(), write_epochs(block)
    for op in list(block):
        if not elementwise(op) or any(u.name == "func.return" for u in op.results[0].users):
            continue
        reshaped = [v for v in op.operands if _liftable_reshape(v, lifted) and v.type.shape == op.results[0].type.shape]
        if not reshaped:
            continue
        shape = reshaped[0].defining_op().operands[0].type.shape
        if not _lifts(op, shape, dims):
            continue
        new = _lift(op, shape, dims, epochs)
        lifted.add(new.defining_op())
        b = Builder.before(op, None)
        op.results[0].replace_all_uses_with(b.create("mlc.reshape", [new], result_types=[op.results[0].type]).result)
        op.erase()
    return bool(lifted)


def _lifts(op: Operation, shape, dims: Dims) -> bool:
    """Whether elementwise op can be done in `shape` (the same elements, the same last dim): its
    operands whole, or broadcast along the last dim alone."""
    result = op.results[0]
    mine, kept = result.type.shape, shape[-1:]
    whole = lambda v: v.type.shape == mine and all(  # noqa: E731
        dims.same(v, axis, result, axis) for axis, d in enumerate(mine) if d is None)
    return mine[-1:] == kept and kept != (None,) and all(
        whole(v) or v.type.rank <= 1 and v.type.shape in ((), (1,), kept) for v in op.operands)


def _lift(op: Operation, shape, dims: Dims, epochs: dict):
    """op done in `shape`, its whole operands reshaped to it; its new result (op itself is left)."""
    b = Builder.before(op, None)
    operands = [_reshaped(b, v, shape, dims, epochs, op) if v.type.shape == op.results[0].type.shape else v
                for v in op.operands]
    return b.create(op.name, operands, op.attributes, result_types=[TensorType(shape, op.results[0].type.element)],
                    name_hint=op.results[0].name_hint).result


def _liftable_reshape(v, lifted) -> bool:
    """v is a reshape, its only use, of the only use of a product's result, of a lifted op's, or of the
    end of an elementwise chain on a product (its bias add)."""
    r = v.defining_op()
    if r is None or r.name != "mlc.reshape" or len(r.operands) != 1 or len(v.uses) != 1:
        return False
    return len(r.operands[0].uses) == 1 and _on_a_product(r.operands[0], lifted)


def _on_a_product(v, lifted) -> bool:
    made = v.defining_op()
    return made is not None and (made.name in ANCHORS or made in lifted or elementwise(made) and any(
        len(o.uses) == 1 and _on_a_product(o, lifted) for o in made.operands))


def _reshaped(b, v, shape, dims: Dims, epochs: dict, user: Operation):
    """v reshaped to `shape`: the reshape's operand, where v is already a reshape of one of that shape;
    where v is made by an elementwise op used only here (by `user`), that op lifted too, to where the
    user is (a mask's comparison)."""
    r = v.defining_op()
    if r is not None and r.name == "mlc.reshape" and len(r.operands) == 1 and r.operands[0].type.shape == shape:
        return r.operands[0]
    if (r is not None and elementwise(r) and len(v.uses) == 1 and epochs.get(r) == epochs.get(user)
            and _lifts(r, shape, dims)):
        return _lift(r, shape, dims, epochs)
    return b.create("mlc.reshape", [v], result_types=[TensorType(shape, v.type.element)]).result


def group_of(root: Operation, dims: Dims, epochs: dict) -> list[Operation]:
    """The root and, transitively, the producers of its write epoch that join it, in program order."""
    members, stack, anchor, extra = {root}, [root], None, False
    order = None
    while stack:
        for v in stack.pop().operands:
            p = v.defining_op()
            if p is None or p in members or epochs.get(p) != epochs[root]:
                continue
            if not joins_consumer(p):
                order = order or {o: i for i, o in enumerate(root.parent)}
                if stored_after(p, root, members, order):
                    members.add(p)
                    stack.append(p)
                    extra = True
                continue
            if p.name in ANCHORS:
                element = p.results[0].type.element
                if anchor is not None or element != root.results[0].type.element or element.name not in ("f32", "f64"):
                    continue
                anchor = p
                members.add(p)  # its operands stay outside: the anchor reads them itself
                continue
            members.add(p)
            stack.append(p)
    if anchor is not None:  # (an anchor's epilogue reads its inputs at the product's indices, not through slices)
        members -= {op for op in members if op.name == "mlc.slice"}
    if anchor is not None and (extra or not _cannot_broadcast_up(anchor, members, dims)):
        members.discard(anchor)  # (a kernel with an anchor has one result)
    return [op for op in root.parent if op in members]


def _cannot_broadcast_up(anchor: Operation, members, dims: Dims) -> bool:
    """The epilogue runs in place over the anchor's result, so no other input of the chain may make
    the result larger: each of their dims must be 1 or the anchor's size (static, or a `?` proven
    the same: a training step's batch)."""
    result = anchor.results[0]
    rank = result.type.rank
    for op in members:
        for v in op.operands:
            if op is anchor or v.defining_op() in members:
                continue
            for axis, d in enumerate(v.type.shape):
                if d != 1 and not dims.same(v, axis, result, rank - v.type.rank + axis):
                    return False
    return True


def fuse_group(ops: list[Operation]) -> Operation:
    root = ops[-1]
    inside = set(ops)
    leaves = list(dict.fromkeys(v for op in ops for v in op.operands if v.defining_op() not in inside))
    block = Block([v.type for v in leaves], [v.name_hint for v in leaves])
    mapping = dict(zip(leaves, block.args))
    for op in ops:
        block.append(op.clone(mapping))
    extras = [op for op in ops[:-1] if any(u not in inside for u, _ in op.results[0].uses)]  # see stored_after
    results = [root.results[0]] + [op.results[0] for op in extras]
    block.append(create_op("mlc.yield", [mapping[r] for r in results], [], loc=root.loc))
    fusion = create_op("mlc.fusion", leaves, [r.type for r in results], regions=[Region([block])], loc=root.loc,
                       result_names=[r.name_hint for r in results])
    root.parent.insert_before(root, fusion)
    for r, new in zip(results, fusion.results):
        for user, i in list(r.uses):
            if user not in inside:
                user.set_operand(i, new)
    for op in reversed(ops):
        op.erase()
    return fusion


def merge_elementwise_kernels(block: Block, dims: Dims) -> None:
    """Elementwise kernels over the same elements (results of one shape, `?` dims proven equal) that
    follow each other, with no op between them that reads what one made, become one kernel returning
    every value used outside it: an LSTM step's gate arithmetic and its gradient, a dozen loops over
    [batch, 512] each, one (its sigmoids and tanhs keep it compute-bound: ~45 us a step either way on
    this machine; what it saves is the passes over memory and the kernel calls)."""
    run: list[Operation] = []
    made: set = set()

    def flush():
        if len(run) > 1:
            _merge(run)
        run.clear()
        made.clear()
    for op in list(block):
        if _elementwise_kernel(op):
            if run and not _same_elements(op, run[0], dims):
                flush()
            run.append(op)
            made.update(op.results)
        elif op.name in WRITERS or made and any(v in made for inner in op.walk() for v in inner.operands):
            flush()
    flush()


def _elementwise_kernel(op: Operation) -> bool:
    """An elementwise op, or a kernel of them (and the slices it reads through), all of one shape."""
    if elementwise(op):
        return op.results[0].type.rank > 0
    if op.name != "mlc.fusion":
        return False
    body = [o for o in op.regions[0].blocks[0] if o.name != "mlc.yield"]
    shape = op.results[0].type.shape
    return len(shape) > 0 and all(r.type.shape == shape for r in op.results) and all(
        elementwise(o) or read_through(o) for o in body)


def _same_elements(a: Operation, b: Operation, dims: Dims) -> bool:
    x, y = a.results[0], b.results[0]
    return x.type.shape == y.type.shape and all(dims.same(x, i, y, i) for i, d in enumerate(x.type.shape) if d is None)


def _merge(kernels: list[Operation]) -> None:
    """One kernel of these ops and kernels (inlined first), in program order."""
    ops = []
    for k in kernels:
        if k.name != "mlc.fusion":
            ops.append(k)
            continue
        body = k.regions[0].blocks[0]
        mapping = dict(zip(body.args, k.operands))
        for inner in body:
            if inner is not body.last:
                ops.append(inner.clone(mapping))
                k.parent.insert_before(k, ops[-1])
        for r, v in zip(k.results, body.last.operands):
            r.replace_all_uses_with(mapping[v])
        k.erase()
    fuse_group(ops)


ROW_REDUCTIONS = ("mlc.reduce_sum", "mlc.reduce_mean", "mlc.reduce_max", "mlc.reduce_min", "mlc.reduce_prod")


def _compatible(a, b) -> bool:
    return len(a) == len(b) and all(x is None or y is None or x == y for x, y in zip(a, b))


def row_reduction(op: Operation):
    """(row shape, number of reduced trailing dims) of a reduction a row kernel can hold, else None."""
    if op.name not in ROW_REDUCTIONS or op.results[0].type.element.name not in ("f32", "f64"):
        return None
    shape = op.operands[0].type.shape
    axes = sorted(op.opdef.axes(op, len(shape)))
    inner = len(axes)
    if not inner or axes != list(range(len(shape) - inner, len(shape))) or None in shape[-inner:]:
        return None
    return shape, inner


def fits_row(op: Operation, shape, inner: int) -> bool:
    """Whether op can live in a row kernel over `shape` reducing its last `inner` dims: a reduction of
    exactly those, or an elementwise op on whole rows or on reduced (size-1) rows."""
    if op.name in ROW_REDUCTIONS:
        return row_reduction(op) is not None and row_reduction(op)[1] == inner and _compatible(op.operands[0].type.shape, shape)
    if not elementwise(op):
        return False
    mine = op.results[0].type.shape
    reduced = tuple(shape[:-inner]) + (1,) * inner
    return _compatible(mine, shape) or _compatible(mine, reduced)


def _joins_row(p: Operation, group, root: Operation, position: dict, shape) -> bool:
    """p's value is used in the group, and otherwise only after the root: then the kernel returns it too
    (layer norm's normalised rows and their scale, kept for the backward pass, written in the same
    pass); a whole-row value only where the kernel writes whole rows."""
    users = p.results[0].users
    outside = [u for u in users if u not in group]
    if not outside:
        return bool(users)
    whole = lambda op: op.name not in ROW_REDUCTIONS and _compatible(op.results[0].type.shape, shape)  # noqa: E731
    return len(outside) < len(users) and (whole(root) or not whole(p)) and all(
        u.parent is root.parent and position[u] > position[root] for u in outside)


def row_groups(block: Block) -> list[list[Operation]]:
    """Row kernels: for each reduction (last first), the latest op it reaches whose producers,
    collected backwards while all their uses are inside, include it (all of one write epoch)."""
    ops, epochs = list(block), write_epochs(block)
    position = {op: i for i, op in enumerate(ops)}
    taken, groups = set(), []
    for seed in reversed(ops):
        row = None if seed in taken else row_reduction(seed)
        if row is None:
            continue
        eligible = lambda op: op not in taken and op.parent is block and fits_row(op, *row) \
            and epochs[op] == epochs[seed]  # noqa: E731
        reached, frontier = {seed}, [seed]
        while frontier:
            for user in frontier.pop().results[0].users:
                if user not in reached and eligible(user):
                    reached.add(user)
                    frontier.append(user)
        for root in sorted(reached, key=position.get, reverse=True):
            group = {root}
            for p in reversed(ops[:position[root]]):
                keeps_dims = p.name not in ROW_REDUCTIONS or p.attr("keepdims")  # else it must be the root
                if eligible(p) and keeps_dims and _joins_row(p, group, root, position, row[0]):
                    group.add(p)
            if seed in group:
                break
        # (inputs may share a `?` row dim, a training step's batch: where one is 1 at run time, it is
        # read broadcast, and what is made from it alone is computed again per row, at most the kernel's
        # own work; requiring one such input kept layer norm's backward in 8 kernels)
        if len(group) > 1:
            groups.append([op for op in ops if op in group])
            taken |= group
    return groups


class Fuse(Pass):
    name = "fuse"
    summary = "group reductions with their rows, and elementwise chains, into mlc.fusion kernels"

    def run(self, module: Module) -> None:
        for f in module.functions.values():
            dims = Dims(f)
            if lift_through_reshapes(f.body, dims):  # (at the top level, where reshapes are views: lowering/shape.py)
                eliminate_dead_ops(f.body, impure_functions(module))
            for block in [b for op in f.walk() if op.name != "mlc.fusion" for r in op.regions for b in r.blocks]:
                for group in row_groups(block):
                    fuse_group(group)
                epochs = write_epochs(block)
                roots = [op for op in block if elementwise(op) and not joins_consumer(op)]
                for root in reversed(roots):  # consumers first: a root may join a later kernel as a second result
                    if root.parent is None:
                        continue
                    group = group_of(root, dims, epochs)
                    if len(group) > 1:
                        epochs[fuse_group(group)] = epochs[root]
                merge_elementwise_kernels(block, dims)
