"""LLVM IR to native code in this process (llvmlite MCJIT), optimised for the host CPU."""
from __future__ import annotations

import ctypes
import ctypes.util
import threading

import llvmlite.binding as llvm

_lock = threading.Lock()
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


def _provide(symbols):
    """Make libm functions (tanhf, erff, ...) resolvable by the JIT."""
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
    pto.loop_unrolling = True
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
        _initialise()
        _provide(libm_symbols)
        self.tm = target_machine()
        if object_code is None:
            self.module = optimise(llvm_ir, self.tm)
            self.object_code = self.tm.emit_object(self.module)
        else:
            self.module = llvm.parse_assembly(llvm_ir)
            self.object_code = object_code
        self.engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""), self.tm)
        self.engine.add_object_file(llvm.ObjectFileRef.from_data(self.object_code))
        self.engine.finalize_object()

    def address(self, name: str) -> int:
        return self.engine.get_function_address(name)

    @property
    def optimised_ir(self) -> str:
        return str(self.module)

    def assembly(self) -> str:
        return self.tm.emit_assembly(self.module)
