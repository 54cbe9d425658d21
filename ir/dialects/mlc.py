"""The `mlc` dialect: tensor-level ops (SPEC §3). One declaration per op; families share a base.

Semantics are numpy's unless a docstring says otherwise; `interpret` is the definition that every
backend is tested against. Kernels may return any numeric dtype: the interpreter casts each result to
its declared element type (bf16 values are held in float32, rounded to bf16).
"""
from __future__ import annotations

import math

import numpy as np

from .. import random as rng
from ..attributes import DenseAttr, StringAttr
from ..core import Block, Region
from ..memory import check_fits_in_memory
from ..registry import (BROADCASTING, COMMUTATIVE, ELEMENTWISE, PURE, READS, SYMBOL, TERMINATOR, USES_SYMBOLS,
                        Attr, OpDef, Probe, Terminator, VerifyError)
from ..types import ERROR, TensorType, element_of, f32, i1, i64, int_range, types_compatible
from .shapes import (broadcast_shapes, fmt_shape, norm_axes, norm_axis, num_elements, pads4, positive,
                     require_element, same_element, tensor_type, window_out)


def _tensors(op):
    return [tensor_type(t, f"operand {i}") for i, t in enumerate(op.operand_types)]


def _acc(x: np.ndarray) -> np.ndarray:
    """Accumulate half-precision (and narrower) values in f32, as PyTorch's CPU kernels do."""
    return x.astype(np.float32) if x.dtype == np.float16 or x.dtype.name.startswith("float8") else x


def _floating(x: np.ndarray) -> bool:
    """Holds floats (numpy's, or ml_dtypes' narrow formats)?"""
    return x.dtype.kind == "f" or x.dtype.name.startswith(("float", "bfloat"))


class RuntimeCheck(Exception):
    """A kernel's complaint about run-time values (sizes, indices); reported at the op's location."""


# ---------------------------------------------------------------------------------------------------
# Folding hooks (the canonicalize pass calls `fold`). A hook returns one replacement per result: an
# existing Value of the same type, or a numpy array to become a constant; or the op's own results after
# updating it in place; or None.

def _splat_equals(c, value) -> bool:
    splat = _splat(c)
    return splat is not None and bool(splat == value)


def _same(v, op):
    return [v] if v.type == op.results[0].type else None


_RIGHT_IDENTITY = {"mlc.add": 0, "mlc.sub": 0, "mlc.mul": 1, "mlc.div": 1, "mlc.pow": 1}
_LEFT_IDENTITY = {"mlc.add": 0, "mlc.mul": 1}
_IDEMPOTENT = {"mlc.maximum", "mlc.minimum", "mlc.and", "mlc.or"}


def _selected_splat(v):
    """The value of every element of v where v selects, by a constant splat condition, a constant splat
    (the IR's zeros_like(x) is select(true, 0.0, x)), as a 0-d array; else None."""
    op = v.defining_op()
    if op is None or op.name != "mlc.select":
        return None
    condition = _splat(constant_value(op.operands[0]))
    return None if condition is None else _splat(constant_value(op.operands[1 if condition else 2]))


def _splat(c):
    return c.reshape(-1)[0].reshape(()) if c is not None and c.size and np.all(c == c.reshape(-1)[0]) else None


def constant_value(v):
    """v's value where an mlc.constant defines it, else None."""
    op = v.defining_op()
    return op.attributes["value"].value if op is not None and op.name == "mlc.constant" else None


def _fold_binary(op, consts):
    """x+0, x-0, x*1, x/1, x**1 -> x (x+0.0 -> x treats -0.0 as 0.0; zeros_like(y) counts as 0); max(x,x),
    and(x,x) -> x; integer x*0 -> 0."""
    (a, b), (ca, cb) = op.operands, consts
    ca = _selected_splat(a) if ca is None else ca
    cb = _selected_splat(b) if cb is None else cb
    if op.name in _RIGHT_IDENTITY and _splat_equals(cb, _RIGHT_IDENTITY[op.name]):
        return _same(a, op)
    if op.name in _LEFT_IDENTITY and _splat_equals(ca, _LEFT_IDENTITY[op.name]):
        return _same(b, op)
    if op.name in _IDEMPOTENT and a is b:
        return _same(a, op)
    r = op.results[0].type
    if op.name == "mlc.mul" and r.element.is_int and r.is_static and (_splat_equals(ca, 0) or _splat_equals(cb, 0)):
        return [np.zeros(r.shape, r.element.np_dtype)]
    return None


def _fold_involution(op, consts):
    """neg(neg x), not(not x) -> x."""
    inner = op.operands[0].defining_op()
    return _same(inner.operands[0], op) if inner is not None and inner.name == op.name else None


def _fold_idempotent_unary(op, consts):
    """relu(relu x), abs(abs x), floor(floor x) -> relu x, ..."""
    inner = op.operands[0].defining_op()
    return _same(op.operands[0], op) if inner is not None and inner.name == op.name else None


def _fold_noop(op, consts):
    """A shape op that changes nothing (same type in and out, no data movement) is its operand."""
    x = op.operands[0]
    if x.type != op.results[0].type:
        return None
    if op.name == "mlc.transpose" and tuple(op.attr("perm")) != tuple(range(x.type.rank)):
        return None
    if op.name == "mlc.slice":
        start, limit, stride = Slice.bounds(op, x.type.rank)
        if any(s != 0 for s in start) or any(k != 1 for k in stride) or \
                any(d is None and l < 2**62 for d, l in zip(x.type.shape, limit)):
            return None
    if op.name.startswith("mlc.reduce_") and (op.attr("axes") is None or len(op.attr("axes")) != 0):
        return None
    if op.name == "mlc.clamp" and (op.attr("min") is not None or op.attr("max") is not None):
        return None
    if op.name == "mlc.pad" and any(op.attr("low") + op.attr("high")):  # (a `?` dim padded keeps its type)
        return None
    return [x]


def _fold_reshape(op, consts):
    """reshape(reshape(x)) -> reshape(x); a reshape to the operand's type -> the operand."""
    inner = op.operands[0].defining_op()
    if inner is not None and inner.name == "mlc.reshape":
        op.set_operand(0, inner.operands[0])
        return op.results
    return _fold_noop(op, consts)


def _fold_transpose(op, consts):
    """transpose(transpose(x)) -> one transpose with the composed permutation; identity -> x."""
    inner = op.operands[0].defining_op()
    if inner is not None and inner.name == "mlc.transpose":
        outer, first = op.attr("perm"), inner.attr("perm")
        op.set_operand(0, inner.operands[0])
        op.set_attr("perm", [first[p] for p in outer])
        return op.results
    return _fold_noop(op, consts)


def _fold_select(op, consts):
    c, a, b = op.operands
    if a is b:
        return _same(a, op)
    condition = _splat(consts[0])
    return None if condition is None else _same(a if condition else b, op)


# ---------------------------------------------------------------------------------------------------
# Elementwise ops: one row each
#
# A row is a class declaration whose keywords say everything about the op:
#   fn      its numpy definition (the interpreter's kernel)
#   kind    the element types it takes (shapes.require_element): "float", "num", "logic" or "any"
#   grad    its derivative applied to the cotangent g, in ops: grad(d, x, y, g) -> the cotangent of x
#           (binary: grad(d, a, b, y, g) -> those of a and b, before broadcast dims are summed back);
#           y is the op's result
#   fold    a folding hook (above)
#   cost    EXPENSIVE where an element costs a math-library call or more: fused kernels compute such
#           a value once and keep it rather than recompute it
#   scalar  how a code generator computes one element: None where every generator has the operation
#           built in (add, neg, ...); a C math function's name ("erf"), which each generator maps (to an
#           LLVM intrinsic or libm on the CPU, libdevice on CUDA); or an expansion (s, *xs) -> value over
#           other scalar ops, where s(name, *xs) makes arith.<name>, s.const(v) a constant of the
#           operands' type and s.attr(name) reads the op's attribute
# Each row also gets a scalar twin `arith.<name>` for loop-level code (ir/dialects/loops.py).

CHEAP, EXPENSIVE = "cheap", "expensive"
UNARY: dict[str, type[OpDef]] = {}   # short name -> row
BINARY: dict[str, type[OpDef]] = {}
_ROW_HOOKS: list = []


def on_each_row(hook) -> None:
    """Call hook(short name, row) for every elementwise row, those declared so far and those to come
    (the loop dialect makes each row's scalar twin this way)."""
    _ROW_HOOKS.append(hook)
    for table in (UNARY, BINARY):
        for name, row in list(table.items()):
            hook(name, row)


class Elementwise(OpDef):
    traits = {PURE, ELEMENTWISE}
    cost = CHEAP
    scalar = None

    def __init_subclass__(cls, name=None, fn=None, kind=None, grad=None, fold=None, cost=None, scalar=None, **kw):
        for key, value in (("name", name), ("kind", kind), ("cost", cost)):
            if value is not None:
                setattr(cls, key, value)
        for key, value in (("fn", fn), ("fold", fold)):
            if value is not None:
                setattr(cls, key, staticmethod(value))
        if scalar is not None:
            cls.scalar = staticmethod(scalar) if callable(scalar) else scalar
        if grad is not None:
            cls.vjp = cls.vjp_from(grad)
        super().__init_subclass__(**kw)
        if cls.__dict__.get("name", "").startswith("mlc."):  # (not the arith twins)
            cls.table()[cls.name[len("mlc."):]] = cls
            for hook in _ROW_HOOKS:
                hook(cls.name[len("mlc."):], cls)


class Unary(Elementwise):
    operands = 1
    kind = "float"

    @staticmethod
    def table():
        return UNARY

    @staticmethod
    def vjp_from(grad):
        return staticmethod(lambda d, op, g: [grad(d, op.operands[0], op.results[0], g)])

    @classmethod
    def infer(cls, op, ctx):
        (t,) = _tensors(op)
        require_element(t, cls.kind)
        return [t]

    @classmethod
    def interpret(cls, ins, op, ctx):
        with np.errstate(all="ignore"):
            return cls.fn(ins[0])


class Binary(Elementwise):
    operands = 2
    traits = {PURE, ELEMENTWISE, BROADCASTING}
    kind = "num"
    compares = False
    fold = staticmethod(_fold_binary)

    def __init_subclass__(cls, commutative=False, compares=False, **kw):
        if compares:
            cls.compares = True
        if commutative:
            cls.traits = frozenset(cls.traits) | {COMMUTATIVE}
        super().__init_subclass__(**kw)

    @staticmethod
    def table():
        return BINARY

    @staticmethod
    def vjp_from(grad):
        def vjp(d, op, g):
            a, b = op.operands
            ga, gb = grad(d, a, b, op.results[0], g)
            return [d.sum_to(ga, a.type), d.sum_to(gb, b.type)]
        return staticmethod(vjp)

    @classmethod
    def infer(cls, op, ctx):
        a, b = _tensors(op)
        same_element([a, b])
        require_element(a, cls.kind)
        return [TensorType(broadcast_shapes([a.shape, b.shape]), i1 if cls.compares else a.element)]

    @classmethod
    def interpret(cls, ins, op, ctx):
        with np.errstate(all="ignore"):
            return cls.fn(*ins)


def _sigmoid(x):
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


def _sigmoid_scalar(s, x):
    """As _sigmoid: exp of -|x| only, so it never overflows."""
    e = s("exp", s("neg", s("abs", x)))
    denom = s("add", s.const(1), e)
    return s("select", s("ge", x, s.const(0)), s("div", s.const(1), denom), s("div", e, denom))


def _sign_scalar(s, x):
    """-1, 1, or x itself (0, -0.0, NaN)."""
    zero = s.const(0)
    return s("select", s("lt", x, zero), s.const(-1), s("select", s("gt", x, zero), s.const(1), x))


_erf = np.frompyfunc(math.erf, 1, 1)


def _erf_array(x):
    return np.asarray(_erf(np.asarray(x, np.float64)), np.float64)


def _not(x):
    return np.logical_not(x) if x.dtype == np.bool_ else np.invert(x)


def _one(d, x):
    return d.scalar(1, x)


def _sqrt_diff_squares(d, a, b):
    """sqrt(a^2 - b^2) as sqrt((a - b)(a + b)): no cancellation where |a| is near |b|."""
    return d("mlc.sqrt", d("mlc.mul", d("mlc.sub", a, b), d("mlc.add", a, b)))


class Neg(Unary, name="mlc.neg", fn=np.negative, kind="num", fold=_fold_involution, grad=lambda d, x, y, g: d("mlc.neg", g)): ...
class Abs(Unary, name="mlc.abs", fn=np.abs, kind="num", fold=_fold_idempotent_unary, grad=lambda d, x, y, g: d("mlc.mul", g, d("mlc.sign", x))): ...
class Exp(Unary, name="mlc.exp", fn=np.exp, cost=EXPENSIVE, scalar="exp", grad=lambda d, x, y, g: d("mlc.mul", g, y)): ...
class Log(Unary, name="mlc.log", fn=np.log, cost=EXPENSIVE, scalar="log", grad=lambda d, x, y, g: d("mlc.div", g, x)): ...
class Log1p(Unary, name="mlc.log1p", fn=np.log1p, cost=EXPENSIVE, scalar="log1p",
            grad=lambda d, x, y, g: d("mlc.div", g, d("mlc.add", x, _one(d, x)))): ...
class Sqrt(Unary, name="mlc.sqrt", fn=np.sqrt, scalar="sqrt", grad=lambda d, x, y, g: d("mlc.div", g, d("mlc.mul", y, d.scalar(2, x)))): ...
class Rsqrt(Unary, name="mlc.rsqrt", fn=lambda x: 1 / np.sqrt(x), scalar=lambda s, x: s("div", s.const(1), s("sqrt", x)),
            grad=lambda d, x, y, g: d("mlc.mul", g, d("mlc.mul", d.scalar(-0.5, x), d("mlc.div", y, x)))): ...
class Reciprocal(Unary, name="mlc.reciprocal", fn=lambda x: 1 / x, scalar=lambda s, x: s("div", s.const(1), x),
                 grad=lambda d, x, y, g: d("mlc.neg", d("mlc.mul", g, d("mlc.mul", y, y)))): ...
class Square(Unary, name="mlc.square", fn=np.square, kind="num", scalar=lambda s, x: s("mul", x, x),
             grad=lambda d, x, y, g: d("mlc.mul", g, d("mlc.mul", x, d.scalar(2, x)))): ...
class Tanh(Unary, name="mlc.tanh", fn=np.tanh, cost=EXPENSIVE, scalar="tanh",
           grad=lambda d, x, y, g: d("mlc.mul", g, d("mlc.sub", _one(d, y), d("mlc.mul", y, y)))): ...
class Sigmoid(Unary, name="mlc.sigmoid", fn=_sigmoid, cost=EXPENSIVE, scalar=_sigmoid_scalar,
              grad=lambda d, x, y, g: d("mlc.mul", g, d("mlc.mul", y, d("mlc.sub", _one(d, y), y)))): ...
class Relu(Unary, name="mlc.relu", fn=lambda x: np.maximum(x, x.dtype.type(0)), kind="num", fold=_fold_idempotent_unary,
           scalar=lambda s, x: s("maximum", x, s.const(0)),
           grad=lambda d, x, y, g: d("mlc.select", d("mlc.gt", y, d.scalar(0, y)), g, d.scalar(0, y))): ...  # (y: x need not be kept)
