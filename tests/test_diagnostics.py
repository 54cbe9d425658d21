"""Every kind of bad input gets a located diagnostic (line, column, message), all of them at once."""
import numpy as np
import pytest

import mlc

from helpers import ROOT, errors, func

X = "%x: tensor<2x3xf32>"


def one(text):
    found = errors(text)
    assert len(found) == 1, found
    return found[0]


CASES = [
    # (description, body lines, args, expected (line, col, message fragment))
    ("matmul inner dims", "    %h = mlc.matmul %x, %w : (tensor<?x64xf32>, tensor<32x32xf32>) -> tensor<?x32xf32>\n    return %x : tensor<?x64xf32>",
     "%x: tensor<?x64xf32>, %w: tensor<32x32xf32>", "tensor<?x64xf32>", (3, 10, "'mlc.matmul': inner dimensions differ: 64 (operand 0) vs 32 (operand 1)")),
    ("undefined value", "    %y = mlc.relu %nope\n    return %x : tensor<2x3xf32>", X, "tensor<2x3xf32>", (3, 19, "use of undefined value '%nope'")),
    ("redefinition", "    %x = mlc.relu %x\n    return %x : tensor<2x3xf32>", X, "tensor<2x3xf32>", (3, 5, "redefinition of value '%x'")),
    ("unknown op", "    %y = mlc.frob %x\n    return %x : tensor<2x3xf32>", X, "tensor<2x3xf32>", (3, 10, "unknown operation 'mlc.frob'")),
    ("unknown attribute", "    %y = mlc.relu %x {axis = 1}\n    return %y : tensor<2x3xf32>", X, "tensor<2x3xf32>", (3, 10, "unknown attribute 'axis'")),
    ("wrong attribute type", "    %y = mlc.softmax %x {axis = \"1\"}\n    return %y : tensor<2x3xf32>", X, "tensor<2x3xf32>", (3, 10, "attribute 'axis' must be an integer")),
    ("missing attribute", "    %y = mlc.transpose %x : (tensor<2x3xf32>) -> tensor<3x2xf32>\n    return %x : tensor<2x3xf32>", X, "tensor<2x3xf32>", (3, 10, "requires attribute 'perm'")),
    ("bad choice", "    %y = mlc.gelu %x {approximate = \"fast\"}\n    return %y : tensor<2x3xf32>", X, "tensor<2x3xf32>", (3, 10, "must be one of \"none\", \"tanh\"")),
    ("result type mismatch", "    %y = mlc.relu %x : (tensor<2x3xf32>) -> tensor<3x2xf32>\n    return %x : tensor<2x3xf32>", X, "tensor<2x3xf32>", (3, 10, "result type tensor<3x2xf32> does not match the inferred tensor<2x3xf32>")),
    ("broadcast", "    %y = mlc.add %x, %w\n    return %x : tensor<2x3xf32>", X + ", %w: tensor<4xf32>", "tensor<2x3xf32>", (3, 10, "not broadcast-compatible")),
    ("element types", "    %y = mlc.add %x, %w\n    return %x : tensor<2x3xf32>", X + ", %w: tensor<2x3xf64>", "tensor<2x3xf32>", (3, 10, "different element types")),
    ("float op on ints", "    %y = mlc.exp %i\n    return %x : tensor<2x3xf32>", X + ", %i: tensor<3xi32>", "tensor<2x3xf32>", (3, 10, "floating-point element type")),
    ("return types", "    return %x : tensor<2x3xf32>", X, "tensor<3x2xf32>", (3, 5, "returns (tensor<2x3xf32>) but the function returns (tensor<3x2xf32>)")),
    ("reduction axis", "    %y = mlc.reduce_sum %x {axes = [5]}\n    return %x : tensor<2x3xf32>", X, "tensor<2x3xf32>", (3, 10, "reduction axis 5 is out of range for rank 2")),
    ("softmax axis", "    %y = mlc.softmax %x {axis = 2}\n    return %x : tensor<2x3xf32>", X, "tensor<2x3xf32>", (3, 10, "axis 2 is out of range")),
    ("conv groups", "    %y = mlc.conv2d %i, %w {groups = 2}\n    return %x : tensor<2x3xf32>", X + ", %i: tensor<1x3x5x5xf32>, %w: tensor<4x1x3x3xf32>", "tensor<2x3xf32>", (3, 10, "input has 3 channels but the weight expects 1 x 2 groups = 2")),
    ("conv stride", "    %y = mlc.conv2d %i, %w {stride = [0, 1]}\n    return %x : tensor<2x3xf32>", X + ", %i: tensor<1x1x5x5xf32>, %w: tensor<4x1x3x3xf32>", "tensor<2x3xf32>", (3, 10, "'stride' must be positive")),
    ("conv padding", "    %y = mlc.conv2d %i, %w {padding = [1, 1, 1]}\n    return %x : tensor<2x3xf32>", X + ", %i: tensor<1x1x5x5xf32>, %w: tensor<4x1x3x3xf32>", "tensor<2x3xf32>", (3, 10, "'padding' must have 2 or 4 entries")),
    ("conv dilation too big", "    %y = mlc.conv2d %i, %w {dilation = [3, 3]}\n    return %x : tensor<2x3xf32>", X + ", %i: tensor<1x1x5x5xf32>, %w: tensor<4x1x3x3xf32>", "tensor<2x3xf32>", (3, 10, "window of size 7 does not fit")),
    ("pool padding", "    %y = mlc.max_pool2d %i {kernel = [2, 2], padding = [2, 2]}\n    return %x : tensor<2x3xf32>", X + ", %i: tensor<1x1x5x5xf32>", "tensor<2x3xf32>", (3, 10, "at most half the kernel")),
    ("conv_transpose output_padding", "    %y = mlc.conv2d_transpose %i, %w {output_padding = [1, 1]}\n    return %x : tensor<2x3xf32>", X + ", %i: tensor<1x1x5x5xf32>, %w: tensor<1x4x3x3xf32>", "tensor<2x3xf32>", (3, 10, "'output_padding' must be smaller than stride or dilation")),
    ("slice rank", "    %y = mlc.slice %x {start = [0], limit = [1]}\n    return %x : tensor<2x3xf32>", X, "tensor<2x3xf32>", (3, 10, "'start' has 1 entries but the operand has rank 2")),
    ("pad negative", "    %y = mlc.pad %x {low = [0, -1], high = [0, 0]}\n    return %x : tensor<2x3xf32>", X, "tensor<2x3xf32>", (3, 10, "padding must be non-negative")),
    ("concat dims", "    %y = mlc.concat %x, %w {axis = 0}\n    return %x : tensor<2x3xf32>", X + ", %w: tensor<2x4xf32>", "tensor<2x3xf32>", (3, 10, "operands differ in dim 1")),
    ("gather index type", "    %y = mlc.gather %x, %x {axis = 0}\n    return %x : tensor<2x3xf32>", X, "tensor<2x3xf32>", (3, 10, "operand 1 must have an integer")),
    ("scatter_add updates", "    %y = mlc.scatter_add %x, %i, %x {axis = 0}\n    return %x : tensor<2x3xf32>", X + ", %i: tensor<4xi64>", "tensor<2x3xf32>", (3, 10, "updates must have shape [4, 3]")),
    ("reshape count", "    %y = mlc.reshape %x : (tensor<2x3xf32>) -> tensor<5xf32>\n    return %x : tensor<2x3xf32>", X, "tensor<2x3xf32>", (3, 10, "cannot reshape 6 elements")),
    ("reshape without type", "    %y = mlc.reshape %x\n    return %x : tensor<2x3xf32>", X, "tensor<2x3xf32>", (3, 10, "needs its result type")),
    ("cross entropy labels", "    %y = mlc.cross_entropy %x, %l\n    return %x : tensor<2x3xf32>", X + ", %l: tensor<3xi64>", "tensor<2x3xf32>", (3, 10, "labels must have shape [2]")),
    ("select cond", "    %y = mlc.select %x, %x, %x\n    return %x : tensor<2x3xf32>", X, "tensor<2x3xf32>", (3, 10, "condition must have element type i1")),
    ("random key", "    %y = mlc.random_uniform %x : (tensor<2x3xf32>) -> tensor<4xf32>\n    return %x : tensor<2x3xf32>", X, "tensor<2x3xf32>", (3, 10, "key must be tensor<2xi64>")),
    ("call args", "    %y = func.call @f(%x, %x) : (tensor<2x3xf32>, tensor<2x3xf32>) -> tensor<2x3xf32>\n    return %x : tensor<2x3xf32>", X, "tensor<2x3xf32>", (3, 10, "arguments (tensor<2x3xf32>, tensor<2x3xf32>) do not match @f(tensor<2x3xf32>)")),
    ("call unknown", "    %y = func.call @g(%x) : (tensor<2x3xf32>) -> tensor<2x3xf32>\n    return %x : tensor<2x3xf32>", X, "tensor<2x3xf32>", (3, 10, "'@g' is not a function")),
    ("global unknown", "    %y = mlc.global_load @nope : tensor<2xf32>\n    return %x : tensor<2x3xf32>", X, "tensor<2x3xf32>", (3, 10, "'@nope' is not a declared mlc.global")),
    ("operand type", "    %y = mlc.add %x, %x : (tensor<2x3xf32>, tensor<3x2xf32>) -> tensor<2x3xf32>\n    return %x : tensor<2x3xf32>", X, "tensor<2x3xf32>", (3, 10, "operand 1 ('%x') has type tensor<2x3xf32>, but the signature says tensor<3x2xf32>")),
    ("operand count", "    %y = \"mlc.add\"(%x) : (tensor<2x3xf32>) -> tensor<2x3xf32>\n    return %x : tensor<2x3xf32>", X, "tensor<2x3xf32>", (3, 10, "expects 2 operands, got 1")),
    ("multi-result use", "    %r:2 = mlc.scan %x over %s : (tensor<2x3xf32>, tensor<4x2x3xf32>) -> (tensor<2x3xf32>, tensor<4x2x3xf32>) {\n    ^bb0(%h: tensor<2x3xf32>, %e: tensor<2x3xf32>):\n      mlc.yield %h, %e : tensor<2x3xf32>, tensor<2x3xf32>\n    }\n    return %r : tensor<2x3xf32>", X + ", %s: tensor<4x2x3xf32>", "tensor<2x3xf32>", (7, 12, "'%r' has 2 results; use '%r#0'")),
    ("scan region args", "    %r:2 = mlc.scan %x over %s : (tensor<2x3xf32>, tensor<4x2x3xf32>) -> (tensor<2x3xf32>, tensor<4x2x3xf32>) {\n    ^bb0(%h: tensor<2x3xf32>):\n      mlc.yield %h, %h : tensor<2x3xf32>, tensor<2x3xf32>\n    }\n    return %x : tensor<2x3xf32>", X + ", %s: tensor<4x2x3xf32>", "tensor<2x3xf32>", (3, 12, "region arguments must be (tensor<2x3xf32>, tensor<2x3xf32>)")),
    ("dominance", "    %y = mlc.relu %z\n    %z = mlc.relu %x\n    return %x : tensor<2x3xf32>", X, "tensor<2x3xf32>", (3, 10, "operand 0 is not defined before this use")),
    ("value from inside a region", "    %r:2 = mlc.scan %x over %s : (tensor<2x3xf32>, tensor<4x2x3xf32>) -> (tensor<2x3xf32>, tensor<4x2x3xf32>) {\n    ^bb0(%h: tensor<2x3xf32>, %e: tensor<2x3xf32>):\n      %in = mlc.relu %h\n      mlc.yield %in, %e : tensor<2x3xf32>, tensor<2x3xf32>\n    }\n    %out = mlc.relu %in\n    return %x : tensor<2x3xf32>", X + ", %s: tensor<4x2x3xf32>", "tensor<2x3xf32>", (8, 21, "use of undefined value '%in'")),
    ("bad type", "    %y = mlc.relu %x : (tensor<2x3xf99>) -> tensor<2x3xf32>\n    return %x : tensor<2x3xf32>", X, "tensor<2x3xf32>", (3, 25, "unknown element type 'f99'")),
    ("dense shape", "    %c = mlc.constant dense<[1.0, 2.0, 3.0]> : tensor<2xf32>\n    return %x : tensor<2x3xf32>", X, "tensor<2x3xf32>", (3, 23, "dense literal has shape [3] but the type is tensor<2xf32>")),
    ("dense int values", "    %c = mlc.constant dense<[1.5]> : tensor<1xi32>\n    return %x : tensor<2x3xf32>", X, "tensor<2x3xf32>", (3, 23, "non-integer values")),
    ("dense range", "    %c = mlc.constant dense<[300]> : tensor<1xi8>\n    return %x : tensor<2x3xf32>", X, "tensor<2x3xf32>", (3, 23, "out of range for i8")),
    ("syntax", "    %y = mlc.add %x, : (tensor<2x3xf32>) -> tensor<2x3xf32>\n    return %x : tensor<2x3xf32>", X, "tensor<2x3xf32>", (3, 20, "syntax error: unexpected ','")),
]


