"""Tensor functions under numpy's names (`mlc.exp`, `mlc.where`, `mlc.concatenate`, ...), the
operators of traced tensors, and `mlc.scan`.

Inside a trace each call records mlc ops; outside one, a call on numpy arrays runs at once on the
reference interpreter. Types promote as in JAX: a Python number takes the other operand's type, an
integer meeting a float becomes that float, and a narrower float the wider one.
"""
from __future__ import annotations

import builtins
import functools
import math

import numpy as np

from mlc.ir.attributes import UNIT
from mlc.ir.core import Block, Region
from mlc.ir.dialects.mlc import END
from mlc.ir.types import TensorType, element_of, f32, i1, i64

from .tracing import _STACK, Tensor, Variable, current_trace, flatten, tensor_type, tracing_error, unflatten


def traceable(fn):
    """Run fn on numpy arrays when called outside a trace (traced, then interpreted)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _STACK:
            return fn(*args, **kwargs)
        from .tracing import trace_function
        from mlc.ir.interpreter import Interpreter
        traced = trace_function(lambda: fn(*args, **kwargs), (), name=fn.__name__)
        results = Interpreter(traced.module).call(traced.func.sym_name, [])
        return unflatten(traced.out_structure, results[: traced.n_outputs])
    return wrapper


def emit(name: str, *operands, result_type=None, regions=(), **attrs) -> Tensor:
    """Record op `name` on operands (tensors, variables, arrays) in the current trace; its one result."""
    t = current_trace()
    op = t.emit(name, operands, None if result_type is None else [result_type], regions, **attrs)
    return Tensor(op.result, t)


def as_tensor(x, element=None) -> Tensor:
    return current_trace().tensor(x if element is None or not isinstance(x, (bool, int, float)) else np.array(x, element.np_dtype))


# --- types and promotion ------------------------------------------------------------------------------

def _element(x):
    """x's element type, or the kind of a Python number ("bool", "int", "float": weakly typed)."""
    if isinstance(x, (Tensor, Variable, np.ndarray, np.generic)):
        return tensor_type(x).element
    if isinstance(x, bool):
        return "bool"
    if isinstance(x, int):
        return "int"
    if isinstance(x, float):
        return "float"
    raise TypeError(f"cannot use a {type(x).__name__} as a tensor")


_RANK = {"i1": 0, "i8": 1, "i32": 2, "i64": 3, "f16": 4, "bf16": 4, "f32": 5, "f64": 6}
_WEAK = {"bool": (0, i1), "int": (1, i64), "float": (4, f32)}


def result_element(*xs):
    """The element type operands promote to."""
    strong = [e for e in map(_element, xs) if not isinstance(e, str)]
    weak = [e for e in map(_element, xs) if isinstance(e, str)]
    if not strong:
        return max((_WEAK[w] for w in weak), key=lambda p: p[0])[1]
    best = builtins.max(strong, key=lambda e: _RANK[e.name])
    if weak and not best.is_float and "float" in weak:
        return f32
    if weak and best.is_bool and "int" in weak:
        return i64
    return best


def cast(x, element) -> Tensor:
    t = as_tensor(x, element)
    return t if t.type.element == element else emit("mlc.cast", t, result_type=TensorType(t.shape, element))


def _promoted(*xs, floating=False):
    e = result_element(*xs)
    if floating and not e.is_float:
        e = f32
    return [cast(x, e) for x in xs]


def _binary(name):
    @traceable
    def op(a, b):
        return emit(name, *_promoted(a, b))
    return op


def _unary(name, floating=True):
    @traceable
    def op(x):
        (x,) = _promoted(x, floating=floating)
        return emit(name, x)
    return op


add, subtract, multiply, maximum, minimum = (_binary(f"mlc.{n}") for n in ("add", "sub", "mul", "maximum", "minimum"))
equal, not_equal, less, less_equal, greater, greater_equal = (_binary(f"mlc.{n}") for n in ("eq", "ne", "lt", "le", "gt", "ge"))
logical_and, logical_or = _binary("mlc.and"), _binary("mlc.or")
exp, log, log1p, sqrt, rsqrt, reciprocal, tanh, sigmoid, erf, sin, cos = (
    _unary(f"mlc.{n}") for n in ("exp", "log", "log1p", "sqrt", "rsqrt", "reciprocal", "tanh", "sigmoid", "erf", "sin", "cos"))
