"""The import layering of the source tree, read with `ast` (nothing is imported).

Folders and the packages they install as: mlc/ (mlc), ir/ (mlc.ir), passes/ (mlc.passes),
codegen/ (mlc.codegen), runtime/ (mlc.runtime). The layers may import from:

  ir        ir only
  passes    ir and passes
  codegen   ir and codegen
  runtime   ir and runtime
  mlc       anything (the top-level package's own modules: api, cli, ops, tracing, nn, ...)

Every import statement counts for the layering, also those inside function bodies (a deferred import
is still a dependency). Relative imports are resolved against the importing module's package.
Separately, the module-level imports (those run when the module is first imported: not in function
bodies nor under `if TYPE_CHECKING:`) must not form a cycle among the project's modules.
"""
from __future__ import annotations

import ast
import functools
import pathlib
import warnings
from dataclasses import dataclass

ROOT = pathlib.Path(__file__).resolve().parent.parent
FOLDERS = {"mlc": "mlc", "ir": "mlc.ir", "passes": "mlc.passes", "codegen": "mlc.codegen", "runtime": "mlc.runtime"}
LAYERS = ("ir", "passes", "codegen", "runtime")  # mlc.<layer>; anything else named mlc.* is the top level
ALLOWED = {"ir": {"ir"}, "passes": {"ir", "passes"}, "codegen": {"ir", "codegen"}, "runtime": {"ir", "runtime"}}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    path: pathlib.Path
    line: int
    text: str  # the statement as written
    target: str  # the project module (or package attribute's package) it depends on
    module_level: bool  # runs when the importing module is imported


