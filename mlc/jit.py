"""Compiling traced functions: `jit` traces a function once per signature and compiles it; `grad` and
`value_and_grad` differentiate one (reverse mode, by the `grad` pass).

    @mlc.jit                          # traced on the first call per signature, compiled, cached
    def layer(x, w, b):
        return mlc.relu(x @ w + b)

Inside another trace both are simply traced inline.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from mlc.ir.attributes import SymbolRefAttr
from mlc.ir.core import Module
from mlc.ir.verifier import verify

from .pytree import count_leaves, flatten, unflatten
from .tensor import Tensor
from .trace_stack import _STACK, current_trace, tracing_error
from .tracing import Traced, trace_function

_DEFAULT_BACKEND = ["cpu"]


def default_backend(backend: str | None = None) -> str:
    """The backend jit compiles for when none is named ("cpu", "cuda" or "interp"); with an argument, sets it."""
    if backend is not None:
        if backend not in ("cpu", "cuda", "interp"):
            raise ValueError(f"backend must be 'cpu', 'cuda' or 'interp', got {backend!r}")
        _DEFAULT_BACKEND[0] = backend
    return _DEFAULT_BACKEND[0]


class Compiled:
    """One traced signature, compiled; called with the flat array arguments."""

    def __init__(self, traced: Traced, backend: str):
        self.traced, self.backend = traced, backend
        verify(traced.module)
        name = traced.func.sym_name
        if backend == "interp":
            from mlc.ir.interpreter import Interpreter
            interp = Interpreter(traced.module)
            self.run = lambda *arrays: interp.call_public(name, arrays)
        else:
            from .api import compile as compile_module
            self.run = compile_module(traced.module, target=backend)[name]
        self.variables = [e.source for e in traced.extra]  # (outside any trace: variables, read on each call)
        self.plain = traced.out_structure == "*" and not traced.writes  # one array out, nothing written

    def __call__(self, leaves):
        return self.call_arrays([np.asarray(x) for x in leaves])

    def call_arrays(self, arrays):
        """Run on the array leaves (numpy arrays), the variables' current values passed after them."""
        tr = self.traced
        results = self.run(*arrays, *[v.data for v in self.variables])
        if self.plain:
            return results
        results = list(results) if isinstance(results, tuple) else [results]
        for var, new in zip(tr.writes, results[tr.n_outputs:]):
            var.data[...] = new
        return unflatten(tr.out_structure, results[: tr.n_outputs])


class jit:
    """fn traced on its first call for each signature (shapes, dtypes, static arguments), compiled for
    `backend` ("cpu", "cuda", "interp"; default: mlc.default_backend()), cached. Called inside another trace,
    fn is simply traced inline. dynamic_batch=True makes every argument's leading dimension `?`."""

    def __init__(self, fn=None, *, dynamic_batch: bool = False, backend: str | None = None, static_argnums=(), names=None):
        self.fn, self.dynamic_batch, self.backend = fn, dynamic_batch, backend
        self.names = names  # () -> {id(variable): name}: how lifted variables are named in the IR
        self.static_argnums = (static_argnums,) if isinstance(static_argnums, int) else tuple(static_argnums)
        self.cache: dict = {}       # (structure, backend, signature) -> Compiled
        self.fast_cache: dict = {}  # (backend, (type, shape, dtype) per argument) -> Compiled, for calls on numpy arrays
        if fn is not None:
            functools.update_wrapper(self, fn)

    def __call__(self, *args, **kwargs):
        if self.fn is None:  # @jit(dynamic_batch=True)
            self.fn = args[0]
            functools.update_wrapper(self, self.fn)
            return self
        if kwargs:
            raise TypeError(f"{self.__name__}: pass arguments by position to a jit function")
        if _STACK:
            return self.fn(*args)
        backend = self.backend or _DEFAULT_BACKEND[0]
        try:  # numpy arrays only: a dict lookup on their types, shapes and dtypes
            fast_key = (backend, *[(type(a), a.shape, a.dtype) for a in args])
            compiled = self.fast_cache.get(fast_key)
        except (AttributeError, TypeError):
            fast_key = compiled = None
        if compiled is not None:
            return compiled.call_arrays(args)
        args = tuple(_Static(a) if i in self.static_argnums else a for i, a in enumerate(args))
        leaves, structure = flatten(args)
        key = (structure, backend, signature(leaves, self.dynamic_batch))
        compiled = self.cache.get(key)
        if compiled is None:
            compiled = self.cache[key] = Compiled(self._trace(args), backend)
        if fast_key is not None and not self.static_argnums and all(type(a) is np.ndarray for a in args):
            if len(self.fast_cache) >= 256:  # (dynamic_batch: one entry per batch size seen)
                self.fast_cache.clear()
            self.fast_cache[fast_key] = compiled
        return compiled(leaves)

    def _trace(self, args) -> Traced:
        @functools.wraps(self.fn)  # (the IR's argument names come from fn's signature)
        def unwrapped(*a):
            return self.fn(*(x.value if isinstance(x, _Static) else x for x in a))
        return trace_function(unwrapped, args, dynamic_batch=self.dynamic_batch, name=self.__name__,
                              names=self.names() if self.names else None)

    def lower(self, *args) -> Module:
        """The traced module for these arguments (what the first call compiles)."""
        return verify(self._trace(args).module)


