"""LLVM IR to native code in this process (llvmlite MCJIT), optimised for the host CPU.

LLVM's global context is not thread-safe: parsing, optimising and loading hold `_lock`, so threads may
compile at once. The native code itself is reentrant (its state lives on the caller's stack)."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading

import llvmlite.binding as llvm

from mlc.ir import collectives

from . import threads
from .distributed import CALLBACKS

_lock = threading.RLock()
_libc = ctypes.CDLL(ctypes.util.find_library("c"))
_ready = False
_symbols: set[str] = set()


def _initialise():
    global _ready
    with _lock:
        if not _ready:
            llvm.initialize_native_target()
            llvm.initialize_native_asmprinter()
            _ready = True


def target_machine():
    _initialise()
    target = llvm.Target.from_triple(llvm.get_process_triple())
    return target.create_target_machine(cpu=llvm.get_host_cpu_name(), features=llvm.get_host_cpu_features().flatten(),
                                        opt=3, codemodel="jitdefault")


def host_vector_bytes() -> int:
    """The widest vector registers of this CPU: 64 with AVX-512, else 32."""
    _initialise()
    return 64 if "+avx512f" in llvm.get_host_cpu_features().flatten().split(",") else 32


# --- threads: native code hands large parallel loops to `mlc_parallel_for` -------------------------------
# The native pool of runtime/threads.py, built once; where it cannot be built, `_parallel_for` (Python).

_native_pool: threads.NativePool | bool | None = None  # (False: could not be built)
_CHUNK = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64)
_chunks: dict[int, object] = {}
_pool = None
_pool_lock = threading.Lock()


def _workers() -> int:
    """MLC_NUM_THREADS, else this process's share of the cores: the processes of a distributed run on
    one machine split them (more threads than cores, and each wait for the others costs a time slice)."""
    env = os.environ.get("MLC_NUM_THREADS")
    if env and env.isdigit():
        return max(1, int(env))
    return max(1, len(os.sched_getaffinity(0)) // getattr(collectives.current(), "local_size", 1))


def native_pool() -> threads.NativePool | None:
    """The native thread pool, built on first use with its thread count refreshed from `_workers()`;
    None where it could not be built."""
    global _native_pool
    with _lock:
        if _native_pool is None:
            _native_pool = False
            if threads.SUPPORTED:
                try:
                    for name, address in threads.libc_functions().items():
                        llvm.add_symbol(name, address)
                    tm = target_machine()
                    engine = llvm.create_mcjit_compiler(optimise(threads.POOL, tm), tm)
                    engine.finalize_object()
                    _native_pool = threads.NativePool(engine)
                except (OSError, AttributeError, RuntimeError):  # (no such C function, or LLVM refused): Python's pool
                    pass
        if _native_pool:
            _native_pool.threads = _workers()
        return _native_pool or None


def _parallel_for(fn: int, ctx: int, lo: int, hi: int):
    """The fallback: [lo, hi) split into one chunk per thread of a Python pool; ctypes releases the GIL
    while each chunk runs."""
    global _pool
    chunk = _chunks.get(fn)
    if chunk is None:
        chunk = _chunks[fn] = _CHUNK(fn)
    n = _workers()
    if n == 1 or hi - lo < 2:
        chunk(ctx, lo, hi)
        return
    with _pool_lock:  # (callers on several threads share one pool)
        if _pool is None:
            from concurrent.futures import ThreadPoolExecutor
            _pool = ThreadPoolExecutor(max_workers=n - 1, thread_name_prefix="mlc")
    bounds = [lo + (hi - lo) * k // n for k in range(n + 1)]
    futures = [_pool.submit(chunk, ctx, a, b) for a, b in zip(bounds[1:-1], bounds[2:])]
    chunk(ctx, bounds[0], bounds[1])
    for f in futures:
        f.result()


_parallel_for_c = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64)(_parallel_for)


def _provide(symbols):
    """Make the runtime's functions (threads, collectives: runtime/distributed.py) and libm functions
    (tanhf, erff, ...) resolvable by the JIT."""
    if "mlc_parallel_for" not in _symbols:
        pool = native_pool()
        llvm.add_symbol("mlc_parallel_for", pool.parallel_for if pool else ctypes.cast(_parallel_for_c, ctypes.c_void_p).value)
        _symbols.add("mlc_parallel_for")
    for name, fn in CALLBACKS.items():
        if name not in _symbols:
            llvm.add_symbol(name, ctypes.cast(fn, ctypes.c_void_p).value)
            _symbols.add(name)
    if "clock_gettime" not in _symbols:  # profiled code's clock (codegen/llvm.py), called directly: C, no Python
        llvm.add_symbol("clock_gettime", ctypes.cast(_libc.clock_gettime, ctypes.c_void_p).value)
        _symbols.add("clock_gettime")
    libm = ctypes.CDLL(ctypes.util.find_library("m"))
    for name in symbols:
        if name not in _symbols:
            llvm.add_symbol(name, ctypes.cast(getattr(libm, name), ctypes.c_void_p).value)
            _symbols.add(name)


def optimise(llvm_ir: str, tm) -> "llvm.ModuleRef":
    module = llvm.parse_assembly(llvm_ir)
    module.triple, module.data_layout = tm.triple, str(tm.target_data)
    module.verify()
    pto = llvm.create_pipeline_tuning_options(speed_level=3)
    pto.loop_vectorization = True
    pto.slp_vectorization = True
    # (no loop unrolling: the tiled kernels come unrolled, and LLVM's unroller blew small copy nests up
    # to thousands of instructions: ResNet-18's LLVM time 19 -> 7.6 s, run times unchanged)
    pto.loop_unrolling = False
    pb = llvm.create_pass_builder(tm, pto)
    pb.getModulePassManager().run(module, pb)
    return module


def host_key() -> dict:
    """What native code depends on: the CPU, its features and the LLVM behind llvmlite."""
    _initialise()
    import llvmlite
    return {"triple": llvm.get_process_triple(), "cpu": llvm.get_host_cpu_name(),
            "features": llvm.get_host_cpu_features().flatten(), "llvmlite": llvmlite.__version__}


class JitModule:
    """Optimised LLVM IR and the native code made from it (or loaded: `object_code`)."""

    def __init__(self, llvm_ir: str, libm_symbols=(), object_code: bytes | None = None):
        with _lock:
            _initialise()
            _provide(libm_symbols)
            native_pool()  # (MLC_NUM_THREADS and the communicator now: read again for each module and function)
            self.libm_symbols = sorted(libm_symbols)
            self.tm = target_machine()
            if object_code is None:
                module = optimise(llvm_ir, self.tm)
                self._ir, self.object_code = str(module), self.tm.emit_object(module)
            else:  # from an artifact or the cache: the IR is only parsed if someone asks for assembly
                self._ir, self.object_code = llvm_ir, object_code
            self.engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""), self.tm)
            self.engine.add_object_file(llvm.ObjectFileRef.from_data(self.object_code))
            self.engine.finalize_object()

    def address(self, name: str) -> int:
        with _lock:
            native_pool()
            return self.engine.get_function_address(name)

    def global_address(self, name: str) -> int:
        """The address of global variable `name` in the loaded code, or 0 if it defines none."""
        with _lock:
            return self.engine.get_global_value_address(name)

    @property
    def optimised_ir(self) -> str:
        return self._ir

    def assembly(self) -> str:
        with _lock:
            return self.tm.emit_assembly(llvm.parse_assembly(self._ir))
