"""GPU executables: the host code of each function runs here, op by op; its kernels run on a device.

    exe = mlc.compile(module, target="cuda")     # PTX for every kernel (codegen/nvptx.py)
    y = exe["forward"](x)

The host code is what the cuda pipeline leaves outside its gpu.launch ops: allocations, sizes and
checks on them, loops around kernels (a scan's steps), calls, globals. A device holds the memory and
runs the launches: `CudaDevice` through pycuda (imported when first needed: the `cuda` extra), or
`SimulatedDevice` (MLC_GPU_SIMULATE=1), which runs each launch on the lockstep interpreter with its
race detector, so that everything but the PTX itself is tested on machines without a GPU. Globals (weights, optimiser state) stay on the device
between calls; results come back as numpy arrays.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from mlc.ir.core import Module
from mlc.ir.diagnostics import Diagnostics, DiagnosticError, error
from mlc.ir.dialects.mlc import Global
from mlc.ir.dialects.shapes import fmt_shape
from mlc.ir.interpreter import Interpreter, check_arguments
from mlc.ir.registry import TERMINATOR
from mlc.ir.types import ElementType, MemRefType

from .executable import FunctionTable


@dataclass
class Kernel:
    """How to launch one kernel (codegen/nvptx.py's KernelCode has the same fields)."""
    name: str
    launch: object                      # its gpu.launch in the lowered module
    params: list                        # the host values it takes (gpu.Launch.captured)
    block: list
    checks: list = field(default_factory=list)


class GpuExecutable(FunctionTable):
    """Kernels (PTX) for every public function of a module lowered by the cuda pipeline."""
    target = "cuda"

    def __init__(self, module: Module, lowered: Module, ptx, kernels: list, arch: str, device=None):
        """ptx: the kernels' PTX, or a function making it (called when first needed)."""
        self.module, self.lowered, self.arch = module, lowered, arch
        self.initial_globals: dict | None = None  # values to start from (a loaded artifact's), else the seed's
        self._ptx = ptx
        self.kernels = {id(k.launch): k for k in kernels}
        self._device = device
        self._device_globals: dict | None = None
        self.mirrors: dict = {}  # global -> the host array bound to it (bind_global), kept up to date
        self.constants: dict = {}  # id(mlc.constant op) -> its value on the device
        self.globals = GlobalsView(self)
        self.functions = {name: GpuFunction(self, name) for name, f in module.functions.items() if not f.is_private}

    @property
    def ptx(self) -> str:
        if callable(self._ptx):
            self._ptx = self._ptx()
        return self._ptx

    @property
    def device(self):
        if self._device is None and os.environ.get("MLC_GPU_SIMULATE") == "1":
            self._device = SimulatedDevice()
        if self._device is None:
            try:
                self._device = CudaDevice()
            except RuntimeError as e:  # no pycuda, no driver, no GPU: a diagnostic, not a traceback
                raise error(self.module.loc, str(e)) from None
        if not getattr(self._device, "loaded", False):
            try:
                ptx = self.ptx
            except FileNotFoundError as e:
                raise error(self.module.loc, str(e)) from None
            self._device.load(ptx, self.kernels.values())
        return self._device

    @property
    def device_globals(self) -> dict:
        """Each global's buffer on the device, made on first use from its starting value."""
        if self._device_globals is None:
            self._device_globals = {name: self.device.upload(self.starting_value(name)) for name in self.module.globals}
        return self._device_globals

    def starting_value(self, name: str) -> np.ndarray:
        """A loaded artifact's value of the global, else the module seed's."""
        start, op = self.initial_globals or {}, self.module.globals[name]
        if name in start:
            return start[name]
        if Global.derived_kind(op):
            return Global.derived_of(op, self.starting_value(op.attr("of")))
        return Global.initial_value(op, self.module.seed)

    def set_global(self, name: str, value: np.ndarray) -> None:
        value = np.asarray(value, self.device_globals[name].dtype)
        self.device.copy(self.device_globals[name], self.device.upload(value))
        for derived, op in self.module.globals.items():  # (derived globals are always their source's)
            if Global.derived_kind(op) and op.attr("of") == name:
                self.device.copy(self.device_globals[derived], self.device.upload(Global.derived_of(op, value)))

    def save(self, path):
        """Write a self-contained artifact (lowered IR, PTX, globals; see runtime/artifact.py), atomically."""
        from .artifact import save
        save(self, path)

    def bind_global(self, name: str, array: np.ndarray) -> None:
        """Global @name takes `array`'s value, and `array` follows it: after each call that stores
        @name, the new value is copied back into it (model weights a training step updates)."""
        old = self.module.globals[name].attr("type")
        if array.dtype != old.element.np_dtype or array.shape != tuple(old.shape) or not array.flags.writeable:
            raise ValueError(f"@{name} needs a writeable {old.element.np_dtype} array of shape {tuple(old.shape)}, "
                             f"got {array.dtype} {array.shape}")
        self.device.copy(self.device_globals[name], self.device.upload(array))
        self.mirrors[name] = array

    def __repr__(self):
        return f"<GpuExecutable {', '.join('@' + n for n in self.functions)} for cuda ({self.arch}, {len(self.kernels)} kernels)>"


class GlobalsView(Mapping):
    """The globals' current values, read from the device when asked for."""

    def __init__(self, exe: GpuExecutable):
        self.exe = exe

    def __getitem__(self, name: str) -> np.ndarray:
        if self.exe._device_globals is None:  # nothing ran yet: no device needed
            return self.exe.starting_value(name)
        return self.exe.device.download(self.exe.device_globals[name])

    def __iter__(self):
        return iter(self.exe.module.globals)

    def __len__(self):
        return len(self.exe.module.globals)


class GpuFunction:
    def __init__(self, exe: GpuExecutable, name: str):
        self.exe, self.name = exe, name
        self.stores = _globals_stored(exe.lowered, name)

    def __call__(self, *args, **kwargs):
        exe = self.exe
        arrays = check_arguments(exe.module.functions[self.name], args, kwargs)
        device = exe.device
        run = HostRun(exe, device)
        results = run.call(self.name, [device.upload(a) for a in arrays])
        run.check_errors()
        out = [device.download(r) for r in results]
        for buf in run.live.values():
            device.free(buf)
        for name in self.stores & exe.mirrors.keys():
            exe.mirrors[name][...] = device.download(exe.device_globals[name])
        return out[0] if len(out) == 1 else tuple(out)


def _globals_stored(module: Module, name: str, seen=None) -> set:
    """The globals a function (or one it calls) stores."""
    seen = set() if seen is None else seen
    seen.add(name)
    out = set()
    for op in module.functions[name].body.walk():
        if op.name == "mlc.global_store":
            out.add(op.attr("global"))
        elif op.name == "func.call" and op.attr("callee") not in seen:
            out |= _globals_stored(module, op.attr("callee"), seen)
    return out


class HostRun:
    """One call: the host ops of the lowered functions, with device buffers for memrefs and tensors."""

    def __init__(self, exe: GpuExecutable, device):
        self.exe, self.device = exe, device
        self.live: dict = {}       # id -> buffer this call allocated and has not freed (the results among them)
        self.errors: list = []     # (kernel, error word) per launch

    def call(self, name: str, args: list) -> list:
        f = self.exe.lowered.functions[name]
        return self.run_block(f.body, dict(zip(f.args, args)))

    def run_block(self, block, env: dict) -> list:
        for op in block:
            ins = [env[v] for v in op.operands]
            if TERMINATOR in op.opdef.traits:
                return ins
            env.update(zip(op.results, self.run_op(op, ins, env)))
        return []

    def run_op(self, op, ins, env) -> list:
        name = op.name
        if name in ("mem.from_tensor", "mem.to_tensor"):  # the same memory (lowered code writes only what it allocated)
            return ins
        if name == "mlc.global_load":
            return [self.exe.device_globals[op.attr("global")]]
        if name == "mlc.global_store":
            target = self.exe.device_globals[op.attr("global")]
            if ins[0] is not target:
                self.device.copy(target, ins[0])
            return []
        if name == "mlc.constant":  # uploaded once, kept on the device with the globals
            held = self.exe.constants.get(id(op))
            if held is None:
                held = self.exe.constants[id(op)] = self.device.upload(np.asarray(op.attr("value")))
            return [held]
        if name == "mem.alloc":
            t = op.results[0].type
            sizes = iter(int(v) for v in ins)
            buf = self.device.alloc(tuple(next(sizes) if d is None else d for d in t.shape), t.element.np_dtype)
            self.live[id(buf)] = buf
            return [buf]
        if name == "mem.dealloc":
            del self.live[id(ins[0])]
            self.device.free(ins[0])
            return []
        if name == "mem.dim":
            return [np.int64(ins[0].shape[op.attr("axis")])]
        if name == "mem.reshape":  # a view: the same device memory
            sizes = iter(int(v) for v in ins[1:])
            return [self.device.reshape(ins[0], tuple(next(sizes) if d is None else d for d in op.results[0].type.shape))]
        if name == "mem.subview":  # a view: the same device memory
            i, n = int(ins[1]), ins[0].shape[0]
            if not 0 <= i < n:
                raise error(op.loc, f"index {i} is out of bounds for dim 0 of a buffer of shape {fmt_shape(ins[0].shape)}", op.name)
            return [self.device.subview(ins[0], i)]
        if name == "loop.for":
            carried = list(ins[2:])
            for i in range(int(ins[0]), int(ins[1]), op.attr("step")):
                body = op.regions[0].blocks[0]
                carried = self.run_block(body, {**env, **dict(zip(body.args, [np.int64(i)] + carried))})
            return carried
        if name == "loop.if":
            return self.run_block(op.regions[0 if ins[0] else 1].blocks[0], dict(env))
        if name == "gpu.launch":
            kernel = self.exe.kernels[id(op)]
            grid = [int(g) for g in ins]
            if min(grid) > 0:
                word = self.device.alloc((1,), np.int64, fill=0)
                self.errors.append((kernel, word))
                self.device.launch(kernel, grid, [env[v] for v in kernel.params], word)
            return []
        if name == "func.call":
            return self.call(op.attr("callee"), ins)
        if name == "mem.check" or name.startswith("arith."):
            return _host_scalar_op(op, ins)
        raise error(op.loc, "the GPU backend's host code cannot run this op", op.name)

    def check_errors(self):
        """A failed run-time check in a kernel (an index read from the data out of range) is its error."""
        for kernel, word in self.errors:
            value = int(self.device.download(word)[0])
            self.device.free(word)
            if value:
                loc, op_name, message = kernel.checks[value - 1]
                d = Diagnostics()
                d.error(loc, message, op_name)
                raise DiagnosticError(d.errors)


def _host_scalar_op(op, ins) -> list:
    """A check or an arith op on host scalars: its interpreter kernel, results in their types."""
    out = op.opdef.interpret(ins, op, None)
    return [np.asarray(out).astype(r.type.np_dtype)[()] for r in op.results]


# --- devices ----------------------------------------------------------------------------------------------

class SimulatedDevice:
    """Device memory as numpy arrays and launches on the lockstep interpreter (with its race detector)."""
    loaded = True

    def __init__(self):
        self.interpreter = None

    def load(self, ptx, kernels):
        pass

    def alloc(self, shape, dtype, fill=None):
        return np.full(shape, np.nan if fill is None and np.dtype(dtype).kind == "f" else (fill or 0), dtype)

    def free(self, buf):
        buf[...] = np.nan if buf.dtype.kind == "f" else -77  # a use after free shows in the results

    def upload(self, array):
        return np.array(array, order="C")

    def download(self, buf):
        return np.array(buf)

    def copy(self, dst, src):
        dst[...] = src

    def reshape(self, buf, shape):
        view = buf.view()
        view.shape = shape  # (never a copy: writes through the view reach the buffer)
        return view

    def subview(self, buf, i):
        return buf[i]

    def launch(self, kernel, grid, args, error_word):
        from mlc.ir.lockstep import Launch
        interp = Interpreter.__new__(Interpreter)
        interp.env = dict(zip(kernel.params, args))
        Launch(interp, kernel.launch, grid, list(kernel.block)).run(interp.env)


class CudaDevice:
    """The first GPU, through pycuda: its primary context, one stream, a memory pool, page-locked
    staging for transfers, the module loaded from PTX with one prepared function per kernel."""

    def __init__(self):
        try:
            import pycuda.driver as cuda
            from pycuda.tools import DeviceMemoryPool
        except ImportError:
            raise RuntimeError("target 'cuda' compiled its kernels to PTX, but cannot run them here: pycuda is not "
                               "installed (pip install 'mlc[cuda]' on a machine with an NVIDIA driver)") from None
        try:
            cuda.init()
            self.context = cuda.Device(0).retain_primary_context()
        except cuda.Error as e:
            raise RuntimeError(f"target 'cuda' cannot run here: no usable GPU ({e})") from None
        self.context.push()
        self.cuda, self.pool, self.stream = cuda, DeviceMemoryPool(), cuda.Stream()
        self.functions: dict = {}
        self.loaded = False
        self.timed: list | None = None  # (start, end) events per launch while profiling (benchmarks/gpu.py)

    def load(self, ptx: str, kernels):
        self.module = self.cuda.module_from_buffer(ptx.encode())
        for k in kernels:
            fn = self.module.get_function(k.name)
            fn.prepare(_param_format(k.params) + "P")
            self.functions[k.name] = fn
        self.loaded = True

    def alloc(self, shape, dtype, fill=None):
        buf = DeviceBuffer(self.pool.allocate(max(int(np.prod(shape)) * np.dtype(dtype).itemsize, 1)), shape, np.dtype(dtype))
        if fill is not None:
            self.cuda.memset_d8_async(buf.ptr, fill, buf.nbytes or 1, self.stream)
        return buf

    def free(self, buf):
        buf.allocation.free()

    def upload(self, array):
        array = np.ascontiguousarray(array)
        buf = self.alloc(array.shape, array.dtype)
        staging = self.cuda.pagelocked_empty(array.shape, array.dtype)
        staging[...] = array
        self.cuda.memcpy_htod_async(buf.ptr, staging, self.stream)
        self.stream.synchronize()
        return buf

    def download(self, buf):
        out = self.cuda.pagelocked_empty(buf.shape, buf.dtype)
        self.cuda.memcpy_dtoh_async(out, buf.ptr, self.stream)
        self.stream.synchronize()
        return np.array(out)

    def copy(self, dst, src):
        self.cuda.memcpy_dtod_async(dst.ptr, src.ptr, src.nbytes, self.stream)

    def reshape(self, buf, shape):
        return DeviceBuffer(buf.allocation, shape, buf.dtype, buf.ptr)  # (views are never freed: their buffer is)

    def subview(self, buf, i):
        row = DeviceBuffer(buf.allocation, buf.shape[1:], buf.dtype, buf.ptr)
        row.ptr += i * row.nbytes
        return row

    def launch(self, kernel, grid, args, error_word):
        packed = []
        for v, a in zip(kernel.params, args):
            if isinstance(v.type, MemRefType):
                packed.append(a.ptr)
                packed += [np.int64(n) for n, d in zip(a.shape, v.type.shape) if d is None]
            else:
                packed.append(np.asarray(a).astype(_param_dtype(v.type)))
        grid3 = tuple(grid) + (1,) * (3 - len(grid))
        block3 = tuple(kernel.block) + (1,) * (3 - len(kernel.block))
        if self.timed is not None:
            start, end = self.cuda.Event(), self.cuda.Event()
            start.record(self.stream)
        self.functions[kernel.name].prepared_async_call(grid3, block3, self.stream, *packed, error_word.ptr)
        if self.timed is not None:
            end.record(self.stream)
            self.timed.append((start, end))

    def kernel_milliseconds(self) -> float:
        """The time the kernels launched since the last call took on the GPU (while `timed` is a list)."""
        self.stream.synchronize()
        total = sum(end.time_since(start) for start, end in self.timed)
        self.timed = []
        return total


class DeviceBuffer:
    def __init__(self, allocation, shape, dtype, ptr=None):
        self.allocation, self.shape, self.dtype = allocation, tuple(shape), dtype
        self.ptr = int(allocation) if ptr is None else ptr  # (a view's starts inside the allocation)
        self.nbytes = int(np.prod(shape)) * dtype.itemsize


_FORMATS = {"f16": "e", "bf16": "f", "f32": "f", "f64": "d", "i1": "b", "i8": "b", "i32": "i", "i64": "q", "index": "q"}


def _param_dtype(t: ElementType):
    return np.int8 if t.is_bool else t.np_dtype


def _param_format(params) -> str:
    out = ""
    for v in params:
        t = v.type
        out += "P" + "q" * t.shape.count(None) if isinstance(t, MemRefType) else _FORMATS[t.name]
    return out

