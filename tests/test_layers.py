"""The package's layers: imports only run downward, and nothing imports in a circle.

    concepts (minidit/*.py)  ->  the run layer (minidit/run/)  ->  the command line (minidit/cli/)
    course tooling (minidit/exercises/) uses concepts only (the command line offers it as
    `minidit exercises`); tutorials never import the command line

Every import is read with `ast`, at module level and inside functions alike, so an import
tucked into a function to dodge a cycle counts as what it is.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "minidit"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def minidit_imports(source: str, name: str, is_package: bool) -> list[tuple[str, bool]]:
    """(imported minidit module, whether the import sits inside a function) of one module's source."""
    found = []
    tree = ast.parse(source)
    inside = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f) if n is not f}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = name.split(".") if is_package else name.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            # `from minidit import x` imports the module minidit.x when there is one
            targets = [f"{base}.{a.name}" if (PACKAGE.parent / f"{base}.{a.name}".replace(".", "/")).exists()
                       or (PACKAGE.parent / (f"{base}.{a.name}".replace(".", "/") + ".py")).exists() else base
                       for a in node.names]
        else:
            continue
        found += [(t, id(node) in inside) for t in targets if t == "minidit" or t.startswith("minidit.")]
    return found


def graph() -> dict[str, list[tuple[str, bool]]]:
    return {module_name(p): minidit_imports(p.read_text(encoding="utf-8"), module_name(p), p.name == "__init__.py")
            for p in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> str:
    parts = module.split(".")
    if module == "minidit.__main__":  # `python -m minidit` is the command line
        return "cli"
    if len(parts) > 1 and parts[1] in ("run", "cli", "exercises"):
        return parts[1]
    return "concept"


def test_the_reader_finds_the_imports():
    source = "import minidit.ddpm\nfrom minidit import sde\nfrom minidit.run import engine\ndef f():\n    import minidit.cli\n"
    assert minidit_imports(source, "minidit.x", False) == [
        ("minidit.ddpm", False), ("minidit.sde", False), ("minidit.run.engine", False), ("minidit.cli", True)]


def test_no_import_cycle():
    edges = {m: {t for t, _ in imports if t != m} for m, imports in graph().items()}
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(edges.get(m, ())):
            if t not in edges:
                continue
            if state.get(t) == 1:
                cycle = path[path.index(t):] + [t] if t in path else [m, t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if not state.get(t):
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(edges):
        if not state.get(m):
            visit(m, [m])


ALLOWED = {"concept": {"concept"}, "exercises": {"concept", "exercises"},
           "run": {"concept", "run"}, "cli": {"concept", "run", "cli", "exercises"}}


def test_imports_run_only_downward():
    wrong = [f"{m} imports {t}" for m, imports in graph().items() for t, _ in imports
             if t != "minidit" and layer(t) not in ALLOWED[layer(m)]]
    assert not wrong, "\n".join(wrong)


def test_no_minidit_import_inside_a_function():
    inside = [f"{m} imports {t} inside a function" for m, imports in graph().items() for t, nested in imports if nested]
    assert not inside, "\n".join(inside)


def test_tutorials_use_the_library_not_the_command_line():
    for path in sorted((ROOT / "tutorials").glob("*.ipynb")):
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        source = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        source = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("!", "%")))
        used = {t for t, _ in minidit_imports(source, "notebook", False)}
        assert not [t for t in used if layer(t) == "cli"], (path.name, sorted(used))
        assert used, f"{path.name} imports nothing from minidit"
