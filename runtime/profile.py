"""The per-kernel profiler: what each kernel of a profiled executable is, and the report of its counters.

    exe = mlc.compile(module, profile=True)     # or MLC_PROFILE=1 in the environment
    exe["forward"](x)
    print(exe.profile())                        # kernels by time; exe.profile(reset=True) also zeroes them

A kernel is the code of one tensor op (a fusion counts as one) in a public function: codegen/llvm.py
times each with `clock_gettime(CLOCK_MONOTONIC)` around it and adds, with atomic adds (threads may run
a function at once), three words per kernel to the object's `mlc_profile_counters`: calls, nanoseconds
and units (the elements of its result, where its cost depends on sizes known only at run time). The
object also holds `mlc_profile_kernels`, a NUL-terminated JSON list of each kernel's name and cost
samples, so a cached or saved profiled object describes itself. No Python runs per kernel.

Costs come from the tensor-level types (`describe`, before lowering): FLOPs and bytes moved, evaluated
with every `?` set to each of SIZES. A kernel whose cost is the same at every size is static; else, when
cost = a * units + c fits every sample, the report computes it from the counted units; else it reports
time only.
"""
from __future__ import annotations

import atexit
import json
import math
import sys
from dataclasses import dataclass

from mlc.ir.dialects.mlc import Conv2d, Fusion, Matmul
from mlc.ir.registry import ELEMENTWISE, Probe, VerifyError
from mlc.ir.types import shape_text

SIZES = (2, 3, 5)  # the sizes every `?` takes when a kernel's cost is sampled
COUNTERS, DESCRIPTIONS = "mlc_profile_counters", "mlc_profile_kernels"  # the symbols codegen defines
WORDS = 3  # counters per kernel: calls, nanoseconds, units
PRODUCTS = {"mlc.matmul", "mlc.conv2d", "mlc.conv2d_transpose"}  # rated in GFLOP/s; the rest in GB/s
GLUE = {"func.return", "mlc.global_load", "mlc.constant"}  # tensor ops that are no kernel of their own


# --- at compile time: the tensor ops, named and costed ------------------------------------------------------

def loc_key(loc) -> tuple:
    return (loc.file, loc.line, loc.col, loc.scope)


def describe(module) -> dict:
    """{(function, location key): [op description, ...] in program order} for the top-level tensor ops
    of each public function of a module at the tensor level (after fusion, before lowering). A
    description is {"label", "samples": [[flops, bytes] per size in SIZES], "product", "shapes"}."""
    out: dict = {}
    for name, func in module.functions.items():
        if func.is_private:
            continue
        for op in func.body.ops:
            if op.name in GLUE:
                continue
            anchor, fused = _anchor(op)
            label = f"{anchor.name}{_result_name(anchor)}{_operand_shapes(anchor)}"
            if fused:
                label += f" (fused: {', '.join(fused)})"
            label += f" {anchor.loc}" if anchor.loc.line else ""
            samples = [[_flops(op, s), _bytes(op, s)] for s in SIZES] if _samples_hold(op) else None
            out.setdefault((name, loc_key(op.loc)), []).append(
                {"label": label, "samples": samples, "product": anchor.name in PRODUCTS, "shapes": _dynamic_shapes(op)})
    return out


def _samples_hold(op) -> bool:
    """Whether setting every `?` to one size gives shapes the ops themselves would infer: not where one
    `?` is a multiple of another (Winograd's tiles: batch x tiles per image), whose costs sampled so
    would not follow the kernel's counted units (then it is reported by time alone)."""
    ops = [o for o in op.regions[0].blocks[0].ops if o.name != "mlc.yield"] if op.name == "mlc.fusion" else [op]
    for o in ops:
        if o.opdef is None or not o.results:
            continue
        for size in SIZES:
            try:
                inferred = o.opdef.infer(Probe(o, [_sized(v.type, size) for v in o.operands]), None)
            except VerifyError:
                return False
            except Exception:  # (an op whose inference needs more than its operand types: no opinion)
                break
            if any(getattr(t, "shape", None) != getattr(_sized(r.type, size), "shape", None) for t, r in zip(inferred, o.results)):
                return False
    return True


def _sized(t, size: int):
    """t with every `?` set to size."""
    shape = getattr(t, "shape", None)
    return t.with_shape(tuple(size if d is None else d for d in shape)) if shape is not None and None in shape else t