class Erf(Unary, name="mlc.erf", fn=_erf_array, cost=EXPENSIVE, scalar="erf",
          grad=lambda d, x, y, g: d("mlc.mul", g, d("mlc.mul", d.scalar(2 / math.sqrt(math.pi), x), d("mlc.exp", d("mlc.neg", d("mlc.mul", x, x)))))): ...
class Sin(Unary, name="mlc.sin", fn=np.sin, cost=EXPENSIVE, scalar="sin", grad=lambda d, x, y, g: d("mlc.mul", g, d("mlc.cos", x))): ...
class Cos(Unary, name="mlc.cos", fn=np.cos, cost=EXPENSIVE, scalar="cos", grad=lambda d, x, y, g: d("mlc.neg", d("mlc.mul", g, d("mlc.sin", x)))): ...
class Sign(Unary, name="mlc.sign", fn=np.sign, kind="num", scalar=_sign_scalar, grad=lambda d, x, y, g: None): ...  # zero almost everywhere
class Floor(Unary, name="mlc.floor", fn=np.floor, scalar="floor", fold=_fold_idempotent_unary, grad=lambda d, x, y, g: None): ...
class Round(Unary, name="mlc.round", fn=np.round, scalar="rint", fold=_fold_idempotent_unary, grad=lambda d, x, y, g: None): ...  # half to even
class Tan(Unary, name="mlc.tan", fn=np.tan, cost=EXPENSIVE, scalar="tan",
          grad=lambda d, x, y, g: d("mlc.mul", g, d("mlc.add", _one(d, y), d("mlc.mul", y, y)))): ...
class Asin(Unary, name="mlc.asin", fn=np.arcsin, cost=EXPENSIVE, scalar="asin", grad=lambda d, x, y, g: d("mlc.div", g, _sqrt_diff_squares(d, _one(d, x), x))): ...
class Acos(Unary, name="mlc.acos", fn=np.arccos, cost=EXPENSIVE, scalar="acos",
           grad=lambda d, x, y, g: d("mlc.neg", d("mlc.div", g, _sqrt_diff_squares(d, _one(d, x), x)))): ...
class Atan(Unary, name="mlc.atan", fn=np.arctan, cost=EXPENSIVE, scalar="atan",
           grad=lambda d, x, y, g: d("mlc.div", g, d("mlc.add", _one(d, x), d("mlc.mul", x, x)))): ...
class Sinh(Unary, name="mlc.sinh", fn=np.sinh, cost=EXPENSIVE, scalar="sinh", grad=lambda d, x, y, g: d("mlc.mul", g, d("mlc.cosh", x))): ...
class Cosh(Unary, name="mlc.cosh", fn=np.cosh, cost=EXPENSIVE, scalar="cosh", grad=lambda d, x, y, g: d("mlc.mul", g, d("mlc.sinh", x))): ...
class Asinh(Unary, name="mlc.asinh", fn=np.arcsinh, cost=EXPENSIVE, scalar="asinh",
            grad=lambda d, x, y, g: d("mlc.div", g, d("mlc.sqrt", d("mlc.add", d("mlc.mul", x, x), _one(d, x))))): ...
class Acosh(Unary, name="mlc.acosh", fn=np.arccosh, cost=EXPENSIVE, scalar="acosh",
            grad=lambda d, x, y, g: d("mlc.div", g, _sqrt_diff_squares(d, x, _one(d, x)))): ...
class Atanh(Unary, name="mlc.atanh", fn=np.arctanh, cost=EXPENSIVE, scalar="atanh",
            grad=lambda d, x, y, g: d("mlc.div", g, d("mlc.sub", _one(d, x), d("mlc.mul", x, x)))): ...
class Not(Unary, name="mlc.not", fn=_not, kind="logic", fold=_fold_involution): ...


def _gelu_scalar(s, x):
    half = s("mul", s.const(0.5), x)
    if s.attr("approximate") == "tanh":
        inner = s("add", x, s("mul", s.const(0.044715), s("mul", s("mul", x, x), x)))
        return s("mul", half, s("add", s.const(1), s("tanh", s("mul", s.const(math.sqrt(2 / math.pi)), inner))))
    return s("mul", half, s("add", s.const(1), s("erf", s("mul", x, s.const(1 / math.sqrt(2))))))


class Gelu(Unary, name="mlc.gelu", cost=EXPENSIVE, scalar=_gelu_scalar):
    """0.5 x (1 + erf(x / sqrt 2)); with approximate = "tanh" PyTorch's tanh approximation."""
    attrs = {"approximate": Attr("str", "none", choices=("none", "tanh"))}

    @staticmethod
    def interpret(ins, op, ctx):
        x = ins[0].astype(np.float64)
        if op.attr("approximate") == "tanh":
            return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
        return 0.5 * x * (1 + _erf_array(x / math.sqrt(2)))

    @staticmethod
    def vjp(d, op, g):
        """Exact: Phi(x) + x phi(x). Tanh form: 0.5 (1 + t) + 0.5 x (1 - t^2) u'(x), u = c (x + a x^3)."""
        x = op.operands[0]
        k = lambda v: d.scalar(v, x)  # noqa: E731
        xx = d("mlc.mul", x, x)
        if op.attr("approximate") == "tanh":
            c, a = math.sqrt(2 / math.pi), 0.044715
            t = d("mlc.tanh", d("mlc.mul", k(c), d("mlc.add", x, d("mlc.mul", k(a), d("mlc.mul", xx, x)))))
            du = d("mlc.mul", k(c), d("mlc.add", k(1), d("mlc.mul", k(3 * a), xx)))
            left = d("mlc.mul", k(0.5), d("mlc.add", k(1), t))
            right = d("mlc.mul", d("mlc.mul", k(0.5), x), d("mlc.mul", d("mlc.sub", k(1), d("mlc.mul", t, t)), du))
            return [d("mlc.mul", g, d("mlc.add", left, right))]
        cdf = d("mlc.mul", k(0.5), d("mlc.add", k(1), d("mlc.erf", d("mlc.mul", x, k(1 / math.sqrt(2))))))
        pdf = d("mlc.mul", k(1 / math.sqrt(2 * math.pi)), d("mlc.exp", d("mlc.mul", xx, k(-0.5))))
        return [d("mlc.mul", g, d("mlc.add", cdf, d("mlc.mul", x, pdf)))]


def _rem(a, b):
    """The remainder of truncated division, with the sign of a (C fmod, LLVM frem/srem); an integer
    x rem 0 is 0 (as x / 0 is), a float one NaN."""
    a, b = np.asarray(a), np.asarray(b)
    if _floating(a):
        return np.fmod(a, b)
    return np.where(b == 0, 0, np.fmod(a, np.where(b == 0, 1, b))).astype(a.dtype)


def _div(a, b):
    """Floats: IEEE division. Integers: truncation toward zero (C, LLVM sdiv); x / 0 is 0."""
    a, b = np.asarray(a), np.asarray(b)
    if _floating(a):
        return a / b
    a, b = np.broadcast_arrays(a, b)
    safe = np.where(b == 0, 1, b)
    q = a // safe
    q = q + ((a % safe != 0) & ((a < 0) != (safe < 0)))
    return np.where(b == 0, 0, q).astype(a.dtype)


def _extremum_grad(wins):
    """maximum/minimum, as PyTorch: the cotangent goes to the winner, split evenly on a tie."""
    def grad(d, a, b, y, g):
        half = d("mlc.mul", g, d.scalar(0.5, g))
        zero = d.scalar(0, g)
        return (d("mlc.select", d(wins, a, b), g, d("mlc.select", d("mlc.eq", a, b), half, zero)),
                d("mlc.select", d(wins, b, a), g, d("mlc.select", d("mlc.eq", a, b), half, zero)))
    return grad


def _pow_grad(d, a, b, y, g):
    """d/da = b a^(b-1); d/db = y log a, taken as 0 where a = 0 and b >= 0 (PyTorch's convention)."""
    da = d("mlc.mul", g, d("mlc.mul", b, d("mlc.pow", a, d("mlc.sub", b, d.scalar(1, b)))))
    at_zero = d("mlc.and", d("mlc.eq", a, d.scalar(0, a)), d("mlc.ge", b, d.scalar(0, b)))
    db = d("mlc.select", at_zero, d.scalar(0, g), d("mlc.mul", g, d("mlc.mul", y, d("mlc.log", a))))
    return da, db


class Add(Binary, name="mlc.add", fn=np.add, commutative=True, grad=lambda d, a, b, y, g: (g, g)): ...
class Sub(Binary, name="mlc.sub", fn=np.subtract, grad=lambda d, a, b, y, g: (g, d("mlc.neg", g))): ...
class Mul(Binary, name="mlc.mul", fn=np.multiply, commutative=True, grad=lambda d, a, b, y, g: (d("mlc.mul", g, b), d("mlc.mul", g, a))): ...
class Div(Binary, name="mlc.div", fn=_div,
          grad=lambda d, a, b, y, g: (d("mlc.div", g, b), d("mlc.neg", d("mlc.div", d("mlc.mul", g, y), b)))): ...
class Rem(Binary, name="mlc.rem", fn=_rem, grad=lambda d, a, b, y, g: (g, d("mlc.mul", g, d("mlc.div", d("mlc.sub", y, a), b)))): ...
class Pow(Binary, name="mlc.pow", fn=np.power, kind="float", cost=EXPENSIVE, scalar="pow", grad=_pow_grad): ...
class Maximum(Binary, name="mlc.maximum", fn=np.maximum, commutative=True, grad=_extremum_grad("mlc.gt")): ...
class Minimum(Binary, name="mlc.minimum", fn=np.minimum, commutative=True, grad=_extremum_grad("mlc.lt")): ...
class Eq(Binary, name="mlc.eq", fn=np.equal, kind="any", commutative=True, compares=True): ...
class Ne(Binary, name="mlc.ne", fn=np.not_equal, kind="any", commutative=True, compares=True): ...
class Lt(Binary, name="mlc.lt", fn=np.less, kind="any", compares=True): ...
class Le(Binary, name="mlc.le", fn=np.less_equal, kind="any", compares=True): ...
class Gt(Binary, name="mlc.gt", fn=np.greater, kind="any", compares=True): ...
class Ge(Binary, name="mlc.ge", fn=np.greater_equal, kind="any", compares=True): ...
class And(Binary, name="mlc.and", fn=np.bitwise_and, kind="logic", commutative=True): ...
class Or(Binary, name="mlc.or", fn=np.bitwise_or, kind="logic", commutative=True): ...


class Select(OpDef):
    """numpy `where(cond, a, b)`; all three broadcast."""
    name = "mlc.select"
    operands = 3
    traits = {PURE, ELEMENTWISE, BROADCASTING}
    fold = staticmethod(_fold_select)

    @staticmethod
    def infer(op, ctx):
        c, a, b = _tensors(op)
        if not c.element.is_bool:
            raise VerifyError(f"condition must have element type i1, got {c.element}")
        same_element([a, b], "operands 1 and 2")
        return [TensorType(broadcast_shapes([c.shape, a.shape, b.shape]), a.element)]

    @staticmethod
    def interpret(ins, op, ctx):
        return np.where(*ins)

    @staticmethod
    def vjp(d, op, g):
        c, a, b = op.operands
        zero = d.scalar(0, g)
        return [None, d.sum_to(d("mlc.select", c, g, zero), a.type), d.sum_to(d("mlc.select", c, zero, g), b.type)]


class Clamp(OpDef):
    """min(max(x, min), max), as torch.clamp; either bound may be left out."""
    name = "mlc.clamp"
    operands = 1
    traits = {PURE, ELEMENTWISE}
    fold = staticmethod(_fold_noop)
    attrs = {"min": Attr("float"), "max": Attr("float")}

    @staticmethod
    def infer(op, ctx):
        (t,) = _tensors(op)
        require_element(t, "num")
        return [t]

    @staticmethod
    def interpret(ins, op, ctx):
        x = ins[0]
        lo, hi = op.attr("min"), op.attr("max")
        if lo is not None:
            x = np.maximum(x, np.array(lo).astype(x.dtype))
        if hi is not None:
            x = np.minimum(x, np.array(hi).astype(x.dtype))
        return x

    @staticmethod
    def vjp(d, op, g):
        """Passes where min <= x <= max (bounds included), as torch.clamp."""
        x, inside = op.operands[0], None
        for bound, within in ((op.attr("min"), "mlc.ge"), (op.attr("max"), "mlc.le")):
            if bound is not None:
                c = d(within, x, d.scalar(bound, x))
                inside = c if inside is None else d("mlc.and", inside, c)
        return [g if inside is None else d("mlc.select", inside, g, d.scalar(0, g))]


class StopGradient(OpDef):
    """x itself, through which no gradient flows (jax.lax.stop_gradient, torch's detach).
    `decompose` removes it once gradients are taken."""
    name = "mlc.stop_gradient"
    operands = 1
    traits = {PURE, ELEMENTWISE}

    @staticmethod
    def infer(op, ctx):
        return list(_tensors(op))

    @staticmethod
    def interpret(ins, op, ctx):
        return ins[0]

    @staticmethod
    def vjp(d, op, g):
        return [None]

    @staticmethod
    def decompose(d, op):
        return [op.operands[0]]


class Cast(OpDef):
    """Element type conversion; the result type (or `to`) gives the target. float -> int truncates
    toward zero and saturates (NaN -> 0); to i1 is `x != 0`."""
    name = "mlc.cast"
    operands = 1
    traits = {PURE, ELEMENTWISE}
    fold = staticmethod(_fold_noop)
    attrs = {"to": Attr("type")}

    @staticmethod
    def infer(op, ctx):
        (t,) = _tensors(op)
        to = op.attr("to")
        if to is None:
            if op.results and op.results[0].type is not ERROR and isinstance(op.results[0].type, TensorType):
                return [t.with_element(op.results[0].type.element)]
            raise VerifyError("needs a result type or a 'to' attribute")
        return [t.with_element(to)]

    @staticmethod
    def interpret(ins, op, ctx):
        return Cast.convert(ins[0], op.results[0].type.element)

    @staticmethod
    def vjp(d, op, g):
        x = op.operands[0]
        return [d("mlc.cast", g, result_type=x.type)]

    @staticmethod
    def convert(x: np.ndarray, target) -> np.ndarray:
        if target.is_bool:
            return x != 0
        if element_of(x.dtype).is_float and target.is_int:
            low, high = int_range(target)
            t = np.trunc(np.nan_to_num(x.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0))
            hi, lo = t >= float(high) + 1.0, t < low  # (float(high) of i64 rounds up to 2^63)
            out = np.where(hi | lo, 0, t).astype(target.np_dtype)
            out[hi | np.isposinf(x)] = high
            out[lo | np.isneginf(x)] = low
            return out
        return x.astype(target.np_dtype)


# ---------------------------------------------------------------------------------------------------
# Constants

class Constant(OpDef):
    name = "mlc.constant"
    traits = {PURE}
    attrs = {"value": Attr("dense", required=True)}
    pretty_value = "value"

    @staticmethod
    def infer(op, ctx):
        return [op.attributes["value"].type]

    @staticmethod
    def interpret(ins, op, ctx):
        return op.attributes["value"].value