negative, absolute, square, sign, floor, relu = (_unary(f"mlc.{n}", floating=False) for n in ("neg", "abs", "square", "sign", "floor", "relu"))
logical_not = _unary("mlc.not", floating=False)
abs = absolute


@traceable
def stop_gradient(x):
    """x, as a constant to differentiation (jax.lax.stop_gradient)."""
    return emit("mlc.stop_gradient", x)


@traceable
def divide(a, b):
    return emit("mlc.div", *_promoted(a, b, floating=True))


@traceable
def power(a, b):
    if isinstance(b, (int, float)) and not isinstance(b, bool) and b == 2:
        return square(a)
    return emit("mlc.pow", *_promoted(a, b, floating=True))


@traceable
def floor_divide(a, b):
    return floor(divide(a, b)) if result_element(a, b).is_float else cast(floor(divide(a, b)), result_element(a, b))


@traceable
def gelu(x, approximate: str = "none"):
    (x,) = _promoted(x, floating=True)
    return emit("mlc.gelu", x, approximate=approximate)


@traceable
def where(condition, a, b):
    c = as_tensor(condition)
    if not c.type.element.is_bool:
        c = not_equal(c, 0)
    return emit("mlc.select", c, *_promoted(a, b))


@traceable
def clip(x, a_min=None, a_max=None):
    if isinstance(a_min, (int, float, type(None))) and isinstance(a_max, (int, float, type(None))):
        attrs = {k: float(v) for k, v in (("min", a_min), ("max", a_max)) if v is not None}
        (x,) = _promoted(x, floating=True)
        return emit("mlc.clamp", x, **attrs) if attrs else x
    y = x if a_min is None else maximum(x, a_min)
    return y if a_max is None else minimum(y, a_max)


@traceable
def astype(x, dtype) -> Tensor:
    return cast(x, element_of(np.dtype(dtype)))


# --- linear algebra ---------------------------------------------------------------------------------

@traceable
def matmul(a, b):
    a, b = _promoted(a, b)
    if a.ndim == 1 and b.ndim == 1:
        return reshape(emit("mlc.matmul", reshape(a, (1, -1)), reshape(b, (-1, 1))), ())
    if a.ndim == 1:
        return squeeze(matmul(reshape(a, (1, -1)), b), -2)
    if b.ndim == 1:
        return squeeze(matmul(a, reshape(b, (-1, 1))), -1)
    return emit("mlc.matmul", a, b)


# --- reductions -------------------------------------------------------------------------------------------

def _axes(axis, rank):
    if axis is None:
        return list(range(rank))
    axes = [axis] if isinstance(axis, int) else list(axis)
    for a in axes:
        if not -rank <= a < rank:
            raise tracing_error(f"axis {a} is out of range for rank {rank}")
    return sorted(a % rank for a in axes)


def _reduction(name, floating=False):
    @traceable
    def op(x, axis=None, keepdims=False):
        x = as_tensor(x)
        if floating or name == "mlc.reduce_sum" and x.type.element.is_bool:
            (x,) = _promoted(x, floating=floating) if floating else [cast(x, i64)]
        return emit(name, x, axes=_axes(axis, x.ndim), keepdims=keepdims)
    return op


sum = _reduction("mlc.reduce_sum")
mean = _reduction("mlc.reduce_mean", floating=True)
max, min, prod = (_reduction(f"mlc.reduce_{n}") for n in ("max", "min", "prod"))
amax, amin = max, min


@traceable
def argmax(x, axis=None, keepdims=False):
    x = as_tensor(x)
    if axis is None:
        x, axis = reshape(x, (-1,)), 0
    return emit("mlc.argmax", x, axes=_axes(axis, x.ndim), keepdims=keepdims)


