"""The tracing API (mlc.jit, trace, grad, value_and_grad, scan, numpy-named functions) against numpy
and finite differences. Most run on the interpreter backend; a few compile for the CPU."""
import inspect

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import mlc

rng = np.random.default_rng(0)


def randn(*shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


@pytest.fixture(autouse=True)
def interp_backend():
    saved = mlc.default_backend()
    mlc.default_backend("interp")
    yield
    mlc.default_backend(saved)


def numeric_grad(f, x, eps=1e-3):
    x = x.astype(np.float64)
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        d = np.zeros_like(x)
        d[i] = eps
        g[i] = (f(x + d) - f(x - d)) / (2 * eps)
    return g


# --- values -------------------------------------------------------------------------------------------

def test_jit_layer_on_the_cpu_matches_numpy():
    @mlc.jit(backend="cpu")
    def layer(x, w, b):
        return mlc.relu(x @ w + b)
    x, w, b = randn(8, 4), randn(4, 3), randn(3)
    np.testing.assert_allclose(layer(x, w, b), np.maximum(x @ w + b, 0), rtol=1e-5, atol=1e-6)


def test_operators_broadcast_and_take_python_numbers():
    x, y = randn(3, 4), randn(4)
    f = mlc.jit(lambda x, y: (x + y, x - 1, 2 * x, x / y, 1 / (1 + x * x), x ** 3, -x, abs(x), x // 0.5,
                              (x > y) & (x < 1), x @ y, x.T @ x))
    want = (x + y, x - 1, 2 * x, x / y, 1 / (1 + x * x), x ** 3, -x, abs(x), x // 0.5, (x > y) & (x < 1), x @ y, x.T @ x)
    for got, ref in zip(f(x, y), want):
        assert got.dtype == ref.dtype and got.shape == ref.shape
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_promotion_follows_jax():
    i, f, d = np.arange(4, dtype=np.int32), randn(4), randn(4, dtype=np.float64)
    got = mlc.jit(lambda i, f, d: (i * 0.5, i + f, f + d, i + 1, i > 2))(i, f, d)
    assert [a.dtype for a in got] == [np.float32, np.float32, np.float64, np.int32, np.bool_]
    np.testing.assert_allclose(got[0], i * 0.5)


def test_numpy_named_functions():
    x, y = randn(2, 3, 4), randn(2, 3, 4)
    cases = {
        lambda x, y: mlc.where(x > 0, x, y): lambda x, y: np.where(x > 0, x, y),
        lambda x, y: mlc.maximum(x, y) - mlc.minimum(x, 0.5): lambda x, y: np.maximum(x, y) - np.minimum(x, 0.5),
        lambda x, y: mlc.concatenate([x, y], axis=1): lambda x, y: np.concatenate([x, y], axis=1),
        lambda x, y: mlc.stack([x, y], axis=-1): lambda x, y: np.stack([x, y], axis=-1),
        lambda x, y: mlc.split(x, 2, axis=2)[1]: lambda x, y: np.split(x, 2, axis=2)[1],
        lambda x, y: mlc.pad(x, ((0, 0), (1, 2), (0, 1))): lambda x, y: np.pad(x, ((0, 0), (1, 2), (0, 1))),
        lambda x, y: mlc.clip(x, -0.5, 0.5): lambda x, y: np.clip(x, -0.5, 0.5),
        lambda x, y: mlc.exp(x) + mlc.log1p(mlc.abs(y)) + mlc.tanh(x): lambda x, y: np.exp(x) + np.log1p(np.abs(y)) + np.tanh(x),
        lambda x, y: x.sum(axis=(0, 2), keepdims=True) + x.mean() + x.max(1, keepdims=True):
            lambda x, y: x.sum(axis=(0, 2), keepdims=True) + x.mean() + x.max(1, keepdims=True),
        lambda x, y: mlc.argmax(x, axis=-1): lambda x, y: np.argmax(x, axis=-1),
        lambda x, y: x.var(axis=1) + mlc.std(y, axis=1, ddof=1): lambda x, y: x.var(axis=1) + np.std(y, axis=1, ddof=1),
        lambda x, y: x.reshape(6, -1).T: lambda x, y: x.reshape(6, -1).T,
        lambda x, y: mlc.transpose(x, (2, 0, 1)): lambda x, y: np.transpose(x, (2, 0, 1)),
        lambda x, y: mlc.expand_dims(x, (0, 3)).squeeze(0): lambda x, y: np.expand_dims(x, (0, 3)).squeeze(0),
        lambda x, y: mlc.take(x, np.array([2, 0]), axis=1): lambda x, y: np.take(x, np.array([2, 0]), axis=1),
        lambda x, y: mlc.softmax(x) + mlc.logsumexp(y, axis=-1, keepdims=True):
            lambda x, y: np.exp(x) / np.exp(x).sum(-1, keepdims=True) + np.log(np.exp(y).sum(-1, keepdims=True)),
        lambda x, y: mlc.tril(x) + mlc.triu(y, 1): lambda x, y: np.tril(x) + np.triu(y, 1),
        lambda x, y: x + mlc.arange(4) + mlc.zeros_like(y) + mlc.ones((3, 4)): lambda x, y: x + np.arange(4, dtype=np.float32) + 1,
        lambda x, y: mlc.broadcast_to(x[:, :1], (2, 3, 4)).astype(np.float64): lambda x, y: np.broadcast_to(x[:, :1], (2, 3, 4)).astype(np.float64),
    }
    for f, ref in cases.items():
        got, want = mlc.jit(f)(x, y), ref(x, y)
        assert got.shape == want.shape and got.dtype == want.dtype, inspect.getsource(f)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=inspect.getsource(f))


def index_strategy(rank):
    part = st.one_of(
        st.integers(-3, 2),
        st.builds(slice, st.one_of(st.none(), st.integers(-4, 4)), st.one_of(st.none(), st.integers(-4, 4)),
                  st.one_of(st.none(), st.integers(1, 3))),
        st.just(None))
    return st.lists(part, max_size=rank).flatmap(
        lambda parts: st.tuples(st.just(parts), st.integers(0, len(parts)), st.booleans()))


@given(index_strategy(3))
def test_indexing_matches_numpy(case):
    parts, at, ellipsis = case
    key = list(parts)
    if ellipsis:
        key.insert(at, Ellipsis)
    key = tuple(key)
    x = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)
    try:
        want = x[key]
    except IndexError:
        with pytest.raises(mlc.DiagnosticError):
            mlc.jit(lambda x: x[key])(x)
        return
    got = mlc.jit(lambda x: x[key])(x)
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def test_integer_array_indexing_and_iteration():
    x, idx = randn(4, 5), np.array([[3, 0], [1, 1]])
    got = mlc.jit(lambda x, i: (x[i], x[:, i], x[1, i], [r.sum() for r in x]))(x, idx)
    np.testing.assert_array_equal(got[0], x[idx])
    np.testing.assert_array_equal(got[1], x[:, idx])
    np.testing.assert_array_equal(got[2], x[1, idx])
    np.testing.assert_allclose(got[3], list(x.sum(1)), rtol=1e-6)


