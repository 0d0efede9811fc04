"""The runner: params validated before anything runs, failing cells reported, unchanged steps skipped."""

from __future__ import annotations

import json

import nbformat
import pytest
import yaml

from tailored import runner


def _notebook(path, params_src: str, body: str) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    cell = nbformat.v4.new_code_cell(params_src)
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell, nbformat.v4.new_code_cell(body)]
    nbformat.write(nb, str(path))


@pytest.fixture
def study(tmp_path):
    """Two tiny notebooks: 01 writes a file, 02 reads it and writes its square."""
    nbs, params = tmp_path / "notebooks", tmp_path / "params"
    nbs.mkdir()
    params.mkdir()
    common = 'profile = "class"\nrun_dir = "../runs/class"\nfigures_dir = "../figures"\nseed = 0\n'
    _notebook(nbs / "01_first.ipynb", common + "value = 3\n",
              "import json, pathlib\npathlib.Path(run_dir, 'v.json').write_text(json.dumps(value + seed))")
    _notebook(nbs / "02_second.ipynb", common + "power = 2.0\nfail = False\n",
              "import json, pathlib\nv = json.loads(pathlib.Path(run_dir, 'v.json').read_text())\n"
              "assert not fail, 'asked to fail'\n"
              "pathlib.Path(run_dir, 'out.json').write_text(json.dumps(v ** power))")
    (params / "t.yaml").write_text(yaml.safe_dump({"common": {"seed": 1}, "steps": {"01_first": {"value": 4}}}))
    return tmp_path, nbs, params


def _run(study, **kw):
    root, nbs, params = study
    return runner.run(profile="t", run_root=root / "runs", notebooks_dir=nbs, params_dir=params, progress=False,
                      log=lambda *_: None, **kw)


def _set_params(study, data: dict) -> None:
    (study[2] / "t.yaml").write_text(yaml.safe_dump(data))


def test_run_executes_steps_in_order_and_writes_manifest(study):
    manifest = _run(study)
    run_dir = study[0] / "runs" / "t"
    assert json.loads((run_dir / "out.json").read_text()) == 25.0  # (4 + 1) ** 2
    assert set(manifest["steps"]) == {"01_first", "02_second"}
    assert manifest["steps"]["01_first"]["params"]["value"] == 4
    assert (run_dir / "01_first.ipynb").exists() and (run_dir / "manifest.json").exists()
    assert "torch" in manifest["versions"]


def test_unchanged_step_is_skipped_and_a_knob_reruns_only_what_depends_on_it(study):
    _run(study)
    first = json.loads((study[0] / "runs" / "t" / "manifest.json").read_text())
    _set_params(study, {"common": {"seed": 1}, "steps": {"01_first": {"value": 4}, "02_second": {"power": 3.0}}})
    second = _run(study)
    assert second["steps"]["01_first"]["finished"] == first["steps"]["01_first"]["finished"]  # skipped
    assert second["steps"]["02_second"]["fingerprint"] != first["steps"]["02_second"]["fingerprint"]
    assert json.loads((study[0] / "runs" / "t" / "out.json").read_text()) == 125.0
    forced = _run(study, force=True, only="01")
    assert forced["steps"]["01_first"]["finished"] >= first["steps"]["01_first"]["finished"]


@pytest.mark.parametrize("params, needle", [
    ({"common": {"sed": 1}}, "common.sed: no notebook declares it; valid keys: fail, power, seed, value"),
    ({"steps": {"02_second": {"powr": 2.0}}}, "steps.02_second.powr: not a parameter of 02_second"),
    ({"steps": {"02_second": {"power": "two"}}}, "02_second.power: 'two' is a str"),
    ({"steps": {"03_third": {}}}, "steps.03_third: no such notebook"),
    ({"common": {"run_dir": "/tmp"}}, "common.run_dir: set by the runner"),
])
def test_bad_params_fail_before_anything_runs(study, params, needle):
    _set_params(study, params)
    with pytest.raises(runner.ParamsError) as err:
        _run(study)
    assert needle in str(err.value)
    assert not (study[0] / "runs" / "t").exists()


