"""The layout's rules that the import contracts cannot state: no import circle anywhere in the package (function
level imports included), and no code outside the backbone modules that names a backbone or tests a trunk class."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "agegender"


def _circles(graph: object, modules: list[str]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each an import circle."""
    edges = {m: sorted(set(graph.find_modules_directly_imported_by(m)) & set(modules)) for m in modules}  # type: ignore[attr-defined]
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for m in modules:
        if m not in index:
            visit(m)
    return found


def test_no_import_circle() -> None:
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("agegender")
    assert _circles(graph, sorted(graph.modules)) == []


def test_the_circle_finder_finds_a_circle() -> None:
    class Graph:
        imports = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}

        def find_modules_directly_imported_by(self, m: str) -> set[str]:
            return self.imports[m]

    assert _circles(Graph(), ["a", "b", "c", "d"]) == [["a", "b", "c"]]


def test_only_the_backbone_modules_name_a_backbone() -> None:
    pattern = re.compile(r'"vgg-face"|"dlib-resnet"|isinstance\([\w.]+, *(VGG|Dlib|Vgg)')
    found = [
        f"{p.relative_to(SRC)}:{n}"
        for p in sorted(SRC.rglob("*.py"))
        if p.parent.name != "backbones"
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if pattern.search(line)
    ]
    assert found == []
