"""Every op on the reference interpreter against numpy, or torch for convolutions and pooling."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import mlc
from mlc.ir.registry import all_ops
from mlc.ir.types import element_of

rng = np.random.default_rng(0)


def ttype(a) -> str:
    e = "i1" if a.dtype == np.bool_ else str(element_of(a.dtype))
    return "tensor<" + "".join(f"{d}x" for d in a.shape) + e + ">"


def run1(op: str, *inputs, attrs: str = "", result: str | None = None):
    """Run one op on the interpreter. `result` is the result type when it cannot be inferred."""
    args = ", ".join(f"%a{i}: {ttype(a)}" for i, a in enumerate(inputs))
    operands = ", ".join(f"%a{i}" for i in range(len(inputs)))
    sig = f" : ({', '.join(ttype(a) for a in inputs)}) -> {result}" if result else ""
    body = f"    %r = {op} {operands} {attrs}{sig}\n"
    m0 = mlc.parse(f"module {{ func.func @f({args}) {{\n{body}    return\n  }} }}")
    rtype = m0.functions["f"].body.first.results[0].type
    text = f"module {{ func.func @f({args}) -> {rtype} {{\n{body}    return %r : {rtype}\n  }} }}"
    return mlc.interpret(mlc.parse(text), "f", *inputs)


def normal(*shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


UNARY_REF = {
    "neg": np.negative, "abs": np.abs, "exp": np.exp, "log": np.log, "log1p": np.log1p, "sqrt": np.sqrt,
    "rsqrt": lambda x: 1 / np.sqrt(x), "reciprocal": lambda x: 1 / x, "square": np.square, "tanh": np.tanh,
    "sigmoid": lambda x: 1 / (1 + np.exp(-x)), "relu": lambda x: np.maximum(x, 0),
    "erf": lambda x: np.vectorize(math.erf)(x), "sin": np.sin, "cos": np.cos, "sign": np.sign, "floor": np.floor,
    "round": np.round, "tan": np.tan, "asin": np.arcsin, "acos": np.arccos, "atan": np.arctan, "sinh": np.sinh,
    "cosh": np.cosh, "asinh": np.arcsinh, "acosh": np.arccosh, "atanh": np.arctanh,
}


def test_every_unary_row_has_a_reference():
    """A new row in the elementwise table (ir/dialects/mlc.py) needs its independent reference here."""
    from mlc.ir.dialects.mlc import UNARY
    assert set(UNARY) - {"not", "gelu"} == set(UNARY_REF)  # (those two have tests of their own)


@pytest.mark.parametrize("name", sorted(UNARY_REF))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_unary(name, dtype):
    x = normal(3, 5, dtype=dtype)
    if name in ("log", "sqrt", "rsqrt", "log1p"):
        x = np.abs(x) + 0.1
    out = run1(f"mlc.{name}", x)
    assert out.dtype == dtype
    np.testing.assert_allclose(out, UNARY_REF[name](x).astype(dtype), rtol=1e-6 if dtype == np.float32 else 1e-12)


def test_not_and_logic():
    a, b = rng.integers(0, 2, (4, 3)).astype(bool), rng.integers(0, 2, (3,)).astype(bool)
    np.testing.assert_array_equal(run1("mlc.not", a), ~a)
    np.testing.assert_array_equal(run1("mlc.and", a, b), a & b)
    np.testing.assert_array_equal(run1("mlc.or", a, b), a | b)
    i = rng.integers(-5, 5, (4,)).astype(np.int32)
    np.testing.assert_array_equal(run1("mlc.not", i), ~i)


def test_gelu_matches_torch():
    x = normal(64)
    for approximate in ("none", "tanh"):
        want = F.gelu(torch.from_numpy(x), approximate=approximate).numpy()
        np.testing.assert_allclose(run1("mlc.gelu", x, attrs=f'{{approximate = "{approximate}"}}'), want, rtol=1e-5, atol=1e-6)


def test_half_precision_rounds_each_op():
    x = normal(16, dtype=np.float16)
    out = run1("mlc.exp", x)
    assert out.dtype == np.float16
    np.testing.assert_array_equal(out, np.exp(x.astype(np.float32)).astype(np.float16))
    b = normal(16)
    from mlc.ir.types import bf16, round_to_element
    got = run1("mlc.cast", b, attrs="{to = bf16}")
    np.testing.assert_array_equal(got, round_to_element(b, bf16))
    assert np.all(got.view(np.uint32) & 0xFFFF == 0)


BINARY_REF = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide, "pow": np.power, "rem": np.fmod,
              "maximum": np.maximum, "minimum": np.minimum, "eq": np.equal, "ne": np.not_equal, "lt": np.less,
              "le": np.less_equal, "gt": np.greater, "ge": np.greater_equal}


@pytest.mark.parametrize("name", sorted(BINARY_REF))
@pytest.mark.parametrize("shapes", [((3, 4), (3, 4)), ((2, 3, 4), (4,)), ((3, 1), (1, 5)), ((), (2, 2))])
def test_binary_broadcasting(name, shapes):
    a, b = normal(*shapes[0]), normal(*shapes[1])
    if name == "pow":
        a = np.abs(a)
    np.testing.assert_allclose(run1(f"mlc.{name}", a, b), BINARY_REF[name](a, b), rtol=1e-6)


def test_integer_division_truncates_and_zero_divisor_gives_zero():
    a = np.array([7, -7, 7, -7, 5, 0], np.int32)
    b = np.array([2, 2, -2, -2, 0, 3], np.int32)
    np.testing.assert_array_equal(run1("mlc.div", a, b), [3, -3, -3, 3, 0, 0])
    np.testing.assert_array_equal(run1("mlc.add", np.array([2**31 - 1], np.int32), np.array([1], np.int32)), [-2**31])


def test_select_clamp_cast():
    c = rng.integers(0, 2, (3, 1)).astype(bool)
    a, b = normal(3, 4), normal(4)
    np.testing.assert_array_equal(run1("mlc.select", c, a, b), np.where(c, a, b))
    x = normal(10) * 3
    np.testing.assert_array_equal(run1("mlc.clamp", x, attrs="{min = -1.0, max = 1.5}"), torch.clamp(torch.from_numpy(x), -1.0, 1.5).numpy())
    np.testing.assert_array_equal(run1("mlc.clamp", x, attrs="{max = 0.5}"), np.minimum(x, np.float32(0.5)))
    f = np.array([1.7, -1.7, np.nan, np.inf, -np.inf, 3e10, -3e10, 0.0], np.float32)
    np.testing.assert_array_equal(run1("mlc.cast", f, attrs="{to = i32}"), [1, -1, 0, 2**31 - 1, -2**31, 2**31 - 1, -2**31, 0])
    np.testing.assert_array_equal(run1("mlc.cast", f, attrs="{to = i1}"), f != 0)
    np.testing.assert_array_equal(run1("mlc.cast", np.array([True, False]), attrs="{to = f32}"), [1.0, 0.0])


def test_constant_and_iota():
    text = """module { func.func @f() -> (tensor<2x3xi64>, tensor<2xf32>, tensor<3xi1>) {
      %i = mlc.iota {axis = 1} : tensor<2x3xi64>
      %c = mlc.constant dense<[1.5, -2.0]> : tensor<2xf32>
      %b = mlc.constant dense<true> : tensor<3xi1>
      return %i, %c, %b : tensor<2x3xi64>, tensor<2xf32>, tensor<3xi1> } }"""
    i, c, b = mlc.interpret(mlc.parse(text), "f")
    np.testing.assert_array_equal(i, [[0, 1, 2], [0, 1, 2]])
    np.testing.assert_array_equal(c, [1.5, -2.0])
    np.testing.assert_array_equal(b, [True, True, True])


REDUCE_REF = {"reduce_sum": np.sum, "reduce_mean": np.mean, "reduce_max": np.max, "reduce_min": np.min, "reduce_prod": np.prod}


@pytest.mark.parametrize("name", sorted(REDUCE_REF))
@given(st.lists(st.integers(0, 2), min_size=0, max_size=3, unique=True), st.booleans())
def test_reductions(name, axes, keepdims):
    x = normal(2, 3, 4)
    attrs = f"{{axes = {axes}{', keepdims' if keepdims else ''}}}"
    want = REDUCE_REF[name](x, axis=tuple(axes), keepdims=keepdims)
    np.testing.assert_allclose(run1(f"mlc.{name}", x, attrs=attrs), want, rtol=1e-5)


def test_reduce_all_by_default_and_integer_sum_wraps():
    x = normal(3, 4)
    np.testing.assert_allclose(run1("mlc.reduce_sum", x), x.sum(), rtol=1e-6)
    i = np.array([2**31 - 1, 1], np.int32)
    assert run1("mlc.reduce_sum", i) == -2**31


@pytest.mark.parametrize("name,ref", [("argmax", np.argmax), ("argmin", np.argmin)])
def test_arg_reductions(name, ref):
    x = normal(4, 5)
    x[1, 2] = x[1, 3] = 10 if name == "argmax" else -10  # first of equal extremes wins
    for axis in (0, 1, -1):
        out = run1(f"mlc.{name}", x, attrs=f"{{axes = [{axis}]}}")
        assert out.dtype == np.int64
        np.testing.assert_array_equal(out, ref(x, axis=axis))
    np.testing.assert_array_equal(run1(f"mlc.{name}", x, attrs="{axes = [1], keepdims}"), ref(x, axis=1, keepdims=True))


@pytest.mark.parametrize("shapes", [((3, 4), (4, 5)), ((2, 3, 4), (4, 5)), ((2, 1, 3, 4), (5, 4, 2)), ((4,), (4, 3)), ((3, 4), (4,)), ((4,), (4,))])
def test_matmul(shapes):
    a, b = normal(*shapes[0]), normal(*shapes[1])
    np.testing.assert_allclose(run1("mlc.matmul", a, b), a @ b, rtol=1e-5, atol=1e-6)


def test_shape_ops():
    x = normal(2, 3, 4)
    np.testing.assert_array_equal(run1("mlc.reshape", x, result="tensor<6x4xf32>"), x.reshape(6, 4))
    np.testing.assert_array_equal(run1("mlc.transpose", x, attrs="{perm = [2, 0, 1]}"), x.transpose(2, 0, 1))
    np.testing.assert_array_equal(run1("mlc.broadcast_to", normal(3, 1), result="tensor<2x3x4xf32>").shape, (2, 3, 4))
    y = normal(2, 5, 4)
    np.testing.assert_array_equal(run1("mlc.concat", x, y, attrs="{axis = 1}"), np.concatenate([x, y], 1))
    np.testing.assert_array_equal(run1("mlc.slice", x, attrs="{start = [0, 1, -3], limit = [2, 3, 4], stride = [1, 1, 2]}"), x[0:2, 1:3, -3:4:2])
    np.testing.assert_array_equal(run1("mlc.pad", x, attrs="{low = [0, 1, 2], high = [1, 0, 0], value = -1.0}"),
                                  np.pad(x, [(0, 1), (1, 0), (2, 0)], constant_values=-1))


def test_gather_and_scatter_add():
    table = normal(10, 4)
    idx = np.array([[1, 3], [3, 9]], np.int64)
    np.testing.assert_array_equal(run1("mlc.gather", table, idx, attrs="{axis = 0}"), table[idx])
    np.testing.assert_array_equal(run1("mlc.gather", table, np.array([2, 0], np.int32), attrs="{axis = 1}"), table[:, [2, 0]])
    upd = normal(2, 2, 4)
    want = table.copy()
    np.add.at(want, idx, upd)
    np.testing.assert_allclose(run1("mlc.scatter_add", table, idx, upd, attrs="{axis = 0}"), want, rtol=1e-6)
    with pytest.raises(mlc.DiagnosticError, match="index 10 is out of range"):
        run1("mlc.gather", table, np.array([10], np.int64), attrs="{axis = 0}")


def conv_attrs(stride, padding, dilation, groups, **extra):
    text = f"{{stride = {list(stride)}, padding = {list(padding)}, dilation = {list(dilation)}, groups = {groups}"
    for k, v in extra.items():
        text += f", {k} = {v}"
    return text + "}"


@given(n=st.integers(1, 2), g=st.integers(1, 3), cg=st.integers(1, 2), og=st.integers(1, 2),
       h=st.integers(4, 8), w=st.integers(4, 8), k=st.integers(1, 3), s=st.integers(1, 3), d=st.integers(1, 2),
       p=st.integers(0, 2))
def test_conv2d_matches_torch(n, g, cg, og, h, w, k, s, d, p):
    x, wt = normal(n, g * cg, h, w), normal(g * og, cg, k, k)
    if h + 2 * p < d * (k - 1) + 1 or w + 2 * p < d * (k - 1) + 1:
        return
    want = F.conv2d(torch.from_numpy(x), torch.from_numpy(wt), stride=s, padding=p, dilation=d, groups=g).numpy()
    got = run1("mlc.conv2d", x, wt, attrs=conv_attrs((s, s), (p, p, p, p), (d, d), g))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_conv2d_asymmetric_padding_matches_torch_pad_then_conv():
    x, wt = normal(1, 2, 6, 7), normal(3, 2, 3, 2)
    want = F.conv2d(F.pad(torch.from_numpy(x), (2, 0, 1, 3)), torch.from_numpy(wt), stride=(2, 1)).numpy()
    got = run1("mlc.conv2d", x, wt, attrs=conv_attrs((2, 1), (1, 2, 3, 0), (1, 1), 1))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@given(n=st.integers(1, 2), g=st.integers(1, 2), cg=st.integers(1, 2), og=st.integers(1, 2),
       h=st.integers(2, 5), k=st.integers(1, 3), s=st.integers(1, 3), d=st.integers(1, 2), data=st.data())
def test_conv2d_transpose_matches_torch(n, g, cg, og, h, k, s, d, data):
    p = data.draw(st.integers(0, d * (k - 1) // 2 + (s - 1) // 2))
    op = data.draw(st.integers(0, max(s, d) - 1))
    if (h - 1) * s - 2 * p + d * (k - 1) + op + 1 < 1:
        return
    x, wt = normal(n, g * cg, h, h + 1), normal(g * cg, og, k, k)
    want = F.conv_transpose2d(torch.from_numpy(x), torch.from_numpy(wt), stride=s, padding=p, output_padding=op,
                              groups=g, dilation=d).numpy()
    got = run1("mlc.conv2d_transpose", x, wt, attrs=conv_attrs((s, s), (p, p, p, p), (d, d), g, output_padding=[op, op]))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@given(k=st.integers(1, 3), s=st.integers(1, 3), data=st.data(), include=st.booleans())
def test_pools_match_torch(k, s, data, include):
    p = data.draw(st.integers(0, k // 2))
    x = normal(2, 3, 7, 6)
    attrs = f"{{kernel = [{k}, {k}], stride = [{s}, {s}], padding = [{p}, {p}]"
    want = F.max_pool2d(torch.from_numpy(x), k, s, p).numpy()
    np.testing.assert_array_equal(run1("mlc.max_pool2d", x, attrs=attrs + "}"), want)
    want = F.avg_pool2d(torch.from_numpy(x), k, s, p, count_include_pad=include).numpy()
    got = run1("mlc.avg_pool2d", x, attrs=attrs + f", count_include_pad = {'true' if include else 'false'}}}")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@given(k=st.integers(1, 3), s=st.integers(1, 3), data=st.data(), include=st.booleans())
def test_pool_gradients_match_torch_autograd(k, s, data, include):
    p = data.draw(st.integers(0, k // 2))
    x = normal(2, 3, 7, 6)
    attrs = f"{{kernel = [{k}, {k}], stride = [{s}, {s}], padding = [{p}, {p}, {p}, {p}]"
    for name, pool, extra in (("max_pool2d_grad", lambda t: F.max_pool2d(t, k, s, p), ""),
                              ("avg_pool2d_grad", lambda t: F.avg_pool2d(t, k, s, p, count_include_pad=include),
                               f", count_include_pad = {'true' if include else 'false'}")):
        t = torch.from_numpy(x).requires_grad_()
        y = pool(t)
        g = normal(*y.shape)
        y.backward(torch.from_numpy(g))
        got = run1(f"mlc.{name}", x, g, attrs=attrs + extra + "}")
        np.testing.assert_allclose(got, t.grad.numpy(), rtol=1e-5, atol=1e-6, err_msg=name)


def test_softmax_log_softmax_cross_entropy_match_torch():
    x = normal(4, 7) * 5
    t = torch.from_numpy(x)
    np.testing.assert_allclose(run1("mlc.softmax", x, attrs="{axis = 1}"), torch.softmax(t, 1).numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(run1("mlc.softmax", x, attrs="{axis = 0}"), torch.softmax(t, 0).numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(run1("mlc.log_softmax", x), torch.log_softmax(t, -1).numpy(), rtol=1e-5, atol=1e-6)
    labels = np.array([0, 6, 3, 3], np.int64)
    np.testing.assert_allclose(run1("mlc.cross_entropy", x, labels), F.cross_entropy(t, torch.from_numpy(labels)).numpy(), rtol=1e-5)
    x3, l3 = normal(2, 5, 3), np.array([[0, 4, 1], [2, 2, 3]], np.int32)
    np.testing.assert_allclose(run1("mlc.cross_entropy", x3, l3),
                               F.cross_entropy(torch.from_numpy(x3), torch.from_numpy(l3).long()).numpy(), rtol=1e-5)
    with pytest.raises(mlc.DiagnosticError, match="label 7 is out of range"):
        run1("mlc.cross_entropy", x, np.array([0, 7, 0, 0], np.int64))


def test_random_ops_are_counter_based():
    key = np.array([42, 7], np.int64)
    u = run1("mlc.random_uniform", key, attrs="{low = -1.0, high = 1.0}", result="tensor<1000xf32>")
    again = run1("mlc.random_uniform", key, attrs="{low = -1.0, high = 1.0}", result="tensor<1000xf32>")
    other = run1("mlc.random_uniform", np.array([42, 8], np.int64), attrs="{low = -1.0, high = 1.0}", result="tensor<1000xf32>")
    np.testing.assert_array_equal(u, again)
    assert not np.array_equal(u, other)
    assert -1 <= u.min() and u.max() < 1 and abs(u.mean()) < 0.1
    n = run1("mlc.random_normal", key, attrs="{mean = 2.0, std = 3.0}", result="tensor<4000xf64>")
    assert abs(n.mean() - 2) < 0.2 and abs(n.std() - 3) < 0.2
    like = normal(5, 3)
    assert run1("mlc.random_uniform", key, like).shape == (5, 3)


def test_philox_known_answer():
    from mlc.ir.random import philox4x32
    z = np.zeros(1, np.uint32)
    assert [int(w[0]) for w in philox4x32(z, z, z, z, 0, 0)] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    f = np.full(1, 0xFFFFFFFF, np.uint32)
    assert [int(w[0]) for w in philox4x32(f, f, f, f, 0xFFFFFFFF, 0xFFFFFFFF)] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]


SCAN = """module { func.func @f(%h0: tensor<2x3xf32>, %xs: tensor<5x2x3xf32>, %w: tensor<3x3xf32>) -> (tensor<2x3xf32>, tensor<5x2x3xf32>) {
  %h, %ys = mlc.scan %h0 over %xs {REV} : (tensor<2x3xf32>, tensor<5x2x3xf32>) -> (tensor<2x3xf32>, tensor<5x2x3xf32>) {
  ^bb0(%c: tensor<2x3xf32>, %x: tensor<2x3xf32>):
    %m = mlc.matmul %c, %w
    %s = mlc.add %m, %x
    %n = mlc.tanh %s
    %o = mlc.sigmoid %c
    mlc.yield %n, %o : tensor<2x3xf32>, tensor<2x3xf32>
  }
  return %h, %ys : tensor<2x3xf32>, tensor<5x2x3xf32> } }"""


@pytest.mark.parametrize("reverse", [False, True])
def test_scan_with_captured_value(reverse):
    h0, xs, w = normal(2, 3), normal(5, 2, 3), normal(3, 3)
    m = mlc.parse(SCAN.replace("{REV}", "{reverse}" if reverse else ""))
    h_last, ys = mlc.interpret(m, "f", h0, xs, w)
    h, want = h0.astype(np.float64), np.zeros((5, 2, 3))
    for t in (range(4, -1, -1) if reverse else range(5)):
        want[t] = 1 / (1 + np.exp(-h))
        h = np.tanh(h @ w + xs[t])
    np.testing.assert_allclose(h_last, h, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ys, want, rtol=1e-5, atol=1e-6)


def test_calls_and_globals_persist_within_a_session():
    text = """module attributes {seed = 3} {
      mlc.global @count : tensor<i64> {init = "zeros"}
      mlc.global @w : tensor<4x3xf32> {init = "glorot_uniform", trainable}
      func.func private @inc(%c: tensor<i64>) -> tensor<i64> {
        %one = mlc.constant dense<1> : tensor<i64>
        %n = mlc.add %c, %one
        return %n : tensor<i64>
      }
      func.func @step() -> (tensor<i64>, tensor<4x3xf32>) {
        %c = mlc.global_load @count : tensor<i64>
        %n = func.call @inc(%c) : (tensor<i64>) -> tensor<i64>
        mlc.global_store @count, %n : tensor<i64>
        %w = mlc.global_load @w : tensor<4x3xf32>
        return %n, %w : tensor<i64>, tensor<4x3xf32>
      } }"""
    from mlc.ir.interpreter import Interpreter
    m = mlc.parse(text)
    session = Interpreter(m)
    assert [int(session.call_public("step", [])[0]) for _ in range(3)] == [1, 2, 3]
    w1 = session.call_public("step", [])[1]
    w2 = Interpreter(mlc.parse(text)).call_public("step", [])[1]
    np.testing.assert_array_equal(w1, w2)  # deterministic from the module seed
    bound = math.sqrt(6 / (4 + 3))
    assert np.abs(w1).max() <= bound and w1.std() > 0
    w3 = Interpreter(mlc.parse(text.replace("seed = 3", "seed = 4"))).call_public("step", [])[1]
    assert not np.array_equal(w1, w3)


def test_dynamic_batch_sizes():
    m = mlc.load(__import__("helpers").ROOT / "examples" / "mlp.ir")
    for batch in (1, 7, 300):
        assert mlc.interpret(m, "forward", normal(batch, 64)).shape == (batch, 10)


def test_every_op_has_a_kernel_test():
    """A new op must come with a test of its kernel: here, or in a test file of its own."""
    import pathlib
    source = "".join(p.read_text() for p in pathlib.Path(__file__).parent.glob("test_*.py"))
    untested = [name for name in all_ops() if name.startswith("mlc.") and name.split(".")[1] not in source]
    assert not untested, untested


def test_fusion_runs_its_region():
    text = """module { func.func @f(%x: tensor<2x3xf32>, %b: tensor<3xf32>) -> tensor<2x3xf32> {
      %y = mlc.fusion %x, %b : (tensor<2x3xf32>, tensor<3xf32>) -> tensor<2x3xf32> {
      ^bb0(%u: tensor<2x3xf32>, %v: tensor<3xf32>):
        %s = mlc.add %u, %v
        %t = mlc.tanh %s
        mlc.yield %t : tensor<2x3xf32>
      }
      return %y : tensor<2x3xf32> } }"""
    x, b = normal(2, 3), normal(3)
    np.testing.assert_allclose(mlc.interpret(mlc.parse(text), "f", x, b), np.tanh(x + b), rtol=1e-6)
