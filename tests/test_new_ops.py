"""Trigonometric and hyperbolic rows, round, gather_elements / scatter_add_elements and topk: the
interpreter against numpy and torch, the CPU backend against the interpreter, gradients against
finite differences (test_grad.check), verifier messages and the printer/parser round trip."""
import numpy as np
import pytest
import torch

import mlc

from helpers import errors
from test_grad import check

rng = np.random.default_rng(3)

ROWS = {  # row -> (numpy reference, inputs inside its domain)
    "tan": (np.tan, lambda x: x), "asin": (np.arcsin, np.tanh), "acos": (np.arccos, np.tanh),
    "atan": (np.arctan, lambda x: 3 * x), "sinh": (np.sinh, lambda x: 3 * x), "cosh": (np.cosh, lambda x: 3 * x),
    "asinh": (np.arcsinh, lambda x: 3 * x), "acosh": (np.arccosh, lambda x: 1.01 + np.abs(3 * x)),
    "atanh": (np.arctanh, lambda x: 0.95 * np.tanh(x)), "round": (np.round, lambda x: 4 * x),
}


def ttype(shape, e="f32"):
    return "tensor<" + "".join(f"{'?' if d is None else d}x" for d in shape) + e + ">"


def module(body: str, args: dict, results: dict) -> mlc.Module:
    """A function @f(args) -> results; args and results map names to types."""
    sig = ", ".join(f"%{n}: {t}" for n, t in args.items())
    return mlc.parse(f"""module {{ func.func @f({sig}) -> ({', '.join(results.values())}) {{
      {body}
      return {', '.join('%' + n for n in results)} : {', '.join(results.values())} }} }}""")


def run_both(m: mlc.Module, *inputs):
    """The interpreter's results and the CPU backend's, checked to agree exactly in dtype and shape."""
    want, got = mlc.interpret(m, "f", *inputs), mlc.compile(m)["f"](*inputs)
    want, got = (want, got) if isinstance(want, tuple) else ((want,), (got,))
    for w, g in zip(want, got):
        assert w.dtype == g.dtype and w.shape == g.shape
    return want, got


# --- elementwise rows -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(ROWS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rows_against_numpy_and_natively(name, dtype):
    ref, domain = ROWS[name]
    x = domain(rng.standard_normal((4, 9))).astype(dtype)
    e = "f32" if dtype == np.float32 else "f64"
    m = module(f"%y = mlc.{name} %x", {"x": ttype(x.shape, e)}, {"y": ttype(x.shape, e)})
    (want,), (got,) = run_both(m, x)
    np.testing.assert_allclose(want, ref(x), rtol=1e-6 if dtype == np.float32 else 1e-13)
    np.testing.assert_allclose(got, want, rtol=1e-6 if dtype == np.float32 else 1e-13)


def test_round_halves_to_even_on_both_backends():
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49999997, 2.5000002, -0.0, np.inf, np.nan], np.float32)
    m = module("%y = mlc.round %x", {"x": ttype(x.shape)}, {"y": ttype(x.shape)})
    (want,), (got,) = run_both(m, x)
    np.testing.assert_array_equal(want, [0, 2, 2, -0.0, -2, -2, 0, 3, -0.0, np.inf, np.nan])
    np.testing.assert_array_equal(got, want)
    assert np.signbit(got[3]) and np.signbit(got[8])


@pytest.mark.parametrize("name", sorted(set(ROWS) - {"round"}))
def test_row_gradients(name):
    check(f"%y = mlc.{name} %x", (3, 4), x=ROWS[name][1](rng.standard_normal((3, 4))))


def test_round_has_a_zero_gradient():
    m = mlc.run_passes(module("%y = mlc.round %x\n      %s = mlc.reduce_sum %y : (tensor<3xf64>) -> tensor<f64>",
                              {"x": ttype((3,), "f64")}, {"s": "tensor<f64>"}), "grad{func=@f}")
    _, g = mlc.interpret(m, "f_grad", np.array([0.3, 1.7, -2.2]))
    np.testing.assert_array_equal(g, 0)


