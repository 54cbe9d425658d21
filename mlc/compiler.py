"""The compiler driver: a verified module, through its target's pipeline, to loaded native code.

    tensor IR --`cpu{vector-bytes=N}` (passes/pipelines.py)--> loop IR --codegen/llvm.py--> LLVM IR
              (in parts when large, sent as they are made) --runtime/jit.py (optimise, object code:
              parts in worker processes meanwhile, load)--> runtime.Executable
    tensor IR --`cuda`--> host code + gpu.launch kernels --codegen/nvptx.py--> PTX
              --> runtime.gpu.GpuExecutable (host code here, kernels through pycuda)

`mlc.compile`, the command line, `mlc.jit` and the training steps all compile through here. With
profile=True (or MLC_PROFILE=1) the CPU code also times each kernel: the tensor ops are described just
before lowering (runtime/profile.py) and codegen wraps the code each became with clock reads. The
target's facts (the host's vector width) become pipeline options here, so no pass asks the host and a
pipeline string means the same IR on every machine.
"""
from __future__ import annotations

import functools
import gc

from mlc.codegen.llvm import emit_module
from mlc.codegen.nvptx import GPU_ARCHS, deferred_kernels
from mlc.ir.core import Module
from mlc.ir.diagnostics import DiagnosticError, UnsupportedError, error
from mlc.ir.types import NATIVE, ElementType
from mlc.ir.verifier import verify
from mlc.passes import PassManager
from mlc.runtime import tuning
from mlc.runtime.artifact import cached, store_in_cache
from mlc.runtime.executable import Executable, profiling_at_exit
from mlc.runtime.profile import describe
from mlc.runtime.gpu import GpuExecutable
from mlc.runtime.jit import JitModule, PartCompiler, host_vector_bytes, target_machine, workers_for

TARGETS = ("cpu", "cuda")
DEFAULT_GPU_ARCH = "sm_90"


def pipeline(target: str = "cpu") -> str:
    """The pass pipeline that lowers a module for `target` on this machine."""
    return f"cpu{{vector-bytes={host_vector_bytes()}}}" if target == "cpu" else "cuda"


def _stages(target: str) -> tuple[list, list]:
    """The target's pipeline: its tensor-level passes, and the rest (from lower-to-loops on)."""
    passes = PassManager.parse(pipeline(target)).passes
    at = next(i for i, p in enumerate(passes) if p.name == "lower-to-loops")
    return passes[:at], passes[at:]


def tensor_stage(module: Module, target: str = "cpu") -> Module:
    """A copy of the module after the target's tensor-level passes (fused, laid out, bufferized)."""
    _check_target(module, target)
    staged = module.clone()
    PassManager(_stages(target)[0], verify_each=False).run(staged)
    return staged


def lower(module: Module, target: str = "cpu", described: dict | None = None) -> Module:
    """A copy of the module lowered to loop-level IR (what `mlc compile --emit loops` prints), its
    products and convolutions blocked as this host's tuning table says (runtime/tuning.py). With a
    dict `described`, it receives the descriptions of the tensor ops as lowering finds them (profiling)."""
    lowered = tensor_stage(module, target)
    if target == "cpu":
        tuning.annotate(lowered)
    if described is not None:
        for f in lowered.functions.values():  # each tensor op a kernel of its own, wherever it came from
            for k, op in enumerate(f.body):
                op.loc = op.loc._replace(scope=k + 1)
        described.update(describe(lowered))
    PassManager(_stages(target)[1], verify_each=False).run(lowered)
    try:  # (once, at the end: verifying after every pass took a third of the passes' time)
        verify(lowered)
    except DiagnosticError:  # again, verified after each pass: the error names the pass that broke the module
        PassManager.parse(pipeline(target)).run(module.clone())
        raise
    return lowered