@pytest.mark.parametrize("name,body,args,results,expected", CASES, ids=[c[0] for c in CASES])
def test_diagnostic(name, body, args, results, expected):
    line, col, message = one(func(body, args, results))
    assert (line, col) == expected[:2], (line, col, message)
    assert expected[2] in message, message


def test_format_matches_spec():
    text = func("    %h = mlc.matmul %x, %w1 : (tensor<?x64xf32>, tensor<32x32xf32>) -> tensor<?x32xf32>\n    return %x : tensor<?x64xf32>",
                "%x: tensor<?x64xf32>, %w1: tensor<32x32xf32>", "tensor<?x64xf32>")
    with pytest.raises(mlc.DiagnosticError) as e:
        mlc.parse(text, "model.ir")
    assert str(e.value) == (
        "model.ir:3:10: error: 'mlc.matmul': inner dimensions differ: 64 (operand 0) vs 32 (operand 1)\n"
        "    %h = mlc.matmul %x, %w1 : (tensor<?x64xf32>, tensor<32x32xf32>) -> tensor<?x32xf32>\n"
        "         ^")
    d = e.value.diagnostics[0]
    assert (d.file, d.line, d.column) == ("model.ir", 3, 10)


def test_independent_errors_are_all_reported():
    body = ("    %a = mlc.relu %nope\n    %b = mlc.exp %x {axis = 1}\n    %c = mlc.transpose %x {perm = [0, 0]}\n"
            "    %d = mlc.frob %x\n    %e = mlc.softmax %x {axis = 7}\n    return %x : tensor<2x3xf32>")
    found = errors(func(body, X, "tensor<2x3xf32>"))
    assert [line for line, _, _ in found] == [3, 4, 5, 6, 7]