# --- gather_elements, scatter_add_elements --------------------------------------------------------

def gather_module(x_shape, idx_shape, axis, ie="i64"):
    return module(f"%y = mlc.gather_elements %x, %i {{axis = {axis}}}",
                  {"x": ttype(x_shape), "i": ttype(idx_shape, ie)}, {"y": ttype(idx_shape)})


@pytest.mark.parametrize("x_shape,idx_shape,axis", [((5,), (7,), 0), ((3, 5), (3, 4), 1), ((3, 5), (6, 5), 0),
                                                     ((2, 4, 3), (2, 6, 3), -2), ((4, 5, 3), (2, 3, 2), 2)])
@pytest.mark.parametrize("ie", ["i32", "i64"])
def test_gather_elements_against_torch(x_shape, idx_shape, axis, ie):
    """Indices may be smaller than x off the axis (torch.gather), and negative (ONNX)."""
    x = rng.standard_normal(x_shape).astype(np.float32)
    n = x_shape[axis]
    idx = rng.integers(-n, n, idx_shape).astype(np.int32 if ie == "i32" else np.int64)
    (want,), (got,) = run_both(gather_module(x_shape, idx_shape, axis, ie), x, idx)
    np.testing.assert_array_equal(want, torch.gather(torch.tensor(x), axis, torch.tensor(idx % n).long()).numpy())
    np.testing.assert_array_equal(got, want)


def test_gather_elements_with_dynamic_dims():
    x, idx = rng.standard_normal((3, 5)).astype(np.float32), np.array([[4, -5], [0, 1]], np.int64)
    m = module("%y = mlc.gather_elements %x, %i {axis = 1} : (tensor<?x?xf32>, tensor<?x?xi64>) -> tensor<?x?xf32>",
               {"x": ttype((None, None)), "i": ttype((None, None), "i64")}, {"y": ttype((None, None))})
    (want,), (got,) = run_both(m, x, idx)
    np.testing.assert_array_equal(want, [[x[0, 4], x[0, 0]], [x[1, 0], x[1, 1]]])
    np.testing.assert_array_equal(got, want)
    with pytest.raises(mlc.DiagnosticError, match="larger than operand 0 along dim 0"):
        mlc.compile(m)["f"](x, np.zeros((4, 1), np.int64))


@pytest.mark.parametrize("bad", [5, -6])
def test_gather_elements_index_out_of_range(bad):
    m = gather_module((2, 5), (2, 1), 1)
    x, idx = np.zeros((2, 5), np.float32), np.array([[0], [bad]], np.int64)
    with pytest.raises(mlc.DiagnosticError, match=f"index {bad} is out of range for a dim of size 5"):
        mlc.interpret(m, "f", x, idx)
    with pytest.raises(mlc.DiagnosticError, match="mlc.gather_elements.*out of range"):
        mlc.compile(m)["f"](x, idx)


def test_scatter_add_elements_against_torch_repeated_positions_add():
    x, upd = rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal((2, 6)).astype(np.float32)
    idx = np.array([[0, 0, 3, -1, 1, 0], [2, 2, 2, 1, -4, 0]], np.int64)
    m = module("%y = mlc.scatter_add_elements %x, %i, %u {axis = 1}",
               {"x": ttype((3, 4)), "i": ttype((2, 6), "i64"), "u": ttype((2, 6))}, {"y": ttype((3, 4))})
    (want,), (got,) = run_both(m, x, idx, upd)
    ref = torch.tensor(x).scatter_add(1, torch.tensor(idx % 4), torch.tensor(upd)).numpy()
    np.testing.assert_allclose(want, ref, rtol=1e-6)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_gather_and_scatter_add_elements_gradients():
    idx = np.array([[0, 2, 2, -1], [1, 1, 0, 3], [3, -4, 2, 2]])
    check("%y = mlc.gather_elements %x, %i {axis = 1} : (tensor<3x4xf64>, tensor<3x4xi64>) -> tensor<3x4xf64>",
          (3, 4), fixed={"i": idx}, x=rng.standard_normal((3, 4)))
    check("%y = mlc.gather_elements %x, %i {axis = 0} : (tensor<4x5xf64>, tensor<3x4xi64>) -> tensor<3x4xf64>",
          (3, 4), fixed={"i": idx}, x=rng.standard_normal((4, 5)))
    check("%y = mlc.scatter_add_elements %x, %i, %u {axis = 1} : (tensor<3x5xf64>, tensor<3x4xi64>, tensor<3x4xf64>) -> tensor<3x5xf64>",
          (3, 5), fixed={"i": idx}, x=rng.standard_normal((3, 5)), u=rng.standard_normal((3, 4)))


