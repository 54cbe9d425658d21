"""mlc: an MLIR-style compiler for neural networks.

    m = mlc.parse(text)                    # parse and verify textual IR
    mlc.interpret(m, "forward", x)         # run the numpy reference interpreter
    mlc.run_passes(m, "inline,canonicalize,cse")
"""
from __future__ import annotations

__version__ = "0.1.0"

from .api import DiagnosticError, Module, compile, interpret, load, load_executable, parse, run_passes, verify  # noqa: E402,F401

__all__ = ["parse", "verify", "load", "interpret", "compile", "load_executable", "run_passes", "Module", "DiagnosticError", "__version__"]
