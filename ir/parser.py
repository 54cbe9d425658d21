"""The textual IR parser: a lark LALR grammar whose callbacks build IR directly (no parse tree).

For speed the lexer does the coarse work: a whole type (`tensor<?x64xf32>`), a whole signature
(`(T, T) -> T`), the result list (`%a, %b =`), an operand list (`%x, %w#1`), a `dense<...>` payload
and a `loc(...)` are each one token, parsed by small cached functions.
"""
from __future__ import annotations

import json
import re
import threading

import numpy as np
from lark import Lark, Token
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from .attributes import (ArrayAttr, BoolAttr, DenseArrayAttr, DenseAttr, DictAttr, FloatAttr, IntAttr, StringAttr,
                         SymbolRefAttr, TypeAttr, UNIT)
from .core import Block, FuncOp, Module, Operation, Region, create_op
from .diagnostics import Diagnostics, DiagnosticError, Location, Sources
from .registry import VerifyError, load_dialects, lookup_op
from .types import ERROR, ELEMENT_TYPES, FunctionType, TensorType, parse_type

_T = r"(?:(?:tensor|memref|vector)<[^<>]*>|[a-z][a-z0-9]*)"
_TL = rf"(?:{_T}(?:\s*,\s*{_T})*)?"
_V = r"%[A-Za-z0-9_$.\-]+"

GRAMMAR = rf"""
start: module | top*
module: "module" SYMBOL? module_attrs? "{{" top* "}}"
module_attrs: "attributes" attr_dict
top: func | global_decl | op
global_decl: GLOBAL SYMBOL ":" TYPE attr_dict? LOC?
func: FUNC VISIBILITY? func_sig func_attrs? "{{" op* "}}"
func_sig: SYMBOL "(" [func_arg ("," func_arg)*] ")" func_results?
func_arg: OPERANDS ":" TYPE attr_dict?
func_results: "->" TYPE -> func_result | "->" "(" [result_type ("," result_type)*] ")"
result_type: TYPE attr_dict?
func_attrs: "attributes" attr_dict

op: RESULTS? (generic | pretty | call | ret) LOC?
generic: STRING "(" OPERANDS? ")" generic_regions? attr_dict? ":" SIG
generic_regions: "(" region ("," region)* ")"
pretty: OP_NAME pretty_args? attr_dict? signature? region?
pretty_args: OPERANDS -> args_values
           | OPERANDS? OVER OPERANDS -> args_over
           | SYMBOL ("," OPERANDS)? -> args_symbol
           | DENSE -> args_dense
call: CALL SYMBOL "(" OPERANDS? ")" attr_dict? ":" SIG
ret: RETURN OPERANDS? type_list?
signature: ":" SIG | type_list
type_list: ":" TYPE ("," TYPE)*
region: "{{" block_header? op+ "}}"
block_header: BLOCK_ID ("(" [block_arg ("," block_arg)*] ")")? ":"
block_arg: OPERANDS ":" TYPE

attr_dict: "{{" [attr_entry ("," attr_entry)*] "}}"
attr_entry: (BARE_ID | STRING) ("=" attr_value)?
?attr_value: INT (":" TYPE)? -> int_attr
           | FLOAT (":" TYPE)? -> float_attr
           | STRING -> str_attr
           | TRUE -> true_attr
           | FALSE -> false_attr
           | UNIT -> unit_attr
           | "[" [attr_value ("," attr_value)*] "]" -> array_attr
           | ARRAY -> dense_array_attr
           | TYPE -> type_attr
           | SIG -> sig_attr
           | SYMBOL -> symbol_attr
           | DENSE ":" TYPE -> dense_attr
           | attr_dict -> dict_attr

RESULTS.3: /{_V}(?::\d+)?(?:\s*,\s*{_V})*\s*=(?!=)/
OPERANDS: /{_V}(?:#\d+)?(?:\s*,\s*{_V}(?:#\d+)?)*/
SIG.2: /\(\s*{_TL}\s*\)\s*->\s*(?:{_T}|\(\s*{_TL}\s*\))/
TYPE: /(?:tensor|memref|vector)<[^<>]*>|(?:f16|bf16|f32|f64|i1|i8|i32|i64|index)(?![\w.$])/
DENSE: /dense<[^<>]*>/
ARRAY: /array<[^<>]*>/
LOC.2: /loc\((?:"(?:[^"\\\n]|\\.)*"(?::\d+:\d+)?|unknown)\)/
SYMBOL: /@(?:[A-Za-z_][\w$.\-]*|"(?:[^"\\\n]|\\.)*")/
BLOCK_ID: /\^[\w$.\-]+/
OP_NAME: /[A-Za-z_][\w$]*\.[\w$.]+/
GLOBAL.2: /mlc\.global(?![\w$.])/
FUNC.2: /func\.func(?![\w$.])/
CALL.2: /func\.call(?![\w$.])/
RETURN: /return(?![\w$.])/
OVER: /over(?![\w$.])/
VISIBILITY: /(?:private|public)(?![\w$.])/
TRUE: /true(?![\w$.])/
FALSE: /false(?![\w$.])/
UNIT: /unit(?![\w$.])/
BARE_ID: /[A-Za-z_][\w$.\-]*/
STRING: /"(?:[^"\\\n]|\\.)*"/
FLOAT: /[-+]?(?:\d+\.\d*(?:[eE][-+]?\d+)?|\d+[eE][-+]?\d+)/
INT: /[-+]?(?:0x[0-9a-fA-F]+|\d+)/
COMMENT: /\/\/[^\n]*/
%import common.WS
%ignore WS
%ignore COMMENT
"""

