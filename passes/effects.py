"""Side-effect facts passes share: which ops may be removed, moved or merged; which globals nothing
writes, and the derived copies of them (packed, transformed) that passes declare."""
from __future__ import annotations

from mlc.ir.attributes import StringAttr, SymbolRefAttr, TypeAttr, to_attr
from mlc.ir.core import Module, Operation, create_op
from mlc.ir.dialects.mlc import Global
from mlc.ir.registry import PURE, READS, SYMBOL, TERMINATOR, WRITES


def impure_functions(module: Module) -> set[str]:
    """Functions that (transitively) store to a global or contain an op of unknown effect."""
    funcs = module.functions
    impure = {name for name, f in funcs.items()
              if any(_effectful_leaf(op) for op in f.body.walk())}
    changed = True
    while changed:
        changed = False
        for name, f in funcs.items():
            if name not in impure and any(op.name == "func.call" and op.attr("callee") in impure
                                          for op in f.body.walk()):
                impure.add(name)
                changed = True
    return impure


def _effectful_leaf(op: Operation) -> bool:
    d = op.opdef
    if d is None:
        return True
    if WRITES in d.traits:
        return True
    if op.name in ("func.call", "func.return", "mlc.yield") or op.regions:
        return False
    return not (d.traits & {PURE, READS})


def removable_if_unused(op: Operation, impure: set[str]) -> bool:
    """True when deleting the op (its results unused) cannot change what the program does."""
    d = op.opdef
    if d is None or d.traits & {TERMINATOR, SYMBOL} or any(r.uses for r in op.results):
        return False
    if op.name == "func.call":
        return op.attr("callee") not in impure
    if op.regions and WRITES not in d.traits:
        return not any(_effectful_leaf(o) or (o.name == "func.call" and o.attr("callee") in impure)
                       for r in op.regions for o in r.walk())
    return bool(d.traits & {PURE, READS})


def read_only_globals(module: Module) -> set[str]:
    """Globals that no function stores to and the host does not write in place (not `external`): their
    derived copies (packed panels, transformed filters) can be computed when they are set, not per call."""
    stored = {op.attr("global") for op in module.walk() if op.name == "mlc.global_store"}
    return {name for name, op in module.globals.items() if name not in stored and not op.attr("external")}


def derived_global(module: Module, source: Operation, kind: str, t, suffix: str, transpose: bool = False) -> str:
    """The name of global `source`'s derived copy (`init = kind`, `of` it, of type t), declared after it
    unless the module has it already (named after it + suffix, made unique)."""
    name = source.attr("sym_name") + suffix
    while name in module.symbols() and not _derived_from(module.globals.get(name), source, kind, t, transpose):
        name += "_"
    if name not in module.globals:
        attrs = {"sym_name": StringAttr(name), "type": TypeAttr(t), "init": StringAttr(kind), "of": SymbolRefAttr(source.attr("sym_name"))}
        if transpose:
            attrs["transpose"] = to_attr(True)
        module.body.insert_after(source, create_op("mlc.global", attributes=attrs, loc=source.loc))
    return name


def _derived_from(decl, source, kind: str, t, transpose: bool) -> bool:
    return decl is not None and Global.derived_kind(decl) == kind and decl.attr("of") == source.attr("sym_name") and \
        decl.attr("type") == t and decl.attr("transpose") == transpose
