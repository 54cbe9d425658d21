"""The CPU backend (lower-to-loops + LLVM) agrees with the reference interpreter.

Tolerances: elementwise f32 results within 1 ulp-ish (rtol 1e-6) except libm functions (erf, tanh,
log1p; rtol 1e-5); reductions and matmul sum in a different order than numpy's pairwise sums
(rtol 1e-4, atol 1e-5 over generated programs, whose chains of exp/pow amplify differences).
"""
import os
import re

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import mlc
from mlc.ir.dialects.mlc import UNARY
from mlc.ir.interpreter import Interpreter
from mlc.passes import PassManager
from mlc.testing import programs, run

from helpers import ROOT
from test_loops import SUPPORTED
from test_ops import BINARY_REF, UNARY_REF, run1, ttype

rng = np.random.default_rng(0)


def compile_and_compare(text, entry, *inputs, rtol=1e-6, atol=0.0):
    m = mlc.parse(text)
    want = mlc.interpret(m, entry, *inputs)
    got = mlc.compile(m)[entry](*inputs)
    want, got = (want, got) if isinstance(want, tuple) else ((want,), (got,))
    for w, g in zip(want, got):
        assert w.dtype == g.dtype and w.shape == g.shape
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, equal_nan=True)


def one_op(op, *inputs, attrs="", result=None):
    args = ", ".join(f"%a{i}: {ttype(a)}" for i, a in enumerate(inputs))
    operands = ", ".join(f"%a{i}" for i in range(len(inputs)))
    sig = f" : ({', '.join(ttype(a) for a in inputs)}) -> {result}" if result else ""
    rtype = ttype(np.asarray(run1(op, *inputs, attrs=attrs, result=result)))
    return (f"module {{ func.func @f({args}) -> {rtype} {{\n    %r = {op} {operands} {attrs}{sig}\n"
            f"    return %r : {rtype}\n  }} }}")


@pytest.mark.parametrize("name", sorted(n for n, row in UNARY.items() if row.kind != "logic"))  # every row, by the table
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_unary(name, dtype):
    x = (rng.standard_normal((3, 17)) * 3).astype(dtype)
    x[0, :3] = [np.nan, np.inf, -np.inf]
    if name in ("log", "sqrt", "rsqrt", "log1p"):
        x = np.abs(x)
    libm = name in ("erf", "tanh", "log1p", "gelu", "sigmoid")
    compile_and_compare(one_op(f"mlc.{name}", x), "f", x, rtol=1e-5 if libm else 1e-6, atol=1e-7 if libm else 0)


@pytest.mark.parametrize("name", sorted(BINARY_REF))
def test_binary_with_broadcasting(name):
    a, b = rng.standard_normal((4, 1, 5)).astype(np.float32), rng.standard_normal((3, 1)).astype(np.float32)
    a[0, 0, :2] = np.nan
    if name == "pow":
        a = np.abs(a)
    compile_and_compare(one_op(f"mlc.{name}", a, b), "f", a, b)


@pytest.mark.parametrize("name", sorted(n for n, row in UNARY.items() if row.kind == "num"))
@pytest.mark.parametrize("dtype", [np.int8, np.int64])
def test_integer_unary(name, dtype):
    """The scalar expansions (sign, relu, square) on integers: the same rows as for floats."""
    info = np.iinfo(dtype)
    x = np.array([7, -7, 0, 1, -1, 11, info.max, info.min + 1], dtype)
    compile_and_compare(one_op(f"mlc.{name}", x), "f", x)


@pytest.mark.parametrize("name", ["add", "sub", "mul", "div", "rem", "maximum", "minimum", "eq", "lt", "ge"])
@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.int64])
def test_integer_binary(name, dtype):
    info = np.iinfo(dtype)
    a = np.array([7, -7, 7, -7, 5, 0, info.min, info.max, info.min], dtype)
    b = np.array([2, 2, -2, -2, 0, 3, -1, 1, 1], dtype)
    compile_and_compare(one_op(f"mlc.{name}", a, b), "f", a, b)


def test_logic_select_clamp_and_casts():
    c = rng.integers(0, 2, (3, 4)).astype(bool)
    d = rng.integers(0, 2, (4,)).astype(bool)
    for op in ("mlc.and", "mlc.or"):
        compile_and_compare(one_op(op, c, d), "f", c, d)
    compile_and_compare(one_op("mlc.not", c), "f", c)
    a, b = rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal((4,)).astype(np.float32)
    compile_and_compare(one_op("mlc.select", c, a, b), "f", c, a, b)
    compile_and_compare(one_op("mlc.clamp", a, attrs="{min = -0.5, max = 0.25}"), "f", a)
    f = np.array([1.7, -1.7, np.nan, np.inf, -np.inf, 3e10, -3e10, 0.0, 255.9, -128.5], np.float32)
    for target in ("i8", "i32", "i64", "i1", "f64", "f16"):
        compile_and_compare(one_op("mlc.cast", f, attrs=f"{{to = {target}}}"), "f", f)
    i = np.array([-3, 0, 5, 2**31 - 1], np.int64)
    for target in ("i8", "i32", "f32", "i1"):
        compile_and_compare(one_op("mlc.cast", i, attrs=f"{{to = {target}}}"), "f", i)


def test_half_precision_elementwise():
    x = rng.standard_normal(33).astype(np.float16)
    compile_and_compare(one_op("mlc.exp", x), "f", x)
    compile_and_compare(one_op("mlc.mul", x, x), "f", x, x)


@pytest.mark.parametrize("dt", ["f16", "bf16"])
def test_half_precision_sums_accumulate_in_f32_and_bf16_rounds_every_result(dt):
    """Matmul, sums and softmax over f16/bf16 run in f32 and round once (as the interpreter and
    PyTorch do); bf16 values live in f32 arrays and every op rounds them to nearest-even. Within one
    bf16 rounding step (tanh's f32 kernel may round the other way), where summing in half would not be."""
    text = f"""module {{ func.func @f(%a: tensor<5x40x{dt}>, %b: tensor<40x7x{dt}>) -> (tensor<5x7x{dt}>, tensor<5x1x{dt}>, tensor<5x40x{dt}>, tensor<5x40x{dt}>) {{
      %c = mlc.matmul %a, %b
      %s = mlc.reduce_sum %a {{axes = [1], keepdims = true}}
      %m = mlc.softmax %a {{axis = 1}}
      %t = mlc.tanh %a
      %u = mlc.mul %t, %s
      %w = mlc.cast %u : (tensor<5x40x{dt}>) -> tensor<5x40xf32>
      %v = mlc.cast %w : (tensor<5x40xf32>) -> tensor<5x40x{dt}>
      return %c, %s, %m, %v : tensor<5x7x{dt}>, tensor<5x1x{dt}>, tensor<5x40x{dt}>, tensor<5x40x{dt}> }} }}"""
    np_type = np.float16 if dt == "f16" else np.float32
    a, b = rng.standard_normal((5, 40)).astype(np_type), rng.standard_normal((40, 7)).astype(np_type)
    if dt == "bf16":
        a, b = (mlc.ir.types.round_to_element(v, mlc.ir.types.ElementType("bf16")) for v in (a, b))
    compile_and_compare(text, "f", a, b, rtol=2 ** -8, atol=1e-3)


@pytest.mark.parametrize("rows", [(0, 1), (1, 0), (1, 3), (3, 1), (0, 0)])
def test_dynamic_dims_broadcast_by_numpy_rule_zero_included(rows):
    """A `?` dim of 1 broadcasts to the other's size, 0 as well (the result's size was the larger)."""
    text = """func.func @f(%x: tensor<?x8xf32>, %y: tensor<?x8xf32>) -> tensor<?x8xf32> {
      %z = mlc.add %x, %y : (tensor<?x8xf32>, tensor<?x8xf32>) -> tensor<?x8xf32>
      return %z : tensor<?x8xf32> }"""
    x, y = (rng.standard_normal((n, 8)).astype(np.float32) for n in rows)
    got = mlc.compile(mlc.parse(text))["f"](x, y)
    assert got.shape == (x + y).shape
    np.testing.assert_array_equal(got, x + y)


