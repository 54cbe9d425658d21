"""Data-parallel training steps on 1 and 2 processes (MPI), for the digits MLP and CNN; prints one table.

    python benchmarks/dist.py [--batch-size 64] [--steps 30] [--processes 1 2] [--models mlp cnn wide-mlp]
                              [--bucket-mb 1 0] [--repeat 3] [--no-sync-batch-norm]

For each model and number of processes N it starts `mpiexec -n N` on this script's worker, which
compiles the training step as `mlc train` does (with `data-parallel` when N > 1), gives every
process its share of a global batch of digits (batch-size / N examples), runs a few steps to warm up
and times the rest. Reported: steps per second, scaling efficiency (steps/s on N processes over N
times steps/s on one: 100% is a linear speed-up at the same global batch), the bytes all-reduced per
step (the operands of the step's `mlc.all_reduce`s: gradients, batch-norm statistics, the loss and
the example count) and the time the processes spent blocked in them, from which an effective bandwidth
follows. With several --bucket-mb, each is measured (0: one bucket after the backward pass; otherwise
buckets begun as the backward pass computes them, waited for by the update: the overlap).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODELS = {"mlp": ROOT / "examples" / "digits_mlp.ir", "cnn": ROOT / "examples" / "digits_cnn.ir",
          "wide-mlp": ROOT / "examples" / "digits_mlp.ir"}  # (hidden layers of 1024: 4.4 MB of gradients)


def model_text(model: str) -> str:
    text = MODELS[model].read_text()
    if model == "wide-mlp":
        for small in ("256", "128"):
            text = text.replace(f"x{small}x", "x1024x").replace(f"<{small}x", "<1024x").replace(f"x{small}xf", "x1024xf") \
                .replace(f"<{small}xf", "<1024xf")
    return text


def mpiexec() -> str | None:
    beside = pathlib.Path(sys.executable).parent / "mpiexec"  # the mpich wheel's
    return str(beside) if beside.exists() else shutil.which("mpiexec")


def run(args, timeout: float) -> tuple[int | None, str]:
    """(exit status, or None on timeout, and the output); on timeout mpiexec and its ranks are killed."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return None, proc.communicate()[0]
    return proc.returncode, out


class TimedCommunicator:
    """Another communicator's collectives, timed."""

    def __init__(self, inner):
        self.inner, self.rank, self.size = inner, inner.rank, inner.size
        self.seconds, self.calls = 0.0, 0

    def allreduce(self, array, reduction):
        t0 = time.perf_counter()
        result = self.inner.allreduce(array, reduction)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return result

    def iallreduce(self, buffer, reduction):
        t0 = time.perf_counter()
        pending = TimedPending(self, self.inner.iallreduce(buffer, reduction))
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return pending

    def bcast(self, array, root):
        return self.inner.bcast(array, root)


class TimedPending:
    """An all-reduce in flight: the time its wait blocks counts."""

    def __init__(self, timer, inner):
        self.timer, self.inner = timer, inner

    def test(self):
        return self.inner.test()

    def wait(self):
        t0 = time.perf_counter()
        self.inner.wait()
        self.timer.seconds += time.perf_counter() - t0


