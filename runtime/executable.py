"""Executables: a module compiled to native code, its functions callable on numpy arrays.

    exe = mlc.compile(module, target="cpu")
    y = exe["forward"](x)          # arguments checked against the signature before native code runs

Globals live in the executable (numpy arrays initialised from the module seed) and persist across
calls. Results are numpy arrays that own the memory the native code allocated. A weight that products
read packed (a panels global of the tile pass: a matrix no function stores to), or whose filters
Winograd's convolution reads transformed (the winograd pass's), is packed or transformed here when it
is set (`set_global`, `bind_global`, loading), not at every call; its array in `exe.globals` is read-only,
so that a write in place, which would leave the derived copy behind, fails instead of going unseen.

Compiled with profiling (`mlc.compile(module, profile=True)`, MLC_PROFILE=1), the code counts each
kernel's calls and time: `exe.profile()` is the table (runtime/profile.py).

Threads may call an executable's functions at once: those that store to a global run alone, those that
read globals alongside each other (never during a store), pure ones freely.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import json
import math
import os
import threading
from dataclasses import dataclass, field

import numpy as np

from mlc.ir.core import Module
from mlc.ir.diagnostics import error, format_bytes
from mlc.ir.dialects.mlc import Global
from mlc.ir.interpreter import check_arguments

from mlc.ir.memory import host_memory_bytes

from .jit import JitModule
from .profile import COUNTERS, DESCRIPTIONS, WORDS, Profile, ProfileReport, report_at_exit

GLOBALS_TABLE = "mlc_globals"  # the symbol codegen describes its table of globals in


_libc = ctypes.CDLL(ctypes.util.find_library("c"))
_libc.free.argtypes = [ctypes.c_void_p]


@functools.cache
def keep_freed_memory() -> None:
    """Ask glibc to serve large buffers from its heap and keep freed ones there (as PyTorch's caching
    allocators do), instead of mmap'ing fresh pages per buffer: first-touch page faults of a fresh
    64 MiB result cost more than computing it. MLC_KEEP_FREED_MEMORY=0 leaves malloc as it is."""
    if os.environ.get("MLC_KEEP_FREED_MEMORY", "1") == "0" or not hasattr(_libc, "mallopt"):
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    _libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
    _libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)


@dataclass
class FunctionCode:
    """A compiled function's symbol and the run-time checks its error slot indexes (codegen fills it)."""
    name: str
    checks: list = field(default_factory=list)  # (location, op name, message) of ops with run-time checks


class FunctionTable:
    """exe["forward"](x) and exe.forward(x), for an executable's `functions` (name -> callable)."""

    def __getitem__(self, name: str):
        name = name.lstrip("@")
        if name not in self.functions:
            raise KeyError(f"no public function '@{name}' (functions: {', '.join('@' + n for n in self.functions)})")
        return self.functions[name]

    def __getattr__(self, name: str):
        functions = self.__dict__.get("functions", {})
        if name in functions:
            return functions[name]
        raise AttributeError(f"no public function '@{name}' (functions: {', '.join('@' + n for n in functions)})")