def test_missing_model_directory_is_a_params_error():
    assert "does not exist" in runner._check_model("/no/such/llama-7b")
    assert "no model given" in runner._check_model(None)
    assert runner._check_model("tiny") is None


def test_failing_cell_names_notebook_and_cell_and_keeps_good_result(study):
    _run(study)
    good = (study[0] / "runs" / "t" / "02_second.ipynb").read_bytes()
    _set_params(study, {"common": {"seed": 1}, "steps": {"02_second": {"fail": True}}})
    with pytest.raises(runner.StepFailed) as err:
        _run(study)
    assert "02_second.ipynb failed in cell" in str(err.value) and "asked to fail" in str(err.value)
    assert "\n" not in str(err.value) and str(err.value).endswith("02_second.failed.ipynb)")  # one line for the CLI
    run_dir = study[0] / "runs" / "t"
    assert (run_dir / "02_second.failed.ipynb").exists()
    assert (run_dir / "02_second.ipynb").read_bytes() == good


def test_step_selection():
    steps = [runner.Step(n, None) for n in ("01_a", "02_b", "03_c")]
    assert [s.name for s in runner.select_steps(steps, only="1,3")] == ["01_a", "03_c"]
    assert [s.name for s in runner.select_steps(steps, start="02")] == ["02_b", "03_c"]
    with pytest.raises(runner.ParamsError, match="step '07' does not exist"):
        runner.select_steps(steps, only="07")


def test_readme_tables_are_refreshed_from_figures(tmp_path):
    from tailored.artifacts import embed_tables

    (tmp_path / "figs").mkdir()
    (tmp_path / "figs" / "t1.md").write_text("| a |\n|---|\n| 2 |\n")
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- table: t1 -->\n| a |\n|---|\n| 1 |\n<!-- /table -->\n"
                      "<!-- table: missing -->\nold\n<!-- /table -->\nend\n")
    assert embed_tables(readme, tmp_path / "figs") == ["t1"]
    text = readme.read_text()
    assert "| 2 |" in text and "| 1 |" not in text and "old" in text and text.endswith("end\n")


def test_only_a_run_writing_the_repository_figures_refreshes_the_readme(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("<!-- table: t1 -->\nold\n<!-- /table -->\n")
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "t1.md").write_text("new\n")
    (tmp_path / "run" / "figures").mkdir(parents=True)
    (tmp_path / "run" / "figures" / "t1.md").write_text("smoke\n")
    assert runner.refresh_readme(tmp_path / "run" / "figures", readme) == []  # a smoke run: README untouched
    assert "old" in readme.read_text()
    assert runner.refresh_readme(tmp_path / "figures", readme) == ["t1"]
    assert "new" in readme.read_text()
    assert runner.refresh_readme(tmp_path / "figures", readme) == []  # already current: nothing to report


def test_a_step_is_fingerprinted_by_the_modules_its_notebook_imports():
    from tailored.sources import step_sources

    steps = {s.name: s for s in runner.discover_steps()}
    files = {name: {p.name for p in step_sources(s.path)} for name, s in steps.items()}
    assert "graph.py" in files["01_trace_graph"] and "lora.py" not in files["01_trace_graph"]
    assert "evaluate.py" not in files["03_prune"] and "lora.py" not in files["03_prune"]
    assert {"lora.py", "evaluate.py", "rundir.py"} <= files["05_evaluate"]
    # a change to a module a step does not import leaves its fingerprint alone
    assert runner.source_hash(steps["01_trace_graph"]) == runner.source_hash(steps["01_trace_graph"])


def test_editing_a_prompt_changes_only_the_steps_that_name_its_task(monkeypatch):
    import dataclasses

    from tailored import prompts

    evaluation = {"tasks": ["sst2", "piqa"], "k_sweep_tasks": ["sst2"]}
    pruning = {"targets": [0.2], "method": "fisher_refit"}
    before = runner.data_hash(evaluation), runner.data_hash(pruning)
    table = {t: dict(p) for t, p in prompts.prompt_table().items()}
    table["piqa"]["general"] = dataclasses.replace(table["piqa"]["general"], template="Q: {goal}\nA:")
    monkeypatch.setattr(runner, "prompt_table", lambda: table)
    assert runner.data_hash(evaluation) != before[0]  # 05 names piqa: it reruns
    assert runner.data_hash(pruning) == before[1]  # 03 names no task but the text corpus: skipped
    assert runner.step_tasks(evaluation) == ["piqa", "sst2", "wikitext"]