@pytest.mark.parametrize("name", ["reduce_sum", "reduce_mean", "reduce_max", "reduce_min", "reduce_prod", "argmax", "argmin"])
@pytest.mark.parametrize("attrs", ["{axes = [1]}", "{axes = [0, 2], keepdims}", "{axes = [2]}"])
def test_reductions(name, attrs):
    x = rng.standard_normal((3, 4, 5)).astype(np.float32)
    x[1, 2, 3] = np.nan
    if name.startswith("arg"):
        attrs = attrs.replace("0, 2", "2")
    compile_and_compare(one_op(f"mlc.{name}", x, attrs=attrs), "f", x, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shapes", [((3, 4), (4, 5)), ((2, 3, 4), (4, 5)), ((2, 1, 3, 4), (5, 4, 2)), ((4,), (4, 3)), ((3, 4), (4,))])
def test_matmul(shapes):
    a, b = rng.standard_normal(shapes[0]).astype(np.float32), rng.standard_normal(shapes[1]).astype(np.float32)
    compile_and_compare(one_op("mlc.matmul", a, b), "f", a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", ["mlp.ir", "transformer.ir", "cnn.ir"])  # rnn.ir: below
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_examples_agree_at_dynamic_batch_sizes(path, batch):
    m = mlc.load(ROOT / "examples" / path)
    exe = mlc.compile(m)
    f = m.functions["forward"]
    inputs = [rng.standard_normal([batch if d is None else d for d in a.type.shape]).astype(np.float32)
              if a.type.element.is_float else rng.integers(0, 2, a.type.shape).astype(bool) for a in f.args]
    np.testing.assert_allclose(exe["forward"](*inputs), mlc.interpret(m, "forward", *inputs), rtol=1e-4, atol=1e-5)


@given(p=programs(max_ops=6, families=SUPPORTED))
def test_generated_programs_agree(p):
    want = run(p.module, p.entry, p.inputs)
    got = mlc.compile(p.module)[p.entry](*p.inputs)
    got = list(got) if isinstance(got, tuple) else [got]
    for w, g in zip(want, got):
        assert w.shape == g.shape and w.dtype == g.dtype
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, equal_nan=True)


def test_globals_persist_across_calls_and_arguments_are_checked():
    text = """module {
      mlc.global @count : tensor<i64> {init = "zeros"}
      func.func @step(%x: tensor<3xf32>) -> (tensor<i64>, tensor<3xf32>) {
        %c = mlc.global_load @count : tensor<i64>
        %one = mlc.constant dense<1> : tensor<i64>
        %n = mlc.add %c, %one
        mlc.global_store @count, %n : tensor<i64>
        %y = mlc.mul %x, %x
        return %n, %y : tensor<i64>, tensor<3xf32>
      } }"""
    exe = mlc.compile(mlc.parse(text))
    x = np.arange(3, dtype=np.float32)
    assert [int(exe["step"](x)[0]) for _ in range(3)] == [1, 2, 3]
    assert int(exe.globals["count"]) == 3
    with pytest.raises(mlc.DiagnosticError, match="argument 'x' must have dtype float32"):
        exe["step"](np.arange(3.0))
    with pytest.raises(mlc.DiagnosticError, match=r"argument 'x' must have shape \[3\]"):
        exe["step"](np.arange(4, dtype=np.float32))
    np.testing.assert_array_equal(exe["step"](x[::-1])[1], (x[::-1]) ** 2)  # non-contiguous input


def test_bad_label_is_caught_before_reading_out_of_bounds():
    m = mlc.load(ROOT / "examples" / "mlp.ir")
    exe = mlc.compile(m)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    with pytest.raises(mlc.DiagnosticError, match="'mlc.cross_entropy': an index read from the data is out of range") as e:
        exe["loss"](x, np.array([3, 10]))
    assert e.value.diagnostics[0].file.endswith("mlp.ir") and e.value.diagnostics[0].line > 0
    np.testing.assert_allclose(exe["loss"](x, np.array([3, 9])), Interpreter(m).call_public("loss", [x, np.array([3, 9])]), rtol=1e-5)


def test_checks_name_the_source_compiled_now_not_one_cached_before(tmp_path, monkeypatch):
    import mlc.compiler
    monkeypatch.setenv("MLC_CACHE_DIR", str(tmp_path))
    hits = []
    monkeypatch.setattr(mlc.compiler, "cached", lambda *a, cached=mlc.compiler.cached, **k: hits.append(cached(*a, **k)) or hits[-1])
    path = ROOT / "examples" / "mlp.ir"
    x, bad = np.zeros((2, 64), np.float32), np.array([3, 10])
    for module, file in ((mlc.parse(path.read_text()), "<string>"), (mlc.load(path), str(path))):
        with pytest.raises(mlc.DiagnosticError, match="out of range") as e:
            mlc.compile(module)["loss"](x, bad)
        assert e.value.diagnostics[0].file == file
    assert hits == [None, None]  # (each source its own entry)
    mlc.compile(mlc.load(path))
    assert hits[-1] is not None


def test_a_compile_leaves_nothing_for_the_cycle_collector(monkeypatch):
    """The loop IR and the LLVM IR a compile makes are freed when it ends, by reference counting (they
    are disposed of): the cycle collector, back on, no longer walks them (a ResNet-18's ~400k objects,
    0.35 s). The code still runs."""
    import gc
    import weakref
    import mlc.compiler
    ops, llvm_code = [], []

    def emit_module(lowered, **kwargs):
        llvm, emitter = emit(lowered, **kwargs)
        ops.extend(map(weakref.ref, lowered.walk()))
        llvm_code.extend(weakref.ref(x) for f in llvm.functions for x in [f, *f.blocks, *(i for b in f.blocks for i in b.instructions)])
        return llvm, emitter
    emit = mlc.compiler.emit_module
    monkeypatch.setattr(mlc.compiler, "emit_module", emit_module)
    m = mlc.load(ROOT / "examples" / "mlp.ir")
    was = gc.isenabled()
    gc.disable()
    try:
        exe = mlc.compile(m, cache=False)
        assert llvm_code and not [r for r in llvm_code if r() is not None]
        # (but for a few that the lowering's closures hold in cycles of their own)
        assert len(ops) > 1000 and sum(r() is not None for r in ops) < len(ops) / 100
    finally:
        if was:
            gc.enable()
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    labels = np.array([3, 9])
    np.testing.assert_allclose(exe["loss"](x, labels), Interpreter(m).call_public("loss", [x, labels]), rtol=1e-5)


def outlined_functions(exe) -> int:
    return len(re.findall(r"^define .*\.par", exe.llvm_ir, re.M))


def test_identical_loop_nests_share_one_function_and_report_their_own_checks():
    """Two gathers of the same shapes are one outlined function (codegen's Nest); a bad index in
    either is reported at its own op: the function numbers its checks from a base each caller passes."""
    text = """func.func @f(%x: tensor<3x5xf32>, %i: tensor<3x5xi64>, %j: tensor<3x5xi64>) -> tensor<3x5xf32> {
  %a = mlc.gather_elements %x, %i {axis = 1} : (tensor<3x5xf32>, tensor<3x5xi64>) -> tensor<3x5xf32>
  %b = mlc.gather_elements %a, %j {axis = 1} : (tensor<3x5xf32>, tensor<3x5xi64>) -> tensor<3x5xf32>
  return %b : tensor<3x5xf32>
}"""
    exe = mlc.compile(mlc.parse(text), cache=False)
    assert outlined_functions(exe) == 1
    x, good = np.arange(15, dtype=np.float32).reshape(3, 5), np.array([[4, 3, 2, 1, -5]] * 3)
    np.testing.assert_array_equal(exe["f"](x, good, good), np.take_along_axis(np.take_along_axis(x, good % 5, 1), good % 5, 1))
    bad = good.copy()
    bad[2, 1] = 5
    for args, line in (((bad, good), 2), ((good, bad), 3)):
        with pytest.raises(mlc.DiagnosticError, match="'mlc.gather_elements': an index read from the data is out of range") as e:
            exe["f"](x, *args)
        assert e.value.diagnostics[0].line == line


def test_a_chain_of_products_of_one_shape_emits_the_product_once():
    def chain(n):
        ops = "\n".join(f"  %x{k + 1} = mlc.matmul %x{k}, %w : (tensor<64x64xf32>, tensor<64x64xf32>) -> tensor<64x64xf32>" for k in range(n))
        return f"func.func @f(%x0: tensor<64x64xf32>, %w: tensor<64x64xf32>) -> tensor<64x64xf32> {{\n{ops}\n  return %x{n} : tensor<64x64xf32>\n}}"
    x, w = rng.standard_normal((64, 64)).astype(np.float32), rng.standard_normal((64, 64)).astype(np.float32) / 8
    counts = []
    for n in (1, 3):
        exe = mlc.compile(mlc.parse(chain(n)), cache=False)
        want = x.astype(np.float64) @ np.linalg.matrix_power(w.astype(np.float64), n)
        np.testing.assert_allclose(exe["f"](x, w), want, rtol=1e-4, atol=1e-5)
        counts.append(outlined_functions(exe))
    assert counts[0] == counts[1] > 0


def test_random_numbers_are_bit_identical_to_the_interpreter():
    text = """module { func.func @f(%key: tensor<2xi64>, %like: tensor<?x5xf32>) -> (tensor<?x5xf32>, tensor<9xf32>) {
      %u = mlc.random_uniform %key, %like {low = -1.0, high = 2.0}
      %n = mlc.random_normal %key {mean = 1.0, std = 3.0} : (tensor<2xi64>) -> tensor<9xf32>
      return %u, %n : tensor<?x5xf32>, tensor<9xf32> } }"""
    m = mlc.parse(text)
    exe = mlc.compile(m)
    for key in ([0, 0], [42, 2**40 + 7], [-1, 123456789]):
        args = np.array(key, np.int64), np.zeros((3, 5), np.float32)
        for w, g in zip(mlc.interpret(m, "f", *args), exe["f"](*args)):
            np.testing.assert_array_equal(g, w)


def test_unsupported_op_is_an_error_not_a_fallback():
    text = """module {
      func.func private @loop(%x: tensor<2xf32>) -> tensor<2xf32> {
        %y = func.call @loop(%x) : (tensor<2xf32>) -> tensor<2xf32>
        return %y : tensor<2xf32>
      }
      func.func @f(%x: tensor<2xf32>) -> tensor<2xf32> {
        %y = func.call @loop(%x) : (tensor<2xf32>) -> tensor<2xf32>
        return %y : tensor<2xf32>
      } }"""
    with pytest.raises(mlc.DiagnosticError, match="'func.call': the CPU backend cannot compile this op yet"):
        mlc.compile(mlc.parse(text))


def test_rnn_example_and_runtime_shape_errors():
    m = mlc.load(ROOT / "examples" / "rnn.ir")
    exe = mlc.compile(m)
    for batch in (1, 5):
        xs, h0 = rng.standard_normal((12, batch, 8)).astype(np.float32), rng.standard_normal((batch, 16)).astype(np.float32)
        for w, g in zip(mlc.interpret(m, "forward", xs, h0), exe["forward"](xs, h0)):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    with pytest.raises(mlc.DiagnosticError, match="'mlc.matmul'|'mlc.add'|broadcast"):
        exe["forward"](rng.standard_normal((12, 3, 8)).astype(np.float32), rng.standard_normal((2, 16)).astype(np.float32))


def test_reshapes_that_name_their_operands_buffer_leave_every_value_intact():
    """A reshape is a view of its operand's buffer (no copy) where nothing can write that buffer
    meanwhile: an elementwise op of a view must not be written over it (that would change %a, read
    again after), a view of an argument reads the caller's array, and a reshape of a global's value,
    stored to before the view is read, keeps the old value (a copy)."""
    text = """module {
      mlc.global @g : tensor<2x3xf32> {init = "ones"}
      func.func @f(%x: tensor<2x3xf32>) -> (tensor<6xf32>, tensor<2x3xf32>, tensor<3x2xf32>, tensor<6xf32>) {
        %a = mlc.add %x, %x
        %flat = mlc.reshape %a : (tensor<2x3xf32>) -> tensor<6xf32>
        %e = mlc.exp %flat
        %b = mlc.mul %a, %a
        %xv = mlc.reshape %x : (tensor<2x3xf32>) -> tensor<3x2xf32>
        %xt = mlc.neg %xv
        %old = mlc.global_load @g : tensor<2x3xf32>
        %oldv = mlc.reshape %old : (tensor<2x3xf32>) -> tensor<6xf32>
        mlc.global_store @g, %b : tensor<2x3xf32>
        %o = mlc.add %oldv, %e
        return %e, %b, %xt, %o : tensor<6xf32>, tensor<2x3xf32>, tensor<3x2xf32>, tensor<6xf32>
      } }"""
    m = mlc.parse(text)
    x = rng.standard_normal((2, 3)).astype(np.float32)
    kept = x.copy()
    e, b, xt, o = mlc.compile(m)["f"](x)
    np.testing.assert_allclose(e, np.exp(2 * x).ravel(), rtol=1e-6)
    np.testing.assert_allclose(b, (2 * x) ** 2, rtol=1e-6)
    np.testing.assert_array_equal(xt, -x.reshape(3, 2))
    np.testing.assert_allclose(o, 1 + np.exp(2 * x).ravel(), rtol=1e-6)
    np.testing.assert_array_equal(x, kept)


def test_slices_fused_into_an_elementwise_kernel_read_their_operand_in_place():
    text = """module { func.func @gates(%z: tensor<?x12xf32>, %c: tensor<?x3xf32>) -> tensor<?x3xf32> {
        %i = mlc.slice %z {start = [0, 0], limit = [4611686018427387904, 3], stride = [1, 1]} : (tensor<?x12xf32>) -> tensor<?x3xf32>
        %f = mlc.slice %z {start = [0, 5], limit = [4611686018427387904, 11], stride = [1, 2]} : (tensor<?x12xf32>) -> tensor<?x3xf32>
        %o = mlc.slice %z {start = [0, -3], limit = [4611686018427387904, 4611686018427387904], stride = [1, 1]} : (tensor<?x12xf32>) -> tensor<?x3xf32>
        %a = mlc.mul %f, %c
        %b = mlc.add %a, %i
        %n = mlc.sub %b, %o
        return %n : tensor<?x3xf32>
      } }"""
    fused = mlc.parse(text)
    PassManager.parse("fuse").run(fused)
    assert [op.name for op in fused.functions["gates"].body.ops] == ["mlc.fusion", "func.return"]
    for rows in (1, 5):
        z = rng.standard_normal((rows, 12)).astype(np.float32)
        c = rng.standard_normal((rows, 3)).astype(np.float32)
        got = mlc.compile(mlc.parse(text))["gates"](z, c)
        np.testing.assert_allclose(got, z[:, 5:11:2] * c + z[:, :3] - z[:, -3:], rtol=1e-6)


@given(start=st.integers(-9, 8), stride=st.integers(1, 3), rows=st.sampled_from([1, 3]), dynamic=st.booleans())
def test_generated_slices_read_in_place_by_a_fused_kernel_agree_with_numpy(start, stride, rows, dynamic):
    """A slice along the static dim (any start, negative from the end, any stride) fused into the
    elementwise ops after it: the kernel reads the operand where numpy's slice takes each element."""
    x = rng.standard_normal((rows, 9)).astype(np.float32)
    picked = x[:, start::stride]
    assume(picked.shape[1] > 0)
    n, width = "?" if dynamic else rows, picked.shape[1]
    text = f"""module {{ func.func @f(%x: tensor<{n}x9xf32>, %y: tensor<{n}x{width}xf32>) -> tensor<{n}x{width}xf32> {{
        %s = mlc.slice %x {{start = [0, {start}], limit = [4611686018427387904, 4611686018427387904], stride = [1, {stride}]}} : (tensor<{n}x9xf32>) -> tensor<{n}x{width}xf32>
        %e = mlc.tanh %s
        %m = mlc.mul %e, %y
        return %m : tensor<{n}x{width}xf32>
      }} }}"""
    fused = mlc.parse(text)
    PassManager.parse("fuse").run(fused)
    assert [op.name for op in fused.functions["f"].body.ops] == ["mlc.fusion", "func.return"]
    y = rng.standard_normal(picked.shape).astype(np.float32)
    np.testing.assert_allclose(mlc.compile(mlc.parse(text))["f"](x, y), np.tanh(picked) * y, rtol=1e-5, atol=1e-6)


@settings(max_examples=15, deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=4), data=st.data(), dynamic=st.booleans())
def test_pads_fill_the_border_once_and_agree_with_numpy(shape, data, dynamic):
    """A padded buffer's border is written slab by slab (each element once) around the copied input:
    every mix of low and high widths (zero included) along every axis, a `?` first dim too."""
    low = data.draw(st.lists(st.integers(0, 2), min_size=len(shape), max_size=len(shape)))
    high = data.draw(st.lists(st.integers(0, 2), min_size=len(shape), max_size=len(shape)))
    t = lambda dims: "tensor<" + "".join(f"{d}x" for d in (("?",) + tuple(dims[1:]) if dynamic else dims)) + "f32>"
    out = [d + lo + hi for d, lo, hi in zip(shape, low, high)]
    text = f"""func.func @f(%x: {t(shape)}) -> {t(out)} {{
      %y = mlc.pad %x {{low = {low}, high = {high}, value = -2.5}} : ({t(shape)}) -> {t(out)}
      return %y : {t(out)} }}"""
    x = rng.standard_normal(shape).astype(np.float32)
    np.testing.assert_array_equal(mlc.compile(mlc.parse(text), cache=False)["f"](x), np.pad(x, list(zip(low, high)), constant_values=-2.5))


