"""The CPU backend against numpy and torch, each framework in its own process; prints one table.

    python benchmarks/cpu.py [--quick] [--rounds N]

Workers take turns (benchmarks/harness.py); each figure is the best rep over the rounds (this
machine is noisy), and each peer is measured once more alone as a check. Ratios > 1 mean mlc is faster.
"""
from __future__ import annotations

import argparse

import numpy as np

import harness

MLP = """module @mlp {
  mlc.global @w1 : tensor<784x1024xf32> {init = "glorot_uniform"}
  mlc.global @b1 : tensor<1024xf32> {init = "zeros"}
  mlc.global @w2 : tensor<1024x1024xf32> {init = "glorot_uniform"}
  mlc.global @b2 : tensor<1024xf32> {init = "zeros"}
  mlc.global @w3 : tensor<1024x10xf32> {init = "glorot_uniform"}
  func.func @forward(%x: tensor<?x784xf32>) -> tensor<?x10xf32> {
    %w1 = mlc.global_load @w1 : tensor<784x1024xf32>
    %b1 = mlc.global_load @b1 : tensor<1024xf32>
    %w2 = mlc.global_load @w2 : tensor<1024x1024xf32>
    %b2 = mlc.global_load @b2 : tensor<1024xf32>
    %w3 = mlc.global_load @w3 : tensor<1024x10xf32>
    %h1 = mlc.matmul %x, %w1 : (tensor<?x784xf32>, tensor<784x1024xf32>) -> tensor<?x1024xf32>
    %a1 = mlc.add %h1, %b1 : (tensor<?x1024xf32>, tensor<1024xf32>) -> tensor<?x1024xf32>
    %r1 = mlc.relu %a1
    %h2 = mlc.matmul %r1, %w2 : (tensor<?x1024xf32>, tensor<1024x1024xf32>) -> tensor<?x1024xf32>
    %a2 = mlc.add %h2, %b2 : (tensor<?x1024xf32>, tensor<1024xf32>) -> tensor<?x1024xf32>
    %r2 = mlc.relu %a2
    %y = mlc.matmul %r2, %w3 : (tensor<?x1024xf32>, tensor<1024x10xf32>) -> tensor<?x10xf32>
    return %y : tensor<?x10xf32>
  }
}"""

SGEMM = """module {{ func.func @f(%a: tensor<{n}x{n}xf32>, %b: tensor<{n}x{n}xf32>) -> tensor<{n}x{n}xf32> {{
  %c = mlc.matmul %a, %b
  return %c : tensor<{n}x{n}xf32> }} }}"""

ELEMENTWISE = """module {{ func.func @f(%x: tensor<{n}xf32>) -> tensor<{n}xf32> {{
  %half = mlc.constant dense<0.5> : tensor<f32>
  %one = mlc.constant dense<1.0> : tensor<f32>
  %a = mlc.mul %x, %half
  %b = mlc.add %a, %one
  %r = mlc.relu %b
  %t = mlc.tanh %x
  %y = mlc.mul %r, %t
  return %y : tensor<{n}xf32> }} }}"""

SOFTMAX = """module { func.func @f(%x: tensor<4096x1024xf32>) -> tensor<4096x1024xf32> {
  %y = mlc.softmax %x {axis = 1}
  return %y : tensor<4096x1024xf32> } }"""

LAYER_NORM = """module { func.func @f(%x: tensor<4096x1024xf32>, %g: tensor<1024xf32>, %b: tensor<1024xf32>) -> tensor<4096x1024xf32> {
  %eps = mlc.constant dense<1.0e-5> : tensor<f32>
  %m = mlc.reduce_mean %x {axes = [1], keepdims = true}
  %d = mlc.sub %x, %m
  %sq = mlc.mul %d, %d
  %v = mlc.reduce_mean %sq {axes = [1], keepdims = true}
  %ve = mlc.add %v, %eps
  %rs = mlc.rsqrt %ve
  %n = mlc.mul %d, %rs
  %s = mlc.mul %n, %g
  %y = mlc.add %s, %b
  return %y : tensor<4096x1024xf32> } }"""

CONV = """module { func.func @f(%x: tensor<8x64x56x56xf32>, %w: tensor<64x64x3x3xf32>) -> tensor<8x64x56x56xf32> {
  %y = mlc.conv2d %x, %w {padding = [1, 1, 1, 1]}
  return %y : tensor<8x64x56x56xf32> } }"""

# workload -> (its name in the table, the peer, reps per turn)
WORKLOADS = {
    "sgemm 256": ("SGEMM 256", "numpy", 3),
    "sgemm 512": ("SGEMM 512", "numpy", 3),
    "sgemm 1024": ("SGEMM 1024", "numpy", 1),
    "elementwise 1048576": ("relu(x*0.5+1)*tanh(x), 1M f32", "numpy", 3),
    "elementwise 16777216": ("relu(x*0.5+1)*tanh(x), 16M f32", "numpy", 3),
    "softmax": ("row softmax 4096x1024", "numpy", 3),
    "layer norm": ("layer norm (as ops) 4096x1024", "torch", 3),
    "mlp 256": ("MLP 784-1024-1024-10 b256", "torch", 3),
    "mlp 32": ("MLP 784-1024-1024-10 b32", "torch", 10),
    "mlp 1": ("MLP 784-1024-1024-10 b1", "torch", 20),
    "conv": ("conv2d 3x3 64->64 56x56 b8", "torch", 1),
    "compile cold": ("compile MLP, cold", None, 1),
    "compile cached": ("compile MLP, from the cache", None, 1),
}


