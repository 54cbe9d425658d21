"""`mlc tune`: for each product and convolution of a module, the tile pass's block of rows (mc) and
slice of K (kc) measured best on this host, stored in the cache directory's tuning table
(runtime/tuning.py), which later compiles on this host apply.

Each distinct op (its name, operand types and kernel-shaping attributes: runtime/tuning.key) is
compiled alone, with every `?` dim set to `batch`, once per candidate pair, and the candidates are
timed in turn, several rounds over: the best of many single calls (this machine's other tenants only
ever add time). A candidate replaces the defaults only where it is faster by more than MARGIN and
MIN_GAIN; else the defaults are recorded. The direct convolution (large images) has no such sizes
and is left out."""
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
MARGIN, MIN_GAIN = 0.05, 5e-6  # a candidate must win by both (a few microseconds of a tiny product are the call's jitter)
ROUNDS = 3            # the candidates timed in turn, ROUNDS times over (a noisy moment hits all alike)
ROUND_SECONDS = 0.05  # per candidate and round (at least MIN_CALLS calls)
MIN_CALLS = 3


@dataclass
class Tuned:
    key: str
    default_ms: float
    best_ms: float
    sizes: tuple


def tune(module: Module, batch: int = 32, candidates=CANDIDATES, report=None) -> list[Tuned]:
    """Measure and store the best tile sizes of each product, and each convolution that runs as one,
    of `module` (verified); `report(Tuned)` is called as each is done. Returns them all."""
    staged = compiler.tensor_stage(module)
    ops = {tuning.key(op): op for op in tuning.tuned_ops(staged) if _blocked(op)}
    results, entries = [], {}
    rng = np.random.default_rng(0)
    for key, op in ops.items():
        kernel = _alone(op)
        inputs = [rng.standard_normal([batch if d is None else d for d in t.shape]).astype(t.element.np_dtype)
                  for t in op.operand_types]
        sizes = [DEFAULT] + [tuple(c) for c in candidates if tuple(c) != DEFAULT]
        runs = [_compiled(kernel, s) for s in sizes]
        best = [float("inf")] * len(sizes)
        for _ in range(ROUNDS):
            for k, run in enumerate(runs):
                best[k] = min(best[k], _best_call(run, inputs))
        winner = min(range(len(sizes)), key=best.__getitem__)
        if best[winner] > best[0] * (1 - MARGIN) or best[0] - best[winner] < MIN_GAIN:
            winner = 0
        entries[key] = list(sizes[winner])
        results.append(Tuned(key, best[0] * 1e3, best[winner] * 1e3, sizes[winner]))
        if report is not None:
            report(results[-1])
    if entries:
        tuning.save(entries)
    return results


def _blocked(op) -> bool:
    """Whether the tile pass blocks op by mc and kc: a product, or a convolution run as one (not the
    direct convolution, which has no such sizes)."""
    if op.name == "mlc.matmul":
        return True
    stride, _, _, groups = op.opdef.params(op)
    return gemm.conv_as_gemm(op.results[0].type.shape, groups, stride[1])


def _alone(op) -> Module:
    """A module whose @kernel takes op's operands and returns what op computes."""
    m = Module("tune")
    f = FuncOp.build("kernel", op.operand_types, op.result_types, loc=op.loc)
    m.append(f)
    alone = op.clone(dict(zip(op.operands, f.args)))
    f.body.append(alone)
    f.body.append(create_op("func.return", alone.results, [], loc=op.loc))
    return m


def _compiled(kernel: Module, sizes):
    """@kernel compiled with `sizes` as its op's tile sizes."""
    module = kernel.clone()
    module.functions["kernel"].body.ops[0].attributes["mlc.tile"] = to_attr(list(sizes))
    return compiler.compile(module, cache=False)["kernel"]


def _best_call(run, inputs) -> float:
    run(*inputs)
    best, calls, start = float("inf"), 0, time.perf_counter()
    while calls < MIN_CALLS or time.perf_counter() - start < ROUND_SECONDS:
        t = time.perf_counter()
        run(*inputs)
        best, calls = min(best, time.perf_counter() - t), calls + 1
    return best