def test_an_error_does_not_cascade():
    body = "    %a = mlc.exp %i\n    %b = mlc.tanh %a\n    %c = mlc.add %b, %b\n    return %x : tensor<2x3xf32>"
    assert len(errors(func(body, X + ", %i: tensor<3xi32>", "tensor<2x3xf32>"))) == 1


def test_symbol_errors():
    text = """module {
  mlc.global @g : tensor<2xf32>
  mlc.global @g : tensor<3xf32>
  mlc.global @h : tensor<2xi32> {init = "glorot_uniform"}
  mlc.global @k : tensor<?xf32>
  func.func @f(%x: tensor<3xf32>) {
    mlc.global_store @g, %x : tensor<3xf32>
    return
  }
}"""
    found = errors(text)
    messages = " | ".join(m for _, _, m in found)
    assert "redefinition of symbol '@g'" in messages
    assert "needs a floating-point type" in messages
    assert "static tensor type" in messages
    assert "stores a tensor<3xf32> into @g of type tensor<2xf32>" in messages


@pytest.mark.parametrize("text,fragment", [
    ("", None),
    ("module {", "unexpected end of input"),
    ("module { func.func @f( }", "syntax error"),
    ("\x00\x01\x02", "unexpected character"),
    ("module {}}", "syntax error"),
    ("module { func.func @f() { return } }", None),
    ('module { func.func @f() { %x = "mlc.constant"() {value = dense<[[1.0], [2.0, 3.0]]> : tensor<2x1xf32>} : () -> tensor<2x1xf32>\n return } }', "ragged"),
    ("module { func.func @f() -> tensor<f32> { %c = mlc.constant dense<[[[[[[[[[[[[[[[[1.0]]]]]]]]]]]]]]]]> : tensor<f32>\n return %c : tensor<f32> } }", "shape"),
])
def test_malformed_inputs_give_diagnostics(text, fragment):
    if fragment is None:
        mlc.parse(text)
        return
    found = errors(text)
    assert any(fragment in m for _, _, m in found), found


