"""The gpu dialect on the lockstep interpreter: what kernels compute, and the errors it must report
(data races, divergent barriers and shuffles, misplaced ops)."""
import numpy as np
import pytest

import mlc
from helpers import errors

N = 64


def kernel(body: str, grid: int = 2, block: int = 32, shared: str = "") -> str:
    """@k(x) -> y: a launch of `grid` blocks of `block` threads with %i = bid * block + tid; the body
    reads %xb and writes %yb (memref<64xf32>)."""
    alloc = f"      %tile = gpu.shared_alloc : memref<{shared}xf32, shared>\n" if shared else ""
    return f"""
func.func @k(%x: tensor<{N}xf32>) -> tensor<{N}xf32> {{
  %xb = mem.from_tensor %x : (tensor<{N}xf32>) -> memref<{N}xf32>
  %yb = mem.alloc : memref<{N}xf32>
  %grid = arith.constant {{value = {grid} : index}} : index
  gpu.launch %grid {{block = [{block}]}} : index {{
    ^bb0(%b: index, %t: index):
{alloc}      %bs = gpu.block_dim {{axis = 0}} : index
      %base = arith.mul %b, %bs : (index, index) -> index
      %i = arith.add %base, %t : (index, index) -> index
      %c0 = arith.constant {{value = 0 : index}} : index
      %c1 = arith.constant {{value = 1 : index}} : index
      %c31 = arith.constant {{value = 31 : index}} : index
      %zero = arith.constant {{value = 0.0 : f32}} : f32
{body}
      gpu.terminator
  }}
  %y = mem.to_tensor %yb : (memref<{N}xf32>) -> tensor<{N}xf32>
  return %y : tensor<{N}xf32>
}}
"""


def run(text: str):
    x = np.arange(N, dtype=np.float32)
    return mlc.interpret(mlc.parse(text, "k.ir"), "k", x), x


def run_error(text: str) -> str:
    with pytest.raises(mlc.DiagnosticError) as e:
        run(text)
    (d,) = e.value.diagnostics
    return f"{d.line}: {d.message}"


REVERSE_IN_SHARED = """
      %v = mem.load %xb, %i : (memref<64xf32>, index) -> f32
      mem.store %v, %tile, %t : f32, memref<32xf32, shared>, index
      gpu.barrier
      %r = arith.sub %c31, %t : (index, index) -> index
      %w = mem.load %tile, %r : (memref<32xf32, shared>, index) -> f32
      mem.store %w, %yb, %i : f32, memref<64xf32>, index"""


def test_shared_memory_and_barrier():
    y, x = run(kernel(REVERSE_IN_SHARED, shared="32"))
    np.testing.assert_array_equal(y, x.reshape(2, 32)[:, ::-1].reshape(-1))


def test_a_missing_barrier_is_a_located_race():
    message = run_error(kernel(REVERSE_IN_SHARED.replace("      gpu.barrier\n", ""), shared="32"))
    assert message == ("20: 'mem.load': data race: thread 31 of block 0 reads element [0] of a shared buffer that "
                       "thread 0 of block 0 wrote with nothing ordering the two"), message


def test_a_write_after_another_threads_read_is_a_race():
    body = """
      %r = arith.sub %c31, %t : (index, index) -> index
      mem.store %zero, %tile, %t : f32, memref<32xf32, shared>, index
      gpu.barrier
      %w = mem.load %tile, %r : (memref<32xf32, shared>, index) -> f32
      mem.store %w, %tile, %t : f32, memref<32xf32, shared>, index
      mem.store %w, %yb, %i : f32, memref<64xf32>, index"""
    assert "data race: thread 0 of block 0 writes element [0] of a shared buffer that thread 31 of block 0 read" in \
        run_error(kernel(body, shared="32"))


def test_blocks_writing_one_global_element_race():
    body = "      mem.store %zero, %yb, %t : f32, memref<64xf32>, index"
    assert "writes element [0] of a global buffer that thread 0 of block 0 wrote" in run_error(kernel(body))


