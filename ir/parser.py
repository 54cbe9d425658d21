"""The textual IR parser: a lark LALR grammar whose callbacks build IR directly (no parse tree).

For speed the lexer does the coarse work: a whole type (`tensor<?x64xf32>`), a whole signature
(`(T, T) -> T`), the result list (`%a, %b =`), an operand list (`%x, %w#1`), a `dense<...>` payload
and a `loc(...)` are each one token, parsed by small cached functions.
"""
from __future__ import annotations

import contextlib
import gc
import json
import re
import threading

import numpy as np
from lark import Lark, Token
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from .attributes import (ArrayAttr, BoolAttr, DenseArrayAttr, DenseAttr, DictAttr, FloatAttr, IntAttr, StringAttr,
                         SymbolRefAttr, TypeAttr, UNIT)
from .core import Block, FuncOp, Module, Operation, Region, Value, create_op
from .diagnostics import Diagnostics, Location, Sources
from .registry import load_dialects, lookup_op
from .types import ERROR, ELEMENT_TYPES, FunctionType, TensorType, parse_type

_T = r"(?:(?:tensor|memref|vector)<[^<>]*>|[a-z][A-Za-z0-9]*)"
_ELEMENTS = "|".join(sorted(ELEMENT_TYPES, key=len, reverse=True))
_TL = rf"(?:{_T}(?:\s*,\s*{_T})*)?"
_V = r"%[A-Za-z0-9_$.\-]+"
_OPERANDS = rf"{_V}(?:#\d+)?(?:\s*,\s*{_V}(?:#\d+)?)*"
_R = rf"(?:{_V}(?::\d+)?(?:\s*,\s*{_V})*\s*=\s*)?"  # an optional result list, `%a, %b =` or `%r:2 =`

GRAMMAR = rf"""
start: module | top*
module: "module" SYMBOL? module_attrs? "{{" top* "}}"
module_attrs: "attributes" attr_dict
top: func | global_decl | op
global_decl: GLOBAL SYMBOL SHORT_SIG attr_dict? LOC?
func: FUNC VISIBILITY? func_sig func_attrs? "{{" op* "}}"
func_sig: SYMBOL "(" [func_arg ("," func_arg)*] ")" func_results?
func_arg: OPERANDS ":" TYPE attr_dict?
func_results: "->" TYPE -> func_result | "->" "(" [result_type ("," result_type)*] ")"
result_type: TYPE attr_dict?
func_attrs: "attributes" attr_dict

op: SIMPLE_OP region* LOC? -> simple_op
  | PRETTY_HEAD pretty_args? attr_dict? (OPSIG | SHORT_SIG)? region* LOC? -> pretty_op
  | GENERIC_HEAD "(" OPERANDS? ")" generic_regions? attr_dict? OPSIG LOC? -> generic_op
  | CALL_HEAD SYMBOL "(" OPERANDS? ")" attr_dict? OPSIG LOC? -> call_op
  | RETURN OPERANDS? SHORT_SIG? LOC? -> return_op
generic_regions: "(" region ("," region)* ")"
pretty_args: OPERANDS -> args_values
           | OPERANDS? OVER OPERANDS -> args_over
           | SYMBOL ("," OPERANDS)? -> args_symbol
           | DENSE -> args_dense
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
           | FTYPE -> sig_attr
           | SYMBOL -> symbol_attr
           | DENSE ":" TYPE -> dense_attr
           | attr_dict -> dict_attr

SIMPLE_OP.5: /{_R}[A-Za-z_][\w$]*\.[\w$.]+(?:[ \t]+{_OPERANDS})?(?:[ \t]*\{{[^{{}}"\n]*\}})?\s*:\s*\(\s*{_TL}\s*\)\s*->\s*(?:{_T}|\(\s*{_TL}\s*\))\s*/
PRETTY_HEAD: /{_R}[A-Za-z_][\w$]*\.[\w$.]+/
GENERIC_HEAD.3: /{_R}"(?:[^"\\\n]|\\.)*"(?=\s*\()/
CALL_HEAD.4: /{_R}func\.call(?![\w$.])/
OPERANDS: /{_OPERANDS}/
OPSIG.2: /:\s*\(\s*{_TL}\s*\)\s*->\s*(?:{_T}|\(\s*{_TL}\s*\))/
SHORT_SIG: /:\s*{_T}(?:\s*,\s*{_T})*/
FTYPE.2: /\(\s*{_TL}\s*\)\s*->\s*(?:{_T}|\(\s*{_TL}\s*\))/
TYPE: /(?:tensor|memref|vector)<[^<>]*>|(?:{_ELEMENTS})(?![\w.$])/
DENSE: /dense<[^<>]*>/
ARRAY: /array<[^<>]*>/
LOC.2: /loc\((?:"(?:[^"\\\n]|\\.)*"(?::\d+:\d+)?|unknown)\)/
SYMBOL: /@(?:[A-Za-z_][\w$.\-]*|"(?:[^"\\\n]|\\.)*")/
BLOCK_ID: /\^[\w$.\-]+/
GLOBAL.2: /mlc\.global(?![\w$.])/
FUNC.2: /func\.func(?![\w$.])/
RETURN.4: /return(?![\w$.])/
OVER: /over(?![\w$.])/
VISIBILITY: /(?:private|public)(?![\w$.])/
TRUE: /true(?![\w$.])/
FALSE: /false(?![\w$.])/
UNIT: /unit(?![\w$.])/
BARE_ID.2: /[A-Za-z_][\w$.\-]*(?=\s*[=,}}])/
STRING: /"(?:[^"\\\n]|\\.)*"/
FLOAT: /[-+]?(?:\d+\.\d*(?:[eE][-+]?\d+)?|\d+[eE][-+]?\d+)/
INT: /[-+]?(?:0x[0-9a-fA-F]+|\d+)/
COMMENT: /\/\/[^\n]*/
%import common.WS
%ignore WS
%ignore COMMENT
"""

