"""PTX for the kernels of a GPU module (the `cuda` pipeline's result): each gpu.launch becomes a
`ptx_kernel` function of one LLVM module for the nvptx64-nvidia-cuda triple, emitted by the CPU
backend's emitters (codegen/llvm.py: loops, loads and stores, the elementwise rows' arithmetic) plus
the gpu ops below; math goes through libdevice, linked in and internalised. The host code around the
launches stays IR: the runtime runs it and launches the kernels.

A kernel's parameters are what its body reads from the host code, in order of first use: a buffer
as its data pointer and one i64 per `?` dim, an index as an i64, a scalar as itself (i1 as i8), and
last a pointer to the launch's i64 error word, set to 1 + the number of a failed run-time check.
"""
from __future__ import annotations

import functools
import os
import threading
from dataclasses import dataclass, field

import llvmlite.binding as llvm
from llvmlite import ir

from mlc.ir.core import Module, Operation
from mlc.ir.dialects.gpu import CopyAsync, Launch, kernel_names
from mlc.ir.types import ElementType, MemRefType

from .llvm import F32, I1, I8, I64, OPS, PTR, STORAGE, Buffer, FunctionEmitter, ModuleEmitter, scalar_type

TRIPLE = "nvptx64-nvidia-cuda"
DATA_LAYOUT = "e-i64:64-i128:128-v16:16-v32:32-n16:32:64"
GPU_ARCHS = ("sm_80", "sm_90", "sm_90a")
LIBDEVICE = os.environ.get("MLC_LIBDEVICE", "/usr/local/cuda/nvvm/libdevice/libdevice.10.bc")
I32 = ir.IntType(32)
SHARED, GLOBAL = ir.PointerType(addrspace=3), ir.PointerType(addrspace=1)
SHUFFLE_CLAMP = {"xor": 0x1F, "down": 0x1F, "idx": 0x1F, "up": 0}
SHUFFLE_NAME = {"xor": "bfly", "down": "down", "up": "up", "idx": "idx"}


@dataclass
class KernelCode:
    """What the runtime needs to launch one kernel."""
    name: str
    launch: Operation                   # its gpu.launch in the lowered module
    params: list                        # the host values it takes, in order (see the module docstring)
    block: list                         # threads per block
    checks: list = field(default_factory=list)  # (location, op name, message) per run-time check


class PtxModuleEmitter(ModuleEmitter):
    def __init__(self, module: Module):
        super().__init__(module, threads=False)
        self.llvm.triple, self.llvm.data_layout = TRIPLE, DATA_LAYOUT
        self.kernels_code: list[KernelCode] = []
        self.libdevice: set[str] = set()

    def emit(self) -> ir.Module:
        for name, launch in kernel_names(self.module):
            f = self.module.functions[name.rsplit("_k", 1)[0]]
            self.kernels_code.append(KernelEmitter(self, f, launch, name).emit())
        return self.llvm

    def math(self, arith, name: str, t, *xs):
        """libdevice's function (`__nv_expf`, ...): LLVM's math intrinsics have no NVPTX lowering and
        abort the process; vectors go lane by lane."""
        if isinstance(t, ir.VectorType):
            out = ir.Constant(t, ir.Undefined)
            for lane in range(t.count):
                k = ir.Constant(I32, lane)
                out = arith.b.insert_element(out, self.math(arith, name, t.element, *(arith.b.extract_element(x, k) for x in xs)), k)
            return out
        symbol = f"__nv_{name}{'f' if t == F32 else ''}"
        self.libdevice.add(symbol)
        return arith.b.call(self.declare(symbol, t, [t] * len(xs)), list(xs))


