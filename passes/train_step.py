"""train_step{loss=@loss optimizer=adam lr=1e-3}: one function that trains.

Adds `@train_step` (option `name`) taking @loss's arguments and returning the loss. It computes the
gradients of the trainable globals (`grad` with wrt=globals), clips them by their global norm
(`clip-norm`, when > 0), schedules the learning rate and applies the optimiser, storing the new
weights and the optimiser's state with `global_store`. The state lives in globals of its own, named
after the weight (`@w.exp_avg`), and a step counter `@train_step.step`, so a checkpoint of the globals
is a checkpoint of the training.

With `data-parallel`, every process of a world (ir/collectives.py) runs the step on its own share of
a global batch, and the step makes the processes agree:
  - the gradients, the returned loss and the new values of the other floating-point globals the loss
    stores (batch norm's running statistics) become their average over the world, weighted by each
    process's number of examples (the first dim of the first argument that has one): one
    `mlc.all_reduce {reduction = "sum"}` per element type of sum(c * value) and sum(c), divided. For a
    loss that is a mean over its batch this is the gradient of the global batch, whatever the shares
    (a process with no examples adds nothing). It comes before clipping, which sees the global norm.
    The values travel in buckets of up to `bucket-mb` megabytes (0: one per element type), each
    all-reduced as soon as the backward pass has computed it; `overlap-collectives` (in the CPU
    pipeline) then waits for each only where the update reads it, so the last layers' gradients are
    communicated while the first layers' are computed, as torch's DistributedDataParallel does.
  - random ops (dropout's masks) draw from a stream per process: the key's seed plus rank * 2**40
    (process 0 draws what a single process draws), while the key globals stay the same everywhere.
  - with `sync-batch-norm` (the default; as torch.nn.SyncBatchNorm), every batch norm that may train
    normalises with the statistics of the global batch: each process sums, per channel, x - s and
    (x - s)^2 (s: the running mean, a shift the processes share, so the variance E[(x-s)^2] - E[x-s]^2
    loses little to rounding) and counts its elements; one all-reduce of those 2C + 1 numbers gives
    the global mean and (biased) variance, and the running statistics move by them. The gradient
    follows: the all-reduce's gradient is the all-reduce of the cotangents of the sums (torch's
    all-reduced sums of dy and dy * x-hat). The objective is then the sum over processes of c times
    each one's loss (c: its number of examples), so the step differentiates c * loss and all-reduces
    the gradients as they are, dividing by the sum of c. With sync-batch-norm=false each process
    normalises with its own batch's statistics (torch's DistributedDataParallel without SyncBatchNorm).

The update rules are torch.optim's, in its order of operations:
  sgd    momentum, dampening, nesterov, weight-decay (L2 added to the gradient)
  adam   beta1, beta2, eps, weight-decay (L2 added to the gradient)
  adamw  beta1, beta2, eps, weight-decay (decoupled; torch's default 0.01)
Learning-rate schedules count optimiser steps t = 0, 1, ...:
  constant; step: lr gamma^floor(t / step-size); cosine: eta-min + (lr - eta-min)(1 + cos(pi t / t-max)) / 2;
  global: read from the global @train_step.lr (f64, initially lr), which the caller sets (mlc.optim's schedulers)
"""
from __future__ import annotations

import math

import numpy as np

from mlc.ir.attributes import DenseAttr, StringAttr, SymbolRefAttr, TypeAttr
from mlc.ir.core import Builder, FuncOp, Module, Operation, Value, create_op
from mlc.ir.diagnostics import error
from mlc.ir.dialects.mlc import constant_value
from mlc.ir.types import TensorType, f64, i64

from .builder import OpBuilder
from .grad import differentiate
from .inline import inline_call
from .manager import Pass


