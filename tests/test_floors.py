"""The floors in docs/architecture.md are the code's: the test reads the doc's table, then every
import in fedfair_med/ and cli/.

* every file of the package belongs to exactly one part of the table (a new package needs a floor);
* a part imports only parts on lower floors — peers on one floor never import each other;
* no two modules import each other, directly or round a longer loop.

Function-level (lazy) imports count like any other. Imports under ``if TYPE_CHECKING:`` serve
annotations only and never run, so they are not counted.
"""

from __future__ import annotations

import ast
import functools
import re
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
SOURCES = ("fedfair_med", "cli")


def floors(doc: str) -> dict[str, int]:
    """``{part: floor}`` from the rows ``| N | `part`, `part` | … |`` of the doc's Floors table."""
    section = doc.split("\n## Floors", 1)[1].split("\n## ", 1)[0]
    out: dict[str, int] = {}
    for number, cell in re.findall(r"^\|\s*(\d+)\s*\|([^|]*)\|", section, re.M):
        for part in re.findall(r"`([^`]+)`", cell):
            out[part] = int(number)
    return out


def module_name(path: Path) -> str:
    """The dotted name a file is imported by (``cli/x.py`` is installed as ``fedfair_med.cli.x``)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "cli":
        parts.insert(0, "fedfair_med")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part_of(path: Path, parts: dict[str, int]) -> str | None:
    """The longest table part that holds ``path`` (a folder ``x/`` or a file ``x.py``)."""
    rel = path.relative_to(ROOT).as_posix()
    held = [p for p in parts if rel == p or (p.endswith("/") and rel.startswith(p))]
    return max(held, key=len) if held else None


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_modules(tree: ast.AST) -> list[tuple[str, int]]:
    """Every absolute ``fedfair_med`` import (and each name imported from a package) with its line."""
    out: list[tuple[str, int]] = []
    pending = [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, ast.If) and _type_checking_only(node):
            pending.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, node.lineno))
            out += [(f"{node.module}.{alias.name}", node.lineno) for alias in node.names]
        pending.extend(ast.iter_child_nodes(node))
    return [(name, line) for name, line in out if name.split(".")[0] == "fedfair_med"]


@functools.lru_cache(maxsize=1)
def import_graph() -> tuple[dict[str, Path], dict[str, set[tuple[str, int]]]]:
    """Modules by name, and ``{module: {(imported module, line)}}`` within the project."""
    files = {module_name(p): p for top in SOURCES for p in sorted((ROOT / top).rglob("*.py"))}
    edges: dict[str, set[tuple[str, int]]] = defaultdict(set)
    for name, path in files.items():
        for target, line in imported_modules(ast.parse(path.read_text(encoding="utf-8"))):
            # a module importing its own package (or itself) is no edge
            if target in files and target != name and not name.startswith(target + "."):
                edges[name].add((target, line))
    return files, edges


def layering_breaks(parts: dict[str, int]) -> tuple[list[str], list[str]]:
    """(files that belong to no part, imports that do not go to a lower floor)."""
    files, edges = import_graph()
    placed = {name: part_of(path, parts) for name, path in files.items()}
    homeless = sorted(str(files[n].relative_to(ROOT)) for n, part in placed.items() if part is None)
    upward = []
    for name, targets in sorted(edges.items()):
        source = placed[name]
        for target, line in sorted(targets):
            destination = placed[target]
            if source and destination and source != destination and parts[destination] >= parts[source]:
                upward.append(f"{files[name].relative_to(ROOT)}:{line} ({source}, floor "
                              f"{parts[source]}) imports {target} ({destination}, floor "
                              f"{parts[destination]})")
    return homeless, upward


def import_circles(edges: dict[str, set[tuple[str, int]]]) -> list[list[str]]:
    """Groups of modules that reach each other through imports (Tarjan's strongly connected sets)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target, _ in edges.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                circles.append(sorted(group))

    for name in sorted(edges):
        if name not in index:
            visit(name)
    return circles


@pytest.fixture(scope="module")
def parts() -> dict[str, int]:
    return floors(DOC.read_text(encoding="utf-8"))


def test_the_floors_table_names_every_package_once(parts) -> None:
    homeless, _ = layering_breaks(parts)
    assert not homeless, f"files on no floor of docs/architecture.md's table: {homeless}"
    assert parts["fedfair_med/contracts.py"] == 0 and parts["cli/"] == max(parts.values())
    for part in parts:  # every part the table names exists
        assert (ROOT / part).exists(), part


def test_imports_only_go_down_the_floors(parts) -> None:
    _, upward = layering_breaks(parts)
    assert not upward, "imports that go up or sideways:\n" + "\n".join(upward)


def test_no_import_circle() -> None:
    assert not import_circles(import_graph()[1])


def test_the_checks_catch_what_they_guard(parts) -> None:
    """An upward or sideways import and a circle are found (the checks can fail)."""
    doc = ("# Doc\n\n## Floors\n\n| floor | part |\n|---|---|\n| 2 | `top/` |\n| 1 | `a/`, `b/` |\n"
           "| 0 | `ground.py` |\n\n## Next\n")
    assert floors(doc) == {"top/": 2, "a/": 1, "b/": 1, "ground.py": 0}
    tree = ast.parse("import os\nfrom fedfair_med.x import y\nif TYPE_CHECKING:\n"
                     "    from fedfair_med.z import w\ndef f():\n    import fedfair_med.lazy\n")
    assert sorted(imported_modules(tree)) == [("fedfair_med.lazy", 6), ("fedfair_med.x", 2),
                                             ("fedfair_med.x.y", 2)]
    # the real table with runtime/ moved below tasks/ must report runtime's imports of tasks
    sunk = {**parts, "fedfair_med/runtime/": parts["fedfair_med/tasks/"]}
    _, upward = layering_breaks(sunk)
    assert any("(fedfair_med/runtime/," in line and "(fedfair_med/tasks/," in line for line in upward)
    loop = {"a": {("b", 1)}, "b": {("c", 1)}, "c": {("a", 1)}, "d": {("a", 1)}}
    assert import_circles(loop) == [["a", "b", "c"]]