class Executable(FunctionTable):
    """Native code for every public function of a module, with the module's globals."""
    target = "cpu"

    def __init__(self, module: Module, jit: JitModule, codes: dict, globals_: dict | None = None, compiled_here: bool = False):
        """Code for `module` (codes: name -> codegen's FunctionCode, addresses in `jit`); the globals'
        arrays by name, initialised from the module seed when not given. `compiled_here`: made by this
        call, not loaded from the cache or an artifact (the loop IR is not kept: ResNet-18's is ~180k
        objects, which every later full pass of the cycle collector would walk)."""
        keep_freed_memory()
        self.module, self.jit, self.compiled_here = module, jit, compiled_here
        self.globals = globals_ if globals_ is not None else Global.initial_values(module.globals, module.seed)
        self.globals_lock = SharedLock()
        table = _table_of(jit) or [{"name": name} for name in self.globals]
        self._table_index = {entry["name"]: k for k, entry in enumerate(table)}
        self._derived = {entry["name"]: entry for entry in table if "of" in entry}  # name -> what it is computed from
        self._derived_arrays = {name: self.globals.get(name) for name in self._derived}  # (the tile pass's are not in globals)
        for name, entry in self._derived.items():
            if self._derived_arrays[name] is None:
                self._derived_arrays[name] = Global.derive(entry, self.globals[entry["of"]])
            self.globals[entry["of"]].flags.writeable = False  # (set_global derives them again)
        arrays = {**self.globals, **self._derived_arrays}
        self._globals_table = (ctypes.c_void_p * max(len(table), 1))(*[arrays[entry["name"]].ctypes.data for entry in table])
        self.functions = {name: NativeFunction(self, module.functions[name], code) for name, code in codes.items()}
        self._profile = _profile_of(jit)
        if self._profile is not None and profiling_at_exit():
            report_at_exit(self)

    @property
    def profiled(self) -> bool:
        """Whether this code counts its kernels' calls and time (compiled with profile=True)."""
        return self._profile is not None

    def profile(self, reset: bool = False) -> ProfileReport:
        """Each kernel's calls, time, share and rate since the start (or the last reset), slowest first;
        print it for the table. reset=True zeroes the counters after reading them."""
        if self._profile is None:
            raise RuntimeError("this executable was compiled without profiling: compile with "
                               "mlc.compile(module, profile=True) or set MLC_PROFILE=1")
        report = self._profile.report(f"mlc profile: @{self.module.name or 'module'} "
                                      f"({', '.join('@' + n for n in self.functions)})")
        if reset:
            self._profile.reset()
        return report

    def reset_profile(self) -> None:
        if self._profile is not None:
            self._profile.reset()

    def bind_global(self, name: str, array: np.ndarray) -> None:
        """Make the native code read and write global @name in `array` (C-contiguous, of its type) from now
        on: several executables can share one model's weights. A weight with derived copies (packed,
        transformed) has them computed now: write it later through set_global (or bind it again), not in place."""
        old = self.globals[name]
        if array.dtype != old.dtype or array.shape != old.shape or not array.flags.c_contiguous or not array.flags.writeable:
            raise ValueError(f"@{name} needs a writeable C-contiguous {old.dtype} array of shape {old.shape}, "
                             f"got {array.dtype} {array.shape}")
        with self.globals_lock.exclusive():
            self.globals[name] = array
            self._globals_table[self._table_index[name]] = array.ctypes.data
            self._derive_from(name)

    def set_global(self, name: str, value: np.ndarray) -> None:
        with self.globals_lock.exclusive():
            array = self.globals[name]
            read_only = not array.flags.writeable  # (a source of derived globals: see _derive_from)
            array.flags.writeable = True
            try:
                array[...] = value  # in place: the native code holds pointers to these arrays
            finally:
                array.flags.writeable = not read_only
            self._derive_from(name)

    def _derive_from(self, name: str) -> None:
        """The globals derived from global @name computed again from its value (under the exclusive lock)."""
        for derived, entry in self._derived.items():
            if entry["of"] == name:
                self._derived_arrays[derived][...] = Global.derive(entry, self.globals[name])

    @property
    def llvm_ir(self) -> str:
        return self.jit.optimised_ir

    def save(self, path):
        """Write a self-contained artifact (see runtime/artifact.py); the write is atomic."""
        from .artifact import save
        save(self, path)


    def __repr__(self):
        return f"<Executable {', '.join('@' + n for n in self.functions)} for cpu>"


def profiling_at_exit() -> bool:
    """MLC_PROFILE=1: every compile is profiled and each profiled executable that ran prints its table
    to standard error when the process exits."""
    return os.environ.get("MLC_PROFILE", "0") not in ("", "0")


def _table_of(jit: JitModule) -> list | None:
    """The globals in the order of the code's table (codegen/llvm.py), None for code that does not say."""
    address = jit.global_address(GLOBALS_TABLE)
    return json.loads(ctypes.string_at(address).decode("ascii")) if address else None


def _profile_of(jit: JitModule) -> Profile | None:
    """The kernel table and counters a profiled object defines (codegen/llvm.py), else None."""
    counters, descriptions = jit.global_address(COUNTERS), jit.global_address(DESCRIPTIONS)
    if not counters or not descriptions:
        return None
    kernels = json.loads(ctypes.string_at(descriptions).decode("ascii"))
    n = max(len(kernels), 1) * WORDS
    return Profile(kernels, np.ctypeslib.as_array((ctypes.c_int64 * n).from_address(counters)))


