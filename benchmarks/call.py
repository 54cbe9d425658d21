"""The cost of one call at batch 1, mlc against torch eager: what Python spends around a tiny kernel.

    python benchmarks/call.py [--calls 2000] [--profile]

Each framework and workload runs in its own process (thread pools sharing a process slow each other;
see benchmarks/harness.py), the MLP's mlc and torch processes taking turns; each figure is the best
per-call time over 7 rounds of `--calls` calls, in microseconds.

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
import os

import numpy as np

import harness

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def mlc_setup(workload: str):
    if workload.startswith("exe"):
        f, x = mlc_exe()
        return (lambda: f(x)) if workload == "exe call" else kernel_only(f, [x])
    model, x = mlc_module(small=workload.startswith("small"))
    model(x)
    return (lambda: model(x)) if workload in ("nn module", "small nn") else module_kernel(model, x)


def torch_setup():
    import torch
    torch.set_num_threads(2)
    net = torch.nn.Sequential(torch.nn.Linear(784, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024), torch.nn.ReLU(),
                              torch.nn.Linear(1024, 10))
    with torch.no_grad():
        for layer, (w, b) in zip(net[::2], mlp_weights()):
            layer.weight.copy_(torch.from_numpy(w))
            layer.bias.copy_(torch.from_numpy(b))
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((1, 784)).astype(np.float32))

    def forward():
        with torch.no_grad():
            return net(x)
    return forward


def worker(framework: str, workload: str, calls: int):
    """A rep of `calls` calls (a tenth as many of the big MLP), after a warm-up."""
    fn = mlc_setup(workload) if framework == "mlc" else torch_setup()
    calls = max(calls // 10, 10) if workload in ("nn module", "nn kernel") else calls
    for _ in range(min(calls, 200)):
        fn()
    return harness.timer(fn, calls)


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
    harness.add_worker_arguments(parser)
    args = parser.parse_args()
    if args.profile:
        return profile(args.calls)
    if args.worker:
        return harness.serve(args.worker[0], lambda: worker(*args.worker, args.calls), args.repeat)
    extra = ["--calls", str(args.calls)]
    results = {name: harness.compare(__file__, name, ["mlc"], 1, 7, args=extra).times["mlc"]
               for name in ("exe call", "exe kernel", "nn kernel", "small nn", "small kernel")}
    mlp = harness.compare(__file__, "nn module", ["mlc", "torch"], 7, args=extra)
    results.update({"nn module": mlp.times["mlc"], "torch eager": mlp.times["torch"]})
    results = {name: t * 1e6 for name, t in results.items()}
    print(f"per-call time at batch 1, best of 7 rounds of {args.calls} calls (load {os.getloadavg()[0]:.2f})")
    for name in ("exe call", "exe kernel", "nn module", "nn kernel", "small nn", "small kernel", "torch eager"):
        print(f"  {name:12} {results[name]:9.1f} us")
    print(f"  Python around the call: exe {results['exe call'] - results['exe kernel']:.1f} us, "
          f"small nn {results['small nn'] - results['small kernel']:.1f} us")
    print(f"  nn module / torch eager: {results['nn module'] / results['torch eager']:.2f}x")
    harness.print_sanity([mlp], {"nn module": "784-1024-1024-10 MLP"})


if __name__ == "__main__":
    main()
