"""What traced code computes with: `Tensor`, a traced value with numpy's operators and methods, and
`Variable`, a named array that outlives a call (nn parameters and buffers, the dropout generator).

The functions behind Tensor's operators are defined here with it, each recording an op in the
current trace; mlc/ops.py offers them under numpy's names, on numpy arrays too. Types promote as in
JAX: a Python number takes the other operand's type, an integer meeting a float becomes that float,
and a narrower float the wider one.
"""
from __future__ import annotations

import builtins
import math

import numpy as np

from mlc.ir.core import Value
from mlc.ir.dialects.mlc import END
from mlc.ir.types import TensorType, element_of, f32, i1, i64

from .trace_stack import _STACK, current_trace, tracing_error


# --- variables: state that outlives a call ----------------------------------------------------------

def _forwarded(name: str):
    """A method that acts on the variable's value: its tensor inside a trace, its array outside."""
    def method(self, *args):
        return getattr(self.tensor() if _STACK else self.data, name)(*args)
    method.__name__ = name
    return method


class Variable:
    """A named array that traced code reads (and, for buffers, writes): nn parameters, running
    statistics, the dropout generator. Outside a trace it behaves as its numpy array, `.data`."""

    trainable = False

    def __init__(self, data, name: str | None = None):
        self.data = np.array(data, order="C")  # its own copy: executables write it in place
        self.name = name

    @property
    def shape(self):
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def ndim(self):
        return self.data.ndim

    def numpy(self) -> np.ndarray:
        return self.data

    def __array__(self, dtype=None, copy=None):
        return self.data if dtype is None else self.data.astype(dtype)

    def assign(self, value):
        """Inside a trace: record the new value (an extra result, or a global_store); outside: copy it in."""
        if _STACK:
            _STACK[-1].assign(self, value)
        else:
            self.data[...] = value

    def tensor(self) -> Tensor:
        """This variable as a Tensor of the current trace."""
        return current_trace().tensor(self)

    def __repr__(self):
        return f"{type(self).__name__}({self.data!r})"

    __add__, __radd__, __sub__, __rsub__ = map(_forwarded, ("__add__", "__radd__", "__sub__", "__rsub__"))
    __mul__, __rmul__, __truediv__, __rtruediv__ = map(_forwarded, ("__mul__", "__rmul__", "__truediv__", "__rtruediv__"))
    __matmul__, __rmatmul__, __pow__, __neg__ = map(_forwarded, ("__matmul__", "__rmatmul__", "__pow__", "__neg__"))
    __getitem__, reshape, transpose = map(_forwarded, ("__getitem__", "reshape", "transpose"))
    sum, mean, astype = map(_forwarded, ("sum", "mean", "astype"))

    @property
    def T(self):
        return self.tensor().T if _STACK else self.data.T


class Parameter(Variable):
    """A trainable variable (torch.nn.Parameter)."""
    trainable = True


class Buffer(Variable):
    """A non-trainable variable that the model updates (BatchNorm's running statistics)."""


def tensor_type(x) -> TensorType:
    if isinstance(x, Tensor):
        return x.type
    a = x.data if isinstance(x, Variable) else np.asarray(x)
    return TensorType(a.shape, element_of(a.dtype))


# --- recording ops ------------------------------------------------------------------------------------

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
        return builtins.max((_WEAK[w] for w in weak), key=lambda p: p[0])[1]
    best = builtins.max(strong, key=lambda e: _RANK[e.name])
    if weak and not best.is_float and "float" in weak:
        return f32
    if weak and best.is_bool and "int" in weak:
        return i64
    return best


def cast(x, element) -> Tensor:
    t = as_tensor(x, element)
    return t if t.type.element == element else emit("mlc.cast", t, result_type=TensorType(t.shape, element))


def promoted(*xs, floating=False) -> list[Tensor]:
    """xs as tensors of the element type they promote to (a float one if `floating`)."""
    e = result_element(*xs)
    if floating and not e.is_float:
        e = f32
    return [cast(x, e) for x in xs]


# --- elementwise ----------------------------------------------------------------------------------------

def binary(name):
    def op(a, b):
        return emit(name, *promoted(a, b))
    return op


def unary(name, floating=True):
    def op(x):
        (x,) = promoted(x, floating=floating)
        return emit(name, x)
    return op


