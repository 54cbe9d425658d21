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