# --- topk --------------------------------------------------------------------------------------------

def topk_module(shape, k, axis, largest=True, e="f32"):
    out = list(shape)
    out[axis] = k
    return module(f"%v, %i = mlc.topk %x {{k = {k}, axis = {axis}, largest = {str(largest).lower()}}}",
                  {"x": ttype(shape, e)}, {"v": ttype(out, e), "i": ttype(out, "i64")})


def reference_topk(x, k, axis, largest):
    """Sorted by value (NaN largest), equal values in index order: a plain Python sort per row."""
    def key(v, j):
        rank = (2, 0) if v != v else (1, v.item())  # NaN above everything; Python ints do not overflow
        return (tuple(-r for r in rank) if largest else rank, j)
    xs = np.moveaxis(x, axis, -1)
    idx = np.array([sorted(range(xs.shape[-1]), key=lambda j: key(row[j], j))[:k] for row in xs.reshape(-1, xs.shape[-1])])
    idx = np.moveaxis(idx.reshape(xs.shape[:-1] + (k,)), -1, axis)
    return np.take_along_axis(x, idx, axis), idx


@pytest.mark.parametrize("shape,k,axis", [((7,), 3, 0), ((4, 9), 4, 1), ((6, 5), 6, 0), ((2, 8, 3), 5, -2), ((3, 4), 0, 1)])
@pytest.mark.parametrize("largest", [True, False])
def test_topk_against_torch(shape, k, axis, largest):
    x = rng.standard_normal(shape).astype(np.float32)
    (v, i), (nv, ni) = run_both(topk_module(shape, k, axis, largest), x)
    tv, ti = torch.topk(torch.tensor(x), k, dim=axis, largest=largest, sorted=True)
    np.testing.assert_array_equal(v, tv.numpy())
    np.testing.assert_array_equal(i, ti.numpy())
    np.testing.assert_array_equal(nv, v)
    np.testing.assert_array_equal(ni, i)


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("e", ["i32", "f64"])
def test_topk_breaks_ties_by_the_lower_index(largest, e):
    """Many equal elements, the type's extremes and (for floats) NaN and -0.0."""
    dtype = np.int32 if e == "i32" else np.float64
    lo, hi = (np.iinfo(dtype).min, np.iinfo(dtype).max) if e == "i32" else (-np.inf, np.inf)
    x = rng.integers(-2, 3, (5, 12)).astype(dtype)
    x[0, [1, 7]], x[1, [0, 4, 9]], x[2, [2, 3]] = lo, hi, 0
    if e == "f64":
        x[3, [2, 5, 8]], x[4, [0, 6]] = np.nan, -0.0
    m = topk_module(x.shape, 7, 1, largest, e)
    (v, i), (nv, ni) = run_both(m, x)
    rv, ri = reference_topk(x, 7, 1, largest)
    np.testing.assert_array_equal(i, ri)
    np.testing.assert_array_equal(v, rv)
    np.testing.assert_array_equal(ni, i)
    np.testing.assert_array_equal(nv, v)


def test_topk_with_dynamic_dims_checks_k():
    m = module("%v, %i = mlc.topk %x {k = 3, axis = 0} : (tensor<?x?xf32>) -> (tensor<3x?xf32>, tensor<3x?xi64>)",
               {"x": ttype((None, None))}, {"v": ttype((3, None)), "i": ttype((3, None), "i64")})
    x = rng.standard_normal((5, 4)).astype(np.float32)
    (v, i), (nv, ni) = run_both(m, x)
    np.testing.assert_array_equal(i, np.argsort(-x, axis=0)[:3])
    np.testing.assert_array_equal(ni, i)
    with pytest.raises(mlc.DiagnosticError, match="k = 3 exceeds"):
        mlc.interpret(m, "f", x[:2])
    with pytest.raises(mlc.DiagnosticError, match="k = 3 exceeds"):
        mlc.compile(m)["f"](x[:2])