def test_threads_writing_one_element_at_once_race():
    body = "      mem.store %zero, %yb, %b : f32, memref<64xf32>, index"
    assert "writes at the same time" in run_error(kernel(body))


def test_divergent_barrier_is_an_error():
    body = """
      %low = arith.lt %t, %c1 : (index, index) -> i1
      loop.if %low : (i1) -> () {
        gpu.barrier
        loop.yield
      } {
        loop.yield
      }
      mem.store %zero, %yb, %i : f32, memref<64xf32>, index"""
    assert run_error(kernel(body)).startswith("18: 'gpu.barrier': barrier under divergent control flow: thread 1 of block [0]")


def test_if_and_for_diverge_per_thread():
    """y[i] = sum of 0..t-1 for even threads, -x[i] for odd ones: trip counts differ per thread."""
    body = """
      %c2 = arith.constant {value = 2 : index} : index
      %half = arith.div %t, %c2 : (index, index) -> index
      %twice = arith.mul %half, %c2 : (index, index) -> index
      %even = arith.eq %twice, %t : (index, index) -> i1
      %v = loop.if %even : (i1) -> f32 {
        %s = loop.for %c0, %t, %zero : (index, index, f32) -> f32 {
        ^bb0(%j: index, %acc: f32):
          %jf = arith.cast %j : (index) -> f32
          %next = arith.add %acc, %jf : (f32, f32) -> f32
          loop.yield %next : f32
        }
        loop.yield %s : f32
      } {
        %xv = mem.load %xb, %i : (memref<64xf32>, index) -> f32
        %n = arith.neg %xv : (f32) -> f32
        loop.yield %n : f32
      }
      mem.store %v, %yb, %i : f32, memref<64xf32>, index"""
    y, x = run(kernel(body))
    t = np.arange(N) % 32
    np.testing.assert_array_equal(y, np.where(t % 2 == 0, t * (t - 1) / 2, -x))


@pytest.mark.parametrize("mode, source", [("xor", lambda l: l ^ 5), ("down", lambda l: np.where(l + 5 < 32, l + 5, l)),
                                          ("up", lambda l: np.where(l >= 5, l - 5, l)), ("idx", lambda l: np.full_like(l, 5))])
def test_shuffles(mode, source):
    body = f"""
      %c5 = arith.constant {{value = 5 : index}} : index
      %v = mem.load %xb, %i : (memref<64xf32>, index) -> f32
      %s = gpu.shuffle %v, %c5 {{mode = "{mode}"}} : (f32, index) -> f32
      mem.store %s, %yb, %i : f32, memref<64xf32>, index"""
    y, x = run(kernel(body))
    lane = np.arange(N) % 32
    np.testing.assert_array_equal(y, x[np.arange(N) - lane + source(lane)])


def test_a_shuffle_in_part_of_a_warp_is_an_error():
    body = """
      %low = arith.lt %t, %c1 : (index, index) -> i1
      %v = loop.if %low : (i1) -> f32 {
        %s = gpu.shuffle %zero, %c1 {mode = "xor"} : (f32, index) -> f32
        loop.yield %s : f32
      } {
        loop.yield %zero : f32
      }
      mem.store %v, %yb, %i : f32, memref<64xf32>, index"""
    assert "warp 0 of block [0] runs the shuffle on some of its threads only" in run_error(kernel(body))


def test_out_of_bounds_names_the_thread():
    body = """
      %j = arith.add %i, %c1 : (index, index) -> index
      %v = mem.load %xb, %j : (memref<64xf32>, index) -> f32
      mem.store %v, %yb, %i : f32, memref<64xf32>, index"""
    assert "index 64 is out of bounds for dim 0 of a buffer of shape [64] (thread 31 of block [1])" in run_error(kernel(body))