def test_a_sum_of_adjoining_zero_pads_computes_the_sum():
    """(canonicalize makes it one concat, padded where the pads leave columns out; filecheck/canonicalize.ir)"""
    text = """module { func.func @f(%a: tensor<?x2xf32>, %b: tensor<?x3xf32>, %c: tensor<?x1xf32>) -> tensor<?x8xf32> {
        %pc = mlc.pad %c {low = [0, 7], high = [0, 0]} : (tensor<?x1xf32>) -> tensor<?x8xf32>
        %pb = mlc.pad %b {low = [0, 4], high = [0, 1]} : (tensor<?x3xf32>) -> tensor<?x8xf32>
        %pa = mlc.pad %a {low = [0, 2], high = [0, 4]} : (tensor<?x2xf32>) -> tensor<?x8xf32>
        %s = mlc.add %pc, %pb
        %t = mlc.add %pa, %s
        return %t : tensor<?x8xf32>
      } }"""
    a, b, c = (rng.standard_normal((3, n)).astype(np.float32) for n in (2, 3, 1))
    compile_and_compare(text, "f", a, b, c)
    want = np.zeros((3, 8), np.float32)
    want[:, 2:4], want[:, 4:7], want[:, 7:] = a, b, c
    np.testing.assert_array_equal(mlc.compile(mlc.parse(text))["f"](a, b, c), want)


def test_buffers_are_freed_after_their_last_use_even_when_passed_on():
    text = """module {
      mlc.global @g : tensor<4xf32>
      func.func private @twice(%a: tensor<4xf32>) -> tensor<4xf32> {
        %b = mlc.add %a, %a
        return %b : tensor<4xf32>
      }
      func.func @f(%x: tensor<4xf32>) -> tensor<4xf32> {
        %e = mlc.exp %x
        %s = mlc.reduce_sum %e {axes = [0], keepdims} : (tensor<4xf32>) -> tensor<1xf32>
        %n = mlc.div %e, %s : (tensor<4xf32>, tensor<1xf32>) -> tensor<4xf32>
        mlc.global_store @g, %n : tensor<4xf32>
        %h = mlc.tanh %n
        %t = mlc.add %h, %e
        return %t : tensor<4xf32>
      } }"""
    m = mlc.parse(text)
    exe = mlc.compile(m)
    x = rng.standard_normal(4).astype(np.float32)
    for _ in range(3):
        np.testing.assert_allclose(exe["f"](x), mlc.interpret(m, "f", x), rtol=1e-6)
    np.testing.assert_allclose(exe.globals["g"], np.exp(x) / np.exp(x).sum(), rtol=1e-6)
    loops = str(mlc.run_passes(m.clone(), "cpu"))
    assert "mem.dealloc %n" in loops  # (the softmax, stored to @g and passed on to tanh; %e's buffer takes %t)


