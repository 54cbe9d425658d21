"""Tensor functions under numpy's names (`mlc.exp`, `mlc.where`, `mlc.concatenate`, ...), and
`mlc.scan`.

Inside a trace each call records mlc ops; outside one, a call on numpy arrays runs at once on the
reference interpreter. The functions behind Tensor's operators and methods (add, matmul, sum,
reshape, ...) are defined with it, in mlc/tensor.py, as are the type promotion rules.
"""
from __future__ import annotations

import functools

import numpy as np

from mlc.ir.attributes import UNIT
from mlc.ir.core import Block, Region
from mlc.ir.dialects.mlc import END, UNARY
from mlc.ir.types import TensorType, element_of

from . import tensor
from .pytree import flatten, unflatten
from .tensor import Tensor, as_tensor, cast, emit, promoted, resolve_axes
from .trace_stack import _STACK, current_trace, tracing_error
from .tracing import trace_function


def traceable(fn):
    """Run fn on numpy arrays when called outside a trace (traced, then interpreted)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _STACK:
            return fn(*args, **kwargs)
        from mlc.ir.interpreter import Interpreter
        traced = trace_function(lambda: fn(*args, **kwargs), (), name=fn.__name__)
        results = Interpreter(traced.module).call(traced.func.sym_name, [])
        return unflatten(traced.out_structure, results[: traced.n_outputs])
    return wrapper


def _unary(name, floating=True):
    return traceable(tensor.unary(name, floating))


# Tensor's operators and methods are these (mlc/tensor.py); here they also take numpy arrays.
add, subtract, multiply, divide, floor_divide, power, maximum, minimum = map(traceable, (
    tensor.add, tensor.subtract, tensor.multiply, tensor.divide, tensor.floor_divide, tensor.power, tensor.maximum,
    tensor.minimum))
equal, not_equal, less, less_equal, greater, greater_equal, logical_and, logical_or = map(traceable, (
    tensor.equal, tensor.not_equal, tensor.less, tensor.less_equal, tensor.greater, tensor.greater_equal,
    tensor.logical_and, tensor.logical_or))
matmul, clip, astype, stop_gradient = map(traceable, (tensor.matmul, tensor.clip, tensor.astype, tensor.stop_gradient))
sum, mean, max, min, prod, argmax, argmin, var, std = map(traceable, (
    tensor.sum, tensor.mean, tensor.max, tensor.min, tensor.prod, tensor.argmax, tensor.argmin, tensor.var, tensor.std))
amax, amin = max, min
reshape, transpose, swapaxes, squeeze, take = map(traceable, (
    tensor.reshape, tensor.transpose, tensor.swapaxes, tensor.squeeze, tensor.take))

exp, log, log1p, sqrt, rsqrt, reciprocal, tanh, sigmoid, erf, sin, cos = (
    _unary(f"mlc.{n}") for n in ("exp", "log", "log1p", "sqrt", "rsqrt", "reciprocal", "tanh", "sigmoid", "erf", "sin", "cos"))
negative, absolute, square, sign, floor, relu = (_unary(f"mlc.{n}", floating=False) for n in ("neg", "abs", "square", "sign", "floor", "relu"))
logical_not = _unary("mlc.not", floating=False)
abs = absolute


@traceable
def gelu(x, approximate: str = "none"):
    (x,) = promoted(x, floating=True)
    return emit("mlc.gelu", x, approximate=approximate)


@traceable
def where(condition, a, b):
    c = as_tensor(condition)
    if not c.type.element.is_bool:
        c = not_equal(c, 0)
    return emit("mlc.select", c, *promoted(a, b))


@traceable
def logsumexp(x, axis=None, keepdims=False):
    m = max(x, axis, keepdims=True)
    s = add(log(sum(exp(subtract(x, m)), axis, keepdims=True)), m)
    return s if keepdims else squeeze(s, resolve_axes(axis, as_tensor(x).ndim))


@traceable
def softmax(x, axis=-1):
    return emit("mlc.softmax", *promoted(x, floating=True), axis=axis)


@traceable
def log_softmax(x, axis=-1):
    return emit("mlc.log_softmax", *promoted(x, floating=True), axis=axis)


# --- shapes ----------------------------------------------------------------------------------------------

@traceable
def moveaxis(x, source, destination):
    perm = [i for i in range(as_tensor(x).ndim) if i != source % x.ndim]
    perm.insert(destination % x.ndim, source % x.ndim)
    return transpose(x, perm)


@traceable
def expand_dims(x, axis):
    x = as_tensor(x)
    rank = x.ndim + (1 if isinstance(axis, int) else len(axis))
    axes = resolve_axes(axis, rank)
    dims = iter(x.shape)
    return reshape(x, tuple(1 if i in axes else next(dims) for i in range(rank)))


@traceable
def broadcast_to(x, shape):
    x = as_tensor(x)
    shape = tuple(shape)
    return x if x.shape == shape else emit("mlc.broadcast_to", x, result_type=TensorType(shape, x.type.element))


@traceable
def concatenate(arrays, axis=0):
    arrays = promoted(*arrays)
    return arrays[0] if len(arrays) == 1 else emit("mlc.concat", *arrays, axis=axis % arrays[0].ndim)


@traceable
def stack(arrays, axis=0):
    arrays = promoted(*arrays)
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


__all__ = ["add", "subtract", "multiply", "divide", "power", "floor_divide", "maximum", "minimum", "equal", "not_equal",
           "less", "less_equal", "greater", "greater_equal", "logical_and", "logical_or", "logical_not", "negative",
           "absolute", "abs", "exp", "log", "log1p", "sqrt", "rsqrt", "reciprocal", "square", "tanh", "sigmoid", "relu",
           "gelu", "erf", "sin", "cos", "sign", "floor", "where", "clip", "astype", "matmul", "sum", "mean", "max",
           "min", "amax", "amin", "prod", "argmax", "argmin", "var", "std", "logsumexp", "softmax", "log_softmax",
           "reshape", "transpose", "swapaxes", "moveaxis", "expand_dims", "squeeze", "broadcast_to", "concatenate",
           "stack", "split", "pad", "take", "full", "zeros", "ones", "full_like", "zeros_like", "ones_like", "arange",
           "tril", "triu", "scan", "stop_gradient"]


# A unary row of the elementwise table (ir/dialects/mlc.py) without a function above gets one under its
# own name, so that a new row is usable from Python at once.
_NUMPY_NAMES = {"neg": "negative", "abs": "absolute", "not": "logical_not"}
for _op, _row in UNARY.items():
    _name = _NUMPY_NAMES.get(_op, _op)
    if _name not in globals():
        globals()[_name] = _unary(f"mlc.{_op}", floating=_row.kind == "float")
        __all__.append(_name)
