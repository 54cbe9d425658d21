"""Tracing: Python functions over Tensors (mlc/tensor.py), recorded as tensor IR (SPEC §6).

A `Trace` builds one func.func. Each array argument becomes a block argument, and each operation on a
`Tensor` appends an op located at the user's line, so the verifier's errors point there. A trace
lifts each `Variable` it meets either to an extra argument (jit: the current values are passed on
every call, so training does not retrace) or to a global (export, compile_train_step); writes to a
variable become extra results or global_stores. `trace` and `export` return the module; mlc/jit.py
compiles it.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import numpy as np

from mlc.ir.attributes import UNIT, DenseAttr, StringAttr, SymbolRefAttr, TypeAttr
from mlc.ir.core import Builder, FuncOp, Module, Value, create_op
from mlc.ir.diagnostics import Location, error
from mlc.ir.registry import VerifyError
from mlc.ir.types import TensorType, element_of
from mlc.ir.verifier import verify

from .pytree import count_leaves, flatten, statics, unflatten
from .tensor import Tensor, Variable, tensor_type
from .trace_stack import _STACK, tracing_error, user_location


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
        names += [base] if s == "*" else [f"{base}_{j}" for j in range(count_leaves(s))]
    return [_ssa_name(n) for n in names][:count]


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
        for s in statics(out_structure):
            if not isinstance(s, (int, float, bool, type(None))):
                raise tracing_error(f"a traced function returned a {type(s).__name__}; return arrays "
                                    f"(in tuples, lists or dicts)")
        t.finish(out_leaves)
    return Traced(module, t.func, in_structure, out_structure, t.extra_args, [v for v, _ in t.writes.values()],
                  len(out_leaves), t.globals)


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