_SIG_CACHE: dict[str, FunctionType] = {}
_TYPE_SPLIT = re.compile(_T)


def parse_signature(text: str) -> FunctionType:
    sig = _SIG_CACHE.get(text)
    if sig is None:
        lhs, _, rhs = text.partition("->")
        sig = FunctionType(tuple(parse_type(t) for t in _TYPE_SPLIT.findall(lhs)),
                           tuple(parse_type(t) for t in _TYPE_SPLIT.findall(rhs)))
        if len(_SIG_CACHE) < 100_000:
            _SIG_CACHE[text] = sig
    return sig


_ESCAPE = re.compile(r'\\([0-9a-fA-F]{2}|.)', re.S)
_ESCAPES = {"n": "\n", "t": "\t", '"': '"', "\\": "\\"}


def unquote(s: str) -> str:
    """A string literal's value: MLIR escapes \\ \" \n \t and \XX (hex); others stand for themselves."""
    body = s[1:-1]
    if "\\" not in body:
        return body
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)) if len(m.group(1)) == 2 else _ESCAPES.get(m.group(1), m.group(1)), body)


class ParseError(Exception):
    def __init__(self, message, token=None, col_offset=0):
        super().__init__(message)
        self.token, self.col_offset = token, col_offset


class _Ctx:
    """What inference needs at parse time: the symbols declared so far."""

    def __init__(self):
        self.symbols: dict[str, Operation] = {}


