"""LLVM IR to optimised object code: the recipe (runtime/jit.py uses it in this process), and a worker
process that applies it to the parts of a large module while the compiling process does another part.

llvmlite serialises every call into LLVM with one lock, so threads would take turns: the parts go to
processes. A worker runs this file as a script (it imports llvmlite and nothing of mlc, so it starts in
a fraction of a second) and answers requests on its pipes until its stdin closes:

    request:  u64 length, then the IR text (UTF-8)
    answer:   u64 length, u8 status, then the object code (status 0) or LLVM's message (status 1)
"""
from __future__ import annotations

import struct
import sys

import llvmlite.binding as llvm


def target_machine():
    """The host's target machine (the caller has initialised LLVM's native target)."""
    target = llvm.Target.from_triple(llvm.get_process_triple())
    return target.create_target_machine(cpu=llvm.get_host_cpu_name(), features=llvm.get_host_cpu_features().flatten(),
                                        opt=3, codemodel="jitdefault")


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


def _read(stream, n: int) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise EOFError
    return data


def serve(requests, answers):
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    tm = target_machine()
    while True:
        try:
            (n,) = struct.unpack("<Q", _read(requests, 8))
            text = _read(requests, n).decode("utf-8")
        except EOFError:
            return
        try:
            status, data = 0, tm.emit_object(optimise(text, tm))
        except Exception as e:  # (LLVM refused the IR: the caller compiles the part itself and reports it)
            status, data = 1, str(e).encode("utf-8", "replace")
        answers.write(struct.pack("<QB", len(data), status) + data)
        answers.flush()


if __name__ == "__main__":
    serve(sys.stdin.buffer, sys.stdout.buffer)
