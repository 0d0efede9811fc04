"""Every bad parameter value is refused before compute, naming the step, the key, the value and what is allowed."""

from __future__ import annotations

import json

import papermill
import pytest
import yaml

from tailored import runner
from tailored.params import ParamsError, at_default, check, check_notebook, declared


def _refused(tmp_path, steps: dict, needle: str) -> str:
    """Write a profile = smoke + ``steps`` overrides, resolve it, and return the refusal."""
    base = yaml.safe_load((runner.PARAMS_DIR / "smoke.yaml").read_text())
    for step, values in steps.items():
        base["steps"].setdefault(step, {}).update(values)
    params = tmp_path / "params"
    params.mkdir(exist_ok=True)
    (params / "bad.yaml").write_text(yaml.safe_dump(base))
    with pytest.raises(ParamsError) as err:
        runner.resolve_params("bad", runner.discover_steps(), tmp_path / "run", tmp_path / "fig", params)
    assert needle in str(err.value), str(err.value)
    return str(err.value)


@pytest.mark.parametrize("steps, needle", [
    ({"03_prune": {"targets": [1.5]}}, "03_prune.targets = [1.5]: must be a non-empty list of shares in (0, 1)"),
    ({"03_prune": {"targets": [-0.1]}}, "03_prune.targets = [-0.1]"),
    ({"03_prune": {"targets": [0]}}, "03_prune.targets = [0]"),
    ({"03_prune": {"targets": [1.0]}}, "03_prune.targets = [1.0]"),
    ({"03_prune": {"curve_shares": [0.2, 1.0]}}, "03_prune.curve_shares = [0.2, 1.0]"),
    ({"04_lora_tune": {"lr": -0.001}}, "04_lora_tune.lr = -0.001: must be a number > 0"),
    ({"05_evaluate": {"main_k": 100000}}, "05_evaluate.main_k = 100000: must be at most the train split"),
    ({"05_evaluate": {"limit": 0}}, "05_evaluate.limit = 0: must be an integer >= 1"),
    ({"03_prune": {"method": "taylor"}}, "03_prune.method = 'taylor'"),
    ({"03_prune": {"curve_methods": ["random", "flap_bias"]}}, "pruning methods (tailored.methods.METHODS)"),
    ({"05_evaluate": {"tasks": ["sst2", "sst-2"]}}, "05_evaluate.tasks = ['sst2', 'sst-2']"),
    ({"02_importance": {"calibration_sweep": [[10, 128], [0, 64]]}}, "a list of [windows, tokens] pairs"),
    ({"01_trace_graph": {"layer_to_draw": 99}}, "01_trace_graph.layer_to_draw = 99: must be a decoder layer index in 0..3"),
    ({"02_importance": {"check_samples": 5}}, "02_importance.check_samples = 5: must be an integer <= n_samples (2)"),
    ({"04_lora_tune": {"tailored_tasks": ["sciq"]}}, "have none: they can be scored zero-shot only"),
    ({"02_importance": {"estimators": ["param_first", "random"]}},
     "03_prune.method = 'fisher_refit': must be methods whose unit scores 02_importance computes and saves: add "
     "fisher_fluctuation (for fisher_refit) to 02_importance.estimators"),
    ({"02_importance": {"reductions": ["mean"]}}, "add sum (for random), sum (for param_first)"),
])
def test_bad_values_are_refused_before_anything_runs(tmp_path, steps, needle):
    _refused(tmp_path, steps, needle)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("common, needle", [
    ({"device": "tpu"}, "device = 'tpu': must be device 'tpu' is not a torch device"),
    ({"seed": -1}, "seed = -1: must be an integer >= 0"),
    ({"dtype": "float8"}, "dtype = 'float8': must be one of"),
])
def test_bad_common_values_name_every_step(tmp_path, common, needle):
    base = yaml.safe_load((runner.PARAMS_DIR / "smoke.yaml").read_text())
    base["common"].update(common)
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(base))
    with pytest.raises(ParamsError) as err:
        runner.resolve_params("bad", runner.discover_steps(), tmp_path, tmp_path, tmp_path)
    assert needle in str(err.value) and "01_trace_graph" in str(err.value)


def test_every_parameter_of_every_notebook_has_a_rule():
    for step in runner.discover_steps():
        missing = [n for n, d in declared(step.path).items() if not d.rule]
        assert not missing, f"{step.name}: parameters without a [rule] in their comment: {missing}"


def test_check_notebook_refuses_a_name_papermill_injected_with_a_typo():
    step = "01_trace_graph"
    values = {n: d.default for n, d in declared(runner.NOTEBOOKS_DIR / f"{step}.ipynb").items()}
    injected = '# Parameters\nmodel = "tiny"\nlayr_to_draw = 1\n'
    with pytest.raises(ParamsError, match="01_trace_graph.layr_to_draw: not a parameter of 01_trace_graph"):
        check_notebook(step, values | {"model": "tiny", "layr_to_draw": 1, "In": ["", injected, "check"]})
    check_notebook(step, values | {"model": "tiny", "In": ["", '# Parameters\nmodel = "tiny"\n']})  # fine
    assert check(step, values | {"model": "tiny", "layer_to_draw": 3}, declared(runner.NOTEBOOKS_DIR / f"{step}.ipynb")) == []


def test_a_notebook_run_directly_by_papermill_stops_at_a_bad_value(tmp_path):
    with pytest.raises(papermill.PapermillExecutionError) as err:
        papermill.execute_notebook(str(runner.NOTEBOOKS_DIR / "01_trace_graph.ipynb"), str(tmp_path / "out.ipynb"),
                                   parameters={"model": "tiny", "layer_to_draw": 9, "run_dir": str(tmp_path)},
                                   kernel_name=runner.kernel_name(), cwd=str(runner.NOTEBOOKS_DIR),
                                   progress_bar=False)
    assert err.value.ename == "ParamsError" and "layer_to_draw = 9" in err.value.evalue
    assert not (tmp_path / "graph.json").exists()


def test_at_default_reads_the_default_from_the_notebooks_parameters_cell(tmp_path):
    cell = {"cell_type": "code", "metadata": {"tags": ["parameters"]}, "outputs": [], "execution_count": None,
            "source": ['k = 5  # shots [int ≥ 0]\n', 'tasks = ["piqa"]  # [tasks]\n']}
    (tmp_path / "09_tiny.ipynb").write_text(json.dumps({"cells": [cell], "metadata": {}, "nbformat": 4,
                                                        "nbformat_minor": 5}))
    ran = {"k": 5, "tasks": ["piqa", "arc_easy"]}
    assert at_default("09_tiny", "k", ran, tmp_path) == "k = 5 (the default)"
    assert at_default("09_tiny", "tasks", ran, tmp_path) == "tasks = ['piqa', 'arc_easy'] (changed from ['piqa'])"