class SGD:
    states = ("momentum_buffer",)
    defaults = {"weight-decay": 0.0}

    def __init__(self, o):
        self.momentum, self.dampening, self.nesterov, self.wd = o["momentum"], o["dampening"], o["nesterov"], o["weight-decay"]
        if self.momentum == 0:
            self.states = ()

    def update(self, d, p, g, state, t, lr):
        """(new p, new state) from weight p, its gradient g, the step count t and learning rate lr (f64)."""
        if self.wd:
            g = d("mlc.add", g, d("mlc.mul", p, d.scalar(self.wd, p)))
        new = {}
        if self.momentum:
            buf = state["momentum_buffer"]
            later = d("mlc.add", d("mlc.mul", buf, d.scalar(self.momentum, p)), d("mlc.mul", g, d.scalar(1 - self.dampening, p)))
            first = d("mlc.eq", t, d.scalar(0, t))  # torch starts the buffer at the first gradient
            buf = new["momentum_buffer"] = d("mlc.select", first, g, later)
            g = d("mlc.add", g, d("mlc.mul", buf, d.scalar(self.momentum, p))) if self.nesterov else buf
        return d("mlc.sub", p, d("mlc.mul", g, _like(d, lr, p))), new


class Adam:
    states = ("exp_avg", "exp_avg_sq")
    defaults = {"weight-decay": 0.0}
    decoupled = False

    def __init__(self, o):
        self.b1, self.b2, self.eps, self.wd = o["beta1"], o["beta2"], o["eps"], o["weight-decay"]

    def update(self, d, p, g, state, t, lr):
        if self.wd and self.decoupled:
            p = d("mlc.mul", p, _like(d, d("mlc.sub", d.scalar(1, lr), d("mlc.mul", lr, d.scalar(self.wd, lr))), p))
        elif self.wd:
            g = d("mlc.add", g, d("mlc.mul", p, d.scalar(self.wd, p)))
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m = d("mlc.add", m, d("mlc.mul", d("mlc.sub", g, m), d.scalar(1 - self.b1, p)))
        v = d("mlc.add", d("mlc.mul", v, d.scalar(self.b2, p)), d("mlc.mul", d("mlc.mul", d.scalar(1 - self.b2, p), g), g))
        step = d("mlc.add", t, d.scalar(1, t))  # bias corrections in f64, as torch computes them in Python floats
        correction1 = d("mlc.sub", d.scalar(1, t), d("mlc.pow", d.scalar(self.b1, t), step))
        correction2 = d("mlc.sqrt", d("mlc.sub", d.scalar(1, t), d("mlc.pow", d.scalar(self.b2, t), step)))
        step_size = d("mlc.div", lr, correction1)
        denom = d("mlc.add", d("mlc.div", d("mlc.sqrt", v), _like(d, correction2, p)), d.scalar(self.eps, p))
        p = d("mlc.sub", p, d("mlc.mul", _like(d, step_size, p), d("mlc.div", m, denom)))
        return p, {"exp_avg": m, "exp_avg_sq": v}


class AdamW(Adam):
    defaults = {"weight-decay": 0.01}
    decoupled = True


OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW}


def _like(d, scalar: Value, p: Value) -> Value:
    """A rank-0 value in p's element type."""
    t = TensorType((), p.type.element)
    return scalar if scalar.type == t else d("mlc.cast", scalar, result_type=t)