class IRBuilder:
    """Lark callbacks. Value names live in one table per function (regions see outer values);
    uses before definition become placeholders resolved at the end of the function."""

    def __init__(self, filename: str, diags: Diagnostics):
        self.file = filename
        self.diags = diags
        self.ctx = _Ctx()
        self.values: dict[str, list] = {}
        self.pending: dict[str, list] = {}

    # --- helpers ----------------------------------------------------------------------------------
    def loc(self, tok: Token, offset: int = 0) -> Location:
        return Location(self.file, tok.line, tok.column + offset)

    def error(self, tok, message, offset=0, op_name=None):
        self.diags.error(self.loc(tok, offset) if tok is not None else None, message, op_name)

    def type_of(self, tok: Token):
        try:
            return parse_type(str(tok))
        except ValueError as e:
            self.error(tok, str(e))
            return ERROR

    def sig_of(self, tok: Token) -> FunctionType | None:
        try:
            return parse_signature(str(tok))
        except ValueError as e:
            self.error(tok, str(e))
            return None

    def define(self, name: str, values, tok, offset=0):
        if name in self.values:
            self.error(tok, f"redefinition of value '%{name}'", offset)
            return
        self.values[name] = values
        waiting = self.pending.pop(name, None)
        if waiting:
            for index, placeholder, _, _ in waiting:
                if index < len(values):
                    placeholder.replace_all_uses_with(values[index])
                else:
                    waiting_tok = _
                    self.error(waiting_tok[0], f"'%{name}' has only {len(values)} results", waiting_tok[1])

    def uses(self, tok: Token | None) -> list:
        if tok is None:
            return []
        out, text, pos = [], str(tok), 0
        for part in text.split(","):
            lead = len(part) - len(part.lstrip())
            name = part.strip()[1:]
            index = None
            if "#" in name:
                name, _, idx = name.partition("#")
                index = int(idx)
            out.append(self.lookup(name, index, tok, pos + lead))
            pos += len(part) + 1
        return out

    def lookup(self, name, index, tok, offset):
        values = self.values.get(name)
        if values is None:
            from .core import Value
            placeholder = Value(ERROR, name)
            self.pending.setdefault(name, []).append((index or 0, placeholder, (tok, offset), name))
            return placeholder
        if index is None:
            if len(values) != 1:
                self.error(tok, f"'%{name}' has {len(values)} results; use '%{name}#0' ... '%{name}#{len(values) - 1}'", offset)
                return values[0] if values else _error_value()
            return values[0]
        if index >= len(values):
            self.error(tok, f"'%{name}' has only {len(values)} results", offset)
            return _error_value()
        return values[index]

    def new_scope(self):
        self.close_scope()
        self.values, self.pending = {}, {}

    def close_scope(self):
        for name, waiting in self.pending.items():
            for _, placeholder, (tok, offset), _ in waiting:
                self.error(tok, f"use of undefined value '%{name}'", offset)
        self.pending = {}

    # --- module level --------------------------------------------------------------------------------
    def start(self, children):
        self.close_scope()
        if len(children) == 1 and isinstance(children[0], Module):
            return children[0]
        return self._module(None, None, children)

    def module(self, children):
        name = next((str(c)[1:] for c in children if isinstance(c, Token) and c.type == "SYMBOL"), None)
        attrs = next((c for c in children if isinstance(c, dict)), {})
        return self._module(name, attrs, [c for c in children if isinstance(c, Operation)])

    def top(self, children):
        """After each module-level item: report its undefined values and start a fresh name scope."""
        self.new_scope()
        return children[0]

    def module_attrs(self, children):
        return children[0]

    def _module(self, name, attrs, ops):
        m = Module(_symbol_name(name) if name else None, attrs or {}, loc=Location(self.file, 1, 1))
        for op in ops:
            m.append(op)
        return m

    def global_decl(self, children):
        tok, sym, type_tok = children[0], children[1], children[2]
        attrs = {"sym_name": StringAttr(_symbol_name(str(sym)[1:])), "type": TypeAttr(self.type_of(type_tok))}
        loc = self.loc(tok)
        for c in children[3:]:
            if isinstance(c, dict):
                attrs.update(c)
            elif isinstance(c, Token) and c.type == "LOC":
                loc = self.explicit_loc(c) or loc
        op = create_op("mlc.global", attributes=attrs, loc=loc)
        self.ctx.symbols.setdefault(attrs["sym_name"].value, op)
        return op

    # --- functions ------------------------------------------------------------------------------------
    def func_sig(self, children):
        sym = children[0]
        self.new_scope()
        args = [c for c in children[1:] if isinstance(c, tuple) and len(c) == 4]
        results = next((c for c in children[1:] if isinstance(c, list)), [])
        block = Block([a[1] for a in args], [a[0] for a in args])
        for (name, _, tok, _), arg in zip(args, block.args):
            self.define(name, [arg], tok)
        attrs = {"sym_name": StringAttr(_symbol_name(str(sym)[1:])),
                 "function_type": TypeAttr(FunctionType(tuple(a[1] for a in args), tuple(r[0] for r in results)))}
        if any(a[3] for a in args):
            attrs["arg_attrs"] = ArrayAttr(tuple(DictAttr(tuple((a[3] or {}).items())) for a in args))
        if any(r[1] for r in results):
            attrs["res_attrs"] = ArrayAttr(tuple(DictAttr(tuple((r[1] or {}).items())) for r in results))
        op = create_op("func.func", attributes=attrs, regions=[Region([block])], loc=self.loc(sym))
        self.ctx.symbols.setdefault(attrs["sym_name"].value, op)
        return op

    def func_arg(self, children):
        tok = children[0]
        if "," in tok:
            self.error(tok, "expected ':' and a type after each argument")
        return (str(tok).split(",")[0].strip()[1:], self.type_of(children[1]), tok,
                children[2] if len(children) > 2 else None)

    def func_results(self, children):
        return [c for c in children if c is not None]

    def func_result(self, children):
        return [(self.type_of(children[0]), None)]

    def result_type(self, children):
        return (self.type_of(children[0]), children[1] if len(children) > 1 else None)

    def func_attrs(self, children):
        return ("attributes", children[0])

    def func(self, children):
        kw = children[0]
        rest = children[1:]
        private = False
        if rest and isinstance(rest[0], Token) and rest[0].type == "VISIBILITY":
            private = rest[0] == "private"
            rest = rest[1:]
        op: FuncOp = rest[0]
        op.loc = self.loc(kw)
        if private:
            op.attributes["sym_visibility"] = StringAttr("private")
        for c in rest[1:]:
            if isinstance(c, tuple) and c[0] == "attributes":
                for k, v in c[1].items():
                    op.attributes.setdefault(k, v)
            elif isinstance(c, Operation):
                op.body.append(c)
        self.close_scope()
        return op

    # --- ops --------------------------------------------------------------------------------------------
    def op(self, children):
        results_tok = children[0] if isinstance(children[0], Token) and children[0].type == "RESULTS" else None
        spec = children[1] if results_tok is not None else children[0]
        loc_tok = children[-1] if isinstance(children[-1], Token) and children[-1].type == "LOC" else None
        name, name_tok, operands, attrs, sig, regions, extra = spec
        opdef = lookup_op(name)
        loc = self.loc(name_tok)
        if loc_tok is not None:
            loc = self.explicit_loc(loc_tok) or loc
        result_names = self.result_names(results_tok)
        broken = None in attrs.values()  # an attribute that failed to parse (already reported)
        attrs = {k: v for k, v in attrs.items() if v is not None}
        if opdef is not None:
            if opdef.pretty_symbol and extra.get("symbol") is not None:
                attrs.setdefault(opdef.pretty_symbol, SymbolRefAttr(extra["symbol"]))
            if opdef.pretty_value and extra.get("dense") is not None:
                dense_tok = extra["dense"]
                declared = (sig.results[0] if sig and sig.results else None) if sig else None
                if declared is None:
                    self.error(dense_tok, "a constant needs its type, e.g. ': tensor<2xf32>'")
                else:
                    value = self.dense(dense_tok, declared)
                    if value is not None:
                        attrs.setdefault(opdef.pretty_value, value)
                    broken |= value is None
            if "over" in extra:
                attrs.setdefault("num_carries", IntAttr(extra["over"]))
        elif extra:
            self.error(name_tok, f"unknown operation '{name}' cannot use the pretty form")
        if sig is not None:
            result_types = list(sig.results)
        else:
            result_types = None
        op = create_op(name, operands, [], attrs, regions, loc)
        if broken:
            self.diags.reported.add(op)
        if result_types is None:
            result_types = self.infer(op, len(result_names) if result_names else None)
        if result_names and len(result_names) != len(result_types):
            if sig is not None or ERROR not in result_types:
                self.error(results_tok, f"{len(result_names)} result names for {len(result_types)} results", op_name=name)
            result_types = (result_types + [ERROR] * len(result_names))[:len(result_names)]
        names = result_names or []
        hints = names if len(names) == len(result_types) else [None] * len(result_types)
        op.set_results(result_types, [h[0] for h in hints] if hints and hints[0] else None)
        if result_names:
            if results_tok is not None and ":" in str(results_tok).split("=")[0] and len(result_names) > 0 and result_names[0][1]:
                base = result_names[0][0].split("#")[0]
                self.define(base, op.results, results_tok)
            else:
                offset = 0
                text = str(results_tok)
                for (hint, _), r in zip(result_names, op.results):
                    offset = text.index("%" + hint, offset)
                    self.define(hint, [r], results_tok, offset)
        return op

    def result_names(self, tok):
        """[(name hint, grouped)]: `%r:2 =` gives r#0, r#1; `%a, %b =` gives a, b."""
        if tok is None:
            return []
        text = str(tok).rstrip()[:-1]
        parts = [p.strip()[1:] for p in text.split(",")]
        if len(parts) == 1 and ":" in parts[0]:
            base, _, n = parts[0].partition(":")
            return [(f"{base}#{i}", True) for i in range(int(n))]
        return [(p, False) for p in parts]

    def infer(self, op, count):
        if op.opdef is None:
            return [ERROR] * (count or 0)
        try:
            types = op.opdef.infer(op, self.ctx)
            return list(types)
        except (VerifyError, Exception):  # reported by the verifier, which knows all symbols
            n = count if count is not None else (op.opdef.results or 0)
            return [ERROR] * n

    def explicit_loc(self, tok):
        text = str(tok)[4:-1]
        if text == "unknown":
            return None
        m = re.match(r'("(?:[^"\\]|\\.)*")(?::(\d+):(\d+))?\Z', text)
        return Location(unquote(m.group(1)), int(m.group(2) or 0), int(m.group(3) or 0), explicit=True)

    def generic(self, children):
        name_tok = children[0]
        operands, regions, attrs = [], [], {}
        sig = None
        for c in children[1:]:
            if isinstance(c, Token):
                if c.type == "OPERANDS":
                    operands = self.uses(c)
                elif c.type == "SIG":
                    sig = self.sig_of(c)
            elif isinstance(c, dict):
                attrs = c
            elif isinstance(c, list):
                regions = c
        name = unquote(str(name_tok))
        if sig is not None and len(sig.inputs) != len(operands):
            self.error(name_tok, f"the signature has {len(sig.inputs)} operand types for {len(operands)} operands", op_name=name)
        return (name, name_tok, operands, attrs, sig, regions, {})

    def generic_regions(self, children):
        return list(children)

    def pretty(self, children):
        name_tok = children[0]
        operands, attrs, sig, regions, extra = [], {}, None, [], {}
        short_types = None
        for c in children[1:]:
            if isinstance(c, tuple) and c and c[0] == "args":
                operands, extra = c[1], c[2]
            elif isinstance(c, dict):
                attrs = c
            elif isinstance(c, FunctionType):
                sig = c
            elif isinstance(c, list) and c and c[0] == "types":
                short_types = c[1]
            elif isinstance(c, Region):
                regions = [c]
        name = str(name_tok)
        if short_types is not None:
            sig = self.short_signature(name, name_tok, operands, short_types)
        elif sig is not None and len(sig.inputs) != len(operands):
            self.error(name_tok, f"the signature has {len(sig.inputs)} operand types for {len(operands)} operands", op_name=name)
        return (name, name_tok, operands, attrs, sig, regions, extra)

    def short_signature(self, name, tok, operands, types):
        """`: T` after an op: its result types if it has no operands, its operand types if it has no
        results, or one type shared by all operands and results."""
        opdef = lookup_op(name)
        if not operands:
            return FunctionType((), tuple(types))
        if opdef is not None and opdef.results == 0:
            if len(types) != len(operands):
                self.error(tok, f"{len(types)} types for {len(operands)} operands", op_name=name)
            return FunctionType(tuple(types), ())
        if len(types) != 1:
            self.error(tok, "expected a signature '(operand types) -> result types'", op_name=name)
            return None
        n = opdef.results if opdef is not None and opdef.results else 1
        return FunctionType(tuple(types) * len(operands), tuple(types) * n)

    def args_values(self, children):
        return ("args", self.uses(children[0]), {})

    def args_over(self, children):
        carries = self.uses(children[0]) if len(children) == 3 else []
        seqs = self.uses(children[-1])
        return ("args", carries + seqs, {"over": len(carries)})

    def args_symbol(self, children):
        return ("args", self.uses(children[1]) if len(children) > 1 else [], {"symbol": _symbol_name(str(children[0])[1:])})

    def args_dense(self, children):
        return ("args", [], {"dense": children[0]})

    def call(self, children):
        kw, sym = children[0], children[1]
        operands, attrs, sig = [], {}, None
        for c in children[2:]:
            if isinstance(c, Token) and c.type == "OPERANDS":
                operands = self.uses(c)
            elif isinstance(c, Token) and c.type == "SIG":
                sig = self.sig_of(c)
            elif isinstance(c, dict):
                attrs = c
        attrs["callee"] = SymbolRefAttr(_symbol_name(str(sym)[1:]))
        return ("func.call", kw, operands, attrs, sig, [], {})

    def ret(self, children):
        kw = children[0]
        operands = []
        types = None
        for c in children[1:]:
            if isinstance(c, Token):
                operands = self.uses(c)
            elif isinstance(c, list):
                types = c[1]
        sig = FunctionType(tuple(types or ()), ())
        if types is not None and len(types) != len(operands):
            self.error(kw, f"{len(types)} types for {len(operands)} operands", op_name="func.return")
        return ("func.return", kw, operands, {}, sig, [], {})

    def signature(self, children):
        c = children[0]
        if isinstance(c, Token):
            return self.sig_of(c)
        return c

    def type_list(self, children):
        return ["types", [self.type_of(t) for t in children]]

    def region(self, children):
        if isinstance(children[0], Block):
            block, ops = children[0], children[1:]
        else:
            block, ops = Block(), children
        for op in ops:
            block.append(op)
        self.end_region_scope(block)
        return Region([block])

    def end_region_scope(self, block):
        """Names defined in a region go out of scope at its end (sibling regions may reuse them)."""
        for v in block.args + [r for op in block for r in op.results]:
            name = (v.name_hint or "").split("#")[0]
            bound = self.values.get(name)
            if bound is not None and v in bound:
                del self.values[name]

    def block_header(self, children):
        args = [c for c in children[1:] if c is not None]
        block = Block([a[1] for a in args], [a[0] for a in args])
        for (name, _, tok), arg in zip(args, block.args):
            self.define(name, [arg], tok)
        return block

    def block_arg(self, children):
        tok = children[0]
        if "," in tok:
            self.error(tok, "expected ':' and a type after each block argument")
        return (str(tok).split(",")[0].strip()[1:], self.type_of(children[1]), tok)

    # --- attributes ---------------------------------------------------------------------------------
    def attr_dict(self, children):
        out = {}
        for entry in children:
            if entry is None:
                continue
            (name, tok), value = entry
            if name in out:
                self.error(tok, f"duplicate attribute '{name}'")
            out[name] = value
        return out

    def attr_entry(self, children):
        tok = children[0]
        name = unquote(str(tok)) if tok.type == "STRING" else str(tok)
        return (name, tok), (children[1] if len(children) > 1 else UNIT)

    def int_attr(self, c):
        text = str(c[0])
        if len(c) > 1:
            t = self.type_of(c[1])
            if getattr(t, "is_float", False):
                if text.lower().startswith(("0x", "-0x", "+0x")):
                    return FloatAttr(_float_from_bits(int(text, 16), t), t)
                return FloatAttr(_round_to(float(int(text, 0)), t), t)
            return IntAttr(int(text, 0), t)
        return IntAttr(int(text, 0))

    def float_attr(self, c):
        if len(c) > 1:
            t = self.type_of(c[1])
            if not getattr(t, "is_float", False):
                self.error(c[1], f"a float literal cannot have type {c[1]}")
                return FloatAttr(float(c[0]))
            return FloatAttr(_round_to(float(c[0]), t), t)
        return FloatAttr(float(c[0]))

    def str_attr(self, c):
        return StringAttr(unquote(str(c[0])))

    def true_attr(self, c):
        return BoolAttr(True)

    def false_attr(self, c):
        return BoolAttr(False)

    def unit_attr(self, c):
        return UNIT

    def array_attr(self, c):
        return ArrayAttr(tuple(x for x in c if x is not None))

    def dense_array_attr(self, c):
        tok = c[0]
        body = str(tok)[6:-1]
        element, _, values = body.partition(":")
        element = element.strip()
        if element not in ("i1", "i8", "i32", "i64", "f32", "f64"):
            self.error(tok, f"unsupported array element type '{element}'", 6)
            return None
        try:
            conv = float if element.startswith("f") else int
            vals = tuple(conv(v.strip()) for v in values.split(",")) if values.strip() else ()
        except ValueError:
            self.error(tok, f"invalid array literal '{tok}'")
            return None
        return DenseArrayAttr(ELEMENT_TYPES[element], vals)

    def type_attr(self, c):
        return TypeAttr(self.type_of(c[0]))

    def sig_attr(self, c):
        sig = self.sig_of(c[0])
        return TypeAttr(sig) if sig is not None else None

    def symbol_attr(self, c):
        return SymbolRefAttr(_symbol_name(str(c[0])[1:]))

    def dense_attr(self, c):
        return self.dense(c[0], self.type_of(c[1]))

    def dict_attr(self, c):
        return DictAttr(tuple(c[0].items()))

    def dense(self, tok, t):
        if not isinstance(t, TensorType):
            if t is not ERROR:
                self.error(tok, f"dense<...> needs a tensor type, got {t}")
            return None
        if not t.is_static:
            self.error(tok, f"a constant needs a static shape, got {t}")
            return None
        try:
            return DenseAttr(parse_dense(str(tok)[6:-1], t), t)
        except ValueError as e:
            self.error(tok, str(e))
            return None


