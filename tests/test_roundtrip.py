"""print(parse(text)) is a fixed point; the generic form parses to the same module."""

import numpy as np
import pytest
from hypothesis import given

import mlc
from mlc.ir.printer import print_module
from mlc.testing import programs

from helpers import EXAMPLES, ROOT



def assert_round_trips(text: str):
    m = mlc.parse(text)
    printed = str(m)
    assert str(mlc.parse(printed)) == printed
    generic = print_module(m, generic=True)
    assert str(mlc.parse(generic)) == printed
    assert print_module(mlc.parse(generic), generic=True) == generic


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_round_trip(path):
    assert_round_trips(path.read_text())


def test_spec_module_parses_as_written():
    """examples/mlp.ir is SPEC §2's module, verbatim."""
    text = (ROOT / "examples" / "mlp.ir").read_text()
    assert "%a = mlc.relu %hb\n    %y = mlc.matmul %a, %w2\n" in text  # signatures left out, as in the spec
    assert_round_trips(text)


def test_spec_scan_example_parses_as_written():
    body = """
  func.func @f(%h0: tensor<4x8xf32>, %xs: tensor<16x4x3xf32>, %w: tensor<3x8xf32>) -> tensor<16x4x8xf32> {
    %h_last, %hs = mlc.scan %h0 over %xs : (tensor<4x8xf32>, tensor<16x4x3xf32>) -> (tensor<4x8xf32>, tensor<16x4x8xf32>) {
    ^bb0(%h: tensor<4x8xf32>, %x: tensor<4x3xf32>):
      %xw = mlc.matmul %x, %w
      %s = mlc.add %xw, %h
      %h_next = mlc.tanh %s
      mlc.yield %h_next, %h_next : tensor<4x8xf32>, tensor<4x8xf32>
    }
    return %hs : tensor<16x4x8xf32>
  }"""
    assert_round_trips("module {" + body + "\n}")


def test_spec_inline_forms():
    text = """module {
  func.func @f(%a: tensor<2xf32>, %b: tensor<2xf32>) -> tensor<2xf32> {
    %r = "mlc.add"(%a, %b) {} : (tensor<2xf32>, tensor<2xf32>) -> tensor<2xf32>
    %s = mlc.add %a, %b {} : (tensor<2xf32>, tensor<2xf32>) -> tensor<2xf32>
    %c = mlc.constant dense<[1.0, 2.0]> : tensor<2xf32>
    %g = "mlc.constant"() {value = dense<[1.0, 2.0]> : tensor<2xf32>} : () -> tensor<2xf32>
    %i = mlc.iota {axis = 0} : tensor<5x5xi64>
    %t = mlc.add %r, %s loc("model.py":12:8)
    return %t : tensor<2xf32>
  }
}"""
    assert_round_trips(text)
    assert 'loc("model.py":12:8)' in str(mlc.parse(text))


def test_every_attribute_kind_round_trips():
    text = """module @m attributes {seed = 5, note = "x\\"y", flag} {
  mlc.global @g : tensor<2x2xf32> {init = dense<[[1.0, -2.5], [0x7FC00000, 0x7F800000]]> : tensor<2x2xf32>}
  mlc.global @h : tensor<3xi64> {init = dense<7> : tensor<3xi64>}
  func.func private @f(%x: tensor<?x2xf32> {mlc.name = "input"}) -> (tensor<?x2xf32> {mlc.out}) attributes {mlc.doc = [1, 2.5, "s", true, false, unit, @g, f16, array<i64: 1, 2>, array<i64>, {a = 1 : i32}, 1.0e-05 : f32]} {
    %y = mlc.gelu %x {approximate = "tanh"}
    %z = mlc.clamp %y {min = -1, max = 1.0e+20}
    %c = mlc.cast %z {to = bf16}
    %b = mlc.constant dense<[true, false]> : tensor<2xi1>
    %d = mlc.cast %c : (tensor<?x2xbf16>) -> tensor<?x2xf32>
    return %d : tensor<?x2xf32>
  }
}"""
    assert_round_trips(text)


def test_float_text_is_exact():
    values = ["0.1", "1.0e-05", "3.4028235e+38", "-0.0", "1.0e-45", "16777217.0", "0.3333333432674408"]
    for v in values:
        m = mlc.parse(f"module {{\n  mlc.global @g : tensor<f64> {{init = dense<{v}> : tensor<f64>}}\n}}")
        again = mlc.parse(str(m))
        a = m.globals["g"].attributes["init"].value
        b = again.globals["g"].attributes["init"].value
        assert a.tobytes() == b.tobytes(), v


@given(programs())
def test_generated_programs_round_trip(p):
    text = p.text
    assert str(mlc.parse(text)) == text
    assert str(mlc.parse(print_module(p.module, generic=True))) == text


def test_pretty_and_generic_parse_to_same_results():
    import numpy as np
    text = (ROOT / "examples" / "cnn.ir").read_text()
    m = mlc.parse(text)
    g = mlc.parse(print_module(m, generic=True))
    x = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(mlc.interpret(m, "forward", x), mlc.interpret(g, "forward", x))


