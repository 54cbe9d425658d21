"""Executables: a module compiled to native code, its functions callable on numpy arrays.

    exe = mlc.compile(module, target="cpu")
    y = exe["forward"](x)          # arguments checked against the signature before native code runs

Globals live in the executable (numpy arrays initialised from the module seed) and persist across
calls. Results are numpy arrays that own the memory the native code allocated.

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
import weakref
from dataclasses import dataclass, field

import numpy as np

from mlc.ir.core import Module
from mlc.ir.diagnostics import error, format_bytes
from mlc.ir.dialects.mlc import Global
from mlc.ir.interpreter import check_arguments

from mlc.ir.memory import host_memory_bytes

from .jit import JitModule
from .profile import COUNTERS, DESCRIPTIONS, WORDS, Profile, ProfileReport, report_at_exit


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

    def __init__(self, module: Module, jit: JitModule, codes: dict, globals_: dict | None = None, lowered: Module | None = None):
        """Code for `module` (codes: name -> codegen's FunctionCode, addresses in `jit`); the globals'
        arrays by name, initialised from the module seed when not given."""
        keep_freed_memory()
        self.module, self.jit, self.lowered = module, jit, lowered
        self.globals = globals_ if globals_ is not None else \
            {name: Global.initial_value(op, module.seed) for name, op in module.globals.items()}
        self.globals_lock = SharedLock()
        self._globals_table = (ctypes.c_void_p * max(len(self.globals), 1))(*[a.ctypes.data for a in self.globals.values()])
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
        on: several executables can share one model's weights."""
        old = self.globals[name]
        if array.dtype != old.dtype or array.shape != old.shape or not array.flags.c_contiguous or not array.flags.writeable:
            raise ValueError(f"@{name} needs a writeable C-contiguous {old.dtype} array of shape {old.shape}, "
                             f"got {array.dtype} {array.shape}")
        with self.globals_lock.exclusive():
            self.globals[name] = array
            self._globals_table[list(self.globals).index(name)] = array.ctypes.data

    def set_global(self, name: str, value: np.ndarray) -> None:
        with self.globals_lock.exclusive():
            self.globals[name][...] = value  # in place: the native code holds pointers to these arrays

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
    before later shared ones (a stream of readers cannot starve a writer)."""

    def __init__(self):
        self._changed = threading.Condition()
        self._shared = self._writers_waiting = 0
        self._exclusive = False

    @contextlib.contextmanager
    def shared(self):
        with self._changed:
            self._changed.wait_for(lambda: not self._exclusive and not self._writers_waiting)
            self._shared += 1
        try:
            yield
        finally:
            with self._changed:
                self._shared -= 1
                self._changed.notify_all()

    @contextlib.contextmanager
    def exclusive(self):
        with self._changed:
            self._writers_waiting += 1
            self._changed.wait_for(lambda: not self._exclusive and not self._shared)
            self._writers_waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._changed:
                self._exclusive = False
                self._changed.notify_all()


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
    def __init__(self, exe: Executable, func, code):
        self.exe, self.func, self.code = exe, func, code
        self.address = exe.jit.address(code.name)
        self.c_function = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(self.address)
        self.result_types = list(func.type.results)
        effects = global_effects(exe.module, func.sym_name)
        self.lock = (exe.globals_lock.exclusive if effects == "writes" else exe.globals_lock.shared if effects
                     else contextlib.nullcontext)

    def __call__(self, *args, **kwargs):
        arrays = check_arguments(self.func, args, kwargs)
        n_in, n_out = len(arrays), len(self.result_types)
        slots = (ctypes.c_void_p * (2 + 2 * n_in + 2 * n_out))()
        dims = [np.array(a.shape if a.ndim else [0], np.int64) for a in arrays]
        out_data = (ctypes.c_void_p * max(n_out, 1))()
        out_dims = [np.zeros(max(t.rank, 1), np.int64) for t in self.result_types]
        status = np.array([0, host_memory_bytes(), 0], np.int64)  # see codegen/llvm.py
        slots[0] = ctypes.addressof(self.exe._globals_table)
        for k, (a, d) in enumerate(zip(arrays, dims)):
            slots[1 + 2 * k] = a.ctypes.data
            slots[2 + 2 * k] = d.ctypes.data
        for r in range(n_out):
            slots[1 + 2 * n_in + 2 * r] = ctypes.addressof(out_data) + r * ctypes.sizeof(ctypes.c_void_p)
            slots[2 + 2 * n_in + 2 * r] = out_dims[r].ctypes.data
        slots[1 + 2 * n_in + 2 * n_out] = status.ctypes.data
        with self.lock():
            self.c_function(ctypes.addressof(slots))
        if status[0]:
            loc, op_name, message = self.code.checks[status[0] - 1]
            requested = float(status[2:].view(np.float64)[0])  # (a failed allocation's)
            raise error(loc, message.replace("{bytes}", format_bytes(requested)), op_name)
        results = [_wrap(out_data[r], out_dims[r][: t.rank], t.element.np_dtype) for r, t in enumerate(self.result_types)]
        return results[0] if n_out == 1 else tuple(results)


def _wrap(address: int, shape, dtype) -> np.ndarray:
    """A numpy array over memory the native code malloc'd; freed when the array is collected."""
    shape = tuple(int(d) for d in shape)
    count = int(np.prod(shape, dtype=np.int64))
    holder = (ctypes.c_byte * max(count * dtype.itemsize, 1)).from_address(address)
    weakref.finalize(holder, _libc.free, address)
    return np.frombuffer(holder, dtype, count).reshape(shape)