class Iota(OpDef):
    """The index along `axis`, broadcast to the (static) result shape."""
    name = "mlc.iota"
    traits = {PURE}
    attrs = {"axis": Attr("int", 0)}

    @staticmethod
    def infer(op, ctx):
        if not op.results or op.results[0].type is ERROR:
            raise VerifyError("needs its result type, e.g. ': tensor<5xi64>'")
        t = tensor_type(op.results[0].type, "result")
        if not t.is_static:
            raise VerifyError(f"result must have a static shape, got {t}")
        norm_axis(op.attr("axis"), t.rank)
        return [t]

    @staticmethod
    def interpret(ins, op, ctx):
        t = op.results[0].type
        axis = norm_axis(op.attr("axis"), t.rank)
        shape = [1] * t.rank
        shape[axis] = t.shape[axis]
        return np.broadcast_to(np.arange(t.shape[axis]).reshape(shape), t.shape)


# ---------------------------------------------------------------------------------------------------
# Reductions

class Reduction(OpDef):
    operands = 1
    traits = {PURE}
    fold = staticmethod(_fold_noop)
    attrs = {"axes": Attr("ints"), "keepdims": Attr("bool", False)}
    kind = "num"

    @classmethod
    def axes(cls, op, rank):
        axes = op.attr("axes")
        return tuple(range(rank)) if axes is None else norm_axes(axes, rank)

    @classmethod
    def infer(cls, op, ctx):
        (t,) = _tensors(op)
        require_element(t, cls.kind)
        axes = cls.axes(op, t.rank)
        shape = [1 if i in axes else d for i, d in enumerate(t.shape)] if op.attr("keepdims") \
            else [d for i, d in enumerate(t.shape) if i not in axes]
        return [TensorType(tuple(shape), cls.result_element(t))]

    @staticmethod
    def result_element(t):
        return t.element

    @classmethod
    def interpret(cls, ins, op, ctx):
        x = ins[0]
        axes = cls.axes(op, x.ndim)
        if cls.needs_elements and any(x.shape[a] == 0 for a in axes):
            raise RuntimeCheck(f"reduction over an empty axis of shape {fmt_shape(x.shape)}")
        return cls.fn(x, axes, bool(op.attr("keepdims")))

    needs_elements = False


def _sum(x, axes, keep):
    return np.sum(_acc(x), axis=axes, keepdims=keep, dtype=None if _floating(x) else x.dtype)


def _prod(x, axes, keep):
    return np.prod(_acc(x), axis=axes, keepdims=keep, dtype=None if _floating(x) else x.dtype)


class ReduceSum(Reduction):
    name = "mlc.reduce_sum"
    fn = staticmethod(_sum)

    @staticmethod
    def vjp(d, op, g):
        x = op.operands[0]
        return [d.expand(d.keepdims(g, op), x)]


class ReduceProd(Reduction):
    name = "mlc.reduce_prod"
    fn = staticmethod(_prod)

    @staticmethod
    def vjp(d, op, g):
        """The product of the other elements, as torch: y / x without zeros; with one zero, the
        product of the rest at the zero and 0 elsewhere; with more, 0."""
        x = op.operands[0]
        axes = list(Reduction.axes(op, x.type.rank))
        zero, one = d.scalar(0, x), d.scalar(1, x)
        is_zero = d("mlc.eq", x, zero)
        others = d("mlc.reduce_prod", d("mlc.select", is_zero, one, x), axes=axes, keepdims=True)
        zeros = d("mlc.reduce_sum", d("mlc.select", is_zero, one, zero), axes=axes, keepdims=True)
        lone_zero = d("mlc.and", is_zero, d("mlc.eq", zeros, one))
        share = d("mlc.select", d("mlc.eq", zeros, zero), d("mlc.div", others, x), d("mlc.select", lone_zero, others, zero))
        return [d("mlc.mul", d.keepdims(g, op), share)]


class ReduceMean(Reduction):
    name = "mlc.reduce_mean"
    kind = "float"
    fn = staticmethod(lambda x, axes, keep: np.mean(_acc(x), axis=axes, keepdims=keep))

    @staticmethod
    def vjp(d, op, g):
        x = op.operands[0]
        axes = Reduction.axes(op, x.type.rank)
        sizes = [x.type.shape[a] for a in axes]
        kept = d.keepdims(g, op)
        count = d.scalar(math.prod(sizes), x) if None not in sizes else \
            d("mlc.reduce_sum", d.expand(d.scalar(1, x), x), axes=list(axes), keepdims=True)
        return [d.expand(d("mlc.div", kept, count), x)]


def _extremum_reduction_vjp(d, op, g):
    """As torch.amax/amin: the cotangent is split evenly among the elements equal to the extremum."""
    x = op.operands[0]
    axes = list(Reduction.axes(op, x.type.rank))
    kept = d.keepdims(op.results[0], op)
    hit = d("mlc.eq", x, kept)
    count = d("mlc.reduce_sum", d("mlc.select", hit, d.scalar(1, x), d.scalar(0, x)), axes=axes, keepdims=True)
    return [d("mlc.select", hit, d("mlc.div", d.keepdims(g, op), count), d.scalar(0, x))]


class ReduceMax(Reduction):
    name = "mlc.reduce_max"
    needs_elements = True
    vjp = staticmethod(_extremum_reduction_vjp)
    fn = staticmethod(lambda x, axes, keep: np.max(x, axis=axes, keepdims=keep))


class ReduceMin(Reduction):
    name = "mlc.reduce_min"
    needs_elements = True
    vjp = staticmethod(_extremum_reduction_vjp)
    fn = staticmethod(lambda x, axes, keep: np.min(x, axis=axes, keepdims=keep))


class ArgReduction(Reduction):
    """Index (i64) of the first maximum/minimum along the one axis in `axes` (NaN counts as maximal)."""
    needs_elements = True

    @classmethod
    def axes(cls, op, rank):
        axes = super().axes(op, rank)
        if len(axes) != 1:
            raise VerifyError(f"reduces exactly one axis; give 'axes = [k]' (got {len(axes)} axes)")
        return axes

    @staticmethod
    def result_element(t):
        return i64


class Argmax(ArgReduction):
    name = "mlc.argmax"
    fn = staticmethod(lambda x, axes, keep: np.argmax(x, axis=axes[0], keepdims=keep))


class Argmin(ArgReduction):
    name = "mlc.argmin"
    fn = staticmethod(lambda x, axes, keep: np.argmin(x, axis=axes[0], keepdims=keep))


# ---------------------------------------------------------------------------------------------------
# Linear algebra

class Matmul(OpDef):
    """numpy `@`: rank-1 operands are promoted and the added dim removed; batch dims broadcast.
    `transpose_a` / `transpose_b` say that operand is stored transposed (its last two dims swapped),
    as the layout pass writes a transpose that only feeds products: the kernel reads it in place.
    `interleaved_a` / `interleaved_b` / `interleaved_c` say that operand (before any transposition), or
    the result, is stored with its last batch dim between its rows and columns, [..., M, H, N] for
    [..., H, M, N]: attention's heads, read and written where they lie in the [batch, tokens, heads,
    features] projections, without the transposes that would split and merge them."""
    name = "mlc.matmul"
    operands = 2
    traits = {PURE}
    MARKS = ("transpose_a", "transpose_b", "interleaved_a", "interleaved_b", "interleaved_c")  # how operands and result are stored
    attrs = {mark: Attr("bool", False) for mark in MARKS}

    @staticmethod
    def stored_transposed(op) -> tuple[bool, bool]:
        return bool(op.attr("transpose_a")), bool(op.attr("transpose_b"))

    @staticmethod
    def interleaved(op) -> tuple[bool, bool, bool]:
        return bool(op.attr("interleaved_a")), bool(op.attr("interleaved_b")), bool(op.attr("interleaved_c"))

    @classmethod
    def infer(cls, op, ctx):
        a, b = _tensors(op)
        same_element([a, b])
        require_element(a, "num")
        if a.rank == 0 or b.rank == 0:
            raise VerifyError("operands must have rank >= 1")
        for i, (t, flag) in enumerate(zip((a, b), cls.stored_transposed(op))):
            if flag and t.rank < 2:
                raise VerifyError(f"operand {i} is stored transposed, so it needs rank >= 2, got {t}")
        ia, ib, ic = cls.interleaved(op)
        for i, (t, flag) in enumerate(zip((a, b), (ia, ib))):
            if flag and t.rank < 3:
                raise VerifyError(f"operand {i} is stored interleaved, so it needs rank >= 3, got {t}")
        a, b = (t.with_shape(_swap_last(t.shape, 2)) if flag else t for t, flag in zip((a, b), (ia, ib)))
        ta, tb = cls.stored_transposed(op)
        sa = _swap_last(a.shape) if ta else a.shape if a.rank > 1 else (1,) + a.shape
        sb = _swap_last(b.shape) if tb else b.shape if b.rank > 1 else b.shape + (1,)
        k1, k2 = sa[-1], sb[-2]
        if k1 is not None and k2 is not None and k1 != k2:
            raise VerifyError(f"inner dimensions differ: {k1} (operand 0) vs {k2} (operand 1)")
        batch = broadcast_shapes([sa[:-2], sb[:-2]])
        shape = batch + (sa[-2] if a.rank > 1 else None, sb[-1] if b.rank > 1 else None)
        shape = tuple(d for i, d in enumerate(shape) if not (i == len(shape) - 2 and a.rank == 1) and not (i == len(shape) - 1 and b.rank == 1))
        if ic and len(shape) < 3:
            raise VerifyError(f"the result is stored interleaved, so it needs rank >= 3, got {fmt_shape(shape)}")
        return [TensorType(_swap_last(shape, 2) if ic else shape, a.element)]

    @classmethod
    def interpret(cls, ins, op, ctx):
        ia, ib, ic = cls.interleaved(op)
        a, b = (np.swapaxes(x, -3, -2) if flag else x for x, flag in zip(ins, (ia, ib)))
        a, b = (np.swapaxes(x, -1, -2) if flag else x for x, flag in zip((a, b), cls.stored_transposed(op)))
        c = np.matmul(a, b) if not _floating(a) else np.matmul(_acc(a), _acc(b))
        return np.swapaxes(c, -3, -2) if ic else c

    @classmethod
    def vjp(cls, d, op, g):
        """da = g @ b^T, db = a^T @ g (a vector operand as a matrix of one row or column), each
        summed back over the batch dims it was broadcast along; an operand stored transposed or
        interleaved gets its cotangent stored the same way."""
        ta, tb = cls.stored_transposed(op)
        ia, ib, ic = cls.interleaved(op)
        g = d.swap_last(g, 2) if ic else g
        a, b = (d.swap_last(v, 2) if flag else v for v, flag in zip(op.operands, (ia, ib)))
        a, b = (d.swap_last(v) if flag else v for v, flag in zip((a, b), (ta, tb)))
        a2 = a if a.type.rank > 1 else d.reshape(a, (1,) + a.type.shape)
        b2 = b if b.type.rank > 1 else d.reshape(b, b.type.shape + (1,))
        g2 = g
        if a.type.rank == 1:
            g2 = d.reshape(g2, g.type.shape[:-1 if b.type.rank > 1 else None] + (1,) + ((g.type.shape[-1],) if b.type.rank > 1 else ()))
        if b.type.rank == 1:
            g2 = d.reshape(g2, g2.type.shape + (1,))
        ga = d("mlc.matmul", g2, d.swap_last(b2))
        ga = d.sum_to(ga, a2.type) if a.type.rank > 1 else d.reshape(d.sum_to(ga, a2.type), a.type.shape)
        if b.type.rank == 2 and a.type.rank > 2:  # a matrix applied to every batch (a weight): one product over
            gb = d("mlc.matmul", d.swap_last(_as_rows(d, a)), _as_rows(d, g))  # all their rows, not one per batch summed
        else:
            gb = d("mlc.matmul", d.swap_last(a2), g2)
            gb = d.sum_to(gb, b2.type) if b.type.rank > 1 else d.reshape(d.sum_to(gb, b2.type), b.type.shape)
        ga, gb = (d.swap_last(v) if flag else v for v, flag in zip((ga, gb), (ta, tb)))
        return [d.swap_last(v, 2) if flag else v for v, flag in zip((ga, gb), (ia, ib))]


def _as_rows(d, v):
    """v [..., n] as a matrix [rows, n] (row-major: a view)."""
    lead = v.type.shape[:-1]
    return d.reshape(v, (None if None in lead else math.prod(lead), v.type.shape[-1]))


def _swap_last(shape: tuple, dims: int = 1) -> tuple:
    """shape with its last two dims swapped (dims=2: the two before its last)."""
    shape = list(shape)
    shape[-1 - dims], shape[-dims] = shape[-dims], shape[-1 - dims]
    return tuple(shape)


# ---------------------------------------------------------------------------------------------------
# Shape ops

class Reshape(OpDef):
    """Row-major reshape to the result type's shape. Its `?` dims: with a shape operand (tensor<R x
    i64>, R the result's rank), that operand's entries there; without one (at most one `?`), what the
    element count leaves. An entry of -1 is also what the element count leaves."""
    name = "mlc.reshape"
    operands = (1, 2)
    traits = {PURE}
    fold = staticmethod(_fold_reshape)

    @staticmethod
    def infer(op, ctx):
        t = _tensors(op)[0]
        if not op.results or op.results[0].type is ERROR:
            raise VerifyError("needs its result type, e.g. ': (tensor<2x3xf32>) -> tensor<6xf32>'")
        r = tensor_type(op.results[0].type, "result")
        if r.element != t.element:
            raise VerifyError(f"element type changes from {t.element} to {r.element}; use mlc.cast")
        if len(op.operands) == 2:
            shape = _tensors(op)[1]
            require_element(shape, "int", 1)
            if shape.rank != 1 or shape.shape[0] not in (None, r.rank):
                raise VerifyError(f"the shape operand must be a tensor<{r.rank}xi64> (one entry per result dim), got {shape}")
        elif r.shape.count(None) > 1:
            raise VerifyError(f"result may have at most one '?' dimension without a shape operand, got {r}")
        n, m = num_elements(t.shape), num_elements(r.shape)
        if n is not None and m is not None and n != m:
            raise VerifyError(f"cannot reshape {n} elements {fmt_shape(t.shape)} into {m} elements {fmt_shape(r.shape)}")
        return [r]

    @staticmethod
    def interpret(ins, op, ctx):
        t, x = op.results[0].type, ins[0]
        shape = [-1 if d is None else d for d in t.shape]
        if len(ins) == 2:
            given = [int(v) for v in ins[1]]
            if len(given) != t.rank or any(d is not None and v not in (d, -1) for d, v in zip(t.shape, given)):
                raise RuntimeCheck(f"shape {given} does not fit the result type {t}")
            shape = [v if d is None else d for d, v in zip(t.shape, given)]
        known = math.prod(d for d in shape if d != -1)
        if shape.count(-1) > 1 or -1 in shape and (known == 0 or x.size % known) or -1 not in shape and x.size != known:
            raise RuntimeCheck(f"cannot reshape an input of shape {fmt_shape(x.shape)} into {fmt_shape(shape)}")
        return x.reshape(shape)

    @staticmethod
    def vjp(d, op, g):
        x = op.operands[0]
        if x.type.shape.count(None) > 1:  # back to x's shape, known at run time
            return [d("mlc.reshape", g, d("mlc.shape_of", x), result_type=x.type), None]
        return [d.reshape(g, x.type.shape)] + [None] * (len(op.operands) - 1)


