"""A training step of an MLP 784-1024-1024-10 (ReLU, cross-entropy, Adam) at batch 256: mlc's compiled
`train_step` against torch eager on the CPU, measured side by side; prints one table.

    python benchmarks/train.py [--steps N]

Time: each framework trains in a process of its own (benchmarks/harness.py: thread pools sharing a
process slow each other), the two taking turns for 5 rounds of --steps steps; a figure is the best
round's time per step, and torch is measured once more alone as a check. Ratio > 1 means mlc is
faster. Memory: each framework trains in a fresh subprocess that reports the growth of its peak
resident set over its state (weights, data; torch's optimiser state appears at its first step, mlc's
is allocated up front) during the steps, and mlc's own estimate of the step's peak intermediate buffers.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

import harness

MODEL = """module @mlp attributes {seed = 0} {
  mlc.global @w1 : tensor<784x1024xf32> {init = "he_uniform", trainable}
  mlc.global @b1 : tensor<1024xf32> {init = "zeros", trainable}
  mlc.global @w2 : tensor<1024x1024xf32> {init = "he_uniform", trainable}
  mlc.global @b2 : tensor<1024xf32> {init = "zeros", trainable}
  mlc.global @w3 : tensor<1024x10xf32> {init = "glorot_uniform", trainable}
  mlc.global @b3 : tensor<10xf32> {init = "zeros", trainable}
  func.func @loss(%x: tensor<?x784xf32>, %labels: tensor<?xi64>) -> tensor<f32> {
    %w1 = mlc.global_load @w1 : tensor<784x1024xf32>
    %b1 = mlc.global_load @b1 : tensor<1024xf32>
    %w2 = mlc.global_load @w2 : tensor<1024x1024xf32>
    %b2 = mlc.global_load @b2 : tensor<1024xf32>
    %w3 = mlc.global_load @w3 : tensor<1024x10xf32>
    %b3 = mlc.global_load @b3 : tensor<10xf32>
    %z1 = mlc.matmul %x, %w1 : (tensor<?x784xf32>, tensor<784x1024xf32>) -> tensor<?x1024xf32>
    %s1 = mlc.add %z1, %b1 : (tensor<?x1024xf32>, tensor<1024xf32>) -> tensor<?x1024xf32>
    %h1 = mlc.relu %s1
    %z2 = mlc.matmul %h1, %w2 : (tensor<?x1024xf32>, tensor<1024x1024xf32>) -> tensor<?x1024xf32>
    %s2 = mlc.add %z2, %b2 : (tensor<?x1024xf32>, tensor<1024xf32>) -> tensor<?x1024xf32>
    %h2 = mlc.relu %s2
    %z3 = mlc.matmul %h2, %w3 : (tensor<?x1024xf32>, tensor<1024x10xf32>) -> tensor<?x10xf32>
    %logits = mlc.add %z3, %b3 : (tensor<?x10xf32>, tensor<10xf32>) -> tensor<?x10xf32>
    %l = mlc.cross_entropy %logits, %labels : (tensor<?x10xf32>, tensor<?xi64>) -> tensor<f32>
    return %l : tensor<f32>
  }
}"""
BATCH = 256


def batches(count):
    r = np.random.default_rng(0)
    return [(r.random((BATCH, 784), np.float32), r.integers(0, 10, BATCH)) for _ in range(count)]


def mlc_step():
    import mlc
    m = mlc.run_passes(mlc.parse(MODEL), "train_step{loss=@loss optimizer=adam lr=1e-3}")
    t0 = time.perf_counter()
    exe = mlc.compile(m)
    compile_s = time.perf_counter() - t0
    step = exe["train_step"]
    return (lambda x, y: float(step(x, y))), compile_s, m


def torch_step():
    import torch
    torch.set_num_threads(2)
    model = torch.nn.Sequential(torch.nn.Linear(784, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024), torch.nn.ReLU(),
                                torch.nn.Linear(1024, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step(x, y):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
        loss.backward()
        opt.step()
        return loss.item()
    return step


def worker(framework: str, steps: int):
    """A rep: `steps` training steps of `framework`, in seconds per step (after two to warm up: caches,
    allocator, optimiser state)."""
    data = batches(steps)
    step = mlc_step()[0] if framework == "mlc" else torch_step()
    for x, y in data[:2]:
        step(x, y)

    def rep():
        t0 = time.perf_counter()
        for x, y in data:
            step(x, y)
        return (time.perf_counter() - t0) / len(data)
    return rep


def memory_probe(which: str, steps: int) -> dict:
    """Run in a fresh process (mlc's code comes from the cache the parent filled): resident MiB once
    the state exists (weights, optimiser state, data), and the peak over the first steps."""
    data = batches(steps)
    step = mlc_step()[0] if which == "mlc" else torch_step()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to what is resident now
    before = _status_mib("VmRSS")
    for x, y in data:
        step(x, y)
    return {"before": before, "peak": _status_mib("VmHWM")}


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--probe", choices=["mlc", "torch"], help=argparse.SUPPRESS)
    harness.add_worker_arguments(ap)
    args = ap.parse_args()
    if args.probe:
        print(json.dumps(memory_probe(args.probe, args.steps)))
        return
    if args.worker:
        return harness.serve(args.worker[0], lambda: worker(args.worker[0], args.steps), args.repeat)
    os.environ.setdefault("MLC_CACHE_DIR", tempfile.mkdtemp(prefix="mlc-bench-cache-"))
    from mlc.passes.memory import peak_intermediate_bytes
    from mlc.compiler import lower
    _, compile_s, module = mlc_step()  # (fills the cache the workers compile from)
    result = harness.compare(__file__, "train step", ["mlc", "torch"], rounds=5, args=["--steps", str(args.steps)])
    t_mlc, t_torch = result.times["mlc"], result.times["torch"]
    probes = {}
    for which in ("mlc", "torch"):
        out = subprocess.run([sys.executable, __file__, "--probe", which, "--steps", str(args.steps)], capture_output=True,
                             text=True, check=True, env={**os.environ, "MLC_NUM_THREADS": "2"})
        probes[which] = json.loads(out.stdout)
    estimate = peak_intermediate_bytes(lower(module).functions["train_step"], BATCH) / 2**20
    print(f"MLP 784-1024-1024-10, Adam, batch {BATCH}, {args.steps} steps per turn, best of 5 turns each, in processes of their own")
    print(f"{'':<28}{'mlc':>12}{'torch':>12}{'torch/mlc':>12}")
    print(f"{'train step (ms)':<28}{t_mlc * 1e3:>12.2f}{t_torch * 1e3:>12.2f}{t_torch / t_mlc:>11.2f}x")
    grow = {k: v["peak"] - v["before"] for k, v in probes.items()}
    print(f"{'peak RSS over the state (MiB)':<28}{grow['mlc']:>12.1f}{grow['torch']:>12.1f}")
    print(f"mlc: compile {compile_s:.1f} s; estimated peak intermediate buffers of @train_step {estimate:.1f} MiB")
    print(f"sanity: torch {t_torch * 1e3:.2f} ms taking turns, {result.alone['torch'] * 1e3:.2f} ms alone "
          f"({t_torch / result.alone['torch']:.2f}x)")


if __name__ == "__main__":
    main()