class TrainStep(Pass):
    name = "train_step"
    summary = "add @train_step: loss, gradients of the trainable globals, clipping, optimiser update"
    options = {"loss": "", "name": "train_step", "optimizer": "adam", "lr": 1e-3, "momentum": 0.0, "dampening": 0.0,
               "nesterov": False, "weight-decay": "default", "beta1": 0.9, "beta2": 0.999, "eps": 1e-8,
               "clip-norm": 0.0, "schedule": "constant", "step-size": 1, "gamma": 0.1, "t-max": 1, "eta-min": 0.0,
               "data-parallel": False, "sync-batch-norm": True, "bucket-mb": 1.0}

    def run(self, module: Module) -> None:
        o = dict(self.values)
        loss_name = o["loss"].lstrip("@")
        f = module.functions.get(loss_name)
        if f is None:
            raise error(module.loc, f"train_step: no loss function @{loss_name} (give loss=@name)")
        kind = OPTIMIZERS.get(o["optimizer"])
        if kind is None:
            raise error(module.loc, f"train_step: unknown optimizer '{o['optimizer']}' (optimizers: {', '.join(OPTIMIZERS)})")
        if o["schedule"] not in ("constant", "step", "cosine", "global"):
            raise error(module.loc, f"train_step: unknown schedule '{o['schedule']}' (constant, step, cosine or global)")
        try:
            o["weight-decay"] = float(kind.defaults["weight-decay"] if o["weight-decay"] == "default" else o["weight-decay"])
        except ValueError:
            raise error(module.loc, f"train_step: weight-decay takes a number, got '{o['weight-decay']}'") from None
        if not o["bucket-mb"] >= 0:
            raise error(module.loc, f"train_step: bucket-mb must be a number of megabytes >= 0, got {o['bucket-mb']}")
        optimizer = kind(o)
        params = [op for op in module.body if op.name == "mlc.global" and op.attr("trainable")]
        if not params:
            raise error(f.loc, "train_step: the module has no trainable globals (mark weights `{trainable}`)")

        synchronised = o["data-parallel"] and o["sync-batch-norm"] and _synchronise_batch_norms(module, f)
        grad_fn = differentiate(module, synchronised or f, "globals")
        if synchronised:
            synchronised.detach()
        step = FuncOp.build(o["name"], list(f.type.inputs), [f.type.results[0]], [a.name_hint for a in f.args], loc=f.loc)
        module.body.insert_after(grad_fn, step)
        b = Builder.at_end(step.body, module)
        b.loc = f.loc
        call = b.create("func.call", list(step.args), {"callee": SymbolRefAttr(grad_fn.sym_name)},
                        result_types=list(grad_fn.type.results))
        loss, *grads = inline_call(call, grad_fn)
        grad_fn.detach()
        d = OpBuilder(b)

        def load(name):
            return d("mlc.global_load", **{"global": SymbolRefAttr(name)})

        def store(name, value):
            b.create("mlc.global_store", [value], {"global": SymbolRefAttr(name)}, result_types=[])

        counter = _declare(module, b, params[-1], f"{o['name']}.step", TensorType((), f64))
        t = load(counter)
        if o["schedule"] == "global":
            lr = load(_declare(module, b, params[-1], f"{o['name']}.lr", TensorType((), f64), o["lr"]))
        else:
            lr = _learning_rate(d, o, t)
        if o["data-parallel"]:
            loss, grads = _data_parallel(d, step, {p.attr("sym_name") for p in params}, loss, grads, weighted=bool(synchronised),
                                         bucket_bytes=o["bucket-mb"] * 2**20)
        if o["clip-norm"] > 0:
            grads = _clip_by_global_norm(d, grads, o["clip-norm"])
        for param, g in zip(params, grads):
            name = param.attr("sym_name")
            p = load(name)
            state_names = {s: _declare(module, b, param, f"{name}.{s}", p.type) for s in optimizer.states}
            new_p, new_state = optimizer.update(d, p, g, {s: load(n) for s, n in state_names.items()}, t, lr)
            store(name, new_p)
            for s, v in new_state.items():
                store(state_names[s], v)
        store(counter, d("mlc.add", t, d.scalar(1, t)))
        b.create("func.return", [loss], result_types=[])


def _declare(module: Module, b: Builder, after, name: str, t: TensorType, value: float = 0.0) -> str:
    """A global for optimiser state, filled with value (reused when it is already declared)."""
    existing = module.globals.get(name)
    if existing is not None:
        if existing.attr("type") != t:
            raise error(existing.loc, f"train_step: @{name} exists with type {existing.attr('type')}, not {t}")
        return name
    init = DenseAttr(np.full(t.shape, value, t.element.np_dtype), t) if value else StringAttr("zeros")
    decl = create_op("mlc.global", attributes={"sym_name": StringAttr(name), "type": TypeAttr(t), "init": init}, loc=after.loc)
    module.body.insert_after(after, decl)
    b.symbols[name] = decl
    return name


