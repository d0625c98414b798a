"""The package's architecture holds: no import cycles between modules, and lower layers never import higher ones
(config < runtime < data < models < train < tools < cli), counting function-local imports too."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "ia3_dist"
LAYERS = {"errors": 0, "config": 0, "runtime": 1, "data": 2, "models": 3, "train": 4, "tools": 5, "cli": 6,
          "__main__": 6, "__init__": 0}


def _module_name(f: Path) -> str:
    parts = list(f.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(f: Path) -> set[str]:
    mod = _module_name(f)
    pkg = mod if f.name == "__init__.py" else mod.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(f.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("ia3_dist"):
                out.add(target)
                out.update(f"{target}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("ia3_dist"))
    return out


def _graph() -> dict[str, set[str]]:
    files = {_module_name(f): f for f in PKG.rglob("*.py")}
    return {m: {t for t in _imports(f) if t in files and t != m} for m, f in files.items()}


def _layer(mod: str) -> int:
    return LAYERS[mod.split(".")[1] if "." in mod else "__init__"]


def test_no_import_cycles() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_lower_layers_never_import_higher_ones() -> None:
    bad = [f"{m} imports {t}" for m, ts in _graph().items() for t in ts
           if not t.endswith("__init__") and _layer(t) > _layer(m) and t.count(".") > 0]
    assert not bad, bad


def test_every_subpackage_is_packaged() -> None:
    """setup.cfg lists packages explicitly: a new subpackage missing there would vanish from the wheel."""
    cfg = (PKG.parent / "setup.cfg").read_text()
    for d in PKG.rglob("__init__.py"):
        name = _module_name(d)
        assert f"    {name}\n" in cfg or f"= {name}\n" in cfg, f"{name} is not in setup.cfg's packages"
