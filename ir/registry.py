"""The dialect registry: every op is declared once, as a subclass of `OpDef`.

A declaration holds the op's syntax (operand/result counts, attributes with kinds and defaults,
regions, pretty-form extras), traits, type inference, extra verification, the interpreter kernel and
folding hooks. Everything else — parser, printer, verifier, interpreter, passes — asks the registry.

    class Exp(OpDef):
        name = "mlc.exp"
        operands = 1
        traits = {PURE, ELEMENTWISE}
        def infer(op, ctx): ...          # -> result types; raise VerifyError(message) if ill-typed
        def interpret(ins, op, ctx): ... # numpy arrays in, array (or list of arrays) out
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .attributes import (ArrayAttr, BoolAttr, DenseArrayAttr, DenseAttr, FloatAttr, IntAttr, StringAttr,
                         SymbolRefAttr, TypeAttr, UnitAttr)

# Traits
PURE = "pure"                  # no side effects: CSE-able, dead if unused
READS = "reads"                # reads state (global_load): dead if unused, but not CSE-able
WRITES = "writes"              # writes an operand's memory (an op with a region: not only its region's effects)
ELEMENTWISE = "elementwise"
BROADCASTING = "broadcasting"
COMMUTATIVE = "commutative"
TERMINATOR = "terminator"
HAS_REGION = "has_region"
SYMBOL = "symbol"              # defines a symbol (func.func, mlc.global)
PLACED = "placed"              # verify() checks where the op stands (inside a gpu.launch): not memoised
USES_SYMBOLS = "uses_symbols"  # verification depends on the symbol table (not cached)


class VerifyError(Exception):
    """Raised by `infer`/`verify` hooks; the verifier turns it into a located diagnostic."""


@dataclass(frozen=True)
class Attr:
    """An attribute's declaration: its kind, default, whether it is required, allowed string values."""
    kind: str
    default: Any = None
    required: bool = False
    choices: tuple = ()

    def accepts(self, a) -> bool:
        ok = {
            "int": lambda: isinstance(a, IntAttr),
            "float": lambda: isinstance(a, (FloatAttr, IntAttr)),
            "str": lambda: isinstance(a, StringAttr) and (not self.choices or a.value in self.choices),
            "bool": lambda: isinstance(a, (BoolAttr, UnitAttr)),
            "ints": lambda: (isinstance(a, DenseArrayAttr) and a.element.is_int)
            or (isinstance(a, ArrayAttr) and all(isinstance(e, IntAttr) for e in a.elements)),
            "type": lambda: isinstance(a, TypeAttr),
            "symbol": lambda: isinstance(a, SymbolRefAttr),
            "dense": lambda: isinstance(a, DenseAttr),
            "init": lambda: isinstance(a, DenseAttr) or (isinstance(a, StringAttr) and a.value in INITIALISERS),
            "any": lambda: True,
        }[self.kind]
        return ok()

    def describe(self) -> str:
        if self.kind == "str" and self.choices:
            return "one of " + ", ".join(f'"{c}"' for c in self.choices)
        if self.kind == "init":
            return "an initialiser (" + ", ".join(f'"{c}"' for c in INITIALISERS) + " or dense<...>)"
        return {"int": "an integer", "float": "a number", "str": "a string", "bool": "a boolean",
                "ints": "an array of integers", "type": "a type", "symbol": "a symbol reference (@name)",
                "dense": "a dense<...> constant", "any": "an attribute"}[self.kind]


INITIALISERS = ("zeros", "ones", "uniform", "normal", "glorot_uniform", "glorot_normal", "he_uniform", "he_normal", "panels", "winograd")

_REGISTRY: dict[str, type["OpDef"]] = {}


class Probe:
    """An op seen with other operand types, so that an op's type inference can be reused: by a scalar
    twin on tensor types, a gradient's shape rule, the profiler's sampled sizes."""

    def __init__(self, op, operand_types):
        self.operand_types, self.results, self._op = list(operand_types), [], op

    def attr(self, name, default=None):
        return self._op.attr(name, default)


class OpDef:
    """Base of every op declaration. Subclasses with a `name` register themselves."""
    name: str = ""
    summary: str = ""
    operands: int | tuple = 0        # a count, or (min, max) with max None for unbounded
    results: int | None = 1          # None: decided by inference / the signature
    attrs: dict[str, Attr] = {}
    regions: int = 0
    traits: frozenset = frozenset()
    pretty_symbol: str | None = None  # attribute written as `@name` first in the pretty form
    pretty_value: str | None = None   # attribute written as the first pretty item (constant's dense)

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        cls.traits = frozenset(cls.traits)
        if cls.regions:
            cls.traits |= {HAS_REGION}
        if cls.__dict__.get("name"):  # families and helpers without their own name stay unregistered
            _REGISTRY[cls.name] = cls

    @classmethod
    def infer(cls, op, ctx):
        """Result types from operand types and attributes (none for ops without results)."""
        if cls.results == 0:
            return []
        raise VerifyError("cannot infer the result types; write the signature")

    @staticmethod
    def verify(op, ctx):
        """Checks beyond inference (regions, symbols); raise VerifyError."""

    @staticmethod
    def interpret(ins, op, ctx):
        raise NotImplementedError(f"no interpreter kernel for {op.name}")

    vjp = None  # reverse-mode rule: vjp(d, op, g) -> a cotangent (or None) per operand; see passes/grad.py
    decompose = None  # decompose(d, op) -> its results built from simpler ops (passes/decompose.py);
    #                   grad and the backends use it where they have no rule of their own

    @staticmethod
    def fold(op, consts):
        """Algebraic simplification: return replacement values/arrays for the results, or None.
        `consts[i]` is the numpy value of operand i when it is a constant, else None."""
        return None

    @classmethod
    def operand_range(cls) -> tuple:
        return (cls.operands, cls.operands) if isinstance(cls.operands, int) else cls.operands

    @classmethod
    def short_form_lists_operands(cls, n_operands: int) -> bool:
        """Whether `op %a, %b : T, U` (no results) lists operand types rather than one shared type: for
        ops without results, and for ops whose results vary (e.g. loop.for) used with none."""
        return cls.results == 0 or (cls.results is None and n_operands > 1)


class Terminator(OpDef):
    """Ends the region of a `parent` op; subclasses check the values it hands back."""
    operands = (0, None)
    results = 0
    traits = {TERMINATOR}
    parent: str | tuple = ""  # the op (or ops) whose region it ends

    @classmethod
    def verify(cls, op, ctx):
        owner = op.parent_op
        parents = cls.parent if isinstance(cls.parent, tuple) else (cls.parent,)
        if owner is None or owner.name not in parents or op.next is not None:
            raise VerifyError(f"must be the last op of a {' or '.join(parents)} region")
        cls.check_values(op, owner)

    @staticmethod
    def check_values(op, owner):
        pass


def lookup_op(name: str) -> type[OpDef] | None:
    return _REGISTRY.get(name)


def all_ops() -> dict[str, type[OpDef]]:
    return dict(_REGISTRY)


def load_dialects():
    """Import the dialect modules so their ops register (idempotent)."""
    from .dialects import collectives, func, gpu, loops, mlc  # noqa: F401
