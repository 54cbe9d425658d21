"""Winograd's convolution (passes/winograd.py, the winograd_* ops and their loops) against torch's
conv2d, on the interpreter and natively, on generated shapes: ragged tiles, every padding, a batch
known only at run time, F(2, 3) and F(4, 3)."""
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mlc
from mlc.ir.dialects.mlc import winograd_matrices

from helpers import errors, func

EXAMPLES = int(os.environ.get("MLC_WINOGRAD_EXAMPLES", "8"))  # each example compiles
EVERYWHERE = "winograd{min-tiles=1,min-channels=1,output-tile=%d}"


def conv_module(n, c, h, w, o, pads, dtype="f32", epilogue=False):
    """conv2d (3 x 3, stride 1) with pads [top, left, bottom, right], optionally + bias then ReLU."""
    oh, ow = h + pads[0] + pads[2] - 2, w + pads[1] + pads[3] - 2
    x, wt, y = f"tensor<{n}x{c}x{h}x{w}x{dtype}>", f"tensor<{o}x{c}x3x3x{dtype}>", f"tensor<{n}x{o}x{oh}x{ow}x{dtype}>"
    bias = f"tensor<{o}x1x1x{dtype}>"
    body = f"    %y = mlc.conv2d %x, %w {{padding = {list(pads)}}} : ({x}, {wt}) -> {y}\n"
    if epilogue:
        body += f"    %s = mlc.add %y, %b : ({y}, {bias}) -> {y}\n    %r = mlc.relu %s\n    return %r : {y}"
    else:
        body += f"    return %y : {y}"
    args = f"%x: {x}, %w: {wt}" + (f", %b: {bias}" if epilogue else "")
    return mlc.parse(func(body, args, y))


def torch_conv(x, wt, pads, bias=None):
    t = torch.nn.functional.conv2d(torch.nn.functional.pad(torch.from_numpy(x).double(), (pads[1], pads[3], pads[0], pads[2])),
                                   torch.from_numpy(np.array(wt)).double())
    if bias is not None:
        t = torch.relu(t + torch.from_numpy(bias).double())
    return t.numpy()


@pytest.mark.parametrize("m", [2, 4])
def test_the_transforms_compute_a_convolution_exactly(m):
    """AT [(G g GT) * (BT d B)] A is the 3 x 3 cross-correlation of a tile: float64 on the interpreter."""
    at, g, bt = winograd_matrices(m)
    r = np.random.default_rng(m)
    d, k = r.standard_normal((m + 2, m + 2)), r.standard_normal((3, 3))
    want = np.array([[np.sum(d[i:i + 3, j:j + 3] * k) for j in range(m)] for i in range(m)])
    np.testing.assert_allclose(at @ ((g @ k @ g.T) * (bt @ d @ bt.T)) @ at.T, want, rtol=1e-12, atol=1e-12)


@settings(max_examples=EXAMPLES * 3, deadline=None)
@given(st.sampled_from([2, 4]), st.integers(1, 2), st.integers(1, 5), st.integers(1, 13), st.integers(1, 13), st.integers(1, 4),
       st.lists(st.integers(0, 2), min_size=4, max_size=4))
def test_the_rewrite_agrees_with_torch_on_the_interpreter(m, n, c, h, w, o, pads):
    if h + pads[0] + pads[2] < 3 or w + pads[1] + pads[3] < 3:
        return
    module = conv_module(n, c, h, w, o, pads, "f64")
    rewritten = mlc.run_passes(module, EVERYWHERE % m)
    assert "mlc.conv2d" not in str(rewritten) and "mlc.winograd_output" in str(rewritten)
    r = np.random.default_rng(h * 100 + w)
    x, wt = r.standard_normal((n, c, h, w)), r.standard_normal((o, c, 3, 3))
    np.testing.assert_allclose(mlc.interpret(rewritten, "f", x, wt), torch_conv(x, wt, pads), rtol=1e-10, atol=1e-10)


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.sampled_from([2, 4]), st.integers(1, 3), st.integers(1, 19), st.integers(3, 14), st.integers(3, 14), st.integers(1, 21),
       st.lists(st.integers(0, 2), min_size=4, max_size=4), st.sampled_from(["f32", "f64"]))