@pytest.mark.parametrize("m,k,n", [(1, 37, 21), (7, 5, 3), (100, 300, 64), (49, 257, 33), (0, 4, 5), (3, 0, 17), (50, 0, 20),
                                   (97, 64, 48), (7, 512, 3), (100, 1024, 70), (61, 40, 130), (7, 3, 70), (30, 96, 64),
                                   (64, 513, 32), (13, 21, 17), (9, 19, 34), (30, 600, 49)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tiled_matmul_edges_against_numpy(m, k, n, dtype):
    """Ragged row blocks and panels, K deeper than one slice or in one (tiles stored, not added), empty
    dims, and row blocks split over threads at the loop's step (100 rows = 3 blocks of 48 on 2 threads)
    and in column halves, the second ragged (130, 70 columns); rows of A 4 KB long are packed (1024 f32,
    512 and 1024 f64); a small B of whole panels is read in place (64 x 48, 96 x 64); one or two columns
    past the whole vectors are dot products along K (17, 33, 34, 49, 130 columns; K ragged or deeper
    than a slice)."""
    e = {np.float32: "f32", np.float64: "f64"}[dtype]
    text = f"""func.func @f(%a: tensor<?x{k}x{e}>, %b: tensor<{k}x{n}x{e}>) -> tensor<?x{n}x{e}> {{
      %c = mlc.matmul %a, %b : (tensor<?x{k}x{e}>, tensor<{k}x{n}x{e}>) -> tensor<?x{n}x{e}>
      return %c : tensor<?x{n}x{e}> }}"""
    a, b = rng.standard_normal((m, k)).astype(dtype), rng.standard_normal((k, n)).astype(dtype)
    np.testing.assert_allclose(mlc.compile(mlc.parse(text))["f"](a, b), a @ b, rtol=1e-4 if e == "f32" else 1e-10, atol=1e-4 if e == "f32" else 1e-10)
    if m * k * n < 20000:  # the tiled loop nest itself, on the interpreter
        lowered = mlc.run_passes(mlc.parse(text), "cpu")
        np.testing.assert_allclose(mlc.interpret(lowered, "f", a, b), a @ b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype,m", [(np.float32, 1024), (np.float64, 512), (np.float32, 1000)])
@pytest.mark.parametrize("k", [37, 600])
def test_products_copy_a_transposed_a_whose_columns_are_4k_apart(dtype, m, k):
    """A read through its transpose with its columns a multiple of 4 KB apart (a weight gradient, x^T @ dy)
    is copied a slice of each block at a time (gemm.pack_a_columns); 1000 rows are read in place."""
    e = {np.float32: "f32", np.float64: "f64"}[dtype]
    n = 40
    text = f"""func.func @f(%a: tensor<?x{m}x{e}>, %b: tensor<?x{n}x{e}>) -> tensor<{m}x{n}x{e}> {{
      %c = mlc.matmul %a, %b {{transpose_a}} : (tensor<?x{m}x{e}>, tensor<?x{n}x{e}>) -> tensor<{m}x{n}x{e}>
      return %c : tensor<{m}x{n}x{e}> }}"""
    loops = str(mlc.run_passes(mlc.parse(text), "cpu{vector-bytes=64}"))
    assert ("packed_at" in loops) == (m * np.dtype(dtype).itemsize % 4096 == 0)
    a, b = rng.standard_normal((k, m)).astype(dtype), rng.standard_normal((k, n)).astype(dtype)
    tol = 1e-4 if e == "f32" else 1e-10
    np.testing.assert_allclose(mlc.compile(mlc.parse(text))["f"](a, b), a.T @ b, rtol=tol, atol=tol)


@pytest.mark.parametrize("k", [32, 37, 512, 1024])
@pytest.mark.parametrize("n", [70, 96])
def test_products_pack_a_transposed_b_by_gathering_or_walking_its_columns(k, n):
    """B read through its transpose is packed from its columns gathered side by side, a vector's worth
    at a time or (columns 2 or 4 KB apart: 512 and 1024 f32) 8; whole panels and a ragged one."""
    text = f"""func.func @f(%a: tensor<50x{k}xf32>, %w: tensor<{n}x{k}xf32>) -> tensor<50x{n}xf32> {{
      %c = mlc.matmul %a, %w {{transpose_b}} : (tensor<50x{k}xf32>, tensor<{n}x{k}xf32>) -> tensor<50x{n}xf32>
      return %c : tensor<50x{n}xf32> }}"""
    a, w = rng.standard_normal((50, k)).astype(np.float32), rng.standard_normal((n, k)).astype(np.float32)
    np.testing.assert_allclose(mlc.compile(mlc.parse(text))["f"](a, w), a @ w.T, rtol=1e-4, atol=1e-4)


def weight_product(rows, k, n, transposed, e="f32", extra=""):
    w = f"{n}x{k}" if transposed else f"{k}x{n}"
    return f"""module {{
      mlc.global @w : tensor<{w}x{e}> {{init = "normal"{extra}}}
      func.func @f(%x: tensor<{rows}x{k}x{e}>) -> tensor<{rows}x{n}x{e}> {{
        %w = mlc.global_load @w : tensor<{w}x{e}>
        %y = mlc.matmul %x, %w {{transpose_b = {str(transposed).lower()}}} : (tensor<{rows}x{k}x{e}>, tensor<{w}x{e}>) -> tensor<{rows}x{n}x{e}>
        return %y : tensor<{rows}x{n}x{e}> }} }}"""


@settings(max_examples=int(os.environ.get("MLC_PANELS_EXAMPLES", "8")), deadline=None)
@given(rows=st.sampled_from([1, 4, 7, 13, "?"]), m=st.sampled_from([1, 3, 4, 13]), k=st.sampled_from([1, 5, 37, 300]),
       n=st.sampled_from([1, 7, 17, 33, 70]), transposed=st.booleans(), dtype=st.sampled_from([np.float32, np.float64]))
def test_a_weight_global_is_packed_when_set_not_per_call(rows, m, k, n, transposed, dtype):
    """A product's B that is a global no function writes is read from its panels, packed at load and
    again by set_global and bind_global; in place, its array refuses writes that would go unseen."""
    from mlc.passes.gemm import STREAM_ROWS
    e, tol = {np.float32: ("f32", 1e-4), np.float64: ("f64", 1e-10)}[dtype]
    module = mlc.parse(weight_product(rows, k, n, transposed, e))
    m = m if rows == "?" else rows
    x = rng.standard_normal((m, k)).astype(dtype)
    exe = mlc.compile(module)
    product = lambda w: x @ (w.T if transposed else w)  # noqa: E731
    np.testing.assert_allclose(exe.f(x), product(exe.globals["w"]), rtol=tol, atol=tol)
    packed = rows == "?" or rows > STREAM_ROWS  # (a few static rows stream B in place)
    lowered = mlc.run_passes(module.clone(), "cpu{vector-bytes=32}")
    assert ('init = "panels"' in str(lowered)) == packed
    if m * k * n < 5000:  # the loop nest reading the panels, on the interpreter
        np.testing.assert_allclose(Interpreter(lowered).call_public("f", [x]), product(exe.globals["w"]), rtol=tol, atol=tol)
    new = rng.standard_normal(exe.globals["w"].shape).astype(dtype)
    exe.set_global("w", new)
    np.testing.assert_allclose(exe.f(x), product(new), rtol=tol, atol=tol)
    bound = rng.standard_normal(new.shape).astype(dtype)
    exe.bind_global("w", bound)
    np.testing.assert_allclose(exe.f(x), product(bound), rtol=tol, atol=tol)
    if packed:
        fresh = mlc.compile(module)
        with pytest.raises(ValueError, match="read-only"):
            fresh.globals["w"][0, 0] = 1.0
        with pytest.raises(ValueError, match="broadcast"):
            fresh.set_global("w", np.zeros((3, 3), dtype))
        assert not fresh.globals["w"].flags.writeable  # (a failed set_global leaves it guarded)


@pytest.mark.parametrize("case", ["stored", "external", "option"])
def test_weights_that_may_change_unseen_are_packed_per_call(case):
    text = weight_product("?", 16, 40, False, extra=", external" if case == "external" else "")
    if case == "stored":
        text = text.replace("return %y", "mlc.global_store @w, %w : tensor<16x40xf32>\n        return %y")
    lowered = mlc.run_passes(mlc.parse(text), "cpu{packed-globals=0}" if case == "option" else "cpu")
    assert "panels" not in str(lowered) and "%packed = mem.alloc" in str(lowered)


def test_panels_globals_are_verified():
    text = weight_product("?", 16, 40, False).replace(
        "func.func", 'mlc.global @p : tensor<3x16x16xf32> {init = "panels", of = @w}\n      func.func')
    values = Interpreter(mlc.parse(text)).globals  # panel p holds columns 16p .. 16p + 15 of @w, then zeros
    columns = values["p"].transpose(1, 0, 2).reshape(16, 48)
    np.testing.assert_array_equal(columns[:, :40], values["w"])
    assert not columns[:, 40:].any()
    with pytest.raises(mlc.DiagnosticError, match=r"the panels of @w .* \(tensor<3x16x16xf32>\), got tensor<2x16x16xf32>"):
        mlc.parse(text.replace("3x16x16", "2x16x16"))
    with pytest.raises(mlc.DiagnosticError, match="@w is read through packed panels, so no function may store to it"):
        mlc.parse(text.replace("return %y", "mlc.global_store @w, %w : tensor<16x40xf32>\n        return %y"))


def test_panels_travel_through_the_cache_and_artifacts(tmp_path):
    module = mlc.parse(weight_product("?", 37, 70, True))
    x, new = rng.standard_normal((9, 37)).astype(np.float32), rng.standard_normal((70, 37)).astype(np.float32)
    mlc.compile(module)
    exe = mlc.compile(module)  # from the cache: its code still says which globals are packed
    exe.set_global("w", new)
    exe.save(tmp_path / "m.mlcz")
    loaded = mlc.load_executable(tmp_path / "m.mlcz")
    np.testing.assert_allclose(loaded.f(x), x @ new.T, rtol=1e-4, atol=1e-4)


def test_a_global_no_function_reads_leaves_the_others_in_place():
    text = """module {
      mlc.global @unused : tensor<4xf32> {init = "zeros"}
      mlc.global @b : tensor<4xf32> {init = "ones"}
      func.func @f(%x: tensor<4xf32>) -> tensor<4xf32> {
        %b = mlc.global_load @b : tensor<4xf32>
        %y = mlc.add %x, %b : (tensor<4xf32>, tensor<4xf32>) -> tensor<4xf32>
        return %y : tensor<4xf32> } }"""
    exe = mlc.compile(mlc.parse(text))
    np.testing.assert_array_equal(exe.f(np.zeros(4, np.float32)), np.ones(4, np.float32))
    assert list(exe.globals) == ["unused", "b"]


@settings(max_examples=10, deadline=None)
@given(m=st.integers(1, 6), k=st.sampled_from([1, 5, 8, 37, 300]), n=st.sampled_from([1, 7, 8, 9, 17, 70, 100, 300]),
       layout=st.sampled_from(["", "{transpose_b}", "{transpose_a}", "{transpose_a, transpose_b}"]),
       dtype=st.sampled_from([np.float32, np.float64]), batch=st.sampled_from([(), (2,)]), epilogue=st.booleans(),
       dynamic=st.booleans())
def test_products_of_few_rows_stream_b_unpacked(m, k, n, layout, dtype, batch, epilogue, dynamic):
    """At most 6 rows (a batch of 1): B is read in place, along its rows or (transpose_b, the layout of
    nn.Linear's weight) as dot products along K; ragged columns and K, a fused bias + relu, batches
    (one product each inside a parallel loop); rows known only at run time (`?`: up to 3 streamed row
    by row, more packed). Compiled and the tiled loops on the interpreter vs numpy."""
    e = {np.float32: "f32", np.float64: "f64"}[dtype]
    r = np.random.default_rng(m * 1000 + k * 10 + n)
    a = r.standard_normal(batch + ((k, m) if "transpose_a" in layout else (m, k))).astype(dtype)
    b = r.standard_normal((n, k) if "transpose_b" in layout else (k, n)).astype(dtype)
    bias = r.standard_normal(n).astype(dtype)
    t = lambda shape: "tensor<" + "".join(f"{d}x" for d in shape) + e + ">"
    rows = "?" if dynamic and "transpose_a" not in layout else m
    ta = t(batch + ((k, m) if "transpose_a" in layout else (rows, k)))
    tr = t(batch + (rows, n))
    body = f"%y = mlc.matmul %a, %b {layout} : ({ta}, {t(b.shape)}) -> {tr}\n"
    if epilogue:
        body += f"%s = mlc.add %y, %bias : ({tr}, {t((n,))}) -> {tr}\n%r = mlc.relu %s : ({tr}) -> {tr}\n"
    text = f"""module {{ func.func @f(%a: {ta}, %b: {t(b.shape)}, %bias: {t((n,))}) -> {tr} {{
      {body}      return {"%r" if epilogue else "%y"} : {tr} }} }}"""
    want = np.matmul(np.swapaxes(a, -1, -2) if "transpose_a" in layout else a, b.T if "transpose_b" in layout else b)
    if epilogue:
        want = np.maximum(want + bias, 0)
    tol = 1e-4 if e == "f32" else 1e-10
    np.testing.assert_allclose(mlc.compile(mlc.parse(text), cache=False)["f"](a, b, bias), want, rtol=tol, atol=tol)
    if m * k * n * max(1, len(batch) * 2) < 20000:
        lowered = mlc.run_passes(mlc.parse(text), "cpu")
        np.testing.assert_allclose(mlc.interpret(lowered, "f", a, b, bias), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("m, dynamic, dtype, epilogue, batch", [(1, False, np.float32, True, ()), (1, True, np.float32, False, ()),
                                                             (3, True, np.float64, True, ()), (6, False, np.float32, False, ()),
                                                             (2, False, np.float32, True, (2,)), (1, True, np.float64, False, (3,))])
def test_few_rows_of_a_wide_b_accumulate_in_memory(m, dynamic, dtype, epilogue, batch):
    """B's rows longer than two register tiles: C's rows summed in memory as B's rows stream by in
    order — at the top level K split into blocks on threads and the partial sums added (with the
    epilogue), in a batch's parallel loop one block; whole vectors, then single columns; K in groups
    and the rest. Compiled and the loops on the interpreter vs numpy; B is not packed."""
    k, n = 13, 605
    e = {np.float32: "f32", np.float64: "f64"}[dtype]
    r = np.random.default_rng(m)
    a, b, bias = (r.standard_normal(s).astype(dtype) for s in (batch + (m, k), batch + (k, n), (n,)))
    t = lambda shape: "tensor<" + "".join(f"{d}x" for d in shape) + e + ">"
    rows = "?" if dynamic else m
    ta, tb, ty = t(batch + (rows, k)), t(batch + (k, n)), t(batch + (rows, n))
    body = f"%y = mlc.matmul %a, %b : ({ta}, {tb}) -> {ty}\n"
    if epilogue:
        body += f"%s = mlc.add %y, %bias : ({ty}, {t((n,))}) -> {ty}\n%r = mlc.relu %s : ({ty}) -> {ty}\n"
    text = f"""module {{ func.func @f(%a: {ta}, %b: {tb}, %bias: {t((n,))}) -> {ty} {{
      {body}      return {"%r" if epilogue else "%y"} : {ty} }} }}"""
    want = np.maximum(a @ b + bias, 0) if epilogue else a @ b
    tol = 1e-4 if e == "f32" else 1e-10
    np.testing.assert_allclose(mlc.compile(mlc.parse(text), cache=False)["f"](a, b, bias), want, rtol=tol, atol=tol)
    lowered = mlc.run_passes(mlc.parse(text), "cpu")
    np.testing.assert_allclose(mlc.interpret(lowered, "f", a, b, bias), want, rtol=tol, atol=tol)
    assert "partial" in str(lowered)
    assert "packed" not in str(lowered) or dynamic  # (with `?` rows the packed product stays for more than 3)


@pytest.mark.parametrize("lead", [(3,), (2, 5), (1, 1), ("?",), (2, "?")])
@pytest.mark.parametrize("transposed", [False, True])
def test_a_stack_of_rows_times_a_matrix_is_one_product(lead, transposed):
    """layout makes A[..., M, K] @ B one product of A's rows, the bias, relu and scale moved onto the
    rows with it; a residual of another shape stays after the reshape back. Interpreter after the
    tensor stage and compiled vs numpy. A `?` among the stack's dims (a batch; an RNN's layer input
    for all its steps) makes the rows `?`."""
    m, k, n = 7, 19, 37
    r = np.random.default_rng(len(lead) + 10 * transposed)
    sizes = tuple(3 if d == "?" else d for d in lead)
    x, bias = r.standard_normal(sizes + (m, k)).astype(np.float32), r.standard_normal(n).astype(np.float32)
    w = r.standard_normal((n, k) if transposed else (k, n)).astype(np.float32)
    skip = r.standard_normal((m, n)).astype(np.float32)
    t = lambda shape: "tensor<" + "".join(f"{d}x" for d in shape) + "f32>"
    rows = "?" if "?" in lead else int(np.prod(lead)) * m
    ty = t(lead + (m, n))
    weight = f"%wt = mlc.transpose %w {{perm = [1, 0]}} : ({t(w.shape)}) -> {t((k, n))}" if transposed else ""
    text = f"""module {{ func.func @f(%x: {t(lead + (m, k))}, %w: {t(w.shape)}, %bias: {t((n,))}, %skip: {t((m, n))}) -> {ty} {{
      {weight}
      %y = mlc.matmul %x, {"%wt" if transposed else "%w"} : ({t(lead + (m, k))}, {t((k, n))}) -> {ty}
      %s = mlc.add %y, %bias : ({ty}, {t((n,))}) -> {ty}
      %r = mlc.relu %s : ({ty}) -> {ty}
      %h = mlc.constant {{value = dense<0.5> : tensor<f32>}} : () -> tensor<f32>
      %q = mlc.mul %r, %h : ({ty}, tensor<f32>) -> {ty}
      %z = mlc.add %q, %skip : ({ty}, {t((m, n))}) -> {ty}
      return %z : {ty} }} }}"""
    want = np.maximum(x @ (w.T if transposed else w) + bias, 0) * 0.5 + skip
    staged = mlc.run_passes(mlc.parse(text), "cpu-tensor")
    assert f"-> {t((rows, n))}" in str(staged)
    np.testing.assert_allclose(mlc.interpret(staged, "f", x, w, bias, skip), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mlc.compile(mlc.parse(text), cache=False)["f"](x, w, bias, skip), want, rtol=1e-5, atol=1e-5)


@settings(max_examples=int(os.environ.get("MLC_BATCHED_TRANSPOSE_EXAMPLES", "8")), deadline=None)
@given(st.lists(st.sampled_from([1, 2, 3, "?"]), min_size=1, max_size=2), st.integers(1, 30), st.integers(1, 40),
       st.integers(1, 30), st.sampled_from(["a", "b", "ab"]))
def test_batched_transposes_feeding_products_are_read_in_place(lead, m, k, n, which):
    """layout: transposes of the last two dims of stacks of matrices that only feed products of that
    rank (attention's keys) are not computed; the products read their sources in place. Generated
    stacks (a `?` among them), ragged sizes, either or both operands: the tensor stage interpreted and
    compiled against numpy, and no transpose left."""
    lead = tuple(lead)
    sizes = tuple(2 if d == "?" else d for d in lead)
    r = np.random.default_rng(m * 1000 + k * 10 + n)
    a_src = r.standard_normal(sizes + ((k, m) if "a" in which else (m, k))).astype(np.float32)
    b_src = r.standard_normal(sizes + ((n, k) if "b" in which else (k, n))).astype(np.float32)
    t = lambda shape: "tensor<" + "".join(f"{d}x" for d in shape) + "f32>"  # noqa: E731
    perm = list(range(len(lead))) + [len(lead) + 1, len(lead)]
    lines, operands = [], []
    for name, src, flag in (("a", a_src, "a" in which), ("b", b_src, "b" in which)):
        shape = lead + src.shape[len(lead):]
        if flag:
            lines.append(f"%{name}t = mlc.transpose %{name} {{perm = {perm}}} : ({t(shape)}) -> {t(lead + shape[-1:] + shape[-2:-1])}")
        operands.append((f"%{name}t" if flag else f"%{name}", t(lead + (shape[-1:] + shape[-2:-1] if flag else shape[-2:]))))
    out = t(lead + (m, n))
    text = f"""module {{ func.func @f(%a: {t(lead + a_src.shape[len(lead):])}, %b: {t(lead + b_src.shape[len(lead):])}) -> {out} {{
      {chr(10).join(lines)}
      %y = mlc.matmul {operands[0][0]}, {operands[1][0]} : ({operands[0][1]}, {operands[1][1]}) -> {out}
      return %y : {out} }} }}"""
    want = np.matmul(np.swapaxes(a_src, -1, -2) if "a" in which else a_src, np.swapaxes(b_src, -1, -2) if "b" in which else b_src)
    staged = mlc.run_passes(mlc.parse(text), "cpu-tensor")
    assert "mlc.transpose" not in str(staged)
    np.testing.assert_allclose(mlc.interpret(staged, "f", a_src, b_src), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(mlc.compile(mlc.parse(text), cache=False)["f"](a_src, b_src), want, rtol=1e-4, atol=1e-4)


@settings(max_examples=int(os.environ.get("MLC_HEAD_TRANSPOSE_EXAMPLES", "10")), deadline=None)
@given(st.sampled_from([3, 4]), st.data(), st.integers(1, 9), st.integers(1, 12), st.integers(1, 10))
def test_transposes_around_products_are_read_and_written_in_place(rank, data, m, k, n):
    """layout: a transpose feeding a product (any permutation of a rank-3 or -4 stack) is read in place
    where the marks can say how (transpose, interleave or both: attention's heads and keys), and a
    product's result transposed by its last batch dim and its rows is written in place; any other
    permutation stays a transpose. Generated permutations and ragged sizes: the tensor stage
    interpreted and compiled against numpy."""
    perms = [list(p) for p in __import__("itertools").permutations(range(rank))]
    pa, pb = data.draw(st.sampled_from(perms)), data.draw(st.sampled_from(perms))
    swap_rows = list(range(rank - 3)) + [rank - 2, rank - 3, rank - 1]
    out_perm = data.draw(st.sampled_from([None, swap_rows, perms[-1]]))
    lead = (2, 3, 1, 2)[:rank - 2]
    r = np.random.default_rng(m * 1000 + k * 10 + n)
    a, b = r.standard_normal(lead + (m, k)).astype(np.float32), r.standard_normal(lead + (k, n)).astype(np.float32)
    inverse = lambda p: list(np.argsort(p))  # noqa: E731  (the sources are stored so that the transposes give a and b)
    sa, sb = np.ascontiguousarray(np.transpose(a, inverse(pa))), np.ascontiguousarray(np.transpose(b, inverse(pb)))
    c = np.matmul(a, b)
    want = c if out_perm is None else np.transpose(c, out_perm)
    t = lambda shape: "tensor<" + "".join(f"{d}x" for d in shape) + "f32>"  # noqa: E731
    result = f"%c = mlc.transpose %p {{perm = {out_perm}}} : ({t(c.shape)}) -> {t(want.shape)}" if out_perm else ""
    text = f"""module {{ func.func @f(%sa: {t(sa.shape)}, %sb: {t(sb.shape)}) -> {t(want.shape)} {{
      %a = mlc.transpose %sa {{perm = {pa}}} : ({t(sa.shape)}) -> {t(a.shape)}
      %b = mlc.transpose %sb {{perm = {pb}}} : ({t(sb.shape)}) -> {t(b.shape)}
      %p = mlc.matmul %a, %b : ({t(a.shape)}, {t(b.shape)}) -> {t(c.shape)}
      {result}
      return {"%c" if out_perm else "%p"} : {t(want.shape)} }} }}"""
    readable = [list(range(rank)), list(range(rank - 2)) + [rank - 1, rank - 2], swap_rows,
                list(range(rank - 3)) + [rank - 2, rank - 1, rank - 3]]  # (as is, transposed, interleaved, both)
    staged = str(mlc.run_passes(mlc.parse(text), "cpu-tensor"))
    assert staged.count("mlc.transpose") == sum(p not in readable for p in (pa, pb)) + (out_perm not in (None, swap_rows))
    np.testing.assert_allclose(mlc.interpret(mlc.parse(staged), "f", sa, sb), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(mlc.compile(mlc.parse(text), cache=False)["f"](sa, sb), want, rtol=1e-4, atol=1e-4)


def test_a_batch_of_one_reads_the_weights_in_place():
    """The few-rows path packs nothing: no packed buffer in the loops of a b1 nn.Linear-shaped product."""
    text = """module { func.func @f(%x: tensor<1x64xf32>, %w: tensor<32x64xf32>) -> tensor<1x32xf32> {
      %t = mlc.transpose %w {perm = [1, 0]} : (tensor<32x64xf32>) -> tensor<64x32xf32>
      %y = mlc.matmul %x, %t : (tensor<1x64xf32>, tensor<64x32xf32>) -> tensor<1x32xf32>
      return %y : tensor<1x32xf32> } }"""
    loops = str(mlc.run_passes(mlc.parse(text), "cpu"))
    assert "packed" not in loops and "vector.reduce_add" in loops
    eight = str(mlc.run_passes(mlc.parse(text.replace("1x64", "8x64").replace("1x32", "8x32")), "cpu"))
    assert "packed" in eight  # (more rows than one micro-tile: packing pays)


@pytest.mark.parametrize("stride,dtype", [(2, np.float32), (1, np.float32), (2, np.float64)])
def test_large_windows_in_the_direct_convolution(stride, dtype):
    """A 7 x 7 window (a stem's) on an image large enough for the direct convolution: its taps in loops (more
    than gemm.UNROLLED_WINDOW), at stride 2 read as every other element of a row's run, against torch."""
    import torch
    import torch.nn.functional as F
    x = rng.standard_normal((1, 3, 122, 118)).astype(dtype)
    w = rng.standard_normal((5, 3, 7, 7)).astype(dtype)
    text = one_op("mlc.conv2d", x, w, attrs=f"{{stride = [{stride}, {stride}], padding = [3, 3, 3, 3]}}")
    assert ("{stride = 2}" in str(mlc.run_passes(mlc.parse(text), "cpu"))) == (stride == 2)
    want = F.conv2d(torch.from_numpy(x), torch.from_numpy(w), stride=stride, padding=3).numpy()
    np.testing.assert_allclose(mlc.compile(mlc.parse(text))["f"](x, w), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n,c,o,hw,k,stride,pad,dil,groups,dtype", [
    (2, 3, 13, (9, 37), 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, np.float32),    # ragged rows (13 = 6+6+1) and columns (37 = 32+5)
    (1, 4, 8, (7, 24), 3, (2, 1), (0, 2, 1, 0), (1, 2), 2, np.float32),     # stride 2 along y, groups, dilation
    (3, 2, 6, (5, 8), 1, (1, 1), (0, 0, 0, 0), (1, 1), 1, np.float64),      # 1x1, exactly one 8-lane f32 tile / two f64
    (1, 20, 7, (6, 11), 2, (1, 1), (1, 0, 0, 1), (1, 1), 1, np.float32),    # more channels than one channel block
    (2, 4, 4, (6, 9), 3, (2, 2), (1, 1, 1, 1), (1, 1), 4, np.float32),      # depthwise, stride 2: the scalar path
])
def test_conv2d_native_matches_torch(n, c, o, hw, k, stride, pad, dil, groups, dtype):
    import torch
    import torch.nn.functional as F
    from test_ops import conv_attrs
    x = rng.standard_normal((n, c) + hw).astype(dtype)
    w = rng.standard_normal((o, c // groups, k, k)).astype(dtype)
    text = one_op("mlc.conv2d", x, w, attrs=conv_attrs(stride, pad, dil, groups))
    top, left, bottom, right = pad
    want = F.conv2d(F.pad(torch.from_numpy(x), (left, right, top, bottom)), torch.from_numpy(w), stride=stride,
                    dilation=dil, groups=groups).numpy()
    got = mlc.compile(mlc.parse(text))["f"](x, w)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stride", [1, 2])
def test_fused_conv_bias_relu_epilogue_matches_torch(stride):
    import torch
    import torch.nn.functional as F
    text = f"""func.func @f(%x: tensor<?x3x9x20xf32>, %w: tensor<7x3x3x3xf32>, %b: tensor<7x1x1xf32>) -> tensor<?x7x?x?xf32> {{
      %c = mlc.conv2d %x, %w {{stride = [{stride}, {stride}], padding = [1, 1, 1, 1]}} : (tensor<?x3x9x20xf32>, tensor<7x3x3x3xf32>) -> tensor<?x7x?x?xf32>
      %a = mlc.add %c, %b : (tensor<?x7x?x?xf32>, tensor<7x1x1xf32>) -> tensor<?x7x?x?xf32>
      %r = mlc.relu %a : (tensor<?x7x?x?xf32>) -> tensor<?x7x?x?xf32>
      return %r : tensor<?x7x?x?xf32> }}"""
    fused = mlc.run_passes(mlc.parse(text), "fuse")
    assert [op.name for op in fused.functions["f"].body] == ["mlc.fusion", "func.return"]
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((2, 3, 9, 20), (7, 3, 3, 3), (7, 1, 1)))
    want = F.relu(F.conv2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b.reshape(7)), stride=stride, padding=1)).numpy()
    np.testing.assert_allclose(mlc.compile(mlc.parse(text))["f"](x, w, b), want, rtol=1e-4, atol=1e-5)


def test_scan_outputs_and_swapped_carries_read_the_carries_the_step_started_from():
    """A step that outputs its incoming carry and passes carries on to each other's slots."""
    text = """module { func.func @f(%c: tensor<3xf64>, %d: tensor<3xf64>, %xs: tensor<5x3xf64>)
        -> (tensor<3xf64>, tensor<3xf64>, tensor<5x3xf64>, tensor<5x3xf64>) {
      %r, %q, %ys, %zs = mlc.scan %c, %d over %xs : (tensor<3xf64>, tensor<3xf64>, tensor<5x3xf64>)
          -> (tensor<3xf64>, tensor<3xf64>, tensor<5x3xf64>, tensor<5x3xf64>) {
      ^bb0(%h: tensor<3xf64>, %g: tensor<3xf64>, %x: tensor<3xf64>):
        %n = mlc.add %h, %x
        mlc.yield %g, %n, %h, %g : tensor<3xf64>, tensor<3xf64>, tensor<3xf64>, tensor<3xf64>
      }
      return %r, %q, %ys, %zs : tensor<3xf64>, tensor<3xf64>, tensor<5x3xf64>, tensor<5x3xf64> } }"""
    compile_and_compare(text, "f", rng.standard_normal(3), rng.standard_normal(3), rng.standard_normal((5, 3)))


@pytest.mark.parametrize("grows", [False, True])
def test_a_scan_carry_that_changes_shape_is_an_error_on_both_backends(grows):
    """Carries keep their shapes from step to step (as lax.scan's): a `?` carry that grows is refused,
    by the interpreter and, checked each step, by native code (its carries live in fixed buffers: the
    copy back overran the buffer). One that keeps its size runs alike."""
    step = "mlc.concat %h, %x {axis = 0} : (tensor<?xf32>, tensor<1xf32>) -> tensor<?xf32>" if grows else \
        "mlc.add %h, %x : (tensor<?xf32>, tensor<1xf32>) -> tensor<?xf32>"
    text = f"""func.func @f(%c: tensor<?xf32>, %xs: tensor<4x1xf32>) -> tensor<?xf32> {{
      %r = mlc.scan %c over %xs : (tensor<?xf32>, tensor<4x1xf32>) -> tensor<?xf32> {{
      ^bb0(%h: tensor<?xf32>, %x: tensor<1xf32>):
        %g = {step}
        mlc.yield %g : tensor<?xf32>
      }}
      return %r : tensor<?xf32> }}"""
    c, xs = np.ones(3, np.float32), np.arange(4, dtype=np.float32).reshape(4, 1)
    if not grows:
        compile_and_compare(text, "f", c, xs)
        return
    for run in (lambda m: mlc.interpret(m, "f", c, xs), lambda m: mlc.compile(m)["f"](c, xs)):
        with pytest.raises(mlc.DiagnosticError, match="'mlc.scan': carry 0 changes shape from step to step"):
            run(mlc.parse(text))


@pytest.mark.parametrize("after", ["add", "merge", "rows"])
def test_kernels_do_not_move_a_read_of_a_global_past_a_store_to_it(after):
    """A global's loaded value names its storage: a kernel runs where its last op stood, so an op that
    reads @g's old value before a store to @g must not join a kernel after it (native code read the
    new value: e^5 + 5 where the interpreter gave e^1 + 5)."""
    later = {"add": "%v = mlc.add %u, %x",  # (a chain: exp joins the add)
             "merge": "%t = mlc.tanh %x\n        %v = mlc.add %u, %t",  # (kernels over the same elements: merged)
             "rows": "%v = mlc.softmax %u {axis = 0}"}[after]  # (a row kernel's producer)
    text = f"""module {{
      mlc.global @g : tensor<4xf32> {{init = "ones"}}
      func.func @f(%x: tensor<4xf32>) -> tensor<4xf32> {{
        %a = mlc.global_load @g : tensor<4xf32>
        %u = mlc.exp %a
        mlc.global_store @g, %x : tensor<4xf32>
        {later}
        return %v : tensor<4xf32>
      }} }}"""
    x = np.linspace(-1, 1, 4).astype(np.float32)
    compile_and_compare(text, "f", x, rtol=1e-6)


def test_a_global_is_updated_in_place_only_where_no_one_sees_the_difference():
    """w = w + x stored back writes @g's storage directly; a result that is returned or stored over
    again still gets a buffer of its own. Globals and results agree with the interpreter each call."""
    text = """module {
      mlc.global @g : tensor<4xf32> {init = "ones"}
      func.func @update(%x: tensor<4xf32>) -> tensor<f32> {
        %g = mlc.global_load @g : tensor<4xf32>
        %n = mlc.add %g, %x
        mlc.global_store @g, %n : tensor<4xf32>
        %s = mlc.reduce_sum %n : (tensor<4xf32>) -> tensor<f32>
        return %s : tensor<f32>
      }
      func.func @returned(%x: tensor<4xf32>) -> tensor<4xf32> {
        %g = mlc.global_load @g : tensor<4xf32>
        %n = mlc.add %g, %x
        mlc.global_store @g, %n : tensor<4xf32>
        return %n : tensor<4xf32>
      }
      func.func @stored_twice(%x: tensor<4xf32>) -> tensor<4xf32> {
        %g = mlc.global_load @g : tensor<4xf32>
        %n = mlc.add %g, %x
        mlc.global_store @g, %n : tensor<4xf32>
        %m = mlc.mul %n, %x
        mlc.global_store @g, %m : tensor<4xf32>
        %r = mlc.add %n, %n
        return %r : tensor<4xf32>
      }
    }"""
    m = mlc.parse(text)
    lowered = mlc.run_passes(m.clone(), "cpu")
    assert sum(op.name == "mem.alloc" for op in lowered.functions["update"].body.walk()) == 1  # the sum's result only
    exe, reference = mlc.compile(m), Interpreter(m)
    x = np.arange(4, dtype=np.float32)
    for f in ["update", "returned", "stored_twice", "update", "returned"]:
        np.testing.assert_array_equal(exe[f](x), reference.call_public(f, (x,)))
        np.testing.assert_array_equal(exe.globals["g"], reference.globals["g"])


@settings(max_examples=int(os.environ.get("MLC_STRIDED_EXAMPLES", "10")))  # each example compiles
@given(st.integers(1, 7), st.integers(2, 3), st.integers(0, 3), st.sampled_from([1, 2]), st.integers(7, 12), st.integers(7, 12))
def test_strided_convolutions_as_phases_agree_with_the_interpreter(k, s, p, groups, h, w):
    """strided-conv (in the cpu pipeline) rewrites these into stride-1 convolutions over the input's phases."""
    assume(h + 2 * p >= k and w + 2 * p >= k)
    r = np.random.default_rng(k * 100 + s * 10 + p)
    x = r.standard_normal((2, 4, h, w)).astype(np.float32)
    wt = r.standard_normal((6, 4 // groups, k, k)).astype(np.float32)
    module = mlc.jit(lambda x, wt: mlc.nn.functional.conv2d(x, wt, stride=s, padding=p, groups=groups)).lower(x, wt)
    want = mlc.interpret(module, "lambda", x, wt)
    rewritten = mlc.run_passes(module.clone(), "strided-conv")
    np.testing.assert_allclose(mlc.interpret(rewritten, "lambda", x, wt), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(mlc.compile(module)["lambda"](x, wt), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("flags", ["", "{transpose_a}", "{transpose_b}", "{transpose_a, transpose_b}"])
@pytest.mark.parametrize("dtype,batch", [(np.float32, ()), (np.float64, (3,)), (np.int32, ()), (np.float32, (2, 1))])
def test_matmul_reads_operands_stored_transposed(flags, dtype, batch):
    """layout's transpose_a/transpose_b: the GEMM reads the stored operand in place (the integer
    loops read a transposed copy), with a dynamic row count and ragged tiles."""
    m, k, n = 13, 37, 21
    a = (rng.standard_normal(batch + ((k, m) if "transpose_a" in flags else (m, k))) * 4).astype(dtype)
    b = (rng.standard_normal((2,) * (len(batch) > 1) + ((n, k) if "transpose_b" in flags else (k, n))) * 4).astype(dtype)
    e = {np.float32: "f32", np.float64: "f64", np.int32: "i32"}[dtype]
    ta = "tensor<" + "".join(f"{d}x" for d in a.shape) + e + ">"
    tb = "tensor<" + "".join(f"{d}x" for d in b.shape) + e + ">"
    tr = "tensor<" + "".join(f"{d}x" for d in np.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (m, n)) + e + ">"
    text = f"""module {{ func.func @f(%a: {ta}, %b: {tb}) -> {tr} {{
      %y = mlc.matmul %a, %b {flags} : ({ta}, {tb}) -> {tr}
      return %y : {tr} }} }}"""
    want = np.matmul(np.swapaxes(a, -1, -2) if "transpose_a" in flags else a, np.swapaxes(b, -1, -2) if "transpose_b" in flags else b)
    np.testing.assert_allclose(mlc.interpret(mlc.parse(text), "f", a, b), want, rtol=1e-5)
    compile_and_compare(text, "f", a, b, rtol=1e-5, atol=1e-3)


@settings(max_examples=int(os.environ.get("MLC_INTERLEAVED_EXAMPLES", "12")), deadline=None)
@given(st.lists(st.booleans(), min_size=5, max_size=5), st.sampled_from(["f32", "i32"]), st.sampled_from([(2,), (1,), ()]),
       st.integers(1, 14), st.integers(1, 20), st.integers(1, 19), st.integers(1, 4))
def test_matmul_reads_and_writes_interleaved_operands(marks, element, b_batch, m, k, n, heads):
    """interleaved_a/b/c ([..., M, H, K] stored for [..., H, M, K]: attention's heads where they lie),
    alone and with transpose_a/b, an operand broadcast along the batch (or a matrix), ragged sizes:
    interpreted and compiled (the GEMM for f32, copies around the loops for i32) against numpy."""
    ta, tb, ia, ib, ic = marks
    ib = ib and bool(b_batch)
    r = np.random.default_rng(m * 1000 + k * 10 + n)
    dtype = np.float32 if element == "f32" else np.int32
    a = (r.standard_normal((2, heads, m, k)) * 4).astype(dtype)
    b = (r.standard_normal(b_batch + ((heads,) if b_batch else ()) + (k, n)) * 4).astype(dtype)
    c = np.matmul(a, b)

    def stored(x, transposed, interleaved):
        x = np.swapaxes(x, -1, -2) if transposed else x
        return np.ascontiguousarray(np.swapaxes(x, -3, -2) if interleaved else x)
    sa, sb, sc = stored(a, ta, ia), stored(b, tb, ib), stored(c, False, ic)
    t = lambda x: "tensor<" + "".join(f"{d}x" for d in x.shape) + element + ">"  # noqa: E731
    flags = ", ".join(f for f, on in zip(("transpose_a", "transpose_b", "interleaved_a", "interleaved_b", "interleaved_c"),
                                         (ta, tb, ia, ib, ic)) if on)
    text = f"""module {{ func.func @f(%a: {t(sa)}, %b: {t(sb)}) -> {t(sc)} {{
      %y = mlc.matmul %a, %b {{{flags}}} : ({t(sa)}, {t(sb)}) -> {t(sc)}
      return %y : {t(sc)} }} }}""".replace(" {}", "")
    np.testing.assert_allclose(mlc.interpret(mlc.parse(text), "f", sa, sb), sc, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(mlc.compile(mlc.parse(text), cache=False)["f"](sa, sb), sc, rtol=1e-4, atol=1e-3)


def test_a_new_elementwise_op_is_one_row():
    """Declaring a row (here expm1, in a fresh process) gives the op's syntax, interpreter, gradient,
    fusion and native code: nothing else is edited."""
    script = """
import numpy as np, mlc
from mlc.ir.dialects.mlc import EXPENSIVE, Unary
class Expm1(Unary, name="mlc.expm1", fn=np.expm1, cost=EXPENSIVE, scalar="expm1",
            grad=lambda d, x, y, g: d("mlc.mul", g, d("mlc.add", y, d.scalar(1, y)))): ...
m = mlc.parse('''module { func.func @f(%x: tensor<3x17xf32>) -> tensor<f32> {
  %y = mlc.expm1 %x
  %z = mlc.mul %y, %x
  %s = mlc.reduce_sum %z : (tensor<3x17xf32>) -> tensor<f32>
  return %s : tensor<f32> } }''')
x = np.random.default_rng(0).standard_normal((3, 17)).astype(np.float32)
want = np.sum(np.expm1(x) * x)
assert abs(mlc.interpret(m, "f", x) - want) < 1e-4 * abs(want)
assert abs(mlc.compile(m, cache=False)["f"](x) - want) < 1e-4 * abs(want)
mlc.run_passes(m, "grad{func=@f}")
_, g = mlc.compile(m, cache=False)["f_grad"](x)
np.testing.assert_allclose(g, np.expm1(x) + np.exp(x) * x, rtol=1e-5, atol=1e-6)
print("ok")
"""
    out = __import__("subprocess").run([__import__("sys").executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 0, 1), (1, 2, 2)])
def test_convolutions_in_channel_blocks(stride, padding, dilation):
    """layout{conv-block}: conv2d_blocked against torch on the interpreter, and the blocked pipeline
    (conversions at the boundaries, cancelled between the convolutions) natively."""
    import torch
    n, c, o, h = 2, 8, 16, 11
    h1 = (h + 2 * padding - dilation * 2 - 1) // stride + 1
    h2 = (h1 + 2 * padding - dilation * 2 - 1) // stride + 1
    x = rng.standard_normal((n, c, h, h)).astype(np.float32)
    w1, w2 = rng.standard_normal((o, c, 3, 3)).astype(np.float32), rng.standard_normal((c, o, 3, 3)).astype(np.float32)
    attrs = f"{{stride = [{stride}, {stride}], padding = [{padding}, {padding}, {padding}, {padding}], dilation = [{dilation}, {dilation}]}}"
    text = f"""module {{ func.func @f(%x: tensor<?x{c}x{h}x{h}xf32>, %w1: tensor<{o}x{c}x3x3xf32>, %w2: tensor<{c}x{o}x3x3xf32>) -> tensor<?x{c}x{h2}x{h2}xf32> {{
      %a = mlc.conv2d %x, %w1 {attrs} : (tensor<?x{c}x{h}x{h}xf32>, tensor<{o}x{c}x3x3xf32>) -> tensor<?x{o}x{h1}x{h1}xf32>
      %r = mlc.relu %a
      %b = mlc.conv2d %r, %w2 {attrs} : (tensor<?x{o}x{h1}x{h1}xf32>, tensor<{c}x{o}x3x3xf32>) -> tensor<?x{c}x{h2}x{h2}xf32>
      return %b : tensor<?x{c}x{h2}x{h2}xf32> }} }}"""
    conv = lambda v, k: torch.nn.functional.conv2d(v, torch.tensor(k), stride=stride, padding=padding, dilation=dilation)  # noqa: E731
    want = conv(torch.relu(conv(torch.tensor(x), w1)), w2).numpy()
    blocked = mlc.run_passes(mlc.parse(text), "layout{conv-block=8}")
    assert "mlc.conv2d_blocked" in str(blocked) and "mlc.conv2d " not in str(blocked)
    np.testing.assert_allclose(mlc.interpret(blocked, "f", x, w1, w2), want, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(mlc.compile(blocked)["f"](x, w1, w2), want, rtol=1e-4, atol=1e-3)


RESHAPE_AT_RUN_TIME = """
func.func @f(%x: tensor<?x?x8xf32>, %shape: tensor<4xi64>) -> tensor<?x?x?x4xf32> {
  %y = mlc.reshape %x, %shape : (tensor<?x?x8xf32>, tensor<4xi64>) -> tensor<?x?x?x4xf32>
  return %y : tensor<?x?x?x4xf32>
}
func.func @back(%x: tensor<?x?x8xf32>) -> tensor<?x?x8xf32> {
  %s = mlc.shape_of %x : (tensor<?x?x8xf32>) -> tensor<3xi64>
  %two = mlc.constant dense<[2, -1]> : tensor<2xi64>
  %shape = mlc.concat %s, %two {axis = 0} : (tensor<3xi64>, tensor<2xi64>) -> tensor<5xi64>
  %odd = mlc.constant dense<[0, 1, 3, 4]> : tensor<4xi64>
  %split = mlc.gather %shape, %odd {axis = 0} : (tensor<5xi64>, tensor<4xi64>) -> tensor<4xi64>
  %y = mlc.reshape %x, %split : (tensor<?x?x8xf32>, tensor<4xi64>) -> tensor<?x?x2x?xf32>
  %z = mlc.reshape %y, %s : (tensor<?x?x2x?xf32>, tensor<3xi64>) -> tensor<?x?x8xf32>
  return %z : tensor<?x?x8xf32>
}
"""


@pytest.mark.parametrize("x_shape, shape", [((2, 3, 8), [2, 3, 2, 4]), ((2, 3, 8), [3, -1, 2, 4]), ((1, 5, 8), [5, 1, 2, 4])])
def test_a_reshape_to_a_shape_known_at_run_time(x_shape, shape):
    """mlc.reshape's `?` dims from a shape operand (-1: what the element count leaves), and
    mlc.shape_of: compiled and interpreted alike, against numpy."""
    x = np.arange(np.prod(x_shape), dtype=np.float32).reshape(x_shape)
    compile_and_compare(RESHAPE_AT_RUN_TIME, "f", x, np.array(shape, np.int64))
    np.testing.assert_array_equal(mlc.interpret(mlc.parse(RESHAPE_AT_RUN_TIME), "f", x, np.array(shape, np.int64)), x.reshape(shape))
    compile_and_compare(RESHAPE_AT_RUN_TIME, "back", x)


def test_a_reshape_to_a_wrong_run_time_shape_is_an_error():
    x = np.zeros((2, 3, 8), np.float32)
    with pytest.raises(mlc.DiagnosticError, match="mlc.reshape"):
        mlc.interpret(mlc.parse(RESHAPE_AT_RUN_TIME), "f", x, np.array([2, 3, 3, 4], np.int64))
    with pytest.raises(mlc.DiagnosticError, match="cannot reshape"):
        mlc.compile(mlc.parse(RESHAPE_AT_RUN_TIME))["f"](x, np.array([2, 3, 3, 4], np.int64))


@settings(max_examples=int(os.environ.get("MLC_CONV_EXAMPLES", "8")), deadline=None)  # each example compiles twice
@given(st.integers(1, 2), st.integers(1, 9), st.integers(1, 14), st.integers(3, 17), st.integers(3, 17),
       st.sampled_from([(1, 1), (2, 2), (3, 1), (1, 3)]), st.integers(0, 2), st.integers(1, 3), st.integers(1, 2),
       st.sampled_from([1, 2]), st.sampled_from([np.float32, np.float64]), st.booleans())
def test_both_convolution_kernels_agree_with_torch(n, c, o, h, w, kernel, pad, stride, dilation, groups, dtype, epilogue):
    """Every convolution, through the direct kernel (stride 1 or 2 along x, any image) and as a product
    (gemm.ConvAsGemm: any stride; the tile pass's conv-gemm-pixels says which), with ragged channels,
    windows, strides, dilations, groups and a fused bias + relu, against torch; the tiled loops of
    the smallest on the interpreter too."""
    import torch
    import torch.nn.functional as F
    from mlc.passes import gemm
    from mlc.passes.tile import Tile
    c, o = c * groups, o * groups
    kh, kw = kernel
    assume(h + 2 * pad >= dilation * (kh - 1) + 1 and w + 2 * pad >= dilation * (kw - 1) + 1)
    r = np.random.default_rng(n + c * 10 + o * 100 + h * 1000 + w)
    x, wt, bias = (r.standard_normal(s).astype(dtype) for s in ((n, c, h, w), (o, c // groups, kh, kw), (o, 1, 1)))
    want = F.conv2d(torch.from_numpy(x), torch.from_numpy(wt), stride=stride, padding=pad, dilation=dilation, groups=groups)
    if epilogue:
        want = F.relu(want + torch.from_numpy(bias))
    def f(x, wt, bias):
        y = mlc.nn.functional.conv2d(x, wt, stride=stride, padding=pad, dilation=dilation, groups=groups)
        return mlc.relu(y + bias) if epilogue else y
    module = mlc.jit(f).lower(x, wt, bias)
    tol = 1e-4 if dtype == np.float32 else 1e-10
    for pixels in (0, 10 ** 6):  # never a product (where stride 1 or 2 along x) / always
        with pytest.MonkeyPatch.context() as patch:  # (the lowering pads the input for the kernel it expects)
            patch.setitem(Tile.options, "conv-gemm-pixels", pixels)
            patch.setattr(gemm, "CONV_GEMM_PIXELS", pixels)
            np.testing.assert_allclose(mlc.compile(module, cache=False)["f"](x, wt, bias), want.numpy(), rtol=tol, atol=tol)
            lowered = mlc.run_passes(module.clone(), "cpu")
            if pixels and groups == 1 or not pixels and stride <= 2:
                assert ("mem.reshape" in str(lowered)) == bool(pixels)  # (the product views the weights as a matrix)
                # (the direct kernel's strided loads; a 1 x 1 kernel reads a strided slice: passes/strided_conv.py)
                assert ("{stride = 2}" in str(lowered)) == (not pixels and stride == 2 and (kernel != (1, 1) or dilation != 1))
            if x.size * o < 3000:
                np.testing.assert_allclose(mlc.interpret(lowered, "f", x, wt, bias), want.numpy(), rtol=tol, atol=tol)


@pytest.mark.parametrize("h,kernel,pad,stride,groups,tail", [(7, 3, 1, 1, 1, True), (9, 3, 0, 1, 1, True), (13, 3, 1, 2, 1, True),
                                                          (7, 1, 0, 1, 1, True), (9, 3, 0, 1, 2, False), (5, 2, 1, 1, 1, None)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_small_images_are_products_over_their_pixels_with_dot_product_tails(h, kernel, pad, stride, groups, tail, dtype):
    """A small image's convolution as a product over its pixels (not the padded grid's) where that takes
    fewer vectors, its last column(s) dot products along K (7 x 7 = 3 x 16 + 1 pixels; not the direct
    convolution of 2 groups at stride 1), against torch."""
    import torch
    import torch.nn.functional as F
    c, o = 24 * groups, 40 * groups
    r = np.random.default_rng(h)
    x, wt, bias = (r.standard_normal(s).astype(dtype) for s in ((1, c, h, h), (o, c // groups, kernel, kernel), (o, 1, 1)))
    want = F.relu(F.conv2d(torch.from_numpy(x), torch.from_numpy(wt), stride=stride, padding=pad, groups=groups) + torch.from_numpy(bias))

    def f(x, wt, bias):
        return mlc.relu(mlc.nn.functional.conv2d(x, wt, stride=stride, padding=pad, groups=groups) + bias)
    module = mlc.jit(f).lower(x, wt, bias)
    tol = 1e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(mlc.compile(module, cache=False)["f"](x, wt, bias), want.numpy(), rtol=tol, atol=tol)
    if tail is not None:
        assert ("%tail = mem.alloc" in str(mlc.run_passes(module.clone(), "cpu{vector-bytes=64}"))) == tail


@pytest.mark.parametrize("k,s,p,include", [(3, 2, 1, False), (2, 2, 0, True), (3, 1, 1, True), (8, 3, 4, False), (5, 2, 2, False)])
def test_pools_agree_with_torch(k, s, p, include):
    """Max pooling (separable: down the window's rows, then along each window of the row) and average
    pooling (windows over a copy padded with 0, unrolled up to 7 x 7, loops beyond; the count from the
    window's position) compiled against torch."""
    import torch
    import torch.nn.functional as F
    x = rng.standard_normal((2, 3, 13, 11)).astype(np.float32)
    f = mlc.jit(lambda x: (mlc.nn.functional.max_pool2d(x, k, s, p),
                           mlc.nn.functional.avg_pool2d(x, k, s, p, count_include_pad=include)))
    got_max, got_avg = f(x)
    np.testing.assert_array_equal(got_max, F.max_pool2d(torch.from_numpy(x), k, s, p).numpy())
    np.testing.assert_allclose(got_avg, F.avg_pool2d(torch.from_numpy(x), k, s, p, count_include_pad=include).numpy(), rtol=1e-5, atol=1e-6)


@settings(max_examples=int(os.environ.get("MLC_POOL_EXAMPLES", "10")), deadline=None)
@given(st.integers(1, 9), st.integers(1, 9), st.integers(1, 4), st.integers(1, 4), st.integers(1, 3), st.integers(1, 3),
       st.data(), st.sampled_from(["f32", "i32"]))
def test_max_pools_of_generated_windows_agree_with_numpy(h, w, kh, kw, sh, sw, data, element):
    """Max pooling on generated images, windows, strides and uneven padding (the edge rows the first pass
    reads for the padding's; the padding columns written as the lowest value), width known only at run
    time: compiled and its loops interpreted, against numpy over a copy padded with the lowest value."""
    pt, pb = (data.draw(st.integers(0, kh // 2)) for _ in range(2))
    pl, pr = (data.draw(st.integers(0, kw // 2)) for _ in range(2))
    assume(h + pt + pb >= kh and w + pl + pr >= kw)
    dtype = np.float32 if element == "f32" else np.int32
    x = (rng.standard_normal((2, 3, h, w)) * 100).astype(dtype)
    lowest = -np.inf if element == "f32" else np.iinfo(dtype).min
    xp = np.pad(x, [(0, 0), (0, 0), (pt, pb), (pl, pr)], constant_values=lowest)
    oh, ow = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
    want = np.stack([np.stack([xp[:, :, i * sh: i * sh + kh, j * sw: j * sw + kw].max(axis=(2, 3)) for j in range(ow)], -1)
                     for i in range(oh)], -2)
    module = mlc.parse(f"""
    func.func @f(%x: tensor<2x3x{h}x?x{element}>) -> tensor<2x3x{oh}x?x{element}> {{
      %y = mlc.max_pool2d %x {{kernel = [{kh}, {kw}], stride = [{sh}, {sw}], padding = [{pt}, {pl}, {pb}, {pr}]}} : (tensor<2x3x{h}x?x{element}>) -> tensor<2x3x{oh}x?x{element}>
      return %y : tensor<2x3x{oh}x?x{element}>
    }}""")
    np.testing.assert_array_equal(mlc.compile(module, cache=False)["f"](x), want)
    np.testing.assert_array_equal(mlc.interpret(mlc.run_passes(module, "cpu"), "f", x), want)


@settings(max_examples=int(os.environ.get("MLC_TRANSPOSE_EXAMPLES", "10")), deadline=None)
@given(st.lists(st.integers(1, 37), min_size=2, max_size=4), st.randoms(use_true_random=False))
def test_transposes_copy_in_tiles_and_agree_with_numpy(shape, random):
    """A transpose moving the input's last dim copies in 16 x 16 tiles (ragged edges, any other dims
    around them); one keeping it copies rows. Compiled against numpy, the loops on the interpreter."""
    perm = list(range(len(shape)))
    random.shuffle(perm)
    x = rng.standard_normal(shape).astype(np.float32)
    f = mlc.jit(lambda x: mlc.transpose(x, perm))
    np.testing.assert_array_equal(f(x), np.transpose(x, perm))
    if x.size < 2000:
        lowered = mlc.run_passes(f.lower(x), "cpu")
        np.testing.assert_array_equal(mlc.interpret(lowered, "lambda", x), np.transpose(x, perm))