class ShapeOf(OpDef):
    """The operand's shape as a tensor<rank x i64> (its `?` dims as they are at run time)."""
    name = "mlc.shape_of"
    operands = 1
    traits = {PURE}

    @staticmethod
    def infer(op, ctx):
        return [TensorType((_tensors(op)[0].rank,), i64)]

    @staticmethod
    def fold(op, consts):
        t = op.operands[0].type
        return [np.array(t.shape, np.int64)] if t.is_static else None

    @staticmethod
    def interpret(ins, op, ctx):
        return np.array(ins[0].shape, np.int64)

    @staticmethod
    def vjp(d, op, g):
        return [None]


class Transpose(OpDef):
    name = "mlc.transpose"
    operands = 1
    traits = {PURE}
    fold = staticmethod(_fold_transpose)
    attrs = {"perm": Attr("ints", required=True)}

    @staticmethod
    def infer(op, ctx):
        (t,) = _tensors(op)
        perm = tuple(op.attr("perm"))
        if sorted(perm) != list(range(t.rank)):
            raise VerifyError(f"'perm' {list(perm)} is not a permutation of the {t.rank} dims")
        return [t.with_shape(t.shape[p] for p in perm)]

    @staticmethod
    def interpret(ins, op, ctx):
        return np.transpose(ins[0], op.attr("perm"))

    @staticmethod
    def vjp(d, op, g):
        perm = list(op.attr("perm"))
        return [d("mlc.transpose", g, perm=[perm.index(i) for i in range(len(perm))])]


class BroadcastTo(OpDef):
    """numpy broadcast_to; the result type gives the shape."""
    name = "mlc.broadcast_to"
    operands = 1
    traits = {PURE}
    fold = staticmethod(_fold_noop)

    @staticmethod
    def infer(op, ctx):
        (t,) = _tensors(op)
        if not op.results or op.results[0].type is ERROR:
            raise VerifyError("needs its result type")
        r = tensor_type(op.results[0].type, "result")
        if r.element != t.element or r.rank < t.rank:
            raise VerifyError(f"cannot broadcast {t} to {r}")
        for d, e in zip(t.shape[::-1], r.shape[::-1]):
            if d is not None and d != 1 and e is not None and d != e:
                raise VerifyError(f"cannot broadcast {t} to {r}")
        return [r]

    @staticmethod
    def interpret(ins, op, ctx):
        x, r = ins[0], op.results[0].type
        target = [x.shape[i - (len(r.shape) - x.ndim)] if d is None and i >= len(r.shape) - x.ndim else d
                  for i, d in enumerate(r.shape)]
        if None in target:
            raise RuntimeCheck(f"cannot decide the size of a '?' dim broadcasting {fmt_shape(x.shape)} to {r}")
        try:
            return np.broadcast_to(x, target)
        except ValueError:
            raise RuntimeCheck(f"cannot broadcast shape {fmt_shape(x.shape)} to {fmt_shape(target)}") from None

    @staticmethod
    def vjp(d, op, g):
        return [d.sum_to(g, op.operands[0].type)]


class Concat(OpDef):
    name = "mlc.concat"
    operands = (1, None)
    traits = {PURE}
    fold = staticmethod(lambda op, consts: _same(op.operands[0], op) if len(op.operands) == 1 else None)
    attrs = {"axis": Attr("int", 0)}

    @staticmethod
    def infer(op, ctx):
        ts = _tensors(op)
        same_element(ts)
        rank = ts[0].rank
        if any(t.rank != rank for t in ts) or rank == 0:
            raise VerifyError("operands must have the same rank >= 1: " + ", ".join(map(str, ts)))
        axis = norm_axis(op.attr("axis"), rank)
        shape = []
        for i in range(rank):
            dims = [t.shape[i] for t in ts]
            if i == axis:
                shape.append(None if None in dims else sum(dims))
                continue
            static = {d for d in dims if d is not None}
            if len(static) > 1:
                raise VerifyError(f"operands differ in dim {i}: " + ", ".join(fmt_shape(t.shape) for t in ts))
            shape.append(static.pop() if static else None)
        return [TensorType(tuple(shape), ts[0].element)]

    @staticmethod
    def interpret(ins, op, ctx):
        return np.concatenate(ins, axis=op.attr("axis"))

    @staticmethod
    def vjp(d, op, g):
        """Each operand's part of g, sliced out along the axis."""
        axis = norm_axis(op.attr("axis"), g.type.rank)
        start, cts = 0, []
        for v in op.operands:
            size = v.type.shape[axis]
            if size is None:
                raise VerifyError("grad: concatenating along a '?' dim is not supported")
            cts.append(d.slice(g, {axis: (start, start + size, 1)}))
            start += size
        return cts


class Slice(OpDef):
    """Python slicing per dim: `x[start[i]:limit[i]:stride[i]]` (negative bounds count from the end,
    bounds clamp to the dim); strides are positive."""
    name = "mlc.slice"
    operands = 1
    traits = {PURE}
    fold = staticmethod(_fold_noop)
    attrs = {"start": Attr("ints", required=True), "limit": Attr("ints", required=True), "stride": Attr("ints")}

    @staticmethod
    def bounds(op, rank):
        start, limit = tuple(op.attr("start")), tuple(op.attr("limit"))
        stride = tuple(op.attr("stride") or (1,) * rank)
        for what, v in (("start", start), ("limit", limit), ("stride", stride)):
            if len(v) != rank:
                raise VerifyError(f"'{what}' has {len(v)} entries but the operand has rank {rank}")
        positive(stride, "stride")
        return start, limit, stride

    @staticmethod
    def infer(op, ctx):
        (t,) = _tensors(op)
        start, limit, stride = Slice.bounds(op, t.rank)
        shape = tuple(None if d is None else len(range(*slice(s, l, k).indices(d)))
                      for d, s, l, k in zip(t.shape, start, limit, stride))
        return [t.with_shape(shape)]

    @staticmethod
    def interpret(ins, op, ctx):
        start, limit, stride = Slice.bounds(op, ins[0].ndim)
        return ins[0][tuple(slice(s, l, k) for s, l, k in zip(start, limit, stride))]

    @staticmethod
    def vjp(d, op, g):
        """g put back where the slice came from, zeros elsewhere: a pad per dim with stride 1, a
        scatter_add of the picked indices otherwise."""
        x = op.operands[0]
        for axis, (n, s, l, k) in reversed(list(enumerate(zip(x.type.shape, *Slice.bounds(op, x.type.rank))))):
            if n is None:
                if (s, k) != (0, 1) or l < END:
                    raise VerifyError("grad: slicing a '?' dim is not supported")
                continue
            picked = range(*slice(s, l, k).indices(n))
            if len(picked) == n:
                continue
            if k == 1 or not picked:
                low = picked.start if picked else 0
                g = d.pad(g, {axis: (low, n - low - len(picked))})
            else:
                idx = d.const(np.array(picked, np.int64))
                g = d("mlc.scatter_add", d.zeros(g, {axis: n}), idx, g, axis=axis)
        return [g]


class Pad(OpDef):
    """Constant padding: `low[i]` before and `high[i]` after dim i, filled with `value`."""
    name = "mlc.pad"
    operands = 1
    traits = {PURE}
    fold = staticmethod(_fold_noop)
    attrs = {"low": Attr("ints", required=True), "high": Attr("ints", required=True), "value": Attr("float", 0.0)}

    @staticmethod
    def infer(op, ctx):
        (t,) = _tensors(op)
        low, high = tuple(op.attr("low")), tuple(op.attr("high"))
        if len(low) != t.rank or len(high) != t.rank:
            raise VerifyError(f"'low' and 'high' need {t.rank} entries each, got {len(low)} and {len(high)}")
        if any(v < 0 for v in low + high):
            raise VerifyError("padding must be non-negative")
        return [t.with_shape(None if d is None else d + lo + hi for d, lo, hi in zip(t.shape, low, high))]

    @staticmethod
    def interpret(ins, op, ctx):
        x = ins[0]
        return np.pad(x, list(zip(op.attr("low"), op.attr("high"))), constant_values=np.array(op.attr("value")).astype(x.dtype))

    @staticmethod
    def vjp(d, op, g):
        return [d.slice(g, {axis: (lo, -hi if hi else END, 1) for axis, (lo, hi) in enumerate(zip(op.attr("low"), op.attr("high")))})]


END = 2**62  # a slice limit past the end of any dim


def _check_indices(idx, size, what="index", lowest=0):
    """Indices must be in [lowest, size): lowest is -size where negative ones count from the end."""
    if idx.size and (idx.min() < lowest or idx.max() >= size):
        bad = idx[(idx < lowest) | (idx >= size)].reshape(-1)[0]
        raise RuntimeCheck(f"{what} {bad} is out of range for a dim of size {size}")


class Gather(OpDef):
    """numpy `take(x, indices, axis)`: result shape x[:axis] + indices.shape + x[axis+1:]."""
    name = "mlc.gather"
    operands = 2
    traits = {PURE}
    attrs = {"axis": Attr("int", 0)}

    @staticmethod
    def infer(op, ctx):
        x, idx = _tensors(op)
        require_element(idx, "int", 1)
        axis = norm_axis(op.attr("axis"), x.rank)
        return [x.with_shape(x.shape[:axis] + idx.shape + x.shape[axis + 1:])]

    @staticmethod
    def interpret(ins, op, ctx):
        x, idx = ins
        axis = op.attr("axis") % x.ndim
        _check_indices(idx, x.shape[axis])
        return np.take(x, idx, axis=axis)

    @staticmethod
    def vjp(d, op, g):
        x, idx = op.operands
        return [d("mlc.scatter_add", d.zeros(x), idx, g, axis=op.attr("axis")), None]


class ScatterAdd(OpDef):
    """`x` with `updates` added at `indices` along `axis` (repeated indices accumulate): the adjoint of
    gather. updates have shape x[:axis] + indices.shape + x[axis+1:]."""
    name = "mlc.scatter_add"
    operands = 3
    traits = {PURE}
    attrs = {"axis": Attr("int", 0)}

    @staticmethod
    def infer(op, ctx):
        x, idx, upd = _tensors(op)
        require_element(idx, "int", 1)
        same_element([x, upd], "operands 0 and 2")
        axis = norm_axis(op.attr("axis"), x.rank)
        want = x.shape[:axis] + idx.shape + x.shape[axis + 1:]
        if len(want) != upd.rank or not all(a is None or b is None or a == b for a, b in zip(want, upd.shape)):
            raise VerifyError(f"updates must have shape {fmt_shape(want)}, got {fmt_shape(upd.shape)}")
        return [x]

    @staticmethod
    def interpret(ins, op, ctx):
        x, idx, upd = ins
        axis = op.attr("axis") % x.ndim
        _check_indices(idx, x.shape[axis])
        out = x.copy()
        k = idx.ndim
        np.add.at(np.moveaxis(out, axis, 0), idx, np.moveaxis(upd, list(range(axis, axis + k)), list(range(k))))
        return out

    @staticmethod
    def vjp(d, op, g):
        x, idx, upd = op.operands
        return [g, None, d("mlc.gather", g, idx, axis=op.attr("axis"))]


def _element_operands(op):
    """x and indices of the *_elements ops: the same rank >= 1, indices no larger than x off the axis."""
    x, idx = _tensors(op)[:2]
    require_element(idx, "int", 1)
    if x.rank == 0 or idx.rank != x.rank:
        raise VerifyError(f"indices must have the rank of operand 0 (>= 1), got {idx} for {x}")
    axis = norm_axis(op.attr("axis"), x.rank)
    for i, (n, m) in enumerate(zip(x.shape, idx.shape)):
        if i != axis and n is not None and m is not None and m > n:
            raise VerifyError(f"indices have {m} elements along dim {i} but operand 0 has {n}")
    return x, idx, axis


def _element_positions(x, idx, axis):
    """The index arrays that pick x's elements at `idx` along axis (ONNX GatherElements): negative
    indices count from the end; off the axis, position i of idx is position i of x."""
    for i, (n, m) in enumerate(zip(x.shape, idx.shape)):
        if i != axis and m > n:
            raise RuntimeCheck(f"indices have {m} elements along dim {i} but operand 0 has {n}")
    _check_indices(idx, x.shape[axis], lowest=-x.shape[axis])
    idx = np.where(idx < 0, idx.astype(np.int64) + x.shape[axis], idx)
    at = list(np.indices(idx.shape, sparse=True))
    at[axis] = idx
    return tuple(at)


class GatherElements(OpDef):
    """ONNX GatherElements, torch.gather: indices have x's rank and give the result's shape;
    out[i, j, k] = x[i, indices[i, j, k], k] for axis 1. Negative indices count from the end."""
    name = "mlc.gather_elements"
    operands = 2
    traits = {PURE}
    attrs = {"axis": Attr("int", 0)}

    @staticmethod
    def infer(op, ctx):
        x, idx, _ = _element_operands(op)
        return [x.with_shape(idx.shape)]

    @staticmethod
    def interpret(ins, op, ctx):
        x, idx = ins
        return x[_element_positions(x, idx, op.attr("axis") % x.ndim)]

    @staticmethod
    def vjp(d, op, g):
        x, idx = op.operands
        return [d("mlc.scatter_add_elements", d.zeros(x), idx, g, axis=op.attr("axis")), None]


class ScatterAddElements(OpDef):
    """x with updates[i, j, k] added at [i, indices[i, j, k], k] (axis 1), repeated positions
    accumulating: the adjoint of gather_elements (ONNX ScatterElements with reduction "add").
    updates have the indices' shape."""
    name = "mlc.scatter_add_elements"
    operands = 3
    traits = {PURE}
    attrs = {"axis": Attr("int", 0)}

    @staticmethod
    def infer(op, ctx):
        x, idx, _ = _element_operands(op)
        upd = _tensors(op)[2]
        same_element([x, upd], "operands 0 and 2")
        if upd.rank != idx.rank or not all(a is None or b is None or a == b for a, b in zip(idx.shape, upd.shape)):
            raise VerifyError(f"updates must have the indices' shape {fmt_shape(idx.shape)}, got {fmt_shape(upd.shape)}")
        return [x]

    @staticmethod
    def interpret(ins, op, ctx):
        x, idx, upd = ins
        out = x.copy()
        np.add.at(out, _element_positions(x, idx, op.attr("axis") % x.ndim), upd)
        return out

    @staticmethod
    def vjp(d, op, g):
        x, idx, upd = op.operands
        return [g, None, d("mlc.gather_elements", g, idx, axis=op.attr("axis"))]


