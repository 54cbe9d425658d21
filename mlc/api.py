"""The IR-level Python API (SPEC §6)."""
from __future__ import annotations

import os

from mlc.ir.core import Module
from mlc.ir.diagnostics import DiagnosticError, Diagnostics, Location, error
from mlc.ir.parser import parse_module
from mlc.ir.verifier import verify


def parse(text: str, filename: str | None = None) -> Module:
    """Parse and verify textual IR; raises mlc.DiagnosticError listing every problem."""
    diags = Diagnostics()
    return verify(parse_module(text, filename or "<string>", diags), diags)


def load(path: str | os.PathLike) -> Module:
    """Read, parse and verify an .ir file."""
    return parse(read_source(path), str(path))


def read_source(path) -> str:
    path = str(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise error(Location(path, 0, 0), "no such file") from None
    except IsADirectoryError:
        raise error(Location(path, 0, 0), "is a directory, not an .ir file") from None
    except OSError as e:
        raise error(Location(path, 0, 0), f"cannot read: {e.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise error(Location(path, line, col), "not UTF-8 text (is this a binary file?)") from None


def interpret(module: Module, entry: str, *args, **kwargs):
    """Run `@entry` on the numpy reference interpreter; returns one array or a tuple."""
    from mlc.ir.interpreter import Interpreter
    return Interpreter(module).call_public(entry, args, **kwargs)


def run_passes(module: Module, pipeline: str, **kwargs) -> Module:
    """Run a pass pipeline such as "inline,canonicalize,cse" (in place); returns the module."""
    from mlc.passes.manager import PassManager
    PassManager.parse(pipeline, **kwargs).run(module)
    return module


def compile(module: Module, target: str = "cpu", cache: bool = True, arch: str = "sm_90", precision: str | None = None,
            profile: bool | None = None):
    """Compile every public function to native code; `exe["f"](*arrays)` runs one. Compiled code is
    kept in the on-disk cache (MLC_CACHE_DIR) unless cache=False. target="cuda" compiles the kernels
    to PTX for `arch` (sm_80, sm_90, sm_90a) and runs them on the first GPU through pycuda.
    precision="bf16" (or "f16") runs products and convolutions in half precision, f32 elsewhere.
    profile=True times each kernel (`exe.profile()`; None: as MLC_PROFILE says)."""
    from mlc.compiler import compile as build
    return build(module, target, cache, arch=arch, precision=precision, profile=profile)


def load_executable(path):
    """Load an artifact written by `exe.save(path)` or `mlc compile model.ir -o model.mlcz`."""
    from mlc.compiler import rebuild
    from mlc.runtime.artifact import load_executable as load_artifact
    return load_artifact(path, rebuild=rebuild)
