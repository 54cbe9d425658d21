"""The traces being recorded (innermost last), and the errors tracing reports at the user's line.

Everything that records or reads traced values consults this module, so it imports nothing of mlc
but the IR.
"""
from __future__ import annotations

import os
import sys

import mlc.ir.core
from mlc.ir.diagnostics import DiagnosticError, Location, error

_STACK: list = []  # of tracing.Trace


def current_trace():
    if not _STACK:
        raise tracing_error("no function is being traced (was a traced value kept after its function returned? "
                            "return it instead)")
    return _STACK[-1]


_MLC_DIRS = tuple(os.path.dirname(os.path.abspath(p)) + os.sep for p in (__file__, mlc.ir.__file__, mlc.ir.core.__file__))


def user_location(depth: int = 1) -> Location:
    """Where the user's code called into mlc: the innermost frame outside the mlc package."""
    f = sys._getframe(depth)
    while f is not None and f.f_code.co_filename.startswith(_MLC_DIRS):
        f = f.f_back
    if f is None:
        return Location("<python>", 0, 0)
    line, col = f.f_lineno, 0
    positions = f.f_code.co_positions() if hasattr(f.f_code, "co_positions") else None
    if positions is not None:
        for i, pos in enumerate(positions):
            if i == f.f_lasti // 2:
                line, col = pos[0] or line, (pos[2] or 0)
                break
    return Location(f.f_code.co_filename, line, col + 1, True)


class TracingError(DiagnosticError, TypeError):
    """A Python operation that tracing cannot record (e.g. `if` on a traced value), at the user's line."""


def tracing_error(message: str) -> TracingError:
    return TracingError(error(user_location(2), message).diagnostics)