class TopK(OpDef):
    """ONNX TopK: the k largest (or, with largest = false, smallest) elements along axis and their
    indices (i64), best first; equal elements in index order; NaN counts as the largest (as numpy's
    sort). The results are sorted whatever `sorted` says (ONNX leaves the order open then)."""
    name = "mlc.topk"
    operands = 1
    results = 2
    traits = {PURE}
    attrs = {"k": Attr("int", required=True), "axis": Attr("int", -1), "largest": Attr("bool", True),
             "sorted": Attr("bool", True)}

    @staticmethod
    def infer(op, ctx):
        (x,) = _tensors(op)
        require_element(x, "num")
        if x.rank == 0:
            raise VerifyError(f"operand must have rank >= 1, got {x}")
        axis, k = norm_axis(op.attr("axis"), x.rank), op.attr("k")
        if k < 0 or x.shape[axis] is not None and k > x.shape[axis]:
            raise VerifyError(f"'k' = {k} must be between 0 and the size of axis {axis} ({x.shape[axis]})")
        shape = x.shape[:axis] + (k,) + x.shape[axis + 1:]
        return [x.with_shape(shape), TensorType(shape, i64)]

    @staticmethod
    def interpret(ins, op, ctx):
        x, k = ins[0], op.attr("k")
        axis = op.attr("axis") % x.ndim
        n = x.shape[axis]
        if k > n:
            raise RuntimeCheck(f"k = {k} exceeds the {n} elements along axis {axis}")
        if op.attr("largest"):  # descending with ties in index order: a stable ascending sort of x reversed, reversed
            order = n - 1 - np.flip(np.argsort(np.flip(x, axis), axis=axis, kind="stable"), axis)
        else:
            order = np.argsort(x, axis=axis, kind="stable")
        idx = np.take(order, np.arange(k), axis=axis)
        return np.take_along_axis(x, idx, axis), idx

    @staticmethod
    def vjp(d, op, cts):
        """The values' cotangent goes back to the positions they were picked from."""
        g = cts[0]
        x = op.operands[0]
        return [None if g is None else d("mlc.scatter_add_elements", d.zeros(x), op.results[1], g, axis=op.attr("axis"))]


# ---------------------------------------------------------------------------------------------------
# Neural network ops (NCHW images, OIHW weights)

def _windows(x, kh, kw, sh, sw, dh, dw):
    """Strided view (N, C, OH, OW, kh, kw) of an already padded NCHW array."""
    n, c, h, w = x.shape
    oh, ow = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    s = x.strides
    return np.lib.stride_tricks.as_strided(x, (n, c, oh, ow, kh, kw),
                                           (s[0], s[1], s[2] * sh, s[3] * sw, s[2] * dh, s[3] * dw), writeable=False)


def _pad_nchw(x, pads, value=0):
    top, left, bottom, right = pads
    return np.pad(x, [(0, 0), (0, 0), (top, bottom), (left, right)], constant_values=value)


class Conv2d(OpDef):
    """Cross-correlation as torch.nn.functional.conv2d: input NCHW, weight O x (C/groups) x kh x kw,
    padding [top, left, bottom, right] (or [h, w])."""
    name = "mlc.conv2d"
    operands = 2
    traits = {PURE}
    attrs = {"stride": Attr("ints", (1, 1)), "padding": Attr("ints", (0, 0, 0, 0)),
             "dilation": Attr("ints", (1, 1)), "groups": Attr("int", 1)}

    @staticmethod
    def params(op):
        stride = positive(_pair(op.attr("stride"), "stride"), "stride")
        dilation = positive(_pair(op.attr("dilation"), "dilation"), "dilation")
        groups = op.attr("groups")
        if groups < 1:
            raise VerifyError(f"'groups' must be positive, got {groups}")
        return stride, pads4(op.attr("padding")), dilation, groups

    @staticmethod
    def infer(op, ctx):
        x, w = _tensors(op)
        same_element([x, w])
        require_element(x, "float")
        _rank(x, 4, "input (NCHW)"), _rank(w, 4, "weight (OIHW)")
        (sh, sw), (pt, pl, pb, pr), (dh, dw), g = Conv2d.params(op)
        n, c, h, wd = x.shape
        o, cg, kh, kw = w.shape
        if o is not None and o % g:
            raise VerifyError(f"output channels {o} are not divisible by groups {g}")
        if c is not None and cg is not None and c != cg * g:
            raise VerifyError(f"input has {c} channels but the weight expects {cg} x {g} groups = {cg * g}")
        if kh is None or kw is None:
            raise VerifyError("the kernel size must be static")
        return [TensorType((n, o, window_out(h, pt, pb, kh, sh, dh), window_out(wd, pl, pr, kw, sw, dw)), x.element)]

    @staticmethod
    def interpret(ins, op, ctx):
        return _conv2d(*(_acc(a) for a in ins), *Conv2d.params(op))

    @staticmethod
    def vjp(d, op, g):
        x, w = op.operands
        stride, pads, dilation, groups = Conv2d.params(op)
        return [_conv_input_grad(d, g, w, x.type, stride, pads, dilation, groups),
                _conv_weight_grad(d, x, g, w.type, stride, pads, dilation, groups)]


def _conv2d(x, w, stride, pads, dilation, g):
    (sh, sw), (dh, dw) = stride, dilation
    cols = _windows(_pad_nchw(x, pads), w.shape[2], w.shape[3], sh, sw, dh, dw)
    n, c, oh, ow, kh, kw = cols.shape
    cols = cols.reshape(n, g, c // g, oh, ow, kh, kw)
    wg = w.reshape(g, w.shape[0] // g, c // g, kh, kw)
    out = np.einsum("ngcyxij,gocij->ngoyx", cols, wg, optimize=True)
    return out.reshape(n, w.shape[0], oh, ow)


class Conv2dBlocked(OpDef):
    """conv2d (groups 1) on channels in blocks, the layout a vectorised kernel wants (the layout pass
    writes it, with conversions around it): input N x C/b x H x W x b, weight O/b' x C/b x kh x kw x b x
    b', result N x O/b' x OH x OW x b'. Element [n, C, y, x, c] is channel C*b + c of the NCHW tensor;
    the weight's [O, C, i, j, c, o] is w[O*b' + o, C*b + c, i, j]."""
    name = "mlc.conv2d_blocked"
    operands = 2
    traits = {PURE}
    attrs = {"stride": Attr("ints", (1, 1)), "padding": Attr("ints", (0, 0, 0, 0)), "dilation": Attr("ints", (1, 1))}

    @staticmethod
    def params(op):
        stride = positive(_pair(op.attr("stride"), "stride"), "stride")
        return stride, pads4(op.attr("padding")), positive(_pair(op.attr("dilation"), "dilation"), "dilation"), 1

    @classmethod
    def infer(cls, op, ctx):
        x, w = _tensors(op)
        same_element([x, w])
        require_element(x, "float")
        _rank(x, 5, "input (N, C/b, H, W, b)"), _rank(w, 6, "weight (O/b', C/b, kh, kw, b, b')")
        (sh, sw), (pt, pl, pb, pr), (dh, dw), _ = cls.params(op)
        n, cblocks, h, wd, b = x.shape
        oblocks, wcblocks, kh, kw, wb, ob = w.shape
        for what, have, want in (("channel blocks", cblocks, wcblocks), ("channels per block", b, wb)):
            if have is not None and want is not None and have != want:
                raise VerifyError(f"input has {have} {what} but the weight expects {want}")
        if None in (kh, kw, ob):
            raise VerifyError("the kernel size and the output block must be static")
        return [TensorType((n, oblocks, window_out(h, pt, pb, kh, sh, dh), window_out(wd, pl, pr, kw, sw, dw), ob), x.element)]

    @classmethod
    def interpret(cls, ins, op, ctx):
        x, w = (_acc(a) for a in ins)
        n, cblocks, h, wd, b = x.shape
        oblocks, _, kh, kw, _, ob = w.shape
        plain_x = x.transpose(0, 1, 4, 2, 3).reshape(n, cblocks * b, h, wd)
        plain_w = w.transpose(0, 5, 1, 4, 2, 3).reshape(oblocks * ob, cblocks * b, kh, kw)
        y = _conv2d(plain_x, plain_w, *cls.params(op))
        return y.reshape(n, oblocks, ob, *y.shape[2:]).transpose(0, 1, 3, 4, 2)


def _static_hw(*types):
    for t in types:
        if None in t.shape[2:]:
            raise VerifyError(f"grad: convolution over a '?' height or width ({t}) is not supported")


def _conv_input_grad(d, g, w, x_type, stride, pads, dilation, groups):
    """The transposed convolution of g, with output_padding restoring the rows and columns that the
    forward stride skipped at the bottom and right."""
    _static_hw(x_type)
    kernel = w.type.shape[2:]
    extra = [(size + lo + hi - dl * (k - 1) - 1) % s
             for size, lo, hi, k, s, dl in zip(x_type.shape[2:], pads[:2], pads[2:], kernel, stride, dilation)]
    return d("mlc.conv2d_transpose", g, w, stride=list(stride), padding=list(pads), output_padding=extra,
             dilation=list(dilation), groups=groups)


def _conv_weight_grad(d, x, g, w_type, stride, pads, dilation, groups):
    """dw[o, c, i, j] = sum over n, y, x of xpad[n, c, y s + i d, x s + j d] g[n, o, y, x]: itself a
    convolution, of x with batch and channels swapped by g as the kernel (stride and dilation swap
    too), cropped to the kernel size."""
    _static_hw(g.type)
    n, c, h, wd = x.type.shape
    o, cg, kh, kw = w_type.shape
    og = None if g.type.shape[1] is None else g.type.shape[1] // groups
    if groups == 1:
        xs, gs = (d("mlc.transpose", v, perm=[1, 0, 2, 3]) for v in (x, g))
    else:
        xs = d.reshape(d("mlc.transpose", d.reshape(x, (n, groups, cg, h, wd)), perm=[2, 1, 0, 3, 4]),
                       (cg, None if n is None else groups * n, h, wd))
        oh, ow = g.type.shape[2:]
        gs = d.reshape(d("mlc.transpose", d.reshape(g, (n, groups, og, oh, ow)), perm=[1, 2, 0, 3, 4]),
                       (g.type.shape[1], n, oh, ow))
    r = d("mlc.conv2d", xs, gs, stride=list(dilation), padding=list(pads), dilation=list(stride), groups=groups)
    r = d("mlc.transpose", r, perm=[1, 0, 2, 3])
    return d.slice(r, {2: (0, kh, 1), 3: (0, kw, 1)})


class Conv2dTranspose(OpDef):
    """torch.nn.functional.conv_transpose2d: input NCHW, weight C x (O/groups) x kh x kw; the output is
    cropped by padding [top, left, bottom, right] and grown by output_padding [h, w] at the bottom/right."""
    name = "mlc.conv2d_transpose"
    operands = 2
    traits = {PURE}
    attrs = {"stride": Attr("ints", (1, 1)), "padding": Attr("ints", (0, 0, 0, 0)),
             "output_padding": Attr("ints", (0, 0)), "dilation": Attr("ints", (1, 1)), "groups": Attr("int", 1)}

    @staticmethod
    def infer(op, ctx):
        x, w = _tensors(op)
        same_element([x, w])
        require_element(x, "float")
        _rank(x, 4, "input (NCHW)"), _rank(w, 4, "weight (C x O/groups x kh x kw)")
        stride, pads, dilation, g = Conv2d.params(op)
        oph, opw = _pair(op.attr("output_padding"), "output_padding")
        for o_pad, s, d in ((oph, stride[0], dilation[0]), (opw, stride[1], dilation[1])):
            if not 0 <= o_pad < max(s, d):
                raise VerifyError(f"'output_padding' must be smaller than stride or dilation, got {o_pad}")
        n, c, h, wd = x.shape
        cw, og, kh, kw = w.shape
        if c is not None and cw is not None and c != cw:
            raise VerifyError(f"input has {c} channels but the weight has {cw}")
        if cw is not None and cw % g:
            raise VerifyError(f"input channels {cw} are not divisible by groups {g}")
        if kh is None or kw is None:
            raise VerifyError("the kernel size must be static")

        def out(size, lo, hi, k, s, d, extra):
            if size is None:
                return None
            r = (size - 1) * s - lo - hi + d * (k - 1) + extra + 1
            if r < 1:
                raise VerifyError(f"padding leaves an empty output ({r})")
            return r
        return [TensorType((n, None if og is None else og * g, out(h, pads[0], pads[2], kh, stride[0], dilation[0], oph),
                            out(wd, pads[1], pads[3], kw, stride[1], dilation[1], opw)), x.element)]

    @staticmethod
    def interpret(ins, op, ctx):
        x, w = (_acc(a) for a in ins)
        (sh, sw), (pt, pl, pb, pr), (dh, dw), g = Conv2d.params(op)
        oph, opw = op.attr("output_padding")
        n, c, h, wd = x.shape
        _, og, kh, kw = w.shape
        full_h, full_w = (h - 1) * sh + dh * (kh - 1) + 1 + oph, (wd - 1) * sw + dw * (kw - 1) + 1 + opw
        full = np.zeros((n, g, og, full_h, full_w), np.result_type(x, w))
        xg = x.reshape(n, g, c // g, h, wd)
        wg = w.reshape(g, c // g, og, kh, kw)
        for i in range(kh):
            for j in range(kw):
                full[:, :, :, i * dh: i * dh + (h - 1) * sh + 1: sh, j * dw: j * dw + (wd - 1) * sw + 1: sw] += \
                    np.einsum("ngchw,gco->ngohw", xg, wg[:, :, :, i, j], optimize=True)
        full = full.reshape(n, g * og, full_h, full_w)
        return full[:, :, pt: full_h - pb, pl: full_w - pr]

    @staticmethod
    def vjp(d, op, g):
        """The input's cotangent is the convolution of g (the transpose's adjoint); the weight's is
        conv2d's weight gradient with g as the input and x as the output's cotangent."""
        x, w = op.operands
        stride, pads, dilation, groups = Conv2d.params(op)
        _static_hw(x.type)
        gx = d("mlc.conv2d", g, w, stride=list(stride), padding=list(pads), dilation=list(dilation), groups=groups)
        gx = d.slice(gx, {2: (0, x.type.shape[2], 1), 3: (0, x.type.shape[3], 1)})
        return [gx, _conv_weight_grad(d, g, x, w.type, stride, pads, dilation, groups)]


# --- Winograd F(m x m, 3 x 3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks") ---------------
# A 3 x 3 convolution (stride 1) of an a x a input tile (a = m + 2) gives m x m outputs with a^2 products
# instead of 9 m^2: Y = AT [(G g GT) * (BT d B)] A. The winograd pass splits a conv2d into the three ops
# below around one batched matmul: over the a^2 positions, [tiles x C] inputs times [C x O] filters. Each
# is stored with the positions second, [tiles or O, a^2, channels] (the matmul's `interleaved_*` marks): a
# tile's (a filter's) values lie together, and the a^2 streams a transform writes are not a multiple of
# 4 KB apart, which would make every load wait on the stores before it (4K aliasing).

def winograd_matrices(m: int) -> tuple:
    """(AT, G, BT) of F(m, 3) for m in WINOGRAD_TILES (interpolation points 0, -1, 1, -2, 2 and infinity)."""
    if m == 2:
        return (np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float64),
                np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]]),
                np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float64))
    return (np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]], np.float64),
            np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                      [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]),
            np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                      [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], np.float64))


WINOGRAD_TILES = (2, 4)