def _symbol_name(text: str) -> str:
    return unquote(text) if text.startswith('"') else text


def _error_value():
    from .core import Value
    return Value(ERROR)


def _round_to(v: float, t) -> float:
    from .types import round_to_element
    return float(round_to_element(np.array(v), t))


def _float_from_bits(bits: int, t) -> float:
    if t.name == "f64":
        return float(np.array(bits, np.uint64).view(np.float64))
    if t.name == "f16":
        return float(np.array(bits, np.uint16).view(np.float16))
    if t.name == "bf16":
        return float(np.array(bits << 16, np.uint32).view(np.float32))
    return float(np.array(bits, np.uint32).view(np.float32))


_HEX = re.compile(r"[-+]?0x[0-9a-fA-F]+")


def parse_dense(body: str, t: TensorType) -> np.ndarray:
    """The payload of `dense<...>`: nested lists, a splat, or a hex string of little-endian bytes."""
    from .types import round_to_element
    body = body.strip()
    dtype = t.element.np_dtype
    if body.startswith('"'):
        raw = bytes.fromhex(unquote(body)[2:])
        storage = np.dtype(np.uint16) if t.element.name == "bf16" else dtype
        arr = np.frombuffer(raw, storage)
        if t.element.name == "bf16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        if arr.size not in (1, int(np.prod(t.shape))):
            raise ValueError(f"hex payload has {arr.size} elements, the type needs {int(np.prod(t.shape))}")
        return np.broadcast_to(arr, t.shape).copy() if arr.size == 1 else arr.reshape(t.shape).copy()
    if t.element.is_float and "0x" in body:
        body = _HEX.sub(lambda m: json.dumps(_float_from_bits(int(m.group(0), 16), t.element)), body)
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, RecursionError):
        raise ValueError(f"invalid dense literal for {t}") from None
    try:
        if t.element.is_bool:
            arr = np.array(data)
            if arr.dtype != np.bool_ and arr.size:
                raise ValueError(f"i1 constants take true/false, got {arr.reshape(-1)[0]!r}")
            arr = arr.astype(np.bool_)
        else:
            arr = np.array(data)
            if arr.dtype == object or arr.dtype.kind not in "iufb":
                raise ValueError(f"dense literal for {t} has ragged or non-numeric data")
            if t.element.is_int and arr.dtype.kind == "f":
                raise ValueError(f"integer constant {t} has non-integer values")
            if t.element.is_int and arr.size and (arr.min() < np.iinfo(dtype).min or arr.max() > np.iinfo(dtype).max):
                raise ValueError(f"value out of range for {t.element}")
            arr = round_to_element(arr.astype(dtype), t.element)
    except OverflowError:
        raise ValueError(f"value out of range for {t.element}") from None
    except ValueError as e:
        if "inhomogeneous" in str(e) or "sequence" in str(e):
            raise ValueError(f"dense literal for {t} is ragged (rows of different lengths)") from None
        raise
    if arr.ndim == 0:
        return np.full(t.shape, arr, dtype)
    if arr.shape != t.shape:
        raise ValueError(f"dense literal has shape {list(arr.shape)} but the type is {t}")
    return arr


