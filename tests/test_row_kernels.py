"""Row kernels: reductions over trailing dims fused with the elementwise ops around them (`fuse`),
lowered to one loop per reduction per row. Compiled results must match the interpreter on the
unfused IR (sums are regrouped to vectorise: rtol 1e-5) and numpy's own formulas."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import mlc

rng = np.random.default_rng(7)


def fused_reductions(module) -> int:
    """How many reductions `fuse` put inside kernels (so a test knows it tests a row kernel)."""
    fused = mlc.run_passes(module.clone(), "fuse")
    return sum(1 for f in fused.functions.values() for op in f.walk()
               if op.name.startswith("mlc.reduce_") and op.parent_op is not None and op.parent_op.name == "mlc.fusion")


def agree(text, *inputs, rtol=1e-5, atol=1e-6):
    m = mlc.parse(text)
    want = mlc.interpret(m, "f", *inputs)
    got = mlc.compile(m)["f"](*inputs)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, equal_nan=True)
    return m, got


LAYER_NORM = """module { func.func @f(%x: tensor<?x4x24xf32>, %g: tensor<4x24xf32>, %b: tensor<24xf32>) -> tensor<?x4x24xf32> {
  %eps = mlc.constant dense<1.0e-5> : tensor<f32>
  %m = mlc.reduce_mean %x {axes = [1, 2], keepdims = true}
  %d = mlc.sub %x, %m
  %sq = mlc.mul %d, %d
  %v = mlc.reduce_mean %sq {axes = [1, 2], keepdims = true}
  %ve = mlc.add %v, %eps
  %r = mlc.rsqrt %ve
  %n = mlc.mul %d, %r
  %s = mlc.mul %n, %g
  %y = mlc.add %s, %b
  return %y : tensor<?x4x24xf32> } }"""


@pytest.mark.parametrize("batch", [0, 1, 5])
def test_layer_norm_over_two_trailing_dims(batch):
    x = rng.standard_normal((batch, 4, 24)).astype(np.float32) * 3 + 1
    g, b = rng.standard_normal((4, 24)).astype(np.float32), rng.standard_normal(24).astype(np.float32)
    m, got = agree(LAYER_NORM, x, g, b)
    assert fused_reductions(m) == 2
    mean, var = x.mean((1, 2), keepdims=True), x.var((1, 2), keepdims=True)
    np.testing.assert_allclose(got, (x - mean) / np.sqrt(var + 1e-5) * g + b, rtol=1e-4, atol=1e-5)


LAYER_NORM_KEPT = """module { func.func @f(%x: tensor<?x24xf32>, %g: tensor<24xf32>) -> (tensor<?x24xf32>, tensor<?x24xf32>, tensor<?x1xf32>) {
  %eps = mlc.constant dense<1.0e-5> : tensor<f32>
  %m = mlc.reduce_mean %x {axes = [1], keepdims = true}
  %d = mlc.sub %x, %m
  %sq = mlc.mul %d, %d
  %v = mlc.reduce_mean %sq {axes = [1], keepdims = true}
  %ve = mlc.add %v, %eps
  %r = mlc.rsqrt %ve
  %n = mlc.mul %d, %r
  %y = mlc.mul %n, %g
  %later = mlc.tanh %n
  %twice = mlc.add %n, %later
  %scale = mlc.exp %r
  return %y, %twice, %scale : tensor<?x24xf32>, tensor<?x24xf32>, tensor<?x1xf32> } }"""


@pytest.mark.parametrize("batch", [0, 1, 7])
def test_values_a_row_kernel_keeps_for_later_are_its_results_too(batch):
    """Layer norm as a training step keeps it: the normalised rows and the per-row scale are used after
    the result, so the one kernel returns them too (a whole row and a value per row), not a kernel each."""
    x = rng.standard_normal((batch, 24)).astype(np.float32) * 3 + 1
    g = rng.standard_normal(24).astype(np.float32)
    m = mlc.parse(LAYER_NORM_KEPT)
    fused = str(mlc.run_passes(m.clone(), "fuse"))
    assert fused.count("mlc.fusion") == 2 and "%y, %r, %n = mlc.fusion %x" in fused
    want = mlc.interpret(m, "f", x, g)
    got = mlc.compile(m)["f"](x, g)
    for w, v in zip(want, got):
        np.testing.assert_allclose(v, w, rtol=1e-5, atol=1e-6)
    n = (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(got[1], n + np.tanh(n), rtol=1e-4, atol=1e-5)


LSTM_STEP = """module { func.func @f(%z: tensor<?x8xf32>, %c: tensor<?x2xf32>) -> (tensor<?x2xf32>, tensor<?x2xf32>, tensor<?x2xi1>, tensor<f32>) {
  %zi = mlc.slice %z {start = [0, 0], limit = [4611686018427387904, 2], stride = [1, 1]} : (tensor<?x8xf32>) -> tensor<?x2xf32>
  %zf = mlc.slice %z {start = [0, 2], limit = [4611686018427387904, 4], stride = [1, 1]} : (tensor<?x8xf32>) -> tensor<?x2xf32>
  %zg = mlc.slice %z {start = [0, 4], limit = [4611686018427387904, 6], stride = [1, 1]} : (tensor<?x8xf32>) -> tensor<?x2xf32>
  %zo = mlc.slice %z {start = [0, 6], limit = [4611686018427387904, 8], stride = [1, 1]} : (tensor<?x8xf32>) -> tensor<?x2xf32>
  %i = mlc.sigmoid %zi
  %f = mlc.sigmoid %zf
  %g = mlc.tanh %zg
  %o = mlc.sigmoid %zo
  %kept = mlc.reshape %z : (tensor<?x8xf32>) -> tensor<?x4x2xf32>
  %c0 = mlc.reduce_max %kept {axes = [1]} : (tensor<?x4x2xf32>) -> tensor<?x2xf32>
  %fc = mlc.mul %f, %c0 : (tensor<?x2xf32>, tensor<?x2xf32>) -> tensor<?x2xf32>
  %ig = mlc.mul %i, %g : (tensor<?x2xf32>, tensor<?x2xf32>) -> tensor<?x2xf32>
  %cn = mlc.add %fc, %ig : (tensor<?x2xf32>, tensor<?x2xf32>) -> tensor<?x2xf32>
  %tc = mlc.tanh %cn
  %h = mlc.mul %o, %tc : (tensor<?x2xf32>, tensor<?x2xf32>) -> tensor<?x2xf32>
  %open = mlc.gt %h, %c : (tensor<?x2xf32>, tensor<?x2xf32>) -> tensor<?x2xi1>
  %s = mlc.reduce_sum %cn : (tensor<?x2xf32>) -> tensor<f32>
  return %h, %cn, %open, %s : tensor<?x2xf32>, tensor<?x2xf32>, tensor<?x2xi1>, tensor<f32> } }"""


@pytest.mark.parametrize("batch", [0, 1, 5])
def test_an_lstm_step_is_one_kernel_over_its_gates(batch):
    """The gates (slices of one product read in place), the cell and hidden state: kernels over the
    same elements (their `?` traced to %z's rows), merged into one returning the state, the cell and a
    mask of another element type; %c's rows may differ (broadcast), so what reads it is a kernel apart."""
    m = mlc.parse(LSTM_STEP)
    fused = str(mlc.run_passes(m.clone(), "fuse"))
    assert "%h, %cn = mlc.fusion %z, %c0" in fused and fused.count("mlc.fusion") == 1 and "%open = mlc.gt %h, %c" in fused
    z, c = rng.standard_normal((batch, 8)).astype(np.float32), rng.standard_normal((batch, 2)).astype(np.float32)
    want = mlc.interpret(m, "f", z, c)
    got = mlc.compile(m)["f"](z, c)
    for w, g in zip(want, got):
        assert w.dtype == g.dtype
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
@pytest.mark.parametrize("dtype", ["f32", "f64"])
@pytest.mark.parametrize("cols", [1, 7, 33, 1000])
def test_softmax_rows_match_numpy(op, dtype, cols):
    text = f"""module {{ func.func @f(%x: tensor<?x{cols}x{dtype}>) -> tensor<?x{cols}x{dtype}> {{
      %y = mlc.{op} %x {{axis = -1}}
      return %y : tensor<?x{cols}x{dtype}> }} }}"""
    x = (rng.standard_normal((6, cols)) * 30).astype(np.float32 if dtype == "f32" else np.float64)
    x[1, 0] = np.nan       # a NaN poisons its row only
    x[2, :] = -np.inf      # a fully masked row is NaN, as in numpy
    x[3, cols // 2] = -np.inf  # a masked entry gets probability 0
    _, got = agree(text, x)
    with np.errstate(invalid="ignore"):
        s = x - x.max(axis=1, keepdims=True)
        want = np.exp(s) / np.exp(s).sum(axis=1, keepdims=True) if op == "softmax" else s - np.log(np.exp(s).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert np.isnan(got[1]).all() and np.isnan(got[2]).all() and not np.isnan(got[[0, 4, 5]]).any()


def test_softmax_over_a_leading_axis_is_lowered_op_by_op():
    text = """module { func.func @f(%x: tensor<5x3xf32>) -> tensor<5x3xf32> {
      %y = mlc.softmax %x {axis = 0}
      return %y : tensor<5x3xf32> } }"""
    x = rng.standard_normal((5, 3)).astype(np.float32)
    _, got = agree(text, x)
    np.testing.assert_allclose(got.sum(axis=0), np.ones(3), rtol=1e-6)


def test_reduced_results_and_reductions_without_keepdims_end_a_kernel():
    text = """module { func.func @f(%x: tensor<?x16xf32>) -> tensor<?xf32> {
      %sq = mlc.mul %x, %x
      %ms = mlc.reduce_mean %sq {axes = [1], keepdims = true}
      %r = mlc.rsqrt %ms
      %y = mlc.mul %x, %r
      %t = mlc.tanh %y
      %z = mlc.reduce_max %t {axes = [1]}
      return %z : tensor<?xf32> } }"""
    x = rng.standard_normal((9, 16)).astype(np.float32)
    m, got = agree(text, x)
    assert fused_reductions(m) == 2
    np.testing.assert_allclose(got, np.tanh(x / np.sqrt((x * x).mean(1, keepdims=True))).max(1), rtol=1e-6)


@pytest.mark.parametrize("rows", [(1, 5), (5, 1), (5, 5), (1, 1), (0, 1)])
def test_inputs_sharing_a_dynamic_row_dim_fuse_and_broadcast_either_way(rows):
    """Two inputs with a `?` row dim (a training step's batch: layer norm's backward) make one row
    kernel; at run time either may be the broadcast one (one row)."""
    text = """module { func.func @f(%x: tensor<?x8xf32>, %y: tensor<?x8xf32>) -> tensor<?x8xf32> {
      %a = mlc.mul %x, %y
      %m = mlc.reduce_sum %a {axes = [1], keepdims = true}
      %e = mlc.exp %x
      %d = mlc.sub %e, %m : (tensor<?x8xf32>, tensor<?x1xf32>) -> tensor<?x8xf32>
      %z = mlc.mul %d, %y
      return %z : tensor<?x8xf32> } }"""
    x, y = (rng.standard_normal((n, 8)).astype(np.float32) for n in rows)
    m, got = agree(text, x, y)
    assert fused_reductions(m) == 1
    xb, yb = np.broadcast_arrays(x, y)
    np.testing.assert_allclose(got, (np.exp(xb) - (xb * yb).sum(1, keepdims=True)) * yb, rtol=1e-5, atol=1e-6)


def test_row_kernel_result_reuses_a_dying_input_buffer():
    text = """module { func.func @f(%a: tensor<32x?xf32>) -> tensor<?x32xf32> {
      %z = mlc.transpose %a {perm = [1, 0]} : (tensor<32x?xf32>) -> tensor<?x32xf32>
      %m = mlc.reduce_max %z {axes = [1], keepdims = true}
      %w = mlc.sub %z, %m
      return %w : tensor<?x32xf32> } }"""
    m = mlc.parse(text)
    lowered = mlc.run_passes(m.clone(), "cpu")
    allocs = [op.results[0].name_hint for op in lowered.functions["f"].walk() if op.name == "mem.alloc"]
    assert allocs == ["z"], allocs  # the row kernel writes w over z, which dies there
    agree(text, rng.standard_normal((32, 4)).astype(np.float32))


# --- generated row programs ----------------------------------------------------------------------------

UNARY = ["neg", "tanh", "abs", "sigmoid"]
BINARY = ["add", "sub", "mul", "maximum"]
REDUCE = ["reduce_sum", "reduce_mean", "reduce_max", "reduce_min"]


@st.composite
def row_programs(draw):
    """A chain over x: tensor<?x{suffix}> mixing whole-row ops, keepdims reductions over the trailing
    dims, per-row ops on their results and whole-row ops that broadcast them back."""
    suffix = draw(st.sampled_from([(1,), (5,), (17,), (40,), (3, 4), (2, 9)]))
    axes = list(range(1, 1 + len(suffix)))
    dims = "x".join(map(str, suffix))
    full, reduced, lines = ["%x"], [], []
    for i in range(draw(st.integers(2, 8))):
        kind = draw(st.sampled_from(["unary", "binary", "reduce", "broadcast", "per_row"] if reduced else ["unary", "binary", "reduce"]))
        name = f"%v{i}"
        if kind == "unary":
            lines.append(f"{name} = mlc.{draw(st.sampled_from(UNARY))} {draw(st.sampled_from(full))}")
            full.append(name)
        elif kind == "binary":
            a, b = draw(st.sampled_from(full)), draw(st.sampled_from(full + ["%g"]))
            lines.append(f"{name} = mlc.{draw(st.sampled_from(BINARY))} {a}, {b}")
            full.append(name)
        elif kind == "reduce":
            lines.append(f"{name} = mlc.{draw(st.sampled_from(REDUCE))} {draw(st.sampled_from(full))} {{axes = {axes}, keepdims = true}}")
            reduced.append(name)
        elif kind == "broadcast":  # whole row (op) per-row value, incl. a safe division
            a, r = draw(st.sampled_from(full)), draw(st.sampled_from(reduced))
            if draw(st.booleans()):
                lines += [f"{name}a = mlc.abs {r}", f"{name}b = mlc.exp {name}a", f"{name} = mlc.div {a}, {name}b"]
            else:
                lines.append(f"{name} = mlc.{draw(st.sampled_from(BINARY))} {a}, {r}")
            full.append(name)
        else:
            lines.append(f"{name} = mlc.{draw(st.sampled_from(UNARY))} {draw(st.sampled_from(reduced))}")
            reduced.append(name)
    last_full = full[-1]
    if reduced:  # the last reduction is used (and so is what it reduces)
        lines.append(f"%fin = mlc.sub {last_full}, {reduced[-1]}")
        last_full = "%fin"
    if draw(st.booleans()):
        lines.append(f"%out = mlc.{draw(st.sampled_from(REDUCE))} {last_full} {{axes = {axes}}}")
        result = "tensor<?xf32>"
    else:
        lines.append(f"%out = mlc.exp {last_full}")
        result = f"tensor<?x{dims}xf32>"
    text = (f"module {{ func.func @f(%x: tensor<?x{dims}xf32>, %g: tensor<{dims}xf32>) -> {result} {{\n  "
            + "\n  ".join(lines) + f"\n  return %out : {result} }} }}")
    batch = draw(st.sampled_from([1, 3, 8]))
    x = np.random.default_rng(draw(st.integers(0, 2**16))).standard_normal((batch, *suffix)).astype(np.float32)
    g = np.random.default_rng(1).standard_normal(suffix).astype(np.float32)
    return text, x, g


@given(row_programs())
def test_generated_row_programs_agree_with_the_interpreter(program):
    text, x, g = program
    agree(text, x, g, rtol=1e-4, atol=1e-5)
