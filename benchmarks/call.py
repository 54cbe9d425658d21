"""The cost of one call at batch 1, mlc against torch eager: what Python spends around a tiny kernel.

    python benchmarks/call.py [--calls 2000] [--profile]

Each framework runs in its own subprocess (thread pools sharing a process slow each other); each
figure is the best per-call time over rounds of `--calls` calls, in microseconds.

    exe call     exe["forward"](x) on examples/mlp.ir (64-32-10), x of shape (1, 64)
    exe kernel   its native code called through ctypes with slots prebuilt once: the floor
    nn module    an mlc.nn MLP 784-1024-1024-10 (compiled on its first call), at batch 1
    nn kernel    its native code likewise
    small nn     an mlc.nn MLP 8-8-8-4 at batch 1 (the same Python, almost no arithmetic), and its kernel
    torch eager  the 784-1024-1024-10 MLP in torch, under torch.no_grad()

The MLP's arithmetic takes milliseconds here, so its calls are timed in rounds of calls / 10.

--profile prints a cProfile of the mlc calls (in this process) instead of the table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def per_call(fn, calls: int, rounds: int = 7) -> float:
    """The best mean time of one call over `rounds` rounds of `calls` calls, in microseconds."""
    for _ in range(min(calls, 200)):
        fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e6


def mlp_weights():
    rng = np.random.default_rng(0)
    sizes = [(784, 1024), (1024, 1024), (1024, 10)]
    return [(rng.standard_normal((o, i)).astype(np.float32) / np.sqrt(i), rng.standard_normal(o).astype(np.float32) * 0.1)
            for i, o in sizes]


def mlc_exe():
    import mlc
    exe = mlc.compile(mlc.load(os.path.join(ROOT, "examples", "mlp.ir")))
    return exe["forward"], np.ones((1, 64), np.float32)


def mlc_module(small: bool = False):
    import mlc.nn as nn
    if small:
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
        return model.eval(), np.ones((1, 8), np.float32)
    model = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
    model.load_state_dict({f"{k}.{n}": v for k, (w, b) in zip((0, 2, 4), mlp_weights()) for n, v in (("weight", w), ("bias", b))})
    model.eval()
    return model, np.random.default_rng(1).standard_normal((1, 784)).astype(np.float32)


def kernel_only(f, arrays):
    """f's native code called through ctypes with slots prebuilt once: the floor under a call (the
    results are freed at once)."""
    import ctypes

    from mlc.runtime.executable import _libc
    n_in, n_out = len(arrays), len(f.result_types)
    dims = [np.array(a.shape or [0], np.int64) for a in arrays]
    out_data = (ctypes.c_void_p * n_out)()
    out_dims = [np.zeros(max(t.rank, 1), np.int64) for t in f.result_types]
    status = np.array([0, 1 << 40, 0], np.int64)
    slots = (ctypes.c_void_p * (2 + 2 * n_in + 2 * n_out))()
    slots[0] = ctypes.addressof(f.exe._globals_table)
    for k, (a, d) in enumerate(zip(arrays, dims)):
        slots[1 + 2 * k], slots[2 + 2 * k] = a.ctypes.data, d.ctypes.data
    for r in range(n_out):
        slots[1 + 2 * n_in + 2 * r] = ctypes.addressof(out_data) + 8 * r
        slots[2 + 2 * n_in + 2 * r] = out_dims[r].ctypes.data
    slots[-1] = status.ctypes.data
    address, c_function, free = ctypes.addressof(slots), f.c_function, _libc.free
    keep = (arrays, dims, out_dims, status, slots)  # (the slots hold their addresses)

    def call():
        c_function(address)
        for r in range(n_out):
            free(out_data[r])
    call.keep = keep
    return call


def module_kernel(model, x):
    """kernel_only for the native function a compiled nn module's call runs, on its arguments."""
    (jitted,) = model._compiled.values()
    (compiled,) = jitted.cache.values()
    return kernel_only(compiled.run, [x] + [e.source.data for e in compiled.traced.extra])


def run_mlc(calls: int) -> dict:
    f, x = mlc_exe()
    model, x784 = mlc_module()
    small, x8 = mlc_module(small=True)
    model(x784), small(x8)
    big_calls = max(calls // 10, 10)
    return {"exe call": per_call(lambda: f(x), calls), "exe kernel": per_call(kernel_only(f, [x]), calls),
            "nn module": per_call(lambda: model(x784), big_calls), "nn kernel": per_call(module_kernel(model, x784), big_calls),
            "small nn": per_call(lambda: small(x8), calls), "small kernel": per_call(module_kernel(small, x8), calls)}


def run_torch(calls: int) -> dict:
    import torch
    torch.set_num_threads(2)
    net = torch.nn.Sequential(torch.nn.Linear(784, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024), torch.nn.ReLU(),
                              torch.nn.Linear(1024, 10))
    with torch.no_grad():
        for layer, (w, b) in zip(net[::2], mlp_weights()):
            layer.weight.copy_(torch.from_numpy(w))
            layer.bias.copy_(torch.from_numpy(b))
    calls = max(calls // 10, 10)
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((1, 784)).astype(np.float32))

    def forward():
        with torch.no_grad():
            return net(x)
    return {"torch eager": per_call(forward, calls)}


def profile(calls: int):
    import cProfile
    import pstats
    f, x = mlc_exe()
    model, x8 = mlc_module(small=True)
    for name, fn in (("exe call", lambda: f(x)), ("small nn", lambda: model(x8))):
        fn()
        p = cProfile.Profile()
        p.enable()
        for _ in range(calls):
            fn()
        p.disable()
        print(f"--- {name}: {calls} calls")
        pstats.Stats(p).sort_stats("tottime").print_stats(15)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--child", choices=["mlc", "torch"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.profile:
        return profile(args.calls)
    if args.child:
        print(json.dumps(run_mlc(args.calls) if args.child == "mlc" else run_torch(args.calls)))
        return
    results = {}
    for child in ("mlc", "torch"):
        out = subprocess.run([sys.executable, __file__, "--child", child, "--calls", str(args.calls)],
                             capture_output=True, text=True, check=True, cwd=ROOT)
        results.update(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"per-call time at batch 1, best of 7 rounds of {args.calls} calls (load {os.getloadavg()[0]:.2f})")
    for name in ("exe call", "exe kernel", "nn module", "nn kernel", "small nn", "small kernel", "torch eager"):
        print(f"  {name:12} {results[name]:9.1f} us")
    print(f"  Python around the call: exe {results['exe call'] - results['exe kernel']:.1f} us, "
          f"small nn {results['small nn'] - results['small kernel']:.1f} us")
    print(f"  nn module / torch eager: {results['nn module'] / results['torch eager']:.2f}x")


if __name__ == "__main__":
    main()