_SIG_CACHE: dict[str, FunctionType] = {}
_SHORT_CACHE: dict[str, list] = {}
_ATTR_CACHE: dict[str, dict] = {}
_TYPE_SPLIT = re.compile(_T)


def parse_signature(text: str) -> FunctionType:
    sig = _SIG_CACHE.get(text)
    if sig is None:
        lhs, _, rhs = text.lstrip(":").partition("->")
        sig = FunctionType(tuple(parse_type(t) for t in _TYPE_SPLIT.findall(lhs)),
                           tuple(parse_type(t) for t in _TYPE_SPLIT.findall(rhs)))
        if len(_SIG_CACHE) < 100_000:
            _SIG_CACHE[text] = sig
    return sig


_ESCAPE = re.compile(r'\\([0-9a-fA-F]{2}|.)', re.S)
_ESCAPES = {"n": "\n", "t": "\t", '"': '"', "\\": "\\"}


def unquote(s: str) -> str:
    r"""A string literal's value: MLIR escapes \\ \" \n \t and \XX (hex); others stand for themselves."""
    body = s[1:-1]
    if "\\" not in body:
        return body
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)) if len(m.group(1)) == 2 else _ESCAPES.get(m.group(1), m.group(1)), body)


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

    def sig_of(self, tok: Token, text: str | None = None) -> FunctionType | None:
        try:
            return parse_signature(str(tok) if text is None else text)
        except ValueError as e:
            self.type_error(tok, e)
            return None

    def type_error(self, tok, e: ValueError):
        """Point at the offending type inside a token that holds several."""
        bad = re.search(r"'([^']*)'\Z", str(e))
        pos = str(tok).find(bad.group(1)) if bad else -1
        self.error(tok, str(e), max(pos, 0))

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

    def uses(self, tok: Token | None, text: str | None = None, pos: int = 0) -> list:
        """The values of an operand list `%a, %r#1` (`text` at offset `pos` of `tok`, or the token)."""
        if tok is None:
            return []
        out = []
        text = str(tok) if text is None else text
        values = self.values
        for part in text.split(","):
            name = part.strip()[1:]
            found = values.get(name)
            if found is not None and len(found) == 1:  # the common case
                out.append(found[0])
                pos += len(part) + 1
                continue
            lead = len(part) - len(part.lstrip())
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
        types = self.types_of(type_tok)
        if len(types) != 1:
            self.error(type_tok, "a global has one type")
        attrs = {"sym_name": StringAttr(_symbol_name(str(sym)[1:])), "type": TypeAttr(types[0])}
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
    def split_head(self, tok):
        """`%a, %b = name` -> (result text or None, op name, offset of the name in the token)."""
        text = str(tok)
        if text[0] != "%":
            return None, text, 0
        eq = text.index("=")  # the first '=' ends the result list
        name = text[eq + 1:].lstrip()
        return text[:eq], name, len(text) - len(name)

    def simple_op(self, c):
        """The lexer's fast path: `%r = name %a, %b {flat attrs} : (T, T) -> T` in one token."""
        tok = c[0]
        results, start = None, 0
        if tok[0] == "%":
            eq = tok.index("=")  # the first '=' ends the result list
            results, start = tok[:eq], eq + 1
            while tok[start] in " \t\r\n":
                start += 1
        brace = tok.find("{", start)
        if brace >= 0:
            close = tok.index("}", brace)
            attrs = self.flat_attrs(tok, tok[brace:close + 1], brace)
            head_end, colon = brace, tok.index(":", close)
        else:
            attrs = {}
            head_end = colon = tok.index(":", start)
        head = tok[start:head_end].split(None, 1)
        name = head[0]
        operands = self.uses(tok, head[1], tok.index(head[1], start + len(name))) if len(head) > 1 else []
        p = self.pieces(c[1:])
        p.update(operands=operands, attrs=attrs, sig=self.sig_of(tok, tok[colon:]))
        return self.make_op(tok, results, name, start, p)

    def flat_attrs(self, tok, text, offset) -> dict:
        """A one-line attribute dictionary inside a SIMPLE_OP token, parsed by the attr_dict rule and
        memoised (most ops repeat a few dictionaries, e.g. `{axis = 1}`)."""
        attrs = _ATTR_CACHE.get(text)
        if attrs is not None:
            return attrs
        before = len(self.diags.errors)
        try:
            attrs = _parser.parse(text, start="attr_dict")
        except UnexpectedInput as e:
            self.error(tok, f"syntax error in attributes: {_syntax_message(e)}", offset + (getattr(e, "column", 1) or 1) - 1)
            return {}
        if len(self.diags.errors) > before:  # re-anchor errors from the attribute text into the file
            for d in self.diags.errors[before:]:
                d.loc = Location(self.file, tok.line, tok.column + offset + d.loc.col - 1)
                d.source_line = Sources.line(d.loc)
        elif len(_ATTR_CACHE) < 10_000:
            _ATTR_CACHE[text] = attrs
        return attrs

    def pieces(self, children) -> dict:
        """Sort an op rule's children into operands, attributes, regions, signature and location."""
        p = {"operands": [], "attrs": {}, "regions": [], "sig": None, "types": None, "extra": {}, "loc": None}
        for x in children:
            kind = type(x)
            if kind is dict:
                p["attrs"] = x
            elif kind is list:
                p["regions"] = x
            elif kind is Region:
                p["regions"].append(x)
            elif kind is tuple:  # pretty arguments
                p["operands"], p["extra"] = x[1], x[2]
            elif x is None:
                continue
            elif x.type == "OPERANDS":
                p["operands"] = self.uses(x)
            elif x.type == "OPSIG":
                p["sig"] = self.sig_of(x)
            elif x.type == "SHORT_SIG":
                p["types"] = self.types_of(x)
            else:
                p["loc"] = x
        return p

    def pretty_op(self, c):
        head = c[0]
        results, name, offset = self.split_head(head)
        p = self.pieces(c[1:])
        if p["types"] is not None:
            p["sig"] = self.short_signature(name, head, offset, p["operands"], p["types"])
        return self.make_op(head, results, name, offset, p)

    def generic_op(self, c):
        results, quoted, offset = self.split_head(c[0])
        return self.make_op(c[0], results, unquote(quoted), offset, self.pieces(c[1:]))

    def call_op(self, c):
        results, _, offset = self.split_head(c[0])
        p = self.pieces(c[2:])
        p["attrs"]["callee"] = SymbolRefAttr(_symbol_name(str(c[1])[1:]))
        return self.make_op(c[0], results, "func.call", offset, p)

    def return_op(self, c):
        p = self.pieces(c[1:])
        p["sig"] = FunctionType(tuple(p["types"] or [v.type for v in p["operands"]]), ())
        return self.make_op(c[0], None, "func.return", 0, p)

    def make_op(self, head, results, name, offset, p):
        operands, attrs, sig, regions, extra, loc_tok = p["operands"], p["attrs"], p["sig"], p["regions"], p["extra"], p["loc"]
        if sig is not None and len(sig.inputs) != len(operands):
            self.error(head, f"the signature has {len(sig.inputs)} operand types for {len(operands)} operands", offset, name)
        elif sig is not None:
            for i, (v, t) in enumerate(zip(operands, sig.inputs)):
                if ERROR not in (v.type, t) and v.type != t:
                    named = f" ('%{v.name_hint}')" if v.name_hint else ""
                    self.error(head, f"operand {i}{named} has type {v.type}, but the signature says {t}", offset, name)
        opdef = lookup_op(name)
        loc = Location(self.file, head.line, head.column + offset)
        if loc_tok is not None:
            loc = self.explicit_loc(loc_tok) or loc
        result_names = self.result_names(results)
        broken = bool(attrs) and None in attrs.values()  # an attribute that failed to parse (already reported)
        if broken:
            attrs = {k: v for k, v in attrs.items() if v is not None}
        if extra:
            if opdef is None:
                self.error(head, f"unknown operation '{name}' cannot use the pretty form", offset)
            else:
                if opdef.pretty_symbol and extra.get("symbol") is not None:
                    attrs.setdefault(opdef.pretty_symbol, SymbolRefAttr(extra["symbol"]))
                if opdef.pretty_value and extra.get("dense") is not None:
                    value = self.pretty_dense(extra["dense"], sig)
                    if value is not None:
                        attrs.setdefault(opdef.pretty_value, value)
                    broken |= value is None
                if "over" in extra:
                    attrs.setdefault("num_carries", IntAttr(extra["over"]))
        op = (getattr(opdef, "cls", None) or Operation)(name, operands, (), attrs, regions, loc, None, opdef)
        if broken:
            self.diags.reported.add(op)
        result_types = list(sig.results) if sig is not None else self.infer(op, len(result_names) if result_names else None)
        if result_names and len(result_names) != len(result_types):
            if sig is not None or ERROR not in result_types:
                self.error(head, f"{len(result_names)} result names for {len(result_types)} results", op_name=name)
            result_types = (result_types + [ERROR] * len(result_names))[:len(result_names)]
        hints = [h for h, _ in result_names] if len(result_names) == len(result_types) else None
        op.set_results(result_types, hints)
        if result_names:
            if result_names[0][1]:  # %r:2
                self.define(result_names[0][0].split("#")[0], op.results, head)
            else:
                pos = 0
                for (hint, _), r in zip(result_names, op.results):
                    pos = head.index("%" + hint, pos)
                    self.define(hint, [r], head, pos)
        return op

    def pretty_dense(self, tok, sig):
        declared = sig.results[0] if sig is not None and sig.results else None
        if declared is None:
            self.error(tok, "a constant needs its type, e.g. ': tensor<2xf32>'")
            return None
        return self.dense(tok, declared)

    def result_names(self, text):
        """[(name hint, grouped)]: `%r:2 =` gives r#0, r#1; `%a, %b =` gives a, b."""
        if text is None:
            return []
        if "," not in text and ":" not in text:
            return [(text.strip()[1:], False)]
        parts = [p.strip()[1:] for p in text.split(",")]
        if len(parts) == 1 and ":" in parts[0]:
            base, _, n = parts[0].partition(":")
            return [(f"{base}#{i}", True) for i in range(int(n))]
        return [(p, False) for p in parts]

    def infer(self, op, count):
        if op.opdef is None:
            return [ERROR] * (count or 0)
        try:
            return list(op.opdef.infer(op, self.ctx))
        except Exception:  # reported by the verifier, which knows all symbols
            n = count if count is not None else (op.opdef.results or 0)
            return [ERROR] * n

    def explicit_loc(self, tok):
        text = str(tok)[4:-1]
        if text == "unknown":
            return None
        m = re.match(r'("(?:[^"\\]|\\.)*")(?::(\d+):(\d+))?\Z', text)
        return Location(unquote(m.group(1)), int(m.group(2) or 0), int(m.group(3) or 0), explicit=True)

    def generic_regions(self, children):
        return list(children)

    def short_signature(self, name, tok, offset, operands, types):
        """`: T` after an op: its result types if it has no operands, its operand types if it has no
        results, or one type shared by all operands and results."""
        opdef = lookup_op(name)
        if not operands:
            return FunctionType((), tuple(types))
        if opdef is not None and opdef.short_form_lists_operands(len(operands)):
            if len(types) != len(operands):
                self.error(tok, f"{len(types)} types for {len(operands)} operands", offset, name)
            return FunctionType(tuple(types), ())
        if len(types) != 1:
            self.error(tok, "expected a signature '(operand types) -> result types'", offset, name)
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

    def types_of(self, tok) -> list:
        """The types of a `: T, T` token."""
        types = _SHORT_CACHE.get(str(tok))
        if types is None:
            try:
                types = [parse_type(t) for t in _TYPE_SPLIT.findall(str(tok)[1:])]
            except ValueError as e:
                self.type_error(tok, e)
                return [ERROR]
            if len(_SHORT_CACHE) < 100_000:
                _SHORT_CACHE[str(tok)] = types
        return types

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
    from .types import int_range, round_to_element
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
            low, high = int_range(t.element) if t.element.is_int else (None, None)
            if t.element.is_int and arr.size and (arr.min() < low or arr.max() > high):
                raise ValueError(f"value out of range for {t.element}")
            arr = round_to_element(arr if t.element.name == "bf16" else arr.astype(dtype), t.element)
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


