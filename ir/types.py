"""IR types: element types, tensors (static or `?` dims), and room for lower-level types.

Types are immutable and interned through `parse_type`, so equality is cheap and the parser can turn a
whole `tensor<...>` token into a type with one dictionary lookup.
"""
from __future__ import annotations

import math

import re
from dataclasses import dataclass

import numpy as np

DYNAMIC = None  # a `?` dimension


class Type:
    __slots__ = ()


@dataclass(frozen=True, slots=True)
class ElementType(Type):
    name: str

    @property
    def is_float(self) -> bool:
        return self.name in FLOAT_NAMES

    @property
    def is_int(self) -> bool:
        return self.name in INT_NAMES

    @property
    def is_unsigned(self) -> bool:
        return self.name.startswith("ui")

    @property
    def is_bool(self) -> bool:
        return self.name == "i1"

    @property
    def bits(self) -> int:
        return BITS[self.name]

    @property
    def np_dtype(self) -> np.dtype:
        """The numpy dtype holding values of this type (bf16 is held in float32, rounded; the 8-, 4-
        and 2-bit formats in ml_dtypes' types, imported when first needed: it takes a second)."""
        dtype = NP_DTYPES.get(self.name)
        if dtype is None:
            import ml_dtypes
            dtype = NP_DTYPES[self.name] = np.dtype(getattr(ml_dtypes, ML_DTYPES[self.name]))
        return dtype

    def __str__(self) -> str:
        return self.name


# MLIR's names. The narrow formats (8-bit floats, 4- and 2-bit numbers) are for storage and casts:
# the interpreter runs them, the compiled backends refuse them.
ML_DTYPES = {"f8E4M3FN": "float8_e4m3fn", "f8E4M3FNUZ": "float8_e4m3fnuz", "f8E5M2": "float8_e5m2",
             "f8E5M2FNUZ": "float8_e5m2fnuz", "f8E8M0FNU": "float8_e8m0fnu", "f4E2M1FN": "float4_e2m1fn",
             "i4": "int4", "ui4": "uint4", "i2": "int2", "ui2": "uint2"}
FLOAT_NAMES = ("f16", "bf16", "f32", "f64", "f8E4M3FN", "f8E4M3FNUZ", "f8E5M2", "f8E5M2FNUZ", "f8E8M0FNU", "f4E2M1FN")
INT_NAMES = ("i1", "i8", "i32", "i64", "i16", "ui8", "ui16", "ui32", "ui64", "i4", "ui4", "i2", "ui2")
BITS = {"f16": 16, "bf16": 16, "f32": 32, "f64": 64, "i1": 1, "i8": 8, "i32": 32, "i64": 64, "index": 64, "i16": 16,
        "ui8": 8, "ui16": 16, "ui32": 32, "ui64": 64, "i4": 4, "ui4": 4, "i2": 2, "ui2": 2, "f4E2M1FN": 4,
        **{n: 8 for n in FLOAT_NAMES if n.startswith("f8")}}
NP_DTYPES = {
    "f16": np.dtype(np.float16), "bf16": np.dtype(np.float32), "f32": np.dtype(np.float32),
    "f64": np.dtype(np.float64), "i1": np.dtype(np.bool_), "i8": np.dtype(np.int8),
    "i32": np.dtype(np.int32), "i64": np.dtype(np.int64), "index": np.dtype(np.int64),
    "i16": np.dtype(np.int16), "ui8": np.dtype(np.uint8), "ui16": np.dtype(np.uint16), "ui32": np.dtype(np.uint32),
    "ui64": np.dtype(np.uint64),
}
NATIVE = ("f16", "bf16", "f32", "f64", "i1", "i8", "i32", "i64", "index")  # what the compiled backends take

f16, bf16, f32, f64 = (ElementType(n) for n in FLOAT_NAMES[:4])
i1, i8, i32, i64 = (ElementType(n) for n in INT_NAMES[:4])
index = ElementType("index")
ELEMENT_TYPES = {n: ElementType(n) for n in FLOAT_NAMES + INT_NAMES + ("index",)}
ELEMENT_TYPES.update({t.name: t for t in (f16, bf16, f32, f64, i1, i8, i32, i64, index)})


def int_range(element: ElementType) -> tuple[int, int]:
    """The smallest and largest value of an integer type."""
    if element.is_bool:
        return 0, 1
    if element.is_unsigned:
        return 0, (1 << element.bits) - 1
    return -(1 << (element.bits - 1)), (1 << (element.bits - 1)) - 1


def shape_text(shape) -> str:
    """A shape as the IR's types write it: ?x3x224x224."""
    return "x".join("?" if d is None else str(d) for d in shape)


def _dims_str(shape) -> str:
    return shape_text(shape) + "x" if shape else ""


