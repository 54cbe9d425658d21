"""The grad pass: each op's gradient rule against central finite differences in f64 on the
interpreter, and the differentiated IR compiled for the CPU against the interpreter."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import mlc

rng = np.random.default_rng(5)


def ttype(shape, e="f64"):
    return f"tensor<{''.join(f'{d}x' for d in shape)}{e}>"


def grad_module(body: str, y_shape, inputs: dict, fixed: dict = {}) -> mlc.Module:
    """@loss(inputs, fixed, probe) = sum(%y * probe), %y computed by body; a random probe makes every
    element of %y count. grad adds @loss_grad. `fixed` are integer arguments (no gradient)."""
    sig = ", ".join([f"%{n}: {ttype(v.shape)}" for n, v in inputs.items()] +
                    [f"%{n}: {ttype(v.shape, 'i64')}" for n, v in fixed.items()])
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


def check(body: str, y_shape, native=True, fixed={}, **inputs):
    inputs = {n: np.array(v, np.float64) for n, v in inputs.items()}
    m = grad_module(body, y_shape, inputs, fixed)
    args = list(inputs.values()) + [np.array(v, np.int64) for v in fixed.values()] + [rng.standard_normal(y_shape)]
    got = mlc.interpret(m, "loss_grad", *args)
    np.testing.assert_allclose(got[0], mlc.interpret(m, "loss", *args), rtol=1e-12)
    # (a central difference of step 1e-6 is off by about |loss| * 1e-16 / 1e-6 from rounding alone: a
    # loss of thousands, cosh(-9), leaves small gradient elements wrong in their 4th digit)
    atol = 1e-7 + 1e-9 * abs(float(got[0]))
    for i, name in enumerate(inputs):
        np.testing.assert_allclose(got[1 + i], numeric_gradient(m, args, i), rtol=1e-5, atol=atol, err_msg=f"d loss / d {name}")
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


@pytest.mark.parametrize("shapes", [((3, 4), (4, 5)), ((2, 3, 4), (4, 5)), ((2, 3, 3, 4), (4, 5)), ((2, 1, 3, 4), (5, 4, 2)),
                                    ((4,), (4, 3)), ((3, 4), (4,)), ((4,), (4,))])
def test_matmul(shapes):
    a, b = rng.standard_normal(shapes[0]), rng.standard_normal(shapes[1])
    check("%y = mlc.matmul %a, %b", np.matmul(a, b).shape, a=a, b=b)


@pytest.mark.parametrize("flags", ["{transpose_a}", "{transpose_b}", "{transpose_a, transpose_b}"])
@pytest.mark.parametrize("batch", [(), (2,)])
def test_matmul_of_operands_stored_transposed(flags, batch):
    a, b = rng.standard_normal(batch + (3, 4)), rng.standard_normal(batch + (4, 5))
    if batch:  # (and a weight: b applied to every batch of a)
        flags_b = "transpose_b" in flags
        w = rng.standard_normal((4, 5))
        check(f"%y = mlc.matmul %a, %b {flags}", np.matmul(a, w).shape, a=np.swapaxes(a, -1, -2) if "transpose_a" in flags else a,
              b=w.T if flags_b else w)
    a_stored = np.swapaxes(a, -1, -2) if "transpose_a" in flags else a
    b_stored = np.swapaxes(b, -1, -2) if "transpose_b" in flags else b
    check(f"%y = mlc.matmul %a, %b {flags}", np.matmul(a, b).shape, a=a_stored, b=b_stored)


@pytest.mark.parametrize("flags", ["interleaved_a", "interleaved_b", "interleaved_c", "transpose_b, interleaved_a, interleaved_b",
                                   "transpose_a, interleaved_a, interleaved_c"])
def test_matmul_of_interleaved_operands(flags):
    """An operand stored interleaved ([..., M, H, K] for [..., H, M, K]) gets its cotangent stored the
    same way; so does the result's (finite differences, f64; compiled as well)."""
    a, b = rng.standard_normal((2, 3, 4, 5)), rng.standard_normal((2, 3, 5, 6))
    stored = lambda x, t, i: np.swapaxes(np.swapaxes(x, -1, -2) if t else x, -3, -2) if i else np.swapaxes(x, -1, -2) if t else x  # noqa: E731
    y = np.matmul(a, b)
    check(f"%y = mlc.matmul %a, %b {{{flags}}}", np.swapaxes(y, -3, -2).shape if "interleaved_c" in flags else y.shape,
          a=stored(a, "transpose_a" in flags, "interleaved_a" in flags), b=stored(b, "transpose_b" in flags, "interleaved_b" in flags))


