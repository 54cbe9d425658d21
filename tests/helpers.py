"""Shared test helpers."""
import os
import pathlib
import shutil
import signal
import subprocess
import sys

from hypothesis import settings

import mlc

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.ir"))

# MLC_FUZZ_EXAMPLES=N runs the differential fuzzer and the parser mutators on N programs each
FUZZ_EXAMPLES = int(os.environ.get("MLC_FUZZ_EXAMPLES") or 0)
at_fuzz_scale = settings(max_examples=FUZZ_EXAMPLES) if FUZZ_EXAMPLES else (lambda test: test)


def errors(text: str, filename: str = "t.ir"):
    """The diagnostics `mlc.parse` raises for text, as (line, col, message) triples."""
    try:
        mlc.parse(text, filename)
    except mlc.DiagnosticError as e:
        return [(d.line, d.column, d.message) for d in e.diagnostics]
    raise AssertionError("expected diagnostics, the text verified")


def func(body: str, args: str = "%x: tensor<2x3xf32>", results: str = "tensor<2x3xf32>") -> str:
    """Wrap op lines in a module with one function."""
    return f"module {{\n  func.func @f({args}) -> {results} {{\n{body}\n  }}\n}}\n"


def find_mpiexec() -> str | None:
    """The mpich wheel's mpiexec in this environment, else one on PATH."""
    beside = pathlib.Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


def run_session(args, cwd, timeout):
    """(exit status, or None on timeout; output) of args run in a session of its own: on timeout the
    whole session (mpiexec and its ranks) is killed."""
    proc = subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out
    return proc.returncode, out