def _without_gc_pauses(f):
    """Compiling makes millions of objects that live until it ends: the cycle collector's full passes
    over them took an eighth of ResNet-18's compile. It is paused meanwhile (the peak memory is the same),
    and what compiling leaves is disposed of (`Module.dispose`) so that its first pass after does not walk
    it all either (0.35 s after a ResNet-18)."""
    @functools.wraps(f)
    def paused(*args, **kwargs):
        if not gc.isenabled():
            return f(*args, **kwargs)
        gc.disable()
        try:
            return f(*args, **kwargs)
        finally:
            gc.enable()
    return paused


@_without_gc_pauses
def compile(module: Module, target: str = "cpu", cache: bool = True, arch: str = DEFAULT_GPU_ARCH, device=None,
            precision: str | None = None, profile: bool | None = None):
    """Native code for every public function of a verified module, with its globals initialised from
    the module seed; compiled code is kept in the on-disk cache (runtime/artifact.py) unless cache=False.
    For target "cuda": PTX for `arch`, run on `device` (by default the first GPU, through pycuda).
    precision "bf16" or "f16": products and convolutions on half-precision copies of their operands
    (passes/mixed_precision.py), the rest, weights included, in f32.
    profile=True: the code counts each kernel's calls and time (`exe.profile()`); None: as MLC_PROFILE
    says. Profiled code is cached apart from the rest; without it no profiling code is emitted."""
    _check_target(module, target)
    if profile is None:
        profile = target == "cpu" and profiling_at_exit()
    if profile and target != "cpu":
        raise error(module.loc, f"profiling is available for the cpu target only, not '{target}'")
    if precision is not None:
        if precision not in ("bf16", "f16"):
            raise error(module.loc, f"precision must be bf16 or f16, got '{precision}'")
        module = module.clone()
        PassManager.parse(f"mixed-precision{{type={precision}}}").run(module)
    if target == "cuda":
        if arch not in GPU_ARCHS:
            raise error(module.loc, f"unknown GPU architecture '{arch}' (known: {', '.join(GPU_ARCHS)})")
        hit = cached(module, target, arch) if cache else None
        if hit is not None:
            hit._device = device
            return hit
        lowered = lower(module, target)
        make_ptx, kernels = deferred_kernels(lowered, arch)
        exe = GpuExecutable(module, lowered, make_ptx, kernels, arch, device)
        if cache and device is None:  # (makes the PTX now; a device given is a test's or a simulation's)
            store_in_cache(exe)
        return exe
    hit = cached(module, profile=profile) if cache else None
    if hit is not None:
        exe = Executable(module, *hit)
        if exe.profiled == profile:  # (the cache keys them apart; a mix-up is a miss, never wrong code)
            return exe
    described = {} if profile else None
    lowered = lower(module, target, described)
    with PartCompiler(workers_for(sum(1 for _ in lowered.walk()))) as parts:  # (workers compile kernels while codegen goes on)
        _, emitter = emit_module(lowered, profile=described, send=parts.send if parts.feeders else None)
        llvm_ir, last = emitter.parts.finish()
        code = parts.finish(last, target_machine())
    emitter.dispose()  # (freed now, not by the cycle collector once it is back on)
    lowered.dispose()
    exe = Executable(module, JitModule(llvm_ir, sorted(emitter.libm), object_code=code), emitter.functions, compiled_here=True)
    if cache:
        store_in_cache(exe)
    return exe


def rebuild(module: Module, target: str, arch: str | None) -> Executable:
    """Compile an artifact's IR again: what runtime/artifact.py asks for when no trusted key signed its code."""
    return compile(module, target, arch=arch or DEFAULT_GPU_ARCH)


def _check_target(module: Module, target: str) -> None:
    if target not in TARGETS:
        raise error(module.loc, f"target '{target}' is not available yet (targets: {', '.join(TARGETS)})")
    for op in module.walk():
        for v in [*op.results, *(a for r in op.regions for b in r.blocks for a in b.args)]:
            element = getattr(v.type, "element", v.type)
            if isinstance(element, ElementType) and element.name not in NATIVE:
                raise error(op.loc, f"element type {element} runs on the interpreter only: the {target} target does not "
                            "compile it yet", op.name, UnsupportedError)
