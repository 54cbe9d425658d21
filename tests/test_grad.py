"""The grad pass: each op's gradient rule against central finite differences in f64 on the
interpreter, and the differentiated IR compiled for the CPU against the interpreter."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import mlc

rng = np.random.default_rng(5)


def ttype(shape, e="f64"):
    return f"tensor<{''.join(f'{d}x' for d in shape)}{e}>"


def grad_module(body: str, y_shape, inputs: dict) -> mlc.Module:
    """@loss(inputs, probe) = sum(%y * probe), %y computed by body; a random probe makes every element
    of %y count. grad adds @loss_grad."""
    sig = ", ".join(f"%{n}: {ttype(v.shape)}" for n, v in inputs.items())
    text = f"""module {{ func.func @loss({sig}, %probe: {ttype(y_shape)}) -> tensor<f64> {{
      {body}
      %p = mlc.mul %y, %probe : ({ttype(y_shape)}, {ttype(y_shape)}) -> {ttype(y_shape)}
      %l = mlc.reduce_sum %p : ({ttype(y_shape)}) -> tensor<f64>
      return %l : tensor<f64> }} }}"""
    return mlc.run_passes(mlc.parse(text), "grad{func=@loss}")


def numeric_gradient(m, args, i, eps=1e-6):
    grad = np.zeros_like(args[i])
    for idx in np.ndindex(args[i].shape):
        plus, minus = [np.array(a) for a in args], [np.array(a) for a in args]
        plus[i][idx] += eps
        minus[i][idx] -= eps
        grad[idx] = (mlc.interpret(m, "loss", *plus) - mlc.interpret(m, "loss", *minus)) / (2 * eps)
    return grad


def check(body: str, y_shape, native=True, **inputs):
    inputs = {n: np.array(v, np.float64) for n, v in inputs.items()}
    m = grad_module(body, y_shape, inputs)
    args = list(inputs.values()) + [rng.standard_normal(y_shape)]
    got = mlc.interpret(m, "loss_grad", *args)
    np.testing.assert_allclose(got[0], mlc.interpret(m, "loss", *args), rtol=1e-12)
    for i, name in enumerate(inputs):
        np.testing.assert_allclose(got[1 + i], numeric_gradient(m, args, i), rtol=1e-5, atol=1e-7, err_msg=f"d loss / d {name}")
    if native:
        for g, n in zip(got, mlc.compile(m)["loss_grad"](*args)):
            np.testing.assert_allclose(n, g, rtol=1e-9, atol=1e-12)


POSITIVE = {"log", "sqrt", "rsqrt", "log1p", "reciprocal"}
UNARY = ["neg", "abs", "exp", "log", "log1p", "sqrt", "rsqrt", "reciprocal", "square", "tanh", "sigmoid", "relu", "erf", "sin", "cos"]


@pytest.mark.parametrize("name", UNARY)
def test_unary(name):
    x = rng.standard_normal((3, 4))
    x = np.abs(x) + 0.5 if name in POSITIVE else np.where(np.abs(x) < 0.05, 0.3, x)  # away from kinks
    check(f"%y = mlc.{name} %x", (3, 4), x=x)


@pytest.mark.parametrize("name", ["add", "sub", "mul", "div", "maximum", "minimum", "pow"])
@pytest.mark.parametrize("shapes", [((3, 4), (3, 4)), ((2, 3, 4), (4,)), ((3, 1), (1, 4)), ((), (2, 3))])
def test_binary_sums_back_over_broadcast_dims(name, shapes):
    a, b = rng.standard_normal(shapes[0]), rng.standard_normal(shapes[1])
    if name == "pow":
        a = np.abs(a) + 0.5
    if name == "div":
        b = np.where(np.abs(b) < 0.3, 0.7, b)
    y_shape = np.broadcast_shapes(a.shape, b.shape)
    check(f"%y = mlc.{name} %a, %b", y_shape, a=a, b=b)


def test_maximum_splits_ties_evenly_as_torch():
    a = np.array([1.0, 2.0, 3.0])
    m = grad_module("%y = mlc.maximum %a, %b", (3,), {"a": a, "b": a})
    _, ga, gb, _ = mlc.interpret(m, "loss_grad", a, np.array([1.0, 2.0, 3.0]), np.ones(3))
    np.testing.assert_array_equal(ga, [0.5, 0.5, 0.5])
    np.testing.assert_array_equal(gb, [0.5, 0.5, 0.5])


@pytest.mark.parametrize("shapes", [((3, 4), (4, 5)), ((2, 3, 4), (4, 5)), ((2, 1, 3, 4), (5, 4, 2)), ((4,), (4, 3)), ((3, 4), (4,)), ((4,), (4,))])
def test_matmul(shapes):
    a, b = rng.standard_normal(shapes[0]), rng.standard_normal(shapes[1])
    check("%y = mlc.matmul %a, %b", np.matmul(a, b).shape, a=a, b=b)


@pytest.mark.parametrize("op,attrs", [("reduce_sum", "{axes = [1]}"), ("reduce_sum", "{axes = [0, 2], keepdims = true}"),
                                      ("reduce_mean", ""), ("reduce_mean", "{axes = [2], keepdims = true}")])
def test_reductions(op, attrs):
    x = rng.standard_normal((2, 3, 4))
    keep = "keepdims" in attrs
    axes = (1,) if "[1]" in attrs else (0, 2) if "[0, 2]" in attrs else (2,) if "[2]" in attrs else (0, 1, 2)
    y_shape = np.sum(x, axis=axes, keepdims=keep).shape
    check(f"%y = mlc.{op} %x {attrs}", y_shape, x=x)


def test_shape_ops_and_select():
    x, c = rng.standard_normal((2, 3, 4)), rng.standard_normal((3, 1))
    body = """%t = mlc.transpose %x {perm = [2, 0, 1]} : (tensor<2x3x4xf64>) -> tensor<4x2x3xf64>
      %r = mlc.reshape %t : (tensor<4x2x3xf64>) -> tensor<8x3xf64>
      %z = mlc.constant dense<0.0> : tensor<f64>
      %pos = mlc.gt %r, %z : (tensor<8x3xf64>, tensor<f64>) -> tensor<8x3xi1>
      %cc = mlc.reshape %c : (tensor<3x1xf64>) -> tensor<3xf64>
      %y = mlc.select %pos, %r, %cc : (tensor<8x3xi1>, tensor<8x3xf64>, tensor<3xf64>) -> tensor<8x3xf64>"""
    check(body, (8, 3), x=np.where(np.abs(x) < 0.05, 0.2, x), c=c)


@given(st.lists(st.sampled_from(["tanh", "sigmoid", "mul_self", "add_bias", "mean_rows", "matmul_w"]), min_size=1, max_size=5),
       st.integers(0, 2**16))
def test_generated_chains_match_finite_differences(steps, seed):
    """Chains of ops over x (4x3) with a bias b (3) and weights w (3x3): gradients for all three."""
    r = np.random.default_rng(seed)
    x, b, w = r.standard_normal((4, 3)), r.standard_normal(3), r.standard_normal((3, 3)) * 0.5
    lines, cur, shape = [], "%x", (4, 3)
    for i, s in enumerate(steps):
        v = f"%v{i}"
        t = ttype(shape)
        lines.append({"tanh": f"{v} = mlc.tanh {cur}", "sigmoid": f"{v} = mlc.sigmoid {cur}",
                      "mul_self": f"{v} = mlc.mul {cur}, {cur}",
                      "add_bias": f"{v} = mlc.add {cur}, %b : ({t}, tensor<3xf64>) -> {t}",
                      "mean_rows": f"{v} = mlc.reduce_mean {cur} {{axes = [0], keepdims = true}}",
                      "matmul_w": f"{v} = mlc.matmul {cur}, %w"}[s])
        if s == "mean_rows":
            shape = (1, 3)
        cur = v
    lines.append(f"%y = mlc.tanh {cur}")
    check("\n      ".join(lines), shape, native=False, x=x, b=b, w=w)


def test_grad_of_a_function_not_returning_a_scalar_is_a_located_error():
    m = mlc.parse("""module { func.func @f(%x: tensor<3xf32>) -> tensor<3xf32> {
      %y = mlc.exp %x
      return %y : tensor<3xf32> } }""", "g.ir")
    with pytest.raises(mlc.DiagnosticError, match=r"g.ir:1:\d+: error: grad: @f must return one floating-point scalar"):
        mlc.run_passes(m, "grad{func=@f}")
    with pytest.raises(mlc.DiagnosticError, match="no function @nope"):
        mlc.run_passes(m, "grad{func=@nope}")


def test_integer_arguments_get_no_gradient_and_rule_gaps_are_named():
    m = mlc.parse("""module { func.func @f(%x: tensor<3xf64>, %i: tensor<3xi64>) -> tensor<f64> {
      %c = mlc.cast %i : (tensor<3xi64>) -> tensor<3xf64>
      %y = mlc.mul %x, %c
      %s = mlc.reduce_sum %y
      return %s : tensor<f64> } }""", "g.ir")
    out = mlc.run_passes(m.clone(), "grad{func=@f}")
    assert out.functions["f_grad"].type.results == out.functions["f"].type.results + (out.functions["f"].args[0].type,)
    m2 = mlc.parse("""module { func.func @f(%x: tensor<1x1x4x4xf64>, %w: tensor<1x1x3x3xf64>) -> tensor<f64> {
      %y = mlc.conv2d %x, %w
      %s = mlc.reduce_sum %y : (tensor<1x1x2x2xf64>) -> tensor<f64>
      return %s : tensor<f64> } }""", "c.ir")
    with pytest.raises(mlc.DiagnosticError, match=r"c.ir:2:\d+: error: 'mlc.conv2d': grad: no gradient rule for this op yet"):
        mlc.run_passes(m2, "grad{func=@f}")
