"""mlc: an MLIR-style compiler for neural networks.

    m = mlc.parse(text)                    # parse and verify textual IR
    mlc.interpret(m, "forward", x)         # run the numpy reference interpreter
    mlc.run_passes(m, "inline,canonicalize,cse")

    @mlc.jit                               # or trace Python: numpy in, numpy out, compiled natively
    def layer(x, w, b):
        return mlc.relu(x @ w + b)
"""
from __future__ import annotations

__version__ = "0.1.0"

# In a source checkout the subpackages (ir/, passes/, codegen/, runtime/) sit beside this folder;
# installed, they are inside it. Let `import mlc` work from the checkout's root too.
import os as _os  # noqa: E402

_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_checkout, "ir", "registry.py")) and _checkout not in __path__:
    __path__.append(_checkout)

from .api import DiagnosticError, Module, compile, interpret, load, load_executable, parse, run_passes, verify  # noqa: E402,F401
from .tensor import Buffer, Parameter, Tensor, Variable  # noqa: E402,F401
from .trace_stack import TracingError  # noqa: E402,F401
from .tracing import export, trace  # noqa: E402,F401
from .jit import default_backend, grad, jit, value_and_grad  # noqa: E402,F401
from .ops import *  # noqa: E402,F401,F403
from . import models, nn, optim  # noqa: E402,F401
from .optim import compile_train_step  # noqa: E402,F401
from .nn.functional import manual_seed  # noqa: E402,F401
from .ops import __all__ as _ops_all  # noqa: E402

__all__ = ["parse", "verify", "load", "interpret", "compile", "load_executable", "run_passes", "Module", "DiagnosticError",
           "jit", "trace", "export", "grad", "value_and_grad", "default_backend", "Tensor", "Variable", "Parameter", "Buffer",
           "TracingError", "nn", "optim", "models", "compile_train_step", "manual_seed", "__version__"] + _ops_all
