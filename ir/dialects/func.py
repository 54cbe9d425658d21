"""The `func` dialect: functions, calls and returns (MLIR's func)."""
from __future__ import annotations

from ..core import FuncOp
from ..registry import SYMBOL, USES_SYMBOLS, Attr, OpDef, Terminator, VerifyError
from ..types import FunctionType, types_compatible


def _types(types) -> str:
    return "(" + ", ".join(map(str, types)) + ")"


class Func(OpDef):
    name = "func.func"
    results = 0
    regions = 1
    traits = {SYMBOL}
    attrs = {"sym_name": Attr("str", required=True), "function_type": Attr("type", required=True),
             "sym_visibility": Attr("str", choices=("public", "private")), "arg_attrs": Attr("any"),
             "res_attrs": Attr("any")}
    cls = FuncOp


    @staticmethod
    def verify(op, ctx):
        ftype = op.attr("function_type")
        if not isinstance(ftype, FunctionType):
            raise VerifyError(f"'function_type' must be a function type, got {ftype}")
        args = [a.type for a in op.regions[0].blocks[0].args]
        if args != list(ftype.inputs):
            raise VerifyError(f"entry block arguments {_types(args)} do not match the signature {_types(ftype.inputs)}")


class Return(Terminator):
    name = "func.return"
    parent = "func.func"

    @staticmethod
    def check_values(op, func):
        want = func.attr("function_type").results
        got = op.operand_types
        if len(want) != len(got) or not all(types_compatible(a, b) for a, b in zip(want, got)):
            raise VerifyError(f"returns {_types(got)} but the function returns {_types(want)}")


class Call(OpDef):
    name = "func.call"
    operands = (0, None)
    results = None
    traits = {USES_SYMBOLS}
    attrs = {"callee": Attr("symbol", required=True)}

    @staticmethod
    def infer(op, ctx):
        callee = ctx.symbols.get(op.attr("callee"))
        if callee is None or callee.name != "func.func":
            raise VerifyError(f"'@{op.attr('callee')}' is not a function in this module")
        ftype = callee.attr("function_type")
        got = op.operand_types
        if len(got) != len(ftype.inputs) or not all(types_compatible(a, b) for a, b in zip(ftype.inputs, got)):
            raise VerifyError(f"arguments {_types(got)} do not match @{op.attr('callee')}{_types(ftype.inputs)}")
        return list(ftype.results)

    @staticmethod
    def interpret(ins, op, ctx):
        return ctx.call(op.attr("callee"), ins)