RANDOM_OPS = ("mlc.dropout", "mlc.random_uniform", "mlc.random_normal")  # operand 0: the key (seed, counter)
RANK_STRIDE = 1 << 40  # added to the seed per rank: a different Philox key, hence an independent stream


def _data_parallel(d, step: FuncOp, trainable: set, loss: Value, grads: list, weighted: bool = False, bucket_bytes: float = 0):
    """The step's share of a data-parallel world (see the module docstring); returns the averaged loss
    and gradients. `d` appends at the end of the step. weighted: the loss and the gradients are
    already multiplied by the process's number of examples (a synchronised loss)."""
    body = step.body
    first = body.ops[0]
    at_top = d.before(first)
    key_offset = at_top("mlc.mul", at_top("mlc.rank", result_type=TensorType((), i64)),
                        at_top("mlc.constant", result_type=TensorType((2,), i64),
                               value=DenseAttr(np.array([RANK_STRIDE, 0], np.int64), TensorType((2,), i64))))
    for op in list(body.walk()):
        if op.name in RANDOM_OPS:
            op.set_operand(0, d.before(op)("mlc.add", op.operands[0], key_offset))

    # the other floating-point state the loss stores (running statistics): averaged with the gradients,
    # stored at the end unless the step reads it again after its store
    ops = body.ops
    moved = []
    for i, op in enumerate(ops):
        if op.name != "mlc.global_store" or op.attr("global") in trainable or not op.operands[0].type.element.is_float:
            continue
        name = op.attr("global")
        if any(later.name == "mlc.global_load" and later.attr("global") == name for later in ops[i + 1:]):
            here = d.before(op)
            op.set_operand(0, _average(here, [op.operands[0]], _examples(here, step))[0])
        else:
            op.detach()
            moved.append(op)
    values = [loss, *grads, *(op.operands[0] for op in moved)]
    count = _examples(at_top, step)
    loss, *rest = _average(d, values, count, weighted=range(1 + len(grads)) if weighted else (),
                           buckets=_buckets(d, body, values, count, bucket_bytes))
    grads, stored = rest[:len(grads)], rest[len(grads):]
    for op, value in zip(moved, stored):
        op.set_operand(0, value)
        body.append(op)  # (d appends at the end: the step has no return yet)
    return loss, grads


def _synchronise_batch_norms(module: Module, f: FuncOp) -> FuncOp | None:
    """A private copy of the loss f, its calls inlined, in which every batch norm that may train uses
    the global batch's statistics, returning c * loss (see the module docstring); None when f has no
    such batch norm."""
    g = FuncOp.build(f"{f.sym_name}.synchronised", list(f.type.inputs), [f.type.results[0]], [a.name_hint for a in f.args],
                     loc=f.loc, private=True)
    module.body.insert_after(f, g)
    b = Builder.at_end(g.body, module)
    b.loc = f.loc
    call = b.create("func.call", list(g.args), {"callee": SymbolRefAttr(f.sym_name)}, result_types=list(f.type.results))
    loss = inline_call(call, f)[0]
    for _ in range(64):  # (a recursive call stays: grad reports it)
        calls = [op for op in g.body if op.name == "func.call" and op.attr("callee") in module.functions]
        if not calls:
            break
        for call in calls:
            inline_call(call, module.functions[call.attr("callee")])
    norms = [op for op in g.body.walk() if op.name == "mlc.batch_norm" and not _never_trains(op)]
    if not norms:
        g.detach()
        return None
    for op in norms:
        here = Builder.before(op, module)
        here.loc = op.loc
        op.replace_with(_synchronised_batch_norm(OpBuilder(here), op))
    d = OpBuilder(b)
    c = d("mlc.cast", _examples(d, g), result_type=TensorType((), loss.type.element))
    b.create("func.return", [d("mlc.mul", loss, c)], result_types=[])
    return g


