"""scan-sums: a sum of products over steps is one product with the steps along K.

Back-propagation through a recurrent step sums the weight's cotangent over time, one skinny product
per step (K = the batch): in a scan's carry, or as a batched product summed over its batch.

    %s' = mlc.add %s, (mlc.matmul (mlc.transpose %h), %g)    (a carry %s, inside the scan)
becomes nothing inside; %h and %g are stacked as outputs (or read from the sequences and outputs
that already hold them), and after the scan

    %s_final = mlc.add %s_init, (mlc.matmul (mlc.transpose (mlc.reshape %hs : [T*B, H])), (mlc.reshape %gs : [T*B, 4H]))

one product with K = steps x batch, which runs at the GEMM's speed instead of the per-step
kernels' (and `layout` reads the transposed operand in place). Likewise
`mlc.reduce_sum (mlc.matmul %a, %b) {axes = [0]}` over the batch of a batched product, and a carry
summing `mlc.reduce_sum %g {axes = [0]}` per step (a bias's cotangent): one sum over steps x batch.
"""
from __future__ import annotations

from mlc.ir.core import Block, Builder, Module, Region

from .builder import OpBuilder
from .manager import Pass


class ScanSums(Pass):
    name = "scan-sums"
    summary = "a carry summing a product per step, or a batched product summed over its batch, as one product along steps x K"

    def run(self, module: Module) -> None:
        for f in module.functions.values():
            while any(_sum_of_batched_product(op) or _carry_summing_products(op) for op in list(f.body.walk())):
                pass


def merged_product(d: OpBuilder, xs, ys, xs_transposed: bool, ys_transposed: bool):
    """sum over t of X_t @ Y_t, X_t = xs[t] (or its transpose), Y_t = ys[t] (or its transpose), as
    one product: the K dims of all steps side by side."""
    def rows_along_k(v, transposed):  # [T*K, other]: K-major, so the steps' K dims follow each other
        stacked = v if transposed else d("mlc.transpose", v, perm=[0, 2, 1])
        t, k, other = stacked.type.shape
        return d.reshape(stacked, (None if t is None or k is None else t * k, other))
    a = rows_along_k(xs, xs_transposed)
    b = rows_along_k(ys, not ys_transposed)
    return d("mlc.matmul", d("mlc.transpose", a, perm=[1, 0]), b)


def _operands_of_product(product):
    """(x, y, x stored transposed, y stored transposed) of a 2-d matmul, a 2-d transpose feeding it
    read as a flag instead."""
    out = []
    for v, flag in zip(product.operands, (product.attr("transpose_a"), product.attr("transpose_b"))):
        src = v.defining_op()
        if not flag and src is not None and src.name == "mlc.transpose" and list(src.attr("perm")) == [1, 0]:
            v, flag = src.operands[0], True
        out.append((v, bool(flag)))
    return out[0][0], out[1][0], out[0][1], out[1][1]


def _sum_of_batched_product(op) -> bool:
    """reduce_sum(matmul(a, b), axes = [0]) with a and b rank 3 along the same batch."""
    if op.name != "mlc.reduce_sum" or list(op.attr("axes") or []) != [0] or op.attr("keepdims"):
        return False
    product = op.operands[0].defining_op()
    if product is None or product.name != "mlc.matmul" or len(op.operands[0].users) != 1 or \
            any(v.type.rank != 3 for v in product.operands) or not op.results[0].type.element.is_float or \
            any(product.opdef.interleaved(product)):
        return False
    a, b = product.operands
    if a.type.shape[0] != b.type.shape[0] or a.type.shape[0] is None:
        return False
    d = OpBuilder(Builder.before(op))
    d.b.loc = op.loc
    op.replace_with([merged_product(d, a, b, bool(product.attr("transpose_a")), bool(product.attr("transpose_b")))])
    product.erase()
    return True


