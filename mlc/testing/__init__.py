"""Property-based testing for mlc programs (SPEC §7).

    from hypothesis import given
    from mlc.testing import programs, check_pipeline

    @given(programs())
    def test_my_pipeline_keeps_results(p):
        check_pipeline(p, "inline,canonicalize,cse")

`programs()` draws well-typed modules over the dialect — elementwise ops with broadcasting, reductions,
matmul, shape ops, convolutions and pools, softmax, cross-entropy, gathers, calls and scans, with `?`
dims — together with inputs that are valid for them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from hypothesis import strategies as st

from mlc.ir.attributes import DenseAttr, StringAttr, SymbolRefAttr, TypeAttr, to_attr
from mlc.ir.core import Block, FuncOp, Module, Region, create_op
from mlc.ir.registry import load_dialects
from mlc.ir.types import FunctionType, TensorType, f32, f64, i64

__all__ = ["Program", "programs", "check_pipeline", "assert_same_results", "mutations", "run"]


@dataclass
class Program:
    module: Module
    entry: str
    inputs: list = field(default_factory=list)

    @property
    def text(self) -> str:
        return str(self.module)

    def __repr__(self):  # hypothesis prints this for a failing example: make it a reproducer
        shapes = ", ".join(f"{a.dtype}{list(a.shape)}" for a in self.inputs)
        return f"Program(entry=@{self.entry}, inputs=[{shapes}])\n{self.text}"


class _Ctx:
    def __init__(self, module):
        self.symbols = module.symbols()
        self.module = module


class _Builder:
    """Builds one function op by op; every value has a type whose `?` dims all have run-time size B."""

    def __init__(self, draw, module: Module, batch: int, dynamic: bool):
        self.draw, self.module, self.batch, self.dynamic = draw, module, batch, dynamic
        self.block = Block()
        self.args: list[tuple] = []   # (type, int upper bound for integer inputs)
        self.pool: list = []          # values usable as operands

    # --- values ---------------------------------------------------------------------------------------
    def actual(self, v) -> tuple:
        return tuple(self.batch if d is None else d for d in v.type.shape)

    def arg(self, shape, element=f32, dynamic_axes=(), high=2):
        shape = tuple(None if i in dynamic_axes else d for i, d in enumerate(shape))
        t = TensorType(shape, element)
        a = self.block.add_arg(t, f"a{len(self.block.args)}")
        self.args.append((t, high))
        if element == f32:
            self.pool.append(a)
        return a

    def emit(self, name, operands, attrs=None, result_types=None, regions=()):
        op = create_op(name, operands, [], {k: to_attr(v) for k, v in (attrs or {}).items()}, regions)
        op.set_results(result_types if result_types is not None else op.opdef.infer(op, _Ctx(self.module)))
        self.block.append(op)
        self.pool.extend(r for r in op.results if r.type.element == f32)
        return op.results[0] if len(op.results) == 1 else op.results

    def pick(self, pred=lambda v: True):
        candidates = [v for v in self.pool if pred(v)]
        return self.draw(st.sampled_from(candidates)) if candidates else None

    def new_shape(self, rank=None):
        rank = self.draw(st.integers(1, 3)) if rank is None else rank
        return tuple(self.draw(st.integers(1, 4)) for _ in range(rank))

    def maybe_dynamic(self, shape):
        """Make axis 0 dynamic (size B) for some new arguments."""
        if self.dynamic and shape and self.draw(st.booleans()):
            return (self.batch,) + tuple(shape[1:]), (0,)
        return shape, ()

    def fresh_float(self, rank=None):
        shape, dyn = self.maybe_dynamic(self.new_shape(rank))
        return self.arg(shape, f32, dyn)

    def broadcast_partner(self, v):
        """A new argument whose shape broadcasts against v: some leading dims dropped, some set to 1."""
        shape = list(self.actual(v))
        drop = self.draw(st.integers(0, len(shape)))
        shape = shape[drop:]
        dyn = []
        for i in range(len(shape)):
            if self.draw(st.integers(0, 3)) == 0:
                shape[i] = 1
            elif v.type.shape[drop + i] is None and self.draw(st.booleans()):
                dyn.append(i)
        return self.arg(tuple(shape), v.type.element, tuple(dyn))

    # --- op generators ---------------------------------------------------------------------------------------
    def unary(self):
        v = self.pick()
        name = self.draw(st.sampled_from(["neg", "abs", "exp", "tanh", "sigmoid", "relu", "sin", "cos",
                                          "square", "floor", "sign", "erf", "log1p", "sqrt", "gelu"]))
        if name in ("log1p", "sqrt"):
            v = self.emit("mlc.abs", [v])
        attrs = {"approximate": self.draw(st.sampled_from(["none", "tanh"]))} if name == "gelu" else {}
        return self.emit(f"mlc.{name}", [v], attrs)

    def binary(self):
        a = self.pick()
        b = self.pick(lambda w: w.type.element == a.type.element and _broadcastable(self, a, w))
        if b is None or self.draw(st.booleans()):
            b = self.broadcast_partner(a)
        if self.draw(st.booleans()):
            a, b = b, a
        name = self.draw(st.sampled_from(["add", "sub", "mul", "div", "maximum", "minimum", "pow"]))
        if name == "pow":
            a = self.emit("mlc.abs", [a])
        if name == "div":
            b = self.emit("mlc.add", [self.emit("mlc.abs", [b]), self.constant_scalar(a.type.element, 1.0)])
        return self.emit(f"mlc.{name}", [a, b])

    def constant_scalar(self, element, value):
        t = TensorType((), element)
        return self.emit("mlc.constant", [], {"value": DenseAttr(np.array(value, element.np_dtype), t)}, [t])

    def constant(self):
        shape = self.new_shape(self.draw(st.integers(0, 2)))
        t = TensorType(shape, f32)
        values = self.draw(st.lists(st.floats(-4, 4, width=32), min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
        return self.emit("mlc.constant", [], {"value": DenseAttr(np.array(values, np.float32).reshape(shape), t)}, [t])

    def select(self):
        a = self.pick()
        zero = self.constant_scalar(a.type.element, 0.0)
        cond = self.emit(f"mlc.{self.draw(st.sampled_from(['gt', 'lt', 'ge', 'le', 'eq', 'ne']))}", [a, zero])
        b = self.pick(lambda w: w.type.element == a.type.element and _broadcastable(self, a, w)) or a
        return self.emit("mlc.select", [cond, a, b])

    def reduction(self):
        v = self.pick(lambda w: w.type.rank >= 1)
        if v is None:
            return None
        axes = sorted(self.draw(st.sets(st.integers(0, v.type.rank - 1), min_size=1)))
        name = self.draw(st.sampled_from(["reduce_sum", "reduce_mean", "reduce_max", "reduce_min", "reduce_prod", "argmax"]))
        if name == "argmax":
            axes = axes[:1]
        out = self.emit(f"mlc.{name}", [v], {"axes": axes, "keepdims": self.draw(st.booleans())})
        if name == "argmax":
            return self.emit("mlc.cast", [out], {"to": f32})
        return out

    def matmul(self):
        a = self.pick(lambda w: w.type.rank >= 1 and w.type.shape[-1] is not None)
        if a is None:
            return None
        k, n = a.type.shape[-1], self.draw(st.integers(1, 4))
        if a.type.rank >= 3 and self.draw(st.booleans()):  # batched weight
            b = self.arg(self.actual(a)[:-2] + (k, n), f32, tuple(i for i, d in enumerate(a.type.shape[:-2]) if d is None))
        else:
            b = self.arg((k, n) if self.draw(st.integers(0, 4)) else (k,))
        return self.emit("mlc.matmul", [a, b])

    def transpose(self):
        v = self.pick(lambda w: w.type.rank >= 2)
        if v is None:
            return None
        return self.emit("mlc.transpose", [v], {"perm": list(self.draw(st.permutations(range(v.type.rank))))})

    def reshape(self):
        v = self.pick(lambda w: w.type.rank >= 2 and w.type.is_static)
        if v is None:
            return None
        s = v.type.shape
        shape = s[:-2] + (s[-2] * s[-1],) if self.draw(st.booleans()) else (int(np.prod(s)),)
        return self.emit("mlc.reshape", [v], result_types=[TensorType(shape, v.type.element)])

    def slice_or_pad(self):
        v = self.pick(lambda w: w.type.rank >= 1)
        if v is None:
            return None
        shape = v.type.shape
        if self.draw(st.booleans()):
            start, limit, stride = [], [], []
            for d in shape:
                if d is None:
                    start.append(0), limit.append(2**62), stride.append(1)
                else:
                    s = self.draw(st.integers(0, d - 1))
                    start.append(s), limit.append(self.draw(st.integers(s + 1, d))), stride.append(self.draw(st.integers(1, 2)))
            return self.emit("mlc.slice", [v], {"start": start, "limit": limit, "stride": stride})
        low = [0 if d is None else self.draw(st.integers(0, 2)) for d in shape]
        high = [0 if d is None else self.draw(st.integers(0, 2)) for d in shape]
        return self.emit("mlc.pad", [v], {"low": low, "high": high, "value": self.draw(st.sampled_from([0.0, -1.5]))})

    def concat(self):
        v = self.pick(lambda w: w.type.rank >= 1 and any(d is not None for d in w.type.shape))
        if v is None:
            return None
        axis = self.draw(st.sampled_from([i for i, d in enumerate(v.type.shape) if d is not None]))
        other = self.pick(lambda w: w.type == v.type) or v
        return self.emit("mlc.concat", [v, other], {"axis": axis})

    def softmax(self):
        v = self.pick(lambda w: w.type.rank >= 1)
        if v is None:
            return None
        name = self.draw(st.sampled_from(["softmax", "log_softmax"]))
        return self.emit(f"mlc.{name}", [v], {"axis": self.draw(st.integers(-v.type.rank, v.type.rank - 1))})

    def clamp_or_cast(self):
        v = self.pick()
        if self.draw(st.booleans()):
            return self.emit("mlc.clamp", [v], {"min": -0.5, "max": self.draw(st.sampled_from([0.5, 2.0]))})
        wide = self.emit("mlc.cast", [v], {"to": f64})
        return self.emit("mlc.cast", [self.emit("mlc.tanh", [wide])], {"to": f32})

    def conv_or_pool(self):
        n = self.draw(st.integers(1, 2))
        c = self.draw(st.integers(1, 3))
        h, w = self.draw(st.integers(3, 6)), self.draw(st.integers(3, 6))
        x = self.arg((self.batch if self.dynamic else n, c, h, w), f32, (0,) if self.dynamic else ())
        kind = self.draw(st.sampled_from(["conv2d", "conv2d_transpose", "max_pool2d", "avg_pool2d"]))
        if kind.endswith("pool2d"):
            k = self.draw(st.integers(1, 3))
            pad = self.draw(st.integers(0, k // 2))
            attrs = {"kernel": [k, k], "stride": [self.draw(st.integers(1, 2))] * 2, "padding": [pad] * 4}
            if kind == "avg_pool2d":
                attrs["count_include_pad"] = self.draw(st.booleans())
            return self.emit(f"mlc.{kind}", [x], attrs)
        groups = self.draw(st.sampled_from([g for g in (1, 2, 3) if c % g == 0]))
        k, stride, dil = self.draw(st.integers(1, 3)), self.draw(st.integers(1, 2)), self.draw(st.integers(1, 2))
        if kind == "conv2d":
            out = groups * self.draw(st.integers(1, 2))
            pads = [self.draw(st.integers(0, 2)) for _ in range(4)]
            if min(h + pads[0] + pads[2], w + pads[1] + pads[3]) < dil * (k - 1) + 1:
                dil = 1
            weight = self.arg((out, c // groups, k, k))
            return self.emit("mlc.conv2d", [x, weight], {"stride": [stride, stride], "padding": pads,
                                                        "dilation": [dil, dil], "groups": groups})
        weight = self.arg((c, self.draw(st.integers(1, 2)), k, k))
        pad = self.draw(st.integers(0, (k - 1) * dil // 2))
        out_pad = self.draw(st.integers(0, max(stride, dil) - 1))
        return self.emit("mlc.conv2d_transpose", [x, weight], {"stride": [stride, stride], "padding": [pad] * 4,
                                                               "output_padding": [out_pad, out_pad],
                                                               "dilation": [dil, dil], "groups": groups})

    def gather(self):
        v = self.pick(lambda w: w.type.rank >= 1 and any(d is not None for d in w.type.shape))
        if v is None:
            return None
        axis = self.draw(st.sampled_from([i for i, d in enumerate(v.type.shape) if d is not None]))
        idx = self.arg(self.new_shape(self.draw(st.integers(0, 2))), i64, high=v.type.shape[axis])
        g = self.emit("mlc.gather", [v, idx], {"axis": axis})
        if self.draw(st.booleans()):
            return self.emit("mlc.scatter_add", [v, idx, g], {"axis": axis})
        return g

    def cross_entropy(self):
        logits = self.pick(lambda w: w.type.rank == 2 and w.type.shape[1] is not None)
        if logits is None:
            return None
        labels = self.arg(self.actual(logits)[:1], i64, (0,) if logits.type.shape[0] is None else (), high=logits.type.shape[1])
        return self.emit("mlc.cross_entropy", [logits, labels])

    def call(self):
        v = self.pick()
        name = f"helper{len(self.module.functions)}"
        f = FuncOp.build(name, [v.type], [v.type], ["x"], private=self.draw(st.booleans()))
        inner = _Builder(self.draw, self.module, self.batch, self.dynamic)
        inner.block = f.body
        inner.pool = [f.args[0]]
        y = inner.unary()
        inner.emit("func.return", [y], result_types=[])
        self.module.body.insert_before(self.module.body.first, f)
        return self.emit("func.call", [v], {"callee": SymbolRefAttr(name)})

    def scan(self):
        seq = self.pick(lambda w: w.type.rank >= 2)
        if seq is None:
            return None
        step_type = seq.type.with_shape(seq.type.shape[1:])
        h0 = self.arg(tuple(self.batch if d is None else d for d in step_type.shape), f32,
                      tuple(i for i, d in enumerate(step_type.shape) if d is None))
        body = Block([step_type, step_type], ["h", "x"])
        inner = _Builder(self.draw, self.module, self.batch, self.dynamic)
        inner.block = body
        h, x = body.args
        s = inner.emit("mlc.add", [h, x])
        w = self.pick(lambda v: v.type == step_type)  # a captured outer value
        if w is not None:
            s = inner.emit("mlc.mul", [s, w])
        h_next = inner.emit("mlc.tanh", [s])
        out = inner.emit("mlc.sigmoid", [x])
        inner.emit("mlc.yield", [h_next, out], result_types=[])
        attrs = {"num_carries": 1}
        if self.draw(st.booleans()):
            attrs["reverse"] = True
        results = self.emit("mlc.scan", [h0, seq], attrs, regions=[Region([body])])
        return results[0]

    FAMILIES = ("unary", "binary", "constant", "select", "reduction", "matmul", "transpose", "reshape",
                "slice_or_pad", "concat", "softmax", "clamp_or_cast", "conv_or_pool", "gather", "cross_entropy",
                "call", "scan")

    def build(self, n_ops: int, families=FAMILIES):
        self.fresh_float()
        generators = [getattr(self, name) for name in families] + [self.binary, self.fresh_float]
        for _ in range(n_ops):
            self.draw(st.sampled_from(generators))()


def _broadcastable(b: _Builder, x, y) -> bool:
    try:
        np.broadcast_shapes(b.actual(x), b.actual(y))
    except ValueError:
        return False
    sx, sy = x.type.shape[::-1], y.type.shape[::-1]
    # a `?` against a static size: fine only where the static size is 1 or B
    return all(not ((p is None) != (q is None)) or (p or q) in (1, b.batch) for p, q in zip(sx, sy))


@st.composite
def programs(draw, max_ops: int = 8, dynamic: bool | None = None, families=_Builder.FAMILIES) -> Program:
    """A verified module with one public function `@main` and inputs for it. `families` picks the
    kinds of ops drawn (see _Builder.FAMILIES), e.g. to test a backend on what it supports."""
    load_dialects()
    module = Module("generated")
    batch = draw(st.integers(1, 4))
    dynamic = draw(st.booleans()) if dynamic is None else dynamic
    b = _Builder(draw, module, batch, dynamic)
    b.build(draw(st.integers(1, max_ops)), families)
    outputs = [b.pool[-1]] + draw(st.lists(st.sampled_from(b.pool), max_size=2))
    outputs = list(dict.fromkeys(outputs))
    ftype = FunctionType(tuple(a.type for a in b.block.args), tuple(v.type for v in outputs))
    main = create_op("func.func", attributes={"sym_name": StringAttr("main"), "function_type": TypeAttr(ftype)},
                     regions=[Region([b.block])])
    b.block.append(create_op("func.return", outputs, []))
    module.append(main)
    from mlc.ir.verifier import verify
    verify(module)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    inputs = []
    for t, high in b.args:
        shape = tuple(batch if d is None else d for d in t.shape)
        if t.element.is_float:
            inputs.append(rng.standard_normal(shape).astype(t.element.np_dtype))
        else:
            inputs.append(rng.integers(0, high, shape).astype(t.element.np_dtype))
    return Program(module, "main", inputs)


def run(module: Module, entry: str, inputs) -> list[np.ndarray]:
    from mlc.ir.interpreter import Interpreter
    out = Interpreter(module).call_public(entry, inputs)
    return list(out) if isinstance(out, tuple) else [out]


def assert_same_results(expected, actual, rtol=1e-5, atol=1e-6, what="results"):
    assert len(expected) == len(actual), f"{what}: {len(expected)} vs {len(actual)} results"
    for i, (e, a) in enumerate(zip(expected, actual)):
        assert e.shape == a.shape and e.dtype == a.dtype, f"{what}: result {i} is {a.dtype}{list(a.shape)}, expected {e.dtype}{list(e.shape)}"
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol, equal_nan=True, err_msg=f"{what}: result {i}")


def check_pipeline(program: Program, pipeline: str, rtol=1e-5, atol=1e-6):
    """Run `pipeline` on a copy of the program; its results must equal the original's."""
    from mlc.passes import PassManager
    expected = run(program.module, program.entry, program.inputs)
    module = program.module.clone()
    PassManager.parse(pipeline).run(module)
    assert_same_results(expected, run(module, program.entry, program.inputs), rtol, atol, what=f"after '{pipeline}'")
    return module