add, subtract, multiply, maximum, minimum = (binary(f"mlc.{n}") for n in ("add", "sub", "mul", "maximum", "minimum"))
equal, not_equal, less, less_equal, greater, greater_equal = (binary(f"mlc.{n}") for n in ("eq", "ne", "lt", "le", "gt", "ge"))
logical_and, logical_or = binary("mlc.and"), binary("mlc.or")
# the unary ops that Tensor's operators and methods use (mlc/ops.py lists the whole family)
negative, absolute, square, floor, logical_not = (unary(f"mlc.{n}", floating=False) for n in ("neg", "abs", "square", "floor", "not"))
sqrt = unary("mlc.sqrt")


def divide(a, b):
    return emit("mlc.div", *promoted(a, b, floating=True))


def power(a, b):
    if isinstance(b, (int, float)) and not isinstance(b, bool) and b == 2:
        return square(a)
    return emit("mlc.pow", *promoted(a, b, floating=True))


def floor_divide(a, b):
    return floor(divide(a, b)) if result_element(a, b).is_float else cast(floor(divide(a, b)), result_element(a, b))


def clip(x, a_min=None, a_max=None):
    if isinstance(a_min, (int, float, type(None))) and isinstance(a_max, (int, float, type(None))):
        attrs = {k: float(v) for k, v in (("min", a_min), ("max", a_max)) if v is not None}
        (x,) = promoted(x, floating=True)
        return emit("mlc.clamp", x, **attrs) if attrs else x
    y = x if a_min is None else maximum(x, a_min)
    return y if a_max is None else minimum(y, a_max)


def astype(x, dtype) -> Tensor:
    return cast(x, element_of(np.dtype(dtype)))


def stop_gradient(x):
    """x, as a constant to differentiation (jax.lax.stop_gradient)."""
    return emit("mlc.stop_gradient", x)


def matmul(a, b):
    a, b = promoted(a, b)
    if a.ndim == 1 and b.ndim == 1:
        return reshape(emit("mlc.matmul", reshape(a, (1, -1)), reshape(b, (-1, 1))), ())
    if a.ndim == 1:
        return squeeze(matmul(reshape(a, (1, -1)), b), -2)
    if b.ndim == 1:
        return squeeze(matmul(a, reshape(b, (-1, 1))), -1)
    return emit("mlc.matmul", a, b)


# --- reductions -------------------------------------------------------------------------------------------

def resolve_axes(axis, rank) -> list[int]:
    """numpy's `axis` argument (None for all, an int or several, negative from the end) as sorted axes."""
    if axis is None:
        return list(range(rank))
    chosen = [axis] if isinstance(axis, int) else list(axis)
    for a in chosen:
        if not -rank <= a < rank:
            raise tracing_error(f"axis {a} is out of range for rank {rank}")
    return sorted(a % rank for a in chosen)


def _reduction(name, floating=False):
    def op(x, axis=None, keepdims=False):
        x = as_tensor(x)
        if floating or name == "mlc.reduce_sum" and x.type.element.is_bool:
            (x,) = promoted(x, floating=floating) if floating else [cast(x, i64)]
        return emit(name, x, axes=resolve_axes(axis, x.ndim), keepdims=keepdims)
    return op


sum = _reduction("mlc.reduce_sum")
mean = _reduction("mlc.reduce_mean", floating=True)
max, min, prod = (_reduction(f"mlc.reduce_{n}") for n in ("max", "min", "prod"))


def argmax(x, axis=None, keepdims=False):
    x = as_tensor(x)
    if axis is None:
        x, axis = reshape(x, (-1,)), 0
    return emit("mlc.argmax", x, axes=resolve_axes(axis, x.ndim), keepdims=keepdims)


def argmin(x, axis=None, keepdims=False):
    return argmax(negative(x), axis, keepdims)


def var(x, axis=None, ddof=0, keepdims=False):
    x = as_tensor(x)
    centred = subtract(x, mean(x, axis, keepdims=True))
    v = mean(square(centred), axis, keepdims)
    if ddof:
        n = math.prod(x.shape[a] for a in resolve_axes(axis, x.ndim))
        v = multiply(v, n / (n - ddof))
    return v


def std(x, axis=None, ddof=0, keepdims=False):
    return sqrt(var(x, axis, ddof, keepdims))


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


def reshape(x, shape):
    x = as_tensor(x)
    new = _resolve_shape(x.shape, shape)
    if new == x.shape:
        return x
    return emit("mlc.reshape", x, result_type=TensorType(new, x.type.element))