@traceable
def argmin(x, axis=None, keepdims=False):
    return argmax(negative(x), axis, keepdims)


@traceable
def var(x, axis=None, ddof=0, keepdims=False):
    x = as_tensor(x)
    centred = subtract(x, mean(x, axis, keepdims=True))
    v = mean(square(centred), axis, keepdims)
    if ddof:
        n = math.prod(x.shape[a] for a in _axes(axis, x.ndim))
        v = multiply(v, n / (n - ddof))
    return v


@traceable
def std(x, axis=None, ddof=0, keepdims=False):
    return sqrt(var(x, axis, ddof, keepdims))


@traceable
def logsumexp(x, axis=None, keepdims=False):
    m = max(x, axis, keepdims=True)
    s = add(log(sum(exp(subtract(x, m)), axis, keepdims=True)), m)
    return s if keepdims else squeeze(s, _axes(axis, as_tensor(x).ndim))


@traceable
def softmax(x, axis=-1):
    return emit("mlc.softmax", *_promoted(x, floating=True), axis=axis)


@traceable
def log_softmax(x, axis=-1):
    return emit("mlc.log_softmax", *_promoted(x, floating=True), axis=axis)


# --- shapes ----------------------------------------------------------------------------------------------

def _resolve_shape(old, shape):
    """numpy's reshape target with -1 solved; `?` where the size is only known at run time."""
    shape = [shape] if isinstance(shape, (int, type(None))) else list(shape)
    if shape.count(-1) > 1:
        raise tracing_error(f"reshape: at most one -1 in {tuple(shape)}")
    static_old = math.prod(d for d in old if d is not None)
    static_new = math.prod(d for d in shape if d is not None and d != -1)
    if -1 in shape:
        i = shape.index(-1)
        dynamic_old = old.count(None) - shape.count(None)
        if dynamic_old > 0:
            shape[i] = None
        elif static_new == 0 or static_old % static_new:
            raise tracing_error(f"cannot reshape {_fmt(old)} into {tuple(shape)}")
        else:
            shape[i] = static_old // static_new
    return tuple(shape)


def _fmt(shape):
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


@traceable
def reshape(x, shape):
    x = as_tensor(x)
    new = _resolve_shape(x.shape, shape)
    if new == x.shape:
        return x
    return emit("mlc.reshape", x, result_type=TensorType(new, x.type.element))


@traceable
def transpose(x, axes=None):
    x = as_tensor(x)
    perm = list(reversed(range(x.ndim))) if axes is None else [a % x.ndim for a in axes]
    return x if perm == list(range(x.ndim)) else emit("mlc.transpose", x, perm=perm)


@traceable
def swapaxes(x, a, b):
    perm = list(range(as_tensor(x).ndim))
    perm[a], perm[b] = perm[b], perm[a]
    return transpose(x, perm)


@traceable
def moveaxis(x, source, destination):
    perm = [i for i in range(as_tensor(x).ndim) if i != source % x.ndim]
    perm.insert(destination % x.ndim, source % x.ndim)
    return transpose(x, perm)


@traceable
def expand_dims(x, axis):
    x = as_tensor(x)
    rank = x.ndim + (1 if isinstance(axis, int) else len(axis))
    axes = _axes(axis, rank)
    dims = iter(x.shape)
    return reshape(x, tuple(1 if i in axes else next(dims) for i in range(rank)))


@traceable
def squeeze(x, axis=None):
    x = as_tensor(x)
    axes = [i for i, d in enumerate(x.shape) if d == 1] if axis is None else _axes(axis, x.ndim)
    for a in axes:
        if x.shape[a] != 1:
            raise tracing_error(f"cannot squeeze axis {a} of size {x.shape[a]}")
    return reshape(x, tuple(d for i, d in enumerate(x.shape) if i not in axes))


@traceable
def broadcast_to(x, shape):
    x = as_tensor(x)
    shape = tuple(shape)
    return x if x.shape == shape else emit("mlc.broadcast_to", x, result_type=TensorType(shape, x.type.element))


