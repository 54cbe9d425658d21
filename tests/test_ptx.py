"""PTX from the cuda pipeline, checked without a GPU: every kernel of every example and of generated
programs, and every elementwise op in every float type, goes through llvmlite's NVPTX target and
assembles with `ptxas -arch=sm_90` (skipped, saying so, where ptxas is absent)."""
import os
import re
import shutil
import subprocess

import pytest
from hypothesis import given, settings

import mlc
from mlc.codegen.nvptx import LIBDEVICE, compile_kernels
from mlc.ir.dialects.mlc import BINARY, UNARY
from mlc.testing import programs

from helpers import EXAMPLES
from test_loops import SUPPORTED

PTXAS = shutil.which("ptxas") or "/usr/local/cuda/bin/ptxas"
needs_ptxas = pytest.mark.skipif(not os.path.exists(PTXAS) or not os.path.exists(LIBDEVICE),
                                 reason="no CUDA toolkit here (ptxas and libdevice): PTX is not assembled")


def assemble(ptx: str, tmp_path, arch="sm_90") -> str:
    """ptxas's report (-v: registers, spills, shared memory per kernel); fails on any error."""
    path = tmp_path / "k.ptx"
    path.write_text(ptx)
    r = subprocess.run([PTXAS, f"-arch={arch}", "-v", str(path), "-o", str(tmp_path / "k.cubin")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"ptxas failed:\n{r.stderr}\n{ptx[:4000]}"
    return r.stderr


def lowered(module):
    return mlc.run_passes(module.clone(), "cuda")


@needs_ptxas
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_kernel_of_the_examples_assembles(path, tmp_path):
    ptx, kernels = compile_kernels(lowered(mlc.load(path)))
    report = assemble(ptx, tmp_path)
    assert len(re.findall(r"Compiling entry function", report)) == len(kernels) > 0
    assert " 0 bytes spill stores" in report and not re.search(r"[1-9]\d* bytes spill stores", report)


def _elementwise_module(element: str) -> str:
    """One function whose results are every elementwise op that takes `element`."""
    lines, types = [], []
    for name, row in {**UNARY, **BINARY}.items():
        if row.kind not in ("float", "num", "any"):
            continue
        args = "%x" if name in UNARY else "%x, %y"
        lines.append(f"    %r{len(types)} = mlc.{name} {args}")
        types.append(f"tensor<?x{'i1' if getattr(row, 'compares', False) else element}>")
    results = ", ".join(f"%r{i}" for i in range(len(types)))
    return (f"module {{ func.func @f(%x: tensor<?x{element}>, %y: tensor<?x{element}>) -> ({', '.join(types)}) {{\n"
            + "\n".join(lines) + f"\n    return {results} : {', '.join(types)}\n  }} }}")


@needs_ptxas
@pytest.mark.parametrize("element", ["f32", "f64", "f16"])
def test_every_elementwise_op_compiles_for_nvptx(element, tmp_path):
    """LLVM's math intrinsics abort the process in the NVPTX backend: every row must map elsewhere.
    (Ops over the same elements share kernels, fuse's merge: each result is still stored.)"""
    module = mlc.parse(_elementwise_module(element))
    ptx, kernels = compile_kernels(lowered(module))
    assert kernels and len(re.findall(r"st\.global", ptx)) >= len(module.functions["f"].type.results)
    assemble(ptx, tmp_path)


@needs_ptxas
@settings(max_examples=int(os.environ.get("MLC_PTX_EXAMPLES", "15")))
@given(p=programs(max_ops=6, families=SUPPORTED))
def test_generated_programs_assemble(p, tmp_path_factory):
    ptx, kernels = compile_kernels(lowered(p.module))
    assemble(ptx, tmp_path_factory.mktemp("ptx"))


@needs_ptxas
def test_kernels_use_shared_memory_barriers_and_shuffles(tmp_path):
    text = (pytest.importorskip("test_gpu_dialect").kernel(
        pytest.importorskip("test_gpu_dialect").REVERSE_IN_SHARED + """
      %s = gpu.shuffle %w, %c31 {mode = "xor"} : (f32, index) -> f32
      %e = arith.exp %s : (f32) -> f32
      mem.store %e, %yb, %i : f32, memref<64xf32>, index""", shared="32"))
    ptx, (kernel,) = compile_kernels(mlc.parse(text))
    assert kernel.name == "k_k0" and kernel.block == [32]
    for instruction in (".maxntid 32", ".shared .align 16 .b8", "st.shared.b32", "bar.sync", "ld.shared.b32",
                        "shfl.sync.bfly.b32", "ld.global", "st.global"):
        assert instruction in ptx, instruction
    assert "used 1 barriers, 128 bytes smem" in assemble(ptx, tmp_path)


@needs_ptxas
def test_a_kernel_takes_what_it_reads_from_the_host():
    m = lowered(mlc.parse("""module { func.func @f(%x: tensor<?x5xf32>, %s: tensor<f32>) -> tensor<?x5xf32> {
      %y = mlc.mul %x, %s : (tensor<?x5xf32>, tensor<f32>) -> tensor<?x5xf32>
      return %y : tensor<?x5xf32> } }"""))
    ptx, kernels = compile_kernels(m)
    params = [str(v.type) for k in kernels for v in k.params]
    assert "memref<?x5xf32>" in params  # the buffers (data pointer and their ? dim)
    assert all(f".entry {k.name}(" in ptx for k in kernels)


@needs_ptxas
def test_row_reductions_shuffle_and_products_tile_in_shared_memory(tmp_path):
    m = lowered(mlc.parse("""module { func.func @f(%x: tensor<?x64xf32>, %w: tensor<64x64xf32>) -> tensor<?x64xf32> {
      %h = mlc.matmul %x, %w : (tensor<?x64xf32>, tensor<64x64xf32>) -> tensor<?x64xf32>
      %y = mlc.softmax %h {axis = -1}
      return %y : tensor<?x64xf32> } }"""))
    ptx, kernels = compile_kernels(m)
    assert "shfl.sync.bfly.b32" in ptx  # the softmax: a warp per row
    assert ptx.count("bar.sync") >= 2 and ("ld.shared.f32" in ptx or "ld.shared.b32" in ptx)  # the product's tiles
    report = assemble(ptx, tmp_path)
    assert "4096 bytes smem" in report and " 0 bytes spill stores" in report


@needs_ptxas
def test_tensor_core_tiles_ldmatrix_and_async_copies_assemble(tmp_path):
    from test_gpu_dialect import COPY_ASYNC, LDMATRIX_MMA, MMA
    for text, instructions in ((MMA, ["mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"]),
                               (LDMATRIX_MMA, ["ldmatrix.sync.aligned.m8n8.x4.shared.b16", "ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16"]),
                               (COPY_ASYNC.replace("WAIT", "gpu.async_wait {pending = 0}"), ["cp.async.cg.shared.global", "cp.async.commit_group"])):
        ptx, _ = compile_kernels(mlc.parse(text))
        assert all(i in ptx for i in instructions), instructions
        assemble(ptx, tmp_path)

@needs_ptxas
@pytest.mark.parametrize("element", ["f16", "bf16"])
def test_half_products_assemble_to_mma_sync_without_spills(element, tmp_path):
    m = lowered(mlc.parse(f"""module {{ func.func @f(%a: tensor<?x64x{element}>, %b: tensor<64x64x{element}>) -> tensor<?x64x{element}> {{
      %c = mlc.matmul %a, %b : (tensor<?x64x{element}>, tensor<64x64x{element}>) -> tensor<?x64x{element}>
      return %c : tensor<?x64x{element}> }} }}"""))
    ptx, _ = compile_kernels(m)
    assert ptx.count(f"mma.sync.aligned.m16n8k16.row.col.f32.{element}.{element}.f32") == 8  # 2 x 4 tiles per warp
    assert "cp.async.cg.shared.global" in ptx and re.search(r"cp\.async\.wait_group\s+1;", ptx)  # one slice in flight
    if element == "f16":  # fragments by ldmatrix (A: x4, B: x2 transposed, per tile)
        assert ptx.count("ldmatrix.sync.aligned.m8n8.x4.shared.b16") == 2
        assert ptx.count("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16") == 4
    report = assemble(ptx, tmp_path)
    assert " 0 bytes spill stores" in report and "used 1 barriers" in report


@needs_ptxas
def test_elementwise_kernels_move_16_bytes_per_access(tmp_path):
    m = lowered(mlc.parse("""module { func.func @f(%x: tensor<?x64xf32>, %b: tensor<64xf32>) -> tensor<?x64xf32> {
      %h = mlc.add %x, %b : (tensor<?x64xf32>, tensor<64xf32>) -> tensor<?x64xf32>
      %y = mlc.tanh %h
      return %y : tensor<?x64xf32> } }"""))
    ptx, _ = compile_kernels(m)
    assert ptx.count("ld.global.v4") == 2 and ptx.count("st.global.v4") == 1
    assemble(ptx, tmp_path)
