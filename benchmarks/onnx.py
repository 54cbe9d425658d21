"""The same .onnx files on mlc (imported, compiled for this CPU) and on onnxruntime; prints one table.

    python benchmarks/onnx.py [--quick]

The models are exported from torch here, with a symbolic batch dim (a ResNet-50 at batch 1 x 3 x 224 x 224
and a Transformer encoder among them; the encoder's shape subgraphs stay in mlc's IR); each
framework runs in its own process (thread pools sharing a process slow each other down). mlc's
import and compile times are reported too. Ratios > 1 mean mlc is faster. onnxruntime is optional:
without it its column says n/a.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

# this file is called onnx.py: keep its folder off the path, so `import onnx` finds the package
sys.path = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]

import numpy as np  # noqa: E402


def torch_models(quick: bool) -> dict:
    """name -> (torch module, example input)."""
    import torch
    nn = torch.nn

    class Bottleneck(nn.Module):
        def __init__(self, cin, width, stride):
            super().__init__()
            cout = width * 4
            self.body = nn.Sequential(nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                                      nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                                      nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout))
            self.skip = nn.Sequential() if stride == 1 and cin == cout else \
                nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            return torch.relu(self.body(x) + self.skip(x))

    def resnet50():
        layers, cin = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)], 64
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            for b in range(blocks):
                layers.append(Bottleneck(cin, width, stride if b == 0 else 1))
                cin = width * 4
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2048, 1000))

    torch.manual_seed(0)
    models = {"MLP 784-1024-1024-10 b64": (nn.Sequential(nn.Linear(784, 1024), nn.GELU(), nn.LayerNorm(1024), nn.Linear(1024, 1024),
                                                         nn.ReLU(), nn.Linear(1024, 10)), torch.randn(64, 784))}
    if not quick:
        layer = nn.TransformerEncoderLayer(256, 8, 1024, dropout=0.0, batch_first=True)
        models["Transformer 2x256 b8 T64"] = (nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), torch.randn(8, 64, 256))
        models["ResNet-50 b1 224x224"] = (resnet50(), torch.randn(1, 3, 224, 224))
    return models


def export(directory: str, quick: bool) -> dict:
    import io
    import warnings

    import torch
    out = {}
    for name, (model, x) in torch_models(quick).items():
        path = os.path.join(directory, name.split()[0] + ".onnx")
        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model.eval(), (x,), buf, opset_version=17, dynamo=False, input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "N"}})
        with open(path, "wb") as f:
            f.write(buf.getvalue())
        np.save(path + ".x.npy", x.numpy())
        out[name] = path
    return out


def time_mlc(path: str) -> dict:
    import mlc
    import mlc.onnx
    x = np.load(path + ".x.npy")
    t0 = time.perf_counter()
    m = mlc.onnx.load(path)
    t1 = time.perf_counter()
    run = mlc.compile(m, cache=False)["main"]
    t2 = time.perf_counter()
    return {"run": best(lambda: run(x)), "import": t1 - t0, "compile": t2 - t1}


def time_onnxruntime(path: str) -> dict:
    try:
        import onnxruntime
    except ImportError:
        return {"run": float("nan")}
    x = np.load(path + ".x.npy")
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return {"run": best(lambda: session.run(None, {"x": x}))}


def best(fn, repeat: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--measure", nargs=2, metavar=("FRAMEWORK", "PATH"), help=argparse.SUPPRESS)  # one measurement, this process
    args = ap.parse_args()
    if args.measure:
        framework, path = args.measure
        print(json.dumps((time_mlc if framework == "mlc" else time_onnxruntime)(path)))
        return
    with tempfile.TemporaryDirectory() as directory:
        models = export(directory, args.quick)

        def measure(framework, path):
            r = subprocess.run([sys.executable, __file__, "--measure", framework, path], capture_output=True, text=True, check=True)
            return json.loads(r.stdout.strip().splitlines()[-1])
        print(f"{'model':<28}{'mlc ms':>10}{'ort ms':>10}{'ort/mlc':>9}{'import s':>10}{'compile s':>11}")
        for name, path in models.items():
            ours, theirs = measure("mlc", path), measure("onnxruntime", path)
            print(f"{name:<28}{1e3 * ours['run']:>10.2f}{1e3 * theirs['run']:>10.2f}{theirs['run'] / ours['run']:>9.2f}"
                  f"{ours['import']:>10.2f}{ours['compile']:>11.2f}")


if __name__ == "__main__":
    main()
