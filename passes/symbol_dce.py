"""symbol-dce: delete private functions and globals that no public function reaches."""
from __future__ import annotations

from mlc.ir.core import Module, symbol_uses

from .manager import Pass


class SymbolDCE(Pass):
    name = "symbol-dce"
    summary = "remove unreachable private functions and unused globals"

    def run(self, module: Module) -> None:
        symbols = module.symbols()
        live = [name for name, f in module.functions.items() if not f.is_private]
        reached = set(live)
        while live:
            for used in symbol_uses(symbols[live.pop()]):
                if used not in reached and used in symbols:
                    reached.add(used)
                    live.append(used)
        for name, op in symbols.items():
            if name not in reached:
                op.erase()