def test_misplaced_ops_are_verifier_errors():
    assert "must be at the top of a gpu.launch body" in errors(kernel("""
      %low = arith.lt %t, %c1 : (index, index) -> i1
      loop.if %low : (i1) -> () {
        %s = gpu.shared_alloc : memref<4xf32, shared>
        loop.yield
      } {
        loop.yield
      }"""))[0][2]
    assert "'mem.alloc' cannot run inside a gpu.launch" in errors(kernel("      %a = mem.alloc : memref<4xf32>"))[0][2]
    assert "allocates host or global memory; shared memory comes from gpu.shared_alloc" in \
        errors(kernel("").replace("%yb = mem.alloc : memref<64xf32>", "%yb = mem.alloc : memref<64xf32, shared>"))[0][2]
    assert "'block' must be 1 to 3 positive sizes of at most 1024 threads" in errors(kernel("", block=2048))[0][2]
    assert "must be inside a gpu.launch" in errors("""
func.func @f() {
  gpu.barrier
  return
}""")[0][2]


def test_memory_spaces_print_and_parse():
    text = kernel(REVERSE_IN_SHARED, shared="32")
    m = mlc.parse(text, "k.ir")
    assert "memref<32xf32, shared>" in str(m)
    assert str(mlc.parse(str(m), "again.ir")) == str(m)
    assert "unknown memory space 'local'" in errors(text.replace("32xf32, shared", "32xf32, local"))[0][2]


