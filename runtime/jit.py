"""LLVM IR to native code loaded in this process (llvmlite MCJIT), optimised for the host CPU.

LLVM's global context is not thread-safe: parsing, optimising and loading hold `_lock`, so threads may
compile at once. The native code itself is reentrant (its state lives on the caller's stack). A large
module comes in parts (codegen/llvm.py's Parts), sent as codegen makes them: worker processes
(runtime/llvm_worker.py) optimise and compile them meanwhile, this process joins in once codegen is
done, and the engine loads every part's object code (kept as one `ar` archive of them, as a static
library would be)."""
from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import os
import queue
import struct
import subprocess
import sys
import threading

import llvmlite.binding as llvm

from mlc.ir import collectives

from . import llvm_worker, threads
from .distributed import CALLBACKS
from .llvm_worker import optimise

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
    return llvm_worker.target_machine()


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


# --- parts compiled in worker processes --------------------------------------------------------------------

PART_OPS = 5_000  # a lowered module of at least this many ops may be compiled in parts (codegen sends parts of
#                  codegen/llvm.py's PART_CHARS), by this process and up to MAX_PARTS - 1 workers, one per core
MAX_PARTS = 4
_processes: list[subprocess.Popen] = []
_workers_lock = threading.Lock()


def workers_for(ops: int) -> int:
    """How many worker processes compile parts of a lowered module of `ops` ops beside this process;
    starts them (they boot while codegen runs)."""
    return 0 if ops < PART_OPS else len(llvm_workers(min(MAX_PARTS, len(os.sched_getaffinity(0))) - 1))


def llvm_workers(n: int) -> list[subprocess.Popen]:
    """n worker processes (fewer where they cannot be started), kept for later modules; each exits when
    this process closes its stdin (or exits)."""
    with _workers_lock:
        _processes[:] = [w for w in _processes if w.poll() is None]
        while len(_processes) < n:
            try:
                _processes.append(subprocess.Popen(
                    [sys.executable, "-c", "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')", llvm_worker.__file__],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL))
            except OSError:
                break
        return _processes[:n]


@atexit.register
def _stop_workers():
    for w in _processes:
        try:
            w.stdin.close()
            w.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            w.kill()
        w.stdout.close()


def _in_worker(worker: subprocess.Popen, text: str, out: list, k: int) -> bool:
    """Part k's object code from `worker` into out[k]; left None if the worker failed (it is stopped)."""
    try:
        data = text.encode("utf-8")
        worker.stdin.write(struct.pack("<Q", len(data)) + data)
        worker.stdin.flush()
        n, status = struct.unpack("<QB", worker.stdout.read(9))
        answer = worker.stdout.read(n)
        if status == 0 and len(answer) == n:
            out[k] = answer
            return True
    except (OSError, ValueError, struct.error):
        pass
    worker.kill()
    return False


def compile_here(llvm_ir: str, tm) -> bytes:
    """LLVM IR optimised and compiled to object code in this process."""
    with _lock:
        return tm.emit_object(optimise(llvm_ir, tm))


class PartCompiler:
    """Object code for a module sent in parts (codegen/llvm.py's Parts): the workers take the parts in
    turn as they come, while codegen makes the next; then this process compiles the last part and takes
    those still waiting. A part a worker failed on is compiled here (where LLVM's error is raised)."""

    def __init__(self, workers: int):
        self.texts: list[str] = []
        self.objects: list[bytes | None] = []
        self.waiting: queue.SimpleQueue = queue.SimpleQueue()  # indices of parts no one has taken yet
        self.feeders = [threading.Thread(target=self._feed, args=(w,), daemon=True) for w in llvm_workers(workers)]
        for f in self.feeders:  # (pipes and waiting release the GIL)
            f.start()

    def send(self, text: str):
        self.texts.append(text)
        self.objects.append(None)
        self.waiting.put(len(self.texts) - 1)

    def _feed(self, worker: subprocess.Popen):
        while (k := self.waiting.get()) is not None:
            if not _in_worker(worker, self.texts[k], self.objects, k):
                return

    def finish(self, last: str, tm) -> bytes:
        """All the parts' object code, `last` included (the public functions and the globals: compiled
        here first, while the workers finish theirs), as one archive."""
        self.texts.append(last)
        self.objects.append(compile_here(last, tm))
        while True:
            try:
                k = self.waiting.get_nowait()
            except queue.Empty:
                break
            self.objects[k] = compile_here(self.texts[k], tm)
        self.close()
        return archive([obj if obj is not None else compile_here(text, tm) for obj, text in zip(self.objects, self.texts)])

    def close(self):
        """Stop the feeders (once their parts are done: a worker answers each request it reads)."""
        for _ in self.feeders:
            self.waiting.put(None)
        for f in self.feeders:
            f.join()
        self.feeders = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


AR_MAGIC = b"!<arch>\n"


def archive(objects: list[bytes]) -> bytes:
    """One object as it is; several as an `ar` archive."""
    if len(objects) == 1:
        return objects[0]
    out = [AR_MAGIC]
    for k, obj in enumerate(objects):
        out.append(f"{k}.o/".ljust(16).encode() + b"0".ljust(12) + b"0".ljust(6) + b"0".ljust(6) + b"644".ljust(8)
                   + str(len(obj)).ljust(10).encode() + b"`\n" + obj + b"\n" * (len(obj) % 2))
    return b"".join(out)


def unarchive(code: bytes) -> list[bytes] | None:
    """The objects in `code` (an object, or an archive of them); None if it is a damaged archive."""
    if not code.startswith(AR_MAGIC):
        return [code]
    objects, at = [], len(AR_MAGIC)
    while at < len(code):
        header = code[at: at + 60]
        size = header[48:58].strip()
        if len(header) < 60 or header[58:60] != b"`\n" or not size.isdigit() or at + 60 + int(size) > len(code):
            return None
        objects.append(code[at + 60: at + 60 + int(size)])
        at += 60 + int(size) + int(size) % 2
    return objects or None


def host_key() -> dict:
    """What native code depends on: the CPU, its features and the LLVM behind llvmlite."""
    _initialise()
    import llvmlite
    return {"triple": llvm.get_process_triple(), "cpu": llvm.get_host_cpu_name(),
            "features": llvm.get_host_cpu_features().flatten(), "llvmlite": llvmlite.__version__}


class JitModule:
    """LLVM IR and the native code made from it here, or given (`object_code`: compiled in parts by a
    PartCompiler, or loaded from the cache or an artifact)."""

    def __init__(self, llvm_ir: str, libm_symbols=(), object_code: bytes | None = None):
        with _lock:
            _initialise()
            _provide(libm_symbols)
            native_pool()  # (MLC_NUM_THREADS and the communicator now: read again for each module and function)
            self.libm_symbols = sorted(libm_symbols)
            self.tm = target_machine()
            self.llvm_ir, self._optimised = llvm_ir, None  # (the IR is only optimised again if someone asks to see it)
            self.object_code = object_code if object_code is not None else compile_here(llvm_ir, self.tm)
            self.engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""), self.tm)
            for obj in unarchive(self.object_code) or ():
                self.engine.add_object_file(llvm.ObjectFileRef.from_data(obj))
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
        with _lock:
            if self._optimised is None:
                self._optimised = str(optimise(self.llvm_ir, self.tm))
            return self._optimised

    def assembly(self) -> str:
        with _lock:
            return self.tm.emit_assembly(optimise(self.llvm_ir, self.tm))
