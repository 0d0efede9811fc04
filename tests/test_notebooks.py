"""Notebooks are committed as the study's source: no outputs, a tagged parameters cell, the runner's keys."""

from __future__ import annotations

import nbformat
import pytest

from tailored import runner

NOTEBOOKS = runner.discover_steps()


@pytest.mark.parametrize("step", NOTEBOOKS, ids=[s.name for s in NOTEBOOKS])
def test_notebook_is_stripped_and_parameterized(step):
    nb = nbformat.read(str(step.path), as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", []), "the first code cell must be tagged 'parameters'"
    for cell in code:
        assert not cell.outputs and cell.execution_count is None, f"{step.name} is committed with outputs"
    declared = runner.notebook_parameters(step.path)
    assignments = [ln for ln in code[0].source.splitlines() if ln.strip() and not ln.startswith(("#", " "))]
    assert len(declared) == len(assignments), f"{step.name}: parsed {sorted(declared)} out of {assignments}"
    from papermill.translators import PythonTranslator

    seen = [p.name for p in PythonTranslator.inspect(code[0])]  # papermill drops a line it cannot parse
    assert seen == list(declared), f"{step.name}: papermill sees {seen}, the cell declares {list(declared)}"
    for key in (*runner.INJECTED, "seed", "device"):
        assert key in declared, f"{step.name} does not declare {key!r}"
    assert nb.metadata["kernelspec"]["name"] == runner.KERNEL_NAME


@pytest.mark.parametrize("profile", ["smoke", "class", "paper"])
def test_every_profile_fits_the_notebooks(profile, tmp_path):
    steps = runner.discover_steps()
    if profile == "paper":  # the paper profile needs a model path; without one it must say so
        with pytest.raises(runner.ParamsError, match="no model given"):
            runner.resolve_params(profile, steps, tmp_path, tmp_path)
        return
    resolved = runner.resolve_params(profile, steps, tmp_path, tmp_path)
    assert set(resolved) == {s.name for s in steps}


def test_parameters_cells_equal_the_class_profile():
    """One source of truth: a notebook opened in JupyterLab runs the class profile's settings."""
    import yaml

    profile = yaml.safe_load((runner.PARAMS_DIR / "class.yaml").read_text())
    for step in NOTEBOOKS:
        declared = runner.notebook_parameters(step.path)
        wanted = {k: v for k, v in (profile.get("common") or {}).items() if k in declared}
        wanted |= (profile.get("steps") or {}).get(step.name) or {}
        defaults = {k: declared[k].default for k in wanted}
        drift = {k: (defaults[k], v) for k, v in wanted.items() if defaults[k] != v}
        assert not drift, f"{step.name}: parameters cell vs params/class.yaml (cell, yaml): {drift}"


def test_a_notebook_run_by_hand_writes_to_its_own_run_directory():
    """Run from JupyterLab (no runner), a notebook writes into runs/lab, never into the committed figures/."""
    for step in NOTEBOOKS:
        declared = runner.notebook_parameters(step.path)
        run_dir, figures_dir = declared["run_dir"].default, declared["figures_dir"].default
        assert run_dir == "../runs/lab" and figures_dir.startswith(run_dir + "/"), step.name


def test_paper_scale_finds_the_main_cell_of_every_notebook():
    """benchmarks/paper_scale.py times each step's main cell by a line of its source: an edit that drops the
    line would make that step's time 0 and its full-size estimate meaningless, found only by the slow test."""
    import importlib.util

    from tailored import paths

    spec = importlib.util.spec_from_file_location("paper_scale", paths.REPO_ROOT / "benchmarks" / "paper_scale.py")
    ps = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ps)
    steps = runner.discover_steps()
    assert set(ps.MAIN_CELL) == {s.name for s in steps}
    for step in steps:
        nb = nbformat.read(step.path, as_version=4)
        hits = [c for c in nb.cells if c.cell_type == "code" and ps.MAIN_CELL[step.name] in c.source]
        assert len(hits) == 1, (step.name, ps.MAIN_CELL[step.name])


READABLE = {"02_importance": 1, "03_prune": 2, "04_lora_tune": 1, "05_evaluate": 1}  # cells marked "# readable version"


def test_each_key_algorithm_has_a_readable_version_asserted_equal_to_the_fast_path_in_its_notebook():
    """02's Taylor score, 03's greedy planner and hand-cut MLP group, 04's LoRA layer, 05's log-likelihood: each a
    visible code cell that asserts (so papermill stops when the two diverge), after a markdown cell saying what."""
    for step in NOTEBOOKS:
        if step.name not in READABLE:
            continue
        cells = nbformat.read(str(step.path), as_version=4).cells
        marked = [i for i, c in enumerate(cells) if c.cell_type == "code" and c.source.startswith("# readable version")]
        assert len(marked) == READABLE[step.name], f"{step.name}: {len(marked)} readable-version cells"
        for i in marked:
            assert "\nassert " in cells[i].source, f"{step.name} cell {i}: a readable version that asserts nothing"
            assert cells[i - 1].cell_type == "markdown", f"{step.name} cell {i}: no markdown says what it checks"