# One warp's m16n8k16 tile, each fragment element loaded from where the PTX ISA places it (written out
# here by hand, independently of the interpreter's tables).
MMA_TAIL = """    %c0v = mem.load %cb, %g, %t2 : (memref<16x8xf32>, index, index) -> f32
    %c1v = mem.load %cb, %g, %t21 : (memref<16x8xf32>, index, index) -> f32
    %c2v = mem.load %cb, %g8, %t2 : (memref<16x8xf32>, index, index) -> f32
    %c3v = mem.load %cb, %g8, %t21 : (memref<16x8xf32>, index, index) -> f32
    %cv = vector.from_elements %c0v, %c1v, %c2v, %c3v : (f32, f32, f32, f32) -> vector<4xf32>
    %dv = gpu.mma_sync %av, %bv, %cv : (vector<8xf16>, vector<4xf16>, vector<4xf32>) -> vector<4xf32>
    %d0 = vector.extract %dv {position = 0} : (vector<4xf32>) -> f32
    %d1 = vector.extract %dv {position = 1} : (vector<4xf32>) -> f32
    %d2 = vector.extract %dv {position = 2} : (vector<4xf32>) -> f32
    %d3 = vector.extract %dv {position = 3} : (vector<4xf32>) -> f32
    mem.store %d0, %db, %g, %t2 : f32, memref<16x8xf32>, index, index
    mem.store %d1, %db, %g, %t21 : f32, memref<16x8xf32>, index, index
    mem.store %d2, %db, %g8, %t2 : f32, memref<16x8xf32>, index, index
    mem.store %d3, %db, %g8, %t21 : f32, memref<16x8xf32>, index, index
    gpu.terminator
  }
  %d = mem.to_tensor %db : (memref<16x8xf32>) -> tensor<16x8xf32>
  return %d : tensor<16x8xf32>
}
"""
MMA = """func.func @mma(%a: tensor<16x16xf16>, %b: tensor<16x8xf16>, %c: tensor<16x8xf32>) -> tensor<16x8xf32> {
  %ab = mem.from_tensor %a : (tensor<16x16xf16>) -> memref<16x16xf16>
  %bb = mem.from_tensor %b : (tensor<16x8xf16>) -> memref<16x8xf16>
  %cb = mem.from_tensor %c : (tensor<16x8xf32>) -> memref<16x8xf32>
  %db = mem.alloc : memref<16x8xf32>
  %one = arith.constant {value = 1 : index} : index
  gpu.launch %one {block = [32]} : index {
  ^bb0(%bid: index, %lane: index):
    %c1 = arith.constant {value = 1 : index} : index
    %c2 = arith.constant {value = 2 : index} : index
    %c4 = arith.constant {value = 4 : index} : index
    %c8 = arith.constant {value = 8 : index} : index
    %g = arith.div %lane, %c4 : (index, index) -> index
    %gt = arith.mul %g, %c4 : (index, index) -> index
    %t = arith.sub %lane, %gt : (index, index) -> index
    %t2 = arith.mul %t, %c2 : (index, index) -> index
    %t21 = arith.add %t2, %c1 : (index, index) -> index
    %g8 = arith.add %g, %c8 : (index, index) -> index
    %t28 = arith.add %t2, %c8 : (index, index) -> index
    %t218 = arith.add %t21, %c8 : (index, index) -> index
    %a0 = mem.load %ab, %g, %t2 : (memref<16x16xf16>, index, index) -> f16
    %a1 = mem.load %ab, %g, %t21 : (memref<16x16xf16>, index, index) -> f16
    %a2 = mem.load %ab, %g8, %t2 : (memref<16x16xf16>, index, index) -> f16
    %a3 = mem.load %ab, %g8, %t21 : (memref<16x16xf16>, index, index) -> f16
    %a4 = mem.load %ab, %g, %t28 : (memref<16x16xf16>, index, index) -> f16
    %a5 = mem.load %ab, %g, %t218 : (memref<16x16xf16>, index, index) -> f16
    %a6 = mem.load %ab, %g8, %t28 : (memref<16x16xf16>, index, index) -> f16
    %a7 = mem.load %ab, %g8, %t218 : (memref<16x16xf16>, index, index) -> f16
    %av = vector.from_elements %a0, %a1, %a2, %a3, %a4, %a5, %a6, %a7 : (f16, f16, f16, f16, f16, f16, f16, f16) -> vector<8xf16>
    %b0 = mem.load %bb, %t2, %g : (memref<16x8xf16>, index, index) -> f16
    %b1 = mem.load %bb, %t21, %g : (memref<16x8xf16>, index, index) -> f16
    %b2 = mem.load %bb, %t28, %g : (memref<16x8xf16>, index, index) -> f16
    %b3 = mem.load %bb, %t218, %g : (memref<16x8xf16>, index, index) -> f16
    %bv = vector.from_elements %b0, %b1, %b2, %b3 : (f16, f16, f16, f16) -> vector<4xf16>
""" + MMA_TAIL


def test_mma_sync_multiplies_a_tile_with_the_ptx_fragment_layout():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((16, 16)).astype(np.float16), rng.standard_normal((16, 8)).astype(np.float16)
    c = rng.standard_normal((16, 8)).astype(np.float32)
    d = mlc.interpret(mlc.parse(MMA, "mma.ir"), "mma", a, b, c)
    np.testing.assert_allclose(d, a.astype(np.float64) @ b + c, rtol=1e-6, atol=1e-5)


def test_mma_sync_checks_its_fragments():
    assert "takes fragments (vector<8xf16>, vector<4xf16>, vector<4xf32>) or the same in bf16" in errors(
        MMA.replace("gpu.mma_sync %av, %bv, %cv : (vector<8xf16>, vector<4xf16>, vector<4xf32>)",
                    "gpu.mma_sync %bv, %bv, %cv : (vector<4xf16>, vector<4xf16>, vector<4xf32>)"))[0][2]


def test_an_aligned_vector_access_must_start_on_its_size():
    body = """
      %j = arith.add %c1, %c1 : (index, index) -> index
      %first = arith.lt %i, %c1 : (index, index) -> i1
      loop.if %first : (i1) -> () {
        %v = vector.load %xb, %j {aligned = true} : (memref<64xf32>, index) -> vector<4xf32>
        loop.yield
      } {
        loop.yield
      }"""
    assert "an aligned 4-lane access starts at element 2 of a buffer of shape [64], not a multiple of 4" in run_error(kernel(body))