def transpose(x, axes=None):
    x = as_tensor(x)
    perm = list(reversed(range(x.ndim))) if axes is None else [a % x.ndim for a in axes]
    return x if perm == list(range(x.ndim)) else emit("mlc.transpose", x, perm=perm)


def swapaxes(x, a, b):
    perm = list(range(as_tensor(x).ndim))
    perm[a], perm[b] = perm[b], perm[a]
    return transpose(x, perm)


def squeeze(x, axis=None):
    x = as_tensor(x)
    dropped = [i for i, d in enumerate(x.shape) if d == 1] if axis is None else resolve_axes(axis, x.ndim)
    for a in dropped:
        if x.shape[a] != 1:
            raise tracing_error(f"cannot squeeze axis {a} of size {x.shape[a]}")
    return reshape(x, tuple(d for i, d in enumerate(x.shape) if i not in dropped))


# --- indexing --------------------------------------------------------------------------------------------

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


# --- tensors ---------------------------------------------------------------------------------------------

def _reflected(fn):
    return lambda self, other: fn(other, self)


class Tensor:
    """A traced value: what a traced function sees instead of a numpy array. Its operators and
    methods are numpy's, each recording an op."""
    __slots__ = ("value", "trace")
    __array_priority__ = 1000
    __array_ufunc__ = None  # numpy defers to our reflected operators

    def __init__(self, value: Value, trace):
        self.value, self.trace = value, trace  # trace: the tracing.Trace that recorded value

    @property
    def type(self) -> TensorType:
        return self.value.type

    @property
    def shape(self) -> tuple:
        return self.value.type.shape

    @property
    def ndim(self) -> int:
        return self.value.type.rank

    @property
    def dtype(self) -> np.dtype:
        return self.value.type.element.np_dtype

    @property
    def size(self):
        return None if None in self.shape else int(np.prod(self.shape, dtype=np.int64))

    def __len__(self):
        if not self.shape or self.shape[0] is None:
            raise tracing_error("len() of a traced value needs a static leading dimension")
        return self.shape[0]

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __bool__(self):
        raise tracing_error("a traced value cannot decide Python control flow (`if`, `while`, `and`, `or`, "
                            "`bool()`); use mlc.where(cond, a, b) for a choice made by data, or pass the "
                            "value as a static argument (a Python number) so each value is traced apart")

    def _concrete(self, *_):
        raise tracing_error("a traced value has no concrete value while tracing (float(), int(), "
                            "np.asarray()); keep the computation in mlc operations")

    __float__ = __int__ = __index__ = __complex__ = __array__ = _concrete

    def __repr__(self):
        return f"Tensor({self.type}, traced)"

    # numpy's operators and methods: the functions above
    __add__, __radd__ = add, _reflected(add)
    __sub__, __rsub__ = subtract, _reflected(subtract)
    __mul__, __rmul__ = multiply, _reflected(multiply)
    __truediv__, __rtruediv__ = divide, _reflected(divide)
    __floordiv__, __rfloordiv__ = floor_divide, _reflected(floor_divide)
    __pow__, __rpow__ = power, _reflected(power)
    __matmul__, __rmatmul__ = matmul, _reflected(matmul)
    __and__, __rand__ = logical_and, _reflected(logical_and)
    __or__, __ror__ = logical_or, _reflected(logical_or)
    __eq__, __ne__, __lt__, __le__, __gt__, __ge__ = equal, not_equal, less, less_equal, greater, greater_equal
    __hash__ = object.__hash__  # (defining __eq__ would drop it)
    __neg__, __abs__, __invert__ = negative, absolute, logical_not
    __getitem__ = getitem

    def __pos__(self):
        return self

    def __setitem__(self, key, value):
        raise tracing_error("traced values are immutable: build a new one (mlc.where, mlc.concatenate, mlc.pad)")

    sum, mean, max, min, prod, argmax, argmin, var, std = sum, mean, max, min, prod, argmax, argmin, var, std
    astype, clip, squeeze, swapaxes, detach = astype, clip, squeeze, swapaxes, stop_gradient

    @property
    def T(self):
        return transpose(self)

    def reshape(self, *shape):
        return reshape(self, shape[0] if len(shape) == 1 and not isinstance(shape[0], int) else shape)

    def transpose(self, *axes):
        return transpose(self, (axes[0] if len(axes) == 1 and not isinstance(axes[0], int) else axes) or None)

    def flatten(self):
        return reshape(self, (-1,))