def _dynamic_shapes(op) -> list[tuple]:
    """The shapes with a `?` among the op's results, then operands: the kernel counts the elements of a
    buffer of one of them (codegen/llvm.py's `kernels_of`), so that its `?` is the one the samples set."""
    types = [v.type for v in (*op.results, *op.operands)]
    return list(dict.fromkeys(t.shape for t in types if None in getattr(t, "shape", ())))


def _anchor(op):
    """The op that names a kernel (a fusion's product or reduction, else its last op) and the names of
    the ops fused into it."""
    if op.name != "mlc.fusion":
        return op, []
    anchor = Fusion.named_by(op)
    return anchor, [o.name.removeprefix("mlc.") for o in op.regions[0].blocks[0].ops if o is not anchor and o.name != "mlc.yield"]


def _result_name(op) -> str:
    hint = op.results[0].name_hint if op.results else None
    return f" %{hint}" if hint else ""


def _operand_shapes(op) -> str:
    """A product's or convolution's operand shapes and the attributes that shape its kernel, e.g.
    ` [?x256 @ 1024x256 transpose_b]` or ` [?x3x224x224 * 64x3x7x7 stride 2]`: which kernel is slow, at a glance."""
    if op.name not in PRODUCTS:
        return ""
    a, b = (shape_text(t.shape) for t in op.operand_types[:2])
    if op.name == "mlc.matmul":
        marks = [m for m in Matmul.MARKS if op.attr(m)]
        return f" [{a} @ {b}{''.join(' ' + m for m in marks)}]"
    stride, _, dilation, groups = Conv2d.params(op)  # (conv2d_transpose's too)
    shaping = [f"{name} {v[0] if v[0] == v[1] else f'{v[0]}x{v[1]}'}" for name, v in (("stride", stride), ("dilation", dilation)) if v != (1, 1)]
    shaping += [f"groups {groups}"] if groups != 1 else []
    return f" [{a} * {b}{''.join(' ' + s for s in shaping)}]"


def _numel(t, size: int) -> int:
    shape = getattr(t, "shape", None)
    return 1 if shape is None else math.prod(size if d is None else d for d in shape)


def _nbytes(t, size: int) -> int:
    element = getattr(t, "element", None)
    itemsize = element.np_dtype.itemsize if element is not None and hasattr(element, "np_dtype") else 4
    return _numel(t, size) * itemsize


def _bytes(op, size: int) -> int:
    """Bytes read and written: each operand once, each result once."""
    operands = {id(v): v for v in op.operands}.values()
    return sum(_nbytes(v.type, size) for v in operands) + sum(_nbytes(r.type, size) for r in op.results)


def _flops(op, size: int) -> int:
    """Floating-point operations: 2 per multiply-add of a product, 1 per element of an elementwise op or
    per input element of a reduction; 0 for data movement (then only bytes are rated)."""
    if op.name == "mlc.fusion":
        return sum(_flops(o, size) for o in op.regions[0].blocks[0].ops if o.name != "mlc.yield")
    if not op.results or not hasattr(op.results[0].type, "shape"):
        return 0
    out = op.results[0].type
    if op.name == "mlc.matmul":
        a = op.operands[0].type
        k = a.shape[-3 if op.attr("interleaved_a") else -2] if op.attr("transpose_a") else a.shape[-1]
        return 2 * _numel(out, size) * (size if k is None else k)
    if op.name in ("mlc.conv2d", "mlc.conv2d_transpose"):
        x, w = (v.type for v in op.operands[:2])
        per = _numel(w, size) // max(size if w.shape[0] is None else w.shape[0], 1)
        return 2 * (_numel(x, size) if op.name == "mlc.conv2d_transpose" else _numel(out, size)) * per
    if ELEMENTWISE in op.opdef.traits:
        return _numel(out, size) if getattr(out.element, "is_float", False) else 0
    if op.name.startswith(("mlc.reduce_", "mlc.softmax", "mlc.log_softmax", "mlc.cross_entropy", "mlc.layer_norm")):
        return _numel(op.operands[0].type, size)
    return 0