class SharedLock:
    """Many holders of `shared()` at once, or one of `exclusive()`; a waiting exclusive holder goes
    before later shared ones (a stream of readers cannot starve a writer). The acquire/release methods
    are the same without a context manager (a call's hot path)."""

    def __init__(self):
        self._mutex = threading.Lock()  # (held directly when nothing needs waiting for: cheaper than the condition)
        self._changed = threading.Condition(self._mutex)
        self._shared = self._writers_waiting = 0
        self._exclusive = False

    def acquire_shared(self):
        with self._mutex:
            if not self._exclusive and not self._writers_waiting:
                self._shared += 1
                return
            self._changed.wait_for(lambda: not self._exclusive and not self._writers_waiting)
            self._shared += 1

    def release_shared(self):
        with self._mutex:
            self._shared -= 1
            if not self._shared and self._writers_waiting:  # (only a writer waits for the readers to leave)
                self._changed.notify_all()

    def acquire_exclusive(self):
        with self._mutex:
            self._writers_waiting += 1
            self._changed.wait_for(lambda: not self._exclusive and not self._shared)
            self._writers_waiting -= 1
            self._exclusive = True

    def release_exclusive(self):
        with self._mutex:
            self._exclusive = False
            self._changed.notify_all()

    @contextlib.contextmanager
    def shared(self):
        self.acquire_shared()
        try:
            yield
        finally:
            self.release_shared()

    @contextlib.contextmanager
    def exclusive(self):
        self.acquire_exclusive()
        try:
            yield
        finally:
            self.release_exclusive()


def global_effects(module: Module, name: str) -> str | None:
    """"writes" when function @name (or one it calls) stores to a global, "reads" when it loads one, else None."""
    seen, todo, found = set(), [name], set()
    while todo:
        f = module.functions.get(todo.pop())
        if f is None or f.sym_name in seen:
            continue
        seen.add(f.sym_name)
        for op in f.body.walk():
            found.add(op.name)
            if op.name == "func.call":
                todo.append(op.attr("callee"))
    return "writes" if "mlc.global_store" in found else "reads" if "mlc.global_load" in found else None


class NativeFunction:
    """A compiled public function, called on numpy arrays.

    A call's arguments go to the native code in the slots array of codegen/llvm.py. For each input
    signature (the arguments' shapes) a `CallPlan` holds that array, the dims and the status prebuilt,
    so a call whose arguments are C-contiguous numpy arrays of the declared dtypes (checked in a few
    attribute reads) only writes their data pointers. Anything else (other dtypes, views, lists,
    keywords, a new shape) takes the full `check_arguments`, which converts or reports the located
    error, and then runs through the plan of the checked arrays' shapes."""

    MAX_PLANS = 64  # signatures kept per function (dynamic dims: the oldest go first)

    def __init__(self, exe: Executable, func, code):
        self.exe, self.func, self.code = exe, func, code
        self.address = exe.jit.address(code.name)
        self.c_function = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(self.address)
        self.result_types = list(func.type.results)
        self.results = [(t.rank, np.dtype(t.element.np_dtype).str) for t in self.result_types]  # (rank, numpy typestr)
        inputs = func.type.inputs
        self.dtypes = [np.dtype(t.element.np_dtype) for t in inputs]
        self.fast = not any(t.element.name == "bf16" for t in inputs)  # (bf16 arguments are rounded on each call)
        self.plans: dict[tuple, CallPlan] = {}  # argument shapes -> plan
        effects = global_effects(exe.module, func.sym_name)
        locks = exe.globals_lock
        self.acquire, self.release = ((locks.acquire_exclusive, locks.release_exclusive) if effects == "writes" else
                                      (locks.acquire_shared, locks.release_shared) if effects else (None, None))

    def __call__(self, *args, **kwargs):
        if not kwargs and self.fast:
            try:
                plan = self.plans.get(tuple([a.shape for a in args]))
            except (AttributeError, TypeError):  # (not arrays)
                plan = None
            if plan is not None:
                for a, dtype in zip(args, self.dtypes):
                    if type(a) is not np.ndarray or a.dtype is not dtype or not a.flags.c_contiguous:
                        break
                else:
                    return self.run(plan, args)
        arrays = check_arguments(self.func, args, kwargs)
        return self.run(self.plan(tuple(a.shape for a in arrays)), arrays)

    def plan(self, shapes: tuple) -> "CallPlan":
        plan = self.plans.get(shapes)
        if plan is None:
            plan = CallPlan(self, shapes)
            if self.fast:
                if len(self.plans) >= self.MAX_PLANS:
                    with contextlib.suppress(KeyError, RuntimeError, StopIteration):  # (another thread got there)
                        del self.plans[next(iter(self.plans))]
                self.plans[shapes] = plan
        return plan

    def run(self, plan: "CallPlan", arrays):
        """The native code on checked arrays of plan's shapes; a plan another thread is using is
        replaced by a fresh one for this call."""
        if not plan.busy.acquire(False):
            plan = CallPlan(self, plan.shapes)
            plan.busy.acquire()
        try:
            slots = plan.slots
            if _POINTER_OFFSET is not None:
                for i, a in zip(plan.data_slots, arrays):
                    slots[i] = _pointer_at(id(a) + _POINTER_OFFSET).value  # (a.data's address: see _pointer_offset)
            else:
                for i, a in zip(plan.data_slots, arrays):
                    slots[i] = a.ctypes.data
            status = plan.status
            status[0] = status[2] = 0
            if self.acquire is None:
                self.c_function(plan.address)
            else:
                self.acquire()
                try:
                    self.c_function(plan.address)
                finally:
                    self.release()
            if status[0]:
                loc, op_name, message = self.code.checks[status[0] - 1]
                requested = ctypes.c_double.from_buffer(status, 16).value  # (a failed allocation's size)
                raise error(loc, message.replace("{bytes}", format_bytes(requested)), op_name)
            out_data, out_dims = plan.out_data, plan.out_dims
            results = [_wrap(out_data[r], tuple(out_dims[r][:rank]), typestr) for r, (rank, typestr) in enumerate(self.results)]
        finally:
            plan.busy.release()
        return results[0] if len(results) == 1 else tuple(results)


