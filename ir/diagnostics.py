"""Located diagnostics: `file:line:col: error: 'op': message`, the source line and a caret."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple


class Location(NamedTuple):  # a tuple: cheap to make, one per op
    file: str
    line: int
    col: int
    explicit: bool = False  # written as loc(...) in the source: printed back
    scope: int = 0          # tells apart ops at one place (a traced model's ops all carry its call site): profiling

    def __str__(self):
        return f"{self.file}:{self.line}:{self.col}"


UNKNOWN = Location("<unknown>", 0, 0)


@dataclass
class Diagnostic:
    loc: Location
    message: str
    severity: str = "error"
    source_line: str | None = None

    @property
    def file(self):
        return self.loc.file

    @property
    def line(self):
        return self.loc.line

    @property
    def column(self):
        return self.loc.col

    def render(self) -> str:
        where = str(self.loc) if self.loc.line > 0 else self.loc.file
        head = f"{where}: {self.severity}: {self.message}" if where else f"{self.severity}: {self.message}"
        if self.source_line is None or self.loc.line <= 0:
            return head
        line, col = self.source_line, self.loc.col
        if len(line) > 120:  # show a window around the column
            start = max(0, col - 60)
            line = ("..." if start else "") + line[start: start + 117] + ("..." if start + 117 < len(line) else "")
            col = col - start + (3 if start else 0)
        caret = "".join(c if c == "\t" else " " for c in line[: col - 1]) + "^"
        return f"{head}\n{line}\n{caret}"

    def __str__(self):
        return self.render()


class DiagnosticError(Exception):
    """Raised for bad input; `.diagnostics` lists every independent problem found."""

    SHOWN = 50

    def __init__(self, diagnostics: list[Diagnostic]):
        self.diagnostics = list(diagnostics)
        text = "\n".join(d.render() for d in self.diagnostics[: self.SHOWN])
        if len(self.diagnostics) > self.SHOWN:
            text += f"\n... and {len(self.diagnostics) - self.SHOWN} more errors"
        super().__init__(text)


class Sources:
    """Source text by file name, so diagnostics can show the offending line."""
    _texts: dict[str, list[str]] = {}

    @classmethod
    def add(cls, name: str, text: str):
        if len(cls._texts) > 64:
            cls._texts.pop(next(iter(cls._texts)))
        cls._texts[name] = text.splitlines()

    @classmethod
    def line(cls, loc: Location) -> str | None:
        lines = cls._texts.get(loc.file)
        if lines is None and loc.explicit:  # e.g. a traced Python file
            try:
                with open(loc.file, encoding="utf-8") as f:
                    cls.add(loc.file, f.read())
                lines = cls._texts.get(loc.file)
            except (OSError, UnicodeDecodeError):
                return None
        if lines is None or not 0 < loc.line <= len(lines):
            return None
        return lines[loc.line - 1]


class Diagnostics:
    """Collects errors; `check()` raises them all at once."""

    def __init__(self):
        self.errors: list[Diagnostic] = []
        self.reported: set = set()  # ops the parser already complained about; the verifier skips them

    def error(self, loc: Location, message: str, op_name: str | None = None):
        if op_name:
            message = f"'{op_name}': {message}"
        self.errors.append(Diagnostic(loc or UNKNOWN, message, source_line=Sources.line(loc or UNKNOWN)))

    def check(self):
        if self.errors:
            self.errors.sort(key=lambda d: (d.loc.file, d.loc.line, d.loc.col))
            raise DiagnosticError(self.errors)


class UnsupportedError(DiagnosticError, NotImplementedError):
    """Valid input that mlc does not handle yet (an element type a backend does not compile): a
    diagnostic for the command line, a NotImplementedError for callers that refuse what is not done."""


def error(loc: Location, message: str, op_name: str | None = None, kind: type = DiagnosticError) -> DiagnosticError:
    """One located error, ready to raise."""
    d = Diagnostics()
    d.error(loc, message, op_name)
    return kind(d.errors)


def format_bytes(n: float) -> str:
    """400.0 GB, 1.5 MB, 12 bytes (decimal units), for messages about memory."""
    if n < 1000 or n >= 1e21:
        return f"{n:.0f} bytes" if n < 1000 else f"{n:.1e} bytes"
    exponent = int(math.log10(n) // 3)
    return f"{n / 1000 ** exponent:.1f} {'KMGTPE'[exponent - 1]}B"
