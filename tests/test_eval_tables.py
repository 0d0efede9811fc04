"""The tables of notebook 05 (tailored.analysis) on hand-made results, and finding a run's models (tailored.rundir)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from tailored import analysis as figs
from tailored.checkpoint import FORMAT
from tailored.paths import REPO_ROOT
from tailored.prune import Plan
from tailored.rundir import RunModel, run_models


def row(model, task, value, metric="acc", kind="multiple_choice", prompt="task_specific", k=5, stderr=0.05,
        chance=0.5, near=False):
    return {"model": model, "task": task, "kind": kind, "prompt": prompt, "k": k, "k_used": k, "n": 100,
            "metric": metric, "value": value, "stderr": stderr, "ci_low": value - 0.1, "ci_high": value + 0.1,
            "chance": chance, "majority": 0.5, "near_chance": near, "seconds": 1.0}


def test_main_table_recovery_plain_and_relative_to_chance():
    rows = pd.DataFrame([
        row("dense", "piqa", 0.70), row("dense", "winogrande", 0.52, near=True),
        row("p20", "piqa", 0.60), row("p20", "winogrande", 0.50),
        row("p20+t", "piqa", 0.68),  # a tailored adapter trained for PIQA only
        row("dense", "piqa", 0.10, prompt="general"),  # other prompts never reach the table
        row("dense", "wikitext", 20.0, metric="perplexity", kind="text", prompt=None, k=0, chance=None),
    ])
    models = figs.models_frame([RunModel("dense", "dense", "m"), RunModel("p20", "pruned", "dir", 0.2),
                                RunModel("p20+t", "lora", "dir", 0.2, base="p20", recipe="tailored",
                                         tasks=("piqa",), prompt="task_specific")])
    table, notes = figs.main_table(rows, models, prompt="task_specific", k=5)
    t = table.set_index("model")
    assert notes["near_chance"] == ["winogrande"] and "winogrande †" in table.columns
    assert t.loc["dense", "recovery %"] == pytest.approx(100)
    assert t.loc["p20", "avg"] == pytest.approx(55.0)
    assert t.loc["p20", "recovery %"] == pytest.approx(100 * 0.55 / 0.61, abs=0.01)
    # relative to chance, over PIQA only (WinoGrande's dense score is indistinguishable from chance)
    assert t.loc["p20", "recovery vs chance %"] == pytest.approx(100 * 0.10 / 0.20, abs=0.01)
    # the tailored row covers PIQA alone: its recovery compares it with dense on PIQA
    assert t.loc["p20 + tailored LoRA", "recovery %"] == pytest.approx(100 * 0.68 / 0.70, abs=0.01)
    assert math.isnan(t.loc["p20 + tailored LoRA", "winogrande †"])
    assert t.loc["dense", "perplexity"] == 20.0 and math.isnan(t.loc["p20", "perplexity"])


def test_table_metric_follows_llm_pruner():
    assert [figs.table_metric(t) for t in figs.PAPER_TASKS] == [
        "acc", "acc", "acc_norm", "acc", "acc", "acc_norm", "acc_norm"]
    assert figs.table_metric("squad") == "f1" and figs.table_metric("new_task", "summarization") == "rougeL"


def test_run_models_reads_pruned_checkpoints_and_adapter_index(tmp_path):
    plan = Plan(keep={}, drop_layers=(), params_before=100, params_after=80, decoder_params_before=50,
                decoder_params_after=40, widths=(), llm_pruner_ratio=0.2, unit_ratios={})
    for name in ("block_50", "block_20"):
        (tmp_path / "pruned" / name).mkdir(parents=True)
        (tmp_path / "pruned" / name / "pruning.json").write_text(json.dumps({"format": FORMAT, "shapes": {},
                                                                                 "record": {"plan": plan.to_dict()}}))
    assert [m.name for m in run_models(tmp_path, "tiny")] == ["dense", "block_20", "block_50"]
    (tmp_path / "adapters").mkdir()
    (tmp_path / "adapters" / "index.json").write_text(json.dumps([
        {"name": "block_20+tailored", "base": "pruned/block_20", "adapter": "adapters/block_20/tailored",
         "recipe": "tailored", "tasks": ["piqa"], "prompt": "task_specific", "n": None},
        {"name": "block_20+generic", "base": "pruned/block_20", "adapter": "adapters/block_20/generic",
         "recipe": "generic", "tasks": None, "prompt": None, "n": None}]))
    found = {m.name: m for m in run_models(tmp_path, "tiny")}
    assert found["block_20+tailored"].tasks == ("piqa",) and found["block_20+generic"].tasks == ()
    assert found["block_20+generic"].adapter == str(tmp_path / "adapters/block_20/generic")
    assert found["block_20"].share == pytest.approx(0.2)
    (tmp_path / "adapters" / "index.json").write_text(json.dumps([
        {"name": "x", "base": "pruned/gone", "adapter": "adapters/gone/generic", "recipe": "generic"}]))
    with pytest.raises(FileNotFoundError, match="rerun notebook 03"):
        run_models(tmp_path, "tiny")


def test_a_task_the_dense_model_scores_below_chance_is_marked_like_one_at_chance():
    """The † rule is one-sided: 40% on a two-way task (below chance) is no accuracy to keep, like 52%."""
    from tailored.evaluate import not_above_chance, result_rows

    assert not_above_chance(0.40, 0.5, 0.049) and not_above_chance(0.58, 0.5, 0.049)
    assert not not_above_chance(0.70, 0.5, 0.046)
    result = {"task": "boolq", "kind": "multiple_choice", "prompt": "harness", "k": 0, "k_used": 0, "n": 100,
              "metrics": {"acc": 0.40, "acc_norm": 0.71}, "stderr": {"acc": 0.049, "acc_norm": 0.045},
              "ci95": {}, "chance": 0.5, "majority": 0.62, "near_chance": False, "seconds": 1.0}
    near = {r["metric"]: r["near_chance"] for r in result_rows(result, "dense")}
    assert near == {"acc": True, "acc_norm": False}  # recomputed from the values, whatever the stored flag says


# ------------------------------------------------------------------------------------------ the published file
def _published_results():
    """Per-example results of a small run: two models on a scored task, a generated one and perplexity."""
    rng = np.random.default_rng(0)

    def scored(task, n, prompt="harness"):
        lls = rng.normal(-8, 2, (n, 4)).round(6)
        gold = rng.integers(0, 4, n)
        pred = lls.argmax(1)
        return {"task": task, "prompt": prompt, "k": 0, "per_example": {
            "ids": [f"q{i}" for i in range(n)], "acc": list((pred == gold).astype(float)),
            "acc_norm": list((pred == gold).astype(float)), "gold": list(gold), "pred": list(pred),
            "pred_norm": list(pred), "loglikelihoods": lls.tolist(), "choice_bytes": [[5, 9, 12, 3]] * n}}

    squad = {"task": "squad", "prompt": "task_specific", "k": 0, "per_example": {
        "ids": ["s1", "s2"], "exact_match": [1.0, 0.0], "f1": [1.0, 1 / 3], "prediction": ['a "quoted", answer', "b\nc"]}}
    text = {"task": "wikitext", "prompt": None, "k": 0,
            "per_example": {"ids": ["0", "1"], "nll": [300.123456, 280.5], "tokens": [127, 127]}}
    return {"dense": [scored("arc_easy", 60), scored("piqa", 40), squad, text],
            "block_20": [scored("arc_easy", 60), scored("piqa", 40), squad, text]}


def _published(tmp_path):
    models = figs.models_frame([RunModel("dense", "dense", "m"), RunModel("block_20", "pruned", "d", 0.2)])
    settings = figs.ClaimSettings(deciding_tasks=("piqa", "arc_easy"), n_boot=500)
    examples = figs.example_frame(_published_results())
    return figs.write_examples(examples, tmp_path / "examples.csv.gz", models, settings), examples


def test_the_per_example_file_is_byte_stable_and_reads_back_what_was_written(tmp_path):
    path, examples = _published(tmp_path)
    first = path.read_bytes()
    assert first[4:8] == b"\0\0\0\0"  # gzip mtime 0: the same run writes the same bytes
    back, header = figs.read_examples(path)
    figs.write_examples(back, tmp_path / "again.csv.gz", header["models"], header["settings"])
    assert (tmp_path / "again.csv.gz").read_bytes() == first
    assert header["settings"].deciding_tasks == ("piqa", "arc_easy") and list(header["models"]["model"]) == [
        "dense", "block_20"]
    key = ["model", "task", "prompt", "k", "id"]
    merged = back.merge(examples, on=key, suffixes=("", "_live"))
    assert len(merged) == len(examples) == len(back)
    assert np.allclose(np.vstack(merged["loglikelihoods"].dropna()), np.vstack(merged["loglikelihoods_live"].dropna()),
                       atol=5e-5)  # stored to 1e-4 nats
    assert (merged["pred"].dropna() == merged["pred_live"].dropna()).all()
    squad = back[back["task"] == "squad"].set_index(["model", "id"])
    assert squad.loc[("dense", "s1"), "prediction"] == 'a "quoted", answer'
    assert squad.loc[("dense", "s2"), "prediction"] == "b\nc"


def test_tables_from_the_file_match_the_rows_they_summarize(tmp_path):
    path, examples = _published(tmp_path)
    back, header = figs.read_examples(path)
    rows = figs.rows_from_examples(back).set_index(["model", "task", "metric"])
    arc = examples[(examples["model"] == "dense") & (examples["task"] == "arc_easy")]
    assert rows.loc[("dense", "arc_easy", "acc"), "value"] == pytest.approx(arc["acc"].mean())
    assert rows.loc[("dense", "arc_easy", "acc"), "chance"] == 0.25 and rows.loc[("dense", "arc_easy", "acc"), "n"] == 60
    assert rows.loc[("dense", "wikitext", "perplexity"), "value"] == pytest.approx(math.exp((300.1235 + 280.5) / 254))
    assert rows.loc[("dense", "squad", "f1"), "value"] == pytest.approx(2 / 3, abs=1e-6)
    tables = figs.tables_from_examples(back, header["models"], header["settings"])
    table = tables["eval_main_table"].set_index("model")
    assert table.loc["dense", "piqa †"] == pytest.approx(100 * rows.loc[("dense", "piqa", "acc"), "value"], abs=0.01)
    assert table.loc["dense", "squad F1"] == pytest.approx(200 / 3, abs=0.01)


def _uneven_results():
    """dense scored on 60 ARC-Easy questions under the harness prompt and on the first 20 under the general one;
    block_20 on the first 30 under the harness prompt; perplexity windows for both."""
    full = _published_results()
    dense_arc, text = full["dense"][0], full["dense"][3]

    def first(result, n, **change):
        per = {name: values[:n] for name, values in result["per_example"].items()}
        return {**result, **change, "per_example": per}

    return {"dense": [dense_arc, first(dense_arc, 20, prompt="general"), text],
            "block_20": [first(full["block_20"][0], 30), text]}


def test_a_comparison_reads_every_setting_on_the_same_examples():
    examples = figs.example_frame(_uneven_results())
    cut = figs.on_shared_examples(examples, [[("dense", "harness", 0), ("block_20", "harness", 0)],
                                             [("dense", "general", 0)]])
    sizes = cut.groupby(["model", "task", "prompt"], dropna=False).size().to_dict()
    assert sizes[("dense", "arc_easy", "harness")] == sizes[("block_20", "arc_easy", "harness")] == 30
    assert sizes[("dense", "arc_easy", "general")] == 20  # a group of its own: not cut to the harness ids
    assert ("dense", "wikitext", None) not in sizes  # only the evaluations a group names
    dense = cut[(cut["model"] == "dense") & (cut["task"] == "arc_easy") & (cut["prompt"] == "harness")]
    assert list(dense["id"]) == [f"q{i}" for i in range(30)]
    assert figs.shared_n(cut[cut["task"] == "arc_easy"]) == {"arc_easy": 30}
    windows = figs.on_shared_examples(examples, [[("dense", None, 0), ("block_20", None, 0)]])
    assert len(windows) == 4 and set(windows["task"]) == {"wikitext"}  # perplexity windows, whole
    alone = figs.on_shared_examples(examples, [[("dense", "harness", 0), ("dense", "general", 0)]])
    assert set(alone["model"]) == {"dense"} and (alone[alone["task"] == "arc_easy"].groupby("prompt").size() == 20).all()


def test_the_main_table_compares_its_rows_on_the_same_questions():
    """The dense model was scored on twice block_20's questions; the table reads both on block_20's 30, so
    recovery is the ratio of two accuracies on the same questions, and the notes say how many."""
    examples = figs.example_frame(_uneven_results())
    models = figs.models_frame([RunModel("dense", "dense", "m"), RunModel("block_20", "pruned", "d", 0.2)])
    tables = figs.tables_from_examples(examples, models, figs.ClaimSettings(deciding_tasks=("arc_easy",), n_boot=200))
    table = tables["eval_main_table"].set_index("model")
    dense = examples[(examples["model"] == "dense") & (examples["prompt"] == "harness") & (examples["task"] == "arc_easy")]
    column = next(c for c in table.columns if c.startswith("arc_easy"))
    assert table.loc["dense", column] == pytest.approx(100 * dense["acc"].iloc[:30].mean(), abs=0.01)
    assert table.loc["dense", column] != pytest.approx(100 * dense["acc"].mean(), abs=0.01)  # not its own 60
    assert tables["notes"]["n"] == {"arc_easy": 30}
    assert table.loc["dense", "perplexity"] > 0


def test_the_tables_are_recomputed_byte_for_byte_from_the_file_alone(tmp_path, capsys):
    path, _ = _published(tmp_path)
    back, header = figs.read_examples(path)
    tables = figs.tables_from_examples(back, header["models"], header["settings"])
    for name in ("eval_claims", "eval_main_table"):
        (tmp_path / f"{name}.csv").write_text(figs.table_csv(tables[name], name))
    assert figs.check_published(path) == {"eval_claims": True, "eval_main_table": True}
    assert figs.main([str(path)]) == 0 and "eval_claims.csv: identical" in capsys.readouterr().out
    (tmp_path / "eval_claims.csv").write_text(figs.table_csv(tables["eval_claims"], "eval_claims").replace("1", "2"))
    assert figs.main([str(path)]) == 1 and "eval_claims.csv: DIFFERS" in capsys.readouterr().out


COMMITTED = [folder for folder in (REPO_ROOT / "figures", REPO_ROOT / "figures" / "study")]


@pytest.mark.parametrize("folder", COMMITTED, ids=["class", "study"])
def test_committed_claims_and_headline_tables_reproduce_from_the_published_examples(folder):
    """What a reader checks: `python -m tailored.analysis figures/study/examples.csv.gz`, with no model and no
    data. Runs as soon as a profile run has committed its examples.csv.gz beside its tables."""
    path = folder / "examples.csv.gz"
    if not path.exists():
        pytest.skip(f"{path.relative_to(REPO_ROOT)} is not committed yet: the next class/study run writes it")
    assert figs.check_published(path) == {"eval_claims": True, "eval_main_table": True}


def test_the_few_shot_figure_keeps_its_legend_off_the_bands():
    """The legend sits below the panels (a figure legend), so no confidence band is hidden behind it."""
    from tailored.figures import evaluate as draw
    from tailored.figures import plt

    rows = pd.DataFrame([{"model": m, "task": t, "kind": "multiple_choice", "prompt": "task_specific", "k": k,
                          "k_used": k, "n": 50, "metric": "acc", "value": v, "stderr": 0.05, "ci_low": v - 0.1,
                          "ci_high": v + 0.1, "chance": 0.25, "majority": 0.3, "near_chance": False}
                         for m, v in (("dense", 0.6), ("block_50", 0.4)) for t in ("piqa", "arc_easy")
                         for k in (0, 1, 5)])
    fig = draw.plot_accuracy_vs_k(rows, ["piqa", "arc_easy"])
    assert all(ax.get_legend() is None for ax in fig.axes) and len(fig.legends) == 1
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["dense", "block_50", "chance"]
    plt.close(fig)