def _never_trains(op) -> bool:
    """A batch norm whose training operand is the constant false."""
    training = constant_value(op.operands[5])
    return training is not None and not np.asarray(training).any()


def _synchronised_batch_norm(d, op) -> list:
    """mlc.batch_norm's decomposition (ir/dialects/mlc.py) with the batch statistics of the world:
    one all-reduce of the per-channel sums of x - s and (x - s)^2, s the running mean, and the count."""
    x, w, b, rm, rv, training = op.operands
    rank, channels = x.type.rank, x.type.shape[1]
    axes = [0] + list(range(2, rank))
    per_channel = lambda v: d.reshape(v, (1, channels) + (1,) * (rank - 2))  # noqa: E731
    k = lambda v: d.scalar(v, x)  # noqa: E731
    piece = lambda v, start, n: d("mlc.slice", v, start=[start], limit=[start + n])  # noqa: E731
    shifted = d("mlc.sub", x, per_channel(rm))
    sums = d("mlc.reduce_sum", shifted, axes=axes)
    squares = d("mlc.reduce_sum", d("mlc.mul", shifted, shifted), axes=axes)
    count = piece(d("mlc.reduce_sum", d.expand(k(1), x), axes=axes), 0, 1)
    total = d("mlc.all_reduce", d("mlc.concat", sums, squares, count, axis=0), reduction="sum")
    n = d.reshape(piece(total, 2 * channels, 1), ())
    offset = d("mlc.div", piece(total, 0, channels), n)  # E[x - s]
    mean = d("mlc.add", offset, rm)
    var = d("mlc.maximum", d("mlc.sub", d("mlc.div", piece(total, channels, channels), n), d("mlc.mul", offset, offset)), k(0))
    use_mean, use_var = d("mlc.select", training, mean, rm), d("mlc.select", training, var, rv)
    scale = d("mlc.mul", d("mlc.rsqrt", d("mlc.add", use_var, k(op.attr("eps")))), w)
    y = d("mlc.add", d("mlc.mul", d("mlc.sub", x, per_channel(use_mean)), per_channel(scale)), per_channel(b))
    unbiased = d("mlc.div", d("mlc.mul", var, n), d("mlc.sub", n, k(1)))
    m = op.attr("momentum")
    moved = [d("mlc.add", d("mlc.mul", old, k(1 - m)), d("mlc.mul", new, k(m))) for old, new in ((rm, mean), (rv, unbiased))]
    return [y, d("mlc.select", training, moved[0], rm), d("mlc.select", training, moved[1], rv)]


def _examples(d, step: FuncOp) -> Value:
    """This process's number of examples (tensor<i64>): the first dim of the first argument that has dims."""
    x = next((a for a in step.args if a.type.rank >= 1), None)
    if x is None:
        raise error(step.loc, "train_step: data-parallel training needs an argument with a batch dimension")
    shape = d("mlc.shape_of", x)
    return d.reshape(d("mlc.slice", shape, start=[0], limit=[1]), ())


def _average(d, values: list, count: Value, weighted=(), buckets=None) -> list:
    """Each value averaged over the world, weighted by count: sum(count * value) / sum(count). The values
    travel flattened in buckets (lists of indices into values, of one element type; by default one per
    element type), one all-reduce each, the first of each element type carrying the count too. A bucket
    is reduced where `bucket.at` builds (default d), the divisions come at d. The values at the indices
    `weighted` are count * value already."""
    if buckets is None:
        by_type: dict = {}
        for i, v in enumerate(values):
            by_type.setdefault(v.type.element, Bucket(d)).append(i)
        buckets = list(by_type.values())
    pieces, totals = {}, {}
    for bucket in buckets:
        b = bucket.at
        element = values[bucket[0]].type.element
        c = b("mlc.cast", count, result_type=TensorType((), element))
        has_examples = b("mlc.gt", count, b.scalar(0, count))
        parts = [b.reshape(b("mlc.select", has_examples, values[i] if i in weighted else b("mlc.mul", values[i], c),
                                      b.scalar(0, values[i])),  # (a process without examples: its mean is nan)
                           (math.prod(values[i].type.shape),)) for i in bucket]  # (static shapes: gradients of globals, scalars)
        if element not in totals:
            parts.append(b.reshape(c, (1,)))
        flat = b("mlc.concat", *parts, axis=0) if len(parts) > 1 else parts[0]
        summed = b("mlc.all_reduce", flat, reduction="sum")
        offset = 0
        for i in bucket:
            pieces[i] = (summed, offset)
            offset += math.prod(values[i].type.shape)
        if element not in totals:
            totals[element] = d.reshape(d("mlc.slice", summed, start=[offset], limit=[offset + 1]), ())
    out = []
    for i, v in enumerate(values):
        summed, offset = pieces[i]
        piece = d("mlc.slice", summed, start=[offset], limit=[offset + math.prod(v.type.shape)])
        out.append(d("mlc.div", d.reshape(piece, v.type.shape), totals[v.type.element]))
    return out


