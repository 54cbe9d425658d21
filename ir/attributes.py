"""Attributes: immutable, hashable compile-time values attached to ops.

Every attribute has `.value`, the plain Python (or numpy) value a pass or kernel wants, and prints
back to the syntax it was parsed from.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .types import ElementType, TensorType, Type, f64, i64


class Attribute:
    __slots__ = ()


@dataclass(frozen=True, slots=True)
class IntAttr(Attribute):
    value: int
    type: ElementType = i64

    def __str__(self):
        return str(self.value) if self.type == i64 else f"{self.value} : {self.type}"


@dataclass(frozen=True, slots=True)
class FloatAttr(Attribute):
    value: float
    type: ElementType = f64

    def __str__(self):
        text = format_float(self.value, self.type)
        return text if self.type == f64 else f"{text} : {self.type}"


@dataclass(frozen=True, slots=True)
class BoolAttr(Attribute):
    value: bool

    def __str__(self):
        return "true" if self.value else "false"


@dataclass(frozen=True, slots=True)
class StringAttr(Attribute):
    value: str

    def __str__(self):
        return quote(self.value)


@dataclass(frozen=True, slots=True)
class UnitAttr(Attribute):
    @property
    def value(self):
        return True

    def __str__(self):
        return "unit"


@dataclass(frozen=True, slots=True)
class ArrayAttr(Attribute):
    elements: tuple

    @property
    def value(self):
        return tuple(e.value for e in self.elements)

    def __str__(self):
        return "[" + ", ".join(map(str, self.elements)) + "]"


@dataclass(frozen=True, slots=True)
class DenseArrayAttr(Attribute):
    """`array<i64: 1, 2>`"""
    element: ElementType
    value: tuple

    def __str__(self):
        if not self.value:
            return f"array<{self.element}>"
        return f"array<{self.element}: " + ", ".join(map(str, self.value)) + ">"


@dataclass(frozen=True, slots=True)
class TypeAttr(Attribute):
    value: Type

    def __str__(self):
        return str(self.value)


@dataclass(frozen=True, slots=True)
class SymbolRefAttr(Attribute):
    value: str

    def __str__(self):
        return "@" + self.value


@dataclass(frozen=True, slots=True)
class DictAttr(Attribute):
    items: tuple  # ((name, Attribute), ...)

    @property
    def value(self):
        return dict(self.items)

    def __str__(self):
        return format_attr_dict(dict(self.items))


@dataclass(frozen=True, eq=False, slots=True)
class DenseAttr(Attribute):
    """`dense<...> : tensor<...>`: a constant tensor. Compared and hashed by type and bytes."""
    value: np.ndarray
    type: TensorType
    _key: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        self.value.setflags(write=False)
        object.__setattr__(self, "_key", (self.type, self.value.tobytes()))

    def __eq__(self, other):
        return isinstance(other, DenseAttr) and self._key == other._key

    def __hash__(self):
        return hash(self._key)

    def __str__(self):
        return f"dense<{format_dense(self.value, self.type.element)}> : {self.type}"


UNIT = UnitAttr()


def quote(s: str) -> str:
    """A string literal (MLIR escapes; other control characters as \\XX)."""
    out = s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return '"' + "".join(c if c.isprintable() or ord(c) > 0xFF else f"\\{ord(c):02X}" for c in out) + '"'


def format_float(v: float, element: ElementType = f64) -> str:
    """Shortest text that reads back to the same value of `element`; non-finite values as hex bits."""
    v = float(v)
    if not math.isfinite(v):
        bits = {"f16": (np.float16, np.uint16, 4), "f64": (np.float64, np.uint64, 16)}
        ftype, itype, width = bits.get(element.name, (np.float32, np.uint32, 8))
        return "0x" + format(int(np.array(v, ftype).view(itype)), f"0{width}X")
    scalar = {"f16": np.float16, "f64": np.float64}.get(element.name, np.float32)(v)
    text = np.format_float_scientific(scalar, unique=True, trim="0") if (v != 0 and (abs(v) >= 1e16 or abs(v) < 1e-4)) \
        else np.format_float_positional(scalar, unique=True, trim="0")
    mantissa, _, exponent = text.partition("e")
    if "." not in mantissa:
        mantissa += ".0"
    elif mantissa.endswith("."):
        mantissa += "0"
    return mantissa + ("e" + exponent if exponent else "")


HEX_ABOVE = 256  # elements: larger constants print as the hex of their little-endian bytes (exact, compact)


def format_dense(array: np.ndarray, element: ElementType) -> str:
    flat = array.reshape(-1)
    if flat.size > HEX_ABOVE and not np.all(flat == flat[0]):
        if element.name == "bf16":  # bf16 values are f32 with their low 16 bits zero: two bytes each
            data = (np.ascontiguousarray(flat, np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
        else:
            data = np.ascontiguousarray(flat).astype(flat.dtype.newbyteorder("<")).tobytes()
        return '"0x' + data.hex().upper() + '"'

    if element.is_bool:
        fmt = lambda x: "true" if x else "false"  # noqa: E731
    elif element.is_float:
        fmt = lambda x: format_float(x, element)  # noqa: E731
    else:
        fmt = lambda x: str(int(x))  # noqa: E731
    if array.ndim == 0 or (flat.size > 1 and np.all(flat == flat[0])):  # a splat
        return fmt(flat[0])

    def nested(a):
        if a.ndim == 1:
            return "[" + ", ".join(fmt(x) for x in a) + "]"
        return "[" + ", ".join(nested(x) for x in a) + "]"
    return nested(array)


def format_attr_dict(attrs: dict, skip=()) -> str:
    parts = [name if isinstance(a, UnitAttr) else f"{name} = {a}"
             for name, a in attrs.items() if name not in skip]
    return "{" + ", ".join(parts) + "}" if parts else ""


def to_attr(value) -> Attribute:
    """Wrap a Python value as the natural attribute (for builders and tests)."""
    if isinstance(value, Attribute):
        return value
    if isinstance(value, bool):
        return BoolAttr(value)
    if isinstance(value, int):
        return IntAttr(value)
    if isinstance(value, float):
        return FloatAttr(value)
    if isinstance(value, str):
        return StringAttr(value)
    if isinstance(value, Type):
        return TypeAttr(value)
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return ArrayAttr(tuple(IntAttr(v) for v in value))
        return ArrayAttr(tuple(to_attr(v) for v in value))
    raise TypeError(f"cannot make an attribute of {value!r}")


__all__ = ["Attribute", "IntAttr", "FloatAttr", "BoolAttr", "StringAttr", "UnitAttr", "ArrayAttr",
           "DenseArrayAttr", "TypeAttr", "SymbolRefAttr", "DictAttr", "DenseAttr", "UNIT", "to_attr",
           "format_float", "format_attr_dict", "quote"]
