"""The CUDA backend against torch on the same GPU; prints one table. Runs only where pycuda finds a GPU.

    python benchmarks/gpu.py [--quick]

mlc's figures are kernel time (CUDA events around each launch: transfers of numpy inputs and results
excluded, as torch's tensors already live on the GPU); torch runs in its own process (frameworks
sharing a process disturb each other), eager, with TF32 off so SGEMM is SGEMM. Ratios > 1: mlc faster.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np

PEAK_GBPS = {"H100": 3350.0, "H200": 4800.0}  # HBM bandwidth, published


def cases(quick: bool) -> dict:
    n = 1 << (24 if quick else 26)
    size = 2048 if quick else 4096
    rows = 4096 if quick else 16384
    return {
        "elementwise": {"n": n},
        "sgemm": {"n": size},
        "softmax": {"rows": rows, "cols": 1024},
        "layer_norm": {"rows": rows, "cols": 1024},
        "mlp_train_step": {"batch": 256},
    }


def mlc_case(name: str, p: dict) -> tuple[float, float]:
    """(kernel milliseconds per call, bytes or flops per call) for mlc."""
    import mlc
    rng = np.random.default_rng(0)
    if name == "elementwise":
        text = f"""module {{ func.func @f(%x: tensor<{p['n']}xf32>) -> tensor<{p['n']}xf32> {{
          %half = mlc.constant dense<0.5> : tensor<f32>
          %a = mlc.mul %x, %half
          %r = mlc.relu %a
          %y = mlc.mul %r, %x
          return %y : tensor<{p['n']}xf32> }} }}"""
        args, work = [rng.standard_normal(p["n"]).astype(np.float32)], 8 * p["n"]
    elif name == "sgemm":
        n = p["n"]
        text = f"""module {{ func.func @f(%a: tensor<{n}x{n}xf32>, %b: tensor<{n}x{n}xf32>) -> tensor<{n}x{n}xf32> {{
          %c = mlc.matmul %a, %b
          return %c : tensor<{n}x{n}xf32> }} }}"""
        args, work = [rng.standard_normal((n, n)).astype(np.float32) for _ in range(2)], 2 * n ** 3
    elif name in ("softmax", "layer_norm"):
        r, c = p["rows"], p["cols"]
        body = "%y = mlc.softmax %x {axis = -1}" if name == "softmax" else """%m = mlc.reduce_mean %x {axes = [1], keepdims = true}
          %d = mlc.sub %x, %m
          %s = mlc.mul %d, %d
          %v = mlc.reduce_mean %s {axes = [1], keepdims = true}
          %e = mlc.constant dense<1.0e-5> : tensor<f32>
          %ve = mlc.add %v, %e
          %q = mlc.rsqrt %ve
          %y = mlc.mul %d, %q"""
        text = f"module {{ func.func @f(%x: tensor<{r}x{c}xf32>) -> tensor<{r}x{c}xf32> {{\n{body}\n return %y : tensor<{r}x{c}xf32> }} }}"
        args, work = [rng.standard_normal((r, c)).astype(np.float32)], 8 * r * c
    else:
        return mlc_train_step(p)
    exe = mlc.compile(mlc.parse(text), target="cuda")
    return timed(exe, "f", args), work


def mlc_train_step(p: dict) -> tuple[float, float]:
    import mlc
    import mlc.nn as nn
    import mlc.nn.functional as F
    model = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
    step = mlc.compile_train_step(model, F.cross_entropy, mlc.optim.SGD(model.parameters(), lr=0.01), backend="cuda")
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((p["batch"], 784)).astype(np.float32), rng.integers(0, 10, p["batch"])
    step(x, y)
    t0 = time.perf_counter()
    for _ in range(10):
        step(x, y)
    return (time.perf_counter() - t0) * 100, 0.0  # wall time per step (ms): weights stay on the device


def timed(exe, name, args, repeat=10) -> float:
    exe[name](*args)  # warm up (and load the module)
    device = exe.device
    device.timed = []
    for _ in range(repeat):
        exe[name](*args)
    ms = device.kernel_milliseconds() / repeat
    device.timed = None
    return ms


def torch_case(name: str, p: dict) -> float:
    import torch
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device("cuda")
    if name == "mlp_train_step":
        model = torch.nn.Sequential(torch.nn.Linear(784, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024), torch.nn.ReLU(),
                                    torch.nn.Linear(1024, 10)).to(dev)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        x, y = torch.randn(p["batch"], 784, device=dev), torch.randint(0, 10, (p["batch"],), device=dev)

        def fn():
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    elif name == "elementwise":
        x = torch.randn(p["n"], device=dev)
        fn = lambda: torch.relu(x * 0.5) * x  # noqa: E731
    elif name == "sgemm":
        a, b = torch.randn(p["n"], p["n"], device=dev), torch.randn(p["n"], p["n"], device=dev)
        fn = lambda: a @ b  # noqa: E731
    else:
        x = torch.randn(p["rows"], p["cols"], device=dev)
        fn = (lambda: torch.softmax(x, -1)) if name == "softmax" else (lambda: torch.nn.functional.layer_norm(x, (p["cols"],)))
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 10


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--torch", metavar="CASE", help=argparse.SUPPRESS)  # one torch measurement, in this process
    args = ap.parse_args()
    table = cases(args.quick)
    if args.torch:
        print(json.dumps(torch_case(args.torch, table[args.torch])))
        return
    try:
        import pycuda.driver as cuda
        cuda.init()
        gpu = cuda.Device(0).name()
    except Exception as e:  # no pycuda, no driver, no GPU
        print(f"benchmarks/gpu.py needs a GPU with pycuda: {e}")
        return
    peak = next((v for k, v in PEAK_GBPS.items() if k in gpu), None)
    print(f"{gpu}; ratios are torch time / mlc time (> 1: mlc faster)")
    print(f"{'case':<16}{'mlc ms':>10}{'torch ms':>10}{'ratio':>8}  note")
    for name, p in table.items():
        ms, work = mlc_case(name, p)
        t = json.loads(subprocess.run([sys.executable, __file__, "--torch", name] + (["--quick"] if args.quick else []),
                                      capture_output=True, text=True, check=True).stdout)
        note = ""
        if name in ("elementwise", "softmax", "layer_norm"):
            gbps = work / ms / 1e6
            note = f"{gbps:.0f} GB/s" + (f" = {100 * gbps / peak:.0f}% of peak" if peak else "")
        elif name == "sgemm":
            note = f"{work / ms / 1e9:.1f} TFLOP/s"
        print(f"{name:<16}{ms:>10.3f}{t:>10.3f}{t / ms:>8.2f}  {note}")


if __name__ == "__main__":
    main()