@dataclass(frozen=True, slots=True)
class ShapedType(Type):
    """Shared by tensor, memref and vector types: a shape (None = dynamic) and an element type."""
    shape: tuple
    element: ElementType

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def is_static(self) -> bool:
        return None not in self.shape

    @property
    def nbytes(self) -> int:
        """The bytes of a statically shaped value (Python ints: never wraps)."""
        return math.prod(self.shape) * self.element.np_dtype.itemsize

    def with_shape(self, shape) -> "ShapedType":
        return type(self)(tuple(shape), self.element)

    def with_element(self, element: ElementType) -> "ShapedType":
        return type(self)(self.shape, element)

    def __str__(self) -> str:
        return f"{self.keyword}<{_dims_str(self.shape)}{self.element}>"


class TensorType(ShapedType):
    __slots__ = ()
    keyword = "tensor"


@dataclass(frozen=True, slots=True)
class MemRefType(ShapedType):
    """A buffer. `space` is where it lives: "" (host memory, or a GPU's global memory) or "shared" (the
    memory of one GPU thread block: `memref<16x16xf32, shared>`)."""
    space: str = ""
    keyword = "memref"

    def with_shape(self, shape) -> "MemRefType":
        return MemRefType(tuple(shape), self.element, self.space)

    def with_element(self, element: ElementType) -> "MemRefType":
        return MemRefType(self.shape, element, self.space)

    def __str__(self) -> str:
        return f"memref<{_dims_str(self.shape)}{self.element}{', ' + self.space if self.space else ''}>"


class VectorType(ShapedType):
    __slots__ = ()
    keyword = "vector"


@dataclass(frozen=True, slots=True)
class ErrorType(Type):
    """The type of a value whose defining op failed to verify; suppresses cascading errors."""

    def __str__(self) -> str:
        return "<<error>>"


ERROR = ErrorType()


def tensor(shape, element: ElementType) -> TensorType:
    return TensorType(tuple(shape), element)


def dims_compatible(a, b) -> bool:
    return a is None or b is None or a == b


def types_compatible(a: Type, b: Type) -> bool:
    """Equal up to `?` dims (a `?` matches any size; the size is checked at run time)."""
    if a == b:
        return True
    if isinstance(a, ShapedType) and type(a) is type(b):
        return (a.element == b.element and a.rank == b.rank
                and all(dims_compatible(x, y) for x, y in zip(a.shape, b.shape)))
    return False


_SHAPED = re.compile(r"(tensor|memref|vector)<\s*((?:(?:\?|\d+)\s*x\s*)*)(\w+)\s*(?:,\s*(\w+)\s*)?>\Z")
MEMORY_SPACES = ("", "shared")
_SHAPED_KINDS = {"tensor": TensorType, "memref": MemRefType, "vector": VectorType}
_type_cache: dict[str, Type] = {}


def parse_type(text: str) -> Type:
    """Parse one type; raises ValueError with a short reason. Results are interned."""
    t = _type_cache.get(text)
    if t is not None:
        return t
    t = ELEMENT_TYPES.get(text)
    if t is None:
        m = _SHAPED.match(text)
        if not m:
            raise ValueError(f"invalid type '{text}'")
        element = ELEMENT_TYPES.get(m.group(3))
        if element is None:
            raise ValueError(f"unknown element type '{m.group(3)}' in '{text}'")
        dims = tuple(None if d == "?" else int(d) for d in (d.strip() for d in m.group(2).split("x")[:-1]))
        space = m.group(4)
        if space is None:
            t = _SHAPED_KINDS[m.group(1)](dims, element)
        elif m.group(1) != "memref" or space not in MEMORY_SPACES:
            raise ValueError(f"unknown memory space '{space}' in '{text}' (memrefs may be 'shared')")
        else:
            t = MemRefType(dims, element, space)
    if len(_type_cache) < 100_000:
        _type_cache[text] = t
    return t


def element_of(dtype: np.dtype) -> ElementType:
    """The element type for a numpy dtype, or ValueError."""
    dtype = np.dtype(dtype)
    for name, held in NP_DTYPES.items():
        if held == dtype and name not in ("bf16", "index"):
            return ELEMENT_TYPES[name]
    for name, ml_name in ML_DTYPES.items():
        if dtype.name == ml_name:
            return ELEMENT_TYPES[name]
    if dtype.name == "bfloat16":
        return ELEMENT_TYPES["bf16"]
    raise ValueError(f"unsupported dtype {dtype}")


@dataclass(frozen=True, slots=True)
class FunctionType(Type):
    inputs: tuple
    results: tuple

    def __str__(self) -> str:
        return f"({', '.join(map(str, self.inputs))}) -> {format_result_types(self.results)}"


def format_result_types(types) -> str:
    if len(types) == 1 and not isinstance(types[0], FunctionType):
        return str(types[0])
    return "(" + ", ".join(map(str, types)) + ")"


def round_to_element(array: np.ndarray, element: ElementType) -> np.ndarray:
    """Values as `element` holds them: bf16 rounds float32 to nearest-even on the top 16 bits."""
    if element.name != "bf16":
        return array.astype(element.np_dtype, copy=False)
    bits = np.asarray(array, np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16).astype(np.uint32)
    out = rounded.view(np.float32)
    return np.where(np.isnan(array), np.float32(np.nan), out).astype(np.float32)
