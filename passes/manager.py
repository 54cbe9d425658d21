"""Passes, the pass registry, pipeline strings and the pass manager.

A pipeline is text, as in `mlir-opt --pass-pipeline`: `inline,canonicalize{max-iterations=5},cse`
(options inside braces, separated by spaces or commas; a list value is bracketed, `wrt=[x,w]`). The manager verifies the module after every
pass (a failure names the pass), can print the IR after each pass and time them.
"""
from __future__ import annotations

import re
import sys
import time

from mlc.ir.core import Module
from mlc.ir.diagnostics import Diagnostic, DiagnosticError, Location, error
from mlc.ir.verifier import verify

PASSES: dict[str, type["Pass"]] = {}


class Pass:
    """A module pass. Subclasses set `name`, `summary` and `options` ({option: default})."""
    name = ""
    summary = ""
    options: dict = {}

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.name:
            PASSES[cls.name] = cls

    def __init__(self, **options):
        for key, value in options.items():
            if key not in self.options:
                known = ", ".join(self.options) or "none"
                raise PipelineError(f"pass '{self.name}' has no option '{key}' (options: {known})")
        self.values = {**self.options, **options}

    def option(self, key):
        return self.values[key]

    def run(self, module: Module) -> None:
        raise NotImplementedError

    def __str__(self):
        opts = " ".join(f"{k}={v}" for k, v in self.values.items() if v != self.options[k])
        return self.name + (f"{{{opts}}}" if opts else "")


class PipelineError(ValueError):
    pass


def _convert(default, text: str, key: str, pass_name: str):
    if isinstance(default, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise PipelineError(f"option '{key}' of pass '{pass_name}' takes true or false, got '{text}'")
    for kind in (int, float):
        if isinstance(default, kind):
            try:
                return kind(text)
            except ValueError:
                raise PipelineError(f"option '{key}' of pass '{pass_name}' takes a {kind.__name__}, got '{text}'") from None
    return text


_ITEM = re.compile(r"\s*([A-Za-z][\w\-]*)\s*(?:\{([^{}]*)\})?\s*(?:,|$)")


def parse_pipeline(text: str, _depth: int = 0, _forwarded: dict | None = None) -> list[Pass]:
    """`a,b{key=value other=1},c` -> pass instances; raises PipelineError with a readable reason. A
    named pipeline expands in place, and its options go to each of its passes that has that option:
    `cpu{vector-bytes=64}` sets lower-to-loops' vector width."""
    from . import load_passes
    from .pipelines import PIPELINES
    load_passes()
    if _depth > 8:
        raise PipelineError("named pipelines refer to each other in a cycle")
    forwarded = _forwarded or {}
    text = text.strip()
    if text.startswith("builtin.module(") and text.endswith(")"):
        text = text[len("builtin.module("):-1]
    passes, pos = [], 0
    while pos < len(text):
        m = _ITEM.match(text, pos)
        if not m or m.end() == pos:
            raise PipelineError(f"cannot parse the pipeline at column {pos + 1}: '{text[pos:]}'")
        name, opts = m.group(1), _options(m.group(2), m.group(1))
        pos = m.end()
        if name in PIPELINES:
            expanded = parse_pipeline(PIPELINES[name], _depth + 1, {**forwarded, **opts})
            unused = [key for key in opts if not any(key in p.options for p in expanded)]
            if unused:
                known = sorted({key for p in expanded for key in p.options})
                raise PipelineError(f"no pass of pipeline '{name}' has option '{unused[0]}' (options: {', '.join(known)})")
            passes += expanded
            continue
        cls = PASSES.get(name)
        if cls is None:
            raise PipelineError(f"unknown pass '{name}' (passes: {', '.join(sorted(PASSES))}; "
                                f"pipelines: {', '.join(sorted(PIPELINES))})")
        values = {key: value for key, value in forwarded.items() if key in cls.options}
        for key, value in opts.items():
            if key not in cls.options:
                known = ", ".join(cls.options) or "none"
                raise PipelineError(f"pass '{name}' has no option '{key}' (options: {known})")
            values[key] = value
        passes.append(cls(**{key: _convert(cls.options[key], value, key, name) for key, value in values.items()}))
    return passes


def _options(text: str | None, name: str) -> dict[str, str]:
    """`key=value other=1` (spaces or commas between; a [list, value] stays whole) -> {key: text}."""
    options = {}
    for item in re.findall(r"[^\s,\[]+(?:\[[^\]]*\])?", text or ""):
        key, eq, value = item.partition("=")
        if not eq:
            raise PipelineError(f"option '{item}' of '{name}' needs a value (key=value)")
        options[key.replace("_", "-")] = value
    return options


class PassManager:
    def __init__(self, passes, verify_each: bool = True, print_ir_after_all: bool = False,
                 timing: bool = False, out=None):
        self.passes = list(passes)
        self.verify_each = verify_each
        self.print_ir_after_all = print_ir_after_all
        self.timing = timing
        self.out = out
        self.times: list[tuple[str, float]] = []

    @classmethod
    def parse(cls, pipeline: str, **kwargs) -> "PassManager":
        return cls(parse_pipeline(pipeline), **kwargs)

    def run(self, module: Module) -> Module:
        out = self.out or sys.stderr
        for p in self.passes:
            start = time.perf_counter()
            try:
                p.run(module)
            except DiagnosticError:
                raise
            except RecursionError:
                raise error(module.loc, f"pass '{p.name}': the module is nested too deeply") from None
            self.times.append((str(p), time.perf_counter() - start))
            if self.verify_each:
                try:
                    verify(module)
                except DiagnosticError as e:
                    raise DiagnosticError([Diagnostic(d.loc, f"after pass '{p}': {d.message} (this is a bug in the pass; please report it)",
                                                      source_line=d.source_line) for d in e.diagnostics]) from None
            if self.print_ir_after_all:
                print(f"// -----// IR Dump After {p} //----- //\n{module}", file=out)
        if self.timing:
            print(self.timing_report(), file=out)
        return module

    def timing_report(self) -> str:
        total = sum(t for _, t in self.times) or 1e-12
        width = max([len(n) for n, _ in self.times] + [5])
        lines = ["===- Pass execution timing report -===", f"  {'pass':<{width}}  {'wall (ms)':>10}  {'share':>6}"]
        for name, t in self.times:
            lines.append(f"  {name:<{width}}  {t * 1e3:10.2f}  {t / total:6.1%}")
        lines.append(f"  {'total':<{width}}  {total * 1e3:10.2f}")
        return "\n".join(lines)


def pipeline_error(message: str) -> DiagnosticError:
    return DiagnosticError([Diagnostic(Location("--pass-pipeline", 0, 0), message)])