@pytest.mark.parametrize("op,attrs", [("reduce_sum", "{axes = [1]}"), ("reduce_sum", "{axes = [0, 2], keepdims = true}"),
                                      ("reduce_mean", ""), ("reduce_mean", "{axes = [2], keepdims = true}"),
                                      ("reduce_prod", "{axes = [1]}"), ("reduce_prod", "{axes = [0, 2], keepdims = true}")])
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
    m2 = mlc.parse("""module { func.func @f(%x: tensor<4x3xf64>) -> tensor<f64> {
      %s = mlc.fusion %x : (tensor<4x3xf64>) -> tensor<f64> {
      ^bb0(%a: tensor<4x3xf64>):
        %r = mlc.reduce_sum %a : (tensor<4x3xf64>) -> tensor<f64>
        mlc.yield %r : tensor<f64>
      }
      return %s : tensor<f64> } }""", "c.ir")
    with pytest.raises(mlc.DiagnosticError, match=r"c.ir:2:\d+: error: 'mlc.fusion': grad: no gradient rule for this op yet"):
        mlc.run_passes(m2, "grad{func=@f}")
    with pytest.raises(mlc.DiagnosticError, match=r"g.ir:1:\d+: error: grad: %i has type tensor<3xi64>; only floating-point"):
        mlc.run_passes(m.clone(), "grad{func=@f wrt=[x, i]}")
    with pytest.raises(mlc.DiagnosticError, match=r"has no argument %z"):
        mlc.run_passes(m.clone(), "grad{func=@f wrt=[z]}")


def away_from(x, points, gap=0.05):
    for p in points:
        x = np.where(np.abs(x - p) < gap, p + 2 * gap, x)
    return x


@pytest.mark.parametrize("body", ["%y = mlc.clamp %x {min = -0.5, max = 0.7}", "%y = mlc.clamp %x {max = 0.2}",
                                  "%y = mlc.gelu %x", '%y = mlc.gelu %x {approximate = "tanh"}',
                                  "%y = mlc.softmax %x {axis = 0}", "%y = mlc.log_softmax %x {axis = 1}",
                                  "%y = mlc.reduce_max %x {axes = [1]}", "%y = mlc.reduce_min %x {axes = [0], keepdims = true}"])
def test_elementwise_and_row_ops(body):
    x = away_from(rng.standard_normal((3, 4)), [-0.5, 0.7, 0.2])
    y_shape = (3,) if "axes = [1]" in body else (1, 4) if "keepdims" in body else (3, 4)
    check(body, y_shape, x=x)


def test_reduce_prod_with_zeros_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.array([[0.0, 2.0, 3.0], [1.5, 2.0, -1.0], [0.0, 4.0, 0.0]])
    m = grad_module("%y = mlc.reduce_prod %x {axes = [1]}", (3,), {"x": x})
    probe = np.array([1.0, -2.0, 0.5])
    tx = torch.tensor(x, requires_grad=True)
    (tx.prod(dim=1) * torch.tensor(probe)).sum().backward()
    np.testing.assert_allclose(mlc.interpret(m, "loss_grad", x, probe)[1], tx.grad.numpy())


def test_reduce_max_splits_ties_evenly_as_torch_amax():
    m = grad_module("%y = mlc.reduce_max %x {axes = [1]}", (2,), {"x": np.zeros((2, 3))})
    _, gx, _ = mlc.interpret(m, "loss_grad", np.array([[1.0, 3.0, 3.0], [2.0, 0.0, 1.0]]), np.array([1.0, 1.0]))
    np.testing.assert_array_equal(gx, [[0, 0.5, 0.5], [1, 0, 0]])


def test_cast_between_floats_passes_the_cotangent_back_in_the_operand_type():
    m = mlc.parse("""module { func.func @f(%x: tensor<3xf32>) -> tensor<f64> {
      %y = mlc.cast %x : (tensor<3xf32>) -> tensor<3xf64>
      %z = mlc.mul %y, %y
      %s = mlc.reduce_sum %z : (tensor<3xf64>) -> tensor<f64>
      return %s : tensor<f64> } }""")
    mlc.run_passes(m, "grad{func=@f}")
    x = np.array([1.0, -2.0, 0.5], np.float32)
    _, gx = mlc.interpret(m, "f_grad", x)
    assert gx.dtype == np.float32
    np.testing.assert_array_equal(gx, 2 * x)


@pytest.mark.parametrize("body,y_shape", [
    ("%y = mlc.broadcast_to %x : (tensor<3x1xf64>) -> tensor<2x3x4xf64>", (2, 3, 4)),
    ("%y = mlc.slice %x {start = [1, 0], limit = [3, 1], stride = [1, 1]} : (tensor<3x1xf64>) -> tensor<2x1xf64>", (2, 1)),
    ("%y = mlc.pad %x {low = [1, 0], high = [2, 3], value = 1.5} : (tensor<3x1xf64>) -> tensor<6x4xf64>", (6, 4)),
])
def test_broadcast_slice_pad(body, y_shape):
    check(body, y_shape, x=rng.standard_normal((3, 1)))


