"""LLVM emission: loop-level IR (mem/loop/arith, see passes/lower_to_loops.py) to LLVM IR with llvmlite.

Every public function becomes `void @name(ptr %args)`, one calling convention for all signatures.
`args` is an array of pointers:

    args[0]              the globals table: one data pointer per mlc.global, in module order
    args[1 + 2k]         data of tensor argument k
    args[2 + 2k]         its dims (i64[rank])
    then per result r:   a slot receiving a malloc'd data pointer (the caller frees it), and a slot
                         receiving its dims (i64[rank])
    args[last]           the status, i64[3]: [0] 0, or 1 + the index (in `FunctionCode.checks`) of the
                         run-time check that failed (the function then returns at once); [1] in: the most
                         bytes one buffer may take; [2] out: the bytes a failed allocation asked for (f64)

Buffers are row-major; `mem.alloc` is malloc (lowered code writes every element before reading it), its
byte count computed with overflow checks and bounded, its result checked: a failure is a located error.
Lowered code writes only buffers it allocated, so arguments, constants and globals are read in place.

Profiled code (`emit_module(..., profile=descriptions)`) also defines `i64 mlc_profile_counters[3 * K]`
(per kernel, in order: calls, nanoseconds, units) and `mlc_profile_kernels`, the K kernels'
descriptions as NUL-terminated JSON; runtime/profile.py reads both. A kernel is the top-level code one
tensor op became (consecutive ops carrying its location, see `kernels_of`); it is timed with
`clock_gettime(CLOCK_MONOTONIC)` and its counters are bumped with atomic adds.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field

import numpy as np
from llvmlite import ir

from mlc.ir.attributes import BoolAttr, IntAttr, StringAttr, SymbolRefAttr, TypeAttr, UnitAttr
from mlc.ir.collectives import ELEMENT_CODES, REDUCTIONS
from mlc.ir.core import FuncOp, Module, Operation, Value
from mlc.ir.diagnostics import error
from mlc.ir.dialects.mlc import BINARY, EXPENSIVE, UNARY, Global
from mlc.ir.types import ElementType, MemRefType, TensorType, VectorType, index, round_to_element

PTR = ir.PointerType()
I64 = ir.IntType(64)
I32 = ir.IntType(32)
I8 = ir.IntType(8)
I1 = ir.IntType(1)
F32, F64, F16 = ir.FloatType(), ir.DoubleType(), ir.HalfType()

SCALAR = {"f16": F16, "bf16": F32, "f32": F32, "f64": F64, "i1": I1, "i8": I8, "i32": ir.IntType(32), "i64": I64, "index": I64}
STORAGE = {**SCALAR, "i1": I8}  # numpy keeps booleans in bytes
PROFILE_COUNTERS, PROFILE_KERNELS, PROFILE_WORDS = "mlc_profile_counters", "mlc_profile_kernels", 3
GLOBALS_TABLE = "mlc_globals"  # the globals in the order of the table the code reads them through, for the runtime
PROFILE_SIZES = (2, 3, 5)  # the sizes `?` takes in a kernel's cost samples (runtime/profile.py's SIZES)
INTRINSICS = {"exp", "log", "sqrt", "sin", "cos", "floor", "rint", "pow"}  # math functions LLVM has as intrinsics (others: libm)


def scalar_type(e: ElementType):
    if e.name not in SCALAR:
        raise ValueError(f"{e} is not supported by the CPU backend yet")
    return SCALAR[e.name]


def vector_type(t: VectorType) -> ir.VectorType:
    return ir.VectorType(scalar_type(t.element), t.shape[0])


@dataclass
class Buffer:
    """A memref or tensor in registers: its data pointer, element type and one i64 per dim."""
    data: ir.Value
    element: ElementType
    dims: list
    owned: bool = False  # allocated by this function (freed at exit unless returned)
    slot: object = None  # its stack slot, for the failure path


@dataclass
class FunctionCode:
    name: str
    checks: list = field(default_factory=list)  # locations of ops with run-time bounds checks


class ModuleEmitter:
    def __init__(self, module: Module, threads: bool = True, profile: dict | None = None, send=None):
        self.module, self.threads = module, threads
        self.profile = profile  # the tensor ops' descriptions (runtime/profile.py's `describe`): time each kernel
        self.profiled: list[dict] = []  # each timed kernel's name and cost samples, in counter order
        self.llvm = ir.Module(name=module.name or "mlc")
        self.globals = list(module.globals)
        self.constants = 0
        self.functions: dict[str, FunctionCode] = {}
        self.libm: set[str] = set()
        self.decls: dict = {}
        self.nests: dict[tuple, list] = {}  # nest_facts -> [Nest, ...] (emitted once each): a model
        #                                      repeats its layers' shapes, and LLVM's time grows with its code: each emitted once
        self.counters = None  # mlc_profile_counters, when profiling
        self.parts = Parts(self.llvm, send)

    def emit(self) -> ir.Module:
        plans = self.plan_kernels() if self.profile is not None else {}
        self.constant_string(GLOBALS_TABLE, [Global.table_entry(op) for op in self.module.globals.values()])
        for name, f in self.module.functions.items():
            if not f.is_private:
                self.functions[name] = FunctionEmitter(self, f, plans.get(name, ())).emit()
        return self.llvm

    def plan_kernels(self) -> dict:
        """{function name: [Kernel, ...]} of every public function, numbered in one sequence (counter order)."""
        plans = {}
        for name, f in self.module.functions.items():
            if not f.is_private:
                plans[name] = kernels_of(f, self.profile, first=sum(map(len, plans.values())))
        self.profiled = [k.description for ks in plans.values() for k in ks]
        n = max(len(self.profiled), 1) * PROFILE_WORDS
        self.counters = ir.GlobalVariable(self.llvm, ir.ArrayType(I64, n), name=PROFILE_COUNTERS)
        self.counters.initializer, self.counters.align = ir.Constant(ir.ArrayType(I64, n), None), 64
        self.constant_string(PROFILE_KERNELS, self.profiled)
        return plans

    def constant_string(self, name: str, value) -> None:
        """`value` as JSON in a NUL-terminated constant that the runtime reads by its symbol."""
        data = json.dumps(value, separators=(",", ":"), ensure_ascii=True).encode() + b"\0"
        t = ir.ArrayType(I8, len(data))
        table = ir.GlobalVariable(self.llvm, t, name=name)
        table.global_constant, table.initializer = True, ir.Constant(t, bytearray(data))

    def dispose(self):
        """Breaks the LLVM IR's reference cycles (instructions and their blocks, functions and the
        module) once its text is made, so that it is freed at once rather than by the cycle collector
        (see Module.dispose)."""
        for fn in self.llvm.functions:
            for block in fn.blocks:
                for instruction in block.instructions:
                    instruction.parent, instruction.operands = None, []
                    if isinstance(instruction, ir.PhiInstr):
                        instruction.incomings = []
                block.instructions, block.parent = [], None
            fn.blocks, fn.args, fn.return_value, fn.parent = [], (), None, None
        self.llvm.globals.clear()
        self.nests.clear()

    def declare(self, name: str, ret, args):
        fn = self.decls.get(name)
        if fn is None:
            fn = self.decls[name] = ir.Function(self.llvm, ir.FunctionType(ret, args), name=name)
        return fn

    def intrinsic(self, name: str, t, n_args: int = 1):
        return self.declare(f"llvm.{name}.{_overload(t)}", t, [t] * n_args)

    def math(self, arith: "ArithEmitter", name: str, t, *xs):
        """A C math function on the CPU: straight-line f32 code where we have it (it vectorises), an
        LLVM intrinsic where LLVM has one, else libm."""
        if t == F32 and name in FAST_F32:
            return FAST_F32[name](arith, *xs)
        if name in INTRINSICS:
            return arith.call(name, t, *xs)
        symbol = name + ("f" if t == F32 else "")
        self.libm.add(symbol)
        return arith.b.call(self.declare(symbol, t, [t] * len(xs)), list(xs))

    def constant_data(self, array) -> ir.GlobalVariable:
        """The array's little-endian bytes as a constant global (a byte string: LLVM reads a weight
        tensor of millions of elements this way in a fraction of a second, not element by element)."""
        data = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes() or bytes(1)
        t = ir.ArrayType(I8, len(data))
        g = ir.GlobalVariable(self.llvm, t, name=f"const{self.constants}")
        self.constants += 1
        g.global_constant, g.linkage, g.align = True, "internal", 64
        g.initializer = ir.Constant(t, bytearray(data))
        return g


class FunctionEmitter:
    def __init__(self, parent: ModuleEmitter, func: FuncOp, kernels=()):
        self.parent, self.func = parent, func
        self.timed = {k.first: k for k in kernels} | {k.last: k for k in kernels}  # profiling: where kernels start and end
        self.started: dict = {}  # kernel -> its start time
        self.timespec = None  # clock_gettime's result, a stack slot made at the first clock read
        self.code = FunctionCode(func.sym_name)
        self.fn = ir.Function(parent.llvm, ir.FunctionType(ir.VoidType(), [PTR]), name=func.sym_name)
        if parent.threads:  # every loop nest is outlined: what stays here is glue, not worth LLVM's time
            self.fn.attributes.add("noinline")
            self.fn.attributes.add("optnone")
        self.prologue = ir.IRBuilder(self.fn.append_basic_block("prologue"))  # stack slots, then entry
        self.entry = self.fn.append_basic_block("entry")
        self.b = ir.IRBuilder(self.entry)
        self.values: dict[Value, object] = {}
        self.trusted: set = set()  # values computed from shapes alone (loop ivs, dims, constants, their arithmetic)
        self.owned: list[Buffer] = []
        self.requests: dict = {}  # mem.all_reduce_start's result -> the stack slot holding it until its wait
        self.threads = parent.threads
        self.sequential_outline = False
        self.check_base = self.local_checks = None  # an outlined nest's: see fail_if
        self.prefixes: dict = {}  # (basic block, buffer, leading indices) -> their offset (see `offset`)

    @classmethod
    def outlined(cls, outer: "FunctionEmitter", fn: ir.Function) -> "FunctionEmitter":
        """An emitter for a loop body moved into its own function (shares checks and trust facts)."""
        sub = cls.__new__(cls)
        sub.parent, sub.func, sub.code, sub.fn = outer.parent, outer.func, outer.code, fn
        sub.prologue = ir.IRBuilder(fn.append_basic_block("prologue"))
        sub.entry = fn.append_basic_block("entry")
        sub.b = ir.IRBuilder(sub.entry)
        sub.values, sub.trusted, sub.owned, sub.threads, sub.requests = {}, set(outer.trusted), [], False, {}
        sub.timed, sub.started, sub.timespec = {}, {}, None
        sub.sequential_outline = False  # set for the body of a sequential loop: its parallel loops may use threads
        sub.check_base, sub.local_checks = None, []  # (set by _chunk)
        sub.prefixes = {}
        sub.exit_block = fn.append_basic_block("fail")
        return sub

    def arg(self, i: int):
        slot = self.b.gep(self.fn.args[0], [ir.Constant(I64, i)], source_etype=PTR)
        return self.b.load(slot, typ=PTR)

    def emit(self) -> FunctionCode:
        n_in = len(self.func.args)
        n_out = len(self.func.type.results)
        self.globals_table = self.arg(0)
        for k, a in enumerate(self.func.args):
            if not isinstance(a.type, TensorType):
                raise error(self.func.loc, f"argument {k} has type {a.type}; the CPU backend takes tensors", "func.func")
            data, dims = self.arg(1 + 2 * k), self.arg(2 + 2 * k)
            self.values[a] = Buffer(data, a.type.element, [self.static_or_load(dims, i, d) for i, d in enumerate(a.type.shape)])
        self.out_slots = [(self.arg(1 + 2 * n_in + 2 * r), self.arg(2 + 2 * n_in + 2 * r)) for r in range(n_out)]
        self.error_slot = self.arg(1 + 2 * n_in + 2 * n_out)
        self.exit_block = self.fn.append_basic_block("fail")
        self.block(self.func.body)
        self.emit_exit()
        self.prologue.branch(self.entry)
        return self.code

    def emit_exit(self):
        """The failure path: let the all-reduces still in flight finish (they write into buffers freed
        next), free what this function allocated, through the slots (not every allocation dominates
        this block; a slot is null until allocated and after freed), and return."""
        with self.b.goto_block(self.exit_block):
            for slot in self.requests.values():
                abandon = self.parent.declare("mlc_all_reduce_abandon", ir.VoidType(), [I64])
                self.b.call(abandon, [self.b.load(slot, typ=I64)])
            free = self.parent.declare("free", ir.VoidType(), [PTR])
            for buf in self.owned:
                self.b.call(free, [self.b.load(buf.slot, typ=PTR)])
            self.b.ret_void()

    def static_or_load(self, dims_ptr, i, d):
        if d is not None:
            return ir.Constant(I64, d)
        return self.b.load(self.b.gep(dims_ptr, [ir.Constant(I64, i)], source_etype=I64), typ=I64)

    # --- ops ----------------------------------------------------------------------------------------------
    def block(self, block):
        timed = self.timed if block is self.func.body else {}
        for op in block:
            kernel = timed.get(op)
            if kernel is not None and kernel.first is op:
                self.started[kernel] = self.clock()
            handler = self.handlers.get(op.name)
            if handler is None:
                if op.name.startswith("arith."):
                    self.values[op.results[0]] = self.arith(op)
                else:
                    raise error(op.loc, "the CPU backend cannot compile this op yet", op.name)
            else:
                handler(self, op)
            if kernel is not None and kernel.last is op:
                self.count(kernel)

    # --- profiling ----------------------------------------------------------------------------------------
    def clock(self) -> ir.Value:
        """Nanoseconds of the monotonic clock (vDSO clock_gettime: no system call)."""
        if self.timespec is None:
            self.timespec = self.prologue.alloca(ir.LiteralStructType([I64, I64]))
        fn = self.parent.declare("clock_gettime", I32, [I32, PTR])
        self.b.call(fn, [ir.Constant(I32, time.CLOCK_MONOTONIC), self.timespec])
        sec, nsec = (self.b.load(self.b.gep(self.timespec, [ir.Constant(I32, 0), ir.Constant(I32, k)],
                                            source_etype=ir.LiteralStructType([I64, I64])), typ=I64) for k in (0, 1))
        return self.b.add(self.b.mul(sec, ir.Constant(I64, 1_000_000_000)), nsec)

    def count(self, kernel: "Kernel"):
        """The kernel ran once more: add a call, the nanoseconds since it started and its units."""
        elapsed = self.b.sub(self.clock(), self.started.pop(kernel))
        units = ir.Constant(I64, 0)
        if kernel.units is not None:
            units = ir.Constant(I64, 1)
            for d in self.values[kernel.units].dims:
                units = self.b.mul(units, d)
        for k, v in enumerate((ir.Constant(I64, 1), elapsed, units)):
            if k == 2 and kernel.units is None:
                continue
            word = self.b.gep(self.parent.counters, [ir.Constant(I64, 0), ir.Constant(I64, PROFILE_WORDS * kernel.index + k)],
                              source_etype=self.parent.counters.value_type)
            self.b.atomic_rmw("add", word, v, "monotonic")

    def get(self, v: Value):
        return self.values[v]

    def offset(self, buf: Buffer, indices) -> tuple[ir.Value, int]:
        """The row-major offset as (variant part, constant part): an index `x + c` adds c times its
        stride to the constant, so the rows of an unrolled tile (i, i + 1, ...) share one variant part
        and differ by constants, which x86 addressing takes for free (LLVM had made a pointer per row:
        a micro-kernel's 12 rows of A held 12 registers). The variant part of all but the last index,
        scaled by the last dim, is taken from an earlier access in this basic block that had the same
        variant parts where there is one (an unrolled tile reads rows i, i + 1, ... at many columns:
        one multiply for all, where each access had made its own and left them to LLVM)."""
        if not indices:
            return ir.Constant(I64, 0), 0
        if not all(isinstance(d, ir.Constant) for d in buf.dims[1:]):  # (a constant part scaled by a dynamic dim is no constant)
            *outer, last = indices
            key = (self.b.block, buf.data, *buf.dims, *outer)
            off = self.prefixes.get(key)
            if off is None:
                off = ir.Constant(I64, 0), 0
                for d, i in zip(buf.dims, outer):
                    off = self.add_index(self.scale(off, d), i)
                self.prefixes[key] = off
            return self.add_index(self.scale(off, buf.dims[-1]), last)
        *outer, last = (self.add_index((ir.Constant(I64, 0), 0), i) for i in indices)
        key = (self.b.block, buf.data, *buf.dims, *(variant for variant, _ in outer))
        prefix = self.prefixes.get(key)
        if prefix is None:
            prefix = ir.Constant(I64, 0)
            for d, (variant, _) in zip(buf.dims[1:], outer):
                prefix = self.mul(self.add(prefix, variant), d)
            self.prefixes[key] = prefix
        constant = 0
        for d, (_, c) in zip(buf.dims[1:], outer):
            constant = (constant + c) * d.constant
        return self.add(prefix, last[0]), constant + last[1]

    def scale(self, off, d):
        variant, constant = off
        if not constant or isinstance(d, ir.Constant):
            return self.mul(variant, d), constant * (d.constant if isinstance(d, ir.Constant) else 0)
        return self.add(self.mul(variant, d), self.mul(ir.Constant(I64, constant), d)), 0

    def add_index(self, off, i):
        variant, constant = off
        if isinstance(i, ir.Constant):
            return variant, constant + i.constant
        if isinstance(i, ir.Instruction) and i.opname == "add" and isinstance(i.operands[1], ir.Constant):
            return self.add(variant, i.operands[0]), constant + i.operands[1].constant
        return self.add(variant, i), constant

    def row_size(self, dims):
        size = ir.Constant(I64, 1)
        for d in dims:
            size = self.mul(size, d)
        return size

    def add(self, x, y):
        if isinstance(x, ir.Constant) and isinstance(y, ir.Constant):
            return ir.Constant(I64, _wrap64(x.constant + y.constant))
        if _is(x, 0) or _is(y, 0):
            return y if _is(x, 0) else x
        return self.b.add(x, y)

    def mul(self, x, y):
        if isinstance(x, ir.Constant) and isinstance(y, ir.Constant):
            return ir.Constant(I64, _wrap64(x.constant * y.constant))
        if _is(x, 0) or _is(y, 0):
            return ir.Constant(I64, 0)
        if _is(x, 1) or _is(y, 1):
            return y if _is(x, 1) else x
        return self.b.mul(x, y)

    def address(self, buf: Buffer, indices):
        variant, constant = self.offset(buf, indices)
        element = STORAGE[buf.element.name]
        if not constant:
            return self.b.gep(buf.data, [variant], inbounds=True, source_etype=element)
        # (the variant part alone may point outside the buffer: only the whole address is in bounds)
        at = self.b.gep(buf.data, [variant], source_etype=element)
        return self.b.gep(at, [ir.Constant(I64, constant)], inbounds=True, source_etype=element)

    def check_indices(self, op: Operation, buf: Buffer, index_values: list):
        """Data-dependent indices (e.g. labels) are checked; a bad one reports the op and returns."""
        untrusted = [(d, v) for d, v in zip(buf.dims, index_values) if v not in self.trusted]
        if not untrusted:
            return
        bad = ir.Constant(I1, 0)
        for d, v in untrusted:
            bad = self.b.or_(bad, self.b.icmp_unsigned(">=", self.get(v), d))
        origin = next((v.defining_op().attr("mlc.origin") for _, v in untrusted
                       if v.defining_op() is not None and v.defining_op().attr("mlc.origin")), None)
        self.fail_if(bad, op, "an index read from the data is out of range (e.g. a label or gather index)", origin)

    def fail_if(self, bad, op, message, op_name=None, detail=None):
        """Report `message` at op's location (as `op_name`) and return at once when `bad` holds;
        `detail()`, built on that path only, is the f64 the runtime writes for `{bytes}` in the message.
        A check's number is 1 + its index in FunctionCode.checks; an outlined nest numbers its checks
        from a base its caller passes, so that identical nests at different places share code."""
        check = (op, op_name or op.attr("op") or op.name, message)
        if self.local_checks is None:
            self.code.checks.append((op.loc, *check[1:]))
            number = ir.Constant(I64, len(self.code.checks))
        else:
            self.local_checks.append(check)
            number = self.b.add(self.check_base, ir.Constant(I64, len(self.local_checks)))
        with self.b.if_then(bad, likely=False):
            self.b.store(number, self.error_slot)
            if detail is not None:
                self.b.store(self.b.bitcast(detail(), I64), self.status(2))
            self.b.branch(self.exit_block)

    def adopt_checks(self, checks: list):
        """Number an outlined nest's checks among this function's; returns the base the nest adds to its own."""
        if self.local_checks is None:
            base = ir.Constant(I64, len(self.code.checks))
            self.code.checks += [(op.loc, name, message) for op, name, message in checks]
            return base
        base = self.b.add(self.check_base, ir.Constant(I64, len(self.local_checks)))
        self.local_checks += checks
        return base

    def status(self, k: int):
        """Word k of the status array (see the module docstring); word 0 is the error slot."""
        return self.b.gep(self.error_slot, [ir.Constant(I64, k)], source_etype=I64)

    def malloc(self, op, dims, element: ElementType, what: str = "a buffer"):
        """malloc for `dims` elements plus a spare one (never malloc(0)); returns (data, bytes of the
        elements). The byte count is computed with overflow checks and must not exceed the status' bound
        (an overcommitting kernel grants more, then kills the process when the pages are touched); a
        null result is reported too: each failure a located error naming the op and the bytes."""
        b, ebytes = self.b, ir.Constant(I64, _element_bytes(element))
        size, overflow = ebytes, ir.Constant(I1, 0)
        for d in dims:
            product = b.umul_with_overflow(size, d)
            size, overflow = b.extract_value(product, 0), b.or_(overflow, b.extract_value(product, 1))
        total = b.uadd_with_overflow(size, ebytes)
        overflow = b.or_(overflow, b.extract_value(total, 1))
        bound = b.load(self.status(1), typ=I64)
        too_big = b.or_(overflow, b.icmp_unsigned(">", b.extract_value(total, 0), bound))

        def requested():  # in f64, exact enough and never wrapping
            nbytes = ir.Constant(F64, _element_bytes(element))
            for d in dims:
                nbytes = self.b.fmul(nbytes, self.b.uitofp(d, F64))
            return nbytes
        origin = op.attr("mlc.origin")  # the tensor op the buffer serves
        message = f"cannot allocate {{bytes}} for {what}"
        self.fail_if(too_big, op, message + ": more than this machine's memory", origin, requested)
        data = b.call(self.parent.declare("malloc", PTR, [I64]), [b.extract_value(total, 0)])
        failed = b.icmp_unsigned("==", data, ir.Constant(PTR, None))
        self.fail_if(failed, op, message + ": out of memory", origin, requested)
        return data, size

    def own(self, buf: Buffer) -> Buffer:
        """buf is allocated here: freed at exit unless returned, and by the failure path."""
        buf.owned = True
        buf.slot = self.prologue.alloca(PTR)  # null until allocated
        self.prologue.store(ir.Constant(PTR, None), buf.slot)
        self.b.store(buf.data, buf.slot)
        self.owned.append(buf)
        return buf

    def free_owned(self):
        free = self.parent.declare("free", ir.VoidType(), [PTR])
        for buf in self.owned:
            if buf.owned:
                self.b.call(free, [buf.data])

    def arith(self, op: Operation) -> ir.Value:
        xs = [self.get(v) for v in op.operands]
        e = op.results[0].type
        if all(v in self.trusted for v in op.operands):  # computed from shapes, not from data
            self.trusted.add(op.results[0])
        if e == index and xs and all(isinstance(x, ir.Constant) for x in xs):
            # folded here, so sizes stay constants in outlined loop bodies too (LLVM sees them as such)
            return ir.Constant(I64, int(op.opdef.interpret([np.int64(x.constant) for x in xs], op, None)))
        out = ArithEmitter(self).emit(op.name[6:], xs, op, e)
        return self.round_bf16(out) if e == ElementType("bf16") else out

    def round_bf16(self, x):
        """bf16 values live in f32 (as in numpy and the interpreter): each result is rounded to the
        nearest even on its top 16 bits; NaN stays NaN."""
        i32 = ir.IntType(32)
        bits = self.b.bitcast(x, i32)
        odd = self.b.and_(self.b.lshr(bits, ir.Constant(i32, 16)), ir.Constant(i32, 1))
        rounded = self.b.and_(self.b.add(bits, self.b.add(odd, ir.Constant(i32, 0x7FFF))), ir.Constant(i32, -65536))
        return self.b.select(self.b.fcmp_unordered("uno", x, x), x, self.b.bitcast(rounded, F32))


@dataclass(eq=False)
class Kernel:
    """A timed span of a function's top-level ops, first to last (profiling), and its description."""
    index: int  # its counters' place in mlc_profile_counters
    first: Operation
    last: Operation
    units: Value | None  # the buffer whose elements are counted (one with `?` dims: see _counted_buffer)
    description: dict


GLUE = {"mem.dim", "mem.from_tensor", "mem.to_tensor", "mlc.global_load", "mlc.constant", "mem.alloc", "mem.dealloc",
        "mem.check", "mem.reshape", "mem.subview", "func.return"}  # top-level ops that do no kernel's work on their own (views too)


def kernels_of(func: FuncOp, described: dict, first: int = 0) -> list[Kernel]:
    """The kernels of a lowered function: each tensor op's code is a run of top-level ops carrying its
    location (lower-to-loops builds them so). A kernel spans from the first of them to its last op that
    does work (loops, stores, copies), so its allocations count and the frees of others' buffers may sit
    inside; a run of glue alone (argument copies, loads of globals) is no kernel. `described` maps
    (function, location key) to the tensor ops there (runtime/profile.py's `describe`), in order."""
    ops = [op for op in func.body.ops if op.name != "func.return"]
    key = lambda op: (op.loc.file, op.loc.line, op.loc.col, op.loc.scope)  # noqa: E731
    work = [not (op.name in GLUE or op.name.startswith("arith.")) for op in ops]
    spans, end = [], -1  # [start, last] indices
    for i, op in enumerate(ops):
        if not work[i]:
            continue
        if spans and key(ops[spans[-1][1]]) == key(op):
            spans[-1][1] = end = i
            continue
        start = i
        while start - 1 > end and key(ops[start - 1]) == key(op):
            start -= 1
        spans.append([start, i])
        end = i
    per_key: dict = {}
    for start, last in spans:
        per_key.setdefault(key(ops[last]), []).append(start)
    kernels = []
    for n, (start, last) in enumerate(spans):
        k = key(ops[last])
        descs = described.get((func.sym_name, k), [])
        occurrence = per_key[k].index(start)
        if len(descs) == len(per_key[k]):
            desc = descs[occurrence]
        elif descs:  # the ops at this location share kernels: one description (the costs on the first)
            desc = {"label": " + ".join(d["label"] for d in descs), "product": any(d["product"] for d in descs),
                    "samples": [[sum(d["samples"][j][c] for d in descs) for c in (0, 1)] for j in range(len(descs[0]["samples"]))]
                    if occurrence == 0 else None, "shapes": [s for d in descs for s in d["shapes"]]}
        else:
            op = ops[last]
            desc = {"label": f"{op.attr('mlc.origin') or op.name} {op.loc}", "product": False, "samples": None, "shapes": []}
        units = _counted_buffer(ops[start:last + 1], desc["shapes"]) if desc["samples"] else None
        description = {"name": f"{func.sym_name}:{n} {desc['label']}", "product": desc["product"], "samples": desc["samples"],
                       "units": [_elements(units.type, s) for s in PROFILE_SIZES] if units is not None else None}
        kernels.append(Kernel(first + n, ops[start], ops[last], units, description))
    return kernels


def _counted_buffer(span, shapes) -> Value | None:
    """The buffer whose elements a kernel counts, for a cost that depends on `?` sizes: one the tensor op
    made or used, of one of its `shapes` (its results' first; a reshape's source may hold its `?` in
    another size), else the largest with a `?` dim that it reads or writes."""
    dynamic = lambda v: isinstance(v.type, MemRefType) and None in v.type.shape  # noqa: E731
    result = next((op.results[0] for op in span if op.name == "mem.alloc" and op.attr("mlc.origin") and dynamic(op.results[0])), None)
    body = span[0].parent  # (a buffer made at the top level: its dims are known where the kernel ends)
    used = [v for op in span for inner in op.walk() for v in inner.operands
            if dynamic(v) and v.defining_op() is not None and v.defining_op().parent is body]
    for shape in shapes:
        match = next((v for v in [result, *used] if v is not None and v.type.shape == shape), None)
        if match is not None:
            return match
    return result or max(used, key=lambda v: _elements(v.type, PROFILE_SIZES[-1]), default=None)


def _elements(t, size: int) -> int:
    return math.prod(size if d is None else d for d in t.shape)


def _element_bytes(e: ElementType) -> int:
    return {"f16": 2, "bf16": 4, "f32": 4, "f64": 8, "i1": 1, "i8": 1, "i32": 4, "i64": 8, "index": 8}[e.name]


def _const(self: FunctionEmitter, op):
    value = op.attributes["value"]
    self.values[op.results[0]] = Buffer(self.parent.constant_data(value.value), value.type.element,
                                        [ir.Constant(I64, d) for d in value.type.shape])


def _scalar_const(self: FunctionEmitter, op):
    e = op.results[0].type
    v = op.attr("value")
    t = scalar_type(e)
    if e.name == "bf16":
        v = round_to_element(np.float32(v), e)[()]
    self.values[op.results[0]] = ir.Constant(t, float(v) if e.is_float else int(v))
    if e.name == "index":
        self.trusted.add(op.results[0])


def _global_load(self: FunctionEmitter, op):
    name = op.attr("global")
    k = self.parent.globals.index(name)
    data = self.b.load(self.b.gep(self.globals_table, [ir.Constant(I64, k)], source_etype=PTR), typ=PTR)
    t = op.results[0].type
    self.values[op.results[0]] = Buffer(data, t.element, [ir.Constant(I64, d) for d in t.shape])


def _global_store(self: FunctionEmitter, op):
    src = self.get(op.operands[0])
    k = self.parent.globals.index(op.attr("global"))
    dst = self.b.load(self.b.gep(self.globals_table, [ir.Constant(I64, k)], source_etype=PTR), typ=PTR)
    t = op.operands[0].type
    with self.b.if_then(self.b.icmp_unsigned("!=", dst, src.data)):  # equal: the kernel wrote the global in place
        self.memcpy(dst, src.data, ir.Constant(I64, math.prod(t.shape) * _element_bytes(t.element)))


def _alias(self: FunctionEmitter, op):
    """from_tensor / to_tensor: the same data (lowered code never writes what it did not allocate)."""
    self.values[op.results[0]] = self.get(op.operands[0])


def _reshape(self: FunctionEmitter, op):
    """The same data under other dims (never owned: the buffer it views is freed, not it)."""
    src, t = self.get(op.operands[0]), op.results[0].type
    sizes = iter(self.get(v) for v in op.operands[1:])
    self.values[op.results[0]] = Buffer(src.data, t.element, [ir.Constant(I64, d) if d is not None else next(sizes) for d in t.shape])


def _subview(self: FunctionEmitter, op):
    """buf[i], the same data (never owned, like a reshape); an index from the data is checked."""
    src = self.get(op.operands[0])
    self.check_indices(op, src, op.operands[1:])
    row = self.b.gep(src.data, [self.mul(self.get(op.operands[1]), self.row_size(src.dims[1:]))], inbounds=True,
                     source_etype=STORAGE[src.element.name])
    self.values[op.results[0]] = Buffer(row, src.element, src.dims[1:])


def _dim(self: FunctionEmitter, op):
    self.values[op.results[0]] = self.get(op.operands[0]).dims[op.attr("axis")]
    self.trusted.add(op.results[0])


def _alloc(self: FunctionEmitter, op):
    t = op.results[0].type
    sizes = iter(self.get(v) for v in op.operands)
    dims = [ir.Constant(I64, d) if d is not None else next(sizes) for d in t.shape]
    hint = op.results[0].name_hint  # a tensor op's result is allocated under its name (scratch: unnamed)
    data, _ = self.malloc(op, dims, t.element, f"its result %{hint}" if hint and op.attr("mlc.origin") else "a buffer")
    self.values[op.results[0]] = self.own(Buffer(data, t.element, dims))  # uninitialised: lowered code writes first


def _load(self: FunctionEmitter, op):
    buf = self.get(op.operands[0])
    self.check_indices(op, buf, op.operands[1:])
    v = self.b.load(self.address(buf, [self.get(i) for i in op.operands[1:]]), typ=STORAGE[buf.element.name])
    self.values[op.results[0]] = self.b.trunc(v, I1) if buf.element.is_bool else v


def _store(self: FunctionEmitter, op):
    v, buf = self.get(op.operands[0]), self.get(op.operands[1])
    self.check_indices(op, buf, op.operands[2:])
    if buf.element.is_bool:
        v = self.b.zext(v, I8)
    self.b.store(v, self.address(buf, [self.get(i) for i in op.operands[2:]]))


def _for(self: FunctionEmitter, op):
    carries_vectors = any(isinstance(self.get(v).type, ir.VectorType) for v in op.operands[2:])
    if op.parent is self.func.body and self.threads and not carries_vectors:
        _outlined_for(self, op, parallel=op.attr("parallel") and not op.results)
        return
    if op.attr("parallel") and not op.results and (self.sequential_outline or self.threads):
        # e.g. a matrix product inside a scan's step, or in a loop.if's rows of a batch of 1: the loops
        # around it are sequential, its own need not be
        _outlined_for(self, op, parallel=True)
        return
    if op.parent is self.func.body:  # a loop left here needs the optimiser after all
        self.fn.attributes.discard("optnone")
    lb, ub = (self.get(v) for v in op.operands[:2])
    finals = self.loop(op.regions[0].blocks[0], lb, ub, op.attr("step"), [self.get(v) for v in op.operands[2:]])
    self.values.update(zip(op.results, finals))


def _loop(self: FunctionEmitter, block, lb, ub, step, inits=()):
    """Emits the counted loop; returns the carried values as the loop leaves (phis in its header)."""
    step = ir.Constant(I64, step)
    pre = self.b.block
    header = self.fn.append_basic_block("loop")
    body = self.fn.append_basic_block("body")
    done = self.fn.append_basic_block("done")
    self.b.branch(header)
    self.b.position_at_end(header)
    iv = self.b.phi(I64)
    iv.add_incoming(lb, pre)
    carried = []
    for v in inits:
        phi = self.b.phi(v.type)
        phi.add_incoming(v, pre)
        carried.append(phi)
    self.b.cbranch(self.b.icmp_signed("<", iv, ub), body, done)
    self.b.position_at_end(body)
    self.values.update(zip(block.args, [iv] + carried))
    self.trusted.add(block.args[0])
    self.block(block)
    nxt = self.b.add(iv, step, flags=["nsw"])
    iv.add_incoming(nxt, self.b.block)
    for phi, v in zip(carried, block.last.operands):
        phi.add_incoming(self.get(v), self.b.block)
    self.b.branch(header)
    self.b.position_at_end(done)
    return carried


PARALLEL_MIN_WORK = 1 << 15  # elements (of cheap ops): smaller loop nests run on the calling thread
EXPENSIVE_WEIGHT = 8         # an element's math-library call (exp, tanh, ...) counts as this many elements


def _static_work(op) -> int | None:
    """Iterations of the nest below a loop (one trip of it), weighted by its elements' math calls
    (an LSTM step's [32, 512] gates, 16k sigmoids, are worth two threads; a copy of as many is not),
    when every inner bound is a constant."""
    work, expensive = 1, 0
    for inner in op.regions[0].walk():
        if inner.name == "loop.for":
            lb, ub = (v.defining_op() for v in inner.operands[:2])
            if lb is None or ub is None or lb.name != "arith.constant" or ub.name != "arith.constant":
                return None
            work *= max(ub.attr("value") - lb.attr("value"), 1)
        row = inner.name.startswith("arith.") and (UNARY.get(inner.name[6:]) or BINARY.get(inner.name[6:]))
        expensive += bool(row) and row.cost == EXPENSIVE
    return work * (1 + EXPENSIVE_WEIGHT * expensive)


def nest_facts(emitter: FunctionEmitter, op, free: list, parallel: bool) -> tuple:
    """What emitting loop `op` as a function depends on besides its ops (`nest_ops`): per value from
    outside (its bounds, what its body uses), numbered in order, the facts codegen reads: a buffer's
    static dims, a constant's value, a type, whether the value is trusted (computed from shapes, so
    its indices go unchecked); and the loop's top-level ops' names (a cheap first test of alike nests)."""
    facts = [parallel, emitter.threads, emitter.sequential_outline]
    for v in dict.fromkeys([*op.operands, *free]):
        val = emitter.get(v)
        if isinstance(val, Buffer):
            facts.append((val.element.name, tuple(d.constant if isinstance(d, ir.Constant) else None for d in val.dims)))
        else:
            facts.append(str(val) if isinstance(val, ir.Constant) else str(val.type))
        facts.append(v in emitter.trusted)
    return tuple(facts), tuple(o.name for o in op.regions[0].blocks[0].ops)


def nest_ops(op, free: list) -> tuple:
    """The nest's ops: names, attributes, types, and which values they use (numbered, not named; the
    values from outside first, as in `nest_facts`)."""
    numbers = {v: k for k, v in enumerate(dict.fromkeys([*op.operands, *free]))}
    ops = []
    for o in op.walk():
        blocks = tuple(tuple(tuple(a.type for a in b.args) for b in r.blocks) for r in o.regions)
        for v in [*o.results, *(a for r in o.regions for b in r.blocks for a in b.args)]:
            numbers[v] = len(numbers)
        attrs = tuple((k, a if isinstance(a, _EXACT) else str(a)) for k, a in o.attributes.items())
        ops.append((o.name, tuple(numbers[v] for v in o.operands), tuple(r.type for r in o.results), attrs, blocks))
    return tuple(ops)


@dataclass
class Nest:
    """A loop nest emitted as a function, and its checks; its ops (`nest_ops`) walked only once a later
    nest of the same facts is compared with it."""
    op: Operation
    free: list
    chunk: ir.Function
    checks: list
    _ops: tuple | None = None

    @property
    def ops(self) -> tuple:
        if self._ops is None:
            self._ops = nest_ops(self.op, self.free)
        return self._ops


_EXACT = (IntAttr, BoolAttr, StringAttr, SymbolRefAttr, TypeAttr, UnitAttr)  # equal exactly when alike (not floats: -0.0 == 0.0)


def _outlined_for(self: FunctionEmitter, op, parallel: bool):
    """Each top-level loop nest is a function of its own, `void @f.parN(ptr ctx, i64 lo, i64 hi)`
    running trips lo..hi: identical nests share one (`Nest`), and LLVM optimises many
    small functions much faster than one large one. A parallel loop's function is handed to the
    runtime's `mlc_parallel_for`, which splits the trips over threads when the work is large enough.
    Values the body uses (and the loop's bounds) travel in `ctx`."""
    block, body = op.regions[0].blocks[0], list(op.regions[0].walk())
    inside = {r for o in body for r in o.results} | {a for o in body for rg in o.regions for b in rg.blocks for a in b.args}
    inside |= set(block.args)
    free = list(dict.fromkeys(v for o in body for v in o.operands if v not in inside))
    slots, layout = [], []  # (llvm value, type) per 8-byte ctx slot; layout rebuilds the values inside
    for v in free:
        val = self.get(v)
        if isinstance(val, Buffer):  # its data pointer and the dims not known statically
            layout.append((v, "buffer", len(slots)))
            slots += [(val.data, PTR)] + [(d, I64) for d in val.dims if not isinstance(d, ir.Constant)]
        elif isinstance(val, ir.Constant):  # constants stay constants, so the chunk folds them
            layout.append((v, "constant", 0))
        elif isinstance(val.type, ir.VectorType):  # wider than a slot: passed through a stack copy
            spill = self.prologue.alloca(val.type)
            self.b.store(val, spill)
            layout.append((v, "vector", len(slots)))
            slots.append((spill, PTR))
        else:
            layout.append((v, "scalar", len(slots)))
            slots.append((val, val.type))
    lb, ub = (self.get(v) for v in op.operands[:2])
    alike = self.parent.nests.setdefault(nest_facts(self, op, free, parallel), [])
    ops = nest_ops(op, free) if alike else None
    known = next((nest for nest in alike if nest.ops == ops), None)
    if known is None:
        chunk, checks = _chunk(self, op, parallel, layout, len(slots))
        alike.append(Nest(op, free, chunk, checks, ops))
    else:  # the same checks, at this nest's ops
        chunk, checks = known.chunk, known.checks
        if checks:
            at, ops = {o: k for k, o in enumerate(known.op.walk())}, list(op.walk())
            checks = [(ops[at[o]], name, message) for o, name, message in checks]
    slots += [(self.error_slot, PTR), (self.adopt_checks(checks), I64), (lb, I64), (ub, I64)]
    inits = [self.get(v) for v in op.operands[2:]]
    # the caller: fill ctx, run the chunks, stop if one failed
    ctx_array = self.prologue.alloca(I64, size=len(slots) + len(inits))
    for k, val in enumerate([val for val, _ in slots] + inits):
        self.b.store(_to_word(self.b, val), self.b.gep(ctx_array, [ir.Constant(I64, k)], source_etype=I64))
    step = op.attr("step")
    trips = self.b.sdiv(self.b.add(self.b.sub(ub, lb), ir.Constant(I64, step - 1)), ir.Constant(I64, step))
    trips = self.b.select(self.b.icmp_signed("<", trips, ir.Constant(I64, 0)), ir.Constant(I64, 0), trips)
    if parallel:
        work = _static_work(op)
        per_trip = ir.Constant(I64, work if work is not None else PARALLEL_MIN_WORK)
        runner = self.parent.declare("mlc_parallel_for", ir.VoidType(), [PTR, PTR, I64, I64])
        big = self.b.icmp_signed(">=", self.b.mul(trips, per_trip), ir.Constant(I64, PARALLEL_MIN_WORK))
        with self.b.if_else(big) as (threads, inline):
            with threads:
                self.b.call(runner, [chunk, ctx_array, ir.Constant(I64, 0), trips])
            with inline:
                self.b.call(chunk, [ctx_array, ir.Constant(I64, 0), trips])
    else:
        self.b.call(chunk, [ctx_array, ir.Constant(I64, 0), trips])
    self.values.update({r: _from_word(self.b, self.b.load(self.b.gep(ctx_array, [ir.Constant(I64, len(slots) + k)], source_etype=I64), typ=I64),
                                      v.type) for k, (r, v) in enumerate(zip(op.results, inits))})
    failed = self.b.icmp_signed("!=", self.b.load(self.error_slot, typ=I64), ir.Constant(I64, 0))
    with self.b.if_then(failed, likely=False):
        self.b.branch(self.exit_block)


def _chunk(self: FunctionEmitter, op, parallel: bool, layout: list, values: int) -> tuple[ir.Function, list]:
    """Loop `op` as a function reading the values it uses from ctx (`layout` says where, in the first
    `values` slots; then the error slot, the checks' base and the bounds); and its checks."""
    block = op.regions[0].blocks[0]
    chunk = ir.Function(self.parent.llvm, ir.FunctionType(ir.VoidType(), [PTR, I64, I64]),
                        name=self.parent.llvm.get_unique_name(f"{self.fn.name}.par"))
    chunk.attributes.add("noinline")  # one copy of each kernel, however many places call it
    if op.attr("compact"):
        chunk.attributes.add("optsize")
    sub = FunctionEmitter.outlined(self, chunk)
    sub.sequential_outline = not parallel and self.threads
    ctx, lo, hi = chunk.args

    def word(k):  # ctx slot k
        return sub.b.load(sub.b.gep(ctx, [ir.Constant(I64, k)], source_etype=I64), typ=I64)

    def load(k, t):
        return _from_word(sub.b, word(k), t)
    for v, kind, at in layout:
        if kind == "buffer":
            buf, data, dims, slot = self.get(v), load(at, PTR), [], at + 1
            for d in buf.dims:  # static dims stay constants
                if not isinstance(d, ir.Constant):
                    d, slot = load(slot, I64), slot + 1
                dims.append(d)
            sub.values[v] = Buffer(data, buf.element, dims)
        elif kind == "constant":
            sub.values[v] = self.get(v)
        elif kind == "vector":
            sub.values[v] = sub.b.load(load(at, PTR), typ=self.get(v).type)
        else:
            sub.values[v] = load(at, self.get(v).type)
    sub.error_slot, sub.check_base = load(values, PTR), word(values + 1)
    first, last, carried = values + 2, values + 3, values + 4
    lb, ub, *inits = (self.get(v) for v in op.operands)
    if inits:  # a loop carrying values runs whole; its last values come back through ctx
        finals = sub.loop(block, word(first), word(last), op.attr("step"),
                          [load(carried + k, v.type) for k, v in enumerate(inits)])
        for k, v in enumerate(finals):
            sub.b.store(_to_word(sub.b, v), sub.b.gep(ctx, [ir.Constant(I64, carried + k)], source_etype=I64))
    elif not parallel and isinstance(lb, ir.Constant) and isinstance(ub, ir.Constant):
        sub.loop(block, lb, ub, op.attr("step"))  # run whole: constant trip counts let LLVM vectorise
    else:  # the runtime splits trip numbers, so every chunk starts on the loop's step
        first, last, step = word(first), word(last), ir.Constant(I64, op.attr("step"))
        start = sub.b.add(first, sub.b.mul(lo, step))
        stop = sub.b.add(first, sub.b.mul(hi, step))
        stop = sub.b.select(sub.b.icmp_signed("<", stop, last), stop, last)
        sub.loop(block, start, stop, op.attr("step"))
    sub.b.ret_void()
    sub.emit_exit()
    sub.prologue.branch(sub.entry)
    self.parent.parts.finished(chunk)
    return chunk, sub.local_checks


def _wrap64(n: int) -> int:
    """n as i64 arithmetic leaves it (two's complement)."""
    return (n + 2**63) % 2**64 - 2**63


def _is(v, constant: int) -> bool:
    return isinstance(v, ir.Constant) and v.constant == constant


def _to_word(b: ir.IRBuilder, v) -> ir.Value:
    """Any scalar or pointer as the 64 bits of a ctx slot."""
    t = v.type
    if t == PTR or isinstance(t, ir.PointerType):
        return b.ptrtoint(v, I64)
    if t in (F16, F32, F64):
        v = b.bitcast(v, ir.IntType(_bits(t)))
    return v if v.type == I64 else b.zext(v, I64)


def _from_word(b: ir.IRBuilder, w, t) -> ir.Value:
    if t == PTR or isinstance(t, ir.PointerType):
        return b.inttoptr(w, PTR)
    if t in (F16, F32, F64):
        return b.bitcast(w if t == F64 else b.trunc(w, ir.IntType(_bits(t))), t)
    return w if t == I64 else b.trunc(w, t)


def _yield(self: FunctionEmitter, op):
    pass


def _dealloc(self: FunctionEmitter, op):
    buf = self.get(op.operands[0])
    self.b.call(self.parent.declare("free", ir.VoidType(), [PTR]), [buf.data])
    self.b.store(ir.Constant(PTR, None), buf.slot)
    buf.owned = False


def _check(self: FunctionEmitter, op):
    self.fail_if(self.b.not_(self.get(op.operands[0])), op, op.attr("message"))


def _return(self: FunctionEmitter, op):
    returned, results = set(), []
    for v in op.operands:
        buf = self.get(v)
        if not buf.owned or id(buf) in returned:  # an argument, constant, global or a buffer already returned: a copy
            data, size = self.malloc(op, buf.dims, buf.element, "a copy of a result")
            self.memcpy(data, buf.data, size)
            buf = self.own(Buffer(data, buf.element, buf.dims))
        returned.add(id(buf))
        results.append(buf)
    for (data_slot, dims_slot), buf in zip(self.out_slots, results):  # (no failure past this point)
        self.b.store(buf.data, data_slot)
        for i, d in enumerate(buf.dims):
            self.b.store(d, self.b.gep(dims_slot, [ir.Constant(I64, i)], source_etype=I64))
    for buf in self.owned:
        if id(buf) in returned:
            buf.owned = False
    self.free_owned()
    self.b.ret_void()


def _memcpy(self: FunctionEmitter, dst, src, size):
    fn = self.parent.declare("llvm.memcpy.p0.p0.i64", ir.VoidType(), [PTR, PTR, I64, I1])
    self.b.call(fn, [dst, src, size, ir.Constant(I1, 0)])


FunctionEmitter.memcpy = _memcpy
FunctionEmitter.loop = _loop

def _vector_load(self: FunctionEmitter, op):
    buf = self.get(op.operands[0])
    self.check_indices(op, buf, op.operands[1:])
    address = self.address(buf, [self.get(i) for i in op.operands[1:]])
    t, stride = vector_type(op.results[0].type), op.attr("stride")
    if stride == 1:
        self.values[op.results[0]] = self.b.load(address, typ=t, align=_vector_align(op, buf))
        return
    # (the whole run, then every stride-th lane: one or two shuffles, where a gather is many loads)
    run = self.b.load(address, typ=ir.VectorType(t.element, t.count * stride), align=_vector_align(op, buf))
    picks = ir.Constant(ir.VectorType(ir.IntType(32), t.count), [k * stride for k in range(t.count)])
    self.values[op.results[0]] = self.b.shuffle_vector(run, ir.Constant(run.type, ir.Undefined), picks)


def _vector_store(self: FunctionEmitter, op):
    buf = self.get(op.operands[1])
    self.check_indices(op, buf, op.operands[2:])
    address = self.address(buf, [self.get(i) for i in op.operands[2:]])
    self.b.store(self.get(op.operands[0]), address, align=_vector_align(op, buf))


def _vector_align(op, buf: Buffer) -> int:
    """The access's alignment in bytes: the vector's size where the op promises it (`aligned`)."""
    lanes = (op.results[0].type if op.results else op.operand_types[0]).shape[0]
    return _element_bytes(buf.element) * (lanes if op.attr("aligned") else 1)


def _vector_broadcast(self: FunctionEmitter, op):
    t = vector_type(op.results[0].type)
    lane0 = self.b.insert_element(ir.Constant(t, ir.Undefined), self.get(op.operands[0]), ir.Constant(ir.IntType(32), 0))
    self.values[op.results[0]] = self.b.shuffle_vector(lane0, ir.Constant(t, ir.Undefined),
                                                       ir.Constant(ir.VectorType(ir.IntType(32), t.count), [0] * t.count))


def _from_elements(self: FunctionEmitter, op):
    v = ir.Constant(vector_type(op.results[0].type), ir.Undefined)
    for k, x in enumerate(op.operands):
        v = self.b.insert_element(v, self.get(x), ir.Constant(ir.IntType(32), k))
    self.values[op.results[0]] = v


def _extract(self: FunctionEmitter, op):
    self.values[op.results[0]] = self.b.extract_element(self.get(op.operands[0]), ir.Constant(ir.IntType(32), op.attr("position")))


def _overload(t) -> str:
    """An overloaded intrinsic's type suffix: f32, v16f32, i64, ..."""
    lanes, e = (f"v{t.count}", t.element) if isinstance(t, ir.VectorType) else ("", t)
    return lanes + ({F32: "f32", F64: "f64", F16: "f16"}.get(e) or f"i{e.width}")


def _reduce_add(self: FunctionEmitter, op):
    v = self.get(op.operands[0])
    e = v.type.element
    if isinstance(e, ir.IntType):
        total = self.b.call(self.parent.declare(f"llvm.vector.reduce.add.{_overload(v.type)}", e, [v.type]), [v])
    else:  # (reassociating: a shuffle tree, not 15 adds in a row)
        reduce = self.parent.declare(f"llvm.vector.reduce.fadd.{_overload(v.type)}", e, [e, v.type])
        total = self.b.call(reduce, [ir.Constant(e, -0.0), v], fastmath=("reassoc",))
    self.values[op.results[0]] = total


def _vector_fma(self: FunctionEmitter, op):
    xs = [self.get(v) for v in op.operands]
    self.values[op.results[0]] = self.b.call(self.parent.intrinsic("fma", xs[0].type, 3), xs)


def _if(self: FunctionEmitter, op):
    then_block, else_block, merge = (self.fn.append_basic_block(n) for n in ("then", "else", "endif"))
    self.b.cbranch(self.get(op.operands[0]), then_block, else_block)
    arms = []
    for region, start in zip(op.regions, (then_block, else_block)):
        self.b.position_at_end(start)
        self.block(region.blocks[0])
        arms.append(([self.get(v) for v in region.blocks[0].last.operands], self.b.block))
        self.b.branch(merge)
    self.b.position_at_end(merge)
    for k, r in enumerate(op.results):
        phi = self.b.phi(arms[0][0][k].type)
        for values, end in arms:
            phi.add_incoming(values[k], end)
        self.values[r] = phi


def _buffer_words(self: FunctionEmitter, buf) -> list:
    """A buffer as the runtime's collectives take it: data pointer, element count, dtype code
    (ir/collectives.py's ELEMENT_CODES)."""
    count = ir.Constant(I64, 1)
    for d in buf.dims:
        count = self.b.mul(count, d)
    return [buf.data, count, ir.Constant(I32, ELEMENT_CODES.index(buf.element.name))]


def _collective(self: FunctionEmitter, op):
    """mem.all_reduce / mem.broadcast: the runtime's `i32 mlc_all_reduce(ptr data, i64 count, i32 dtype,
    i32 reduction)` or `i32 mlc_broadcast(ptr data, i64 count, i32 dtype, i64 root)` rewrites the buffer
    in place (dtype and reduction index ir/collectives.py's ELEMENT_CODES and REDUCTIONS); not 0: failed."""
    last = ir.Constant(I32, REDUCTIONS.index(op.attr("reduction"))) if op.name == "mem.all_reduce" else ir.Constant(I64, op.attr("root"))
    fn = self.parent.declare("mlc_" + op.name[len("mem."):], I32, [PTR, I64, I32, last.type])
    status = self.b.call(fn, [*_buffer_words(self, self.get(op.operands[0])), last])
    self.fail_if(self.b.icmp_signed("!=", status, ir.Constant(I32, 0)), op,
                 "failed across processes (the communicator's error is on standard error)", "mlc." + op.name[len("mem."):])


def _all_reduce_start(self: FunctionEmitter, op):
    """`i64 mlc_all_reduce_start(ptr, i64 count, i32 dtype, i32 reduction)`: a request (< 0: failed),
    kept in a stack slot until its wait so that the failure path can abandon it before freeing the buffer."""
    fn = self.parent.declare("mlc_all_reduce_start", I64, [PTR, I64, I32, I32])
    request = self.b.call(fn, [*_buffer_words(self, self.get(op.operands[0])), ir.Constant(I32, REDUCTIONS.index(op.attr("reduction")))])
    self.fail_if(self.b.icmp_signed("<", request, ir.Constant(I64, 0)), op,
                 "failed across processes (the communicator's error is on standard error)", "mlc.all_reduce")
    slot = self.prologue.alloca(I64)
    self.prologue.store(ir.Constant(I64, 0), slot)  # (0: no request)
    self.b.store(request, slot)
    self.requests[op.results[0]] = slot
    self.values[op.results[0]] = request


def _all_reduce_wait(self: FunctionEmitter, op):
    """`i32 mlc_all_reduce_wait(i64 request, ptr, i64 count, i32 dtype)`; not 0: failed."""
    slot = self.requests.get(op.operands[0])
    if slot is not None:
        self.b.store(ir.Constant(I64, 0), slot)
    fn = self.parent.declare("mlc_all_reduce_wait", I32, [I64, PTR, I64, I32])
    status = self.b.call(fn, [self.get(op.operands[0]), *_buffer_words(self, self.get(op.operands[1]))])
    self.fail_if(self.b.icmp_signed("!=", status, ir.Constant(I32, 0)), op,
                 "failed across processes (the communicator's error is on standard error)", "mlc.all_reduce")


def _collective_progress(self: FunctionEmitter, op):
    self.b.call(self.parent.declare("mlc_collective_progress", ir.VoidType(), []), [])


def _process_info(self: FunctionEmitter, op):
    """mem.rank / mem.world_size: the runtime's `i64 mlc_rank()` / `i64 mlc_world_size()`."""
    self.values[op.results[0]] = self.b.call(self.parent.declare("mlc_" + op.name[len("mem."):], I64, []), [])


OPS = {
    "mlc.constant": _const, "mlc.global_load": _global_load, "mlc.global_store": _global_store,
    "mem.from_tensor": _alias, "mem.to_tensor": _alias, "mem.reshape": _reshape, "mem.subview": _subview, "mem.dim": _dim,
    "mem.alloc": _alloc,
    "mem.load": _load, "mem.store": _store, "mem.dealloc": _dealloc, "mem.check": _check, "loop.for": _for, "loop.yield": _yield,
    "loop.if": _if, "func.return": _return,
    "arith.constant": _scalar_const, "vector.load": _vector_load, "vector.store": _vector_store,
    "vector.broadcast": _vector_broadcast, "vector.fma": _vector_fma, "vector.from_elements": _from_elements,
    "vector.extract": _extract, "vector.reduce_add": _reduce_add, "mem.all_reduce": _collective, "mem.broadcast": _collective,
    "mem.all_reduce_start": _all_reduce_start, "mem.all_reduce_wait": _all_reduce_wait,
    "mem.collective_progress": _collective_progress,
    "mem.rank": _process_info, "mem.world_size": _process_info,
}


FunctionEmitter.handlers = OPS


class ArithEmitter:
    """Scalar ops, each meaning what the mlc op of the same name means per element. The elementwise
    rows (ir/dialects/mlc.py) say how: built in here (f_add, i_add, ...), a math function, or an
    expansion over other scalar ops."""

    def __init__(self, fe: FunctionEmitter):
        self.fe, self.b = fe, fe.b

    def emit(self, name, xs, op, result):
        if name == "cast":
            return self.cast(xs[0], op.operand_types[0], result)
        t = xs[0].type if xs else scalar_type(result)
        if t == F16:  # half: compute in float, round once
            out = self.emit(name, [self.b.fpext(x, F32) for x in xs], op, result if not result.is_float else ElementType("f32"))
            return self.b.fptrunc(out, F16) if result.is_float else out
        if t in (F32, F64) and op.attr("reassoc"):
            return self.reassociable(name, t, *xs)
        return self.compute(name, xs, op)

    def compute(self, name, xs, op):
        """arith.<name> of xs: scalars, or vectors lane by lane (the float rules apply to the lane type)."""
        t = xs[0].type
        is_float = getattr(t, "element", t) in (F32, F64)
        if name == "select":
            return self.b.select(*xs)
        if isinstance(t, ir.VectorType) and not is_float and t.element != I1:  # (i1 lanes: logic on compared floats)
            raise error(op.loc, f"the CPU backend has no {op.results[0].type} arithmetic yet", op.name)
        row = UNARY.get(name) or BINARY.get(name)
        if row is not None and callable(row.scalar):
            return row.scalar(_Expansion(self, op, t), *xs)
        if row is not None and row.scalar and is_float:
            return self.math(row.scalar, t, *xs)
        fn = getattr(self, ("f_" if is_float else "i_") + name, None)
        if fn is None:
            raise error(op.loc, "the CPU backend cannot compile this op yet", op.name)
        return fn(t, *xs)

    def reassociable(self, name, t, a, b):
        """A reduction step LLVM may regroup, so the loop vectorises (the sum's rounding may change)."""
        if name in ("add", "mul"):
            return (self.b.fadd if name == "add" else self.b.fmul)(a, b, flags=("reassoc", "nsz"))
        return self.b.call(self.fe.parent.intrinsic(name, t, 2), [a, b], fastmath=("reassoc", "nsz"))

    # floats
    def math(self, name, t, *xs):
        return self.fe.parent.math(self, name, t, *xs)  # each target has its own math library

    def call(self, name, t, *xs):
        return self.b.call(self.fe.parent.intrinsic(name, t, len(xs)), list(xs))

    def f_add(self, t, a, b): return self.b.fadd(a, b)
    def f_sub(self, t, a, b): return self.b.fsub(a, b)
    def f_mul(self, t, a, b): return self.b.fmul(a, b)
    def f_div(self, t, a, b): return self.b.fdiv(a, b)
    def f_rem(self, t, a, b): return self.b.frem(a, b)
    def f_maximum(self, t, a, b): return self.call("maximum", t, a, b)
    def f_minimum(self, t, a, b): return self.call("minimum", t, a, b)
    def f_eq(self, t, a, b): return self.b.fcmp_ordered("==", a, b)
    def f_ne(self, t, a, b): return self.b.fcmp_unordered("!=", a, b)
    def f_lt(self, t, a, b): return self.b.fcmp_ordered("<", a, b)
    def f_le(self, t, a, b): return self.b.fcmp_ordered("<=", a, b)
    def f_gt(self, t, a, b): return self.b.fcmp_ordered(">", a, b)
    def f_ge(self, t, a, b): return self.b.fcmp_ordered(">=", a, b)
    def f_neg(self, t, x): return self.b.fneg(x)
    def f_abs(self, t, x): return self.call("fabs", t, x)

    def expf(self, x):
        """Cephes' expf as straight-line code, so loops vectorise (LLVM has no vector libm here);
        within 2 ulp, inf above 88.72, NaN kept."""
        t = F32
        c = lambda v: ir.Constant(F32, v)  # noqa: E731
        b = self.b
        clamped = self.call("minimum", t, self.call("maximum", t, x, c(-88.3762626647949)), c(88.3762626647950))
        fx = self.call("floor", t, b.fadd(b.fmul(clamped, c(1.44269504088896341)), c(0.5)))
        r = b.fsub(b.fsub(clamped, b.fmul(fx, c(0.693359375))), b.fmul(fx, c(-2.12194440e-4)))
        y = c(1.9875691500e-4)
        for coeff in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
            y = b.fadd(b.fmul(y, r), c(coeff))
        y = b.fadd(b.fadd(b.fmul(y, b.fmul(r, r)), r), c(1.0))
        n = b.fptosi(fx, ir.IntType(32))
        scale = b.bitcast(b.shl(b.add(n, ir.Constant(ir.IntType(32), 127)), ir.Constant(ir.IntType(32), 23)), F32)
        out = b.fmul(y, scale)
        out = b.select(b.fcmp_ordered(">", x, c(88.72283935546875)), c(float("inf")), out)
        return b.select(b.fcmp_unordered("uno", x, x), x, out)

    def tanhf(self, x):
        """A 13/6 rational approximation (as Eigen's), within 7 ulp and vectorisable."""
        t = F32
        c = lambda v: ir.Constant(F32, v)  # noqa: E731
        b = self.b
        bound = 7.90531110763549805
        xc = self.call("minimum", t, self.call("maximum", t, x, c(-bound)), c(bound))
        x2 = b.fmul(xc, xc)
        p = c(-2.76076847742355e-16)
        for coeff in (2.00018790482477e-13, -8.60467152213735e-11, 5.12229709037114e-08, 1.48572235717979e-05,
                      6.37261928875436e-04, 4.89352455891786e-03):
            p = b.fadd(b.fmul(p, x2), c(coeff))
        q = c(1.19825839466702e-06)
        for coeff in (1.18534705686654e-04, 2.26843463243900e-03, 4.89352518554385e-03):
            q = b.fadd(b.fmul(q, x2), c(coeff))
        r = b.fdiv(b.fmul(p, xc), q)
        return b.select(b.fcmp_ordered("<", self.call("fabs", t, x), c(0.0004)), x, r)

    # integers (and i1)
    # (index arithmetic on constants folded here: the IR handed to LLVM is a third smaller)
    def i_add(self, t, a, b): return self.fe.add(a, b) if t == I64 else self.b.add(a, b)
    def i_sub(self, t, a, b): return self.b.sub(a, b)
    def i_mul(self, t, a, b): return self.fe.mul(a, b) if t == I64 else self.b.mul(a, b)

    def i_div(self, t, a, b):
        """Truncating; x / 0 = 0 and MIN / -1 wraps (numpy's results, never LLVM's undefined ones)."""
        if isinstance(b, ir.Constant) and isinstance(b.type, ir.IntType) and b.constant not in (0, -1):
            return self.b.sdiv(a, b)
        zero, one = ir.Constant(t, 0), ir.Constant(t, 1)
        minus_one = self.b.icmp_signed("==", b, ir.Constant(t, -1))
        safe = self.b.select(self.b.or_(self.b.icmp_signed("==", b, zero), minus_one), one, b)
        q = self.b.sdiv(a, safe)
        q = self.b.select(minus_one, self.b.sub(zero, a), q)
        return self.b.select(self.b.icmp_signed("==", b, zero), zero, q)

    def i_rem(self, t, a, b):
        """Truncating, the sign of a; x rem 0 = 0 and MIN rem -1 = 0 (never LLVM's undefined ones)."""
        if isinstance(b, ir.Constant) and isinstance(b.type, ir.IntType) and b.constant not in (0, -1):
            return self.b.srem(a, b)
        zero, one = ir.Constant(t, 0), ir.Constant(t, 1)
        unsafe = self.b.or_(self.b.icmp_signed("==", b, zero), self.b.icmp_signed("==", b, ir.Constant(t, -1)))
        return self.b.select(unsafe, zero, self.b.srem(a, self.b.select(unsafe, one, b)))

    def i_maximum(self, t, a, b): return self.b.select(self.b.icmp_signed(">", a, b), a, b)
    def i_minimum(self, t, a, b): return self.b.select(self.b.icmp_signed("<", a, b), a, b)
    def i_eq(self, t, a, b): return self.b.icmp_signed("==", a, b)
    def i_ne(self, t, a, b): return self.b.icmp_signed("!=", a, b)
    def i_lt(self, t, a, b): return self.b.icmp_signed("<", a, b) if t != I1 else self.b.icmp_unsigned("<", a, b)
    def i_le(self, t, a, b): return self.b.icmp_signed("<=", a, b) if t != I1 else self.b.icmp_unsigned("<=", a, b)
    def i_gt(self, t, a, b): return self.b.icmp_signed(">", a, b) if t != I1 else self.b.icmp_unsigned(">", a, b)
    def i_ge(self, t, a, b): return self.b.icmp_signed(">=", a, b) if t != I1 else self.b.icmp_unsigned(">=", a, b)
    def i_and(self, t, a, b): return self.b.and_(a, b)
    def i_xor(self, t, a, b): return self.b.xor(a, b)
    def i_shl(self, t, a, b): return self.b.shl(a, b)
    def i_shru(self, t, a, b): return self.b.lshr(a, b)
    def i_or(self, t, a, b): return self.b.or_(a, b)
    def i_not(self, t, x): return self.b.not_(x)
    def i_neg(self, t, x): return self.b.neg(x)
    def i_abs(self, t, x): return self.b.select(self.b.icmp_signed("<", x, ir.Constant(t, 0)), self.b.neg(x), x)

    def cast(self, x, src: ElementType, dst: ElementType):
        """mlc.cast per element: saturating float -> int with NaN -> 0; to i1 is `!= 0`."""
        st, dt = scalar_type(src), scalar_type(dst)
        if dst.is_bool:
            return self.b.fcmp_unordered("!=", x, ir.Constant(st, 0.0)) if src.is_float else self.b.icmp_signed("!=", x, ir.Constant(st, 0))
        if src.is_float and dst.is_float:
            return x if st == dt else (self.b.fpext(x, dt) if _bits(st) < _bits(dt) else self.b.fptrunc(x, dt))
        if src.is_float:
            fn = self.fe.parent.declare(f"llvm.fptosi.sat.i{dt.width}.{ {F32: 'f32', F64: 'f64', F16: 'f16'}[st] }", dt, [st])
            return self.b.call(fn, [x])
        if dst.is_float:
            return self.b.uitofp(x, dt) if src.is_bool else self.b.sitofp(x, dt)
        if st.width == dt.width:
            return x
        if st.width < dt.width:
            return self.b.zext(x, dt) if src.is_bool else self.b.sext(x, dt)
        return self.b.trunc(x, dt)


FAST_F32 = {"exp": ArithEmitter.expf, "tanh": ArithEmitter.tanhf}


class _Expansion:
    """The `s` that an elementwise row's scalar expansion builds with (see ir/dialects/mlc.py)."""

    def __init__(self, arith: ArithEmitter, op, t):
        self.arith, self.op, self.t = arith, op, t

    def __call__(self, name, *xs):
        return self.arith.compute(name, list(xs), self.op)

    def const(self, value):
        lane = getattr(self.t, "element", self.t)
        c = ir.Constant(lane, float(value) if lane in (F32, F64) else int(value))
        return ir.Constant(self.t, [c] * self.t.count) if isinstance(self.t, ir.VectorType) else c

    def attr(self, name):
        return self.op.attr(name)


def _bits(t) -> int:
    return {F16: 16, F32: 32, F64: 64}[t]


PART_CHARS = 300_000  # LLVM IR text per part sent off during codegen (ResNet-18: 2.7 MB in about 9 parts)


class Parts:
    """The module's code as parts that LLVM optimises and compiles apart, each in a process of its own
    (runtime/jit.py): a part is sent off as soon as its kernels are emitted, so that workers compile them
    while codegen goes on. Every part declares what the others define; the last (`finish`) holds the
    public functions and defines the global variables (then no longer internal: the others refer to them)."""

    def __init__(self, llvm: ir.Module, send=None, part_chars: int | None = None):
        self.llvm, self.send, self.part_chars = llvm, send, part_chars or PART_CHARS
        self.texts: dict[str, str] = {}  # function name -> its text, once emitted (kernels only)
        self.batch: list[str] = []       # kernels emitted since the last part was sent
        self.sent: set[str] = set()      # kernels sent

    def finished(self, fn: ir.Function):
        """`fn` is complete: its text joins the next part, sent once large enough."""
        if self.send is None:
            return
        self.texts[fn.name] = str(fn)
        self.batch.append(fn.name)
        if sum(len(self.texts[name]) for name in self.batch) >= self.part_chars:
            self._send_batch()

    def _send_batch(self):
        self.send(self._module(set(self.batch), last=False))
        self.sent.update(self.batch)
        self.batch = []

    def finish(self) -> tuple[str, str]:
        """The whole module's text, and the last part: the public functions and the globals (all of it, if
        nothing was sent); the kernels not yet sent go off as a part of their own first."""
        if self.batch:
            self._send_batch()
        if self.sent:
            for g in self.llvm.global_values:
                if isinstance(g, ir.GlobalVariable) and g.linkage == "internal":
                    g.linkage = ""
        for g in self.llvm.global_values:
            if g.name not in self.texts:
                self.texts[g.name] = str(g)
        whole = self._header() + "\n".join(self.texts[g.name] for g in self.llvm.global_values) + self._metadata()
        if not self.sent:
            return whole, whole
        return whole, self._module({g.name for g in self.llvm.global_values if isinstance(g, ir.Function) and g.blocks} - self.sent, last=True)

    def _module(self, mine: set, last: bool) -> str:
        lines = []
        for g in self.llvm.global_values:
            if g.name in mine or (isinstance(g, ir.Function) and not g.blocks):  # (intrinsics, libm: declared in every part)
                lines.append(self.texts.get(g.name) or str(g))
            elif isinstance(g, ir.Function):
                t = g.function_type
                lines.append(f'declare {t.return_type} @"{g.name}"({", ".join(map(str, t.args))})')
            elif last:
                lines.append(self.texts[g.name])
            else:
                lines.append(f'@"{g.name}" = external global {g.value_type}')
        return self._header() + "\n".join(lines) + self._metadata()

    def _header(self) -> str:
        llvm = self.llvm
        return f'; ModuleID = "{llvm.name}"\ntarget triple = "{llvm.triple}"\ntarget datalayout = "{llvm.data_layout}"\n\n'

    def _metadata(self) -> str:
        assert not self.llvm.namedmetadata, "named metadata is not split"
        return "\n" + "".join(f"{md}\n" for md in self.llvm.metadata)  # (branch weights: any part may refer to them)


def emit_module(module: Module, threads: bool = True, profile: dict | None = None, send=None) -> tuple[ir.Module, ModuleEmitter]:
    """LLVM IR for a lowered module (see passes/lower_to_loops.py); with threads, large top-level
    parallel loops call the runtime's `mlc_parallel_for`. With `profile` (the tensor ops' descriptions,
    runtime/profile.py's `describe`), each kernel is timed (see the module docstring). With `send`, parts
    of the module go to it as they are emitted (`Parts`); `emitter.parts.finish()` gives the rest."""
    emitter = ModuleEmitter(module, threads, profile, send)
    try:
        return emitter.emit(), emitter
    except ValueError as e:
        raise error(module.loc, str(e)) from None

