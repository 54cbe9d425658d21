"""Shape and element-type helpers shared by op declarations (`?` dims are None)."""
from __future__ import annotations

import math

from ..registry import VerifyError
from ..types import TensorType, Type


def tensor_type(t: Type, what: str = "operand") -> TensorType:
    if not isinstance(t, TensorType):
        raise VerifyError(f"{what} must be a tensor, got {t}")
    return t


def same_element(types, what="operands") -> None:
    elements = {t.element for t in types}
    if len(elements) > 1:
        raise VerifyError(f"{what} have different element types: " + ", ".join(str(t.element) for t in types))


def require_element(t: TensorType, kind: str, index: int = 0) -> None:
    """kind: float (f16/bf16/f32/f64), num (any but i1), int (integers but i1), logic (i1 or integer)."""
    e = t.element
    ok = {"float": e.is_float, "num": not e.is_bool, "int": e.is_int and not e.is_bool,
          "logic": e.is_int, "any": True}[kind]
    if not ok:
        want = {"float": "a floating-point", "num": "a numeric (non-i1)", "int": "an integer (non-i1)",
                "logic": "a boolean or integer"}[kind]
        raise VerifyError(f"operand {index} must have {want} element type, got {e}")


def broadcast_shapes(shapes) -> tuple:
    """numpy broadcasting with `?`: a `?` against a static size n>1 is n (checked at run time)."""
    rank = max((len(s) for s in shapes), default=0)
    out = []
    for i in range(rank):
        dims = [s[len(s) - rank + i] for s in shapes if len(s) - rank + i >= 0]
        static = {d for d in dims if d is not None and d != 1}
        if len(static) > 1:
            raise VerifyError("shapes are not broadcast-compatible: " + ", ".join(fmt_shape(s) for s in shapes))
        if static:
            out.append(static.pop())
        elif None in dims:
            out.append(None)
        else:
            out.append(1)
    return tuple(out)


def fmt_shape(shape) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def norm_axis(axis: int, rank: int, what: str = "axis") -> int:
    if not -rank <= axis < max(rank, 1) or (rank == 0 and axis not in (0, -1)):
        raise VerifyError(f"{what} {axis} is out of range for rank {rank}")
    return axis % rank if rank else 0


def norm_axes(axes, rank: int) -> tuple:
    out = tuple(sorted(norm_axis(a, rank, "reduction axis") for a in axes))
    if len(set(out)) != len(out):
        raise VerifyError(f"repeated reduction axis in {list(axes)}")
    return out


def num_elements(shape):
    return None if None in shape else math.prod(shape)


def pair(values, what: str, n: int = 2) -> tuple:
    values = tuple(values)
    if len(values) != n:
        raise VerifyError(f"'{what}' must have {n} entries, got {len(values)}")
    return values


def pads4(values, what: str = "padding") -> tuple:
    """[top, left, bottom, right]; [h, w] means symmetric padding."""
    values = tuple(values)
    if len(values) == 2:
        values = values + values
    if len(values) != 4:
        raise VerifyError(f"'{what}' must have 2 or 4 entries ([top, left, bottom, right]), got {len(values)}")
    if any(v < 0 for v in values):
        raise VerifyError(f"'{what}' must be non-negative, got {list(values)}")
    return values


def positive(values, what: str) -> tuple:
    if any(v < 1 for v in values):
        raise VerifyError(f"'{what}' must be positive, got {list(values)}")
    return tuple(values)


def window_out(size, lo, hi, kernel, stride, dilation=1, what="input"):
    """Output length of a sliding window, or None when the size is dynamic."""
    if size is None:
        return None
    span = dilation * (kernel - 1) + 1
    if size + lo + hi < span:
        raise VerifyError(f"window of size {span} does not fit the padded {what} of size {size + lo + hi}")
    return (size + lo + hi - span) // stride + 1
