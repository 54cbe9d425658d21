"""Models built with mlc.nn against the same models in torch eager (and onnxruntime) on the CPU:

    ResNet-18 inference, batch 1, 3x224x224 (and onnxruntime, when it is installed): called as an mlc.nn
        module (its weights are arguments: packed and transformed at every call), and exported (`mlc.export`:
        its weights are globals, packed and transformed when set, as onnxruntime's are at load)
    a 2-layer LSTM (input 128, hidden 512) over 64 steps at batch 32 + a linear head: one Adam training step
    a Transformer encoder layer (d_model 256, 8 heads, feed-forward 1024) at batch 32 x 64 tokens: one Adam step
    compiling ResNet-18 inference: cold (empty cache) and warm (from the on-disk cache, in a fresh trace)

    python benchmarks/models.py [--quick] [--rounds N]

Each framework runs in its own process, the processes taking turns (benchmarks/harness.py); a
figure is the best over the rounds, and each peer is measured once more alone as a check. Ratio > 1
means mlc is faster. All use all cores (torch's and onnxruntime's default threads, mlc's pool).
--quick: fewer rounds.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

import harness

# workload -> (its name in the table, the frameworks, calls per rep, reps per turn)
WORKLOADS = {
    "resnet18": ("ResNet-18 inference b1 224x224", ["mlc", "torch", "onnxruntime"], 3, 1),
    "resnet18 exported": ("ResNet-18 b1, exported: weights as globals", ["mlc", "onnxruntime"], 3, 1),
    "lstm": ("2-layer LSTM h512 seq64 b32 train step", ["mlc", "torch"], 1, 2),
    "encoder": ("Transformer encoder layer d256 b32x64 train step", ["mlc", "torch"], 1, 2),
    "compile cold": ("compile ResNet-18, cold", ["mlc"], 1, 1),
    "compile cached": ("compile ResNet-18, from the cache", ["mlc"], 1, 1),
}


def torch_resnet18(torch):
    """torchvision's ResNet-18 written out (tests/test_models.py has the same, but imports mlc)."""
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self, in_planes, planes, stride=1):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
            self.relu = nn.ReLU()
            self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False), nn.BatchNorm2d(planes)
            self.downsample = None
            if stride != 1 or in_planes != planes:
                self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

        def forward(self, x):
            out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
            return self.relu(out + (x if self.downsample is None else self.downsample(x)))

    class ResNet18(nn.Module):
        def __init__(self, width=64):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width)
            self.relu, self.maxpool = nn.ReLU(), nn.MaxPool2d(3, 2, 1)
            planes = width
            for i in range(4):
                out = width * 2 ** i
                setattr(self, f"layer{i + 1}", nn.Sequential(Block(planes, out, 1 if i == 0 else 2), Block(out, out)))
                planes = out
            self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(planes, 1000)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(self.avgpool(x), 1))
    return ResNet18().eval()


def image():
    return np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)


def export_onnx(path: str):
    """The torch ResNet-18 as ONNX, for the onnxruntime worker (which must not import torch)."""
    import warnings
    sys.path.remove(os.path.dirname(os.path.abspath(__file__)))  # (benchmarks/onnx.py would shadow the onnx package)
    import torch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(torch_resnet18(torch), (torch.tensor(image()),), path, input_names=["x"], dynamo=False)


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


def train_model(lib, workload: str):
    """The model, input and labels of a training workload, built by lib (torch or mlc)."""
    r = np.random.default_rng(0)
    if workload == "lstm":
        batch, steps, features, hidden = 32, 64, 128, 512
        model = classifier(lib, lambda: lib.nn.LSTM(features, hidden, 2, batch_first=True), hidden)
        return model, r.standard_normal((batch, steps, features)).astype(np.float32), r.integers(0, 10, batch)
    d, heads, ff, batch, length = 256, 8, 1024, 32, 64
    model = classifier(lib, lambda: lib.nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True), d)
    return model, r.standard_normal((batch, length, d)).astype(np.float32), r.integers(0, 10, batch)