def test_builder_and_rewrite_api():
    import numpy as np
    from mlc.ir.core import Builder, FuncOp, Module
    from mlc.ir.types import f32, tensor
    m = Module("built")
    f = FuncOp.build("f", [tensor((2, 3), f32), tensor((3,), f32)], [tensor((2, 3), f32)], ["x", "b"])
    m.append(f)
    b = Builder.at_end(f.body, m)
    x, bias = f.args
    s = b.create("mlc.add", [x, bias], name_hint="s").result
    r = b.create("mlc.relu", [s]).result
    ret = b.create("func.return", [r])
    mlc.verify(m)
    assert "%s = mlc.add %x, %b : (tensor<2x3xf32>, tensor<3xf32>) -> tensor<2x3xf32>" in str(m)
    # rewrite: put a tanh before the return and route the result through it
    t = Builder.before(ret).create("mlc.tanh", [r]).result
    ret.set_operand(0, t)
    assert r.users == [t.owner]
    mlc.verify(m)
    xs, bs = np.ones((2, 3), np.float32), np.arange(3, dtype=np.float32) - 1
    np.testing.assert_allclose(mlc.interpret(m, "f", xs, bs), np.tanh(np.maximum(xs + bs, 0)), rtol=1e-6)
    r.owner.replace_with([s])  # drop the relu
    assert [op.name for op in f.body] == ["mlc.add", "mlc.tanh", "func.return"]
    assert [op.name for op in m.walk()] == ["func.func", "mlc.add", "mlc.tanh", "func.return"]
    mlc.verify(m)


def test_spec_attribute_and_generic_examples():
    text = """module @m attributes {axis = 1, eps = 1.0e-05 : f32, mode = "tanh", perm = [1, 0], strides = array<i64: 2, 2>, trainable} {
  func.func @f(%g: tensor<2xf32>, %v: tensor<2xf32>) -> tensor<2xf32> {
    %c = "mlc.constant"() {value = dense<[1.0, 2.0]> : tensor<2xf32>} : () -> tensor<2xf32>
    %r = "mlc.add"(%c, %v) {} : (tensor<2xf32>, tensor<2xf32>) -> tensor<2xf32>
    mlc.global_store @w, %v : tensor<2xf32>
    return %r : tensor<2xf32>
  }
  mlc.global @w : tensor<2xf32> {init = "normal", std = 0.5}
}"""
    assert_round_trips(text)
    m = mlc.parse(text)
    assert m.attributes["eps"].value == np.float32(1e-05)
    assert m.attributes["strides"].value == (2, 2)


def test_dialect_attributes_on_an_op_without_signature():
    """`{mlc.origin = "..."}` after operands is an attribute dictionary, not a region holding an op."""
    text = """module { func.func @f(%x: tensor<2xf32>) -> tensor<2xf32> {
      %y = mlc.relu %x {mlc.origin = "mlc.gather", mlc.flag}
      return %y : tensor<2xf32> } }"""
    m = mlc.parse(text)
    op = m.functions["f"].body.first
    assert op.attributes["mlc.origin"].value == "mlc.gather" and "mlc.flag" in op.attributes
    assert_round_trips(text)


NARROW = ["i16", "ui8", "ui16", "ui32", "ui64", "i4", "ui4", "i2", "ui2", "f8E4M3FN", "f8E4M3FNUZ", "f8E5M2", "f8E5M2FNUZ",
          "f4E2M1FN"]


@pytest.mark.parametrize("element", ["f32", "f64", "f16", "bf16", "i64", "i8", "i1"] + NARROW)
def test_large_constants_print_as_exact_hex(element):
    """Above 256 elements a constant prints as the hex of its little-endian bytes (bf16: two bytes
    each; the narrow formats: a byte each, as ml_dtypes holds them), which reads back bit for bit."""
    from mlc.ir.attributes import DenseAttr
    from mlc.ir.types import ELEMENT_TYPES, parse_type, round_to_element
    e = ELEMENT_TYPES[element]
    raw = np.random.default_rng(0).standard_normal(300) * 50
    values = round_to_element(raw.astype(np.float32), e) if e.is_float else (raw > 0 if e.is_bool else raw.astype(e.np_dtype))
    text = f"module {{ func.func @f() -> tensor<300x{element}> {{\n %c = mlc.constant {DenseAttr(np.asarray(values), parse_type(f'tensor<300x{element}>'))}\n return %c : tensor<300x{element}> }} }}"
    assert 'dense<"0x' in text
    m = mlc.parse(text)
    np.testing.assert_array_equal(mlc.interpret(m, "f"), values)
    assert str(mlc.parse(str(m))) == str(m)


@pytest.mark.parametrize("element", NARROW)
def test_narrow_element_types_print_parse_and_interpret(element):
    """Unsigned, 16-bit, 8-bit float and 4/2-bit element types: small constants print as numbers that
    read back exactly, and casts between them and f32 run on the interpreter as ml_dtypes converts."""
    from mlc.ir.types import ELEMENT_TYPES
    e = ELEMENT_TYPES[element]
    values = np.array([0, 1, 0, 1] if not e.is_float else [0.5, -1.5, 3.0, 1.0], np.float32)
    if e.is_int and not e.is_unsigned:
        values = values - 1
    text = f"""func.func @f(%x: tensor<4xf32>) -> (tensor<4x{element}>, tensor<4xf32>) {{
      %c = mlc.constant dense<{(values if e.is_float else values.astype(int)).tolist()}> : tensor<4x{element}>
      %y = mlc.cast %x : (tensor<4xf32>) -> tensor<4x{element}>
      %z = mlc.cast %c : (tensor<4x{element}>) -> tensor<4xf32>
      return %y, %z : tensor<4x{element}>, tensor<4xf32>
    }}"""
    m = mlc.parse(text)
    assert str(mlc.parse(str(m))) == str(m)
    y, z = mlc.interpret(m, "f", values)
    assert y.dtype == e.np_dtype
    np.testing.assert_array_equal(y.astype(np.float32), values)
    np.testing.assert_array_equal(z, values)
