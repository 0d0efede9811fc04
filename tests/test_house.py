"""The package's house rules, checked by reading its source: imports point down, never in a circle.

- every import of a ``tailored`` module sits at the top of its file (the CLI alone imports lazily, so that
  ``tailored --help`` starts fast): a function-local import of our own module usually hides a cycle;
- the module-level imports between ``tailored`` modules form no cycle;
- only ``tailored.figures`` imports matplotlib (and seaborn);
- a step's fingerprint (``tailored.sources.step_sources``, what the runner hashes) covers the modules its
  notebook really uses, so a change reruns only the steps it touches;
- no function is longer than 80 lines of code (docstrings, comments and blank lines aside): a longer one is
  several named steps.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

from tailored import sources

PACKAGE = Path(__file__).resolve().parent.parent / "tailored"
NOTEBOOKS = PACKAGE.parent / "notebooks"
LAZY_ALLOWED = {"tailored.cli"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imported(node: ast.AST, package: str) -> list[str]:
    """The ``tailored`` modules an import statement loads (``from tailored import x`` may name a module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "tailored"]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative import
            base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
        if base.split(".")[0] != "tailored":
            return []
        subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
        return subs or [base]
    return []


def _imports(name: str) -> tuple[set[str], list[tuple[int, str]], set[str]]:
    """(module-level imports of ours, function-local imports of ours with line numbers, third-party roots)."""
    path = MODULES[name]
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top, local, third = set(), [], set()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        ours = _imported(node, package)
        roots = ({a.name.split(".")[0] for a in node.names} if isinstance(node, ast.Import)
                 else {(node.module or "").split(".")[0]} if not node.level else set())
        third |= roots - {"tailored"}
        if node.col_offset == 0:
            top.update(m for m in ours if m != name)
        else:
            local += [(node.lineno, m) for m in ours]
    return top, local, third


GRAPH = {name: _imports(name) for name in MODULES}


def test_no_function_local_imports_of_our_own_modules():
    offenders = [f"{MODULES[n].relative_to(PACKAGE.parent)}:{line} imports {m}"
                 for n, (_, local, _) in GRAPH.items() if n not in LAZY_ALLOWED for line, m in local]
    assert not offenders, "move these imports to the top of their file:\n  " + "\n  ".join(offenders)


def test_module_imports_form_no_cycle():
    edges = {n: {m for m in top if m in MODULES} for n, (top, _, _) in GRAPH.items()}
    # importing tailored.a.b runs tailored.a first: the package's __init__ is an edge too
    for n in list(edges):
        for m in list(edges[n]):
            parent = m.rpartition(".")[0]
            if parent in MODULES and parent != n and not n.startswith(parent + "."):
                edges[n].add(parent)
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        path.append(n)
        for m in sorted(edges[n]):
            if state.get(m) == 1:
                cycle = path[path.index(m):] + [m]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if m not in state:
                visit(m)
        path.pop()
        state[n] = 2

    for n in sorted(edges):
        if n not in state:
            visit(n)


def test_only_the_figures_package_imports_plotting_libraries():
    plotting = {"matplotlib", "seaborn"}
    offenders = [n for n, (_, _, third) in GRAPH.items()
                 if third & plotting and not (n == "tailored.figures" or n.startswith("tailored.figures."))]
    assert not offenders, f"plotting outside tailored.figures: {offenders}"


def test_the_checker_finds_a_planted_local_import():
    """The walker itself works: a function-local import is found where one is planted."""
    src = "def f():\n    from tailored import graph\n    return graph\n"
    tree = ast.parse(src)
    found = [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.col_offset > 0]
    assert found and _imported(found[0], "tailored") == ["tailored.graph"]


# ------------------------------------------------------------------------------------- step fingerprints
LORA = {"tailored.lora", "tailored.adapters", "tailored.snapshots", "tailored.lora_launch", "tailored.figures.lora"}
PRUNER = {"tailored.prune", "tailored.recipes"}