def winograd_tiles(size: int, m: int) -> int:
    """Tiles of m outputs along a result dim of `size`."""
    return -(-size // m)


class Winograd(OpDef):
    operands = 1
    traits = {PURE}
    attrs = {"m": Attr("int", 4)}

    @staticmethod
    def m(op) -> int:
        m = op.attr("m")
        if m not in WINOGRAD_TILES:
            raise VerifyError(f"'m' (outputs per tile side) must be one of {list(WINOGRAD_TILES)}, got {m}")
        return m


class WinogradFilter(Winograd):
    """u[o, i*a + j, c] = (G w[o, c] G^T)[i, j]: each 3 x 3 filter as the a x a tile it multiplies."""
    name = "mlc.winograd_filter"

    @classmethod
    def infer(cls, op, ctx):
        (w,) = _tensors(op)
        require_element(w, "float")
        _rank(w, 4, "weight (OIHW)")
        if w.shape[2:] != (3, 3):
            raise VerifyError(f"the filter must be 3 x 3, got {w.shape[2]} x {w.shape[3]}")
        a = cls.m(op) + 2
        return [TensorType((w.shape[0], a * a, w.shape[1]), w.element)]

    @classmethod
    def interpret(cls, ins, op, ctx):
        return cls.transform(_acc(ins[0]), cls.m(op))

    @staticmethod
    def transform(w: np.ndarray, m: int) -> np.ndarray:
        _, g, _ = winograd_matrices(m)
        u = np.einsum("ik,ockl,jl->oijc", g, w, g).astype(w.dtype)
        return np.ascontiguousarray(u.reshape(w.shape[0], -1, w.shape[1]))


class WinogradInput(Winograd):
    """v[(n*TH + ty)*TW + tx, i*a + j, c] = (BT d B)[i, j] for the a x a tile d of x (NCHW) padded with
    zeros by `padding` ([top, left, bottom, right]) at rows m*ty.., columns m*tx..: TH x TW tiles cover
    the convolution's (H + top + bottom - 2) x (W + left + right - 2) result."""
    name = "mlc.winograd_input"
    attrs = {**Winograd.attrs, "padding": Attr("ints", (0, 0, 0, 0))}

    @classmethod
    def grid(cls, op, h, w) -> tuple:
        """(TH, TW): the tiles down and across."""
        pt, pl, pb, pr = pads4(op.attr("padding"))
        m = cls.m(op)
        return (winograd_tiles(window_out(h, pt, pb, 3, 1), m), winograd_tiles(window_out(w, pl, pr, 3, 1), m))

    @classmethod
    def infer(cls, op, ctx):
        (x,) = _tensors(op)
        require_element(x, "float")
        _rank(x, 4, "input (NCHW)")
        n, c, h, w = x.shape
        if h is None or w is None:
            raise VerifyError("the input's height and width must be static")
        th, tw = cls.grid(op, h, w)
        a = cls.m(op) + 2
        return [TensorType((None if n is None else n * th * tw, a * a, c), x.element)]

    @classmethod
    def interpret(cls, ins, op, ctx):
        x = _acc(ins[0])
        m = cls.m(op)
        _, _, bt = winograd_matrices(m)
        pt, pl, _, _ = pads4(op.attr("padding"))
        th, tw = cls.grid(op, *x.shape[2:])
        h, w = x.shape[2:]
        xp = np.zeros((*x.shape[:2], m * th + 2, m * tw + 2), x.dtype)  # (whole tiles: at least the padded image)
        xp[:, :, pt:pt + h, pl:pl + w] = x
        d = _windows(xp, m + 2, m + 2, m, m, 1, 1)  # n, c, th, tw, a, a
        v = np.einsum("ik,nctxkl,jl->ntxijc", bt, d, bt)
        return v.reshape(-1, (m + 2) ** 2, x.shape[1])


class WinogradOutput(Winograd):
    """y[n, o, m*ty + i, m*tx + j] = (AT p AT^T)[i, j] for the a x a products p[(n*TH + ty)*TW + tx, :, o]
    of a tile (laid out as winograd_input's), cropped to `size` = [height, width]."""
    name = "mlc.winograd_output"
    attrs = {**Winograd.attrs, "size": Attr("ints", (1, 1))}

    @classmethod
    def grid(cls, op) -> tuple:
        h, w = positive(_pair(op.attr("size"), "size"), "size")
        m = cls.m(op)
        return h, w, winograd_tiles(h, m), winograd_tiles(w, m)

    @classmethod
    def infer(cls, op, ctx):
        (p,) = _tensors(op)
        require_element(p, "float")
        _rank(p, 3, "products (tiles, a*a, O)")
        a = cls.m(op) + 2
        if p.shape[1] is not None and p.shape[1] != a * a:
            raise VerifyError(f"F({cls.m(op)}, 3) has {a * a} products per tile, got {p.shape[1]}")
        h, w, th, tw = cls.grid(op)
        tiles = p.shape[0]
        if tiles is not None and tiles % (th * tw):
            raise VerifyError(f"{tiles} tiles are not a whole number of images of {th} x {tw} tiles")
        return [TensorType((None if tiles is None else tiles // (th * tw), p.shape[2], h, w), p.element)]

    @classmethod
    def interpret(cls, ins, op, ctx):
        p = _acc(ins[0])
        m = cls.m(op)
        at, _, _ = winograd_matrices(m)
        h, w, th, tw = cls.grid(op)
        if p.shape[0] % (th * tw):
            raise RuntimeCheck(f"{p.shape[0]} tiles are not a whole number of images of {th} x {tw} tiles")
        p = p.reshape(-1, th, tw, m + 2, m + 2, p.shape[2])
        y = np.einsum("ik,nyxklo,jl->noyixj", at, p, at)
        return y.reshape(y.shape[0], y.shape[1], th * m, tw * m)[:, :, :h, :w]


class Pool2d(OpDef):
    operands = 1
    traits = {PURE}
    attrs = {"kernel": Attr("ints", required=True), "stride": Attr("ints"), "padding": Attr("ints", (0, 0, 0, 0))}

    @classmethod
    def params(cls, op):
        kernel = positive(_pair(op.attr("kernel"), "kernel"), "kernel")
        stride = positive(_pair(op.attr("stride") or kernel, "stride"), "stride")
        pads = pads4(op.attr("padding"))
        if any(p > k // 2 for p, k in zip(pads, kernel * 2)):
            raise VerifyError(f"padding {list(pads)} must be at most half the kernel {list(kernel)}")
        return kernel, stride, pads

    @classmethod
    def infer(cls, op, ctx):
        (x,) = _tensors(op)
        _rank(x, 4, "input (NCHW)")
        require_element(x, cls.kind)
        (kh, kw), (sh, sw), (pt, pl, pb, pr) = cls.params(op)
        n, c, h, w = x.shape
        return [x.with_shape((n, c, window_out(h, pt, pb, kh, sh), window_out(w, pl, pr, kw, sw)))]


class MaxPool2d(Pool2d):
    """torch max_pool2d (padding is never the maximum)."""
    name = "mlc.max_pool2d"
    kind = "num"

    @staticmethod
    def interpret(ins, op, ctx):
        x = ins[0]
        (kh, kw), (sh, sw), pads = MaxPool2d.params(op)
        low = -np.inf if _floating(x) else np.iinfo(x.dtype).min
        return _windows(_pad_nchw(x, pads, low), kh, kw, sh, sw, 1, 1).max(axis=(4, 5))

    @staticmethod
    def vjp(d, op, g):
        return [d("mlc.max_pool2d_grad", op.operands[0], g, **_pool_attrs(op))]


class AvgPool2d(Pool2d):
    """torch avg_pool2d: with count_include_pad (default) padding counts toward the divisor."""
    name = "mlc.avg_pool2d"
    kind = "float"
    attrs = {**Pool2d.attrs, "count_include_pad": Attr("bool", True)}

    @staticmethod
    def interpret(ins, op, ctx):
        x = _acc(ins[0])
        (kh, kw), (sh, sw), pads = AvgPool2d.params(op)
        sums = _windows(_pad_nchw(x, pads), kh, kw, sh, sw, 1, 1).sum(axis=(4, 5))
        if op.attr("count_include_pad"):
            return sums / (kh * kw)
        ones = _pad_nchw(np.ones((1, 1) + x.shape[2:], x.dtype), pads)
        return sums / _windows(ones, kh, kw, sh, sw, 1, 1).sum(axis=(4, 5))

    @staticmethod
    def vjp(d, op, g):
        return [d("mlc.avg_pool2d_grad", op.operands[0], g, **_pool_attrs(op), count_include_pad=op.attr("count_include_pad"))]


def _pool_attrs(op):
    kernel, stride, pads = Pool2d.params(op)
    return {"kernel": list(kernel), "stride": list(stride), "padding": list(pads)}


class Pool2dGrad(Pool2d):
    """The cotangent of a pooling's input: operands the input x and the cotangent g of the pooled
    result; the result has x's type. Made by `grad`."""
    operands = 2

    @classmethod
    def infer(cls, op, ctx):
        x, g = _tensors(op)
        same_element([x, g])
        (pooled,) = Pool2d.infer.__func__(cls, Probe(op, [x]), ctx)  # (op seen as the pooling it differentiates)
        if len(g.shape) != 4 or not all(a is None or b is None or a == b for a, b in zip(pooled.shape, g.shape)):
            raise VerifyError(f"cotangent must have the pooled shape {fmt_shape(pooled.shape)}, got {fmt_shape(g.shape)}")
        return [x]


class MaxPool2dGrad(Pool2dGrad):
    """g[n, c, y, x] goes to the first maximum of its window, as in torch; overlapping windows add."""
    name = "mlc.max_pool2d_grad"
    kind = "float"

    @staticmethod
    def interpret(ins, op, ctx):
        x, g = ins
        (kh, kw), (sh, sw), pads = MaxPool2dGrad.params(op)
        xp = _pad_nchw(x, pads, -np.inf)
        windows = _windows(xp, kh, kw, sh, sw, 1, 1)
        n, c, oh, ow = windows.shape[:4]
        best = np.argmax(windows.reshape(n, c, oh, ow, kh * kw), axis=-1)
        rows = np.arange(oh)[:, None] * sh + best // kw
        cols = np.arange(ow)[None, :] * sw + best % kw
        out = np.zeros(xp.shape, np.float64)
        np.add.at(out, (np.arange(n)[:, None, None, None], np.arange(c)[None, :, None, None], rows, cols), g)
        return out[:, :, pads[0]: xp.shape[2] - pads[2], pads[1]: xp.shape[3] - pads[3]]


class AvgPool2dGrad(Pool2dGrad):
    """g[n, c, y, x] / (its window's divisor) added to every input element of the window."""
    name = "mlc.avg_pool2d_grad"
    kind = "float"
    attrs = AvgPool2d.attrs

    @staticmethod
    def interpret(ins, op, ctx):
        x, g = ins
        (kh, kw), (sh, sw), pads = AvgPool2dGrad.params(op)
        xp = _pad_nchw(np.zeros(x.shape, np.float64), pads)
        oh, ow = g.shape[2:]
        if op.attr("count_include_pad"):
            share = _acc(g) / (kh * kw)
        else:
            ones = _pad_nchw(np.ones((1, 1) + x.shape[2:]), pads)
            share = _acc(g) / _windows(ones, kh, kw, sh, sw, 1, 1).sum(axis=(4, 5))
        for i in range(kh):
            for j in range(kw):
                xp[:, :, i: i + (oh - 1) * sh + 1: sh, j: j + (ow - 1) * sw + 1: sw] += share
        return xp[:, :, pads[0]: xp.shape[2] - pads[2], pads[1]: xp.shape[3] - pads[3]]

    @staticmethod
    def vjp(d, op, g):
        """Linear in the pooled cotangent: its adjoint is the pooling itself."""
        return [None, d("mlc.avg_pool2d", g, **_pool_attrs(op), count_include_pad=op.attr("count_include_pad"))]


def _pair(values, what):
    values = tuple(values)
    if len(values) != 2:
        raise VerifyError(f"'{what}' must have 2 entries, got {len(values)}")
    return values


def _rank(t, rank, what):
    if t.rank != rank:
        raise VerifyError(f"{what} must have rank {rank}, got {t}")


class Softmax(OpDef):
    name = "mlc.softmax"
    operands = 1
    traits = {PURE}
    attrs = {"axis": Attr("int", -1)}

    @staticmethod
    def infer(op, ctx):
        (t,) = _tensors(op)
        require_element(t, "float")
        norm_axis(op.attr("axis"), t.rank)
        return [t]

    @staticmethod
    def interpret(ins, op, ctx):
        x = _acc(ins[0])
        e = np.exp(x - np.max(x, axis=op.attr("axis"), keepdims=True))
        return e / np.sum(e, axis=op.attr("axis"), keepdims=True)

    @staticmethod
    def vjp(d, op, g):
        """y (g - sum(g y))."""
        y, axis = op.results[0], op.attr("axis")
        dot = d("mlc.reduce_sum", d("mlc.mul", g, y), axes=[axis], keepdims=True)
        return [d("mlc.mul", y, d("mlc.sub", g, dot))]

    @classmethod
    def decompose(cls, d, op):
        """exp(x - max) / sum: fused back into one row kernel. Half-precision input is computed in
        f32 and rounded once, as the interpreter does."""
        x, axes = op.operands[0], [op.attr("axis")]
        half = x.type.element.name in ("f16", "bf16")
        if half:
            x = d("mlc.cast", x, result_type=x.type.with_element(f32))
        shifted = d("mlc.sub", x, d("mlc.reduce_max", x, axes=axes, keepdims=True))
        y = cls.normalise(d, shifted, axes)
        return [d("mlc.cast", y, result_type=op.results[0].type) if half else y]

    @staticmethod
    def normalise(d, shifted, axes):
        e = d("mlc.exp", shifted)
        return d("mlc.div", e, d("mlc.reduce_sum", e, axes=axes, keepdims=True))


class LogSoftmax(Softmax):
    name = "mlc.log_softmax"

    @staticmethod
    def interpret(ins, op, ctx):
        x = _acc(ins[0])
        s = x - np.max(x, axis=op.attr("axis"), keepdims=True)
        return s - np.log(np.sum(np.exp(s), axis=op.attr("axis"), keepdims=True))

    @staticmethod
    def vjp(d, op, g):
        """g - softmax(x) sum(g)."""
        y, axis = op.results[0], op.attr("axis")
        total = d("mlc.reduce_sum", g, axes=[axis], keepdims=True)
        return [d("mlc.sub", g, d("mlc.mul", d("mlc.exp", y), total))]

    @staticmethod
    def normalise(d, shifted, axes):
        total = d("mlc.reduce_sum", d("mlc.exp", shifted), axes=axes, keepdims=True)
        return d("mlc.sub", shifted, d("mlc.log", total))


class CrossEntropy(OpDef):
    """Mean negative log-likelihood of integer labels under softmax(logits) over dim 1:
    logits [N, C, d...], labels [N, d...] (torch.nn.functional.cross_entropy)."""
    name = "mlc.cross_entropy"
    operands = 2
    traits = {PURE}

    @staticmethod
    def infer(op, ctx):
        x, y = _tensors(op)
        require_element(x, "float")
        require_element(y, "int", 1)
        if x.rank < 2:
            raise VerifyError(f"logits must have rank >= 2 (batch, classes, ...), got {x}")
        want = (x.shape[0],) + x.shape[2:]
        if y.rank != len(want) or not all(a is None or b is None or a == b for a, b in zip(want, y.shape)):
            raise VerifyError(f"labels must have shape {fmt_shape(want)} for logits {fmt_shape(x.shape)}, got {fmt_shape(y.shape)}")
        return [TensorType((), x.element)]

    @staticmethod
    def interpret(ins, op, ctx):
        x, y = _acc(ins[0]), ins[1]
        if y.shape != x.shape[:1] + x.shape[2:]:
            raise RuntimeCheck(f"labels of shape {fmt_shape(y.shape)} do not fit logits of shape {fmt_shape(x.shape)}")
        _check_indices(y, x.shape[1], "label")
        s = x - np.max(x, axis=1, keepdims=True)
        logp = s - np.log(np.sum(np.exp(s), axis=1, keepdims=True))
        picked = np.take_along_axis(logp, np.expand_dims(y, 1), axis=1)
        return -np.mean(picked)

    @staticmethod
    def vjp(d, op, g):
        """(softmax(x) - onehot(labels)) g / (number of labels)."""
        x, labels = op.operands
        classes = x.type.shape[1]
        if classes is None:
            raise VerifyError("grad: cross_entropy over a '?' number of classes is not supported")
        column = (1, classes) + (1,) * (x.type.rank - 2)
        iota = d("mlc.iota", axis=1, result_type=TensorType(column, labels.type.element))
        onehot = d("mlc.eq", iota, d.reshape(labels, labels.type.shape[:1] + (1,) + labels.type.shape[1:]))
        n = num_elements(labels.type.shape)
        count = d.scalar(n, x) if n is not None else \
            d("mlc.reduce_sum", d.expand(d.scalar(1, x), d("mlc.cast", labels, result_type=labels.type.with_element(x.type.element))))
        p = d("mlc.softmax", x, axis=1)
        diff = d("mlc.sub", p, d("mlc.select", onehot, d.scalar(1, x), d.scalar(0, x)))
        return [d("mlc.mul", diff, d("mlc.div", g, count)), None]


class BatchNorm(OpDef):
    """torch.nn.functional.batch_norm over channel axis 1 of x [N, C, ...]: operands x, weight, bias,
    running_mean, running_var (each [C]) and training (i1 scalar). Results: y, and the running statistics
    to store back. Training normalises with the batch's mean and biased variance and moves the running
    ones by `momentum` (the variance unbiased, n / (n - 1)); evaluation uses the running ones and
    returns them unchanged."""
    name = "mlc.batch_norm"
    operands = 6
    results = 3
    traits = {PURE}
    attrs = {"eps": Attr("float", 1e-5), "momentum": Attr("float", 0.1)}

    @staticmethod
    def infer(op, ctx):
        x, *params, training = _tensors(op)
        require_element(x, "float")
        if x.rank < 2:
            raise VerifyError(f"input must have rank >= 2 (batch, channels, ...), got {x}")
        for i, t in enumerate(params):
            if t.element != x.element or t.rank != 1 or not all(a is None or b is None or a == b for a, b in [(t.shape[0], x.shape[1])]):
                raise VerifyError(f"operand {i + 1} must be tensor<{x.shape[1] or '?'}x{x.element}> (one per channel), got {t}")
        if training.element != i1 or training.rank != 0:
            raise VerifyError(f"operand 5 (training) must be tensor<i1>, got {training}")
        return [x, params[2], params[3]]

    @staticmethod
    def interpret(ins, op, ctx):
        x, w, b, rm, rv, training = ins
        axes = (0,) + tuple(range(2, x.ndim))
        shape = (1, -1) + (1,) * (x.ndim - 2)
        m, eps = op.attr("momentum"), op.attr("eps")
        if not training:
            return (x - rm.reshape(shape)) / np.sqrt(rv.reshape(shape) + eps) * w.reshape(shape) + b.reshape(shape), rm, rv
        n = x.size // max(x.shape[1], 1)
        mean, var = x.mean(axis=axes), x.var(axis=axes)
        y = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps) * w.reshape(shape) + b.reshape(shape)
        with np.errstate(all="ignore"):
            unbiased = var * n / (n - 1)
        return y, (1 - m) * rm + m * mean, (1 - m) * rv + m * unbiased

    @staticmethod
    def decompose(d, op):
        x, w, b, rm, rv, training = op.operands
        rank = x.type.rank
        axes = [0] + list(range(2, rank))
        per_channel = lambda v: d.reshape(v, (1, x.type.shape[1]) + (1,) * (rank - 2))  # noqa: E731
        k = lambda v: d.scalar(v, x)  # noqa: E731
        mean = d("mlc.reduce_mean", x, axes=axes)
        centred = d("mlc.sub", x, per_channel(mean))
        var = d("mlc.reduce_mean", d("mlc.mul", centred, centred), axes=axes)
        use_mean, use_var = d("mlc.select", training, mean, rm), d("mlc.select", training, var, rv)
        scale = d("mlc.mul", d("mlc.rsqrt", d("mlc.add", use_var, k(op.attr("eps")))), w)
        y = d("mlc.add", d("mlc.mul", d("mlc.sub", x, per_channel(use_mean)), per_channel(scale)), per_channel(b))
        n = d("mlc.reduce_sum", d.expand(k(1), x), axes=axes)
        unbiased = d("mlc.div", d("mlc.mul", var, n), d("mlc.sub", n, k(1)))
        m = op.attr("momentum")
        moved = [d("mlc.add", d("mlc.mul", old, k(1 - m)), d("mlc.mul", new, k(m))) for old, new in ((rm, mean), (rv, unbiased))]
        return [y, d("mlc.select", training, moved[0], rm), d("mlc.select", training, moved[1], rv)]


class Dropout(OpDef):
    """torch.nn.functional.dropout: in training (operand 2, i1 scalar) each element is zeroed with
    probability p and the rest scaled by 1 / (1 - p); the mask is `random_uniform(key, x) >= p`, so it
    is reproducible from the key (seed, counter) on every backend. Otherwise x passes unchanged."""
    name = "mlc.dropout"
    operands = 3
    traits = {PURE}
    attrs = {"p": Attr("float", 0.5)}

    @staticmethod
    def infer(op, ctx):
        x, key, training = _tensors(op)
        require_element(x, "float")
        if key.element != i64 or key.shape not in ((2,), (None,)):
            raise VerifyError(f"key must be tensor<2xi64> (seed, counter), got {key}")
        if training.element != i1 or training.rank != 0:
            raise VerifyError(f"operand 2 (training) must be tensor<i1>, got {training}")
        if not 0 <= op.attr("p") <= 1:
            raise VerifyError(f"'p' must be in [0, 1], got {op.attr('p')}")
        return [x]

    @staticmethod
    def interpret(ins, op, ctx):
        x, key, training = ins
        p = op.attr("p")
        if not training:
            return x
        keep = rng.uniform(x.shape, int(key[0]), int(key[1]), dtype=np.float64).astype(x.dtype) >= np.array(p, x.dtype)
        return np.where(keep, x * np.array(1 / (1 - p) if p < 1 else 0, x.dtype), np.array(0, x.dtype))

    @staticmethod
    def decompose(d, op):
        x, key, training = op.operands
        p = op.attr("p")
        keep = d("mlc.ge", d("mlc.random_uniform", key, x), d.scalar(p, x))
        dropped = d("mlc.select", keep, d("mlc.mul", x, d.scalar(1 / (1 - p) if p < 1 else 0, x)), d.scalar(0, x))
        return [d("mlc.select", training, dropped, x)]


# ---------------------------------------------------------------------------------------------------
# Randomness

class RandomOp(OpDef):
    """Counter-based random numbers (ir/random.py defines the bits). Operand 0 is a tensor<2xi64>
    key (seed, offset); an optional operand 1 gives the result shape at run time (its `?` dims)."""
    operands = (1, 2)
    traits = {PURE}

    @classmethod
    def infer(cls, op, ctx):
        ts = _tensors(op)
        key = ts[0]
        if key.element != i64 or key.shape not in ((2,), (None,)):
            raise VerifyError(f"key must be tensor<2xi64> (seed, offset), got {key}")
        declared = op.results[0].type if op.results and op.results[0].type is not ERROR else None
        if len(ts) == 2:
            like = ts[1]
            element = declared.element if isinstance(declared, TensorType) else (like.element if like.element.is_float else f32)
            return [TensorType(like.shape, element)]
        if declared is None:
            raise VerifyError("needs its result type (or a second operand giving the shape)")
        r = tensor_type(declared, "result")
        require_element(r, "float")
        if not r.is_static:
            raise VerifyError("a result with '?' dims needs a second operand giving the shape")
        return [r]

    @classmethod
    def interpret(cls, ins, op, ctx):
        seed, offset = (int(v) for v in ins[0])
        shape = ins[1].shape if len(ins) == 2 else op.results[0].type.shape
        return cls.draw(op, shape, seed, offset)


class RandomUniform(RandomOp):
    name = "mlc.random_uniform"
    attrs = {"low": Attr("float", 0.0), "high": Attr("float", 1.0)}

    @staticmethod
    def draw(op, shape, seed, offset):
        return rng.uniform(shape, seed, offset, op.attr("low"), op.attr("high"), np.float64)


class RandomNormal(RandomOp):
    name = "mlc.random_normal"
    attrs = {"mean": Attr("float", 0.0), "std": Attr("float", 1.0)}

    @staticmethod
    def draw(op, shape, seed, offset):
        return rng.normal(shape, seed, offset, op.attr("mean"), op.attr("std"), np.float64)


# ---------------------------------------------------------------------------------------------------
# Control flow

class Scan(OpDef):
    """Runs its region once per step along axis 0 of the sequence operands. Operands: the
    `num_carries` initial carries, then the sequences. Region args: carries, then one slice of each
    sequence. The region yields the next carries, then the per-step outputs. Results: the final
    carries, then the outputs stacked along axis 0. `reverse` walks the steps backwards (outputs keep
    their step's position). With no sequences, `length` gives the number of steps."""
    name = "mlc.scan"
    operands = (0, None)
    results = None
    regions = 1
    attrs = {"num_carries": Attr("int", required=True), "reverse": Attr("bool", False), "length": Attr("int")}

    @staticmethod
    def split(op):
        k = op.attr("num_carries")
        if not 0 <= k <= len(op.operands):
            raise VerifyError(f"'num_carries' {k} exceeds the {len(op.operands)} operands")
        return op.operand_types[:k], op.operand_types[k:]

    @staticmethod
    def length(op, seqs):
        dims = {tensor_type(t, "sequence").shape[0] if tensor_type(t, "sequence").rank else 'scalar' for t in seqs}
        if 'scalar' in dims:
            raise VerifyError("sequence operands must have rank >= 1")
        static = {d for d in dims if d is not None}
        if len(static) > 1:
            raise VerifyError(f"sequences have different lengths: {sorted(static)}")
        if not seqs:
            if op.attr("length") is None:
                raise VerifyError("a scan without sequences needs a 'length' attribute")
            return op.attr("length")
        return static.pop() if static else None

    @staticmethod
    def infer(op, ctx):
        carries, seqs = Scan.split(op)
        steps = Scan.length(op, seqs)
        block = op.regions[0].blocks[0] if op.regions and op.regions[0].blocks else None
        y = block.last if block is not None else None
        if y is None or y.name != "mlc.yield":
            raise VerifyError("the region must end with mlc.yield")
        outs = y.operand_types[len(carries):]
        return list(carries) + [TensorType((steps,) + tensor_type(t, "yielded value").shape, t.element) for t in outs]

    @staticmethod
    def verify(op, ctx):
        carries, seqs = Scan.split(op)
        block = op.regions[0].blocks[0]
        want = list(carries) + [tensor_type(t).with_shape(t.shape[1:]) for t in seqs]
        got = [a.type for a in block.args]
        if len(got) != len(want) or not all(types_compatible(a, b) for a, b in zip(want, got)):
            raise VerifyError("region arguments must be (" + ", ".join(map(str, want)) + "), got ("
                              + ", ".join(map(str, got)) + ")")
        yielded = block.last.operand_types
        if len(yielded) < len(carries) or not all(types_compatible(a, b) for a, b in zip(carries, yielded)):
            raise VerifyError("the region must yield the carries (" + ", ".join(map(str, carries))
                              + ") first, got (" + ", ".join(map(str, yielded)) + ")")

    @staticmethod
    def interpret(ins, op, ctx):
        k = op.attr("num_carries")
        carries, seqs = list(ins[:k]), ins[k:]
        lengths = {s.shape[0] for s in seqs}
        if len(lengths) > 1:
            raise RuntimeCheck(f"sequences have different lengths {sorted(lengths)}")
        steps = lengths.pop() if lengths else op.attr("length")
        order = range(steps - 1, -1, -1) if op.attr("reverse") else range(steps)
        outs = [None] * steps
        shapes = [c.shape for c in carries]
        for t in order:
            ys = ctx.run_region(op.regions[0], carries + [s[t] for s in seqs])
            carries, outs[t] = ys[:k], ys[k:]
            for what, (got, want) in _changed_shapes(shapes + [o.shape for o in outs[order[0]]], [y.shape for y in ys], k):
                raise RuntimeCheck(f"{what} changes shape from step to step, from {fmt_shape(want)} to {fmt_shape(got)} "
                                   "(a scan's carries and outputs keep their shapes)")
        out_types = op.result_types[k:]
        stacked = [np.stack([o[j] for o in outs]) if steps else np.zeros((0,) + tuple(d or 0 for d in t.shape[1:]), t.element.np_dtype)
                   for j, t in enumerate(out_types)]
        return carries + stacked


def _changed_shapes(want: list, got: list, carries: int):
    """(what, (got, want)) for each yielded value whose shape is not the one it must keep."""
    return [(f"carry {i}" if i < carries else f"output {i - carries}", (g, w))
            for i, (g, w) in enumerate(zip(got, want)) if tuple(g) != tuple(w)]


_STORED = ("mlc.matmul", "mlc.conv2d")  # a step's products (or the sums they feed), kept for the backward scan


def _scan_vjp(d, op, cts):
    """Back-propagation through time: the forward scan is replaced by one that also stacks each step's
    incoming carries and the results of its products (_STORED, or the sums they feed: _stored_end);
    then a reverse scan over (xs, those carries, the products, the outputs' cotangents) carries the
    carries' cotangents and sums of the captured values' cotangents. Its body recomputes the step's
    other (elementwise) ops and applies each op's rule to it; nothing is unrolled."""
    k = op.attr("num_carries")
    body = op.regions[0].blocks[0]
    carries, seqs = op.operands[:k], op.operands[k:]
    inside = set(body.args) | {r for inner in body for r in inner.results}
    step = [o for o in body if o.name != "mlc.yield"]
    stored = sorted({step.index(_stored_end(inner, body)) for inner in step
                     if inner.name in _STORED and any(v in inside for v in inner.operands)})
    # 1. the forward, stacking the carries each step starts from and its products
    fwd_block = Block([a.type for a in body.args], [a.name_hint for a in body.args])
    fwd_ops, yielded = _clone_step(d.inside(fwd_block), body, fwd_block.args)
    products = [fwd_ops[j].results[0] for j in stored]
    d.inside(fwd_block).op("mlc.yield", yielded + list(fwd_block.args[:k]) + products, [])
    steps = op.results[k].type.shape[0] if op.results[k:] else (seqs[0].type.shape[0] if seqs else op.attr("length"))
    stacked = [TensorType((steps,) + v.type.shape, v.type.element) for v in list(carries) + products]
    again = d.before(op).op("mlc.scan", op.operands, list(op.result_types) + stacked, [Region([fwd_block])], num_carries=k,
                            **{a: op.attributes[a] for a in ("reverse", "length") if a in op.attributes})
    carries_in = again.results[len(op.results):len(op.results) + k]
    products_in = again.results[len(op.results) + k:]
    # 2. the reverse scan
    seeds = [(i, ct) for i, ct in enumerate(cts[k:]) if ct is not None]
    outer = [v for v in captured(op) if v.type.element.is_float]
    init = [cts[i] if cts[i] is not None else d.zeros(c) for i, c in enumerate(carries)] + [d.zeros(v) for v in outer]
    step_of = lambda t: t.with_shape(t.shape[1:])  # noqa: E731
    back_block = Block([v.type for v in init] + [step_of(s.type) for s in seqs] + [c.type for c in carries] +
                       [step_of(ct.type) for _, ct in seeds] + [step_of(p.type) for p in products_in])
    args = iter(back_block.args)
    carry_ct, sums, x_t, c_t, out_ct, p_t = ([next(args) for _ in range(n)]
                                             for n in (k, len(outer), len(seqs), k, len(seeds), len(stored)))
    bd = d.inside(back_block)
    step_ops, ys = _clone_step(bd, body, c_t + x_t)
    adjoint = {}
    for v, ct in list(zip(ys[:k], carry_ct)) + [(ys[k + i], out_ct[j]) for j, (i, _) in enumerate(seeds)]:
        adjoint[v] = ct if v not in adjoint else bd("mlc.add", adjoint[v], ct)
    adjoint = bd.backprop(step_ops, adjoint)
    for j, product in zip(stored, p_t):  # read from the forward, not recomputed (canonicalize drops the copies)
        step_ops[j].results[0].replace_all_uses_with(product)
    new_sums = [bd("mlc.add", s, adjoint[v]) if v in adjoint else s for s, v in zip(sums, outer)]
    bd.op("mlc.yield", [adjoint.get(c) or bd.zeros(c) for c in c_t] + new_sums + [adjoint.get(x) or bd.zeros(x) for x in x_t], [])
    back = d.op("mlc.scan", init + seqs + list(carries_in) + [ct for _, ct in seeds] + list(products_in),
                [v.type for v in init] + [s.type for s in seqs], [Region([back_block])],
                num_carries=k + len(outer), **({} if op.attr("reverse") else {"reverse": True}))
    given = {}
    for v, ct in zip(carries + outer + seqs, back.results):  # a value may be all three: its cotangents add
        given[v] = ct if v not in given else d("mlc.add", given[v], ct)
    op.replace_with(again.results[:len(op.results)])  # its results now come from the scan that stacks
    return given


def _stored_end(product, body):
    """What the forward stacks for a product: the product, or the last of the sums it alone feeds
    (z = x_t + h W + b, an LSTM's gates before their nonlinearities), whose cotangents need no values:
    the forward's product then takes the sums as its epilogue, and the backward need not redo them."""
    v = product.results[0]
    while len(v.uses) == 1:
        (user, _), = v.uses
        if user.name not in ("mlc.add", "mlc.sub") or user.parent is not body or user.results[0].type != v.type:
            break
        v = user.results[0]
    return v.defining_op()


def _clone_step(b, body, args):
    """The scan body's ops (not its yield) copied through b with its arguments bound to args; returns
    the copies and the values they yield."""
    mapping = dict(zip(body.args, args))
    ops = [b.b.block.append(inner.clone(mapping)) for inner in body if inner.name != "mlc.yield"]
    return ops, [mapping.get(v, v) for v in body.last.operands]


def captured(op) -> list:
    """Values from outside op's regions that ops inside use, in order of first use."""
    inside = set()
    for inner in op.regions[0].walk():
        inside.update(inner.results)
        for r in inner.regions:
            for blk in r.blocks:
                inside.update(blk.args)
    for blk in op.regions[0].blocks:
        inside.update(blk.args)
    return list(dict.fromkeys(v for inner in op.regions[0].walk() for v in inner.operands if v not in inside))


Scan.vjp = staticmethod(_scan_vjp)


class Fusion(OpDef):
    """A kernel boundary made by the `fuse` pass: its region computes the results elementwise from the
    operands (region arguments) and is compiled as one loop nest. The interpreter runs the region."""
    name = "mlc.fusion"
    operands = (0, None)
    results = None
    regions = 1
    traits = {PURE}

    @staticmethod
    def infer(op, ctx):
        block = op.regions[0].blocks[0] if op.regions and op.regions[0].blocks else None
        if block is None or block.last is None or block.last.name != "mlc.yield":
            raise VerifyError("the region must end with mlc.yield")
        return list(block.last.operand_types)

    @staticmethod
    def verify(op, ctx):
        args = [a.type for a in op.regions[0].blocks[0].args]
        if args != op.operand_types:
            raise VerifyError("region arguments must have the operands' types")

    @staticmethod
    def interpret(ins, op, ctx):
        return ctx.run_region(op.regions[0], list(ins))

    @staticmethod
    def named_by(op):
        """The op that names the kernel (in profiles and run-time errors): its product or reduction,
        else the op that makes its result (not a slice it reads through)."""
        body = op.regions[0].blocks[0]
        anchor = next((o for o in body.ops if ELEMENTWISE not in o.opdef.traits and o.name != "mlc.slice" and o is not body.last), None)
        return anchor or (body.last.operands[0].defining_op() if body.last.operands else None) or op


class Yield(Terminator):
    name = "mlc.yield"
    parent = ("mlc.scan", "mlc.fusion")
    traits = {TERMINATOR, PURE}


# ---------------------------------------------------------------------------------------------------
# State

class Global(OpDef):
    """A tensor that lives across calls. `init`: "zeros", "ones", dense<...>, "uniform" (low, high),
    "normal" (mean, std), "glorot_uniform", "glorot_normal", "he_uniform", "he_normal"; drawn from the
    module seed (ir/random.py), a stream per global name. Fans: rank 2 [in, out] (x @ w); rank 4
    OIHW fan_in = I*kh*kw, fan_out = O*kh*kw.

    `init = "panels"`, `of = @w`: always @w's value packed as the CPU product kernels read their B
    operand (passes/gemm.py): @w is [K, N] (or [N, K] with `transpose`: read through its transpose),
    this is [ceil(N / nr), K, nr], column panels of nr, zero-padded. The tile pass declares it for a
    matrix no function stores to and the host does not write in place between calls (one marked
    `external` may be: mlc.optim binds parameters that Python code writes), so that it is packed when
    it is set, not at every call.

    `init = "winograd"`, `of = @w`: always @w's 3 x 3 filters transformed for Winograd's F(m, 3), the
    value of mlc.winograd_filter (m from the type, [O, (m + 2)^2, C]); the winograd pass declares it
    for a filter that no function stores to and the host does not write in place, as the tile pass
    declares panels. Both are derived globals: no function may store to them or to @w."""
    name = "mlc.global"
    results = 0
    traits = {SYMBOL}
    attrs = {"sym_name": Attr("str", required=True), "type": Attr("type", required=True),
             "init": Attr("init", "zeros"), "trainable": Attr("bool", False), "low": Attr("float", 0.0),
             "high": Attr("float", 1.0), "mean": Attr("float", 0.0), "std": Attr("float", 1.0),
             "of": Attr("symbol"), "transpose": Attr("bool", False), "external": Attr("bool", False)}

    DERIVED = ("panels", "winograd")  # inits whose value is always one computed from global `of`'s

    @staticmethod
    def derived_kind(op) -> str | None:
        init = op.attributes.get("init")
        return init.value if isinstance(init, StringAttr) and init.value in Global.DERIVED else None

    @staticmethod
    def is_panels(op) -> bool:
        return Global.derived_kind(op) == "panels"

    @staticmethod
    def derived_of(op, value: np.ndarray) -> np.ndarray:
        """The value of derived global `op` where its source's is `value`."""
        return Global.derive(Global.table_entry(op), value)

    @staticmethod
    def table_entry(op) -> dict:
        """A global as the runtime's table describes it: its name, and for a derived one how to compute
        it (the runtime does, whenever its source is set)."""
        name, kind, t = op.attr("sym_name"), Global.derived_kind(op), op.attr("type")
        if kind == "panels":
            return {"name": name, "of": op.attr("of"), "init": kind, "nr": t.shape[-1], "transpose": op.attr("transpose")}
        if kind == "winograd":
            return {"name": name, "of": op.attr("of"), "init": kind, "m": math.isqrt(t.shape[1]) - 2}
        return {"name": name}

    @staticmethod
    def derive(entry: dict, value: np.ndarray) -> np.ndarray:
        """A derived global's value from its table entry and its source's value (an entry without an
        init, from code made before there were two kinds, is panels)."""
        if entry.get("init", "panels") == "winograd":
            return WinogradFilter.transform(value, entry["m"])
        return Global.panels(value, entry["nr"], entry["transpose"])

    @staticmethod
    def panels(value: np.ndarray, nr: int, transpose: bool = False) -> np.ndarray:
        """A matrix's column panels: out[p, k, c] = B[k, p * nr + c] (0 past N), B = value or its transpose."""
        b = value.T if transpose else value
        k, n = b.shape
        out = np.zeros((k, -(-n // nr) * nr), b.dtype)
        out[:, :n] = b
        return np.ascontiguousarray(out.reshape(k, -1, nr).transpose(1, 0, 2))

    @staticmethod
    def panels_type(source: TensorType, nr: int, transpose: bool = False) -> TensorType:
        n, k = source.shape if transpose else source.shape[::-1]
        return TensorType((-(-n // nr), k, nr), source.element)

    @staticmethod
    def winograd_type(source: TensorType, m: int) -> TensorType:
        return TensorType((source.shape[0], (m + 2) ** 2, source.shape[1]), source.element)

    @staticmethod
    def verify_derived(op, ctx):
        kind, source, t, name = Global.derived_kind(op), ctx.symbols.get(op.attr("of")), op.attr("type"), op.attr("of")
        rank = 2 if kind == "panels" else 4
        if source is None or source.name != "mlc.global" or Global.derived_kind(source) or source.attr("type").rank != rank:
            raise VerifyError(f"\"{kind}\" needs `of` to name a rank-{rank} global that is not itself derived, got @{name}")
        if kind == "panels":
            expected = Global.panels_type(source.attr("type"), t.shape[-1], op.attr("transpose")) if t.rank == 3 else None
            if t != expected:
                raise VerifyError(f"the panels of @{name} ({source.attr('type')}) have a type [panels, K, nr] "
                                  f"({expected or 'rank 3'}), got {t}")
            return
        m = math.isqrt(t.shape[1]) - 2 if t.rank == 3 else None
        if source.attr("type").shape[2:] != (3, 3) or m not in WINOGRAD_TILES or t != Global.winograd_type(source.attr("type"), m):
            raise VerifyError(f"the Winograd transform of @{name} ({source.attr('type')}, 3 x 3 filters) has a type "
                              f"[O, (m + 2)^2, C] for m in {list(WINOGRAD_TILES)}, got {t}")

    @staticmethod
    def verify(op, ctx):
        t = op.attr("type")
        if not isinstance(t, TensorType) or not t.is_static:
            raise VerifyError(f"a global must have a static tensor type, got {t}")
        if Global.derived_kind(op):
            return Global.verify_derived(op, ctx)
        init = op.attributes.get("init")
        if isinstance(init, DenseAttr):
            if init.type != t:
                raise VerifyError(f"initial value has type {init.type} but the global is {t}")
        elif op.attr("init") not in ("zeros", "ones") and not t.element.is_float:
            raise VerifyError(f"initialiser \"{op.attr('init')}\" needs a floating-point type, got {t}")

    @staticmethod
    def initial_values(decls: dict, seed: int) -> dict:
        """Each global's first value by name (derived ones computed from their source's)."""
        values = {name: Global.initial_value(op, seed) for name, op in decls.items() if not Global.derived_kind(op)}
        for name, op in decls.items():
            if Global.derived_kind(op):
                values[name] = Global.derived_of(op, values[op.attr("of")])
        return {name: values[name] for name in decls}

    @staticmethod
    def initial_value(op, seed: int) -> np.ndarray:
        """A fresh C-contiguous array, checked to fit in memory before it is made."""
        t, init = op.attr("type"), op.attr("init")
        dtype = t.element.np_dtype
        if isinstance(init, np.ndarray):
            return init.copy()
        check_fits_in_memory(f"@{op.attr('sym_name')}", t.nbytes, op.loc, op.name)
        if init in ("zeros", "ones"):
            return np.full(t.shape, 1 if init == "ones" else 0, dtype)
        shape, offset = t.shape, rng.name_offset(op.attr("sym_name"))
        rf = math.prod(shape[2:]) if len(shape) > 2 else 1
        fan_in = shape[0] if len(shape) <= 2 and shape else (shape[1] * rf if len(shape) > 2 else 1)
        fan_out = shape[1] if len(shape) == 2 else (shape[0] * rf if len(shape) > 2 else fan_in)
        if len(shape) == 1:
            fan_in = fan_out = shape[0]
        if init == "uniform":
            return rng.uniform(shape, seed, offset, op.attr("low"), op.attr("high"), dtype)
        if init == "normal":
            return rng.normal(shape, seed, offset, op.attr("mean"), op.attr("std"), dtype)
        bound_or_std = {"glorot_uniform": math.sqrt(6 / (fan_in + fan_out)), "glorot_normal": math.sqrt(2 / (fan_in + fan_out)),
                        "he_uniform": math.sqrt(6 / fan_in), "he_normal": math.sqrt(2 / fan_in)}[init]
        if init.endswith("uniform"):
            return rng.uniform(shape, seed, offset, -bound_or_std, bound_or_std, dtype)
        return rng.normal(shape, seed, offset, 0.0, bound_or_std, dtype)


def _global_decl(op, ctx):
    name = op.attr("global")
    decl = ctx.symbols.get(name)
    if decl is None or decl.name != "mlc.global":
        raise VerifyError(f"'@{name}' is not a declared mlc.global")
    return decl.attr("type")


class GlobalLoad(OpDef):
    name = "mlc.global_load"
    traits = {READS, USES_SYMBOLS}
    attrs = {"global": Attr("symbol", required=True)}
    pretty_symbol = "global"

    @staticmethod
    def infer(op, ctx):
        return [_global_decl(op, ctx)]

    @staticmethod
    def interpret(ins, op, ctx):
        return ctx.globals[op.attr("global")]


class GlobalStore(OpDef):
    name = "mlc.global_store"
    operands = 1
    results = 0
    traits = {USES_SYMBOLS}
    attrs = {"global": Attr("symbol", required=True)}
    pretty_symbol = "global"

    @staticmethod
    def infer(op, ctx):
        t, name = _global_decl(op, ctx), op.attr("global")
        if not types_compatible(t, op.operand_types[0]):
            raise VerifyError(f"stores a {op.operand_types[0]} into @{name} of type {t}")
        derived = next((d for d in ctx.symbols.values() if d.name == "mlc.global" and Global.derived_kind(d) and d.attr("of") == name), None)
        if derived is not None:
            read = "packed panels" if Global.is_panels(derived) else "its Winograd transform"
            raise VerifyError(f"@{name} is read through {read}, so no function may store to it")
        return []

    @staticmethod
    def interpret(ins, op, ctx):
        t = ctx.module_globals_types[op.attr("global")]
        if ins[0].shape != t.shape:
            raise RuntimeCheck(f"stores shape {fmt_shape(ins[0].shape)} into @{op.attr('global')} of type {t}")
        ctx.globals[op.attr("global")] = np.array(ins[0], dtype=t.element.np_dtype)
        return []