_EXPECT = {"PRETTY_HEAD": "an operation", "GENERIC_HEAD": "an operation", "CALL_HEAD": "'func.call'",
           "OPERANDS": "a value (%name)", "SIMPLE_OP": "an operation", "OPSIG": "a signature ': (types) -> types'", "SHORT_SIG": "': type'",
           "FTYPE": "a function type",
           "TYPE": "a type", "DENSE": "dense<...>", "LOC": "loc(...)", "SYMBOL": "a symbol (@name)",
           "STRING": "a string", "BARE_ID": "an identifier", "INT": "an integer",
           "FLOAT": "a float", "BLOCK_ID": "a block label (^bb0)", "LBRACE": "'{'", "RBRACE": "'}'",
           "LPAR": "'('", "RPAR": "')'", "COLON": "':'", "COMMA": "','", "EQUAL": "'='", "LSQB": "'['",
           "RSQB": "']'", "MORETHAN": "'>'", "__ANON_0": "'->'", "ARRAY": "array<...>", "$END": "end of input",
           "GLOBAL": "'mlc.global'", "FUNC": "'func.func'", "RETURN": "'return'",
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
        _parser = Lark(GRAMMAR, parser="lalr", lexer="contextual", transformer=_builder, maybe_placeholders=True,
                       start=["start", "attr_dict"])
    return _parser


@contextlib.contextmanager
def _no_gc():
    """Building IR allocates many long-lived objects and no garbage cycles: pausing the cyclic
    collector while parsing avoids repeated full-heap scans (2x faster on large modules)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def parse_module(text: str, filename: str = "<input>", diags: Diagnostics | None = None) -> Module:
    """Parse text into a Module without verifying it. Syntax errors raise DiagnosticError at once;
    other problems are added to `diags` (raised here when it is not given)."""
    Sources.add(filename, text)
    own = diags is None
    diags = Diagnostics() if own else diags
    module = None
    with _lock, _no_gc():
        parser = _lark()
        _builder.__init__(filename, diags)
        try:
            module = parser.parse(text, start="start")
        except UnexpectedInput as e:
            diags.errors.insert(0, _syntax_error(e, filename))
        except RecursionError:
            diags.error(Location(filename, 1, 1), "input is nested too deeply")
        except Exception as e:  # a bug in a callback must not become a traceback
            diags.error(Location(filename, 1, 1), f"internal error while parsing ({type(e).__name__}: {e}); please report it")
    if module is None or own:
        diags.check()
    return module


def _syntax_message(e: UnexpectedInput) -> str:
    if isinstance(e, UnexpectedToken):
        if e.token.type == "$END":
            return f"unexpected end of input, expected {_describe(e.expected)}"
        return f"unexpected '{e.token}', expected {_describe(e.expected)}"
    if isinstance(e, UnexpectedCharacters):
        ch = e.char
        msg = f"unexpected character '{ch}'" if ch.isprintable() else f"unexpected character {ch!r}"
        return msg + (f", expected {_describe(e.allowed)}" if e.allowed else "")
    if isinstance(e, UnexpectedEOF):
        return f"unexpected end of input, expected {_describe(e.expected)}"
    return str(e).splitlines()[0]


def _syntax_error(e: UnexpectedInput, filename: str):
    from .diagnostics import Diagnostic
    line, col = getattr(e, "line", 1) or 1, getattr(e, "column", 1) or 1
    msg = _syntax_message(e)
    if isinstance(e, (UnexpectedToken, UnexpectedEOF)) and getattr(getattr(e, "token", None), "type", "$END") == "$END":
        lines = Sources._texts.get(filename) or [""]
        line, col = max(len(lines), 1), len(lines[-1]) + 1 if lines else 1
    loc = Location(filename, line, col)
    return Diagnostic(loc, f"syntax error: {msg}", source_line=Sources.line(loc))