def test_functions_run_eagerly_on_numpy_arrays():
    x = randn(5)
    np.testing.assert_allclose(mlc.exp(x), np.exp(x), rtol=1e-6)
    np.testing.assert_allclose(mlc.concatenate([x, x]), np.concatenate([x, x]))


def test_pytrees_in_and_out():
    params = {"w": randn(3, 2), "b": [randn(2), randn(2)]}
    out = mlc.jit(lambda p, x: {"y": x @ p["w"] + p["b"][0], "z": (p["b"][1] * 2,)})(params, randn(4, 3))
    assert set(out) == {"y", "z"} and isinstance(out["z"], tuple) and out["y"].shape == (4, 2)


# --- caching and signatures ---------------------------------------------------------------------------

def test_jit_traces_once_per_signature():
    traced = []

    @mlc.jit
    def f(x, n):
        traced.append(x.shape)
        return x * n
    x = randn(3)
    f(x, 2)
    f(x + 1, 2)
    assert len(traced) == 1
    np.testing.assert_allclose(f(x, 3), x * 3)  # a static argument: traced again
    f(randn(4), 2)
    assert len(traced) == 3


def test_dynamic_batch_compiles_once():
    traced = []

    @mlc.jit(dynamic_batch=True)
    def f(x, w):
        traced.append(x.shape)
        return (x @ w).sum(axis=1)
    w = randn(3, 2)
    for n in (1, 5, 7):
        x = randn(n, 3)
        np.testing.assert_allclose(f(x, w), (x @ w).sum(1), rtol=1e-5)
    assert traced == [(None, 3)]