@st.composite
def mutations(draw, text: str) -> str:
    """Damaged variants of valid IR text: truncated, a span deleted or duplicated, a character or token
    replaced. A parser must answer each with diagnostics only."""
    kind = draw(st.sampled_from(["truncate", "delete", "duplicate", "replace_char", "replace_token", "binary"]))
    n = len(text)
    i = draw(st.integers(0, max(n - 1, 0)))
    j = draw(st.integers(i, min(n, i + 40)))
    if kind == "truncate":
        return text[:i]
    if kind == "delete":
        return text[:i] + text[j:]
    if kind == "duplicate":
        return text[:j] + text[i:j] + text[j:]
    if kind == "replace_char":
        return text[:i] + draw(st.sampled_from(list("%@^{}()<>[],:=?x0-#\"\\\n\t é"))) + text[i + 1:]
    if kind == "binary":
        return text[:i] + "\x00\xff\x01" + text[i:]
    tokens = ["tensor<?xf32>", "f32", "i64", "mlc.add", "mlc.scan", "return", "%x", "%0#3", "@main", "dense<[1.0]>",
              "{axis = 1}", "{", "}", "(", ")", "->", ":", "over", "^bb0(", "loc(\"x\":1:1)", "array<i64: 1>", "9999999999999999999999"]
    return text[:i] + draw(st.sampled_from(tokens)) + text[j:]


