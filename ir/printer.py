"""The printer: canonical pretty form (every type printed) or, with generic=True, MLIR's generic form.

Value names come from the source (`name_hint`) where they are unique in their function; other values
are numbered. `parse(print(m))` prints identically to `print(m)`.
"""
from __future__ import annotations

import re

from .attributes import DictAttr, format_attr_dict, format_dense, quote
from .core import Block, FuncOp, Module, Operation, Value
from .types import format_result_types

_IDENT = re.compile(r"[A-Za-z0-9_$.\-]+\Z")
_SYMBOL = re.compile(r"[A-Za-z_][\w$.\-]*\Z")


def symbol(name: str) -> str:
    return "@" + name if _SYMBOL.match(name) else "@" + quote(name)


class Printer:
    def __init__(self, generic: bool = False):
        self.generic = generic
        self.names: dict[Value, str] = {}
        self.used: set[str] = set()
        self.counter = 0

    # --- naming ------------------------------------------------------------------------------------------
    def fresh(self, hint: str | None) -> str:
        if hint and _IDENT.match(hint) and hint not in self.used and not hint.isdigit():
            self.used.add(hint)
            return hint
        if hint and _IDENT.match(hint) and not hint.isdigit():
            i = 1
            while f"{hint}_{i}" in self.used:
                i += 1
            self.used.add(f"{hint}_{i}")
            return f"{hint}_{i}"
        while str(self.counter) in self.used:
            self.counter += 1
        self.used.add(str(self.counter))
        return str(self.counter)

    def name(self, v: Value) -> str:
        n = self.names.get(v)
        if n is None:  # not (yet) defined where printed: a broken module; still print something
            n = self.names[v] = "<<undefined:" + (v.name_hint or "?") + ">>"
        return "%" + n

    def define_results(self, op: Operation) -> str:
        rs = op.results
        if not rs:
            return ""
        hints = [r.name_hint for r in rs]
        bases = {h.split("#")[0] if h and "#" in h else None for h in hints}
        if len(rs) > 1 and (all(h is None for h in hints) or (len(bases) == 1 and None not in bases)):
            base = self.fresh(next(iter(bases)) if None not in bases else None)
            for i, r in enumerate(rs):
                self.names[r] = f"{base}#{i}"
            return f"%{base}:{len(rs)} = "
        for r in rs:
            self.names[r] = self.fresh(r.name_hint.split("#")[0] + "_" + r.name_hint.split("#")[1]
                                       if r.name_hint and "#" in r.name_hint else r.name_hint)
        return ", ".join("%" + self.names[r] for r in rs) + " = "

    # --- module and functions --------------------------------------------------------------------------
    def module(self, m: Module) -> str:
        head = "module"
        if m.name:
            head += " " + symbol(m.name)
        if m.attributes:
            head += " attributes " + format_attr_dict(m.attributes)
        body = "\n".join(self.top(op) for op in m.body)
        return f"{head} {{\n{body}\n}}\n" if body else f"{head} {{\n}}\n"

    def top(self, op: Operation) -> str:
        if op.name == "func.func" and isinstance(op, FuncOp) and not self.generic:
            return self.func(op)
        if op.name == "mlc.global" and not self.generic and "sym_name" in op.attributes and "type" in op.attributes:
            attrs = format_attr_dict(op.attributes, skip=("sym_name", "type"))
            return f"  mlc.global {symbol(op.attr('sym_name'))} : {op.attr('type')}" + (" " + attrs if attrs else "") + self.loc(op)
        self.names, self.used, self.counter = {}, set(), 0
        return self.op(op, 1)

    def func(self, f: FuncOp) -> str:
        self.names, self.used, self.counter = {}, set(), 0
        arg_attrs = f.attributes.get("arg_attrs")
        res_attrs = f.attributes.get("res_attrs")
        args = []
        for i, a in enumerate(f.args):
            self.names[a] = self.fresh(a.name_hint)
            extra = _dict_at(arg_attrs, i)
            args.append(f"%{self.names[a]}: {a.type}" + (" " + extra if extra else ""))
        results = f.type.results
        if res_attrs is not None:
            res = "(" + ", ".join(f"{t}" + (" " + _dict_at(res_attrs, i) if _dict_at(res_attrs, i) else "")
                                  for i, t in enumerate(results)) + ")"
        else:
            res = format_result_types(results) if results else ""
        head = "  func.func " + ("private " if f.is_private else "") + symbol(f.sym_name) + "(" + ", ".join(args) + ")"
        if results:
            head += " -> " + res
        extra = format_attr_dict(f.attributes, skip=("sym_name", "function_type", "arg_attrs", "res_attrs", "sym_visibility"))
        if extra:
            head += " attributes " + extra
        body = self.block_ops(f.body, 2)
        return f"{head} {{\n{body}\n  }}"

    def block_ops(self, block: Block, depth: int) -> str:
        return "\n".join(self.op(op, depth) for op in block)

    # --- ops ---------------------------------------------------------------------------------------------------
    def op(self, op: Operation, depth: int) -> str:
        pad = "  " * depth
        operands = ", ".join(self.name(v) for v in op.operands)
        results = self.define_results(op)
        if self.generic or op.opdef is None:
            return pad + results + self.generic_op(op, operands, depth) + self.loc(op)
        return pad + results + self.pretty_op(op, operands, depth) + self.loc(op)

    def signature(self, op) -> str:
        ins = ", ".join(str(v.type) for v in op.operands)
        return f"({ins}) -> {format_result_types(op.result_types)}"

    def generic_op(self, op, operands, depth) -> str:
        text = f'{quote(op.name)}({operands})'
        if op.regions:
            text += " (" + ", ".join(self.region(r, depth) for r in op.regions) + ")"
        attrs = format_attr_dict(op.attributes)
        if attrs:
            text += " " + attrs
        return text + " : " + self.signature(op)

    def pretty_op(self, op, operands, depth) -> str:
        d = op.opdef
        if op.name == "func.return":
            types = ", ".join(str(v.type) for v in op.operands)
            return "return" + (f" {operands} : {types}" if op.operands else "")
        if op.name == "func.call":
            attrs = format_attr_dict(op.attributes, skip=("callee",))
            return (f"func.call {symbol(op.attr('callee'))}({operands})" + (" " + attrs if attrs else "")
                    + " : " + self.signature(op))
        skip = set()
        items = []
        if d.pretty_symbol and op.attributes.get(d.pretty_symbol) is not None:
            items.append(symbol(op.attr(d.pretty_symbol)))
            skip.add(d.pretty_symbol)
        if d.pretty_value and op.attributes.get(d.pretty_value) is not None:
            dense = op.attributes[d.pretty_value]
            items.append(f"dense<{format_dense(dense.value, dense.type.element)}>")
            skip.add(d.pretty_value)
            if not op.operands and [dense.type] != op.result_types:
                return self.generic_op(op, operands, depth)
        if op.name == "mlc.scan":
            k = op.attr("num_carries") or 0
            carries = ", ".join(self.name(v) for v in op.operands[:k])
            seqs = ", ".join(self.name(v) for v in op.operands[k:])
            if seqs:
                items.append((carries + " " if carries else "") + "over " + seqs)
                skip.add("num_carries")
            elif carries:
                items.append(carries)
        elif operands:
            items.append(operands)
        text = op.name + (" " + ", ".join(items) if items else "")
        attrs = format_attr_dict(op.attributes, skip=skip)
        if attrs:
            text += " " + attrs
        if not op.operands and op.results:
            text += " : " + ", ".join(str(t) for t in op.result_types)
        elif not op.results and op.operands and d.short_form_lists_operands(len(op.operands)):
            text += " : " + ", ".join(str(v.type) for v in op.operands)
        elif op.operands or op.results:
            text += " : " + self.signature(op)
        for r in op.regions:
            text += " " + self.region(r, depth)
        return text

    def region(self, region, depth) -> str:
        pad = "  " * depth
        parts = []
        for b in region.blocks:
            for a in b.args:
                self.names[a] = self.fresh(a.name_hint)
            header = ""
            if b.args or len(region.blocks) > 1:
                header = f"{pad}^bb{len(parts)}(" + ", ".join(f"%{self.names[a]}: {a.type}" for a in b.args) + "):\n"
            parts.append(header + self.block_ops(b, depth + 1))
        return "{\n" + "\n".join(parts) + f"\n{pad}}}"

    def loc(self, op) -> str:
        loc = op.loc
        if not getattr(loc, "explicit", False):
            return ""
        return f" loc({quote(loc.file)}:{loc.line}:{loc.col})"


def _dict_at(attr, i) -> str:
    if attr is None or i >= len(attr.elements):
        return ""
    d = attr.elements[i]
    return format_attr_dict(d.value) if isinstance(d, DictAttr) else ""


def print_module(m: Module, generic: bool = False) -> str:
    return Printer(generic).module(m)


def print_op(op: Operation, generic: bool = False) -> str:
    p = Printer(generic)
    for v in _free_values(op):
        p.names[v] = p.fresh(v.name_hint)
    if isinstance(op, FuncOp) and not generic:
        return p.func(op).strip()
    return p.op(op, 0)


def _free_values(op):
    """Values an op uses without defining (named first so a lone op prints readably)."""
    defined, free = set(), []
    for o in op.walk():
        for r in o.regions:
            for b in r.blocks:
                defined.update(b.args)
        defined.update(o.results)
    for o in op.walk():
        for v in o.operands:
            if v not in defined and v not in free:
                free.append(v)
    return free
