"""The package's floors (docs/ARCHITECTURE.md): every import of every module runs down or sideways,
and no two packages import each other, directly or around a loop.

Imports are read from the source (``ast``), function-level imports included, so a lazy import
that runs up a floor is caught as well as a top-level one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ernieq"

# unit (a subpackage or a top-level module of ernieq) -> floor; lower floors never import higher ones
FLOORS = {
    "errors": 0, "codecs": 0, "text": 0, "progress": 0, "killpoints": 0, "provenance": 0, "device": 0,
    "distributed": 0,
    "model": 1,
    "config": 2, "recipes": 2, "transforms": 2, "kernels": 2,
    "runtime": 3, "calibration": 3, "formats": 3,
    "eval": 4, "bench": 4, "demo": 4, "encode": 4, "quantize": 4, "plan": 4,
    "publish": 5,
    "api": 6,
    "cli": 7, "__main__": 7,
}  # fmt: skip


def _unit(module: str) -> str | None:
    """'ernieq.kernels.ops' -> 'kernels'; 'ernieq' itself -> None."""
    parts = module.split(".")
    return parts[1] if parts[0] == "ernieq" and len(parts) > 1 else None


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every ernieq module ``path`` imports (absolute and relative, at any depth)."""
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            found |= {f"{base}.{a.name}" for a in node.names} | {base}
    return {m for m in found if m == "ernieq" or m.startswith("ernieq.")}


def _edges() -> dict[tuple[str, str], str]:
    """(importing unit, imported unit) -> one module that makes the edge."""
    edges = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        src = _unit(_module_name(path))
        for target in _imports(path):
            dst = _unit(target)
            if src and dst and src != dst:
                edges.setdefault((src, dst), _module_name(path))
    return edges


def test_every_unit_has_a_floor():
    units = {_unit(_module_name(p)) for p in PACKAGE.rglob("*.py")} - {None}
    assert units <= set(FLOORS), f"give these a floor in FLOORS and docs/ARCHITECTURE.md: {sorted(units - set(FLOORS))}"


def test_no_import_runs_up_a_floor():
    up = [f"{where} imports ernieq.{dst} (floor {FLOORS[dst]} above {src}'s {FLOORS[src]})"
          for (src, dst), where in _edges().items() if FLOORS.get(dst, 0) > FLOORS.get(src, 0)]
    assert not up, "\n".join(up)


def test_no_cycle_between_packages():
    graph: dict[str, set[str]] = {}
    for src, dst in _edges():
        graph.setdefault(src, set()).add(dst)
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                loop = path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
                pytest.fail("import cycle: " + " -> ".join(loop))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    """The walker must not miss the imports it exists to catch."""
    pkg = tmp_path / "ernieq" / "model"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    mod = pkg / "x.py"
    mod.write_text("def f():\n    from ernieq.eval.report import build\n    from ..api import load\n")
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path / "ernieq"
    try:
        assert _imports(mod) >= {"ernieq.eval.report", "ernieq.api", "ernieq.api.load"}
    finally:
        PACKAGE = saved
