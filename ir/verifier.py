"""The verifier: structure, SSA dominance, symbols, attributes and types of every op.

Every independent error is reported; an op whose operands already failed is skipped so one mistake
gives one message. Ops the parser could not type (no signature, inference failed or needed a symbol
defined later) are typed here. Checks of ops without regions or symbol uses are memoised by
(op, operand types, result types, attributes), which makes large generated modules cheap to verify.
"""
from __future__ import annotations

from .attributes import ArrayAttr, DictAttr
from .core import Block, Module, Operation
from .diagnostics import Diagnostics, DiagnosticError
from .registry import HAS_REGION, PLACED, SYMBOL, TERMINATOR, USES_SYMBOLS, VerifyError, load_dialects
from .types import ERROR, types_compatible


class VerifyContext:
    def __init__(self, module: Module):
        self.module = module
        self.symbols = module.symbols()


_cache: dict = {}
_UNCACHED = frozenset({HAS_REGION, USES_SYMBOLS, TERMINATOR, SYMBOL, PLACED})


def verify(module: Module, diags: Diagnostics | None = None) -> Module:
    """Raise DiagnosticError listing every problem in the module (and those already in `diags`);
    return the module otherwise."""
    load_dialects()
    diags = diags or Diagnostics()
    try:
        Verifier(module, diags).run()
    except RecursionError:
        diags.error(module.loc, "module is nested too deeply to verify")
    diags.check()
    return module


