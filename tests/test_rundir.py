"""The run directory's contracts (tailored.rundir) and the evaluation grid built on them (tailored.evaluate)."""

from __future__ import annotations

import json

import pytest
import torch

from tailored import evaluate, rundir
from tailored.checkpoint import FORMAT


def _fake_checkpoint(run_dir, name: str, share: float) -> None:
    folder = rundir.checkpoint_dir(run_dir, name)
    folder.mkdir(parents=True)
    (folder / "pruning.json").write_text(json.dumps({"format": FORMAT, "shapes": {},
                                                     "record": {"plan": {"share_decoder": share}}}))


def test_lora_runs_plan_both_recipes_per_checkpoint_and_a_sweep_on_the_most_pruned():
    runs = rundir.lora_runs({"block_20": 0.2, "block_50": 0.5}, ["piqa", "sst2"], "multi", n_train=500,
                            n_sweep=[10, 500])
    names = [r.name for r in runs]
    assert names == ["block_20+generic", "block_20+tailored", "block_50+generic", "block_50+tailored",
                     "block_50+tailored-n10", "block_50+tailored-n500"]
    by_name = {r.name: r for r in runs}
    assert by_name["block_20+generic"].tasks is None and by_name["block_20+generic"].prompt is None
    assert by_name["block_50+tailored"].tasks == ("piqa", "sst2")
    # the sweep point at n = n_train is the main run: the same adapter folder
    assert by_name["block_50+tailored-n500"].folder == by_name["block_50+tailored"].folder
    assert by_name["block_50+tailored-n10"].folder == "adapters/block_50/tailored-n10"
    per_task = rundir.lora_runs({"block_20": 0.2}, ["piqa", "sst2"], "per_task")
    assert [r.name for r in per_task] == ["block_20+generic", "block_20+tailored-piqa", "block_20+tailored-sst2"]
    with pytest.raises(ValueError, match="tailored_mode 'both'"):
        rundir.lora_runs({"block_20": 0.2}, ["piqa"], "both")
    with pytest.raises(ValueError, match="run notebook 03 first"):
        rundir.lora_runs({}, ["piqa"])


def test_adapter_index_round_trips_and_run_models_lists_it(tmp_path):
    _fake_checkpoint(tmp_path, "block_50", 0.5)
    _fake_checkpoint(tmp_path, "block_20", 0.2)
    assert rundir.checkpoints(tmp_path) == {"block_20": 0.2, "block_50": 0.5}
    runs = rundir.lora_runs(rundir.checkpoints(tmp_path), ["piqa"], n_sweep=[10])
    rundir.write_adapter_index(tmp_path, runs)
    assert rundir.read_adapter_index(tmp_path) == runs
    models = rundir.run_models(tmp_path, "tiny")
    assert [m.name for m in models][:3] == ["dense", "block_20", "block_20+generic"]
    sweep = next(m for m in models if m.n == 10)
    assert sweep.base == "block_50" and sweep.tasks == ("piqa",) and sweep.adapter.endswith("tailored-n10")


def test_checkpoints_a_new_plan_no_longer_makes_are_moved_aside(tmp_path):
    for name, share in (("block_20", 0.2), ("block_50", 0.5), ("block_30", 0.3)):
        _fake_checkpoint(tmp_path, name, share)
    assert rundir.retire_checkpoints(tmp_path, keep=["block_30"]) == ["block_20", "block_50"]
    assert list(rundir.checkpoints(tmp_path)) == ["block_30"]
    assert (tmp_path / rundir.RETIRED / rundir.PRUNED / "block_50" / "pruning.json").exists()
    _fake_checkpoint(tmp_path, "block_50", 0.5)  # made again, then retired again: the old copy is replaced
    assert rundir.retire_checkpoints(tmp_path, keep=["block_30"]) == ["block_50"]


def test_an_interrupted_evaluation_resumes_from_the_store(tmp_path, monkeypatch):
    calls = []

    def fake_task(model, tokenizer, task, prompt="task_specific", k=0, **kw):
        calls.append((task, prompt, k))
        if len(calls) == 2:
            raise KeyboardInterrupt  # the run is killed during its second evaluation
        return {"task": task, "prompt": prompt, "k": k, "metrics": {"acc": 0.5}}

    monkeypatch.setattr(evaluate, "evaluate_task", fake_task)
    store = rundir.EvalStore(tmp_path)
    jobs = [evaluate.EvalJob("sst2", "harness", 0), evaluate.EvalJob("sst2", "general", 0)]
    data = {"sst2": ([], None)}.__getitem__
    model = torch.nn.Linear(1, 1)  # the store key reads the weights' dtype; the fake task never runs it
    with pytest.raises(KeyboardInterrupt):
        evaluate.evaluate_jobs(model, None, jobs, data, store=store, model_id="m1", progress=False)
    done = evaluate.evaluate_jobs(model, None, jobs, data, store=store, model_id="m1", progress=False)
    assert calls == [("sst2", "harness", 0), ("sst2", "general", 0), ("sst2", "general", 0)]  # harness reused
    assert [r["prompt"] for r in done] == ["harness", "general"]
    assert store.reused == 1  # counted for the run's durations table (what a run from scratch would add)
    evaluate.evaluate_jobs(model, None, jobs[:1], data, store=store, model_id="m2", progress=False)
    assert calls[-1] == ("sst2", "harness", 0)  # other weights: evaluated afresh
