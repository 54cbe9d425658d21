"""Tracing: Python functions over numpy-like Tensors, recorded as tensor IR (SPEC §6).

    @mlc.jit                          # traced on the first call per signature, compiled, cached
    def layer(x, w, b):
        return mlc.relu(x @ w + b)

A `Trace` builds one func.func. Each array argument becomes a block argument, and each operation on a
`Tensor` appends an op located at the user's line, so the verifier's errors point there. State that
outlives a call (nn parameters and buffers, the dropout generator) is held in `Variable`s. A trace
lifts each variable it meets either to an extra argument (jit: the current values are passed on
every call, so training does not retrace) or to a global (export, compile_train_step); writes to a
variable become extra results or global_stores. Arguments are pytrees: arrays in tuples, lists and
dicts; other leaves (numbers, strings, None) are static, part of the signature.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import os
import sys
from dataclasses import dataclass

import numpy as np

from mlc.ir.attributes import UNIT, DenseAttr, StringAttr, SymbolRefAttr, TypeAttr
from mlc.ir.core import Builder, FuncOp, Module, Value, create_op
from mlc.ir.diagnostics import DiagnosticError, Location, error
from mlc.ir.registry import VerifyError
from mlc.ir.types import TensorType, element_of
from mlc.ir.verifier import verify

_MLC_DIRS = tuple(os.path.dirname(os.path.abspath(p)) + os.sep for p in (
    __file__, sys.modules["mlc.ir"].__file__, sys.modules["mlc.ir.core"].__file__))


def user_location(depth: int = 1) -> Location:
    """Where the user's code called into mlc: the innermost frame outside the mlc package."""
    f = sys._getframe(depth)
    while f is not None and f.f_code.co_filename.startswith(_MLC_DIRS):
        f = f.f_back
    if f is None:
        return Location("<python>", 0, 0)
    line, col = f.f_lineno, 0
    positions = f.f_code.co_positions() if hasattr(f.f_code, "co_positions") else None
    if positions is not None:
        for i, pos in enumerate(positions):
            if i == f.f_lasti // 2:
                line, col = pos[0] or line, (pos[2] or 0)
                break
    return Location(f.f_code.co_filename, line, col + 1, True)


class TracingError(DiagnosticError, TypeError):
    """A Python operation that tracing cannot record (e.g. `if` on a traced value), at the user's line."""


def tracing_error(message: str) -> TracingError:
    return TracingError(error(user_location(2), message).diagnostics)


# --- variables: state that outlives a call ----------------------------------------------------------

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

    def tensor(self) -> "Tensor":
        """This variable as a Tensor of the current trace."""
        return current_trace().tensor(self)

    def __repr__(self):
        return f"{type(self).__name__}({self.data!r})"


class Parameter(Variable):
    """A trainable variable (torch.nn.Parameter)."""
    trainable = True


class Buffer(Variable):
    """A non-trainable variable that the model updates (BatchNorm's running statistics)."""


def _delegate(name):
    def method(self, *args):
        target = self.tensor() if _STACK else self.data
        return getattr(target, name)(*args)
    method.__name__ = name
    return method


for _name in ("__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__",
              "__matmul__", "__rmatmul__", "__pow__", "__neg__", "__getitem__", "reshape", "transpose", "sum",
              "mean", "astype"):
    setattr(Variable, _name, _delegate(_name))
Variable.T = property(lambda self: self.tensor().T if _STACK else self.data.T)


# --- pytrees ---------------------------------------------------------------------------------------------

def is_array(x) -> bool:
    return isinstance(x, (np.ndarray, Tensor, Variable))