@pytest.mark.parametrize("start,limit,stride", [([0, 1], [5, 6], [2, 2]), ([-3, 0], [5, -1], [1, 3]), ([4, 5], [9, 9], [1, 1])])
def test_strided_and_negative_slices(start, limit, stride):
    x = rng.standard_normal((5, 6))
    y_shape = x[tuple(slice(s, l, k) for s, l, k in zip(start, limit, stride))].shape
    check(f"%y = mlc.slice %x {{start = {start}, limit = {limit}, stride = {stride}}} : (tensor<5x6xf64>) -> {ttype(y_shape)}",
          y_shape, x=x)


def test_concat():
    a, b = rng.standard_normal((2, 3)), rng.standard_normal((2, 1))
    check("%y = mlc.concat %a, %b, %a {axis = 1} : (tensor<2x3xf64>, tensor<2x1xf64>, tensor<2x3xf64>) -> tensor<2x7xf64>",
          (2, 7), a=a, b=b)


def test_gather_and_scatter_add_with_repeated_indices():
    x, u = rng.standard_normal((5, 3)), rng.standard_normal((2, 4, 3))
    idx = np.array([[0, 4, 4, 1], [2, 0, 0, 0]])
    check("%y = mlc.gather %x, %i {axis = 0} : (tensor<5x3xf64>, tensor<2x4xi64>) -> tensor<2x4x3xf64>", (2, 4, 3),
          fixed={"i": idx}, x=x)
    check("%y = mlc.scatter_add %x, %i, %u {axis = 0} : (tensor<5x3xf64>, tensor<2x4xi64>, tensor<2x4x3xf64>) -> tensor<5x3xf64>",
          (5, 3), fixed={"i": idx}, x=x, u=u)


@pytest.mark.parametrize("shape,labels", [((4, 5), [0, 4, 2, 2]), ((2, 3, 2, 2), [[[0, 1], [2, 2]], [[1, 1], [0, 2]]])])
def test_cross_entropy(shape, labels):
    labels = np.array(labels)
    m = mlc.parse(f"""module {{ func.func @loss(%x: {ttype(shape)}, %t: {ttype(labels.shape, 'i64')}) -> tensor<f64> {{
      %l = mlc.cross_entropy %x, %t : ({ttype(shape)}, {ttype(labels.shape, 'i64')}) -> tensor<f64>
      return %l : tensor<f64> }} }}""")
    mlc.run_passes(m, "grad{func=@loss}")
    x = rng.standard_normal(shape)
    _, gx = mlc.interpret(m, "loss_grad", x, labels)
    np.testing.assert_allclose(gx, numeric_gradient(m, [x, labels], 0), rtol=1e-5, atol=1e-8)
    if len(shape) == 2:  # the CPU backend lowers cross_entropy over (batch, classes) only
        for got, want in zip(mlc.compile(m)["loss_grad"](x, labels), mlc.interpret(m, "loss_grad", x, labels)):
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def conv_out(size, lo, hi, k, s, d):
    return (size + lo + hi - d * (k - 1) - 1) // s + 1


CONVS = [  # (N, C, H, W), (O, C/g, kh, kw), stride, padding, dilation, groups
    ((2, 3, 6, 5), (4, 3, 3, 2), [1, 1], [0, 0, 0, 0], [1, 1], 1),
    ((1, 2, 7, 7), (3, 2, 3, 3), [2, 2], [1, 1, 1, 1], [1, 1], 1),
    ((2, 4, 7, 6), (6, 2, 2, 3), [2, 1], [1, 0, 2, 1], [2, 1], 2),
    ((1, 4, 6, 6), (4, 1, 3, 3), [3, 2], [1, 2, 0, 1], [1, 2], 4),
]


@pytest.mark.parametrize("xs,ws,stride,pad,dil,groups", CONVS)
def test_conv2d(xs, ws, stride, pad, dil, groups):
    ys = (xs[0], ws[0], conv_out(xs[2], pad[0], pad[2], ws[2], stride[0], dil[0]), conv_out(xs[3], pad[1], pad[3], ws[3], stride[1], dil[1]))
    check(f"%y = mlc.conv2d %x, %w {{stride = {stride}, padding = {pad}, dilation = {dil}, groups = {groups}}} "
          f": ({ttype(xs)}, {ttype(ws)}) -> {ttype(ys)}", ys, x=rng.standard_normal(xs), w=rng.standard_normal(ws))


TRANSPOSED = [  # (N, C, H, W), (C, O/g, kh, kw), stride, padding, output_padding, dilation, groups
    ((2, 3, 3, 4), (3, 2, 3, 2), [1, 1], [0, 0, 0, 0], [0, 0], [1, 1], 1),
    ((1, 4, 3, 3), (4, 1, 3, 2), [2, 3], [1, 0, 1, 1], [1, 2], [1, 2], 2),
    ((1, 2, 4, 3), (2, 2, 2, 3), [1, 2], [0, 1, 1, 0], [1, 0], [3, 1], 1),
]