def compile_rep(mlc, fresh_cache: bool):
    """A rep timing ResNet-18 inference's trace + compile, with an empty cache or from the on-disk one
    (a new model each time, built outside the timing)."""
    x = np.zeros((1, 3, 224, 224), np.float32)
    last = [mlc.models.resnet18().eval()]

    def rep():
        if fresh_cache:
            os.environ["MLC_CACHE_DIR"] = tempfile.mkdtemp(prefix="mlc-bench-cache-")
        model = last[0] = mlc.models.resnet18().eval()  # (built while the one before is alive)
        t0 = time.perf_counter()
        model(x)
        return time.perf_counter() - t0
    if not fresh_cache:  # fill the cache: a process's first compile of ResNet-18 is keyed apart from
        last[0](x)       # the later ones (its traced text differs: an mlc quirk), so compile two
        rep()
    return rep


def mlc_setup(workload: str):
    import mlc
    if workload.startswith("compile"):
        return compile_rep(mlc, workload == "compile cold")  # (cold: the first compile in the process, as ever)
    if workload == "resnet18":
        model, x = mlc.models.resnet18().eval(), image()
        return lambda: model(x)
    if workload == "resnet18 exported":  # (as onnxruntime runs it: weights packed and transformed once, at load)
        exe, x = mlc.compile(mlc.export(mlc.models.resnet18().eval(), image())), image()
        return lambda: exe["forward"](x)
    model, x, y = train_model(mlc, workload)
    step = mlc.compile_train_step(model, mlc.nn.functional.cross_entropy, mlc.optim.Adam(model.parameters(), lr=1e-4))
    return lambda: step(x, y)


def torch_setup(workload: str):
    import torch
    if workload == "resnet18":
        model, x = torch_resnet18(torch), torch.tensor(image())

        def forward():
            with torch.no_grad():
                model(x)
        return forward
    model, x, y = train_model(torch, workload)
    opt, x, y = torch.optim.Adam(model.parameters(), lr=1e-4), torch.tensor(x), torch.tensor(y)

    def step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def onnxruntime_setup(workload: str):
    path = os.path.join(tempfile.mkdtemp(), "resnet18.onnx")
    subprocess.run([sys.executable, __file__, "--export-onnx", path], check=True, stdout=sys.stderr)
    import onnxruntime
    session, x = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"]), image()
    return lambda: session.run(None, {"x": x})


def worker(framework: str, workload: str):
    fn = {"mlc": mlc_setup, "torch": torch_setup, "onnxruntime": onnxruntime_setup}[framework](workload)
    if workload.startswith("compile"):
        return fn  # already a rep
    fn()  # warm up: compilation, caches, optimiser state
    return harness.timer(fn, WORKLOADS[workload][2])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds")
    ap.add_argument("--rounds", type=int, help="turns per framework (the best rep counts); 5, or 3 with --quick")
    ap.add_argument("--only", nargs="+", choices=list(WORKLOADS), metavar="WORKLOAD", help="just these workloads (resnet18, lstm, ...)")
    ap.add_argument("--export-onnx", metavar="PATH", help=argparse.SUPPRESS)
    harness.add_worker_arguments(ap)
    args = ap.parse_args()
    if args.export_onnx:
        return export_onnx(args.export_onnx)
    if args.worker:
        return harness.serve(args.worker[0], lambda: worker(*args.worker), args.repeat)
    rounds = args.rounds or (3 if args.quick else 5)
    has_onnxruntime = importlib.util.find_spec("onnxruntime") is not None
    print(harness.load())
    results, rows = [], []
    for workload, (name, frameworks, _, repeat) in WORKLOADS.items():
        if args.only and workload not in args.only:
            continue
        frameworks = [fw for fw in frameworks if fw != "onnxruntime" or has_onnxruntime]
        res = harness.compare(__file__, workload, frameworks, 1 if workload.startswith("compile") else rounds, repeat)
        results.append(res)
        peers = frameworks[1:] or [None]
        rows += [(name, res.times["mlc"], res.times.get(peer), peer or "", "") for peer in peers]
    harness.print_table(rows)
    harness.print_sanity(results, {w: v[0] for w, v in WORKLOADS.items()})
    print(harness.load())


if __name__ == "__main__":
    main()