def test_a_step_whose_output_was_deleted_reruns(tmp_path):
    """Artifacts are hashed when a step finishes; a skip needs them as the step left them (damage with the
    modification time put back: tests/test_reliability.py, test_runner_rebuilds_a_damaged_adapter...)."""
    from tailored import rundir

    root = tmp_path / "runs"
    runner.run(profile="smoke", only="01", run_root=root, progress=False, log=lambda *_: None)
    run_dir = root / "smoke"
    graph = rundir.graph_path(run_dir)
    logs = []
    runner.run(profile="smoke", only="01", run_root=root, progress=False, log=logs.append)
    assert any("skipped" in line for line in logs)
    graph.unlink()
    logs.clear()
    runner.run(profile="smoke", only="01", run_root=root, progress=False, log=logs.append)
    assert graph.exists() and "[01_trace_graph] graph.json is missing: the step rebuilds it" in logs, logs


def test_a_manifest_that_is_not_a_mapping_is_named(tmp_path):
    from tailored.artifacts import ArtifactError

    (tmp_path / "runs" / "smoke").mkdir(parents=True)
    (tmp_path / "runs" / "smoke" / "manifest.json").write_text("[1, 2]")
    with pytest.raises(ArtifactError, match="manifest.json is damaged"):
        runner.run(profile="smoke", only="01", run_root=tmp_path / "runs", progress=False, log=lambda *_: None)


def test_a_study_run_refreshes_its_own_tables_in_the_readme(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("<!-- table: study/claims -->\nold\n<!-- /table -->\n<!-- table: t1 -->\nclass\n<!-- /table -->\n")
    (tmp_path / "figures" / "study").mkdir(parents=True)
    (tmp_path / "figures" / "study" / "claims.md").write_text("| verdict |\n|---|\n| supported |\n")
    assert runner.refresh_readme(tmp_path / "figures" / "study", readme) == ["study/claims"]
    assert "supported" in readme.read_text() and "class" in readme.read_text()  # a missing table stays
    assert runner.COMMITTED_FIGURES["study"] == "figures/study"


def test_durations_table_lists_each_finished_step_and_the_total(tmp_path):
    manifest = {"steps": {"02_importance": {"status": "ok", "duration_s": 120.0, "finished": "t2", "load1": 1.1},
                          "01_trace_graph": {"status": "ok", "duration_s": 30.0, "finished": "t1"},
                          "03_prune": {"status": "failed"}}}
    md = runner.write_durations(manifest, tmp_path).read_text().splitlines()
    assert md[2].startswith("| 01_trace_graph | 0.5 | t1 |") and md[3] == "| 02_importance | 2.0 | t2 | 1.1 |  |"
    assert md[-1].startswith("| all steps | 2.5 |") and len(md) == 5  # the failed step is not counted
    assert "from scratch" not in md[-1]
    assert (tmp_path / "run_durations.csv").read_text().startswith("step,minutes,finished,load1,reused_results,"
                                                                   "reused_minutes\n01_trace_graph,0.50")


def test_a_step_that_resumed_says_what_it_reused_and_the_total_adds_it_back(tmp_path):
    """Notebook 05 found 40 stored results (10 min when computed): its 3 minutes are not a run from scratch."""
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "05_evaluate.json").write_text('{"reused": {"results": 40, "seconds": 600.0}}')
    assert runner._reused(tmp_path, "05_evaluate") == {"reused": {"results": 40, "seconds": 600.0}}
    assert runner._reused(tmp_path, "04_lora_tune") == {}
    manifest = {"steps": {"04_lora_tune": {"status": "ok", "duration_s": 120.0, "finished": "t4"},
                          "05_evaluate": {"status": "ok", "duration_s": 180.0, "finished": "t5",
                                          **runner._reused(tmp_path, "05_evaluate")}}}
    md = runner.write_durations(manifest, tmp_path).read_text().splitlines()
    assert md[3] == "| 05_evaluate | 3.0 | t5 |  | 40 results, 10.0 min when computed |"
    assert md[-1].startswith("| all steps | 5.0 |") and md[-1].endswith("from scratch: 15.0 min |")


