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


@pytest.mark.parametrize("pipeline", ["lower-to-loops", "fuse,lower-to-loops"])
@given(p=programs(max_ops=6, families=SUPPORTED))
def test_lowering_keeps_results(pipeline, p):
    lowered = check_pipeline(p, pipeline, rtol=1e-4, atol=1e-5)
    assert not any(op.name.startswith("mlc.") and op.name not in ("mlc.constant", "mlc.global_load")
                   for op in lowered.walk())


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
    from mlc.passes.lower_to_loops import peak_intermediate_bytes
    from mlc.runtime.executable import lower_for_cpu
    lowered = lower_for_cpu(mlc.load(ROOT / "examples" / "mlp.ir"))
    # x @ w1 (256x32) and relu(h + b1) (256x32) are live together; h is freed before the last matmul
    assert peak_intermediate_bytes(lowered.functions["forward"], 256) == 2 * 256 * 32 * 4
    out = __import__("subprocess").run([__import__("sys").executable, "-m", "mlc", "compile", str(ROOT / "examples" / "mlp.ir"),
                                        "--emit", "loops"], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0 and out.stdout.startswith("// @forward: peak intermediate bytes 256 (with ? = 1), 65,536 (with ? = 256)")
    mlc.parse(out.stdout)  # the report is a comment: the output still parses