@pytest.mark.parametrize("axis,largest", [(1, True), (0, False)])
def test_topk_gradient(axis, largest):
    x = rng.standard_normal((4, 5))
    shape = (4, 3) if axis == 1 else (3, 5)
    check(f"%y, %j = mlc.topk %x {{k = 3, axis = {axis}, largest = {str(largest).lower()}}} : "
          f"({ttype((4, 5), 'f64')}) -> ({ttype(shape, 'f64')}, {ttype(shape, 'i64')})", shape, x=x)


# --- syntax, verifier -------------------------------------------------------------------------------

def test_printed_ops_parse_back():
    m = module("""%y = mlc.gather_elements %x, %i {axis = -1}
      %s = mlc.scatter_add_elements %x, %i, %y {axis = 1}
      %v, %j = mlc.topk %x {k = 2, largest = false, sorted = false}
      %r = mlc.round %v
      %t = mlc.atanh %r""", {"x": ttype((3, 5)), "i": ttype((3, 2), "i32")},
               {"y": ttype((3, 2)), "s": ttype((3, 5)), "t": ttype((3, 2)), "j": ttype((3, 2), "i64")})
    text = str(m)
    assert "mlc.topk %x {k = 2, largest = false, sorted = false} : (tensor<3x5xf32>) -> (tensor<3x2xf32>, tensor<3x2xi64>)" in text
    assert str(mlc.parse(text)) == text


X = "%x: tensor<3x5xf32>, %i: tensor<3x2xi64>, %f: tensor<3x2xf32>, %v: tensor<3xi64>"


@pytest.mark.parametrize("line,message", [
    ("%y = mlc.gather_elements %x, %f {axis = 1}", "operand 1 must have an integer (non-i1) element type"),
    ("%y = mlc.gather_elements %x, %v {axis = 0}", "indices must have the rank of operand 0"),
    ("%y = mlc.gather_elements %x, %i {axis = 2}", "axis 2 is out of range for rank 2"),
    ("%y = mlc.gather_elements %i, %x {axis = 0}", "operand 1 must have an integer (non-i1) element type"),
    ("%y = mlc.gather_elements %x, %i {axis = 1} : (tensor<3x5xf32>, tensor<3x2xi64>) -> tensor<2x2xf32>", "tensor<3x2xf32>"),
    ("%y = mlc.scatter_add_elements %x, %i, %i {axis = 1}", "different element types"),
    ("%y = mlc.scatter_add_elements %x, %i, %x {axis = 1}", "updates must have the indices' shape [3, 2]"),
    ("%y = mlc.scatter_add_elements %f, %i, %f {axis = 0} : (tensor<3x2xf32>, tensor<3x2xi64>, tensor<3x2xf32>) -> tensor<3x2xf32>\n"
     "    %z = mlc.gather_elements %f, %w {axis = 0}", "indices have 4 elements along dim 1 but operand 0 has 2"),
    ("%a, %b = mlc.topk %x {k = 6, axis = 1}", "'k' = 6 must be between 0 and the size of axis 1 (5)"),
    ("%a, %b = mlc.topk %x {k = -1}", "'k' = -1 must be between"),
    ("%a, %b = mlc.topk %x", "k"),
    ("%a, %b = mlc.topk %v {k = 1, axis = 1}", "axis 1 is out of range for rank 1"),
    ("%y = mlc.asin %i", "operand 0 must have a floating-point element type"),
])
def test_verifier_messages(line, message):
    text = f"module {{ func.func @f({X}, %w: tensor<2x4xi64>) -> tensor<3x5xf32> {{\n    {line}\n    return %x : tensor<3x5xf32> }} }}"
    assert any(message in m for _, _, m in errors(text)), errors(text)
