"""mlc.onnx: ONNX models imported as modules, checked against onnx's own reference implementation
and its backend node test suite (every case passes or is refused with NotImplementedError)."""
import collections
import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest

import mlc

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402

import mlc.onnx as mlc_onnx  # noqa: E402

rng = np.random.default_rng(0)


def model_of(nodes, inputs, outputs, initializers=(), opset=17):
    graph = helper.make_graph(nodes, "net", inputs, outputs, [numpy_helper.from_array(a, n) for n, a in initializers])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def torch_export(net, x, opset=17, dynamic_axes=None) -> bytes:
    """net exported by torch.onnx (the test is skipped where torch's exporter cannot run here)."""
    import io

    import torch
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(net, (x,), buf, opset_version=opset, dynamo=False, input_names=["x"], output_names=["y"],
                              dynamic_axes=dynamic_axes)
        except Exception as e:  # the exporter's own requirements (onnxscript, ...) are not mlc's
            pytest.skip(f"torch.onnx.export is unavailable here: {type(e).__name__}")
    return buf.getvalue()


def f32(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def test_a_cnn_imports_and_matches_onnx_reference():
    """Conv + BatchNormalization + Relu + MaxPool + GlobalAveragePool + Flatten + Gemm + Softmax with a
    symbolic batch: weights become trainable globals; interpreter and CPU backend match onnx."""
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    weights = [("w", w), ("b", rng.standard_normal(4).astype(np.float32)),
               ("scale", rng.random(4).astype(np.float32) + 0.5), ("shift", rng.standard_normal(4).astype(np.float32)),
               ("mean", rng.standard_normal(4).astype(np.float32)), ("var", rng.random(4).astype(np.float32) + 0.5),
               ("fc", rng.standard_normal((4, 5)).astype(np.float32)), ("fc_b", rng.standard_normal(5).astype(np.float32))]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "scale", "shift", "mean", "var"], ["n"], name="bn"),
             helper.make_node("Relu", ["n"], ["r"], name="relu"),
             helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("GlobalAveragePool", ["p"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fc", "fc_b"], ["logits"], name="fc"),
             helper.make_node("Softmax", ["logits"], ["y"], name="softmax", axis=1)]
    model = model_of(nodes, [f32("x", ["N", 3, 8, 8])], [f32("y", ["N", 5])], weights)
    m = mlc_onnx.load(model)
    assert m.functions["main"].type.inputs[0].shape == (None, 3, 8, 8)
    assert all(g.attr("trainable") for g in m.globals.values()) and len(m.globals) == len(weights)
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    want = ReferenceEvaluator(model).run(None, {"x": x})[0]
    np.testing.assert_allclose(mlc.interpret(m, "main", x), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mlc.compile(m)["main"](x), want, rtol=1e-4, atol=1e-5)


def test_shape_subgraphs_fold_at_import():
    """Shape -> Gather -> Unsqueeze -> Concat -> Reshape, all known at import: one mlc.reshape."""
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("Gather", ["s", "zero"], ["n"], name="batch", axis=0),
             helper.make_node("Unsqueeze", ["n", "axes"], ["n1"], name="unsqueeze"),
             helper.make_node("Concat", ["n1", "minus_one"], ["target"], name="target", axis=0),
             helper.make_node("Reshape", ["x", "target"], ["y"], name="reshape")]
    model = model_of(nodes, [f32("x", [2, 3, 4])], [f32("y", [2, 12])],
                     [("zero", np.array(0, np.int64)), ("axes", np.array([0], np.int64)), ("minus_one", np.array([-1], np.int64))])
    m = mlc_onnx.load(model)
    assert [op.name for op in m.functions["main"].body.ops] == ["mlc.reshape", "func.return"]
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    np.testing.assert_array_equal(mlc.interpret(m, "main", x), x.reshape(2, 12))


def test_what_cannot_be_imported_is_named():
    model = model_of([helper.make_node("NonZero", ["x"], ["i"], name="nz")], [f32("x", [5])],
                     [helper.make_tensor_value_info("i", TensorProto.INT64, [1, "n"])])
    with pytest.raises(NotImplementedError, match=r"ONNX op NonZero \(domain ai.onnx, opset 17\) of node 'nz'"):
        mlc_onnx.load(model)
    with pytest.raises(mlc.DiagnosticError, match="not a valid ONNX model"):
        mlc_onnx.load(b"not a model")