# --- differential checks between configurations (interpreter, CPU backend, pass pipelines) -----------------

class Disagreement(AssertionError):
    """Two configurations gave different results; `.reproducer` names the files written, if any."""

    def __init__(self, message, reproducer=None):
        super().__init__(message)
        self.reproducer = reproducer


def run_config(module: Module, entry: str, inputs, config: str) -> list:
    """Results of `entry` under a configuration: "interp", "cpu", or either after a pass pipeline,
    written "interp:inline,canonicalize" / "cpu:cse"."""
    backend, _, pipeline = config.partition(":")
    if pipeline:
        from mlc.passes import PassManager
        module = module.clone()
        PassManager.parse(pipeline).run(module)
    if backend == "interp":
        return run(module, entry, inputs)
    if backend == "cpu":
        import mlc
        out = mlc.compile(module)[entry](*inputs)
        return list(out) if isinstance(out, tuple) else [out]
    raise ValueError(f"unknown configuration '{config}' (use interp or cpu, optionally with ':pipeline')")


def _outcome(program, config):
    import mlc
    try:
        return run_config(program.module, program.entry, program.inputs, config), None
    except mlc.DiagnosticError as e:
        return None, str(e).splitlines()[0]


def check_agreement(program: Program, a: str = "interp", b: str = "cpu", out_dir=None, rtol=1e-4, atol=1e-5):
    """Run a program under two configurations; on disagreement write `repro.ir` and `repro.npz` (its
    inputs, by argument name) into out_dir and raise Disagreement. Both failing with an error counts
    as agreement (bad inputs are refused the same way)."""
    (ra, ea), (rb, eb) = _outcome(program, a), _outcome(program, b)
    problem = None
    if (ea is None) != (eb is None):
        problem = f"{a} {'failed: ' + ea if ea else 'succeeded'}; {b} {'failed: ' + eb if eb else 'succeeded'}"
    elif ra is not None:
        try:
            assert_same_results(ra, rb, rtol, atol, what=f"{b} against {a}")
        except AssertionError as e:
            problem = str(e)
    if problem is None:
        return
    paths = write_reproducer(program, out_dir, f"{a} vs {b}: {problem.splitlines()[0]}") if out_dir else None
    raise Disagreement(problem, paths)