_EXPECT = {"RESULTS": "'%name ='", "OPERANDS": "a value (%name)", "SIG": "a signature '(types) -> types'",
           "TYPE": "a type", "DENSE": "dense<...>", "LOC": "loc(...)", "SYMBOL": "a symbol (@name)",
           "OP_NAME": "an operation name", "STRING": "a string", "BARE_ID": "an identifier", "INT": "an integer",
           "FLOAT": "a float", "BLOCK_ID": "a block label (^bb0)", "LBRACE": "'{'", "RBRACE": "'}'",
           "LPAR": "'('", "RPAR": "')'", "COLON": "':'", "COMMA": "','", "EQUAL": "'='", "LSQB": "'['",
           "RSQB": "']'", "MORETHAN": "'>'", "__ANON_0": "'->'", "ARRAY": "array<...>", "$END": "end of input",
           "GLOBAL": "'mlc.global'", "FUNC": "'func.func'", "CALL": "'func.call'", "RETURN": "'return'",
           "OVER": "'over'", "VISIBILITY": "'private'", "TRUE": "'true'", "FALSE": "'false'", "UNIT": "'unit'",
           "MODULE": "'module'", "ATTRIBUTES": "'attributes'", "RARROW": "'->'"}


def _describe(expected) -> str:
    names = sorted({_EXPECT.get(e, e.lower() if not e.startswith("__") else repr(e)) for e in expected})
    if len(names) > 6:
        names = names[:6] + ["..."]
    return ", ".join(names)