def test_deep_nesting_is_a_diagnostic():
    text = "module { func.func @f() { " + "%r = mlc.scan {length = 1, num_carries = 0} {" * 2000 + "}" * 2000 + " return } }"
    found = errors(text)
    assert found


def test_runtime_size_mismatch_names_op_and_location():
    text = func("    %y = mlc.add %x, %w : (tensor<?x3xf32>, tensor<4x3xf32>) -> tensor<4x3xf32>\n    return %y : tensor<4x3xf32>",
                "%x: tensor<?x3xf32>, %w: tensor<4x3xf32>", "tensor<4x3xf32>")
    import numpy as np
    m = mlc.parse(text, "dyn.ir")
    with pytest.raises(mlc.DiagnosticError) as e:
        mlc.interpret(m, "f", np.ones((2, 3), np.float32), np.ones((4, 3), np.float32))
    d = e.value.diagnostics[0]
    assert (d.file, d.line, d.column) == ("dyn.ir", 3, 10) and "mlc.add" in d.message


def test_wrong_arguments_are_named():
    import numpy as np
    m = mlc.parse(func("    return %x : tensor<2x3xf32>"))
    for args, fragment in [((np.ones((2, 3)),), "argument 'x' must have dtype float32"),
                           ((np.ones((3, 2), np.float32),), "argument 'x' must have shape [2, 3]"),
                           ((np.ones((2, 3, 1), np.float32),), "argument 'x' must have rank 2"),
                           ((), "takes 1 arguments (x), got 0")]:
        with pytest.raises(mlc.DiagnosticError, match=r".*") as e:
            mlc.interpret(m, "f", *args)
        assert fragment in str(e.value)


