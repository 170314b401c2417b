"""Every import of the project's packages, read from the source, and the rules they must obey.

Owns the static import graph (modules are parsed with :mod:`ast`, never
imported) and the checks run on it: package arrows, forbidden outside modules,
the declared order of layers inside each package, barriers between parts of
one package, and cycles between files. The rules themselves are data
(:class:`Rules`); the project's own live in :mod:`tests.layering.rules`.

An import is counted wherever it is written: at the top of a module, inside
a function, under ``if TYPE_CHECKING:``, relative (``from . import x``), and
``importlib.import_module("literal")`` / ``__import__("literal")`` calls.
``from pkg import name`` counts as importing ``pkg.name`` when that is a
module of the tree, else as importing ``pkg``. Importing ``a.b.c`` does not
count as importing ``a`` or ``a.b`` (their ``__init__`` runs, but that is the
package's business, not an arrow the importer drew).

Imports only the standard library: no product code, no pytest.
"""

from __future__ import annotations

import ast
import fnmatch
import importlib.util
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "Import",
    "Barrier",
    "Rules",
    "Graph",
    "Report",
    "scan",
    "check",
]

TYPE_CHECKING_KIND = "TYPE_CHECKING"
FUNCTION_KIND = "in function"
DYNAMIC_KIND = "importlib"
INIT = "__init__"


@dataclass(frozen=True, slots=True)
class Import:
    """One import statement (or literal dynamic import) of one module."""

    importer: str
    #: a module of the tree, or the dotted name of an outside module
    target: str
    path: Path
    line: int
    #: how it is written: TYPE_CHECKING, in function, importlib (empty: plain top level)
    kinds: frozenset[str] = frozenset()

    def where(self, root: Path) -> str:
        kinds = f" [{', '.join(sorted(self.kinds))}]" if self.kinds else ""
        return f"{_rel(self.path, root)}:{self.line}{kinds}"


@dataclass(frozen=True, slots=True)
class Barrier:
    """Inside ``package``, modules matching ``importers`` never import those matching ``imported``.

    For walls the order of layers does not express (two sides of one package).
    """

    package: str
    importers: tuple[str, ...]
    imported: tuple[str, ...]
    reason: str


@dataclass(frozen=True, slots=True)
class Rules:
    """What the import graph must obey.

    ``packages``: each checked package and the other project packages it may import.
    ``layers``: per package, its layers lowest first; a layer is a tuple of module
    patterns relative to the package (fnmatch wildcards allowed; ``"vop"`` matches
    ``vop`` and every ``vop.*``; ``"__init__"`` is the package's own ``__init__``).
    A module belongs to the layer of its most specific matching pattern (most
    dotted parts, then most literal characters) and may import only modules of
    its own layer or lower ones. Every module of a package with layers must match.
    ``forbidden_outside``: per package, outside top-level modules it must never import.
    ``barriers``: extra one-way walls inside a package.
    """

    packages: Mapping[str, frozenset[str]]
    layers: Mapping[str, Sequence[Sequence[str]]] = field(default_factory=dict)
    forbidden_outside: Mapping[str, frozenset[str]] = field(default_factory=dict)
    barriers: Sequence[Barrier] = ()


