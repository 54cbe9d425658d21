"""Loop-level IR: the mem/loop/arith dialects on the interpreter, and lower-to-loops keeps results."""
import numpy as np
import pytest
from hypothesis import given

import mlc
from mlc.testing import check_pipeline, programs

from helpers import ROOT, errors

EXP_HALF = """module { func.func @f(%t: tensor<?x4xf32>) -> tensor<?x4xf32> {
  %x = mem.from_tensor %t : (tensor<?x4xf32>) -> memref<?x4xf32>
  %c0 = arith.constant {value = 0 : index} : index
  %c4 = arith.constant {value = 4 : index} : index
  %n = mem.dim %x {axis = 0} : (memref<?x4xf32>) -> index
  %y = mem.alloc %n : (index) -> memref<?x4xf32>
  loop.for %c0, %n {step = 1, parallel} : index, index {
  ^bb0(%i: index):
    loop.for %c0, %c4 : index, index {
    ^bb0(%j: index):
      %v = mem.load %x, %i, %j : (memref<?x4xf32>, index, index) -> f32
      %e = arith.exp %v : (f32) -> f32
      %h = arith.constant {value = 0.5 : f32} : f32
      %m = arith.mul %e, %h : (f32, f32) -> f32
      mem.store %m, %y, %i, %j : f32, memref<?x4xf32>, index, index
      loop.yield
    }
    loop.yield
  }
  %r = mem.to_tensor %y : (memref<?x4xf32>) -> tensor<?x4xf32>
  return %r : tensor<?x4xf32>
} }"""


def test_hand_written_loops_run_and_round_trip():
    m = mlc.parse(EXP_HALF)
    x = np.random.default_rng(0).random((3, 4)).astype(np.float32)
    np.testing.assert_allclose(mlc.interpret(m, "f", x), np.exp(x) * np.float32(0.5), rtol=1e-6)
    assert str(mlc.parse(str(m))) == str(m)


def test_out_of_bounds_access_is_a_located_error():
    m = mlc.parse(EXP_HALF.replace("%c4 = arith.constant {value = 4 : index}", "%c4 = arith.constant {value = 5 : index}"), "oob.ir")
    with pytest.raises(mlc.DiagnosticError, match="index 4 is out of bounds for dim 1") as e:
        mlc.interpret(m, "f", np.ones((2, 4), np.float32))
    assert e.value.diagnostics[0].line == 11


def test_a_subview_reads_its_row_in_place_and_checks_an_index_from_the_data():
    text = """module {
      func.func @pick(%x: tensor<3x4xf32>, %k: tensor<i64>) -> tensor<4xf32> {
        %c0 = arith.constant {value = 0 : index} : index
        %c4 = arith.constant {value = 4 : index} : index
        %xb = mem.from_tensor %x : (tensor<3x4xf32>) -> memref<3x4xf32>
        %kb = mem.from_tensor %k : (tensor<i64>) -> memref<i64>
        %ki = mem.load %kb : (memref<i64>) -> i64
        %row_index = arith.cast %ki : (i64) -> index
        %row = mem.subview %xb, %row_index : (memref<3x4xf32>, index) -> memref<4xf32>
        %y = mem.alloc : memref<4xf32>
        loop.for %c0, %c4 : index, index {
        ^bb0(%j: index):
          %v = mem.load %row, %j : (memref<4xf32>, index) -> f32
          mem.store %v, %y, %j : f32, memref<4xf32>, index
          loop.yield
        }
        %out = mem.to_tensor %y : (memref<4xf32>) -> tensor<4xf32>
        return %out : tensor<4xf32>
      } }"""
    m = mlc.parse(text, "pick.ir")
    assert str(mlc.parse(str(m))) == str(m)
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    exe = mlc.compile(m)
    for run in (lambda *a: mlc.interpret(m, "pick", *a), exe["pick"]):
        np.testing.assert_array_equal(run(x, np.int64(2)), x[2])
        with pytest.raises(mlc.DiagnosticError) as e:
            run(x, np.int64(3))
        assert e.value.diagnostics[0].line == 9


@pytest.mark.parametrize("body,fragment", [
    ("%v = mem.load %x, %i : (memref<?x4xf32>, index) -> f32", "expects 2 indices"),
    ("mem.store %i, %y, %i, %j : index, memref<?x4xf32>, index, index", "stores a index into a buffer of f32"),
    ("%e = arith.exp %i : (index) -> index", "floating-point element type"),
    ("%z = mem.alloc : () -> memref<?xf32>", "expects 1 indices"),
])
def test_loop_level_diagnostics(body, fragment):
    text = EXP_HALF.replace("      %e = arith.exp %v : (f32) -> f32\n", f"      {body}\n      %e = arith.exp %v : (f32) -> f32\n")
    assert any(fragment in m for _, _, m in errors(text)), errors(text)