def test_trace_prints_the_users_locations():
    def layer(x, w):
        return mlc.tanh(x @ w)
    text = str(mlc.trace(layer, randn(2, 3), randn(3, 4)))
    line = inspect.getsourcelines(layer)[1] + 1
    assert "func.func @layer(%x: tensor<2x3xf32>, %w: tensor<3x4xf32>) -> tensor<2x4xf32>" in text
    assert f'mlc.matmul %x, %w : (tensor<2x3xf32>, tensor<3x4xf32>) -> tensor<2x4xf32> loc("{__file__}":{line}:25)' in text
    assert mlc.parse(text)  # the printed IR parses back


# --- errors at the user's line ------------------------------------------------------------------------

def test_shape_error_points_at_the_users_line():
    def bad(x, w):
        h = x * 2
        return h @ w  # the error
    with pytest.raises(mlc.DiagnosticError) as e:
        mlc.jit(bad)(randn(3, 4), randn(5, 2))
    d = e.value.diagnostics[0]
    assert (d.file, d.line) == (__file__, inspect.getsourcelines(bad)[1] + 2)
    assert "inner dimensions differ: 4 (operand 0) vs 5 (operand 1)" in d.message
    assert "return h @ w  # the error" in str(e.value)


def test_python_control_flow_on_a_traced_value_is_refused():
    def f(x):
        if x.sum() > 0:
            return x
        return -x
    with pytest.raises(mlc.TracingError, match="cannot decide Python control flow") as e:
        mlc.jit(f)(randn(3))
    assert e.value.diagnostics[0].line == inspect.getsourcelines(f)[1] + 1
    with pytest.raises(mlc.TracingError, match="no concrete value"):
        mlc.jit(lambda x: float(x.sum()))(randn(3))
    with pytest.raises(mlc.TracingError, match="immutable"):
        mlc.jit(lambda x: x.__setitem__(0, 1.0))(randn(3))


# --- autodiff ------------------------------------------------------------------------------------------

def test_grad_matches_finite_differences():
    x, w = randn(5, 4), randn(4, 3)

    def loss(w, x):
        return (mlc.tanh(x @ w) ** 2).sum() + mlc.log(1 + w * w).mean()
    ref = numeric_grad(lambda w: np.sum(np.tanh(x @ w) ** 2) + np.log(1 + w * w).mean(), w)
    np.testing.assert_allclose(mlc.grad(loss)(w, x), ref, rtol=1e-3, atol=1e-3)
    value, (gw, gx) = mlc.value_and_grad(loss, argnums=(0, 1))(w, x)
    np.testing.assert_allclose(value, np.sum(np.tanh(x @ w) ** 2) + np.log(1 + w * w).mean(), rtol=1e-5)
    np.testing.assert_allclose(gx, numeric_grad(lambda x: np.sum(np.tanh(x @ w) ** 2), x), rtol=1e-3, atol=1e-3)


def test_grad_of_a_pytree_argument():
    params, x = {"w": randn(3, 2), "b": randn(2)}, randn(4, 3)
    g = mlc.grad(lambda p, x: mlc.sum(mlc.sigmoid(x @ p["w"] + p["b"])))(params, x)
    s = 1 / (1 + np.exp(-(x @ params["w"] + params["b"])))
    np.testing.assert_allclose(g["b"], (s * (1 - s)).sum(0), rtol=1e-5)
    np.testing.assert_allclose(g["w"], x.T @ (s * (1 - s)), rtol=1e-5)