# --------------------------------------------------------------------------
# reading the source


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def find_modules(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    """Every ``*.py`` module of ``packages`` under ``root``, by dotted name, and
    every C extension module by its ``*.pyi`` stub (a stub with no ``.py`` beside it)."""
    modules: dict[str, Path] = {}
    for package in packages:
        found = sorted((root / package).rglob("*.py"))
        found += [
            p for p in sorted((root / package).rglob("*.pyi")) if not p.with_suffix(".py").exists()
        ]
        for path in found:
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == INIT:
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _mentions_type_checking(test: ast.expr) -> bool:
    return any(
        (isinstance(n, ast.Name) and n.id == TYPE_CHECKING_KIND)
        or (isinstance(n, ast.Attribute) and n.attr == TYPE_CHECKING_KIND)
        for n in ast.walk(test)
    )


def _literal(node: ast.expr | None) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return None


class _Collector(ast.NodeVisitor):
    """Collects the raw dotted targets of one module, with line and kinds."""

    def __init__(self, module: str, is_package: bool, known: Mapping[str, Path]) -> None:
        self.module = module
        self.package = module if is_package else module.rpartition(".")[0]
        self.known = known
        #: (target, line, kinds), in source order; a dict so `from m import a, b` counts once
        self.found: dict[tuple[str, int, frozenset[str]], None] = {}
        self._kinds: list[str] = []

    def _add(self, target: str, node: ast.AST, *extra: str) -> None:
        self.found[target, getattr(node, "lineno", 0), frozenset((*self._kinds, *extra))] = None

    def _inside(self, kind: str, nodes: Iterable[ast.AST]) -> None:
        self._kinds.append(kind)
        try:
            for n in nodes:
                self.visit(n)
        finally:
            self._kinds.pop()

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        # decorators and defaults run where the function is defined; the body when it is called
        body = [node.body] if isinstance(node, ast.Lambda) else node.body
        for child in ast.iter_child_nodes(node):
            if child not in body:
                self.visit(child)
        self._inside(FUNCTION_KIND, body)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._function(node)

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        self._function(node)

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self._function(node)

    def visit_If(self, node: ast.If) -> None:
        if not _mentions_type_checking(node.test):
            self.generic_visit(node)
            return
        self.visit(node.test)
        self._inside(TYPE_CHECKING_KIND, node.body)
        for n in node.orelse:
            self.visit(n)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = self._resolve("." * node.level + (node.module or ""), self.package, node)
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            self._add(sub if alias.name != "*" and sub in self.known else base, node)

    def visit_Call(self, node: ast.Call) -> None:
        self.generic_visit(node)
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name not in ("import_module", "__import__") or not node.args:
            return
        target = _literal(node.args[0])
        if target is None:
            return  # a computed name cannot be checked statically
        if target.startswith("."):
            anchor = self._anchor(node)
            if anchor is None:
                return
            target = self._resolve(target, anchor, node)
        self._add(target, node, DYNAMIC_KIND)

    def _anchor(self, node: ast.Call) -> str | None:
        """The ``package`` argument of ``import_module(".x", package)``, if it is known."""
        arg = node.args[1] if len(node.args) > 1 else None
        for kw in node.keywords:
            if kw.arg == "package":
                arg = kw.value
        if isinstance(arg, ast.Name) and arg.id == "__package__":
            return self.package
        if isinstance(arg, ast.Name) and arg.id == "__name__":
            return self.module
        return _literal(arg)

    def _resolve(self, name: str, package: str, node: ast.AST) -> str:
        if not name.startswith("."):
            return name
        try:
            return importlib.util.resolve_name(name, package)
        except ImportError as e:
            raise ValueError(
                f"{self.module}:{getattr(node, 'lineno', 0)}: cannot resolve {name!r}: {e}"
            ) from e


def imports_of(module: str, path: Path, known: Mapping[str, Path]) -> list[Import]:
    """Every import ``module`` (the file ``path``) makes; targets resolved against ``known``.

    Raises:
        SyntaxError: the file does not parse.
        ValueError: a relative import reaches above the top-level package.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    collector = _Collector(module, path.name == f"{INIT}.py", known)
    collector.visit(tree)
    return [
        Import(module, _owner(target, known), path, line, kinds)
        for target, line, kinds in collector.found
    ]


def _owner(target: str, known: Mapping[str, Path]) -> str:
    """The deepest module of the tree that ``target`` names, else ``target`` itself."""
    name = target
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return target


# --------------------------------------------------------------------------
# the graph


@dataclass(slots=True)
class Graph:
    """The modules of a tree and every import they make."""

    root: Path
    modules: dict[str, Path]
    imports: list[Import]

    def edges(self) -> dict[str, dict[str, list[Import]]]:
        """importer -> imported module of the tree -> the imports drawing that arrow."""
        out: dict[str, dict[str, list[Import]]] = {m: {} for m in self.modules}
        for imp in self.imports:
            if imp.target in self.modules and imp.target != imp.importer:
                out[imp.importer].setdefault(imp.target, []).append(imp)
        return out


def scan(root: Path, packages: Iterable[str]) -> Graph:
    """Parse every module of ``packages`` under ``root``."""
    modules = find_modules(root, packages)
    imports = [imp for m, p in modules.items() for imp in imports_of(m, p, modules)]
    return Graph(root, modules, imports)


# --------------------------------------------------------------------------
# the checks


@dataclass(slots=True)
class Report:
    """Everything the graph does against the rules, one readable line (or block) each."""

    package_arrows: list[str] = field(default_factory=list)
    forbidden_outside: list[str] = field(default_factory=list)
    unplaced: list[str] = field(default_factory=list)
    ambiguous: list[str] = field(default_factory=list)
    layer_arrows: list[str] = field(default_factory=list)
    barrier_arrows: list[str] = field(default_factory=list)
    cycles: list[str] = field(default_factory=list)

    def sections(self) -> dict[str, list[str]]:
        return {
            "imports between packages that the rules forbid": self.package_arrows,
            "outside modules a package must not import": self.forbidden_outside,
            "modules in no declared layer": self.unplaced,
            "modules matching two layers equally": self.ambiguous,
            "imports pointing up the declared layers": self.layer_arrows,
            "imports through a barrier": self.barrier_arrows,
            "import cycles between files": self.cycles,
        }

    @property
    def ok(self) -> bool:
        return not any(self.sections().values())

    def render(self) -> str:
        out = []
        for title, lines in self.sections().items():
            if lines:
                out.append(f"{title} ({len(lines)}):")
                out.extend(f"  {line}" for line in lines)
        return "\n".join(out) if out else "no violation"


def _top(name: str) -> str:
    return name.partition(".")[0]


def _relative(module: str, package: str) -> str:
    return INIT if module == package else module[len(package) + 1 :]


def _matches(rel: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(rel, pattern) or fnmatch.fnmatchcase(rel, f"{pattern}.*")


def _specificity(pattern: str) -> tuple[int, int]:
    return pattern.count(".") + 1, sum(c not in "*?[]" for c in pattern)


def _layer_of(rel: str, layers: Sequence[Sequence[str]]) -> tuple[int | None, list[int]]:
    """The layer of ``rel`` (None if no pattern matches) and, if ambiguous, the tied layers."""
    best: tuple[int, int] | None = None
    tied: set[int] = set()
    for index, layer in enumerate(layers):
        for pattern in layer:
            if not _matches(rel, pattern):
                continue
            spec = _specificity(pattern)
            if best is None or spec > best:
                best, tied = spec, {index}
            elif spec == best:
                tied.add(index)
    if best is None:
        return None, []
    return min(tied), sorted(tied) if len(tied) > 1 else []


def _describe(layers: Sequence[Sequence[str]], index: int) -> str:
    return f"layer {index} ({', '.join(layers[index])})"


def check(graph: Graph, rules: Rules) -> Report:
    """Every violation of ``rules`` in ``graph``."""
    report = Report()
    placed = _place(graph, rules, report)
    _check_packages(graph, rules, report)
    edges = graph.edges()
    _check_inside_packages(graph.root, edges, rules, placed, report)
    report.cycles.extend(_describe_cycle(c, edges, graph.root) for c in _strong_components(edges))
    return report


def _place(graph: Graph, rules: Rules, report: Report) -> dict[str, int]:
    """The declared layer of each module (reporting the unplaced and the ambiguous)."""
    placed: dict[str, int] = {}
    for module in sorted(graph.modules):
        package = _top(module)
        layers = rules.layers.get(package)
        if layers is None:
            continue
        index, tied = _layer_of(_relative(module, package), layers)
        where = _rel(graph.modules[module], graph.root)
        if index is None:
            report.unplaced.append(
                f"{module} ({where}) matches no layer of {package}: add a pattern for it to "
                "the layer it belongs to in the declared table (tests/layering/rules.py)"
            )
        elif tied:
            report.ambiguous.append(
                f"{module} ({where}) matches layers {tied} of {package} equally: "
                "make one pattern more specific"
            )
        else:
            placed[module] = index
    return placed


def _check_packages(graph: Graph, rules: Rules, report: Report) -> None:
    """Arrows between packages, and outside modules a package must not import."""
    for imp in sorted(graph.imports, key=lambda i: (i.importer, i.target, i.line)):
        src, dst = _top(imp.importer), _top(imp.target)
        where = imp.where(graph.root)
        allowed = rules.packages.get(src)
        if imp.target in graph.modules or dst in rules.packages:
            if src != dst and allowed is not None and dst not in allowed:
                may = (
                    f"only {', '.join(sorted(allowed))}" if allowed else "no other project package"
                )
                report.package_arrows.append(
                    f"{imp.importer} -> {imp.target}  {where}: {src} may import {may}"
                )
        elif dst in rules.forbidden_outside.get(src, frozenset()):
            report.forbidden_outside.append(
                f"{imp.importer} -> {imp.target}  {where}: {src} must not import {dst}"
            )


def _check_inside_packages(
    root: Path,
    edges: Mapping[str, Mapping[str, list[Import]]],
    rules: Rules,
    placed: Mapping[str, int],
    report: Report,
) -> None:
    """Arrows up the declared layers, and arrows through a barrier."""
    for importer, targets in sorted(edges.items()):
        package = _top(importer)
        layers = rules.layers.get(package)
        barriers = [b for b in rules.barriers if b.package == package]
        for target, imps in sorted(targets.items()):
            if _top(target) != package:
                continue
            where = "; ".join(i.where(root) for i in imps)
            src, dst = placed.get(importer), placed.get(target)
            if layers is not None and src is not None and dst is not None and dst > src:
                report.layer_arrows.append(
                    f"{importer} -> {target}  {where}: {_describe(layers, src)} "
                    f"imports {_describe(layers, dst)}"
                )
            a, b = _relative(importer, package), _relative(target, package)
            for barrier in barriers:
                if any(_matches(a, p) for p in barrier.importers) and any(
                    _matches(b, p) for p in barrier.imported
                ):
                    report.barrier_arrows.append(
                        f"{importer} -> {target}  {where}: {barrier.reason}"
                    )


# --------------------------------------------------------------------------
# cycles


def _strong_components(edges: Mapping[str, Mapping[str, object]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module (iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(edges):
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found, key=lambda c: (-len(c), c))


def _shortest_cycle(
    start: str, members: set[str], edges: Mapping[str, Mapping[str, object]]
) -> list[str]:
    """A shortest path ``start -> ... -> start`` inside one component (breadth first)."""
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child in sorted(edges[node]):
            if child not in members:
                continue
            if child == start:
                path = [node]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [*reversed(path), start]
            if child not in parent:
                parent[child] = node
                queue.append(child)
    raise AssertionError(f"{start} is in no cycle")  # members of one component always are


def _describe_cycle(
    component: list[str], edges: Mapping[str, Mapping[str, list[Import]]], root: Path
) -> str:
    members = set(component)
    lines = [
        f"cycle of {len(component)} modules: {', '.join(component)}",
        f"    e.g. {' -> '.join(_shortest_cycle(component[0], members, edges))}",
        "    its arrows:",
    ]
    for importer in component:
        for target, imps in sorted(edges[importer].items()):
            if target in members:
                where = "; ".join(i.where(root) for i in imps)
                lines.append(f"      {importer} -> {target}  {where}")
    return "\n".join(lines)