class KernelEmitter(FunctionEmitter):
    handlers = {**OPS}

    def __init__(self, parent: PtxModuleEmitter, func, launch: Operation, name: str):
        self.captured = Launch.captured(launch)
        types = []
        for v in self.captured:
            t = v.type
            if isinstance(t, MemRefType):
                types += [PTR] + [I64] * t.shape.count(None)
            elif isinstance(t, ElementType):
                types.append(I8 if t.is_bool else scalar_type(t))
            else:
                raise ValueError(f"a kernel cannot take a {t} from the host")
        fn = ir.Function(parent.llvm, ir.FunctionType(ir.VoidType(), types + [PTR]), name=name)
        fn.calling_convention = "ptx_kernel"
        threads = 1
        for d in launch.attr("block"):
            threads *= d
        parent.llvm.add_named_metadata("nvvm.annotations", [fn, "maxntidx", ir.Constant(I32, threads)])
        self.parent, self.func, self.fn, self.launch = parent, func, fn, launch
        self.code = KernelCode(name, launch, self.captured, list(launch.attr("block")))
        self.prologue = ir.IRBuilder(fn.append_basic_block("prologue"))
        self.entry = fn.append_basic_block("entry")
        self.b = ir.IRBuilder(self.entry)
        self.values, self.trusted, self.owned, self.prefixes = {}, set(), [], {}
        self.threads, self.sequential_outline = False, False
        self.check_base = self.local_checks = None
        self.exit_block = fn.append_basic_block("fail")

    def emit(self) -> KernelCode:
        args = iter(self.fn.args)
        for v in self.captured:
            t = v.type
            if isinstance(t, MemRefType):
                data = next(args)
                dims = [ir.Constant(I64, d) if d is not None else next(args) for d in t.shape]
                self.values[v] = Buffer(data, t.element, dims)
            else:
                a = next(args)
                self.values[v] = self.prologue.trunc(a, I1) if t.is_bool else a
                if t.name == "index":
                    self.trusted.add(v)  # sizes from the host
        self.error_slot = next(args)
        body = self.launch.regions[0].blocks[0]
        n_grid = len(self.launch.operands)
        for k, a in enumerate(body.args):
            which, axis = ("ctaid", k) if k < n_grid else ("tid", k - n_grid)
            self.values[a] = self.b.zext(self.sreg(which, axis), I64)
            self.trusted.add(a)
        self.block(body)
        with self.b.goto_block(self.exit_block):
            self.b.ret_void()
        self.prologue.branch(self.entry)
        return self.code

    def sreg(self, name: str, axis: int):
        xyz = "xyz"[axis]
        return self.b.call(self.parent.declare(f"llvm.nvvm.read.ptx.sreg.{name}.{xyz}", I32, []), [])

    def fail_if(self, bad, op, message, op_name=None):
        self.code.checks.append((op.loc, op_name or op.attr("op") or op.name, message))
        with self.b.if_then(bad, likely=False):
            self.b.store(ir.Constant(I64, len(self.code.checks)), self.error_slot)
            self.b.branch(self.exit_block)


def _handler(name):
    def register(fn):
        KernelEmitter.handlers[name] = fn
        return fn
    return register


@_handler("gpu.terminator")
def _terminator(self: KernelEmitter, op):
    self.b.ret_void()


@_handler("gpu.barrier")
def _barrier(self: KernelEmitter, op):
    self.b.call(self.parent.declare("llvm.nvvm.barrier.cta.sync.aligned.all", ir.VoidType(), [I32]), [ir.Constant(I32, 0)])


@_handler("gpu.block_dim")
def _block_dim(self: KernelEmitter, op):
    self.values[op.results[0]] = self.b.zext(self.sreg("ntid", op.attr("axis")), I64)
    self.trusted.add(op.results[0])


@_handler("gpu.grid_dim")
def _grid_dim(self: KernelEmitter, op):
    self.values[op.results[0]] = self.b.zext(self.sreg("nctaid", op.attr("axis")), I64)
    self.trusted.add(op.results[0])