def flatten(tree, leaves: list | None = None):
    """(array leaves, a hashable description of the structure with the static leaves in it)."""
    leaves = [] if leaves is None else leaves
    if is_array(tree):
        leaves.append(tree)
        return leaves, "*"
    if isinstance(tree, (tuple, list)):
        return leaves, (type(tree).__name__, tuple(flatten(t, leaves)[1] for t in tree))
    if isinstance(tree, dict):
        return leaves, ("dict", tuple(tree), tuple(flatten(t, leaves)[1] for t in tree.values()))
    if isinstance(tree, (np.generic,)):
        tree = tree.item()
    try:
        hash(tree)
    except TypeError:
        raise TypeError(f"cannot pass a {type(tree).__name__} to a traced function: arguments are arrays, "
                        f"numbers, strings, None, and tuples, lists and dicts of them") from None
    return leaves, ("static", tree)


def unflatten(structure, leaves):
    it = iter(leaves)

    def build(s):
        if s == "*":
            return next(it)
        kind = s[0]
        if kind == "static":
            return s[1]
        if kind == "dict":
            return dict(zip(s[1], (build(c) for c in s[2])))
        items = [build(c) for c in s[1]]
        return tuple(items) if kind == "tuple" else items
    return build(structure)


# --- tensors ---------------------------------------------------------------------------------------------

class Tensor:
    """A traced value: what a traced function sees instead of a numpy array. Operators and methods
    follow numpy (mlc/ops.py); each records an op."""
    __slots__ = ("value", "trace")
    __array_priority__ = 1000
    __array_ufunc__ = None  # numpy defers to our reflected operators

    def __init__(self, value: Value, trace: "Trace"):
        self.value, self.trace = value, trace

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
    __hash__ = object.__hash__

    def __repr__(self):
        return f"Tensor({self.type}, traced)"


# --- traces ---------------------------------------------------------------------------------------------

_STACK: list["Trace"] = []


def current_trace() -> "Trace":
    if not _STACK:
        raise TracingError("no function is being traced")
    return _STACK[-1]


def tensor_type(x) -> TensorType:
    if isinstance(x, Tensor):
        return x.type
    a = x.data if isinstance(x, Variable) else np.asarray(x)
    return TensorType(a.shape, element_of(a.dtype))


@dataclass
class Lifted:
    """An extra argument of a traced function: a variable, or a tensor of the caller's trace."""
    source: object
    tensor: "Tensor"


