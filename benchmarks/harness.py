"""Side-by-side timing with every framework in its own process.

Thread pools sharing one process slow each other badly (OpenBLAS, torch's OpenMP and onnxruntime's
pools spin while waiting for work: numpy's SGEMM 256 ran 2.1 GFLOP/s after `import torch`, 160 alone).
So a benchmark script doubles as its own worker:

    python benchmarks/X.py --worker FRAMEWORK WORKLOAD --repeat N

sets the workload up (imports, builds, compiles, warms up) in a fresh process that imports only its
own framework, prints "ready", then answers each "go" line on stdin with a JSON list of N timed reps
(seconds per call); extra arguments given to `compare` are passed on to the workers. `compare` keeps
one such worker per framework alive for a workload and gives them turns, round after round, each
worker's figure its best rep; then it measures every peer again in a fresh worker alone, so the report
can show that taking turns did not change the peer's figure.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRAMEWORK_MODULES = ("mlc", "torch", "onnxruntime")  # numpy is everyone's
SETTLE = 0.2  # seconds between turns: OpenBLAS threads spin ~0.1 s and OpenMP ones up to 0.2 s after work


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--worker", nargs=2, metavar=("FRAMEWORK", "WORKLOAD"), help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=1, help=argparse.SUPPRESS)


def timer(fn: Callable, calls: int = 1) -> Callable[[], float]:
    """A rep of `calls` calls of fn, returning the seconds per call."""
    def rep():
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t0) / calls
    return rep


def serve(framework: str, setup: Callable[[], Callable[[], float]], repeat: int) -> None:
    """The worker's side: setup() warms up and returns a rep (see `timer`); each "go" is answered with
    `repeat` reps' times. Anything the libraries print goes to stderr."""
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    rep = setup()
    foreign = [m for m in FRAMEWORK_MODULES if m != framework and m in sys.modules]
    assert not foreign, f"the {framework} worker imported {foreign}"
    print('"ready"', file=out, flush=True)
    for _ in sys.stdin:
        print(json.dumps([rep() for _ in range(repeat)]), file=out, flush=True)


class Worker:
    """One `--worker` process of `script`, driven over a pipe."""

    def __init__(self, script: str, framework: str, workload: str, repeat: int, args: list[str]):
        self.name = f"{framework} {workload}"
        self.stderr = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen([sys.executable, script, "--worker", framework, workload, "--repeat", str(repeat), *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True, cwd=ROOT)

    def reply(self):
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.stderr.seek(0)
            raise RuntimeError(f"worker {self.name!r} exited with {self.proc.returncode}:\n{self.stderr.read()[-3000:]}")
        return json.loads(line)

    def go(self) -> list[float]:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return self.reply()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()
        self.stderr.close()


@dataclass
class Result:
    workload: str
    times: dict[str, float]  # framework -> best seconds per call, the frameworks taking turns
    alone: dict[str, float] = field(default_factory=dict)  # peer -> the same, measured alone


def compare(script: str, workload: str, frameworks: list[str], rounds: int, repeat: int = 1, alone: bool = True,
            args: list[str] = ()) -> Result:
    """Best time per call of `workload` under each framework, one worker process each, taking turns for
    `rounds` rounds of `repeat` reps (the order rotating each round); then, if `alone`, each peer (every
    framework after the first) again in a fresh worker with nothing else running."""
    workers = {fw: Worker(script, fw, workload, repeat, args) for fw in frameworks}  # (they set up at once)
    try:
        for w in workers.values():
            w.reply()  # "ready"
        best = {fw: float("inf") for fw in frameworks}
        for r in range(rounds):
            for fw in frameworks[r % len(frameworks):] + frameworks[:r % len(frameworks)]:
                time.sleep(SETTLE)
                best[fw] = min(best[fw], *workers[fw].go())
    except BaseException:
        for w in workers.values():
            w.proc.kill()
        raise
    finally:
        for w in workers.values():
            w.close()
    result = Result(workload, best)
    if alone and len(frameworks) > 1:
        for fw in frameworks[1:]:
            result.alone[fw] = compare(script, workload, [fw], rounds, repeat, args=args).times[fw]
    return result


def print_table(rows: list[tuple], title: str = "benchmark") -> None:
    """rows of (name, mlc seconds, peer seconds or None, peer, note); ratio = peer / mlc, > 1: mlc faster."""
    width = max(len(title), *(len(r[0]) for r in rows))
    print(f"{title:<{width}} {'mlc (ms)':>10} {'peer (ms)':>10}  {'peer':<11} {'peer/mlc':>8}  notes")
    for name, ours, theirs, peer, note in rows:
        peer_ms, ratio = (f"{theirs * 1e3:.2f}", f"{theirs / ours:.2f}x") if theirs else ("", "")
        print(f"{name:<{width}} {ours * 1e3:>10.2f} {peer_ms:>10}  {peer:<11} {ratio:>8}  {note}".rstrip())


def print_sanity(results: list[Result], names: dict[str, str] | None = None) -> None:
    """Each peer's figure taking turns against its figure alone: they should agree within noise."""
    print("sanity: each peer taking turns vs alone in a fresh process (ms)")
    for res in results:
        for fw, t in res.alone.items():
            shared = res.times[fw]
            print(f"  {(names or {}).get(res.workload, res.workload)} [{fw}]: {shared * 1e3:.2f} taking turns, "
                  f"{t * 1e3:.2f} alone ({shared / t:.2f}x)")


def load() -> str:
    return "load average {:.2f} {:.2f} {:.2f} on {} cores".format(*os.getloadavg(), os.cpu_count())