@traceable
def concatenate(arrays, axis=0):
    arrays = _promoted(*arrays)
    return arrays[0] if len(arrays) == 1 else emit("mlc.concat", *arrays, axis=axis % arrays[0].ndim)


@traceable
def stack(arrays, axis=0):
    arrays = _promoted(*arrays)
    return concatenate([expand_dims(a, axis) for a in arrays], axis)


@traceable
def split(x, indices_or_sections, axis=0):
    """numpy.split: equal sections, or the cut points."""
    x = as_tensor(x)
    axis %= x.ndim
    n = x.shape[axis]
    if isinstance(indices_or_sections, int):
        if n is None or n % indices_or_sections:
            raise tracing_error(f"cannot split a dimension of size {n} into {indices_or_sections} equal sections")
        step = n // indices_or_sections
        cuts = list(range(step, n, step))
    else:
        cuts = list(indices_or_sections)
    bounds = [0] + cuts + [END]
    return [slice_axis(x, axis, lo, hi) for lo, hi in zip(bounds, bounds[1:])]


def slice_axis(x, axis, start, limit, stride=1):
    x = as_tensor(x)
    start_, limit_, stride_ = [0] * x.ndim, [END] * x.ndim, [1] * x.ndim
    start_[axis], limit_[axis], stride_[axis] = start, limit, stride
    return emit("mlc.slice", x, start=start_, limit=limit_, stride=stride_)


@traceable
def pad(x, pad_width, constant_values=0):
    x = as_tensor(x)
    if isinstance(pad_width, int):
        pad_width = (pad_width, pad_width)
    widths = [tuple(pad_width)] * x.ndim if all(isinstance(w, int) for w in pad_width) else [tuple(w) for w in pad_width]
    return emit("mlc.pad", x, low=[w[0] for w in widths], high=[w[1] for w in widths], value=float(constant_values))


@traceable
def take(x, indices, axis=None):
    x = as_tensor(x)
    if axis is None:
        x, axis = reshape(x, (-1,)), 0
    idx = as_tensor(np.asarray(indices) if isinstance(indices, (list, tuple, int)) else indices)
    if not idx.type.element.is_int or idx.type.element.is_bool:
        raise tracing_error(f"indices must be integers, got {idx.type}")
    return emit("mlc.gather", x, idx, axis=axis % x.ndim)


def getitem(x: Tensor, key):
    """numpy basic indexing (ints, slices, None, ...) and one integer-array index."""
    key = key if isinstance(key, tuple) else (key,)
    if builtins.sum(k is Ellipsis for k in key) > 1:
        raise tracing_error("an index may have only one ellipsis (...)")
    used = builtins.sum(k is not None and k is not Ellipsis for k in key)
    if used > x.ndim:
        raise tracing_error(f"too many indices ({used}) for a tensor of rank {x.ndim}")
    if any(k is Ellipsis for k in key):
        i = next(i for i, k in enumerate(key) if k is Ellipsis)
        key = key[:i] + (slice(None),) * (x.ndim - used) + key[i + 1:]
    else:
        key = key + (slice(None),) * (x.ndim - used)
    start, limit, stride = [0] * x.ndim, [END] * x.ndim, [1] * x.ndim
    final, advanced, d = [], None, 0
    for k in key:
        if k is None:
            final.append(1)
            continue
        n = x.shape[d]
        if isinstance(k, (int, np.integer)) and not isinstance(k, bool):
            k = int(k)
            if n is not None and not -n <= k < n:
                raise tracing_error(f"index {k} is out of bounds for axis {d} with size {n}")
            start[d], limit[d] = (k % n, k % n + 1) if n is not None else (k, k + 1 if k != -1 else END)
        elif isinstance(k, slice):
            if k.step is not None and k.step <= 0:
                raise tracing_error("slices with a negative or zero step are not supported")
            if n is not None:
                start[d], limit[d], stride[d] = k.indices(n)
                if limit[d] < start[d]:
                    limit[d] = start[d]
            else:
                start[d], limit[d], stride[d] = k.start or 0, END if k.stop is None else k.stop, k.step or 1
            final.append(len(range(start[d], limit[d], stride[d])) if n is not None else None)
        else:
            if advanced is not None:
                raise tracing_error("only one integer-array index per indexing expression is supported")
            idx = as_tensor(np.asarray(k) if isinstance(k, (list, np.ndarray)) else k)
            advanced = (d, idx)
            final.extend(["adv"])
        d += 1
    y = x
    if any(s != 0 or l != END or k != 1 for s, l, k in zip(start, limit, stride)):
        y = emit("mlc.slice", x, start=start, limit=limit, stride=stride)
    if advanced is not None:
        axis, idx = advanced
        y = take(y, idx, axis)
        at = final.index("adv")
        final[at: at + 1] = list(idx.shape)
    return reshape(y, tuple(final)) if tuple(final) != y.shape else y