_parser = None
_builder = None
_lock = threading.Lock()


def _lark() -> Lark:
    """The parser is built once; its callbacks are the methods of one IRBuilder, reset per parse."""
    global _parser, _builder
    if _parser is None:
        load_dialects()
        _builder = IRBuilder("<input>", Diagnostics())
        _parser = Lark(GRAMMAR, parser="lalr", lexer="contextual", transformer=_builder, maybe_placeholders=True)
    return _parser


def parse_module(text: str, filename: str = "<input>", diags: Diagnostics | None = None) -> Module:
    """Parse text into a Module without verifying it. Syntax errors raise DiagnosticError at once;
    other problems are added to `diags` (raised here when it is not given)."""
    Sources.add(filename, text)
    own = diags is None
    diags = Diagnostics() if own else diags
    module = None
    with _lock:
        parser = _lark()
        _builder.__init__(filename, diags)
        try:
            module = parser.parse(text)
        except UnexpectedInput as e:
            diags.errors.insert(0, _syntax_error(e, filename))
        except RecursionError:
            diags.error(Location(filename, 1, 1), "input is nested too deeply")
        except Exception as e:  # a bug in a callback must not become a traceback
            diags.error(Location(filename, 1, 1), f"internal error while parsing ({type(e).__name__}: {e}); please report it")
    if module is None or own:
        diags.check()
    return module


def _syntax_error(e: UnexpectedInput, filename: str):
    from .diagnostics import Diagnostic
    line, col = getattr(e, "line", 1) or 1, getattr(e, "column", 1) or 1
    if isinstance(e, UnexpectedToken):
        tok = e.token
        if tok.type == "$END":
            msg = f"unexpected end of input, expected {_describe(e.expected)}"
            lines = Sources._texts.get(filename) or [""]
            line, col = max(len(lines), 1), len(lines[-1]) + 1 if lines else 1
        else:
            msg = f"unexpected '{tok}', expected {_describe(e.expected)}"
    elif isinstance(e, UnexpectedCharacters):
        ch = e.char
        msg = f"unexpected character '{ch}'" if ch.isprintable() else f"unexpected character {ch!r}"
        if e.allowed:
            msg += f", expected {_describe(e.allowed)}"
    elif isinstance(e, UnexpectedEOF):
        msg = f"unexpected end of input, expected {_describe(e.expected)}"
    else:
        msg = str(e).splitlines()[0]
    loc = Location(filename, line, col)
    return Diagnostic(loc, f"syntax error: {msg}", source_line=Sources.line(loc))
