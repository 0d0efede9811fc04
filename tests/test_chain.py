"""The whole notebook chain on the smoke profile, through the real runner and papermill.

Asserts on the metrics each notebook writes (never on printed text). One module-scoped run feeds all
assertions, so the chain executes once per test session.
"""

from __future__ import annotations

import json

import pytest

from tailored import runner
from tailored.artifacts import read_metrics

pytestmark = pytest.mark.chain


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    manifest = runner.run(profile="smoke", run_root=root, progress=False, log=lambda *_: None)
    return root / "smoke", manifest


def test_every_step_ran_and_is_recorded(smoke_run):
    run_dir, manifest = smoke_run
    names = [s.name for s in runner.discover_steps()]
    assert list(manifest["steps"]) == names
    for name in names:
        assert manifest["steps"][name]["status"] == "ok"
        assert (run_dir / f"{name}.ipynb").exists()
    on_disk = json.loads((run_dir / "manifest.json").read_text())
    assert on_disk["steps"].keys() == manifest["steps"].keys()


def test_rerun_skips_unchanged_steps(smoke_run):
    run_dir, manifest = smoke_run
    again = runner.run(profile="smoke", run_root=run_dir.parent, progress=False, log=lambda *_: None)
    for name, entry in again["steps"].items():
        assert entry["finished"] == manifest["steps"][name]["finished"], f"{name} was rerun"


def test_01_traced_graph_of_the_tiny_gqa_model(smoke_run):
    run_dir, _ = smoke_run
    m = read_metrics(run_dir, "01_trace_graph")
    assert (run_dir / "graph.json").exists()
    # tiny: 4 layers, 2 key-value groups of 2 query heads, 128 MLP channels, hidden 64
    assert m["group_sets"]["attention"] == 4 and m["group_sets"]["mlp"] == 4 and m["group_sets"]["hidden"] == 1
    assert m["units"]["attention"] == 4 * 2 and m["units"]["mlp"] == 4 * 128 and m["units"]["hidden"] == 64
