"""The package's import structure, checked on the source (AST) without importing anything.

* compile_backend never imports ``benchmarks``: that directory is not installed (pyproject
  ships ``compile_backend*`` only), so such an import works in a checkout and fails after
  ``pip install``.
* No module imports another compile_backend module's underscore name (``from .x import _y``):
  a private name is free to change without its callers knowing.
* No import cycle between compile_backend modules. The graph has an edge A -> B for every
  ``import``/``from ... import`` statement in A that names B, at module level or inside a
  function: a lazy import only moves a cycle to the first call, it still ties the two modules
  together. Edges: ``import a.b`` and ``from a.b import n`` go to ``a.b``; when ``n`` is a
  submodule they also go to ``a.b.n``, and then the edge to the package ``a.b`` itself is left
  out where A lives inside ``a.b`` (``from . import x``, ``from .. import zoo``): Python has
  initialised a module's parent packages before the module runs, so that edge would only restate
  the nesting; a directory without ``__init__.py`` (``kernels/``) has no code and gets no edge.
  Not counted:
  - statements under ``if TYPE_CHECKING:``, which never run;
  - function-level imports from or to the top package ``compile_backend/__init__.py``: it is
    the lazy facade (``explain``, ``Report``, ``refit``, ``compile_backend`` are imported on
    first use so that ``import compile_backend`` stays cheap), so it lazily depends on most of
    the package, and a lazy ``from compile_backend import __version__`` in a submodule would
    otherwise always close a cycle. Module-level imports of the facade do count.
  - imports by name at run time (``importlib.import_module``), which only tests can follow.
* ``kernels/`` is the bottom layer: it imports nothing from compile_backend outside ``kernels/``
  (at module level, in functions, or for type checking).
"""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set, Tuple

PACKAGE = "compile_backend"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE


@dataclasses.dataclass(frozen=True)
class ImportStmt:
    importer: str           # dotted name of the importing module
    path: Path
    line: int
    target: str             # dotted module the statement names (resolved when relative)
    name: Optional[str]     # the imported name of ``from target import name``, else None
    lazy: bool              # inside a function (runs at the first call)
    type_checking: bool     # under ``if TYPE_CHECKING:`` (never runs)

    def where(self) -> str:
        return f"{self.path.relative_to(ROOT.parent)}:{self.line}"


def _modules() -> Dict[str, Path]:
    """Dotted name -> file for every module of the package (a package is its ``__init__.py``)."""
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()
#: directories without ``__init__.py`` (``kernels/``): namespace packages, no code of their own
NAMESPACES = {".".join(d.relative_to(ROOT.parent).parts) for d in [ROOT, *ROOT.rglob("*")]
              if d.is_dir() and d.name != "__pycache__" and not (d / "__init__.py").exists()}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(module: str, path: Path) -> Iterator[ImportStmt]:
    is_package = path.name == "__init__.py"

    def visit(node: ast.AST, lazy: bool, type_checking: bool) -> Iterator[ImportStmt]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield ImportStmt(module, path, child.lineno, alias.name, None, lazy, type_checking)
            elif isinstance(child, ast.ImportFrom):
                if child.level:  # relative: from the module's package, one level up per extra dot
                    base = module.split(".") if is_package else module.split(".")[:-1]
                    base = base[:len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                for alias in child.names:
                    yield ImportStmt(module, path, child.lineno, target, alias.name, lazy, type_checking)
            yield from visit(
                child,
                lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)),
                type_checking or (isinstance(child, ast.If) and _is_type_checking(child.test)))

    yield from visit(ast.parse(path.read_text(), str(path)), False, False)


IMPORTS: List[ImportStmt] = [stmt for name, path in MODULES.items() for stmt in _imports(name, path)]


def _in_package(target: str) -> bool:
    return target == PACKAGE or target.startswith(PACKAGE + ".")


def _edges(stmt: ImportStmt) -> List[str]:
    """The compile_backend modules a statement imports (see the module docstring)."""
    if not _in_package(stmt.target):
        return []
    submodule = f"{stmt.target}.{stmt.name}" if stmt.name else None
    if submodule in MODULES:
        inside = stmt.importer.startswith(stmt.target + ".")
        return [submodule] if inside or stmt.target in NAMESPACES else [stmt.target, submodule]
    return [stmt.target]


# ----------------------------------------------------------------------------- tests