def write_reproducer(program: Program, out_dir, note: str):
    """A self-contained reproducer: the module as .ir and its inputs as .npz (named after the arguments)."""
    import io
    import os
    from mlc.runtime.files import write_atomically
    from mlc.ir.interpreter import arg_names
    os.makedirs(out_dir, exist_ok=True)
    ir_path, npz_path = os.path.join(out_dir, "repro.ir"), os.path.join(out_dir, "repro.npz")
    names = arg_names(program.module.functions[program.entry])
    write_atomically(ir_path, (f"// {note}\n// inputs: {os.path.basename(npz_path)} (mlc run repro.ir --entry @{program.entry} "
                               f"--input repro.npz)\n" + program.text).encode())
    buf = io.BytesIO()
    np.savez(buf, **dict(zip(names, program.inputs)))
    write_atomically(npz_path, buf.getvalue())
    return ir_path, npz_path


def fuzz(examples: int = 100, a: str = "interp", b: str = "cpu", out_dir="mlc-fuzz", families=None, seed=None,
         progress=None):
    """Generate programs until one disagrees between configurations a and b; hypothesis shrinks it and
    the smallest reproducer is written to out_dir. Returns None, or the Disagreement."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as fixed_seed
    count = [0]
    strategy = programs(families=families) if families else programs()

    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(strategy)
    def one(p):
        count[0] += 1
        if progress:
            progress(count[0], examples)
        check_agreement(p, a, b, out_dir)

    if seed is not None:
        one = fixed_seed(seed)(one)
    try:
        one()
    except Disagreement as e:
        return e
    return None