SUPPORTED = ("unary", "binary", "constant", "select", "reduction", "matmul", "transpose", "reshape", "softmax",
             "clamp_or_cast", "call", "cross_entropy", "slice_or_pad", "concat", "gather", "conv_or_pool", "scan")


# every stage of the cpu pipeline after the tensor level, and all of it at AVX-512's width (a freed buffer
# is garbage on the interpreter, so an early free shows up as a difference)
@pytest.mark.parametrize("pipeline", ["lower-to-loops", "fuse,lower-to-loops", "layout,widen-half,fuse,bufferize,lower-to-loops,buffer-dealloc",
                                      "cpu{vector-bytes=64}", "layout{conv-block=1},fuse,bufferize,lower-to-loops,tile,buffer-dealloc"])
@given(p=programs(max_ops=6, families=SUPPORTED))
def test_lowering_keeps_results(pipeline, p):
    lowered = check_pipeline(p, pipeline, rtol=1e-4, atol=1e-5)
    assert not any(op.name.startswith("mlc.") and op.name not in ("mlc.constant", "mlc.global_load")
                   for op in lowered.walk())


@given(p=programs(max_ops=4, families=("conv_or_pool",)))
def test_convolutions_in_channel_blocks_keep_results(p):
    """layout{conv-block=1} blocks every generated convolution of one group (blocks of one channel:
    the same conversions and kernel as any width), down to loops."""
    check_pipeline(p, "layout{conv-block=1},fuse,bufferize,lower-to-loops,tile,buffer-dealloc", rtol=1e-4, atol=1e-5)