@pytest.mark.parametrize("xs,ws,stride,pad,opad,dil,groups", TRANSPOSED)
def test_conv2d_transpose(xs, ws, stride, pad, opad, dil, groups):
    def out(size, lo, hi, k, s, d, extra):
        return (size - 1) * s - lo - hi + d * (k - 1) + extra + 1
    ys = (xs[0], ws[1] * groups, out(xs[2], pad[0], pad[2], ws[2], stride[0], dil[0], opad[0]),
          out(xs[3], pad[1], pad[3], ws[3], stride[1], dil[1], opad[1]))
    check(f"%y = mlc.conv2d_transpose %x, %w {{stride = {stride}, padding = {pad}, output_padding = {opad}, dilation = {dil}, "
          f"groups = {groups}}} : ({ttype(xs)}, {ttype(ws)}) -> {ttype(ys)}", ys, x=rng.standard_normal(xs), w=rng.standard_normal(ws))


POOLS = [  # name, kernel, stride, padding, extra attributes
    ("max_pool2d", [2, 2], [2, 2], [0, 0, 0, 0], ""), ("max_pool2d", [3, 3], [2, 1], [1, 1, 1, 0], ""),
    ("avg_pool2d", [2, 3], [1, 2], [0, 0, 0, 0], ""), ("avg_pool2d", [3, 3], [2, 2], [1, 1, 1, 1], ""),
    ("avg_pool2d", [3, 3], [2, 2], [1, 1, 1, 1], ", count_include_pad = false")]


@pytest.mark.parametrize("name,kernel,stride,pad,extra", POOLS)
def test_pooling(name, kernel, stride, pad, extra):
    x = rng.permutation(2 * 3 * 5 * 6).reshape(2, 3, 5, 6) / 10.0  # distinct values: no ties in a window
    ys = (2, 3, conv_out(5, pad[0], pad[2], kernel[0], stride[0], 1), conv_out(6, pad[1], pad[3], kernel[1], stride[1], 1))
    check(f"%y = mlc.{name} %x {{kernel = {kernel}, stride = {stride}, padding = {pad}{extra}}} : "
          f"(tensor<2x3x5x6xf64>) -> {ttype(ys)}", ys, x=x)


@given(st.integers(1, 2), st.integers(1, 2), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 2),
       st.integers(0, 1), st.integers(0, 2), st.booleans())
