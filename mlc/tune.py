"""`mlc tune`: for each product and convolution of a module, the tile pass's block of rows (mc) and
slice of K (kc) measured best on this host, stored in the cache directory's tuning table
(runtime/tuning.py), which later compiles on this host apply.

Each distinct op (its name, operand types and kernel-shaping attributes: runtime/tuning.key) is
compiled alone, with every `?` dim set to `batch`, once per candidate pair, and timed: the best of
many single calls (this machine's other tenants only ever add time). A candidate replaces the
defaults only where it is faster by more than MARGIN; else the defaults are recorded."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from mlc.ir.attributes import to_attr
from mlc.ir.core import FuncOp, Module, create_op
from mlc.passes import gemm
from mlc.runtime import tuning

from . import compiler

CANDIDATES = tuple((mc, kc) for mc in (24, 48, 96) for kc in (0, 128, 256, 384))  # (kc 0: by the vector width)
DEFAULT = (gemm.MC, 0)
MARGIN = 0.03
CALLS_SECONDS = 0.15  # timing per candidate (at least MIN_CALLS calls)
MIN_CALLS = 5


@dataclass
class Tuned:
    key: str
    default_ms: float
    best_ms: float
    sizes: tuple


def tune(module: Module, batch: int = 32, candidates=CANDIDATES, report=None) -> list[Tuned]:
    """Measure and store the best tile sizes of each product and convolution of `module` (verified);
    `report(Tuned)` is called as each is done. Returns them all."""
    staged = compiler.tensor_stage(module)
    ops = {tuning.key(op): op for op in tuning.tuned_ops(staged)}
    results, entries = [], {}
    rng = np.random.default_rng(0)
    for key, op in ops.items():
        kernel = _alone(op)
        inputs = [rng.standard_normal([batch if d is None else d for d in t.shape]).astype(t.element.np_dtype)
                  for t in op.operand_types]
        default = _seconds(kernel, DEFAULT, inputs)
        best, sizes = default, DEFAULT
        for candidate in candidates:
            if tuple(candidate) != DEFAULT:
                seconds = _seconds(kernel, candidate, inputs)
                if seconds < best:
                    best, sizes = seconds, tuple(candidate)
        if best > default * (1 - MARGIN):
            best, sizes = default, DEFAULT
        entries[key] = list(sizes)
        results.append(Tuned(key, default * 1e3, best * 1e3, sizes))
        if report is not None:
            report(results[-1])
    if entries:
        tuning.save(entries)
    return results


def _alone(op) -> Module:
    """A module whose @kernel takes op's operands and returns what op computes."""
    m = Module("tune")
    f = FuncOp.build("kernel", op.operand_types, op.result_types, loc=op.loc)
    m.append(f)
    alone = op.clone(dict(zip(op.operands, f.args)))
    f.body.append(alone)
    f.body.append(create_op("func.return", alone.results, [], loc=op.loc))
    return m


def _seconds(kernel: Module, sizes, inputs) -> float:
    """The best time of a call of @kernel compiled with `sizes` as its op's tile sizes."""
    module = kernel.clone()
    module.functions["kernel"].body.ops[0].attributes["mlc.tile"] = to_attr(list(sizes))
    run = compiler.compile(module, cache=False)["kernel"]
    run(*inputs)
    best, calls, start = float("inf"), 0, time.perf_counter()
    while calls < MIN_CALLS or time.perf_counter() - start < CALLS_SECONDS:
        t = time.perf_counter()
        run(*inputs)
        best, calls = min(best, time.perf_counter() - t), calls + 1
    return best
