"""mlc.ir: types, attributes, the IR, the dialect registry, parser, printer, verifier, interpreter."""
from .attributes import *  # noqa: F401,F403
from .core import Block, BlockArgument, FuncOp, Module, Operation, OpResult, Region, Value, create_op  # noqa: F401
from .diagnostics import Diagnostic, DiagnosticError, Location  # noqa: F401
from .registry import OpDef, all_ops, load_dialects, lookup_op  # noqa: F401
from .types import *  # noqa: F401,F403

load_dialects()