class Verifier:
    def __init__(self, module: Module, diags: Diagnostics):
        self.module, self.diags = module, diags
        self.ctx = VerifyContext(module)
        self.visible: set = set()

    def error(self, op, message):
        self.diags.error(op.loc, message, op.name)

    def run(self):
        seen = {}
        for op in self.module.body:
            name = op.attributes.get("sym_name")
            if op.opdef is None or SYMBOL not in op.opdef.traits:
                self.error(op, "only func.func and mlc.global may appear at module level")
            elif name is not None:
                if name.value in seen:
                    self.error(op, f"redefinition of symbol '@{name.value}' (first defined at {seen[name.value].loc})")
                else:
                    seen[name.value] = op
            self.visible = set()
            self.verify_op(op)

    def verify_block(self, block: Block):
        added = list(block.args)
        self.visible.update(added)
        for op in block:
            self.verify_op(op)
            added.extend(op.results)
            self.visible.update(op.results)
        self.visible.difference_update(added)

    def verify_op(self, op: Operation):
        d = op.opdef
        if op in self.diags.reported:
            for region in op.regions:
                for block in region.blocks:
                    self.verify_block(block)
            return
        ok = self.check_operands(op)
        if d is None:
            self.diags.error(op.loc, f"unknown operation '{op.name}'")
            return
        if not op.regions and not d.traits & _UNCACHED:
            if ok:
                self.check_leaf(op)
            return
        ok = self.check_structure(op) and ok
        if op.parent_op is not None and SYMBOL in d.traits:
            self.error(op, "must be at module level")
        for region in op.regions:  # regions first: a scan's result types come from its yield
            for block in region.blocks:
                self.verify_block(block)
        if not ok or any(t is ERROR for r in op.regions for b in r.blocks if b.last for t in b.last.operand_types):
            return
        self.report(op, self.infer_and_compare(op))
        if d.verify is not None and d.traits & {HAS_REGION, TERMINATOR, SYMBOL, PLACED}:
            self.run_hook(op, d.verify)

    def check_leaf(self, op):
        """Structure and types of an op without regions or symbol uses: a pure function of its name,
        operand and result types and attributes, so the verdict is memoised."""
        key = None
        results = op.results
        if not any(r.type is ERROR for r in results):
            try:
                key = (op.name, tuple([v.type for v in op.operands]), tuple([r.type for r in results]),
                       tuple(op.attributes.items()))
                messages = _cache.get(key)
            except TypeError:  # an unhashable attribute
                key, messages = None, None
            if messages is not None:
                for m in messages:
                    self.error(op, m)
                return
        before = len(self.diags.errors)
        if self.check_structure(op):
            self.report(op, self.infer_and_compare(op))
        if key is not None and len(_cache) < 200_000:
            _cache[key] = tuple(d.message.split(": ", 1)[1] for d in self.diags.errors[before:])

    def report(self, op, message):
        if message is not None:
            self.error(op, message)

    def check_operands(self, op) -> bool:
        ok = True
        for i, v in enumerate(op.operands):
            if v.type is ERROR:
                ok = False
            elif v not in self.visible:
                self.error(op, f"operand {i} is not defined before this use (it does not dominate it)")
                ok = False
        return ok

    def check_structure(self, op) -> bool:
        d = op.opdef
        lo, hi = d.operand_range()
        n = len(op.operands)
        if n < lo or (hi is not None and n > hi):
            want = str(lo) if lo == hi else f"at least {lo}" if hi is None else f"{lo} to {hi}"
            self.error(op, f"expects {want} operands, got {n}")
            return False
        if d.results is not None and len(op.results) != d.results and ERROR not in op.result_types:
            self.error(op, f"expects {d.results} results, got {len(op.results)}")
            return False
        ok = True
        for name, a in op.attributes.items():
            spec = d.attrs.get(name)
            if spec is None:
                if "." not in name:  # dialect-prefixed attributes are discardable annotations
                    known = ", ".join(sorted(d.attrs)) or "none"
                    self.error(op, f"unknown attribute '{name}' (known: {known})")
                    ok = False
            elif not spec.accepts(a):
                self.error(op, f"attribute '{name}' must be {spec.describe()}, got {a}")
                ok = False
        for name, spec in d.attrs.items():
            if spec.required and name not in op.attributes:
                self.error(op, f"requires attribute '{name}'")
                ok = False
        if len(op.regions) != d.regions:
            self.error(op, f"expects {d.regions} regions, got {len(op.regions)}")
            return False
        for r in op.regions:
            if len(r.blocks) != 1:
                self.error(op, f"regions must have exactly one block, got {len(r.blocks)}")
                return False
            term = r.blocks[0].last
            if term is None or term.opdef is None or TERMINATOR not in term.opdef.traits:
                self.error(op, "region must end with a terminator (mlc.yield or return)")
                return False
        for name in ("arg_attrs", "res_attrs"):
            a = op.attributes.get(name)
            if a is not None and not (isinstance(a, ArrayAttr) and all(isinstance(e, DictAttr) for e in a.elements)):
                self.error(op, f"'{name}' must be an array of dictionaries")
                ok = False
        return ok

    def infer_and_compare(self, op) -> str | None:
        try:
            inferred = list(op.opdef.infer(op, self.ctx))
        except VerifyError as e:
            return str(e)
        except Exception as e:  # a bug in a declaration must not become a traceback
            return f"internal error while verifying ({type(e).__name__}: {e}); please report it"
        declared = op.result_types
        if ERROR in declared or (not declared and inferred and op.opdef.results is None):
            if len(declared) == len(inferred) or not declared:
                if not declared:
                    op.set_results(inferred)
                for r, t in zip(op.results, inferred):
                    if r.type is ERROR:
                        r.type = t
                return None
        if len(inferred) != len(declared):
            return f"has {len(declared)} results but {len(inferred)} were inferred"
        for i, (want, got) in enumerate(zip(inferred, declared)):
            if not types_compatible(want, got):
                which = "result type" if len(declared) == 1 else f"result {i} type"
                return f"{which} {got} does not match the inferred {want}"
        if op.opdef.verify is not None and not (op.opdef.traits & {HAS_REGION, TERMINATOR, SYMBOL}):
            try:
                op.opdef.verify(op, self.ctx)
            except VerifyError as e:
                return str(e)
        return None

    def run_hook(self, op, hook):
        try:
            hook(op, self.ctx)
        except VerifyError as e:
            self.error(op, str(e))
        except Exception as e:
            self.error(op, f"internal error while verifying ({type(e).__name__}: {e}); please report it")


__all__ = ["verify", "DiagnosticError", "VerifyContext"]