def discover() -> dict[str, pathlib.Path]:
    """Module name -> file, for every .py file in the source folders."""
    modules = {}
    for folder, package in FOLDERS.items():
        base = ROOT / folder
        assert base.is_dir(), f"source folder {base} is missing"
        for path in sorted(base.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


MODULES = discover()


def layer(name: str) -> str | None:
    """ir/passes/codegen/runtime, 'mlc' for the top-level package, None for anything outside mlc."""
    parts = name.split(".")
    if parts[0] != "mlc":
        return None
    if len(parts) > 1 and parts[1] in LAYERS:
        return parts[1]
    return "mlc"


def is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def resolve(module: str, level: int, name: str | None) -> str:
    """The absolute name of `from <level dots><name> import ...` written in `module`."""
    if level == 0:
        return name or ""
    package = module.split(".") if is_package(module) else module.split(".")[:-1]
    if level - 1 > len(package) - 1:
        raise AssertionError(f"{MODULES[module]}: relative import beyond the top-level package")
    base = package[: len(package) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def walk_imports(tree: ast.Module):
    """(import node, module_level) for every import in the tree. Module level: not inside a function
    (or lambda) and not under `if TYPE_CHECKING:`; class bodies run at import time, so they count."""
    def visit(node, module_level):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, module_level
            return
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            module_level = False
        if isinstance(node, ast.If) and is_type_checking(node.test):
            for child in node.body:
                yield from visit(child, False)
            for child in node.orelse:
                yield from visit(child, module_level)
            return
        for child in ast.iter_child_nodes(node):
            yield from visit(child, module_level)

    yield from visit(tree, True)


def imports_of(module: str, source: str | None = None) -> list[Import]:
    """The imports of project modules in `module` (its file, or `source` standing in for it)."""
    path = MODULES[module]
    if source is None:
        source = path.read_text()
    with warnings.catch_warnings():  # e.g. invalid escape sequences: not this test's business
        warnings.simplefilter("ignore")
        tree = ast.parse(source, filename=str(path))
    found = []
    for node, module_level in walk_imports(tree):
        text = ast.get_source_segment(source, node) or ast.unparse(node)
        text = " ".join(text.split())
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = resolve(module, node.level, node.module)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                # `from pkg import sub` imports the submodule; `from pkg import name` needs pkg itself
                targets.append(sub if sub in MODULES else base)
        for target in dict.fromkeys(targets):
            if layer(target) is not None:
                found.append(Import(module, path, node.lineno, text, target, module_level))
    return found


@functools.cache
def all_imports() -> list[Import]:
    return [imp for module in MODULES for imp in imports_of(module)]


def where(imp: Import) -> str:
    return f"{imp.path.relative_to(ROOT)}:{imp.line}"


def test_sources_found():
    """The walk sees every layer (so an empty tree cannot pass the tests below vacuously)."""
    seen = {layer(m) for m in MODULES}
    assert seen == {"mlc", *LAYERS}, f"expected modules in every layer, found {sorted(seen)}"
    assert any(imp.target.startswith("mlc.ir") for imp in all_imports()), "no imports of mlc.ir were found"


def layering_violations(imports) -> list[str]:
    bad = []
    for imp in imports:
        source, target = layer(imp.module), layer(imp.target)
        if source == "mlc" or target in ALLOWED[source]:
            continue
        scope = "" if imp.module_level else " (not at module level)"
        shown = "the top-level package mlc" if target == "mlc" else f"layer mlc.{target}"
        allowed = " and ".join(f"mlc.{a}" for a in sorted(ALLOWED[source]))
        bad.append(f"{where(imp)}: {imp.text!r}{scope}: {imp.module} imports {imp.target} ({shown}); "
                   f"mlc.{source} may import only from {allowed}")
    return bad


def test_checker_resolves_imports():
    """The checker itself: relative imports resolve against the package, imports in functions and
    under TYPE_CHECKING count for the layering but not as module level, `from pkg import sub` names
    the submodule and `from pkg import attr` the package."""
    source = ("import numpy\n"
              "from . import files\n"
              "from ..ir.core import Module\n"
              "from mlc import ir, api_function\n"
              "def f():\n"
              "    from ..passes import PassManager\n"
              "if TYPE_CHECKING:\n"
              "    from mlc.codegen import llvm\n")
    found = [(imp.target, imp.line, imp.module_level) for imp in imports_of("mlc.runtime.jit", source)]
    assert found == [("mlc.runtime.files", 2, True), ("mlc.ir.core", 3, True), ("mlc.ir", 4, True),
                     ("mlc", 4, True), ("mlc.passes", 6, False), ("mlc.codegen.llvm", 8, False)], found
    bad = layering_violations(imports_of("mlc.runtime.jit", source))
    assert [b.split(":")[1] for b in bad] == ["4", "6", "8"], bad
    assert resolve("mlc.nn.layers", 2, "ops") == "mlc.ops"
    assert resolve("mlc.ir", 1, "core") == "mlc.ir.core"  # a package's own __init__


def test_layering():
    bad = layering_violations(all_imports())
    assert not bad, f"{len(bad)} import(s) break the layering:\n" + "\n".join(bad)


def find_cycles(edges: dict[str, dict[str, Import]]) -> list[tuple[list[str], list[str]]]:
    """(component, cycle) for each strongly connected component with a cycle in it (Tarjan): its
    modules, and a shortest cycle through the first of them, [m0, m1, ..., mk] for m0 -> m1 -> ... ->
    mk -> m0."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []
    counter = [0]

    def connect(v):  # recursion depth is at most the number of modules
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in edges.get(v, ()):
                components.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)

    cycles = []
    for component in components:
        members = set(component)
        start = component[0]
        # breadth-first from start, within the component, back to start: a shortest cycle
        parent, frontier, end = {start: None}, [start], None
        while frontier and end is None:
            nxt = []
            for v in frontier:
                for w in sorted(edges.get(v, ())):
                    if w == start:
                        end = v
                        break
                    if w in members and w not in parent:
                        parent[w] = v
                        nxt.append(w)
                if end is not None:
                    break
            frontier = nxt
        path = [end]
        while path[-1] != start:
            path.append(parent[path[-1]])
        cycles.append((component, path[::-1]))
    return cycles


def test_cycle_finder():
    """The checker itself: a -> b -> c -> a is found (as one cycle, with its three steps), d -> a is not
    part of it, and e <-> f is a second one."""
    edges = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}, "e": {"f": 1}, "f": {"e": 1}}
    assert find_cycles(edges) == [(["a", "b", "c"], ["a", "b", "c"]), (["e", "f"], ["e", "f"])]
    assert find_cycles({"a": {"b": 1}, "b": {"c": 1}}) == []


def test_no_import_cycles():
    edges: dict[str, dict[str, Import]] = {}
    for imp in all_imports():
        if imp.module_level and imp.target in MODULES and imp.target != imp.module:
            edges.setdefault(imp.module, {}).setdefault(imp.target, imp)
    problems = []
    for component, cycle in find_cycles(edges):
        steps = []
        for a, b in zip(cycle, cycle[1:] + [cycle[0]]):
            imp = edges[a][b]
            steps.append(f"  {where(imp)}: {a} imports {b}: {imp.text!r}")
        problems.append(f"cycle among {', '.join(component)}:\n" + "\n".join(steps))
    assert not problems, (f"{len(problems)} import cycle(s) at module level (imports inside functions "
                          f"are not counted):\n" + "\n".join(problems))