def test_cli_imports_and_runs_onnx(tmp_path):
    model = model_of([helper.make_node("Tanh", ["x"], ["y"], name="t")], [f32("x", ["N", 3])], [f32("y", ["N", 3])])
    onnx.save(model, tmp_path / "m.onnx")
    r = subprocess.run([sys.executable, "-m", "mlc", "import", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "m.ir")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "mlc.tanh" in (tmp_path / "m.ir").read_text()
    np.save(tmp_path / "x.npy", np.ones((2, 3), np.float32))
    r = subprocess.run([sys.executable, "-m", "mlc", "run", str(tmp_path / "m.onnx"), "--input", f"x={tmp_path / 'x.npy'}"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "0.761594" in r.stdout, r.stderr


def test_onnx_node_suite_passes_or_refuses():
    """Every node test case whose ops are all in COVERED: imported and run on the interpreter, its
    outputs equal onnx's (to the case's tolerances), or refused with NotImplementedError. Never a
    wrong answer, never another exception."""
    from mlc.testing.onnx_suite import run_node_suite
    results = run_node_suite("interp")
    assert results["cases"] == []
    counts = sum((c for op, c in results.items() if op != "cases"), collections.Counter())
    assert counts["passed"] >= 1177, counts  # (raise as converters come)


def test_onnx_node_suite_on_the_cpu_backend():
    """A fast subset, compiled: the first cases of the ops of CNNs and Transformers (every case of
    them with MLC_RUN_SLOW=1; `python -m mlc.testing.onnx_suite --target cpu` runs the whole suite)."""
    from mlc.testing.onnx_suite import run_node_suite
    everything = os.environ.get("MLC_RUN_SLOW") == "1"
    results = run_node_suite("cpu", {"Conv", "ConvTranspose", "Gemm", "MatMul", "Softmax", "MaxPool", "AveragePool",
                                     "LayerNormalization", "BatchNormalization", "Relu", "Gelu"},
                             per_op=None if everything else 3)
    assert results["cases"] == []
    assert sum(c["passed"] for op, c in results.items() if op != "cases") >= (40 if everything else 25)


class _TorchCnn:
    """A conv / batch-norm / pool / linear / layer-norm / GELU network, exported by torch."""

    @staticmethod
    def make():
        import torch

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.conv, self.bn = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
                self.fc, self.ln = torch.nn.Linear(8, 4), torch.nn.LayerNorm(4)

            def forward(self, x):
                h = torch.nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
                return torch.nn.functional.gelu(self.ln(self.fc(h.mean((2, 3)))))
        torch.manual_seed(0)
        return Net().eval()


@pytest.mark.parametrize("opset", [13, 17])
def test_torch_exported_models_match_torch(opset):
    torch = pytest.importorskip("torch")
    net, x = _TorchCnn.make(), torch.randn(2, 3, 8, 8)
    m = mlc_onnx.load(torch_export(net, x, opset=opset, dynamic_axes={"x": {0: "N"}}))
    assert m.functions["main"].type.inputs[0].shape[0] is None  # the dynamic batch
    with torch.no_grad():
        want = net(x).numpy()
    np.testing.assert_allclose(mlc.compile(m)["main"](x.numpy()), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(mlc.compile(m)["main"](x.numpy()[:1]), want[:1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("target", ["interp", "cpu"])
def test_mlc_is_an_onnx_backend(target):
    model = model_of([helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("Sigmoid", ["h"], ["y"], name="s")],
                     [f32("x", ["N", 3])], [f32("y", ["N", 2])], [("w", rng.standard_normal((3, 2)).astype(np.float32))])
    backend = mlc_onnx.backend
    assert backend.supports_device("CPU") and not backend.supports_device("TPU")
    x = rng.standard_normal((4, 3)).astype(np.float32)
    want = ReferenceEvaluator(model).run(None, {"x": x})[0]
    (got,) = backend.run_model(model, [x], target=target)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    (by_name,) = backend.prepare(model, target=target).run({"x": x})
    np.testing.assert_allclose(by_name, want, rtol=1e-5, atol=1e-6)


def test_an_imported_model_fine_tunes(tmp_path):
    """load(..., loss="cross_entropy") adds @loss on @main's output: mlc train's loop trains the
    initializers (trainable globals) and the loss falls."""
    from mlc.train import Options, fit
    w = (rng.standard_normal((8, 3)) * 0.1).astype(np.float32)
    model = model_of([helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc")], [f32("x", ["N", 8])], [f32("y", ["N", 3])],
                     [("w", w), ("b", np.zeros(3, np.float32))])
    m = mlc_onnx.load(model, loss="cross_entropy")
    assert [str(t) for t in m.functions["loss"].type.inputs] == ["tensor<?x8xf32>", "tensor<?xi64>"]
    x = rng.standard_normal((64, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, target=np.argmax(x[:, :3], axis=1))
    exe = fit(m, Options(data=str(tmp_path / "d.npz"), epochs=8, batch_size=16, lr=0.05, progress=False))
    losses = exe.history["losses"]
    assert losses[-1] < 0.7 * losses[0], losses
    assert not np.allclose(exe.globals["w"], w)


@pytest.mark.parametrize("layer", ["LSTM", "GRU", "RNN"])
def test_torch_exported_recurrent_layers_match_torch(layer):
    """Two bidirectional layers, as torch exports them: an mlc.scan per direction and layer."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net, x = getattr(torch.nn, layer)(5, 7, num_layers=2, bidirectional=True).eval(), torch.randn(6, 3, 5)
    m = mlc_onnx.load(torch_export(net, x))
    assert sum(op.name == "mlc.scan" for op in m.walk()) == 4
    with torch.no_grad():
        want = net(x)[0].numpy()
    got = mlc.compile(m)["main"](x.numpy())
    np.testing.assert_allclose(got[0] if isinstance(got, tuple) else got, want, rtol=1e-4, atol=1e-5)


def _light_models():
    import os
    folder = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".onnx")) if os.path.isdir(folder) else []


def _light_case(path):
    """(module, onnx's input: arange / n, the output shipped beside the model)."""
    model = onnx.load(path)
    initializers = {i.name for i in model.graph.initializer}
    (x,) = [i for i in model.graph.input if i.name not in initializers]
    shape = tuple(d.dim_value if d.HasField("dim_value") else 1 for d in x.type.tensor_type.shape.dim)
    n = int(np.prod(shape))
    want = numpy_helper.to_array(onnx.load_tensor(path[:-len(".onnx")] + "_output_0.pb"))
    return mlc_onnx.load(path), (np.arange(n).reshape(shape) / n).astype(np.float32), want


def _name(path):
    return path.rsplit("/", 1)[-1][len("light_"):-len(".onnx")]


@pytest.mark.parametrize("path", _light_models(), ids=_name)
def test_the_real_architectures_shipped_with_onnx_match(path):
    """AlexNet, DenseNet-121, Inception v1/v2, ResNet-50, ShuffleNet, SqueezeNet, VGG-19, ZFNet-512
    (onnx's 'light' copies) on onnx's input (arange / n), against the outputs shipped beside them."""
    m, x, want = _light_case(path)
    np.testing.assert_allclose(mlc.interpret(m, "main", x), want, rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("path", [pytest.param(p, marks=[] if _name(p) in ("bvlc_alexnet", "zfnet512") else [pytest.mark.slow])
                                  for p in _light_models()], ids=_name)
def test_the_real_architectures_compiled_for_the_cpu_match(path):
    """The same, compiled (two by default: each takes 10-45 s to compile; MLC_RUN_SLOW=1 runs all)."""
    m, x, want = _light_case(path)
    np.testing.assert_allclose(mlc.compile(m)["main"](x), want, rtol=1e-3, atol=1e-7)


def test_inputs_that_set_shapes_are_static():
    """A Reshape's target given as a graph input: load() names the input it needs; with static=
    it becomes a constant and @main takes the rest; the backend imports once per such value."""
    model = model_of([helper.make_node("Reshape", ["x", "shape"], ["y"], name="r")],
                     [f32("x", [2, 6]), helper.make_tensor_value_info("shape", TensorProto.INT64, [2])], [f32("y", ["a", "b"])])
    with pytest.raises(mlc_onnx.NeedsInput, match=r"static=\{'shape'") as e:
        mlc_onnx.load(model)
    assert e.value.name == "shape"
    m = mlc_onnx.load(model, static={"shape": np.array([3, 4])})
    assert [str(t) for t in m.functions["main"].type.inputs] == ["tensor<2x6xf32>"]
    x = np.arange(12, dtype=np.float32).reshape(2, 6)
    rep = mlc_onnx.backend.prepare(model, target="interp")
    for shape in ([3, 4], [4, 3], [3, 4]):
        (y,) = rep.run([x, np.array(shape, np.int64)])
        np.testing.assert_array_equal(y, x.reshape(shape))
    assert rep.static == ["shape"] and len(rep.specialised) == 2


def test_a_torch_unet_with_upsampling_matches_torch():
    """A small U-Net: strided convolutions down, bilinear Resize and ConvTranspose up, skip
    concatenations; exported by torch, compiled for the CPU."""
    torch = pytest.importorskip("torch")

    class UNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.down1, self.down2 = torch.nn.Conv2d(3, 8, 3, 2, 1), torch.nn.Conv2d(8, 16, 3, 2, 1)
            self.up1, self.out = torch.nn.ConvTranspose2d(16, 8, 2, 2), torch.nn.Conv2d(16 + 3, 2, 3, padding=1)

        def forward(self, x):
            a = torch.relu(self.down1(x))
            b = torch.relu(self.down2(a))
            c = torch.cat([torch.relu(self.up1(b)), a], 1)
            up = torch.nn.functional.interpolate(c, scale_factor=2, mode="bilinear", align_corners=False)
            return self.out(torch.cat([up, x], 1))
    torch.manual_seed(0)
    net, x = UNet().eval(), torch.randn(1, 3, 16, 16)
    m = mlc_onnx.load(torch_export(net, x))
    with torch.no_grad():
        want = net(x).numpy()
    np.testing.assert_allclose(mlc.compile(m)["main"](x.numpy()), want, rtol=1e-4, atol=1e-5)


def test_narrow_element_types_are_refused_by_the_compiler():
    """uint8 runs on the interpreter; the CPU backend refuses it, located, as a NotImplementedError."""
    model = model_of([helper.make_node("Add", ["x", "x"], ["y"], name="add")],
                     [helper.make_tensor_value_info("x", TensorProto.UINT8, [3])], [helper.make_tensor_value_info("y", TensorProto.UINT8, [3])])
    m = mlc_onnx.load(model)
    x = np.array([1, 100, 200], np.uint8)
    np.testing.assert_array_equal(mlc.interpret(m, "main", x), x + x)
    with pytest.raises(NotImplementedError, match="element type ui8 runs on the interpreter only"):
        mlc.compile(m)


def test_a_torch_transformer_with_dynamic_batch_matches_torch():
    """A 2-layer TransformerEncoder exported with symbolic batch and sequence dims: its shape
    subgraphs (Shape, Gather, Concat, Reshape) stay in the IR as mlc.shape_of and reshapes to shapes
    computed at run time; one compiled module serves two batch sizes."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    net, x = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval(), torch.randn(2, 5, 32)
    m = mlc_onnx.load(torch_export(net, x, dynamic_axes={"x": {0: "N", 1: "T"}}))
    assert str(m.functions["main"].type) == "(tensor<?x?x32xf32>) -> tensor<?x?x32xf32>"
    assert any(op.name == "mlc.shape_of" for op in m.walk())
    run = mlc.compile(m)["main"]
    for batch in (x, torch.randn(3, 5, 32)):  # (torch's export fixes T in places: only the batch varies)
        with torch.no_grad():
            want = net(batch).numpy()
        np.testing.assert_allclose(run(batch.numpy()), want, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(mlc.interpret(m, "main", batch.numpy()), want, rtol=1e-4, atol=1e-5)


def test_a_torch_export_imports_and_trains_from_the_command_line(tmp_path):
    """torch.onnx.export -> mlc import --loss cross_entropy -> mlc train: the test accuracy of the
    imported MLP (Linear, GELU, LayerNorm, Linear) rises from chance on a separable problem."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.GELU(), torch.nn.LayerNorm(16), torch.nn.Linear(16, 3)).eval()
    (tmp_path / "mlp.onnx").write_bytes(torch_export(net, torch.randn(4, 6), dynamic_axes={"x": {0: "N"}}))
    x = rng.standard_normal((300, 6)).astype(np.float32)
    labels = np.argmax(x[:, :3], axis=1)
    np.savez(tmp_path / "train.npz", x=x[:240], target=labels[:240])
    np.savez(tmp_path / "test.npz", x=x[240:], target=labels[240:])
    mlc_cli = [sys.executable, "-m", "mlc"]
    r = subprocess.run(mlc_cli + ["import", str(tmp_path / "mlp.onnx"), "--loss", "cross_entropy", "-o", str(tmp_path / "mlp.ir")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(mlc_cli + ["train", str(tmp_path / "mlp.ir"), "--data", str(tmp_path / "train.npz"), "--eval",
                                  str(tmp_path / "test.npz"), "--predict", "@main", "--metric", "accuracy", "--epochs", "15",
                                  "--lr", "0.01", "--optimizer", "adam", "--quiet", "-o", str(tmp_path / "mlp.mlcz")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    accuracy = float(re.findall(r"accuracy ([0-9.]+)%", r.stdout + r.stderr)[-1])
    assert accuracy > 80, r.stdout + r.stderr
