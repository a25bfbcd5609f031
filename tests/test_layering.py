"""The parts of lrpretrain import one way, lowest first (README, "Development"; DESIGN, "Layering").

Pure `ast`: nothing of the package is imported. Every `import lrpretrain...`, `from lrpretrain... import`
and relative import counts, at module level and inside functions; `if TYPE_CHECKING:` blocks do not
(they never run). A module's part is its first name under `lrpretrain` (`lrpretrain.distributed.fsdp2`
-> `distributed`); imports within one part are free. Run this file as a script to print the report.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Source folders and the package names they are installed under (pyproject's package-dir).
ROOTS = {"lrpretrain": "lrpretrain", "kernels": "lrpretrain.kernels", "data_recipes": "lrpretrain.data_recipes"}

# Lowest first, as in the README ("Layering"). A part may import parts of lower layers only; parts of
# one layer do not import each other (so each layer reads, and tests, without its neighbours).
LAYERS: list[tuple[str, ...]] = [
    ("lrpretrain", "errors", "paths", "comm"),  # the package root (its version), user errors, cache paths,
                                                # process-group helpers: over the standard library and torch
    ("config", "options", "data_recipes", "storage"),  # schemas + Hydra composition; the tools' --options;
                                                # data recipes; failed writes as one line, pid checks
    ("model", "data", "optim", "kernels"),      # leaves over torch, with the shared numeric helpers
    ("methods",),                               # plugins over model + optim + kernels
    ("checkpoint", "metrics"),                  # run-state files; metric sinks
    ("distributed",),                           # strategies: wrap, step, save and load a built run
    ("train",),                                 # assembles a run (config loading, checks across parts), the loop
    ("estimate", "generate", "export"),         # tools over a run
    ("report",),                                # tables and plots of runs, with their estimates
    ("sweep", "evaluation"),                    # a sweep ends with its report; eval runs on an export
    ("bench",),                                 # measures a run, beside its estimate
    ("cli",),                                   # the command line
]

# Function-local imports of lrpretrain modules that stay: (importing file, imported module) -> why.
# Only for deferring an optional or heavy third-party dependency that the imported module needs at
# import time (the import carries a comment saying so). None at present: deepspeed, bitsandbytes,
# submitit and wandb are imported on first use inside the modules that need them.
FUNCTION_IMPORTS_ALLOWED: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Import:
    file: str      # path relative to the repository
    line: int
    source: str    # importing module
    target: str    # imported module (as far as it resolves)
    in_function: bool

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def module_files() -> dict[str, Path]:
    """Module name -> file, for every .py of the package."""
    out = {}
    for folder, package in ROOTS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = list(path.relative_to(REPO / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([package, *parts])] = path
    return out


def part_of(module: str) -> str:
    names = module.split(".")
    return names[1] if len(names) > 1 else names[0]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    rel = str(path.relative_to(REPO))
    found: list[Import] = []

    def add(node: ast.stmt, target: str, in_function: bool) -> None:
        if target == "lrpretrain" or target.startswith("lrpretrain."):
            found.append(Import(rel, node.lineno, module, target, in_function))

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child, in_function)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(node, alias.name, in_function)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            for alias in node.names:
                sub = f"{origin}.{alias.name}"  # `from pkg import submodule`
                add(node, sub if sub in modules else origin, in_function)
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, False)
    return list(dict.fromkeys(found))  # `from x import a, b` is one import


def all_imports() -> list[Import]:
    modules = module_files()
    return [imp for module, path in modules.items() for imp in imports_of(module, path, modules)]


def part_edges(imports: list[Import]) -> dict[tuple[str, str], list[Import]]:
    edges: dict[tuple[str, str], list[Import]] = defaultdict(list)
    for imp in imports:
        a, b = part_of(imp.source), part_of(imp.target)
        if a != b:
            edges[a, b].append(imp)
    return edges


def strongly_connected(nodes: set[str], edges: set[tuple[str, str]]) -> list[list[str]]:
    """Tarjan's components with more than one part: each is one import cycle (or several)."""
    succ: dict[str, list[str]] = defaultdict(list)
    for a, b in sorted(edges):
        succ[a].append(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in succ[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(nodes):
        if v not in index:
            connect(v)
    return out


def shortest_cycle(start: str, comp: set[str], edges: set[tuple[str, str]]) -> list[str]:
    """The shortest path start -> ... -> start inside one component (breadth first)."""
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for a, b in sorted(edges):
                if a != v or b not in comp:
                    continue
                if b == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if b not in prev:
                    prev[b] = v
                    nxt.append(b)
        frontier = nxt
    return []


def _lines(imps: list[Import]) -> str:
    return ", ".join(sorted({f"{i.where} ({i.target}{', in a function' if i.in_function else ''})"
                             for i in imps}))


def cycle_report(imports: list[Import]) -> str:
    edges = part_edges(imports)
    nodes = {n for e in edges for n in e}
    out = []
    for comp in strongly_connected(nodes, set(edges)):
        members = set(comp)
        inner = {e: imps for e, imps in edges.items() if e[0] in members and e[1] in members}
        out.append(f"import cycle through {len(comp)} parts: {', '.join(comp)}")
        out.append("  e.g. " + " -> ".join(shortest_cycle(comp[0], members, set(inner))))
        for (a, b), imps in sorted(inner.items()):
            out.append(f"  {a} -> {b}: {_lines(imps)}")
    return "\n".join(out)


def layer_report(imports: list[Import]) -> str:
    layer = {part: i for i, parts in enumerate(LAYERS) for part in parts}
    out = []
    parts = {part_of(m) for m in module_files()}
    for part in sorted(parts - set(layer)):
        out.append(f"part '{part}' is in no layer: add it to LAYERS (and the README's list)")
    for (a, b), imps in sorted(part_edges(imports).items()):
        if a in layer and b in layer and layer[b] >= layer[a]:
            how = "a peer" if layer[a] == layer[b] else "a higher layer"
            out.append(f"{a} -> {b} ({how}): {_lines(imps)}")
    return "\n".join(out)


def function_import_report(imports: list[Import]) -> str:
    out = []
    for imp in imports:
        if imp.in_function and (imp.file, imp.target) not in FUNCTION_IMPORTS_ALLOWED:
            out.append(f"{imp.where}: function-local import of {imp.target}")
    return "\n".join(out)


def _fail_with(report: str) -> None:
    if report:
        pytest.fail("\n" + report, pytrace=False)


def test_parts_form_no_import_cycle():
    _fail_with(cycle_report(all_imports()))


def test_imports_follow_the_layers():
    _fail_with(layer_report(all_imports()))


def test_no_function_local_imports_of_lrpretrain():
    _fail_with(function_import_report(all_imports()))


def test_the_cycle_finder_finds_cycles():
    edges = {("a", "b"), ("b", "c"), ("c", "a"), ("c", "d"), ("d", "e")}
    assert strongly_connected({"a", "b", "c", "d", "e"}, edges) == [["a", "b", "c"]]
    assert shortest_cycle("a", {"a", "b", "c"}, edges) == ["a", "b", "c", "a"]


def test_allowed_function_imports_still_exist():
    """An allow-list entry whose import is gone is stale: remove it."""
    present = {(i.file, i.target) for i in all_imports() if i.in_function}
    assert not set(FUNCTION_IMPORTS_ALLOWED) - present


if __name__ == "__main__":
    imports = all_imports()
    for title, report in [("cycles", cycle_report(imports)), ("layering", layer_report(imports)),
                          ("function-local imports", function_import_report(imports))]:
        print(f"== {title}: {'none' if not report else ''}")
        if report:
            print(report)
    sys.exit(0)