# The same tile with A and B staged in shared memory and their fragments loaded by ldmatrix (A: four
# 8 x 8 matrices, B: two, transposed), each lane giving one matrix row's address.
LDMATRIX_MMA = """func.func @mma(%a: tensor<16x16xf16>, %b: tensor<16x8xf16>, %c: tensor<16x8xf32>) -> tensor<16x8xf32> {
  %ab = mem.from_tensor %a : (tensor<16x16xf16>) -> memref<16x16xf16>
  %bb = mem.from_tensor %b : (tensor<16x8xf16>) -> memref<16x8xf16>
  %cb = mem.from_tensor %c : (tensor<16x8xf32>) -> memref<16x8xf32>
  %db = mem.alloc : memref<16x8xf32>
  %one = arith.constant {value = 1 : index} : index
  gpu.launch %one {block = [32]} : index {
  ^bb0(%bid: index, %lane: index):
    %at = gpu.shared_alloc : memref<16x16xf16, shared>
    %bt = gpu.shared_alloc : memref<16x8xf16, shared>
    %c0 = arith.constant {value = 0 : index} : index
    %c1 = arith.constant {value = 1 : index} : index
    %c2 = arith.constant {value = 2 : index} : index
    %c4 = arith.constant {value = 4 : index} : index
    %c8 = arith.constant {value = 8 : index} : index
    %c16 = arith.constant {value = 16 : index} : index
    %row = arith.div %lane, %c2 : (index, index) -> index
    %half = arith.mul %row, %c2 : (index, index) -> index
    %side = arith.sub %lane, %half : (index, index) -> index
    %col0 = arith.mul %side, %c8 : (index, index) -> index
    loop.for %c0, %c8 : index, index {
    ^bb0(%j: index):
      %col = arith.add %col0, %j : (index, index) -> index
      %v = mem.load %ab, %row, %col : (memref<16x16xf16>, index, index) -> f16
      mem.store %v, %at, %row, %col : f16, memref<16x16xf16, shared>, index, index
      loop.yield
    }
    %brow = arith.div %lane, %c2 : (index, index) -> index
    %bcol0 = arith.mul %side, %c4 : (index, index) -> index
    loop.for %c0, %c4 : index, index {
    ^bb0(%j: index):
      %col = arith.add %bcol0, %j : (index, index) -> index
      %v = mem.load %bb, %brow, %col : (memref<16x8xf16>, index, index) -> f16
      mem.store %v, %bt, %brow, %col : f16, memref<16x8xf16, shared>, index, index
      loop.yield
    }
    gpu.barrier
    %l8 = arith.div %lane, %c8 : (index, index) -> index
    %l8m = arith.mul %l8, %c8 : (index, index) -> index
    %r8 = arith.sub %lane, %l8m : (index, index) -> index
    %l16 = arith.div %lane, %c16 : (index, index) -> index
    %odd8 = arith.sub %l8, %l16 : (index, index) -> index
    %odd = arith.sub %odd8, %l16 : (index, index) -> index
    %arow0 = arith.mul %odd, %c8 : (index, index) -> index
    %arow = arith.add %arow0, %r8 : (index, index) -> index
    %acol = arith.mul %l16, %c8 : (index, index) -> index
    %av = gpu.ldmatrix %at, %arow, %acol {count = 4} : (memref<16x16xf16, shared>, index, index) -> vector<8xf16>
    %l16m = arith.mul %l16, %c16 : (index, index) -> index
    %krow = arith.sub %lane, %l16m : (index, index) -> index
    %bv = gpu.ldmatrix %bt, %krow, %c0 {count = 2, transpose} : (memref<16x8xf16, shared>, index, index) -> vector<4xf16>
    %g = arith.div %lane, %c4 : (index, index) -> index
    %gt = arith.mul %g, %c4 : (index, index) -> index
    %t = arith.sub %lane, %gt : (index, index) -> index
    %t2 = arith.mul %t, %c2 : (index, index) -> index
    %t21 = arith.add %t2, %c1 : (index, index) -> index
    %g8 = arith.add %g, %c8 : (index, index) -> index
""" + MMA_TAIL