@functools.cache
def _step_modules(step: str) -> frozenset[str]:
    """The modules whose files the runner fingerprints step ``step`` by."""
    by_file = {path: name for name, path in sources.module_files().items()}
    return frozenset(by_file[path] for path in sources.step_sources(NOTEBOOKS / f"{step}.ipynb"))


STEPS = sorted(p.stem for p in NOTEBOOKS.glob("0*.ipynb"))


@pytest.mark.parametrize("step, unused", [
    ("01_trace_graph", PRUNER | LORA | {"tailored.importance", "tailored.prompts", "tailored.recovery_data"}),
    ("02_importance", PRUNER | LORA),  # recovery_data gives its calibration texts; LoRA training does not run
    ("03_prune", LORA | {"tailored.recovery_data"}),
], ids=["01", "02", "03"])
def test_a_step_is_fingerprinted_by_the_modules_it_uses_and_no_others(step, unused):
    found = _step_modules(step) & unused
    assert not found, f"{step} depends on {sorted(found)}: a change there would rerun it needlessly"


def test_a_change_to_the_lora_code_reruns_only_04_and_05():
    for module in sorted(LORA - {"tailored.lora_launch", "tailored.figures.lora"}):
        rerun = [step for step in STEPS if module in _step_modules(step)]
        assert rerun == ["04_lora_tune", "05_evaluate"], f"a change to {module} reruns {rerun}"


def test_a_change_to_the_pruner_reruns_pruning_and_never_the_trace_or_the_scores():
    for module in sorted(PRUNER):
        rerun = [step for step in STEPS if module in _step_modules(step)]
        assert rerun == ["03_prune"], f"a change to {module} reruns {rerun}"


def test_the_fingerprints_stay_truthful_each_step_covers_the_code_that_makes_its_outputs():
    needs = {"01_trace_graph": {"tailored.graph", "tailored.removal", "tailored.models"},
             "02_importance": {"tailored.importance", "tailored.graph", "tailored.recovery_data"},
             "03_prune": {"tailored.recipes", "tailored.prune", "tailored.removal", "tailored.importance",
                          "tailored.methods", "tailored.checkpoint"},
             "04_lora_tune": {"tailored.lora", "tailored.adapters", "tailored.snapshots", "tailored.recovery_data",
                              "tailored.lora_launch"},
             "05_evaluate": {"tailored.evaluate", "tailored.adapters", "tailored.scoring", "tailored.analysis"}}
    for step, modules in needs.items():
        missing = modules - _step_modules(step)
        assert not missing, f"{step} runs {sorted(missing)} but its fingerprint does not cover them"


# ----------------------------------------------------------------------------------------- function length
MAX_LINES = 80


def _code_lines(source: str, node: ast.AST) -> int:
    """Lines of code of a function (its nested functions included): no docstring, comment or blank line."""
    lines = source.splitlines()
    doc: set[int] = set()
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        doc = set(range(first.lineno, first.end_lineno + 1))
    start = node.decorator_list[0].lineno if node.decorator_list else node.lineno
    return sum(1 for i in range(start, node.end_lineno + 1)
               if i not in doc and lines[i - 1].strip() and not lines[i - 1].strip().startswith("#"))


def test_no_function_is_longer_than_80_lines_of_code():
    long = []
    for path in MODULES.values():
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _code_lines(source, node) > MAX_LINES:
                long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} "
                            f"({_code_lines(source, node)} lines)")
    assert not long, f"split these into named steps (at most {MAX_LINES} lines of code each):\n  " + "\n  ".join(long)


def test_the_length_counter_skips_docstrings_comments_and_blank_lines():
    src = 'def f(x):\n    """Doc.\n\n    More doc.\n    """\n    # a comment\n\n    y = x + 1\n    return y\n'
    assert _code_lines(src, ast.parse(src).body[0]) == 3  # def, y = ..., return