def cost_model(samples, units) -> tuple | None:
    """(flops per unit, flops per call, bytes per unit, bytes per call) fitting `samples` (one [flops,
    bytes] per size in SIZES) with `units` (the counted elements at each size, or None); None when the
    cost depends on sizes in a way the units do not follow, or is unknown (samples None)."""
    if not samples:
        return None
    if all(s == samples[0] for s in samples):
        return (0.0, float(samples[0][0]), 0.0, float(samples[0][1]))
    if not units or units[0] == units[1]:
        return None
    model = []
    for k in (0, 1):
        slope = (samples[1][k] - samples[0][k]) / (units[1] - units[0])
        const = samples[0][k] - slope * units[0]
        if any(abs(slope * u + const - s[k]) > 1e-6 * max(abs(s[k]), 1) for u, s in zip(units, samples)):
            return None
        model += [slope, const]
    return tuple(model)


# --- at run time: the report ---------------------------------------------------------------------------------

@dataclass
class Row:
    name: str
    calls: int
    ms: float
    share: float  # of the profiled kernels' total time, in percent
    gflops: float | None  # per second, where the kernel's FLOPs are known
    gbytes: float | None  # per second, where its bytes are known
    product: bool  # a matrix product or convolution: rated in GFLOP/s

    @property
    def rate(self) -> str:
        if self.product and self.gflops is not None:
            return f"{self.gflops:.2f} GFLOP/s"
        return f"{self.gbytes:.2f} GB/s" if self.gbytes is not None else "-"


class ProfileReport:
    """The kernels of one executable by time spent (rows), printed as an aligned table."""

    def __init__(self, rows: list[Row], title: str = "mlc profile"):
        self.rows = sorted(rows, key=lambda r: -r.ms)
        self.title = title

    @property
    def total_ms(self) -> float:
        return sum(r.ms for r in self.rows)

    def __getitem__(self, name: str) -> Row:
        return next(r for r in self.rows if r.name == name)

    def __iter__(self):
        return iter(self.rows)

    def __len__(self):
        return len(self.rows)

    def __str__(self):
        head = ("kernel", "calls", "total ms", "share", "rate")
        cells = [(r.name, str(r.calls), f"{r.ms:.3f}", f"{r.share:.1f}%", r.rate) for r in self.rows]
        cells.append(("total", "", f"{self.total_ms:.3f}", "100.0%" if self.rows else "", ""))
        widths = [max(len(c[i]) for c in [head, *cells]) for i in range(len(head))]

        def line(c):
            return "  ".join([c[0].ljust(widths[0])] + [x.rjust(w) for x, w in zip(c[1:], widths[1:])]).rstrip()
        return "\n".join([f"===- {self.title} -===", line(head), *map(line, cells)])

    __repr__ = __str__


class Profile:
    """An executable's kernel descriptions and its counters (a numpy view of the object's own memory)."""

    def __init__(self, kernels: list[dict], counters):
        self.kernels, self.counters = kernels, counters
        self.models = [cost_model(k["samples"], k.get("units")) for k in kernels]

    def report(self, title: str = "mlc profile") -> ProfileReport:
        counts = self.counters.reshape(-1, WORDS)
        total_ns = float(counts[:, 1].sum()) or 1.0
        rows = []
        for k, (calls, ns, units), model in zip(self.kernels, counts.tolist(), self.models):
            if not calls:
                continue
            gflops = gbytes = None
            if model is not None and ns:
                flops, nbytes = model[0] * units + model[1] * calls, model[2] * units + model[3] * calls
                gflops, gbytes = (flops / ns if flops else None), (nbytes / ns if nbytes else None)
            rows.append(Row(k["name"], calls, ns / 1e6, 100.0 * ns / total_ns, gflops, gbytes, bool(k.get("product"))))
        return ProfileReport(rows, title)

    def reset(self) -> None:
        self.counters[:] = 0

    def ran(self) -> bool:
        return bool(self.counters.reshape(-1, WORDS)[:, 0].any())


# --- MLC_PROFILE=1: every profiled executable's table on standard error at exit --------------------------------

_at_exit: list = []


def report_at_exit(exe) -> None:
    """Print `exe`'s table to standard error when the process exits, if it ran (holds on to exe)."""
    if not _at_exit:
        atexit.register(_print_all)
    _at_exit.append(exe)


def _print_all() -> None:
    for exe in _at_exit:
        if exe._profile.ran():
            print(exe.profile(), file=sys.stderr)