def test_mlp_example_lowers_and_agrees():
    m = mlc.load(ROOT / "examples" / "mlp.ir")
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    labels = np.array([1, 0, 9])
    want = [mlc.interpret(m, "forward", x), mlc.interpret(m, "loss", x, labels)]
    mlc.run_passes(m, "inline,lower-to-loops,canonicalize,cse")
    np.testing.assert_allclose(mlc.interpret(m, "forward", x), want[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(mlc.interpret(m, "loss", x, labels), want[1], rtol=1e-5)


def test_random_ops_lower_to_the_same_bits():
    text = """module { func.func @f(%key: tensor<2xi64>, %like: tensor<?x5xf32>) -> (tensor<?x5xf32>, tensor<7xf64>) {
      %u = mlc.random_uniform %key, %like {low = -1.0, high = 2.0}
      %n = mlc.random_normal %key {mean = 1.0, std = 3.0} : (tensor<2xi64>) -> tensor<7xf64>
      return %u, %n : tensor<?x5xf32>, tensor<7xf64> } }"""
    m = mlc.parse(text)
    key, like = np.array([42, 2**40 + 7], np.int64), np.zeros((3, 5), np.float32)
    want = mlc.interpret(m, "f", key, like)
    mlc.run_passes(m, "lower-to-loops")
    for w, g in zip(want, mlc.interpret(m, "f", key, like)):
        np.testing.assert_array_equal(g, w)


def test_broadcast_mismatch_of_dynamic_dims_is_reported_at_the_op():
    text = """module { func.func @f(%a: tensor<?x3xf32>, %b: tensor<?x3xf32>) -> tensor<?x3xf32> {
      %c = mlc.add %a, %b
      return %c : tensor<?x3xf32> } }"""
    m = mlc.parse(text, "bc.ir")
    mlc.run_passes(m, "lower-to-loops")
    with pytest.raises(mlc.DiagnosticError, match="bc.ir:2:12: error: 'mlc.add': operand sizes along dim 0 cannot be broadcast"):
        mlc.interpret(m, "f", np.ones((2, 3), np.float32), np.ones((5, 3), np.float32))
    assert mlc.interpret(m, "f", np.ones((1, 3), np.float32), np.ones((5, 3), np.float32)).shape == (5, 3)


def test_peak_intermediate_bytes_follow_buffer_lifetimes():
    from mlc.passes.memory import peak_intermediate_bytes
    from mlc.compiler import lower
    from mlc.runtime.jit import host_vector_bytes
    lowered = lower(mlc.load(ROOT / "examples" / "mlp.ir"))
    panel = 2 * host_vector_bytes() // 4  # columns of a packed panel of B: 16 with AVX2, 32 with AVX-512
    # relu(x @ w1 + b1) is one fused buffer (256x32), live with the result (256x10); w2 is read from its
    # panels (a global, packed when set); at batch 1 the products stream their weights unpacked: the two
    # results alone. Packed per call, w2's one panel is live with them.
    at_256 = 256 * 32 * 4 + 256 * 10 * 4
    at_1 = 32 * 4 + 10 * 4
    assert peak_intermediate_bytes(lowered.functions["forward"], 256) == at_256
    per_call = mlc.run_passes(mlc.load(ROOT / "examples" / "mlp.ir"), f"cpu{{vector-bytes={host_vector_bytes()} packed-globals=0}}")
    assert peak_intermediate_bytes(per_call.functions["forward"], 256) == at_256 + 32 * panel * 4
    assert peak_intermediate_bytes(lowered.functions["forward"], 1) == at_1
    out = __import__("subprocess").run([__import__("sys").executable, "-m", "mlc", "compile", str(ROOT / "examples" / "mlp.ir"),
                                        "--emit", "loops"], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0 and out.stdout.startswith(f"// @forward: peak intermediate bytes {at_1:,} (with ? = 1), {at_256:,} (with ? = 256)")
    mlc.parse(out.stdout)  # the report is a comment: the output still parses


DOT_ROWS = """module { func.func @f(%t: tensor<?x16xf32>) -> tensor<?xf32> {
  %x = mem.from_tensor %t : (tensor<?x16xf32>) -> memref<?x16xf32>
  %c0 = arith.constant {value = 0 : index} : index
  %c8 = arith.constant {value = 8 : index} : index
  %c16 = arith.constant {value = 16 : index} : index
  %zero = arith.constant {value = 0.0 : f32} : f32
  %z = vector.broadcast %zero : (f32) -> vector<8xf32>
  %n = mem.dim %x {axis = 0} : (memref<?x16xf32>) -> index
  %y = mem.alloc %n : (index) -> memref<?xf32>
  loop.for %c0, %n {parallel} : index, index {
  ^bb0(%i: index):
    %acc = loop.for %c0, %c16, %z {step = 8} : (index, index, vector<8xf32>) -> vector<8xf32> {
    ^bb0(%j: index, %a: vector<8xf32>):
      %v = vector.load %x, %i, %j : (memref<?x16xf32>, index, index) -> vector<8xf32>
      %s = vector.fma %v, %v, %a : (vector<8xf32>, vector<8xf32>, vector<8xf32>) -> vector<8xf32>
      loop.yield %s : vector<8xf32>
    }
    %tmp = mem.alloc : memref<8xf32>
    vector.store %acc, %tmp, %c0 : vector<8xf32>, memref<8xf32>, index
    %sum = loop.for %c0, %c8, %zero : (index, index, f32) -> f32 {
    ^bb0(%k: index, %part: f32):
      %e = mem.load %tmp, %k : (memref<8xf32>, index) -> f32
      %p = arith.add %part, %e : (f32, f32) -> f32
      loop.yield %p : f32
    }
    mem.dealloc %tmp : memref<8xf32>
    mem.store %sum, %y, %i : f32, memref<?xf32>, index
    loop.yield
  }
  %r = mem.to_tensor %y : (memref<?xf32>) -> tensor<?xf32>
  return %r : tensor<?xf32>
} }"""


@pytest.mark.parametrize("backend", ["interp", "cpu"])
def test_loops_carry_vectors_and_scalars(backend):
    m = mlc.parse(DOT_ROWS)
    assert str(mlc.parse(str(m))) == str(m)
    x = np.random.default_rng(1).standard_normal((5, 16)).astype(np.float32)
    got = mlc.interpret(m, "f", x) if backend == "interp" else mlc.compile(m)["f"](x)
    np.testing.assert_allclose(got, (x * x).sum(axis=1), rtol=1e-5)


@pytest.mark.parametrize("backend", ["interp", "cpu"])
def test_a_vector_summed_across_its_lanes(backend):
    """vector.reduce_add: the same sums as the loop over a copy's lanes (LLVM's reassociating reduction natively)."""
    body = DOT_ROWS[DOT_ROWS.index("    %tmp = mem.alloc"): DOT_ROWS.index("    mem.store %sum")]
    m = mlc.parse(DOT_ROWS.replace(body, "    %sum = vector.reduce_add %acc : (vector<8xf32>) -> f32\n"))
    assert str(mlc.parse(str(m))) == str(m)
    x = np.random.default_rng(2).standard_normal((7, 16)).astype(np.float32)
    got = mlc.interpret(m, "f", x) if backend == "interp" else mlc.compile(m)["f"](x)
    np.testing.assert_allclose(got, (x.astype(np.float64) ** 2).sum(axis=1), rtol=1e-5)


@pytest.mark.parametrize("backend", ["interp", "cpu"])
def test_a_strided_vector_load_takes_every_other_element(backend):
    """vector.load {stride = 2}: lanes 0, 2, 4, ... of the 16 elements from the index (a whole run read, then
    picked natively); the run must lie in the buffer."""
    m = mlc.parse(DOT_ROWS.replace("%c16, %z {step = 8}", "%c8, %z {step = 8}").replace(
        " : (memref<?x16xf32>, index, index) -> vector<8xf32>", " {stride = 2} : (memref<?x16xf32>, index, index) -> vector<8xf32>"))
    assert str(mlc.parse(str(m))) == str(m)
    x = np.random.default_rng(3).standard_normal((5, 16)).astype(np.float32)
    got = mlc.interpret(m, "f", x) if backend == "interp" else mlc.compile(m)["f"](x)
    np.testing.assert_allclose(got, (x[:, ::2].astype(np.float64) ** 2).sum(axis=1), rtol=1e-5)
    if backend == "interp":  # (from index 8, the run of 16 passes the row's end)
        past = mlc.parse(str(m).replace("%c0, %c8, %z {step = 8}", "%c8, %c16, %z {step = 8}"), "strided.ir")
        with pytest.raises(mlc.DiagnosticError, match="16 lanes from index 8 run past dim 1"):
            mlc.interpret(past, "f", x)


@pytest.mark.parametrize("body,fragment", [
    ("%s = loop.for %c0, %c16 {step = 8} : index, index {\n    ^bb0(%j: index):\n      loop.yield %z : vector<8xf32>\n    }",
     "yields (vector<8xf32>) but the loop carries ()"),
    ("%s = loop.for %c0, %c16, %z {parallel} : (index, index, vector<8xf32>) -> vector<8xf32> {\n    ^bb0(%j: index, %a: vector<8xf32>):\n"
     "      loop.yield %a : vector<8xf32>\n    }", "a parallel loop cannot carry values"),
    ("%s = loop.for %c0, %c16, %z : (index, index, vector<8xf32>) -> vector<8xf32> {\n    ^bb0(%j: index):\n"
     "      loop.yield %z : vector<8xf32>\n    }", "the body takes (index, vector<8xf32>)"),
    ("%w = vector.load %x, %i, %c0 : (memref<?x16xf32>, index, index) -> vector<8xf64>", "loads vector<8xf64> from a buffer of f32"),
    ("%w = arith.add %z, %zero : (vector<8xf32>, f32) -> vector<8xf32>", "all scalars or all vectors"),
])
def test_carried_values_and_vector_diagnostics(body, fragment):
    text = DOT_ROWS.replace("    %tmp = mem.alloc", f"    {body}\n    %tmp = mem.alloc")
    assert any(fragment in m for _, _, m in errors(text)), errors(text)


def test_vector_lanes_past_the_end_are_a_located_error():
    m = mlc.parse(DOT_ROWS.replace("%c16, %z {step = 8}", "%c16, %z {step = 4}"), "lanes.ir")
    with pytest.raises(mlc.DiagnosticError, match="lanes.ir:14:12: error: 'vector.load': 8 lanes from index 12 run past dim 1"):
        mlc.interpret(m, "f", np.ones((2, 16), np.float32))


def test_elementwise_results_take_over_dying_operand_buffers():
    """relu(q) * q (one kernel) writes into q's buffer: q dies there. m lives on (two uses), and x is
    an argument, so neither is overwritten; results still match the interpreter on the tensor IR.
    (The reductions are over the leading dim, so no row kernel takes them.)"""
    text = """func.func @f(%x: tensor<32x?xf32>) -> tensor<32x?xf32> {
      %s = mlc.reduce_sum %x {axes = [0], keepdims = true} : (tensor<32x?xf32>) -> tensor<1x?xf32>
      %m = mlc.sub %x, %s : (tensor<32x?xf32>, tensor<1x?xf32>) -> tensor<32x?xf32>
      %q = mlc.reduce_max %m {axes = [0], keepdims = true} : (tensor<32x?xf32>) -> tensor<1x?xf32>
      %e = mlc.relu %q
      %z = mlc.mul %e, %q : (tensor<1x?xf32>, tensor<1x?xf32>) -> tensor<1x?xf32>
      %t = mlc.sub %m, %z : (tensor<32x?xf32>, tensor<1x?xf32>) -> tensor<32x?xf32>
      return %t : tensor<32x?xf32> }"""
    lowered = mlc.run_passes(mlc.parse(text), "cpu")
    allocs = [op.results[0].name_hint for op in lowered.functions["f"].body if op.name == "mem.alloc"]
    assert allocs == ["s", "m", "q", "t"], allocs  # no buffer for z
    x = np.random.default_rng(2).standard_normal((32, 5)).astype(np.float32)
    want = mlc.interpret(mlc.parse(text), "f", x)
    np.testing.assert_allclose(mlc.interpret(lowered, "f", x), want, rtol=1e-6)
    np.testing.assert_allclose(mlc.compile(mlc.parse(text))["f"](x), want, rtol=1e-5)