# --- creation -----------------------------------------------------------------------------------------

@traceable
def full(shape, fill_value, dtype=None):
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    default = np.float32 if isinstance(fill_value, float) else np.asarray(fill_value).dtype
    scalar = np.array(fill_value, np.dtype(default if dtype is None else dtype))
    return broadcast_to(as_tensor(scalar), shape)


def zeros(shape, dtype=None):
    return full(shape, 0.0, dtype)


def ones(shape, dtype=None):
    return full(shape, 1.0, dtype)


@traceable
def full_like(x, fill_value, dtype=None):
    x = as_tensor(x)
    e = x.type.element if dtype is None else element_of(np.dtype(dtype))
    if None not in x.shape:
        return full(x.shape, np.array(fill_value, e.np_dtype))
    true = as_tensor(np.array(True))
    return emit("mlc.select", true, as_tensor(np.array(fill_value, e.np_dtype)), cast(x, e))


def zeros_like(x, dtype=None):
    return full_like(x, 0, dtype)


def ones_like(x, dtype=None):
    return full_like(x, 1, dtype)


@traceable
def arange(start, stop=None, step=1, dtype=None):
    values = np.arange(start, stop, step) if stop is not None else np.arange(start)
    return as_tensor(values.astype(dtype or (np.float32 if values.dtype.kind == "f" else np.int64)))


@traceable
def tril(x, k=0):
    """x with the elements above the k-th diagonal of its last two dims zeroed."""
    x = as_tensor(x)
    rows, cols = x.shape[-2:]
    keep = np.tril(np.ones((rows, cols), bool), k)
    return where(keep, x, zeros_like(x))


@traceable
def triu(x, k=0):
    x = as_tensor(x)
    rows, cols = x.shape[-2:]
    return where(np.triu(np.ones((rows, cols), bool), k), x, zeros_like(x))


# --- control flow ---------------------------------------------------------------------------------------

@traceable
def scan(fn, init, xs=None, length=None, reverse=False):
    """JAX's lax.scan as one `mlc.scan` op: fn(carry, x) -> (carry, y) runs once per slice of xs along
    axis 0; returns (the last carry, the ys stacked along axis 0). carry, x and y are tensors or
    nests of them; y may be None. The body is traced once, whatever the length."""
    t = current_trace()
    carries, carry_structure = flatten(init)
    carries = [as_tensor(c) for c in carries]
    seqs, x_structure = flatten(xs)
    seqs = [as_tensor(s) for s in seqs]
    for s in seqs:
        if s.ndim == 0:
            raise tracing_error("scan: xs must have a leading axis to scan over")
    if not seqs and length is None:
        raise tracing_error("scan: give xs or length")
    block = Block([c.type for c in carries] + [s.type.with_shape(s.shape[1:]) for s in seqs])
    with t.inside(block):
        args = [Tensor(a, t) for a in block.args]
        out = fn(unflatten(carry_structure, args[: len(carries)]), unflatten(x_structure, args[len(carries):]))
        if not (isinstance(out, tuple) and len(out) == 2):
            raise tracing_error("scan: the body must return a pair (new carry, y)")
        new, new_structure = flatten(out[0])
        ys, y_structure = flatten(out[1])
        if new_structure != carry_structure:
            raise tracing_error("scan: the body's new carry must have the structure of init")
        new = [cast(n, c.type.element) if isinstance(n, (int, float)) else as_tensor(n) for n, c in zip(new, carries)]
        for i, (n, c) in enumerate(zip(new, carries)):
            if n.type != c.type:
                raise tracing_error(f"scan: carry {i} enters the body as {c.type} but leaves as {n.type}")
        t.emit("mlc.yield", new + [as_tensor(y) for y in ys], [])
    attrs = {"num_carries": len(carries)}
    if reverse:
        attrs["reverse"] = UNIT
    if not seqs:
        attrs["length"] = int(length)
    op = t.emit("mlc.scan", carries + seqs, regions=[Region([block])], **attrs)
    results = [Tensor(r, t) for r in op.results]
    return unflatten(carry_structure, results[: len(carries)]), unflatten(y_structure, results[len(carries):])