def test_kernels_start_encrypted_and_print_no_plain_tcp_warning(study, capfd):
    """ipykernel warns "Kernel is running over TCP without encryption" into every run's log unless the kernel
    manager provisions CurveZMQ keys (or uses local sockets): the runner's kernels do."""
    _run(study)
    out = capfd.readouterr()
    assert "without encryption" not in out.out + out.err
    config = runner.kernel_config()
    assert config.KernelManager.get("transport_encryption") == "auto" or config.KernelManager.get("transport") == "ipc"


def test_outputs_saved_into_a_notebook_leave_its_fingerprint_as_it_was(study):
    """A JupyterLab session autosaves outputs into notebooks/ (git does not see them: the nbstripout filter); the
    steps must not all rerun because of them."""
    _, nbs, _ = study
    path = nbs / "01_first.ipynb"
    before = runner.notebook_hash(path)
    nb = nbformat.read(str(path), as_version=4)
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", text="hello")]
    nb.cells[1].execution_count = 7
    nb.metadata["language_info"] = {"name": "python", "version": "3.11.7"}
    nbformat.write(nb, str(path))
    assert runner.notebook_hash(path) == before
    nb.cells[1].source += "\n# an edit"
    nbformat.write(nb, str(path))
    assert runner.notebook_hash(path) != before


def test_a_step_that_writes_the_same_bytes_again_reruns_no_later_step(tmp_path):
    """Later steps read the earlier steps' artifacts, not their notebooks: an edit to 01's prose reruns 01, and 02
    only once 01's artifact changes. 01's metrics (a timing here) differ on every run and are not 02's input."""
    nbs, params = tmp_path / "notebooks", tmp_path / "params"
    nbs.mkdir()
    params.mkdir()
    common = 'profile = "class"\nrun_dir = "../runs/class"\nfigures_dir = "../figures"\nseed = 0\n'
    _notebook(nbs / "01_trace_graph.ipynb", common + "value = 3\n",
              "import json, pathlib, time\nrun = pathlib.Path(run_dir)\n"
              "(run / 'graph.json').write_text(json.dumps(value))\n(run / 'metrics').mkdir(exist_ok=True)\n"
              "(run / 'metrics' / '01_trace_graph.json').write_text(json.dumps(time.time()))")
    _notebook(nbs / "02_importance.ipynb", common,
              "import json, pathlib\nv = json.loads(pathlib.Path(run_dir, 'graph.json').read_text())\n"
              "pathlib.Path(run_dir, 'importance.safetensors').write_text(json.dumps(2 * v))")
    (params / "t.yaml").write_text(yaml.safe_dump({"common": {"seed": 1}}))

    def run():
        m = runner.run(profile="t", run_root=tmp_path / "runs", notebooks_dir=nbs, params_dir=params, progress=False,
                       log=lambda *_: None)
        return {name: s["finished"] for name, s in m["steps"].items()}

    first = run()
    nb = nbformat.read(str(nbs / "01_trace_graph.ipynb"), as_version=4)
    nb.cells.insert(1, nbformat.v4.new_markdown_cell("A sentence said better."))
    nbformat.write(nb, str(nbs / "01_trace_graph.ipynb"))
    prose = run()
    assert prose["01_trace_graph"] != first["01_trace_graph"]  # its own prose: rerun
    assert prose["02_importance"] == first["02_importance"]  # the same graph.json: skipped
    (params / "t.yaml").write_text(yaml.safe_dump({"common": {"seed": 1}, "steps": {"01_trace_graph": {"value": 4}}}))
    changed = run()
    assert changed["02_importance"] != first["02_importance"]  # another graph.json: rerun
    assert (tmp_path / "runs" / "t" / "importance.safetensors").read_text() == "8"