def test_the_scan_sees_the_package():
    """Guards the tests below against passing on an empty or misread tree."""
    assert {PACKAGE, f"{PACKAGE}.backend", f"{PACKAGE}.kernels.base", f"{PACKAGE}.bench.cli"} <= set(MODULES)
    lazy = [s for s in IMPORTS if s.lazy and s.importer == PACKAGE]
    assert any(s.target == f"{PACKAGE}.explainer" for s in lazy)  # `explain` imports it on first use
    assert all(target in MODULES for s in IMPORTS for target in _edges(s)), "an import names no module"


def test_package_does_not_import_benchmarks():
    bad = [f"{s.where()}: imports {s.target}" for s in IMPORTS
           if s.target == "benchmarks" or s.target.startswith("benchmarks.")]
    assert not bad, ("benchmarks/ is not installed with the package; move what is needed into "
                     "compile_backend:\n" + "\n".join(bad))


def test_no_module_imports_another_modules_private_names():
    bad = [f"{s.where()}: from {s.target} import {s.name}" for s in IMPORTS
           if _in_package(s.target) and s.name and s.name.startswith("_") and not s.name.endswith("__")
           and s.target != s.importer]
    assert not bad, "underscore names are private to their module; make the name public:\n" + "\n".join(bad)


def _graph() -> Dict[str, Dict[str, ImportStmt]]:
    graph: Dict[str, Dict[str, ImportStmt]] = {name: {} for name in MODULES}
    for s in IMPORTS:
        if s.type_checking:
            continue
        for target in _edges(s):
            if target == s.importer:
                continue
            if s.lazy and PACKAGE in (s.importer, target):  # the lazy facade, see the docstring
                continue
            graph[s.importer].setdefault(target, s)
    return graph


def _find_cycle(graph: Dict[str, Dict[str, ImportStmt]]) -> Optional[List[str]]:
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def dfs(node: str) -> Optional[List[str]]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = dfs(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = dfs(start)
            if found:
                return found
    return None


def _module_aliases(stmt_list: List[ImportStmt], importer: str) -> Dict[str, str]:
    """Names a module binds to other compile_backend modules (``from . import expr``)."""
    out = {}
    for s in stmt_list:
        if s.importer != importer or not _in_package(s.target):
            continue
        if s.name and f"{s.target}.{s.name}" in MODULES:
            out[s.name] = f"{s.target}.{s.name}"
    return out


def test_no_module_reads_another_modules_private_names():
    """``expr._helper`` through an imported module is the same leak as ``from .expr import _helper``."""
    bad = []
    for name, path in MODULES.items():
        aliases = _module_aliases(IMPORTS, name)
        if not aliases:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.endswith("__")
                    and aliases[node.value.id] != name):
                bad.append(f"{path.relative_to(ROOT.parent)}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not bad, "underscore names are private to their module; make the name public:\n" + "\n".join(bad)


def test_no_import_cycle():
    graph = _graph()
    cycle = _find_cycle(graph)
    if cycle:
        steps = []
        for a, b in zip(cycle, cycle[1:]):
            s = graph[a][b]
            kind = "in a function" if s.lazy else "at module level"
            steps.append(f"  {a} -> {b}   ({s.where()}, {kind})")
        raise AssertionError("import cycle (move the shared code down a layer):\n" + "\n".join(steps))


def test_cycle_finder_reports_a_cycle():
    def stmt(a: str, b: str) -> ImportStmt:
        return ImportStmt(a, ROOT / "x.py", 1, b, None, False, False)

    graph = {"a": {"b": stmt("a", "b")}, "b": {"c": stmt("b", "c")}, "c": {"a": stmt("c", "a")}, "d": {}}
    assert _find_cycle(graph) == ["a", "b", "c", "a"]
    del graph["c"]["a"]
    assert _find_cycle(graph) is None


def test_kernels_are_the_bottom_layer():
    kernels = f"{PACKAGE}.kernels"
    bad = sorted({f"{s.where()}: {s.importer} imports {target}" for s in IMPORTS
                  if s.importer == kernels or s.importer.startswith(kernels + ".")
                  for target in _edges(s) if not (target == kernels or target.startswith(kernels + "."))})
    assert not bad, "kernels/ must not depend on the layers above it:\n" + "\n".join(bad)


def test_relative_imports_resolve():
    """``from .. import zoo`` in bench/cli.py names compile_backend.zoo, not the package."""
    found: Set[Tuple[str, Optional[str]]] = {
        (s.target, s.name) for s in IMPORTS if s.importer == f"{PACKAGE}.bench.cli"}
    assert (PACKAGE, "zoo") in found and (f"{PACKAGE}.bench.measure", "run_peer") in found
    zoo = next(s for s in IMPORTS if s.importer == f"{PACKAGE}.bench.cli" and s.name == "zoo")
    assert _edges(zoo) == [f"{PACKAGE}.zoo"]
