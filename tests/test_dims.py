"""`?` dims proven equal (passes/dims.py), and what the fuse pass does with them: a product's epilogue
takes inputs of the same batch, also through reshapes (lift_through_reshapes); compiled results agree
with the interpreter, including where a `?` input is 1 at run time and broadcast."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mlc
from mlc.passes.dims import Dims

rng = np.random.default_rng(0)


def values(text: str, func: str = "f"):
    m = mlc.parse(text)
    f = m.functions[func]
    named = {v.name_hint: v for op in f.walk() for v in op.results}
    named.update({a.name_hint: a for op in f.walk() for r in op.regions for b in r.blocks for a in b.args})
    return Dims(f), named


def test_dims_are_traced_through_reshapes_products_transposes_slices_and_pads():
    dims, v = values("""func.func @f(%x: tensor<?x8x16xf32>, %w: tensor<16x4xf32>, %y: tensor<?x8x16xf32>) -> tensor<?x4xf32> {
      %rows = mlc.reshape %x : (tensor<?x8x16xf32>) -> tensor<?x16xf32>
      %p = mlc.matmul %rows, %w : (tensor<?x16xf32>, tensor<16x4xf32>) -> tensor<?x4xf32>
      %t = mlc.transpose %x {perm = [1, 0, 2]} : (tensor<?x8x16xf32>) -> tensor<8x?x16xf32>
      %s = mlc.slice %t {start = [0, 0, 2], limit = [8, 4611686018427387904, 6], stride = [1, 1, 1]} : (tensor<8x?x16xf32>) -> tensor<8x?x4xf32>
      %part = mlc.slice %x {start = [1, 0, 0], limit = [4611686018427387904, 8, 16], stride = [1, 1, 1]} : (tensor<?x8x16xf32>) -> tensor<?x8x16xf32>
      %pad = mlc.pad %x {low = [0, 1, 0], high = [0, 1, 0]} : (tensor<?x8x16xf32>) -> tensor<?x10x16xf32>
      %padded_rows = mlc.pad %x {low = [1, 0, 0], high = [0, 0, 0]} : (tensor<?x8x16xf32>) -> tensor<?x8x16xf32>
      %sum = mlc.reduce_sum %x {axes = [1]} : (tensor<?x8x16xf32>) -> tensor<?x16xf32>
      %mixed = mlc.add %x, %y : (tensor<?x8x16xf32>, tensor<?x8x16xf32>) -> tensor<?x8x16xf32>
      %same = mlc.mul %x, %part : (tensor<?x8x16xf32>, tensor<?x8x16xf32>) -> tensor<?x8x16xf32>
      %twice = mlc.mul %x, %x : (tensor<?x8x16xf32>, tensor<?x8x16xf32>) -> tensor<?x8x16xf32>
      return %p : tensor<?x4xf32> }""")
    x, root = v["x"], (v["x"], 0)
    assert dims.origin(v["rows"], 0) == (root, 8) and dims.origin(v["p"], 0) == (root, 8)
    assert dims.same(v["rows"], 0, v["p"], 0) and not dims.same(v["rows"], 0, x, 0)
    assert dims.same(v["t"], 1, x, 0) and dims.same(v["s"], 1, x, 0)
    assert dims.same(v["pad"], 0, x, 0) and dims.same(v["sum"], 0, x, 0) and dims.same(v["twice"], 0, x, 0)
    assert not dims.same(v["part"], 0, x, 0) and not dims.same(v["padded_rows"], 0, x, 0)
    assert not dims.same(v["same"], 0, x, 0)  # (x's batch against one row fewer: they cannot both hold)
    assert not dims.same(v["y"], 0, x, 0) and not dims.same(v["mixed"], 0, x, 0)  # (%y's could be 1: broadcast)


def test_batched_products_keep_their_operands_batch_through_interleaving():
    dims, v = values("""func.func @f(%q: tensor<?x64x8x32xf32>, %k: tensor<?x64x8x32xf32>) -> tensor<?x8x64x64xf32> {
      %s = mlc.matmul %q, %k {transpose_b, interleaved_a, interleaved_b} : (tensor<?x64x8x32xf32>, tensor<?x64x8x32xf32>) -> tensor<?x8x64x64xf32>
      %o = mlc.matmul %s, %k {interleaved_b, interleaved_c} : (tensor<?x8x64x64xf32>, tensor<?x64x8x32xf32>) -> tensor<?x64x8x32xf32>
      return %s : tensor<?x8x64x64xf32> }""")
    assert not dims.same(v["s"], 0, v["q"], 0)  # (q's and k's batches differ, may broadcast)
    same, _ = values("""func.func @f(%q: tensor<?x64x8x32xf32>) -> tensor<?x8x64x64xf32> {
      %s = mlc.matmul %q, %q {transpose_b, interleaved_a, interleaved_b} : (tensor<?x64x8x32xf32>, tensor<?x64x8x32xf32>) -> tensor<?x8x64x64xf32>
      %o = mlc.matmul %s, %q {interleaved_b, interleaved_c} : (tensor<?x8x64x64xf32>, tensor<?x64x8x32xf32>) -> tensor<?x64x8x32xf32>
      return %s : tensor<?x8x64x64xf32> }""")
    assert same.same(_["s"], 0, _["q"], 0) and same.same(_["o"], 0, _["q"], 0)


def test_scans_keep_their_carries_and_steps_batch():
    dims, v = values("""func.func @f(%h0: tensor<?x8xf32>, %xs: tensor<5x?x8xf32>) -> tensor<?x8xf32> {
      %last, %hs = mlc.scan %h0 over %xs : (tensor<?x8xf32>, tensor<5x?x8xf32>) -> (tensor<?x8xf32>, tensor<5x?x8xf32>) {
      ^bb0(%h: tensor<?x8xf32>, %x: tensor<?x8xf32>):
        %n = mlc.add %h, %x : (tensor<?x8xf32>, tensor<?x8xf32>) -> tensor<?x8xf32>
        %both = mlc.concat %n, %h {axis = 1} : (tensor<?x8xf32>, tensor<?x8xf32>) -> tensor<?x16xf32>
        %rows = mlc.concat %n, %h {axis = 0} : (tensor<?x8xf32>, tensor<?x8xf32>) -> tensor<?x8xf32>
        mlc.yield %n, %n : tensor<?x8xf32>, tensor<?x8xf32>
      }
      return %last : tensor<?x8xf32> }""")
    assert dims.same(v["h"], 0, v["h0"], 0) and dims.same(v["x"], 0, v["xs"], 1) and dims.same(v["last"], 0, v["h0"], 0)
    assert dims.same(v["hs"], 1, v["n"], 0) and not dims.same(v["hs"], 0, v["h0"], 0)
    assert not dims.same(v["n"], 0, v["h0"], 0)  # (the carry's batch and the sequence's are not known equal)
    assert not dims.same(v["both"], 0, v["h0"], 0) and not dims.same(v["rows"], 0, v["h0"], 0)
    same, w = values("""func.func @f(%h0: tensor<?x8xf32>) -> tensor<?x8xf32> {
      %last = mlc.scan %h0 {length = 3, num_carries = 1} : (tensor<?x8xf32>) -> tensor<?x8xf32> {
      ^bb0(%h: tensor<?x8xf32>):
        %n = mlc.tanh %h : (tensor<?x8xf32>) -> tensor<?x8xf32>
        %both = mlc.concat %n, %h {axis = 1} : (tensor<?x8xf32>, tensor<?x8xf32>) -> tensor<?x16xf32>
        mlc.yield %n : tensor<?x8xf32>
      }
      return %last : tensor<?x8xf32> }""")
    assert same.same(w["both"], 0, w["h0"], 0) and same.same(w["last"], 0, w["h0"], 0)


def test_cross_entropy_joins_the_labels_batch_to_the_logits():
    text = """func.func @f(%x: tensor<?x4xf32>, %labels: tensor<?xi64>) -> tensor<f32> {
      %l = mlc.cross_entropy %x, %labels : (tensor<?x4xf32>, tensor<?xi64>) -> tensor<f32>
      %r = mlc.reshape %labels : (tensor<?xi64>) -> tensor<?x1xi64>
      return %l : tensor<f32> }"""
    dims, v = values(text)
    assert dims.same(v["r"], 0, v["x"], 0)
    dims, v = values(text.replace("%l = mlc.cross_entropy %x, %labels", "%l = mlc.reduce_sum %x").replace(
        "(tensor<?x4xf32>, tensor<?xi64>) -> tensor<f32>", "(tensor<?x4xf32>) -> tensor<f32>"))
    assert not dims.same(v["r"], 0, v["x"], 0)


EPILOGUE = """func.func @f(%x: tensor<?x{t}x{k}xf32>, %w: tensor<{k}x{n}xf32>, %b: tensor<{n}xf32>, %y: tensor<?x{t}x{n}xf32>) -> tensor<?x{n}xf32> {{
  %rows = mlc.reshape %x : (tensor<?x{t}x{k}xf32>) -> tensor<?x{k}xf32>
  %p = mlc.matmul %rows, %w : (tensor<?x{k}xf32>, tensor<{k}x{n}xf32>) -> tensor<?x{n}xf32>
  %h = mlc.reshape %p : (tensor<?x{n}xf32>) -> tensor<?x{t}x{n}xf32>
  %r = mlc.slice %x {{start = [0, 0, 0], limit = [4611686018427387904, {t}, {n}], stride = [1, 1, 1]}} : (tensor<?x{t}x{k}xf32>) -> tensor<?x{t}x{n}xf32>
  %zero = mlc.constant dense<0.0> : tensor<f32>
  %a = mlc.add %h, %b : (tensor<?x{t}x{n}xf32>, tensor<{n}xf32>) -> tensor<?x{t}x{n}xf32>
  %g = mlc.gt %r, %zero : (tensor<?x{t}x{n}xf32>, tensor<f32>) -> tensor<?x{t}x{n}xi1>
  %s = mlc.select %g, %a, %zero : (tensor<?x{t}x{n}xi1>, tensor<?x{t}x{n}xf32>, tensor<f32>) -> tensor<?x{t}x{n}xf32>
  %m = mlc.mul %s, %{by} : (tensor<?x{t}x{n}xf32>, tensor<?x{t}x{n}xf32>) -> tensor<?x{t}x{n}xf32>
  %e = mlc.exp %m
  %o = mlc.reduce_sum %e {{axes = [1]}} : (tensor<?x{t}x{n}xf32>) -> tensor<?x{n}xf32>
  return %o : tensor<?x{n}xf32>
}}"""


@settings(max_examples=12)
@given(batch=st.integers(1, 3), t=st.sampled_from([1, 3]), n=st.integers(1, 40), extra=st.integers(0, 9),
       by=st.sampled_from(["r", "y"]), y_batch=st.sampled_from(["same", "one"]))
def test_epilogues_through_reshapes_agree_with_the_interpreter(batch, t, n, extra, by, y_batch):
    """The bias add and the ReLU-gradient-like mask (of %r, a slice of %x: its batch) join the product,
    lifted to its shape; so does a product by %r, not by %y (another argument's batch: 1 at run time,
    broadcast, or equal)."""
    k = n + extra
    m = mlc.parse(EPILOGUE.format(t=t, k=k, n=n, by=by))
    fused = str(mlc.run_passes(m.clone(), "cpu-tensor"))
    kernel = fused[fused.index("mlc.fusion"):fused.index("mlc.yield")]
    assert "mlc.matmul" in kernel and "mlc.select" in kernel and ("mlc.mul" in kernel) == (by == "r")
    x = rng.standard_normal((batch, t, k)).astype(np.float32)
    w, b = rng.standard_normal((k, n)).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    y = rng.standard_normal((1 if y_batch == "one" else batch, t, n)).astype(np.float32)
    want = mlc.interpret(m, "f", x, w, b, y)
    np.testing.assert_allclose(mlc.compile(m)["f"](x, w, b, y), want, rtol=1e-4, atol=1e-5)