class Trace:
    """Builds one func.func of `module` from Python code. variables="args": variables become extra
    arguments and their writes extra results; "globals": mlc.globals (with their current values when
    embed_values) and global_stores. A trace with a `parent` may use the parent's tensors: they become
    extra arguments too, which the caller passes."""

    def __init__(self, module: Module, name: str, arg_types, arg_names=None, variables: str = "args",
                 parent: "Trace | None" = None, private: bool = False, embed_values: bool = False,
                 loc: Location | None = None, names: dict | None = None):
        self.module, self.variables, self.parent, self.embed_values = module, variables, parent, embed_values
        self.loc = loc or user_location(2)
        self.func = FuncOp.build(_unique(module, name), list(arg_types), [], arg_names, loc=self.loc, private=private)
        module.append(self.func)
        self.builder = Builder.at_end(self.func.body, module)
        self.args = [Tensor(a, self) for a in self.func.args]
        self.lifted: dict[int, Lifted] = {}     # id(source) -> its tensor here
        self.extra_args: list[Lifted] = []      # in the order of the extra arguments
        self.writes: dict[int, tuple] = {}      # id(variable) -> (variable, tensor)
        self.names = names or {}                # id(variable) -> its name (a state_dict key)
        self.globals: dict[str, Variable] = {}  # globals mode: the global holding each variable
        self.discard_writes = False

    def __enter__(self):
        _STACK.append(self)
        return self

    def __exit__(self, *exc):
        _STACK.pop()

    # --- emitting ops ---
    @contextlib.contextmanager
    def inside(self, block):
        """Emit into block (a region's body) for the duration."""
        saved = self.builder.block, self.builder.anchor
        self.builder.block, self.builder.anchor = block, None
        try:
            yield
        finally:
            self.builder.block, self.builder.anchor = saved

    def emit(self, name: str, operands, result_types=None, regions=(), **attrs):
        """Append op `name` (result types inferred unless given); a type error is reported at the user's line."""
        loc = user_location(2)
        self.builder.loc = loc
        try:
            return self.builder.create(name, [self.value(x) for x in operands], attrs or None, result_types, regions)
        except VerifyError as e:
            raise error(loc, str(e), name) from None

    def tensor(self, x) -> Tensor:
        return x if isinstance(x, Tensor) and x.trace is self else Tensor(self.value(x), self)

    def value(self, x) -> Value:
        """The IR value for a Tensor, Variable, array or Python number."""
        if isinstance(x, Tensor):
            return x.value if x.trace is self else self._lift(x).value
        if isinstance(x, Variable):
            return self._lift(x).value
        if isinstance(x, Value):
            return x
        a = np.asarray(x)
        if a.dtype == np.float64 and not isinstance(x, np.ndarray):
            a = a.astype(np.float32)  # Python floats default to f32, as in torch
        elif a.dtype.kind == "i" and not isinstance(x, np.ndarray):
            a = a.astype(np.int64)
        t = TensorType(a.shape, element_of(a.dtype))
        return self.builder.create("mlc.constant", [], {"value": DenseAttr(a, t)}, [t]).result

    def _lift(self, source) -> Tensor:
        known = self.lifted.get(id(source))
        if known is not None:
            return known.tensor
        if isinstance(source, Variable) and self.variables == "globals":
            tensor = Tensor(self._load_global(source), self)
        else:
            if isinstance(source, Tensor) and not self._is_ancestor(source.trace):
                raise tracing_error("a traced value escaped its function (kept in a Python variable and "
                                    "used in another trace); return it instead")
            name = self.names.get(id(source)) or getattr(source, "name", None)
            arg = self.func.body.add_arg(tensor_type(source), _ssa_name(name or f"v{len(self.extra_args)}"))
            tensor = Tensor(arg, self)
            self.extra_args.append(Lifted(source, tensor))
        self.lifted[id(source)] = Lifted(source, tensor)
        return tensor

    def _is_ancestor(self, trace) -> bool:
        t = self.parent
        while t is not None:
            if t is trace:
                return True
            t = t.parent
        return False

    def global_name(self, var: Variable) -> str:
        """Its name from `names` (a state_dict key) or its own; else var0, var1, ...; made unique."""
        for name, v in self.globals.items():
            if v is var:
                return name
        base = self.names.get(id(var)) or var.name or "var"
        name, i = base, 0
        while name in self.globals or (name == "var" and base == "var"):
            name, i = f"{base}{i}" if base == "var" else f"{base}_{i + 1}", i + 1
        self.globals[name] = var
        return name

    def _load_global(self, var: Variable) -> Value:
        name = self.global_name(var)
        decl = self.module.globals.get(name)
        t = tensor_type(var)
        if decl is None:
            init = DenseAttr(var.data.copy(), t) if self.embed_values else StringAttr("zeros")
            attrs = {"sym_name": StringAttr(name), "type": TypeAttr(t), "init": init}
            if var.trainable:
                attrs["trainable"] = UNIT
            decl = create_op("mlc.global", attributes=attrs, loc=self.loc)
            self.module.body.insert_before(self._first_function(), decl)
            self.builder.symbols[name] = decl
        entry = Builder(self.func.body, self.func.body.first, self.module, self.loc)
        entry.symbols = self.builder.symbols
        return entry.create("mlc.global_load", [], {"global": SymbolRefAttr(name)}, [t]).result

    def _first_function(self):
        return next(op for op in self.module.body if op.name == "func.func")

    def assign(self, var: Variable, value):
        t = self.tensor(value)
        if t.type != tensor_type(var):
            raise tracing_error(f"cannot store a {t.type} into a variable of type {tensor_type(var)}")
        if self.variables == "globals":
            self.value(var)  # declared
            if not self.discard_writes:
                self.emit("mlc.global_store", [t], [], **{"global": SymbolRefAttr(self.global_name(var))})
        elif not self.discard_writes:
            self.writes[id(var)] = (var, t)
        self.lifted[id(var)] = Lifted(var, t)  # later reads see the new value

    def finish(self, outputs) -> list:
        """Return `outputs` (tensors or numbers), then the written variables' new values (args mode)."""
        self.builder.loc = user_location(2)
        values = [self.value(x) for x in outputs] + [t.value for _, t in self.writes.values()]
        self.builder.create("func.return", values, result_types=[])
        self.func.set_type([a.type for a in self.func.args], [v.type for v in values])
        return values