def test_native_winograd_agrees_with_torch(m, n, c, h, w, o, pads, dtype):
    """The compiled transforms and product, with the bias and ReLU fused into the output transform; the
    batch is `?` (the tiles' count is known at run time)."""
    module = mlc.run_passes(conv_module("?", c, h, w, o, pads, dtype, epilogue=True), EVERYWHERE % m)
    assert "mlc.conv2d" not in str(module)
    r = np.random.default_rng(c * 1000 + h * 10 + w)
    np_type = np.float32 if dtype == "f32" else np.float64
    x, wt, b = (r.standard_normal(s).astype(np_type) for s in ((n, c, h, w), (o, c, 3, 3), (o, 1, 1)))
    got = mlc.compile(module)["f"](x, wt, b)
    tol = 1e-4 if dtype == "f32" else 1e-10
    np.testing.assert_allclose(got, torch_conv(x, wt, pads, b), rtol=tol, atol=tol * np.sqrt(9 * c))
    np.testing.assert_allclose(got, mlc.interpret(module, "f", x, wt, b), rtol=tol, atol=tol * np.sqrt(9 * c))


@pytest.mark.parametrize("m", [2, 4])
def test_each_transform_natively_agrees_with_the_interpreter(m):
    """winograd_filter, winograd_input (padding uneven, tiles overhanging the image) and winograd_output
    (cropping them; its batch `?`) alone, compiled and as loop nests on the interpreter, against their
    tensor-level interpreter kernels."""
    a = (m + 2) ** 2
    th, tw = -(-6 // m), -(-9 // m)  # the result of a 7 x 9 input padded [1, 0, 0, 2]: 5 x 9
    cases = [("mlc.winograd_filter", f"{{m = {m}}}", [(5, 3, 3, 3)], f"tensor<5x{a}x3xf32>"),
             ("mlc.winograd_input", f"{{m = {m}, padding = [1, 0, 0, 2]}}", [(2, 3, 7, 9)], f"tensor<{2 * th * tw}x{a}x3xf32>"),
             ("mlc.winograd_output", f"{{m = {m}, size = [5, 9]}}", [(2 * th * tw, a, 4)], "tensor<?x4x5x9xf32>")]
    r = np.random.default_rng(m)
    for name, attrs, shapes, result in cases:
        x = r.standard_normal(shapes[0]).astype(np.float32)
        t = "tensor<" + "x".join(map(str, x.shape)) + "xf32>"
        module = mlc.parse(func(f"    %r = {name} %x {attrs} : ({t}) -> {result}\n    return %r : {result}", f"%x: {t}", result))
        want = mlc.interpret(module, "f", x)
        np.testing.assert_allclose(mlc.compile(module)["f"](x), want, rtol=1e-5, atol=1e-5)
        loops = mlc.run_passes(module.clone(), "cpu")  # the loop nests themselves, on the interpreter
        np.testing.assert_allclose(mlc.interpret(loops, "f", x), want, rtol=1e-5, atol=1e-5)


def test_the_cpu_pipeline_takes_resnets_convolutions():
    """By default: 3 x 3 stride-1 convolutions with images of 32+ tiles of 4 x 4 (else of 2 x 2) and 32+
    channels; not the small images (whose filters' transform costs more than it saves), nor strided, dilated, grouped or
    5 x 5 ones; the CUDA pipeline not at all."""
    def tensor_ir(text, pipeline="cpu-tensor"):
        return str(mlc.run_passes(mlc.parse(text), pipeline))
    big = conv_module(1, 64, 56, 56, 64, [1, 1, 1, 1])
    assert "mlc.winograd_output" in tensor_ir(str(big)) and "mlc.conv2d" not in tensor_ir(str(big))
    assert "mlc.winograd" not in tensor_ir(str(big), "cpu-tensor{tensor-cores=1,output-tile=0}")
    small = conv_module(1, 64, 7, 7, 64, [1, 1, 1, 1])  # 4 tiles of 4 x 4, 16 of 2 x 2
    thin = conv_module(1, 16, 56, 56, 64, [1, 1, 1, 1])
    for module in (small, thin):
        assert "mlc.winograd" not in tensor_ir(str(module))
    for attrs, w in (("stride = [2, 2], padding = [1, 1]", 3), ("dilation = [2, 2]", 3), ("groups = 2", 3), ("padding = [2, 2]", 5)):
        text = str(big).replace("padding = [1, 1, 1, 1]", attrs).replace("64x3x3xf32", f"{64 // 2 if 'groups' in attrs else 64}x{w}x{w}xf32")
        text = text.replace("-> tensor<1x64x56x56xf32>", "-> tensor<1x64x?x?xf32>").replace("return %y : tensor<1x64x56x56xf32>",
                                                                                          "return %y : tensor<1x64x?x?xf32>")
        text = text.replace(") -> tensor<1x64x56x56xf32> {", ") -> tensor<1x64x?x?xf32> {")
        assert "mlc.winograd" not in tensor_ir(text), attrs


def test_a_resnet_block_compiles_with_winograd_and_matches_torch():
    """Two 3 x 3 convolutions with batch norm, ReLU and the residual fused into the output transforms."""
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Conv2d(32, 32, 3, padding=1, bias=False), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
                                torch.nn.Conv2d(32, 32, 3, padding=1, bias=False), torch.nn.BatchNorm2d(32)).eval()
    for bn in (block[1], block[4]):
        bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2), bn.weight.data.normal_(), bn.bias.data.normal_()
    p = {k: v.detach().numpy() for k, v in block.state_dict().items()}
    folded = {"w1": p["0.weight"], "w2": p["3.weight"]}
    for i, bn in ((1, "bn1"), (4, "bn2")):
        scale = p[f"{i}.weight"] / np.sqrt(p[f"{i}.running_var"] + 1e-5)
        folded[bn] = (scale.reshape(-1, 1, 1), (p[f"{i}.bias"] - p[f"{i}.running_mean"] * scale).reshape(-1, 1, 1))

    def forward(x, p):
        y = mlc.relu(mlc.nn.functional.conv2d(x, p["w1"], padding=1) * p["bn1"][0] + p["bn1"][1])
        return mlc.relu(mlc.nn.functional.conv2d(y, p["w2"], padding=1) * p["bn2"][0] + p["bn2"][1] + x)
    x = np.random.default_rng(1).standard_normal((2, 32, 24, 24)).astype(np.float32)
    f = mlc.jit(forward)
    assert str(mlc.run_passes(f.lower(x, folded), "cpu-tensor")).count("mlc.winograd_output") == 2
    with torch.no_grad():
        want = torch.relu(block(torch.from_numpy(x)) + torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(f(x, folded), want, rtol=1e-4, atol=1e-4)


def test_the_ops_say_what_is_wrong():
    assert errors(func("    %u = mlc.winograd_filter %w {m = 4} : (tensor<8x4x5x5xf32>) -> tensor<8x36x4xf32>\n    return %u : tensor<8x36x4xf32>",
                       "%w: tensor<8x4x5x5xf32>", "tensor<8x36x4xf32>"))[0][2].endswith("the filter must be 3 x 3, got 5 x 5")
    assert "must be one of [2, 4], got 3" in errors(func(
        "    %u = mlc.winograd_filter %w {m = 3} : (tensor<8x4x3x3xf32>) -> tensor<8x25x4xf32>\n    return %u : tensor<8x25x4xf32>",
        "%w: tensor<8x4x3x3xf32>", "tensor<8x25x4xf32>"))[0][2]
    assert "7 tiles are not a whole number of images of 2 x 2 tiles" in errors(func(
        "    %y = mlc.winograd_output %p {m = 2, size = [4, 4]} : (tensor<7x16x3xf32>) -> tensor<1x3x4x4xf32>\n    return %y : tensor<1x3x4x4xf32>",
        "%p: tensor<7x16x3xf32>", "tensor<1x3x4x4xf32>"))[0][2]
    with pytest.raises(mlc.passes.PipelineError, match="output-tile must be 0"):
        mlc.run_passes(conv_module(1, 1, 4, 4, 1, [0, 0, 0, 0]), "winograd{output-tile=3}")


GLOBAL_FILTERS = """module @m {
  mlc.global @w : tensor<48x32x3x3xf32> {init = "he_normal"%s}
  func.func @f(%%x: tensor<?x32x24x24xf32>) -> tensor<?x48x24x24xf32> {
    %%w = mlc.global_load @w : tensor<48x32x3x3xf32>
    %%y = mlc.conv2d %%x, %%w {padding = [1, 1]} : (tensor<?x32x24x24xf32>, tensor<48x32x3x3xf32>) -> tensor<?x48x24x24xf32>
    return %%y : tensor<?x48x24x24xf32>
  }%s
}"""


def test_filters_in_a_global_are_transformed_when_set_not_per_call(tmp_path):
    """A read-only filter global's transform is a global of its own (`init = "winograd"`): computed at
    load, by set_global and bind_global; the filters' array is read-only meanwhile; an artifact
    recomputes it; the interpreter derives it too."""
    module = mlc.parse(GLOBAL_FILTERS % ("", ""))
    tensor_ir = str(mlc.run_passes(module.clone(), "cpu-tensor"))
    assert 'mlc.global @w.winograd4 : tensor<48x36x32xf32> {init = "winograd", of = @w}' in tensor_ir
    assert "mlc.winograd_filter" not in tensor_ir
    x = np.random.default_rng(0).standard_normal((2, 32, 24, 24)).astype(np.float32)
    exe = mlc.compile(module)
    np.testing.assert_allclose(exe["f"](x), torch_conv(x, exe.globals["w"], [1, 1, 1, 1]), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(mlc.interpret(mlc.run_passes(module.clone(), "winograd"), "f", x), mlc.interpret(module, "f", x),
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="read-only"):
        exe.globals["w"][0] = 0
    r = np.random.default_rng(1)
    for set_it in (exe.set_global, exe.bind_global):
        w = r.standard_normal((48, 32, 3, 3)).astype(np.float32)
        set_it("w", w)
        np.testing.assert_allclose(exe["f"](x), torch_conv(x, w, [1, 1, 1, 1]), rtol=1e-4, atol=1e-3)
    exe.save(tmp_path / "m.mlcz")
    np.testing.assert_allclose(mlc.load_executable(tmp_path / "m.mlcz")["f"](x), torch_conv(x, w, [1, 1, 1, 1]), rtol=1e-4, atol=1e-3)


def test_filters_written_in_place_or_stored_are_transformed_per_call():
    store = """
  func.func @g(%v: tensor<48x32x3x3xf32>) {
    mlc.global_store @w, %v : tensor<48x32x3x3xf32>
    return
  }"""
    for text in (GLOBAL_FILTERS % (", external", ""), GLOBAL_FILTERS % ("", store)):
        tensor_ir = str(mlc.run_passes(mlc.parse(text), "cpu-tensor"))
        assert "mlc.winograd_filter" in tensor_ir and "winograd4" not in tensor_ir


def test_a_winograd_global_says_what_is_wrong():
    def with_transform(text, t):
        return text.replace("module @m {", f'module @m {{\n  mlc.global @w.t : tensor<{t}> {{init = "winograd", of = @w}}')
    text = with_transform(GLOBAL_FILTERS % ("", ""), "48x25x32xf32")
    assert "has a type [O, (m + 2)^2, C] for m in [2, 4], got tensor<48x25x32xf32>" in errors(text)[0][2]
    stored = with_transform(GLOBAL_FILTERS % ("", """
  func.func @g(%v: tensor<48x32x3x3xf32>) {
    mlc.global_store @w, %v : tensor<48x32x3x3xf32>
    return
  }"""), "48x36x32xf32")
    assert "@w is read through its Winograd transform, so no function may store to it" in errors(stored)[0][2]