def _carry_summing_products(scan) -> bool:
    """A scan carry whose only use is `carry + term`, the next carry, where the term is a product
    matmul(x, y) or a sum over the batch reduce_sum(x) {axes = [0]} (a bias's cotangent) of values made
    in the step."""
    if scan.name != "mlc.scan":
        return False
    body, k = scan.regions[0].blocks[0], scan.attr("num_carries")
    step_yield = body.last
    for i in range(k):
        carry = body.args[i]
        total = step_yield.operands[i].defining_op()
        if total is None or total.name != "mlc.add" or total.parent is not body or carry.users != [total] or \
                step_yield.operands[i].users != [step_yield] or total.results[0].type != carry.type:
            continue
        term = total.operands[1] if total.operands[0] is carry else total.operands[0]
        summand = _summand(term, carry, body)
        if summand is not None:
            _drop_carry(scan, i, total, term.defining_op(), *summand)
            return True
    return False


def _summand(term, carry, body):
    """(the step's values the term is made of, term of their stacked values) for a term scan-sums
    moves after the scan, else None."""
    op = term.defining_op()
    if op is None or op.parent is not body or term.users != [carry.users[0]] or term.type != carry.type \
            or not carry.type.element.is_float:
        return None
    if op.name == "mlc.matmul" and all(v.type.rank == 2 for v in op.operands):
        x, y, tx, ty = _operands_of_product(op)
        if _made_in(x, body) and _made_in(y, body):
            return [x, y], lambda d, xs, ys: merged_product(d, xs, ys, tx, ty)
    if op.name == "mlc.reduce_sum" and list(op.attr("axes") or []) == [0] and not op.attr("keepdims") \
            and _made_in(op.operands[0], body):
        return [op.operands[0]], lambda d, xs: d("mlc.reduce_sum", xs, axes=[0, 1])
    return None


def _made_in(v, body) -> bool:
    return (v.owner is body) if v.defining_op() is None else v.defining_op().parent is body


def _drop_carry(scan, i, total, term, values, summed) -> None:
    """scan without carry i (its next value `total` = carry + term, made from the step's `values`),
    with the values stacked; the carry's final value is its initial one plus summed(the stacked
    values) after the new scan."""
    body, k = scan.regions[0].blocks[0], scan.attr("num_carries")
    kept = [a for j, a in enumerate(body.args) if j != i]
    new_body = Block([a.type for a in kept], [a.name_hint for a in kept])
    renamed = dict(zip(kept, new_body.args))
    for old, new in renamed.items():
        old.replace_all_uses_with(new)
    values = [renamed.get(v, v) for v in values]
    for op in list(body):
        op.detach()
        new_body.append(op)
    step_yield = new_body.last
    outputs = list(step_yield.operands[k:])
    extra = [v for v in dict.fromkeys(values) if not _sequence(new_body, k - 1, v) and v not in outputs]
    step_yield.set_operands([v for j, v in enumerate(step_yield.operands[:k]) if j != i] + outputs + extra)
    total.erase()
    _erase_unused(term)
    steps = scan.results[k].type.shape[0] if len(scan.results) > k else next(
        (s.type.shape[0] for s in scan.operands[k:]), scan.attr("length"))
    b = Builder.before(scan)
    b.loc = scan.loc
    new = b.create("mlc.scan", [v for j, v in enumerate(scan.operands) if j != i], {**scan.attributes, "num_carries": k - 1},
                   result_types=[r.type for j, r in enumerate(scan.results) if j != i] +
                   [v.type.with_shape((steps,) + v.type.shape) for v in extra],
                   regions=[Region([new_body])])

    def stacked(v):  # v of every step, stacked: a sequence operand, an output or an extra output
        if _sequence(new_body, k - 1, v):
            return new.operands[new_body.args.index(v)]
        return new.results[(k - 1) + (outputs + extra).index(v)]
    d = OpBuilder(Builder.after(new))
    d.b.loc = scan.loc
    final = d("mlc.add", scan.operands[i], summed(d, *map(stacked, values)))
    for j, r in enumerate(scan.results):
        r.replace_all_uses_with(final if j == i else new.results[j - (j > i)])
    scan.erase()


def _erase_unused(op) -> None:
    """op, and the transposes feeding it, where nothing uses them any more."""
    if op is not None and not any(r.users for r in op.results):
        feeding = [v.defining_op() for v in op.operands]
        op.erase()
        for src in feeding:
            if src is not None and src.name == "mlc.transpose":
                _erase_unused(src)


def _sequence(body, k, v) -> bool:
    """Whether v is the step's slice of a sequence operand."""
    return v.owner is body and v.defining_op() is None and body.args.index(v) >= k
