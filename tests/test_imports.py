"""No import cycle among Gazal's modules, counting imports inside functions too (a late import
hides a cycle from Python, not from the reader): each module owns one thing, and depends one way."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "gazal"


def _edges() -> dict[str, set[str]]:
    mods = {".".join(("gazal", *f.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__"): f
            for f in SRC.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            edges[m] |= {t for t in targets if t in mods and t != m}
    return edges


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path, or None (depth-first search with colours)."""
    colour = dict.fromkeys(edges, 0)
    path: list[str] = []

    def visit(v: str) -> list[str] | None:
        colour[v] = 1
        path.append(v)
        for w in sorted(edges[v]):
            if colour[w] == 1:
                return path[path.index(w):] + [w]
            if colour[w] == 0 and (found := visit(w)):
                return found
        colour[v] = 2
        path.pop()
        return None

    for v in sorted(edges):
        if colour[v] == 0 and (found := visit(v)):
            return found
    return None


def test_the_finder_sees_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_gazal():
    edges = _edges()
    assert len(edges) > 20 and "gazal.config" in edges["gazal.training"]  # it reads the real modules
    found = _cycle(edges)
    if found:
        pytest.fail("import cycle: " + " -> ".join(found))