@_handler("gpu.shared_alloc")
def _shared_alloc(self: KernelEmitter, op):
    t = op.results[0].type
    count = 1
    for d in t.shape:
        count *= d
    storage = ir.ArrayType(STORAGE[t.element.name], count)
    g = ir.GlobalVariable(self.parent.llvm, storage, self.parent.llvm.get_unique_name(f"{self.fn.name}.shared"), addrspace=3)
    g.linkage, g.align = "internal", 16
    g.initializer = ir.Constant(storage, ir.Undefined)
    data = self.prologue.addrspacecast(g, PTR)  # generic pointers throughout; LLVM infers ld.shared/st.shared
    self.values[op.results[0]] = Buffer(data, t.element, [ir.Constant(I64, d) for d in t.shape])


@_handler("gpu.shuffle")
def _shuffle(self: KernelEmitter, op):
    mode = op.attr("mode")
    value = self.get(op.operands[0])
    kind = "f32" if value.type == F32 else "i32"
    fn = self.parent.declare(f"llvm.nvvm.shfl.sync.{SHUFFLE_NAME[mode]}.{kind}", value.type, [I32, value.type, I32, I32])
    offset = self.b.trunc(self.get(op.operands[1]), I32)
    self.values[op.results[0]] = self.b.call(fn, [ir.Constant(I32, -1), value, offset, ir.Constant(I32, SHUFFLE_CLAMP[mode])])


@_handler("gpu.mma_sync")
def _mma(self: KernelEmitter, op):
    """mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: A as 4 and B as 2 pairs of halves (bf16
    values, held in f32, are their top 16 bits: packed two to an i32, the first in the low half)."""
    a, b, c = (self.get(v) for v in op.operands)
    bf16 = op.operand_types[0].element.name == "bf16"
    sums = [self.b.extract_element(c, ir.Constant(I32, k)) for k in range(4)]
    if bf16:
        def halves(v, n):
            top = [self.b.lshr(self.b.bitcast(self.b.extract_element(v, ir.Constant(I32, k)), I32), ir.Constant(I32, 16))
                   for k in range(2 * n)]
            return [self.b.or_(top[2 * k], self.b.shl(top[2 * k + 1], ir.Constant(I32, 16))) for k in range(n)]
        name, pair = "llvm.nvvm.mma.m16n8k16.row.col.bf16", I32
    else:
        def halves(v, n):
            return [self.b.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, 2), [2 * k, 2 * k + 1])) for k in range(n)]
        name, pair = "llvm.nvvm.mma.m16n8k16.row.col.f32.f32", ir.VectorType(ir.HalfType(), 2)
    fn = self.parent.declare(name, ir.LiteralStructType([F32] * 4), [pair] * 6 + [F32] * 4)
    d = self.b.call(fn, halves(a, 4) + halves(b, 2) + sums)
    out = ir.Constant(ir.VectorType(F32, 4), ir.Undefined)
    for k in range(4):
        out = self.b.insert_element(out, self.b.extract_value(d, k), ir.Constant(I32, k))
    self.values[op.results[0]] = out


@_handler("gpu.ldmatrix")
def _ldmatrix(self: KernelEmitter, op):
    count = op.attr("count")
    tile = self.get(op.operands[0])
    address = self.b.addrspacecast(self.address(tile, [self.get(v) for v in op.operands[1:]]), SHARED)
    name = f"llvm.nvvm.ldmatrix.sync.aligned.m8n8.x{count}{'.trans' if op.attr('transpose') else ''}.b16"
    words = ir.LiteralStructType([I32] * count) if count > 1 else I32
    loaded = self.b.call(self.parent.declare(name, words, [SHARED]), [address])
    out = ir.Constant(ir.VectorType(ir.HalfType(), 2 * count), ir.Undefined)
    for i in range(count):
        pair = self.b.bitcast(self.b.extract_value(loaded, i) if count > 1 else loaded, ir.VectorType(ir.HalfType(), 2))
        for j in range(2):
            out = self.b.insert_element(out, self.b.extract_element(pair, ir.Constant(I32, j)), ir.Constant(I32, 2 * i + j))
    self.values[op.results[0]] = out