def test_ldmatrix_loads_the_fragments_mma_sync_takes():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((16, 16)).astype(np.float16), rng.standard_normal((16, 8)).astype(np.float16)
    c = rng.standard_normal((16, 8)).astype(np.float32)
    d = mlc.interpret(mlc.parse(LDMATRIX_MMA, "ldmatrix.ir"), "mma", a, b, c)
    np.testing.assert_allclose(d, a.astype(np.float64) @ b + c, rtol=1e-6, atol=1e-5)


# Threads 0..15 copy 4 floats each into shared memory in the background; every thread then squares
# the even elements.
COPY_ASYNC = """func.func @k(%x: tensor<64xf32>) -> tensor<64xf32> {
  %xb = mem.from_tensor %x : (tensor<64xf32>) -> memref<64xf32>
  %yb = mem.alloc : memref<64xf32>
  %one = arith.constant {value = 1 : index} : index
  gpu.launch %one {block = [32]} : index {
  ^bb0(%b: index, %t: index):
    %tile = gpu.shared_alloc : memref<64xf32, shared>
    %c4 = arith.constant {value = 4 : index} : index
    %c16 = arith.constant {value = 16 : index} : index
    %c2 = arith.constant {value = 2 : index} : index
    %at = arith.mul %t, %c2 : (index, index) -> index
    %lo = arith.lt %t, %c16 : (index, index) -> i1
    %i = arith.mul %t, %c4 : (index, index) -> index
    loop.if %lo : (i1) -> () {
      %odd = arith.lt %t, %c2 : (index, index) -> i1
      gpu.copy_async %xb, %i, %tile, %i, %lo : memref<64xf32>, index, memref<64xf32, shared>, index, i1
      loop.yield
    } {
      loop.yield
    }
    gpu.async_commit
    WAIT
    gpu.barrier
    %v = mem.load %tile, %at : (memref<64xf32, shared>, index) -> f32
    %v2 = arith.mul %v, %v : (f32, f32) -> f32
    mem.store %v2, %yb, %at : f32, memref<64xf32>, index
    %at1 = arith.add %at, %one : (index, index) -> index
    %w = mem.load %tile, %at1 : (memref<64xf32, shared>, index) -> f32
    mem.store %w, %yb, %at1 : f32, memref<64xf32>, index
    gpu.terminator
  }
  %y = mem.to_tensor %yb : (memref<64xf32>) -> tensor<64xf32>
  return %y : tensor<64xf32>
}
"""


def test_async_copies_land_at_the_wait():
    x = np.arange(64, dtype=np.float32)
    y = mlc.interpret(mlc.parse(COPY_ASYNC.replace("WAIT", "gpu.async_wait {pending = 0}"), "cp.ir"), "k", x)
    want = x.copy()
    want[0::2] **= 2
    np.testing.assert_array_equal(y, want)
    # without the wait the copies have not landed: shared memory still holds its NaNs
    assert np.isnan(mlc.interpret(mlc.parse(COPY_ASYNC.replace("WAIT", ""), "cp.ir"), "k", x)).all()
    # the wait makes them visible to the thread that copied; reading another's needs the barrier
    assert "data race" in run_error_in(COPY_ASYNC.replace("WAIT", "gpu.async_wait {pending = 0}").replace("    gpu.barrier\n", ""))


def run_error_in(text: str) -> str:
    with pytest.raises(mlc.DiagnosticError) as e:
        mlc.interpret(mlc.parse(text, "cp.ir"), "k", np.arange(64, dtype=np.float32))
    return str(e.value)