def inputs(workload: str) -> list[np.ndarray]:
    """The same arrays for every framework."""
    r = np.random.default_rng(0)
    kind, _, size = workload.partition(" ")
    if kind == "sgemm":
        return [r.random((int(size), int(size)), np.float32) for _ in range(2)]
    if kind == "elementwise":
        return [r.standard_normal(int(size), np.float32)]
    if kind == "softmax":
        return [r.standard_normal((4096, 1024), np.float32)]
    if kind == "layer":
        return [r.standard_normal((4096, 1024), np.float32), r.random(1024, np.float32), r.random(1024, np.float32)]
    if kind == "mlp":
        return [r.standard_normal((int(size), 784), np.float32)]
    return [r.standard_normal((8, 64, 56, 56), np.float32), r.standard_normal((64, 64, 3, 3), np.float32)]


def mlc_setup(workload: str):
    import mlc
    kind, _, size = workload.partition(" ")
    if kind == "compile":
        module = mlc.parse(MLP)
        mlc.compile(module)  # fills the cache (and loads the compiler)
        return lambda: mlc.compile(module, cache=(size == "cached"))
    text = {"sgemm": SGEMM, "elementwise": ELEMENTWISE}.get(kind, "").format(n=size) or \
        {"softmax": SOFTMAX, "layer": LAYER_NORM, "mlp": MLP, "conv": CONV}[kind]
    f, args = mlc.compile(mlc.parse(text))["forward" if kind == "mlp" else "f"], inputs(workload)
    return lambda: f(*args)


def numpy_setup(workload: str):
    kind = workload.split()[0]
    if kind == "sgemm":
        a, b = inputs(workload)
        return lambda: a @ b
    (x,) = inputs(workload)
    if kind == "elementwise":
        return lambda: np.maximum(x * np.float32(0.5) + np.float32(1), 0) * np.tanh(x)

    def softmax():
        e = np.exp(x - x.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    return softmax


def torch_setup(workload: str):
    import torch
    torch.set_num_threads(2)
    args = [torch.from_numpy(a) for a in inputs(workload)]
    F = torch.nn.functional
    kind = workload.split()[0]
    if kind == "layer":
        return lambda: F.layer_norm(args[0], (1024,), args[1], args[2])
    if kind == "conv":
        return lambda: F.conv2d(*args, padding=1)
    net = torch.nn.Sequential(torch.nn.Linear(784, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024), torch.nn.ReLU(),
                              torch.nn.Linear(1024, 10, bias=False))

    def forward():
        with torch.no_grad():
            return net(*args)
    return forward


def worker(framework: str, workload: str):
    fn = {"mlc": mlc_setup, "numpy": numpy_setup, "torch": torch_setup}[framework](workload)
    fn()  # warm up
    return harness.timer(fn)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller problems, fewer rounds")
    ap.add_argument("--rounds", type=int, help="turns per framework (the best rep counts); 5, or 3 with --quick")
    ap.add_argument("--only", nargs="+", choices=list(WORKLOADS), metavar="WORKLOAD", help="just these workloads ('mlp 1', ...)")
    harness.add_worker_arguments(ap)
    args = ap.parse_args()
    if args.worker:
        return harness.serve(args.worker[0], lambda: worker(*args.worker), args.repeat)
    rounds = args.rounds or (3 if args.quick else 5)
    chosen = ["sgemm 256", "sgemm 512"] + ([] if args.quick else ["sgemm 1024"])
    chosen += ["elementwise 1048576" if args.quick else "elementwise 16777216", "softmax", "layer norm", "mlp 256", "mlp 32", "mlp 1"]
    chosen += ([] if args.quick else ["conv"]) + ["compile cold", "compile cached"]
    chosen = args.only or chosen
    print(harness.load())
    results, rows = [], []
    for workload in chosen:
        name, peer, repeat = WORKLOADS[workload]
        res = harness.compare(__file__, workload, ["mlc"] + ([peer] if peer else []), rounds, repeat)
        results.append(res)
        ours, theirs = res.times["mlc"], res.times.get(peer)
        note = ""
        if workload.startswith("sgemm"):
            flops = 2 * int(workload.split()[1]) ** 3
            note = f"{flops / ours / 1e9:.1f} vs {flops / theirs / 1e9:.1f} GFLOP/s"
        rows.append((name, ours, theirs, peer or "", note))
    harness.print_table(rows)
    harness.print_sanity(results, {w: WORKLOADS[w][0] for w in chosen})
    print(harness.load())


if __name__ == "__main__":
    main()
