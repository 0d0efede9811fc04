"""The evaluation plan (tailored.plan): each claim's cells at its n, nothing else at large n, and the sizing of n
from per-example variances and costs."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from tailored import plan
from tailored.analysis import Z975, ClaimSettings, example_frame, models_frame
from tailored.evaluate import evaluation_jobs
from tailored.rundir import RunModel

DECIDING = ("piqa", "arc_easy")


def _models() -> pd.DataFrame:
    entries = [RunModel("dense", "dense", "m")]
    entries += [RunModel(f"block_{s}", "pruned", "d", s / 100) for s in (10, 20, 50)]
    for s in (20, 50):
        entries += [RunModel(f"block_{s}+generic", "lora", "d", s / 100, base=f"block_{s}", recipe="generic"),
                    RunModel(f"block_{s}+tailored", "lora", "d", s / 100, base=f"block_{s}", recipe="tailored",
                             tasks=("boolq", "piqa", "arc_easy"), prompt="task_specific")]
    return models_frame(entries)


def _settings(**claim_n) -> plan.PlanSettings:
    claims = ClaimSettings(deciding_tasks=DECIDING, claim_checkpoints=("block_20", "block_50"),
                           prompt_models=("dense",), fewshot_models=("dense", "block_50"), k_sweep=(0, 1, 5, 25))
    return plan.PlanSettings(tasks=("boolq", "piqa", "arc_easy", "squad", "wikitext"), claims=claims, limit=100,
                             generation_limit=10, k_sweep_tasks=DECIDING, claim_n=claim_n)


def _n(cells: pd.DataFrame, model, task, prompt, k=0):
    hit = cells[(cells["model"] == model) & (cells["task"] == task) & (cells["prompt"] == prompt) & (cells["k"] == k)]
    return None if hit.empty else hit["n"].iloc[0]


def test_each_claim_reads_its_cells_at_its_n_and_nothing_else_is_scored_at_large_n():
    p = plan.evaluation_plan(_models(), _settings(pruning={"piqa": 600, "arc_easy": 800}, lora={"piqa": 400},
                                                  prompts={"piqa": 300}, fewshot={"arc_easy": 250}),
                             has_train=lambda t: t != "squad")
    cells = plan.cells(p)
    assert _n(cells, "dense", "piqa", "harness") == 600 and _n(cells, "block_20", "arc_easy", "harness") == 800
    assert _n(cells, "block_10", "piqa", "harness") == 600  # the levels claim: the pruning n unless it has its own
    assert _n(cells, "dense", "boolq", "harness") == 100  # not a deciding task: the paper's table at limit only
    assert _n(cells, "block_20+tailored", "piqa", "task_specific") == 400  # LoRA claims: lora_prompt
    assert _n(cells, "block_20", "piqa", "task_specific") == 400 and _n(cells, "dense", "piqa", "task_specific") == 400
    assert _n(cells, "block_20+tailored", "boolq", "task_specific") == 100  # its own prompt on its other tasks
    assert _n(cells, "dense", "piqa", "general") == 300 and _n(cells, "block_20", "piqa", "general") is None
    assert _n(cells, "block_50", "arc_easy", "task_specific", 25) == 250 and _n(cells, "block_20", "arc_easy",
                                                                                 "task_specific", 25) is None
    assert _n(cells, "dense", "squad", "task_specific") == 10 and _n(cells, "dense", "wikitext", None) is None
    assert _n(cells, "block_10", "squad", "task_specific") is None  # the ladder's other levels: accuracy only
    assert _n(cells, "block_20+generic", "squad", "task_specific") == 10  # an adapter's generation: the same limit
    large = cells[cells["n"].fillna(0) > 100]
    assert set(large["task"]) <= set(DECIDING), "only the deciding tasks are scored beyond limit"
    assert not cells.duplicated(["model", "task", "prompt", "k"]).any()
    dense_piqa = cells[(cells["model"] == "dense") & (cells["task"] == "piqa") & (cells["prompt"] == "harness")]
    assert {"pruning", "levels"} <= set(dense_piqa["families"].iloc[0].split(", "))  # one cell, read by both
    jobs = evaluation_jobs(cells.to_dict(orient="records"), "dense")
    assert jobs[0].label == "boolq harness k=0 n=100"  # the headline first
    assert [j for j in jobs if j.task == "wikitext"][0].limit is None


def test_the_ladder_of_levels_is_scored_at_its_n_for_every_share_dense_included():
    """The levels claim compares every share with dense on the examples all of them were scored on: a levels n
    above the pruning n is given to dense and the claim checkpoints too, or the extra examples of the other
    shares would be read by nothing."""
    cells = plan.cells(plan.evaluation_plan(_models(), _settings(pruning={"piqa": 600}, levels={"piqa": 700}),
                                            has_train=lambda t: t != "squad"))
    assert {m: _n(cells, m, "piqa", "harness") for m in ("dense", "block_10", "block_20", "block_50")} == {
        "dense": 700, "block_10": 700, "block_20": 700, "block_50": 700}


def test_a_family_or_model_the_plan_does_not_know_is_refused():
    with pytest.raises(ValueError, match="the families are"):
        plan.evaluation_plan(_models(), _settings(pruned={"piqa": 10}))
    bad = plan.PlanSettings(tasks=("piqa",), claims=ClaimSettings(prompt_models=("block_99",)))
    with pytest.raises(ValueError, match="block_99"):
        plan.evaluation_plan(_models(), bad)


def test_optimal_n_meets_the_half_width_at_the_least_cost():
    variance, cost = {"piqa": 0.25, "hellaswag": 0.25, "arc_easy": 0.16}, {"piqa": 0.3, "hellaswag": 0.6, "arc_easy": 0.2}
    n = plan.optimal_n(variance, cost, 0.02)
    half = Z975 * math.sqrt(sum(variance[t] / n[t] for t in n)) / len(n)
    assert half <= 0.02 and half > 0.0199  # just enough
    assert n["hellaswag"] < n["piqa"]  # the same variance at twice the cost: fewer examples
    equal = {t: math.ceil(Z975 ** 2 * sum(variance.values()) / (0.02 * 3) ** 2) for t in n}  # same n everywhere
    assert sum(cost[t] * n[t] for t in n) < sum(cost[t] * equal[t] for t in n)
    capped = plan.optimal_n(variance, cost, 0.02, available={"hellaswag": 300})
    assert capped["hellaswag"] == 300 and capped["piqa"] > n["piqa"]  # the others make up for the capped task
    half = Z975 * math.sqrt(sum(variance[t] / capped[t] for t in capped)) / 3
    assert half <= 0.02


def _pilot(n=400, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    out = {}
    for model, loss in (("dense", 0.0), ("block_20", 0.05), ("block_50", 0.2)):
        out[model] = []
        for t in DECIDING:
            base = np.random.default_rng(hash(t) % 2 ** 32).random(n) < 0.6
            acc = np.where(rng.random(n) < loss, 0.0, base.astype(float))
            out[model].append({"task": t, "prompt": "harness", "k": 0,
                               "per_example": {"ids": [str(i) for i in range(n)], "acc": list(acc), "acc_norm": list(acc)}})
    return example_frame(out)


def test_sizes_come_from_the_measured_variances_and_the_rest_from_the_noisiest():
    models, settings = _models(), _settings()
    p = plan.evaluation_plan(models, settings, has_train=lambda t: t != "squad")
    costs = pd.DataFrame({"task": ["piqa", "arc_easy"], "prompt": ["harness"] * 2, "k": [0, 0],
                          "seconds_per_example": [0.3, 0.2]})
    sizes, measured = plan.size_families(_pilot(), models, p, costs, settings.claims)
    by = sizes.set_index(["family", "task"])
    assert set(measured["b"]) == {"dense/harness/0"} and len(measured) == 4  # dense vs block_20, block_50 per task
    assert (by.loc["pruning", "source"] == "measured").all() and (by.loc["lora", "source"] == "proxy").all()
    worst = measured.groupby("task")["variance"].max()
    assert by.loc[("lora", "piqa"), "variance"] == pytest.approx(worst["piqa"])
    n = by.loc["pruning", "n"].to_dict()
    half = Z975 * math.sqrt(sum(worst[t] / n[t] for t in n)) / len(n)
    assert half <= 0.02 + 1e-9
    assert plan.cell_cost(costs, "piqa", "general", 0) == 0.3


def test_a_k_shot_cost_is_scaled_from_the_measured_k():
    costs = pd.DataFrame({"task": ["piqa", "piqa"], "prompt": ["harness", "task_specific"], "k": [0, 25],
                          "seconds_per_example": [0.3, 0.9]})
    assert plan.cell_cost(costs, "piqa", "task_specific", 25) == 0.9
    assert plan.cell_cost(costs, "piqa", "task_specific", 5) == pytest.approx(0.3 * (1 + 2 * 5 / 25))


def test_the_study_profile_tunes_only_the_claim_checkpoints_and_prunes_the_whole_ladder():
    params = plan.profile_params("study")
    models = plan.profile_models(params)
    assert list(models.loc[models["kind"] == "pruned", "model"]) == [f"block_{s}" for s in (10, 20, 30, 40, 50)]
    assert set(models.loc[models["kind"] == "lora", "base"]) == {"block_20", "block_50"}
    p = plan.evaluation_plan(models, plan.PlanSettings.from_params(params["05_evaluate"]))
    deciding = set(params["05_evaluate"]["deciding_tasks"])
    large = plan.cells(p)
    large = large[large["n"].fillna(0) > (params["05_evaluate"]["limit"] or 0)]
    assert set(large["task"]) <= deciding | {"wikitext"}


def test_perplexity_keeps_no_prompt_in_the_cells():
    cells = plan.cells(plan.evaluation_plan(_models(), _settings(), has_train=lambda t: t != "squad"))
    text = cells[cells["task"] == "wikitext"]
    assert len(text) and text["prompt"].isna().all() and text["n"].isna().all()
    assert cells.loc[cells["task"] != "wikitext", "prompt"].notna().all()


def test_measured_ratios_scale_the_reference_costs():
    reference = pd.DataFrame({"task": ["piqa", "arc_easy"], "prompt": ["harness"] * 2, "k": [0, 0],
                              "seconds_per_example": [0.3, 0.2]})
    timing = pd.DataFrame([  # a machine twice as slow as the reference, at two loads
        {"task": "piqa", "prompt": "harness", "k": 0, "rep": 0, "seconds_per_example": 0.6},
        {"task": "piqa", "prompt": "task_specific", "k": 25, "rep": 0, "seconds_per_example": 1.8},
        {"task": "piqa", "prompt": "harness", "k": 0, "rep": 1, "seconds_per_example": 1.2},
        {"task": "piqa", "prompt": "task_specific", "k": 25, "rep": 1, "seconds_per_example": 3.6},
        {"task": "wikitext", "prompt": "", "k": 0, "rep": 0, "seconds_per_example": 40.0}])
    costs = plan.combine_costs(reference, timing)
    assert plan.cell_cost(costs, "piqa", "task_specific", 25) == pytest.approx(0.9)  # 3x the reference, both loads
    assert plan.cell_cost(costs, "wikitext", None, 0) == pytest.approx(40.0 * 0.3 / 0.9)  # median of 0.6 and 1.2
    assert plan.cell_cost(costs, "arc_easy", "general", 0) == 0.2  # not timed: the reference
    cells = plan.plan_cost(plan.evaluation_plan(_models(), _settings(), has_train=lambda t: t != "squad"), costs,
                           {"boolq": 3270, "piqa": 1838, "arc_easy": 2376, "squad": 500})
    assert cells.loc[cells["task"] == "boolq", "seconds"].isna().all()  # no cost row: left out, not guessed
    assert cells.loc[cells["task"] == "piqa", "seconds"].notna().all()