def signature(leaves, dynamic_batch: bool) -> tuple:
    """What a compiled function is specialised on: each array's shape (less the batch dim when it is
    dynamic) and dtype."""
    def one(x):
        shape = np.shape(x)
        return (shape[1:] if dynamic_batch and shape else shape), np.asarray(x).dtype.str
    return tuple(one(x) for x in leaves)


@dataclass(frozen=True)
class _Static:
    value: object

    def __hash__(self):
        return hash((type(self.value), _hashable(self.value)))


def _hashable(v):
    if isinstance(v, np.ndarray):
        return (v.shape, v.dtype.str, v.tobytes())
    try:
        hash(v)
        return v
    except TypeError:
        return repr(v)


# --- reverse-mode autodiff ------------------------------------------------------------------------------

def grad(fn, argnums=0):
    """The gradient of a scalar-valued fn with respect to argument(s) `argnums` (an int, or a tuple for
    a tuple of gradients); each gradient has its argument's structure. Nestable: grad(grad(f))."""
    return _GradFunction(fn, argnums, with_value=False)


def value_and_grad(fn, argnums=0):
    """fn's value and its gradient (as grad), as a pair."""
    return _GradFunction(fn, argnums, with_value=True)


class _GradFunction:
    def __init__(self, fn, argnums, with_value):
        self.fn, self.argnums, self.with_value = fn, argnums, with_value
        functools.update_wrapper(self, fn)
        self.__name__ = f"{'value_and_grad' if with_value else 'grad'}_of_{getattr(fn, '__name__', 'f')}"
        self.compiled = jit(self._traced, backend=None)
        self.compiled.__name__ = self.__name__

    def __call__(self, *args):
        return self._traced(*args) if _STACK else self.compiled(*args)

    def _traced(self, *args):
        outer = current_trace()
        argnums = (self.argnums,) if isinstance(self.argnums, int) else tuple(self.argnums)
        for i in argnums:
            if not 0 <= i < len(args):
                raise tracing_error(f"argnums {i} is out of range for {len(args)} arguments")
        # The function is traced into a private function of its own, which `grad` differentiates.
        inner = trace_function(self.fn, args, outer.module, outer.variables, parent=outer, private=True,
                               name=getattr(self.fn, "__name__", "f"), names=outer.names, discard_writes=True)
        ret = inner.func.type.results
        if inner.n_outputs != 1 or len(ret) != 1 or ret[0].rank != 0 or not ret[0].element.is_float:
            raise tracing_error(f"grad needs a function returning one floating-point scalar, but "
                                f"{getattr(self.fn, '__name__', 'it')} returns ({', '.join(map(str, ret))})")
        counts = [count_leaves(s) for s in inner.in_structure[1]]
        starts = np.cumsum([0] + counts)
        wrt = [inner.func.args[j].name_hint for i in argnums for j in range(starts[i], starts[i + 1])]
        from mlc.passes.grad import differentiate
        g = differentiate(outer.module, inner.func, "[" + ",".join(wrt) + "]")
        leaves, _ = flatten(tuple(args))
        operands = leaves + [e.source for e in inner.extra]
        call = outer.emit("func.call", operands, list(g.type.results), callee=SymbolRefAttr(g.sym_name))
        value, *grads = [Tensor(r, outer) for r in call.results]
        trees, k = [], 0
        for i in argnums:
            trees.append(unflatten(inner.in_structure[1][i], grads[k: k + counts[i]]))
            k += counts[i]
        gradient = trees[0] if isinstance(self.argnums, int) else tuple(trees)
        return (value, gradient) if self.with_value else gradient