def _ssa_name(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "_." else "_" for c in name)
    return cleaned if cleaned and not cleaned[0].isdigit() else "v" + cleaned


def _unique(module: Module, name: str) -> str:
    name = _ssa_name(name.strip("<>").replace("<lambda>", "lambda")) or "f"
    symbols = module.symbols()
    taken = lambda n: n in symbols or n + "_grad" in symbols  # noqa: E731 (grad adds @name_grad)
    i, unique = 1, name
    while taken(unique):
        unique, i = f"{name}_{i}", i + 1
    return unique


def _arg_names(fn, structure, count: int) -> list[str]:
    """Readable names for the array leaves: the Python parameter names (x, w; params_0, params_1, ...)."""
    try:
        params = [name for name, p in inspect.signature(fn).parameters.items()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    names = []
    for i, s in enumerate(structure[1]):
        base = params[i] if i < len(params) else f"arg{i}"
        names += [base] if s == "*" else [f"{base}_{j}" for j in range(_count(s))]
    return [_ssa_name(n) for n in names][:count]


def _count(structure) -> int:
    if structure == "*":
        return 1
    if structure[0] == "static":
        return 0
    return sum(_count(c) for c in structure[-1])


# --- tracing a Python function ------------------------------------------------------------------------

@dataclass
class Traced:
    """A Python function traced into `module` as `func`: how to call it and read what it returns."""
    module: Module
    func: FuncOp
    in_structure: object
    out_structure: object
    extra: list          # Lifted: variables (and outer tensors) passed after the array arguments
    writes: list         # variables whose new values follow the outputs
    n_outputs: int
    globals: dict        # globals mode: {global name: variable}


def trace_function(fn, args, module: Module | None = None, variables="args", parent=None, private=False,
                   embed_values=False, dynamic_batch=False, name=None, names=None, discard_writes=False) -> Traced:
    leaves, in_structure = flatten(tuple(args))
    types = [tensor_type(x) for x in leaves]
    if dynamic_batch:
        types = [t.with_shape((None,) + t.shape[1:]) if t.rank else t for t in types]
    module = module if module is not None else Module(_ssa_name(getattr(fn, "__name__", type(fn).__name__)))
    t = Trace(module, name or getattr(fn, "__name__", "f"), types, _arg_names(fn, in_structure, len(leaves)),
              variables, parent, private, embed_values, user_location(2), names)
    t.discard_writes = discard_writes
    with t:
        out = fn(*unflatten(in_structure, t.args))
        out_leaves, out_structure = flatten(out)
        for s in _statics(out_structure):
            if not isinstance(s, (int, float, bool, type(None))):
                raise tracing_error(f"a traced function returned a {type(s).__name__}; return arrays "
                                    f"(in tuples, lists or dicts)")
        t.finish(out_leaves)
    return Traced(module, t.func, in_structure, out_structure, t.extra_args, [v for v, _ in t.writes.values()],
                  len(out_leaves), t.globals)


def _statics(structure):
    if structure == "*":
        return
    if structure[0] == "static":
        yield structure[1]
        return
    for c in structure[-1]:
        yield from _statics(c)


def trace(fn, *examples, variables: str = "globals", dynamic_batch: bool = False, embed_values: bool = True) -> Module:
    """The IR of fn traced on example arguments (arrays, or nests of them), as a verified module with
    one public function. Variables (nn parameters) become globals holding their current values."""
    names = fn._variable_names() if hasattr(fn, "_variable_names") else None  # an nn.Module: state_dict keys
    traced = trace_function(fn, examples, variables=variables, embed_values=embed_values, dynamic_batch=dynamic_batch,
                            names=names, name="forward" if names is not None else None)
    return verify(traced.module)


def export(fn, *examples, path=None, loss_fn=None, target=None, dynamic_batch: bool = True) -> Module:
    """fn (an nn.Module or a function) traced on example arguments as a self-contained module: its
    variables become globals holding their current values (parameters `trainable`), the function
    @forward. With loss_fn and an example target, @loss(inputs..., target) = loss_fn(fn(inputs...),
    target) is added (traced in training mode), so `mlc train` can train it. Written atomically to
    `path` when given; `mlc compile`, `mlc run` and `mlc train` take the file."""
    names = fn._variable_names() if hasattr(fn, "_variable_names") else {}
    training = getattr(fn, "training", None)
    try:
        if training is not None:
            fn.eval()
        traced = trace_function(fn, examples, variables="globals", embed_values=True, dynamic_batch=dynamic_batch,
                                name="forward", names=dict(names))
        if loss_fn is not None:
            if target is None:
                raise TypeError("export: loss_fn needs an example target")
            if training is not None:
                fn.train()
            trace_function(lambda *a: loss_fn(fn(*a[:-1]), a[-1]), examples + (target,), traced.module, "globals",
                           embed_values=True, dynamic_batch=dynamic_batch, name="loss", names=dict(names))
            args = traced.module.functions["loss"].args
            for a, n in zip(args, [a.name_hint for a in traced.func.args] + ["target"]):
                a.name_hint = n
    finally:
        if training is not None:
            fn.train(training)
    module = verify(traced.module)
    if path is not None:
        from mlc.runtime.files import write_atomically
        write_atomically(path, str(module).encode())
    return module


# --- jit -----------------------------------------------------------------------------------------------

_DEFAULT_BACKEND = ["cpu"]


def default_backend(backend: str | None = None) -> str:
    """The backend jit compiles for when none is named ("cpu" or "interp"); with an argument, sets it."""
    if backend is not None:
        if backend not in ("cpu", "interp"):
            raise ValueError(f"backend must be 'cpu' or 'interp', got {backend!r}")
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
            self.run = compile_module(traced.module)[name]

    def __call__(self, leaves):
        tr = self.traced
        arrays = [np.asarray(x) for x in leaves] + [e.source.data for e in tr.extra]
        results = self.run(*arrays)
        results = list(results) if isinstance(results, tuple) else [results]
        for var, new in zip(tr.writes, results[tr.n_outputs:]):
            var.data[...] = new
        return unflatten(tr.out_structure, results[: tr.n_outputs])


class jit:
    """fn traced on its first call for each signature (shapes, dtypes, static arguments), compiled for
    `backend` ("cpu", "interp"; default: mlc.default_backend()), cached. Called inside another trace,
    fn is simply traced inline. dynamic_batch=True makes every argument's leading dimension `?`."""

    def __init__(self, fn=None, *, dynamic_batch: bool = False, backend: str | None = None, static_argnums=(), names=None):
        self.fn, self.dynamic_batch, self.backend = fn, dynamic_batch, backend
        self.names = names  # () -> {id(variable): name}: how lifted variables are named in the IR
        self.static_argnums = (static_argnums,) if isinstance(static_argnums, int) else tuple(static_argnums)
        self.cache: dict = {}
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
        args = tuple(_Static(a) if i in self.static_argnums else a for i, a in enumerate(args))
        leaves, structure = flatten(args)
        backend = self.backend or default_backend()
        key = (structure, backend, signature(leaves, self.dynamic_batch))
        compiled = self.cache.get(key)
        if compiled is None:
            compiled = self.cache[key] = Compiled(self._trace(args), backend)
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
        counts = [_count(s) for s in inner.in_structure[1]]
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


from . import ops as _ops  # noqa: E402  (Tensor's operators are defined there)

_ops.install_operators(Tensor)