# --- operators of traced tensors ------------------------------------------------------------------------

def _reflected(fn):
    return lambda self, other: fn(other, self)


def _setitem(self, key, value):
    raise tracing_error("traced values are immutable: build a new one (mlc.where, mlc.concatenate, mlc.pad)")


def install_operators(cls):
    ops = {
        "__add__": add, "__radd__": _reflected(add), "__sub__": subtract, "__rsub__": _reflected(subtract),
        "__mul__": multiply, "__rmul__": _reflected(multiply), "__truediv__": divide,
        "__rtruediv__": _reflected(divide), "__floordiv__": floor_divide, "__rfloordiv__": _reflected(floor_divide),
        "__pow__": power, "__rpow__": _reflected(power), "__matmul__": matmul, "__rmatmul__": _reflected(matmul),
        "__neg__": negative, "__pos__": lambda self: self, "__abs__": absolute, "__invert__": logical_not,
        "__eq__": equal, "__ne__": not_equal, "__lt__": less, "__le__": less_equal, "__gt__": greater,
        "__ge__": greater_equal, "__and__": logical_and, "__rand__": _reflected(logical_and), "__or__": logical_or,
        "__ror__": _reflected(logical_or), "__getitem__": getitem, "__setitem__": _setitem,
        "sum": sum, "mean": mean, "max": max, "min": min, "prod": prod, "argmax": argmax, "argmin": argmin,
        "var": var, "std": std, "astype": astype, "detach": stop_gradient, "squeeze": squeeze, "swapaxes": swapaxes, "clip": clip,
    }
    for name, fn in ops.items():
        setattr(cls, name, fn)
    cls.T = property(lambda self: transpose(self))
    cls.reshape = lambda self, *shape: reshape(self, shape[0] if len(shape) == 1 and not isinstance(shape[0], int) else shape)
    cls.transpose = lambda self, *axes: transpose(self, (axes[0] if len(axes) == 1 and not isinstance(axes[0], int) else axes) or None)
    cls.flatten = lambda self: reshape(self, (-1,))
    cls.__hash__ = object.__hash__


__all__ = ["add", "subtract", "multiply", "divide", "power", "floor_divide", "maximum", "minimum", "equal", "not_equal",
           "less", "less_equal", "greater", "greater_equal", "logical_and", "logical_or", "logical_not", "negative",
           "absolute", "abs", "exp", "log", "log1p", "sqrt", "rsqrt", "reciprocal", "square", "tanh", "sigmoid", "relu",
           "gelu", "erf", "sin", "cos", "sign", "floor", "where", "clip", "astype", "matmul", "sum", "mean", "max",
           "min", "amax", "amin", "prod", "argmax", "argmin", "var", "std", "logsumexp", "softmax", "log_softmax",
           "reshape", "transpose", "swapaxes", "moveaxis", "expand_dims", "squeeze", "broadcast_to", "concatenate",
           "stack", "split", "pad", "take", "full", "zeros", "ones", "full_like", "zeros_like", "ones_like", "arange",
           "tril", "triu", "scan", "stop_gradient"]