def test_grad_of_grad_is_the_second_derivative():
    x = randn(6)
    d2 = mlc.grad(lambda x: mlc.grad(lambda x: mlc.sin(x).sum())(x).sum())
    np.testing.assert_allclose(d2(x), -np.sin(x), rtol=1e-5, atol=1e-6)
    hvp = mlc.jit(lambda x, v: mlc.grad(lambda x: (mlc.grad(lambda x: (x ** 3).sum())(x) * v).sum())(x))
    np.testing.assert_allclose(hvp(x, np.ones_like(x)), 6 * x, rtol=1e-5)


def test_grad_inside_jit_closes_over_outer_values():
    x, w = randn(4, 3), randn(3)
    f = mlc.jit(lambda x, w: mlc.grad(lambda w: mlc.sum((x @ w) ** 2))(w) * 2)
    np.testing.assert_allclose(f(x, w), 2 * 2 * x.T @ (x @ w), rtol=1e-5)


def test_stop_gradient():
    x = randn(3)
    g = mlc.grad(lambda x: mlc.sum(x * mlc.stop_gradient(x)))(x)
    np.testing.assert_allclose(g, x)


def test_grad_refuses_what_it_cannot_do():
    with pytest.raises(mlc.TracingError, match="one floating-point scalar"):
        mlc.grad(lambda x: x * 2)(randn(3))
    with pytest.raises(mlc.DiagnosticError, match="only floating-point values have gradients"):
        mlc.grad(lambda x, n: mlc.sum(x * n), argnums=1)(randn(3), np.arange(3))


# --- scan -------------------------------------------------------------------------------------------

def rnn(h0, xs, w, u):
    def step(h, x):
        h = mlc.tanh(x @ w + h @ u)
        return h, h
    return mlc.scan(step, h0, xs)


def numpy_rnn(h, xs, w, u):
    hs = []
    for x in xs:
        h = np.tanh(x @ w + h @ u)
        hs.append(h)
    return h, np.stack(hs)


def test_scan_is_a_loop():
    h0, xs, w, u = randn(2, 3), randn(7, 2, 4), randn(4, 3), randn(3, 3) * 0.3
    last, hs = mlc.jit(rnn)(h0, xs, w, u)
    want_last, want_hs = numpy_rnn(h0, xs, w, u)
    np.testing.assert_allclose(hs, want_hs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(last, want_last, rtol=1e-5, atol=1e-6)
    module = mlc.trace(rnn, h0, xs, w, u)
    assert sum(op.name == "mlc.scan" for op in module.walk()) == 1


def test_scan_reverse_with_pytree_carry_and_no_output():
    xs = randn(5, 3)
    (total, count), ys = mlc.jit(lambda xs: mlc.scan(lambda c, x: ((c[0] * 0.5 + x, c[1] + 1), None),
                                                    (mlc.zeros(3), mlc.zeros((), np.int64)), xs, reverse=True))(xs)
    want = np.zeros(3, np.float32)
    for x in xs[::-1]:
        want = want * 0.5 + x
    np.testing.assert_allclose(total, want, rtol=1e-6)
    assert count == 5 and ys is None


def test_grad_through_scan_matches_finite_differences():
    h0, xs, w, u = randn(2, 3), randn(6, 2, 4), randn(4, 3), randn(3, 3) * 0.3
    g = mlc.grad(lambda u: mlc.sum(rnn(h0, xs, w, u)[1] ** 2), argnums=0)(u)
    ref = numeric_grad(lambda u: np.sum(numpy_rnn(h0, xs, w, u)[1] ** 2), u)
    np.testing.assert_allclose(g, ref, rtol=2e-3, atol=2e-3)


def test_scan_carry_must_keep_its_type():
    with pytest.raises(mlc.TracingError, match="carry 0 enters the body as tensor<3xf32> but leaves as tensor<1x3xf32>"):
        mlc.jit(lambda xs: mlc.scan(lambda c, x: (c[None] + x, None), mlc.zeros(3), xs))(randn(4, 3))