class Bucket(list):
    """Indices of values reduced together; `at` builds their reduction, after `last` computed them."""

    def __init__(self, at=None):
        super().__init__()
        self.at, self.bytes, self.last = at, 0, None


def _buckets(d, body, values: list, count: Value, limit: float) -> list[Bucket]:
    """The values in the order the step computes them, gathered into buckets of one element type of
    at most `limit` bytes (a larger value alone; 0: no limit), each reduced right after its last
    value is computed. With `overlap-collectives`, the all-reduce of the last layers' gradients then
    runs while the backward pass computes the first layers' (torch's DistributedDataParallel buckets)."""
    position = {op: k for k, op in enumerate(body)}
    following = {op: op.next for op in body}  # (taken now: buckets inserted after the same op stay in order)

    def computed_at(v) -> Operation | None:
        op = v.defining_op()
        while op is not None and op.parent is not body:
            op = op.parent_op
        return op

    def builder_after(op):
        return d if following[op] is None else d.before(following[op])

    made, open_ = [], {}
    for i in sorted(range(len(values)), key=lambda i: position.get(computed_at(values[i]), -1)):
        v = values[i]
        bucket = open_.get(v.type.element)
        if bucket is None or (limit and bucket.bytes + v.type.nbytes > limit):
            bucket = open_[v.type.element] = Bucket()
            made.append(bucket)
        bucket.append(i)
        bucket.bytes += v.type.nbytes
        bucket.last = computed_at(v) or bucket.last
    for bucket in made:
        bucket.at = builder_after(bucket.last or computed_at(count))
    return made


def _learning_rate(d, o, t: Value) -> Value:
    """The scheduled learning rate at step t (f64)."""
    lr = d.scalar(o["lr"], t)
    if o["schedule"] == "step":
        periods = d("mlc.floor", d("mlc.div", t, d.scalar(max(o["step-size"], 1), t)))
        return d("mlc.mul", lr, d("mlc.pow", d.scalar(o["gamma"], t), periods))
    if o["schedule"] == "cosine":
        low = o["eta-min"]
        phase = d("mlc.cos", d("mlc.mul", t, d.scalar(math.pi / max(o["t-max"], 1), t)))
        return d("mlc.add", d.scalar(low, t), d("mlc.mul", d.scalar((o["lr"] - low) / 2, t), d("mlc.add", d.scalar(1, t), phase)))
    return lr


def _clip_by_global_norm(d, grads, max_norm: float):
    """torch.nn.utils.clip_grad_norm_: scale every gradient by min(1, max_norm / (norm + 1e-6))."""
    total = None
    for g in grads:
        s = d("mlc.reduce_sum", d("mlc.mul", g, g))
        total = s if total is None else d("mlc.add", total, s)
    norm = d("mlc.sqrt", total)
    coef = d("mlc.minimum", d("mlc.div", d.scalar(max_norm, norm), d("mlc.add", norm, d.scalar(1e-6, norm))), d.scalar(1, norm))
    return [d("mlc.mul", g, _like(d, coef, g)) for g in grads]

