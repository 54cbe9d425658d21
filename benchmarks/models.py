"""Models built with mlc.nn against the same models in torch eager on the CPU, side by side in one run:

    ResNet-18 inference, batch 1, 3x224x224 (and onnxruntime, when it is installed)
    a 2-layer LSTM (input 128, hidden 512) over 64 steps at batch 32 + a linear head: one Adam training step
    a Transformer encoder layer (d_model 256, 8 heads, feed-forward 1024) at batch 32 x 64 tokens: one Adam step
    compiling ResNet-18 inference: cold (empty cache) and warm (from the on-disk cache, in a fresh trace)

    python benchmarks/models.py [--repeat N]

Times are the best of N runs, mlc's and torch's interleaved (this machine's speed drifts by tens of
percent); ratio > 1 means mlc is faster. Both use all cores (torch's default threads, mlc's pool).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def interleaved(fns: dict, repeat: int, calls: int = 1) -> dict:
    """Best seconds per call of each function, their runs interleaved."""
    for fn in fns.values():
        fn()  # warm up: compilation, caches, optimiser state
    runs = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            runs[name].append((time.perf_counter() - t0) / calls)
    return {name: min(r) for name, r in runs.items()}


def copy_weights(model, reference):
    model.load_state_dict(reference.state_dict())


def resnet(torch, mlc, repeat):
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from test_models import TorchResNet18
    reference = TorchResNet18().eval()
    model = mlc.models.resnet18().eval()
    copy_weights(model, reference)
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    tx = torch.tensor(x)

    def torch_run():
        with torch.no_grad():
            reference(tx)
    fns = {"mlc": lambda: model(x), "torch": torch_run}
    ort = onnxruntime_session(torch, reference, tx)
    if ort is not None:
        fns["onnxruntime"] = lambda: ort.run(None, {"x": x})
    times = interleaved(fns, repeat, calls=3)
    rows = [("ResNet-18 inference b1 224x224", times["mlc"], times["torch"], "torch")]
    if "onnxruntime" in times:
        rows.append(("ResNet-18 inference b1 224x224", times["mlc"], times["onnxruntime"], "onnxruntime"))
    return rows


def onnxruntime_session(torch, model, example):
    try:
        import warnings

        import onnxruntime
        path = os.path.join(tempfile.mkdtemp(), "resnet18.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), path, input_names=["x"], dynamo=False)
        return onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    except Exception:  # not installed, or this torch cannot export: the column is left out
        return None


def classifier(lib, body, width):
    """body (a layer of lib, torch or mlc) then a linear head over the last token; the same code builds
    both models, since mlc.nn speaks torch.nn."""
    class Classifier(lib.nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = body(), lib.nn.Linear(width, 10)

        def forward(self, x):
            out = self.body(x)
            return self.head((out[0] if isinstance(out, tuple) else out)[:, -1])
    return Classifier()


def lstm(torch, mlc, repeat):
    batch, steps, features, hidden = 32, 64, 128, 512
    reference, model = (classifier(lib, lambda lib=lib: lib.nn.LSTM(features, hidden, 2, batch_first=True), hidden)
                        for lib in (torch, mlc))
    r = np.random.default_rng(0)
    x, y = r.standard_normal((batch, steps, features)).astype(np.float32), r.integers(0, 10, batch)
    return [("2-layer LSTM h512 seq64 b32 train step",) + train_steps(torch, mlc, model, reference, x, y, repeat)]


def encoder_layer(torch, mlc, repeat):
    d, heads, ff, batch, length = 256, 8, 1024, 32, 64
    reference, model = (classifier(lib, lambda lib=lib: lib.nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True), d)
                        for lib in (torch, mlc))
    r = np.random.default_rng(0)
    x, y = r.standard_normal((batch, length, d)).astype(np.float32), r.integers(0, 10, batch)
    return [("Transformer encoder layer d256 b32x64 train step",) + train_steps(torch, mlc, model, reference, x, y, repeat)]


def train_steps(torch, mlc, model, reference, x, y, repeat):
    copy_weights(model, reference)
    step = mlc.compile_train_step(model, mlc.nn.functional.cross_entropy, mlc.optim.Adam(model.parameters(), lr=1e-4))
    topt = torch.optim.Adam(reference.parameters(), lr=1e-4)
    tx, ty = torch.tensor(x), torch.tensor(y)

    def torch_step():
        topt.zero_grad()
        torch.nn.functional.cross_entropy(reference(tx), ty).backward()
        topt.step()
    times = interleaved({"mlc": lambda: step(x, y), "torch": torch_step}, repeat)
    return times["mlc"], times["torch"], "torch"


def compile_times(mlc):
    """ResNet-18 inference: trace + compile with an empty cache, then a fresh model (a new trace) whose
    code comes from the cache."""
    x = np.zeros((1, 3, 224, 224), np.float32)
    os.environ["MLC_CACHE_DIR"] = tempfile.mkdtemp(prefix="mlc-bench-cache-")
    times = []
    for _ in range(2):
        model = mlc.models.resnet18().eval()
        t0 = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t0)
    return [("compile ResNet-18, cold", times[0], None, ""), ("compile ResNet-18, from the cache", times[1], None, "")]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5, help="runs per measurement (the best counts)")
    args = ap.parse_args()
    import torch

    import mlc
    rows = compile_times(mlc)
    for bench in (resnet, lstm, encoder_layer):
        rows += bench(torch, mlc, args.repeat)
    print(f"{'benchmark':48s} {'mlc (ms)':>9s} {'peer (ms)':>10s}  {'peer':11s} {'mlc/peer speed':>14s}")
    for name, ours, theirs, peer in rows:
        ratio = f"{theirs / ours:13.2f}x" if theirs else ""
        print(f"{name:48s} {ours * 1e3:9.1f} {theirs * 1e3 if theirs else float('nan'):10.1f}  {peer:11s} {ratio}")


if __name__ == "__main__":
    main()
