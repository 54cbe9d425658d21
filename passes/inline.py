"""inline: replace each func.call by a copy of the callee's body (callees that are part of a
recursive cycle stay calls)."""
from __future__ import annotations

from mlc.ir.core import Module, Operation

from .manager import Pass


def recursive_functions(module: Module) -> set[str]:
    """Functions that can reach themselves through calls."""
    calls = {name: {op.attr("callee") for op in f.body.walk() if op.name == "func.call"}
             for name, f in module.functions.items()}
    recursive = set()
    for start in calls:
        stack, seen = list(calls[start]), set()
        while stack:
            name = stack.pop()
            if name == start:
                recursive.add(start)
                break
            if name not in seen and name in calls:
                seen.add(name)
                stack.extend(calls[name])
    return recursive


def inline_call(call: Operation, callee) -> list:
    """Replaces call by a copy of callee's body; returns the values that stand for its results."""
    mapping = dict(zip(callee.args, call.operands))
    block = call.parent
    results = []
    for op in callee.body:
        if op.name == "func.return":
            results = [mapping.get(v, v) for v in op.operands]
            break
        block.insert_before(call, op.clone(mapping))
    call.replace_with(results)
    return results


class Inline(Pass):
    name = "inline"
    summary = "inline every non-recursive call"
    options = {"max-depth": 64}

    def run(self, module: Module) -> None:
        recursive = recursive_functions(module)
        functions = module.functions
        for _ in range(self.option("max-depth")):
            calls = [op for f in functions.values() for op in f.body.walk()
                     if op.name == "func.call" and op.attr("callee") not in recursive and op.attr("callee") in functions]
            if not calls:
                return
            for call in calls:
                inline_call(call, functions[call.attr("callee")])