class CallPlan:
    """The slots array (codegen/llvm.py) of one function for one signature, with its dims, result slots
    and status: built once, then each call writes only the arguments' data pointers. One call uses a
    plan at a time (`busy`)."""

    def __init__(self, function: NativeFunction, shapes: tuple):
        n_in, n_out = len(shapes), len(function.result_types)
        self.shapes, self.busy = shapes, threading.Lock()
        self.slots = (ctypes.c_void_p * (2 + 2 * n_in + 2 * n_out))()
        self.address = ctypes.addressof(self.slots)
        self.data_slots = [1 + 2 * k for k in range(n_in)]
        self.dims = [(ctypes.c_int64 * max(len(s), 1))(*s) for s in shapes]
        self.out_data = (ctypes.c_void_p * max(n_out, 1))()
        self.out_dims = [(ctypes.c_int64 * max(t.rank, 1))() for t in function.result_types]
        self.status = (ctypes.c_int64 * 3)(0, host_memory_bytes(), 0)
        self.slots[0] = ctypes.addressof(function.exe._globals_table)
        for k, d in enumerate(self.dims):
            self.slots[2 + 2 * k] = ctypes.addressof(d)
        for r, d in enumerate(self.out_dims):
            self.slots[1 + 2 * n_in + 2 * r] = ctypes.addressof(self.out_data) + r * ctypes.sizeof(ctypes.c_void_p)
            self.slots[2 + 2 * n_in + 2 * r] = ctypes.addressof(d)
        self.slots[1 + 2 * n_in + 2 * n_out] = ctypes.addressof(self.status)


def _pointer_offset() -> int | None:
    """Where an array's data pointer lies in its object, else None. `a.ctypes.data` costs microseconds;
    the pointer is the first field after the object header of numpy's array struct
    (PyArrayObject_fields, part of numpy's ABI), read through ctypes where a probe confirms the layout."""
    offset = object.__basicsize__  # (the header: reference count and type)
    probes = (np.arange(4.0), np.arange(4.0)[1:], np.ones((2, 3), np.float32).T, np.zeros(0, np.int64))
    if all(_pointer_at(id(p) + offset).value == (p.ctypes.data or None) for p in probes):
        return offset
    return None


_pointer_at = ctypes.c_void_p.from_address
_POINTER_OFFSET = _pointer_offset()


class _Malloced:
    """Memory the native code malloc'd, lent to one numpy array through the array interface: the
    array's base, freed when the array (and every view of it) is collected."""
    __slots__ = ("__array_interface__",)
    _free = _libc.free  # (held by the class: still there while the interpreter shuts down)

    def __init__(self, address: int, shape: tuple, typestr: str):
        self.__array_interface__ = {"data": (address, False), "shape": shape, "typestr": typestr, "version": 3}

    def __del__(self):
        self._free(self.__array_interface__["data"][0])


def _wrap(address: int | None, shape: tuple, typestr: str) -> np.ndarray:
    """A numpy array (of numpy typestr, e.g. "<f4") over memory the native code malloc'd; freed when the
    array is collected."""
    if not address or not math.prod(shape):  # (nothing to lend: an empty result)
        if address:
            _libc.free(address)
        return np.empty(shape, typestr)
    return np.asarray(_Malloced(address, shape, typestr))
