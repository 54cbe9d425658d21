"""Shared test helpers."""
import pathlib

import mlc

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.ir"))


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