@_handler("gpu.copy_async")
def _copy_async(self: KernelEmitter, op):
    src, src_at, dst, dst_at, valid = CopyAsync.split(op.operands, op.operand_types[0].rank)
    to = self.b.addrspacecast(self.address(self.get(dst), [self.get(v) for v in dst_at]), SHARED)
    source = self.b.addrspacecast(self.address(self.get(src), [self.get(v) for v in src_at]), GLOBAL)
    size = self.b.select(self.get(valid), ir.Constant(I32, 16), ir.Constant(I32, 0))  # 0: zeros, nothing read
    self.b.call(self.parent.declare("llvm.nvvm.cp.async.cg.shared.global.16.s", ir.VoidType(), [SHARED, GLOBAL, I32]),
                [to, source, size])


@_handler("gpu.async_commit")
def _async_commit(self: KernelEmitter, op):
    self.b.call(self.parent.declare("llvm.nvvm.cp.async.commit.group", ir.VoidType(), []), [])


@_handler("gpu.async_wait")
def _async_wait(self: KernelEmitter, op):
    self.b.call(self.parent.declare("llvm.nvvm.cp.async.wait.group", ir.VoidType(), [I32]), [ir.Constant(I32, op.attr("pending"))])


# --- LLVM IR to PTX ----------------------------------------------------------------------------------------

_lock = threading.Lock()


@functools.cache
def _nvptx_ready() -> bool:
    with _lock:
        llvm.initialize_all_targets()
        llvm.initialize_all_asmprinters()
    return True


def target_machine(arch: str = "sm_90"):
    if arch not in GPU_ARCHS:
        raise ValueError(f"unknown GPU architecture '{arch}' (known: {', '.join(GPU_ARCHS)})")
    _nvptx_ready()
    return llvm.Target.from_triple(TRIPLE).create_target_machine(cpu=arch, features="+ptx80", opt=3)


def to_ptx(llvm_ir: str, libdevice_symbols=(), arch: str = "sm_90") -> str:
    """Optimised PTX of a kernel module: libdevice linked in where used and its functions internalised
    (so only what the kernels call stays), then LLVM's O3 for the GPU."""
    tm = target_machine(arch)
    module = llvm.parse_assembly(llvm_ir)
    module.verify()
    if libdevice_symbols:
        if not os.path.exists(LIBDEVICE):
            raise FileNotFoundError(f"the kernels call libdevice ({', '.join(libdevice_symbols[:3])}, ...), which is not at "
                                    f"{LIBDEVICE}: install the CUDA toolkit or set MLC_LIBDEVICE")
        with open(LIBDEVICE, "rb") as f:
            lib = llvm.parse_bitcode(f.read())
        lib.triple, lib.data_layout = TRIPLE, DATA_LAYOUT
        module.link_in(lib)
        for fn in module.functions:
            if fn.name.startswith("__nv_") and not fn.is_declaration:
                fn.linkage = "internal"
    pto = llvm.create_pipeline_tuning_options(speed_level=3)
    pb = llvm.create_pass_builder(tm, pto)
    pb.getModulePassManager().run(module, pb)
    return tm.emit_assembly(module)


def emit_kernels(module: Module) -> tuple[ir.Module, PtxModuleEmitter]:
    emitter = PtxModuleEmitter(module)
    return emitter.emit(), emitter


def compile_kernels(module: Module, arch: str = "sm_90") -> tuple[str, list[KernelCode]]:
    """PTX for every kernel of a lowered GPU module, and how to launch each."""
    make_ptx, kernels = deferred_kernels(module, arch)
    return make_ptx(), kernels


def deferred_kernels(module: Module, arch: str = "sm_90"):
    """How to launch each kernel, and a function making their PTX (LLVM's NVPTX backend and
    libdevice are only needed when something asks for it)."""
    target_machine(arch)  # an unknown architecture is an error now, not later
    llvm_module, emitter = emit_kernels(module)
    text, symbols = str(llvm_module), sorted(emitter.libdevice)
    return functools.partial(to_ptx, text, symbols, arch), emitter.kernels_code