def worker(model: str, batch_size: int, steps: int, warmup: int, sync_batch_norm: bool = True, bucket_mb: float = 1.0) -> None:
    """One process of the measurement: prints a JSON line (rank 0)."""
    import mlc
    from mlc.api import run_passes
    from mlc.compiler import compile
    from mlc.ir import collectives
    from mlc.ir.attributes import StringAttr
    from mlc.train import Options, broadcast_globals, join_world, load_data, share, train_step_pipeline

    comm = join_world()
    timed = TimedCommunicator(comm)
    module = mlc.parse(model_text(model))
    loss = module.functions["loss"]
    data = load_data("digits", loss, "train")
    n = len(next(iter(data.values())))
    o = Options(batch_size=batch_size, lr=3e-3, sync_batch_norm=sync_batch_norm, bucket_mb=bucket_mb)
    run_passes(module, train_step_pipeline(o, -(-n // batch_size), data_parallel=comm.size > 1))
    loss.attributes["sym_visibility"] = StringAttr("private")
    all_reduces = [op for op in module.functions["train_step"].body.walk() if op.name == "mlc.all_reduce"]
    reduced = sum(math.prod(op.operands[0].type.shape) * op.operands[0].type.element.np_dtype.itemsize for op in all_reduces)
    t0 = time.perf_counter()
    exe = compile(module, "cpu")
    compile_s = time.perf_counter() - t0
    broadcast_globals(comm, exe)
    step = exe["train_step"]
    order = np.random.default_rng(0).permutation(n)
    batches = [share(order[(b * batch_size) % (n - batch_size):][:batch_size], comm) for b in range(warmup + steps)]
    with collectives.using(timed if comm.size > 1 else comm):
        for idx in batches[:warmup]:
            step(*(a[idx] for a in data.values()))
        timed.seconds = 0.0
        t0 = time.perf_counter()
        for idx in batches[warmup:]:
            step(*(a[idx] for a in data.values()))
        elapsed = time.perf_counter() - t0
    # the slowest process sets the pace
    elapsed = float(comm.allreduce(np.array([elapsed]), "max")[0])
    if comm.rank == 0:
        print(json.dumps({"model": model, "processes": comm.size, "batch": batch_size, "steps_per_s": steps / elapsed,
                          "bytes": reduced, "all_reduces": len(all_reduces), "allreduce_s": timed.seconds / steps, "compile_s": compile_s}), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-size", type=int, default=64, help="the global batch (default 64)")
    p.add_argument("--steps", type=int, default=30, help="timed steps (default 30)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeat", type=int, default=1, help="measure each configuration this many times, in turns; report the best")
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=list(MODELS))
    p.add_argument("--timeout", type=float, default=300, help="seconds per measurement before it is killed")
    p.add_argument("--sync-batch-norm", action=argparse.BooleanOptionalAction, default=True,
                   help="batch norm with the global batch's statistics (default), or each process's own")
    p.add_argument("--bucket-mb", type=float, nargs="+", default=[1.0],
                   help="gradient bucket sizes to compare (megabytes; 0: one bucket; default 1, as mlc train's)")
    p.add_argument("--worker", choices=list(MODELS), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker(a.worker, a.batch_size, a.steps, a.warmup, a.sync_batch_norm, a.bucket_mb[0])
        return 0
    launcher = mpiexec()
    if launcher is None:
        print("no mpiexec (pip install 'mlc[dist]')", file=sys.stderr)
        return 1
    results = {}
    for model, _, n in ((m, r, n) for m in a.models for r in range(a.repeat) for n in a.processes):  # (turns alternate)
        for bucket_mb in a.bucket_mb if n > 1 else a.bucket_mb[:1]:  # (one process reduces nothing)
            code, out = run([launcher, "-n", str(n), sys.executable, "-m", "mpi4py", __file__, "--worker", model,
                             "--batch-size", str(a.batch_size), "--steps", str(a.steps), "--warmup", str(a.warmup),
                             "--bucket-mb", str(bucket_mb),
                             "--sync-batch-norm" if a.sync_batch_norm else "--no-sync-batch-norm"], a.timeout)
            line = next((s for s in out.splitlines() if s.startswith("{")), None)
            if code != 0 or line is None:
                print(f"{model} on {n} process(es) failed (exit status {code}; None: timed out):\n{out[-2000:]}", file=sys.stderr)
                continue
            r = json.loads(line)
            best = results.get((model, n, bucket_mb))
            if best is None or r["steps_per_s"] > best["steps_per_s"]:
                results[model, n, bucket_mb] = r
    print(f"global batch {a.batch_size}, {a.steps} timed steps, best of {a.repeat}, {os.cpu_count()} CPUs")
    print(f"{'model':6} {'procs':>5} {'all-reduces':>14} {'steps/s':>9} {'examples/s':>11} {'efficiency':>10} {'all-reduced/step':>17} "
          f"{'all-reduce ms/step':>19} {'bandwidth':>12}")
    for (model, n, bucket_mb), r in results.items():
        base = next((r1 for (m1, n1, _), r1 in results.items() if (m1, n1) == (model, 1)), None)
        efficiency = f"{100 * r['steps_per_s'] / (n * base['steps_per_s']):.0f}%" if base else "-"
        bandwidth = f"{r['bytes'] / r['allreduce_s'] / 1e6:.0f} MB/s" if r["allreduce_s"] > 0 else "-"
        buckets = f"{r['all_reduces']} ({bucket_mb:g} MB)" if n > 1 else "-"
        print(f"{model:6} {n:5d} {buckets:>14} {r['steps_per_s']:9.1f} {r['steps_per_s'] * a.batch_size:11.0f} {efficiency:>10} "
              f"{r['bytes'] / 1e3:14.1f} kB {1e3 * r['allreduce_s']:19.2f} {bandwidth:>12}")
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
