"""Which source files a step of the study depends on: the package modules its notebook imports, and theirs.

The runner fingerprints each step with exactly these files (``step_sources``), so editing a module reruns the
steps that use it and no other; ``tests/test_house.py`` reads the same import graph to keep it free of cycles.
Imports are read from the source (``ast``), never executed.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
ROOT = "tailored"


def module_files(package_dir: Path = PACKAGE_DIR) -> dict[str, Path]:
    """``{"tailored.graph": .../graph.py, "tailored.figures": .../figures/__init__.py, ...}``."""
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imported_modules(node: ast.AST, package: str, known: dict[str, Path]) -> list[str]:
    """The ``tailored`` modules one import statement loads (``from tailored import x`` may name a module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == ROOT]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative import
            keep = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join(keep + ([base] if base else []))
        if base.split(".")[0] != ROOT:
            return []
        subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
        return subs or [base]
    return []


def module_imports(name: str, known: dict[str, Path] | None = None) -> tuple[set[str], list[tuple[int, str]], set[str]]:
    """(our modules imported at the top, ours imported inside functions with line numbers, third-party roots)."""
    known = known or module_files()
    path = known[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top: set[str] = set()
    local: list[tuple[int, str]] = []
    third: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        ours = imported_modules(node, package, known)
        roots = ({a.name.split(".")[0] for a in node.names} if isinstance(node, ast.Import)
                 else {(node.module or "").split(".")[0]} if not node.level else set())
        third |= roots - {ROOT}
        if node.col_offset == 0:
            top.update(m for m in ours if m != name)
        else:
            local += [(node.lineno, m) for m in ours]
    return top, local, third


def import_graph(known: dict[str, Path] | None = None) -> dict[str, set[str]]:
    """Module -> the modules importing it runs first: its top-level imports and their parent packages."""
    known = known or module_files()
    edges = {}
    for name in known:
        top = {m for m in module_imports(name, known)[0] if m in known}
        for m in list(top):
            parent = m.rpartition(".")[0]
            while parent and parent in known:
                if parent != name and not name.startswith(parent + "."):
                    top.add(parent)
                parent = parent.rpartition(".")[0]
        edges[name] = top
    return edges


def notebook_modules(notebook: Path, known: dict[str, Path] | None = None) -> set[str]:
    """The ``tailored`` modules a notebook's code cells import."""
    known = known or module_files()
    cells = json.loads(Path(notebook).read_text())["cells"]
    found: set[str] = set()
    for cell in cells:
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"])
        source = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!")))
        for node in ast.walk(ast.parse(source)):
            found.update(m for m in imported_modules(node, ROOT, known) if m in known)
    return found


def closure(modules: set[str], known: dict[str, Path] | None = None) -> set[str]:
    """``modules`` and every module they import, transitively (the package ``tailored`` itself included)."""
    known = known or module_files()
    graph = import_graph(known)
    seen: set[str] = set()
    todo = [m for m in modules if m in known] + ([ROOT] if ROOT in known else [])
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += [n for n in graph.get(m, ()) if n not in seen]
            parent = m.rpartition(".")[0]
            if parent in known and parent not in seen:
                todo.append(parent)
    return seen


def step_sources(notebook: Path, known: dict[str, Path] | None = None) -> list[Path]:
    """The package source files a notebook runs: its imports' closure, sorted."""
    known = known or module_files()
    return sorted(known[m] for m in closure(notebook_modules(notebook, known), known))