def test_arguments_numpy_cannot_hold_and_mismatched_labels_are_named():
    """A ragged list as an argument, and labels of another batch size than the logits: diagnostics
    on the interpreter and in compiled code (which never reads past the labels)."""
    m = mlc.parse((ROOT / "examples" / "mlp.ir").read_text())
    exe = mlc.compile(m)
    for call in (lambda: exe["forward"]([[1.0, 2.0], [3.0]]), lambda: mlc.interpret(m, "forward", [[1.0, 2.0], [3.0]])):
        with pytest.raises(mlc.DiagnosticError, match="argument 'x' must be an array"):
            call()
    x = np.zeros((16, 64), np.float32)
    with pytest.raises(mlc.DiagnosticError, match="labels of shape \\[32\\] do not fit logits of shape \\[16, 10\\]"):
        mlc.interpret(m, "loss", x, np.zeros(32, np.int64))
    for labels in (np.zeros(32, np.int64), np.zeros(8, np.int64)):
        with pytest.raises(mlc.DiagnosticError, match="labels and logits have different batch sizes"):
            exe["loss"](x, labels)


def test_compiled_functions_take_arguments_by_name():
    """exe.f(x=..., labels=...) binds as Python does; an unknown, repeated or missing name is named."""
    m = mlc.parse((ROOT / "examples" / "mlp.ir").read_text())
    exe = mlc.compile(m)
    x, labels = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32), np.arange(4, dtype=np.int64)
    want = mlc.interpret(m, "loss", x, labels)
    np.testing.assert_allclose(exe["loss"](x=x, labels=labels), want, rtol=1e-5)
    np.testing.assert_allclose(exe["loss"](x, labels=labels), want, rtol=1e-5)
    for kwargs, fragment in [({"x": x, "label": labels}, "has no argument 'label' (its arguments: x, labels)"),
                             ({"x": x, "labels": labels, "y": x}, "has no argument 'y'"),
                             ({"labels": labels}, "is missing argument 'x'")]:
        with pytest.raises(mlc.DiagnosticError, match=r".*") as e:
            exe["loss"](**kwargs)
        assert fragment in str(e.value)
    with pytest.raises(mlc.DiagnosticError, match="argument 'x' both by position and by name"):
        exe["loss"](x, x=x)


def test_a_pass_that_breaks_the_module_is_named_by_compile(monkeypatch):
    """compile verifies the lowered module once, at the end; when that fails it runs the pipeline
    again verifying after every pass, so the error still names the pass that broke the module."""
    from mlc.passes.reuse_buffers import ReuseBuffers

    def breaks_dominance(self, module):
        body = module.functions["f"].body
        op = next(op for op in body if op.results and op.results[0].users)
        op.detach()
        body.insert_before(body.last, op)  # (defined after its uses)
    monkeypatch.setattr(ReuseBuffers, "run", breaks_dominance)
    m = mlc.parse(func("%y = mlc.exp %x\n    return %y : tensor<4xf32>", args="%x: tensor<4xf32>", results="tensor<4xf32>"))
    with pytest.raises(mlc.DiagnosticError, match="after pass 'reuse-buffers'.*bug in the pass"):
        mlc.compile(m, cache=False)
