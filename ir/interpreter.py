"""The numpy reference interpreter: the definition of every op's meaning.

An `Interpreter` is a session: globals are initialised from the module seed when it is created and
persist across calls. Every kernel's result is checked against its declared type (element type and
static dims), so a `?` dim that turns out inconsistent at run time is an error at the op's location.
"""
from __future__ import annotations

import numpy as np

from .core import Block, Module, Operation, Region
from .diagnostics import Diagnostics, DiagnosticError, Location

NOWHERE = Location("", 0, 0)
from .dialects.mlc import Global, RuntimeCheck
from .dialects.shapes import fmt_shape
from .registry import TERMINATOR
from .types import ElementType, MemRefType, TensorType, round_to_element


class Interpreter:
    def __init__(self, module: Module, seed: int | None = None):
        self.module = module
        self.functions = module.functions
        seed = module.seed if seed is None else seed
        decls = module.globals
        self.module_globals_types = {name: op.attr("type") for name, op in decls.items()}
        self.globals = Global.initial_values(decls, seed)
        self.depth = 0

    # --- public entry ---------------------------------------------------------------------------------
    def call_public(self, entry: str, args, check: bool = True):
        """Run `@entry` on user arrays: checked against the signature, results as one array or a tuple."""
        entry = entry.lstrip("@")
        func = self.functions.get(entry)
        if func is None:
            names = ", ".join("@" + n for n in self.functions) or "none"
            raise _error(self.module.loc, f"no function '@{entry}' in the module (functions: {names})")
        arrays = check_arguments(func, args) if check else list(args)
        results = self.call(entry, arrays)
        return results[0] if len(results) == 1 else tuple(results)

    # --- execution ---------------------------------------------------------------------------------------
    def call(self, name: str, args) -> list:
        func = self.functions[name]
        self.depth += 1
        if self.depth > 200:
            raise _error(func.loc, "call depth exceeds 200 (unbounded recursion?)")
        try:
            env = dict(zip(func.args, args))
            return self.run_block(func.body, env)
        finally:
            self.depth -= 1

    def run_region(self, region: Region, args) -> list:
        env = self.env
        block = region.blocks[0]
        env.update(zip(block.args, args))
        return self.run_block(block, env)

    def run_block(self, block: Block, env: dict) -> list:
        outer, self.env = getattr(self, "env", None), env
        try:
            for op in block:
                if TERMINATOR in op.opdef.traits:
                    return [env[v] for v in op.operands]
                outs = self.run_op(op, [env[v] for v in op.operands])
                env.update(zip(op.results, outs))
            return []
        finally:
            self.env = outer

    def run_op(self, op: Operation, ins: list) -> list:
        try:
            with np.errstate(all="ignore"):
                out = op.opdef.interpret(ins, op, self)
        except DiagnosticError:
            raise
        except RuntimeCheck as e:
            raise _error(op.loc, str(e), op.name) from None
        except (ValueError, IndexError, TypeError, MemoryError) as e:
            raise _error(op.loc, f"at run time: {e}", op.name) from None
        outs = out if isinstance(out, (list, tuple)) else [out]
        return [_conform(op, i, np.asarray(v)) for i, v in enumerate(outs)]


def _conform(op: Operation, i: int, value: np.ndarray) -> np.ndarray:
    t = op.results[i].type
    if isinstance(t, ElementType):  # a scalar (loop-level IR)
        return value.astype(t.np_dtype)[()] if t.name != "bf16" else round_to_element(value, t)[()]
    if isinstance(t, MemRefType):  # a buffer: the same (mutable) array
        return value
    if not isinstance(t, TensorType):
        return value
    if value.ndim != t.rank or any(d is not None and d != s for d, s in zip(t.shape, value.shape)):
        raise _error(op.loc, f"result {i} has shape {fmt_shape(value.shape)} at run time, but its type is {t}", op.name)
    if value.dtype != t.element.np_dtype or t.element.name == "bf16":
        value = round_to_element(value, t.element)
    return value


def _error(loc: Location, message: str, op_name: str | None = None) -> DiagnosticError:
    d = Diagnostics()
    d.error(loc, message, op_name)
    return DiagnosticError(d.errors)


def arg_names(func) -> list[str]:
    return [a.name_hint or f"arg{i}" for i, a in enumerate(func.args)]


def check_arguments(func, args, kwargs=None) -> list[np.ndarray]:
    """Check user arrays, positional or by argument name, against a function's signature; errors name
    the argument."""
    names = arg_names(func)
    types = func.type.inputs
    if kwargs:
        args = _bind(func, names, args, kwargs)
    if len(args) != len(types):
        raise _error(func.loc, f"@{func.sym_name} takes {len(types)} arguments ({', '.join(names)}), got {len(args)}")
    return [check_argument(name, t, a) for name, t, a in zip(names, types, args)]


def _bind(func, names: list[str], args, kwargs) -> list:
    """Positional and keyword arguments in signature order, as Python binds them."""
    unknown = [k for k in kwargs if k not in names]
    if unknown:
        raise _error(func.loc, f"@{func.sym_name} has no argument '{unknown[0]}' (its arguments: {', '.join(names)})")
    twice = [k for k in kwargs if names.index(k) < len(args)]
    if twice:
        raise _error(func.loc, f"@{func.sym_name} got argument '{twice[0]}' both by position and by name")
    missing = [n for n in names[len(args):] if n not in kwargs]
    if missing:
        raise _error(func.loc, f"@{func.sym_name} is missing argument '{missing[0]}'")
    return [*args, *(kwargs[n] for n in names[len(args):])]


def check_argument(name: str, t: TensorType, value) -> np.ndarray:
    try:
        a = value if isinstance(value, np.ndarray) else np.asarray(value)
    except (ValueError, TypeError):  # (a ragged list, an object numpy cannot hold)
        raise _error(NOWHERE, f"argument '{name}' must be an array ({t}), got a {type(value).__name__} numpy cannot make one of") from None
    if not isinstance(value, np.ndarray) and a.dtype.kind in "iufb":  # Python scalars and lists
        a = a.astype(t.element.np_dtype)
    want = t.element.np_dtype
    if t.element.name == "bf16" and a.dtype.name == "bfloat16":  # (ml_dtypes' bf16: held in float32 here)
        a = a.astype(np.float32)
    if a.dtype != want:
        raise _error(NOWHERE, f"argument '{name}' must have dtype {want} ({t}), got {a.dtype}")
    if a.ndim != t.rank:
        raise _error(NOWHERE, f"argument '{name}' must have rank {t.rank} ({t}), got shape {fmt_shape(a.shape)}")
    for i, (d, s) in enumerate(zip(t.shape, a.shape)):
        if d is not None and d != s:
            raise _error(NOWHERE,
                         f"argument '{name}' must have shape {fmt_shape(t.shape)} ({t}), got {fmt_shape(a.shape)} (dim {i})")
    if t.element.name == "bf16":
        a = round_to_element(a, t.element)
    return a if a.flags.c_contiguous else a.copy(order="C")  # (ascontiguousarray makes 0-d arrays 1-d)