def test_generated_convolutions_match_finite_differences(groups, per_group, kh, kw, sh, dh, pt, pr, transposed):
    """conv2d and conv2d_transpose over generated kernels, strides, dilations, paddings and groups."""
    c, o = groups * per_group, groups * 2
    h, w = 7, 6
    if transposed:
        ws = (c, o // groups, kh, kw)
        pads = [min(pt, kh - 1), 0, 0, min(pr, kw - 1)]
        hs = ((h - 1) * sh - pads[0] - pads[2] + dh * (kh - 1) + 1, (w - 1) * 1 - pads[1] - pads[3] + (kw - 1) + 1)
        ys = (1, o, hs[0], hs[1])
        body = f"%y = mlc.conv2d_transpose %x, %w {{stride = [{sh}, 1], padding = {pads}, dilation = [{dh}, 1], groups = {groups}}}"
    else:
        ws = (o, per_group, kh, kw)
        pads = [pt, 0, 0, pr]
        ys = (1, o, conv_out(h, pt, 0, kh, sh, dh), conv_out(w, 0, pr, kw, 1, 1))
        body = f"%y = mlc.conv2d %x, %w {{stride = [{sh}, 1], padding = {pads}, dilation = [{dh}, 1], groups = {groups}}}"
    check(f"{body} : ({ttype((1, c, h, w))}, {ttype(ws)}) -> {ttype(ys)}", ys, native=False,
          x=rng.standard_normal((1, c, h, w)), w=rng.standard_normal(ws))


CALLS_AND_GLOBALS = """module {
  mlc.global @w : tensor<3x2xf64> {init = dense<[[0.5, -1.0], [2.0, 0.25], [-0.75, 1.5]]> : tensor<3x2xf64>, trainable}
  mlc.global @b : tensor<2xf64> {init = dense<[0.1, -0.2]> : tensor<2xf64>, trainable}
  mlc.global @frozen : tensor<2xf64> {init = "ones"}
  func.func private @layer(%x: tensor<4x3xf64>) -> tensor<4x2xf64> {
    %w = mlc.global_load @w : tensor<3x2xf64>
    %b = mlc.global_load @b : tensor<2xf64>
    %f = mlc.global_load @frozen : tensor<2xf64>
    %h = mlc.matmul %x, %w : (tensor<4x3xf64>, tensor<3x2xf64>) -> tensor<4x2xf64>
    %hb = mlc.add %h, %b : (tensor<4x2xf64>, tensor<2xf64>) -> tensor<4x2xf64>
    %y = mlc.mul %hb, %f : (tensor<4x2xf64>, tensor<2xf64>) -> tensor<4x2xf64>
    return %y : tensor<4x2xf64>
  }
  func.func @loss(%x: tensor<4x3xf64>) -> tensor<f64> {
    %y = func.call @layer(%x) : (tensor<4x3xf64>) -> tensor<4x2xf64>
    %t = mlc.tanh %y
    %w = mlc.global_load @w : tensor<3x2xf64>
    %ww = mlc.mul %w, %w
    %r = mlc.reduce_sum %ww : (tensor<3x2xf64>) -> tensor<f64>
    %s = mlc.reduce_sum %t : (tensor<4x2xf64>) -> tensor<f64>
    %l = mlc.add %s, %r : (tensor<f64>, tensor<f64>) -> tensor<f64>
    return %l : tensor<f64>
  }
}"""


def test_gradients_of_trainable_globals_through_calls():
    m = mlc.run_passes(mlc.parse(CALLS_AND_GLOBALS), "grad{func=@loss wrt=globals}")
    assert [str(t) for t in m.functions["loss_grad"].type.results] == ["tensor<f64>", "tensor<3x2xf64>", "tensor<2xf64>"]
    x = rng.standard_normal((4, 3))
    loss, gw, gb = mlc.interpret(m, "loss_grad", x)
    w, b = np.array([[0.5, -1.0], [2.0, 0.25], [-0.75, 1.5]]), np.array([0.1, -0.2])

    def f(w, b):
        return np.tanh(x @ w + b).sum() + (w * w).sum()
    np.testing.assert_allclose(loss, f(w, b))
    eps = 1e-6
    for got, arr in ((gw, w), (gb, b)):
        num = np.zeros_like(arr)
        for idx in np.ndindex(arr.shape):
            arr[idx] += eps
            up = f(w, b)
            arr[idx] -= 2 * eps
            num[idx] = (up - f(w, b)) / (2 * eps)
            arr[idx] += eps
        np.testing.assert_allclose(got, num, rtol=1e-6)
    for got, want in zip(mlc.compile(m)["loss_grad"](x), (loss, gw, gb)):
        np.testing.assert_allclose(got, want, rtol=1e-12)


def test_grad_of_grad_gives_hessian_vector_products():
    """hvp(x, v) = d/dx <grad f(x), v> for f = sum(x^3) + x_0 sum(sin x), against the analytic Hessian."""
    f = """
      func.func @f(%x: tensor<3xf64>) -> tensor<f64> {
        %c = mlc.mul %x, %x
        %c3 = mlc.mul %c, %x
        %s = mlc.sin %x
        %x0 = mlc.slice %x {start = [0], limit = [1]} : (tensor<3xf64>) -> tensor<1xf64>
        %m = mlc.mul %s, %x0 : (tensor<3xf64>, tensor<1xf64>) -> tensor<3xf64>
        %t = mlc.add %c3, %m
        %l = mlc.reduce_sum %t : (tensor<3xf64>) -> tensor<f64>
        return %l : tensor<f64>
      }"""
    first = str(mlc.run_passes(mlc.parse("module {" + f + "}"), "grad{func=@f}"))
    m = mlc.parse(first[:first.rindex("}")] + """
      func.func @gv(%x: tensor<3xf64>, %v: tensor<3xf64>) -> tensor<f64> {
        %l, %g = func.call @f_grad(%x) : (tensor<3xf64>) -> (tensor<f64>, tensor<3xf64>)
        %p = mlc.mul %g, %v
        %s = mlc.reduce_sum %p : (tensor<3xf64>) -> tensor<f64>
        return %s : tensor<f64>
      }
    }""")
    mlc.run_passes(m, "grad{func=@gv wrt=[x]}")
    x, v = rng.standard_normal(3), rng.standard_normal(3)
    _, hv = mlc.interpret(m, "gv_grad", x, v)
    hessian = np.diag(6 * x - np.sin(x) * x[0])
    hessian[0, :] += np.cos(x)
    hessian[:, 0] += np.cos(x)
    np.testing.assert_allclose(hv, hessian @ v, rtol=1e-10)
    np.testing.assert_allclose(mlc.compile(m)["gv_grad"](x, v)[1], hv, rtol=1e-10)


RNN_LOSS = """module {
  func.func @loss(%xs: tensor<5x3x2xf64>, %h0: tensor<3x4xf64>, %wx: tensor<2x4xf64>, %wh: tensor<4x4xf64>,
                  %probe: tensor<5x3x4xf64>) -> tensor<f64> {
    %h_last, %hs = mlc.scan %h0 over %xs {REVERSE}: (tensor<3x4xf64>, tensor<5x3x2xf64>) -> (tensor<3x4xf64>, tensor<5x3x4xf64>) {
    ^bb0(%h: tensor<3x4xf64>, %x: tensor<3x2xf64>):
      %xw = mlc.matmul %x, %wx : (tensor<3x2xf64>, tensor<2x4xf64>) -> tensor<3x4xf64>
      %hw = mlc.matmul %h, %wh : (tensor<3x4xf64>, tensor<4x4xf64>) -> tensor<3x4xf64>
      %s = mlc.add %xw, %hw
      %h_next = mlc.tanh %s
      mlc.yield %h_next, %s : tensor<3x4xf64>, tensor<3x4xf64>
    }
    %p = mlc.mul %hs, %probe
    %a = mlc.reduce_sum %p : (tensor<5x3x4xf64>) -> tensor<f64>
    %q = mlc.mul %h_last, %h_last
    %b = mlc.reduce_sum %q : (tensor<3x4xf64>) -> tensor<f64>
    %l = mlc.add %a, %b : (tensor<f64>, tensor<f64>) -> tensor<f64>
    return %l : tensor<f64>
  }
}"""


@pytest.mark.parametrize("reverse", [False, True])
def test_scan_is_differentiated_by_a_reverse_scan(reverse):
    """Back-propagation through time: gradients for the sequence, the initial carry and the weights
    the body captures, against finite differences; no step is unrolled."""
    m = mlc.parse(RNN_LOSS.replace("{REVERSE}", "{reverse} " if reverse else ""))
    mlc.run_passes(m, "grad{func=@loss}")
    body = m.functions["loss_grad"].body
    scans = [op for op in body if op.name == "mlc.scan"]
    assert len(scans) == 2 and scans[-1].attr("reverse") == (not reverse)  # forward (stacking the carries), backward
    # the forward stacks, besides its results, the carry each step starts from and the sum its two
    # products feed (xw + hw: its cotangent needs no values, so the backward reads it, not the products)
    assert [r.type.shape for r in scans[0].results[2:]] == [(5, 3, 4), (5, 3, 4)]
    args = [rng.standard_normal(s) * 0.5 for s in ((5, 3, 2), (3, 4), (2, 4), (4, 4), (5, 3, 4))]
    got = mlc.interpret(m, "loss_grad", *args)
    for i, name in enumerate(["xs", "h0", "wx", "wh"]):
        np.testing.assert_allclose(got[1 + i], numeric_gradient(m, args, i), rtol=1e-6, atol=1e-8, err_msg=name)
    for a, b in zip(mlc.compile(m)["loss_grad"](*args), got):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    # the backward step reads the forward's products instead of recomputing them, and the weights'
    # cotangents are summed after it as one product each (scan-sums): two products are left, the
    # cotangents of h and of the step's x
    tensor_level = mlc.run_passes(m.clone(), "cpu-tensor")
    back = [op for op in tensor_level.functions["loss_grad"].body.walk() if op.name == "mlc.scan" and op.attr("reverse") != reverse]
    assert [op.results[0].type.shape for op in back[0].regions[0].walk() if op.name == "mlc.matmul"] == [(3, 4), (3, 2)]
    for a, b in zip(mlc.interpret(tensor_level, "loss_grad", *args), got):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_rnn_gradients_match_torch_autograd():
    """The shipped RNN example (weights as globals) against torch.nn.RNN's parameters' gradients."""
    torch = pytest.importorskip("torch")
    text = (__import__("helpers").ROOT / "examples" / "rnn.ir").read_text()
    text = text.rstrip().rstrip("}") + """
  func.func @loss(%xs: tensor<12x?x8xf32>, %h0: tensor<?x16xf32>) -> tensor<f32> {
    %y, %hs = func.call @forward(%xs, %h0) : (tensor<12x?x8xf32>, tensor<?x16xf32>) -> (tensor<?x4xf32>, tensor<12x?x16xf32>)
    %a = mlc.reduce_mean %hs : (tensor<12x?x16xf32>) -> tensor<f32>
    %yy = mlc.mul %y, %y
    %b = mlc.reduce_sum %yy : (tensor<?x4xf32>) -> tensor<f32>
    %l = mlc.add %a, %b : (tensor<f32>, tensor<f32>) -> tensor<f32>
    return %l : tensor<f32>
  }
}"""
    m = mlc.run_passes(mlc.parse(text), "grad{func=@loss wrt=globals}")
    exe = mlc.compile(m)
    xs, h0 = rng.standard_normal((12, 3, 8)).astype(np.float32), rng.standard_normal((3, 16)).astype(np.float32)
    got = exe["loss_grad"](xs, h0)
    g = {k: torch.tensor(v, requires_grad=True) for k, v in exe.globals.items()}
    h, hs = torch.tensor(h0), []
    for t in range(12):
        h = torch.tanh(torch.tensor(xs[t]) @ g["wx"] + h @ g["wh"] + g["b"])
        hs.append(h)
    y = h @ g["wout"]
    loss = torch.stack(hs).mean() + (y * y).sum()
    loss.backward()
    np.testing.assert_allclose(got[0], loss.item(), rtol=1e-5)
    for name, value in zip(["wx", "wh", "b", "wout"], got[1:]):
        np.testing.assert_allclose(value, g[name].grad.numpy(), rtol=1e-4, atol=1e-5, err_msg=name)


def test_layer_norm_written_in_ops_matches_torch_autograd():
    torch = pytest.importorskip("torch")
    x, w, b, probe = (rng.standard_normal(s).astype(np.float32) for s in ((6, 16), (16,), (16,), (6, 16)))
    m = mlc.parse("""module { func.func @loss(%x: tensor<6x16xf32>, %w: tensor<16xf32>, %b: tensor<16xf32>,
                                               %probe: tensor<6x16xf32>) -> tensor<f32> {
      %mean = mlc.reduce_mean %x {axes = [1], keepdims = true} : (tensor<6x16xf32>) -> tensor<6x1xf32>
      %d = mlc.sub %x, %mean : (tensor<6x16xf32>, tensor<6x1xf32>) -> tensor<6x16xf32>
      %d2 = mlc.mul %d, %d
      %var = mlc.reduce_mean %d2 {axes = [1], keepdims = true} : (tensor<6x16xf32>) -> tensor<6x1xf32>
      %eps = mlc.constant dense<1.0e-05> : tensor<f32>
      %ve = mlc.add %var, %eps : (tensor<6x1xf32>, tensor<f32>) -> tensor<6x1xf32>
      %inv = mlc.rsqrt %ve
      %n = mlc.mul %d, %inv : (tensor<6x16xf32>, tensor<6x1xf32>) -> tensor<6x16xf32>
      %s = mlc.mul %n, %w : (tensor<6x16xf32>, tensor<16xf32>) -> tensor<6x16xf32>
      %y = mlc.add %s, %b : (tensor<6x16xf32>, tensor<16xf32>) -> tensor<6x16xf32>
      %p = mlc.mul %y, %probe
      %l = mlc.reduce_sum %p : (tensor<6x16xf32>) -> tensor<f32>
      return %l : tensor<f32> } }""")
    mlc.run_passes(m, "grad{func=@loss wrt=[x, w, b]}")
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    (torch.nn.functional.layer_norm(tx, (16,), tw, tb) * torch.tensor(probe)).sum().backward()
    for got in (mlc.interpret(m, "loss_grad", x, w, b, probe), mlc.compile(m)["loss_grad"](x, w, b, probe)):
        for g, t in zip(got[1:], (tx, tw, tb)):
            np.testing.assert_allclose(g, t.grad.numpy(), rtol=1e-4, atol=1e-5)


@given(st.data())
def test_generated_shape_ops_match_finite_differences(data):
    """slice, pad, concat, broadcast_to, gather, reduce_max, softmax over generated shapes and attributes."""
    rank = data.draw(st.integers(1, 3))
    shape = tuple(data.draw(st.lists(st.integers(1, 4), min_size=rank, max_size=rank)))
    x = rng.standard_normal(shape)
    kind = data.draw(st.sampled_from(["slice", "pad", "concat", "broadcast", "gather", "reduce_max", "softmax"]))
    axis = data.draw(st.integers(0, rank - 1))
    fixed = {}
    if kind == "slice":
        bounds = [sorted(data.draw(st.lists(st.integers(-d, d), min_size=2, max_size=2))) for d in shape]
        stride = [data.draw(st.integers(1, 3)) for _ in shape]
        start, limit = [b[0] for b in bounds], [b[1] for b in bounds]
        y = x[tuple(slice(s, l, k) for s, l, k in zip(start, limit, stride))]
        if y.size == 0:
            return
        body = f"%y = mlc.slice %x {{start = {start}, limit = {limit}, stride = {stride}}} : ({ttype(shape)}) -> {ttype(y.shape)}"
    elif kind == "pad":
        low, high = ([data.draw(st.integers(0, 2)) for _ in shape] for _ in range(2))
        y = np.pad(x, list(zip(low, high)))
        body = f"%y = mlc.pad %x {{low = {low}, high = {high}}} : ({ttype(shape)}) -> {ttype(y.shape)}"
    elif kind == "concat":
        y = np.concatenate([x, x[..., :1] if axis == rank - 1 else x], axis=axis)
        other = "%x" if axis != rank - 1 else "%first"
        first = f"%first = mlc.slice %x {{start = {[0] * rank}, limit = {list(shape[:-1]) + [1]}}} : ({ttype(shape)}) -> {ttype(shape[:-1] + (1,))}\n      "
        body = (first if axis == rank - 1 else "") + \
            f"%y = mlc.concat %x, {other} {{axis = {axis}}} : ({ttype(shape)}, {ttype(y.shape[:axis] + (y.shape[axis] - shape[axis],) + y.shape[axis + 1:])}) -> {ttype(y.shape)}"
    elif kind == "broadcast":
        y = np.broadcast_to(x, (2,) + shape)
        body = f"%y = mlc.broadcast_to %x : ({ttype(shape)}) -> {ttype(y.shape)}"
    elif kind == "gather":
        idx = np.array(data.draw(st.lists(st.integers(0, shape[axis] - 1), min_size=1, max_size=5)))
        fixed = {"i": idx}
        y = np.take(x, idx, axis=axis)
        body = f"%y = mlc.gather %x, %i {{axis = {axis}}} : ({ttype(shape)}, {ttype(idx.shape, 'i64')}) -> {ttype(y.shape)}"
    elif kind == "reduce_max":
        y = x.max(axis=axis)
        body = f"%y = mlc.reduce_max %x {{axes = [{axis}]}} : ({ttype(shape)}) -> {ttype(y.shape)}"
    else:
        y = x
        body = f"%y = mlc.softmax %x {{axis = {axis}}}"
    check(body, y.shape, native=False, fixed=fixed, x=x)


@pytest.mark.parametrize("transposed", [False, True])
def test_convolution_and_cross_entropy_gradients_match_torch_autograd(transposed):
    """conv (stride 2, asymmetric padding, dilation, groups) -> log_softmax -> cross_entropy, in f32 on
    the CPU backend, against torch.autograd."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x = rng.standard_normal((2, 4, 7, 6)).astype(np.float32)
    if transposed:
        w = rng.standard_normal((4, 3, 3, 2)).astype(np.float32)
        conv = "mlc.conv2d_transpose %x, %w {stride = [2, 1], padding = [1, 0, 1, 0], output_padding = [1, 0], groups = 2}"
        y_shape = (2, 6, 14, 7)
    else:
        w = rng.standard_normal((6, 2, 3, 2)).astype(np.float32)
        conv = "mlc.conv2d %x, %w {stride = [2, 1], padding = [1, 0, 2, 1], dilation = [1, 2], groups = 2}"
        y_shape = (2, 6, 4, 5)
    labels = rng.integers(0, 6, (2,) + y_shape[2:])
    ys = ttype(y_shape, "f32")
    m = mlc.parse(f"""module {{ func.func @loss(%x: tensor<2x4x7x6xf32>, %w: {ttype(w.shape, 'f32')}, %t: {ttype(labels.shape, 'i64')}) -> tensor<f32> {{
      %y = {conv} : (tensor<2x4x7x6xf32>, {ttype(w.shape, 'f32')}) -> {ys}
      %s = mlc.log_softmax %y {{axis = 1}} : ({ys}) -> {ys}
      %l = mlc.cross_entropy %s, %t : ({ys}, {ttype(labels.shape, 'i64')}) -> tensor<f32>
      return %l : tensor<f32> }} }}""")
    mlc.run_passes(m, "grad{func=@loss}")
    tx, tw = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    if transposed:
        ty = F.conv_transpose2d(tx, tw, stride=(2, 1), padding=(1, 0), output_padding=(1, 0), groups=2)
    else:
        ty = F.conv2d(F.pad(tx, (0, 1, 1, 2)), tw, stride=(2, 1), dilation=(1, 2), groups=2)
    loss = F.cross_entropy(F.log_softmax(ty, dim=1), torch.tensor(labels))
    loss.backward()
    got = mlc.interpret(m, "loss_grad", x, w, labels)
    np.testing.assert_allclose(got[0], loss.item(), rtol=1e-5)
    np.testing.assert_allclose(got[1], tx.grad.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got[2], tw.grad.numpy(), rtol=1e-4, atol=1e-6)


shapes = st.lists(st.integers(1, 3), min_size=0, max_size=3).map(tuple)


@given(st.sampled_from(UNARY + ["gelu", "clamp"]), shapes, st.integers(0, 2**16))
def test_generated_unary_gradients(name, shape, seed):
    x = np.random.default_rng(seed).standard_normal(shape)
    x = np.abs(x) + 0.5 if name in POSITIVE else away_from(x, [0.0, -0.3, 0.4])  # away from kinks and clamp bounds
    body = "%y = mlc.clamp %x {min = -0.3, max = 0.4}" if name == "clamp" else f"%y = mlc.{name} %x"
    check(body, shape, native=False, x=x)


@given(st.sampled_from(["add", "sub", "mul", "div", "maximum", "minimum", "pow", "select"]), shapes, st.data())
def test_generated_binary_gradients_sum_back_over_broadcast_dims(name, shape, data):
    """The second operand's shape drops leading dims and turns some dims into 1 (numpy broadcasting)."""
    lead = data.draw(st.integers(0, len(shape)))
    other = tuple(1 if data.draw(st.booleans()) else d for d in shape[lead:])
    r = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    a, b = r.standard_normal(shape), r.standard_normal(other)
    if name == "pow":
        a = np.abs(a) + 0.5
    if name == "div":
        b = np.where(np.abs(b) < 0.3, 0.7, b)
    if name in ("maximum", "minimum"):
        b = b + 0.05  # no ties
    body = (f"%c = mlc.gt %a, %b : ({ttype(shape)}, {ttype(other)}) -> {ttype(shape, 'i1')}\n      "
            f"%y = mlc.select %c, %a, %b : ({ttype(shape, 'i1')}, {ttype(shape)}, {ttype(other)}) -> {ttype(shape)}"
            if name == "select" else f"%y = mlc.{name} %a, %b : ({ttype(shape)}, {ttype(other)}) -> {ttype(shape)}")
    check(body, shape, native=False, a=a, b=b)
