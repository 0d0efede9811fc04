"""The study's analysis: tables of scores, recovery, and the claims, computed from evaluation rows.

Everything here reads two pandas frames:

- ``rows``: the long rows of ``tailored.evaluate.result_rows`` (one per model, task, prompt, k and metric,
  with ``value``, ``stderr``, ``ci_low``/``ci_high``, ``chance``, ``majority``, ``near_chance``);
- ``models``: one row per evaluated model (``models_frame``): ``model`` (the name in ``rows``), ``label`` (its
  row in the main table; several models may share one, e.g. one tailored adapter per task), ``kind``
  (dense, pruned, lora), ``share`` (share of decoder parameters removed, 0 for dense) and ``recipe``.

::

    table, notes = main_table(rows, models, prompt="task_specific", k=5)
    examples = example_frame(results_by_model)          # one row per (model, task, prompt, k, example)
    pooled, per_task = claim_verdicts(examples, models, ClaimSettings(deciding_tasks=("piqa", "arc_easy")))
    write_examples(examples, "figures/study/examples.csv.gz", models, settings)   # the published evidence
    tables = tables_from_examples(*read_examples("figures/study/examples.csv.gz"))  # what notebook 05 writes

From the command line, ``python -m tailored.analysis figures/study/examples.csv.gz`` recomputes the claims and
the headline table from the published file alone and compares them with the committed CSVs.

Which number a task reports follows LLM-Pruner's table, which Tailored-LLaMA copies: ``acc_norm`` for
HellaSwag, ARC-Challenge and OpenBookQA, ``acc`` for the others (LLaMA-7B's 72.99 on HellaSwag and 67.45 on
ARC-Easy there are the harness's acc_norm and acc). SQuAD reports F1, XSum ROUGE-L. The figures of these
tables are drawn by ``tailored.figures.evaluate``; this module imports no plotting library, no torch, and reads
no model and no data cache.
"""

from __future__ import annotations

import argparse
import gzip
import io
import itertools
import json
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tailored.data import SCORED_KINDS, TASKS  # SCORED_KINDS: the kinds scored by choice, by accuracy
from tailored.metrics import ACCURACY_METRICS, ci95, gold_margin, mean_stderr, not_above_chance
from tailored.paths import atomic_write_bytes, atomic_write_text

PAPER_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
TABLE_METRIC = {"boolq": "acc", "piqa": "acc", "hellaswag": "acc_norm", "winogrande": "acc", "arc_easy": "acc",
                "arc_challenge": "acc_norm", "openbookqa": "acc_norm", "sst2": "acc", "squad": "f1",
                "xsum": "rougeL", "wikitext": "perplexity"}
KIND_METRIC = {"classification": "acc", "multiple_choice": "acc", "extractive_qa": "f1",
               "summarization": "rougeL", "text": "perplexity"}
GENERATION_COLUMNS = {("squad", "exact_match"): "squad EM", ("squad", "f1"): "squad F1",
                      ("xsum", "rouge1"): "xsum R-1", ("xsum", "rouge2"): "xsum R-2", ("xsum", "rougeL"): "xsum R-L"}


def models_frame(entries) -> pd.DataFrame:
    """The ``models`` frame of a list of ``tailored.evaluate.RunModel``, with each one's table ``label``.

    LoRA models are labelled by checkpoint and recipe ("block_20 + tailored LoRA"), so that the adapters of one
    recipe on one checkpoint (one per task) fill one table row; data-sweep runs add their ``n``.
    """
    out = []
    for m in entries:
        label = m.name
        if m.kind == "lora":
            label = f"{m.base} + {m.recipe} LoRA" + (f", n={m.n}" if m.n is not None else "")
        out.append({"model": m.name, "label": label, "kind": m.kind, "share": m.share, "base": m.base,
                    "recipe": m.recipe, "tasks": ", ".join(m.tasks) or "all", "prompt": m.prompt, "n": m.n})
    return pd.DataFrame(out)


def main_runs(models: pd.DataFrame) -> pd.DataFrame:
    """The models of the main table: all but the runs of a LoRA data sweep."""
    return models[models["n"].isna()] if "n" in models.columns else models


def table_metric(task: str, kind: str | None = None) -> str:
    """The metric a task reports in the tables (see the module docstring); unknown tasks by their kind."""
    return TABLE_METRIC.get(task) or KIND_METRIC.get(kind or "", "acc")


def scores(rows: pd.DataFrame, prompt: str | None = "task_specific", k: int | None = None) -> pd.DataFrame:
    """One row per (model, task): the task's table metric under ``prompt`` and ``k`` shots.

    Perplexity rows (no prompt, no shots) are kept whatever ``prompt`` and ``k`` say.
    """
    keep = rows["metric"] == [table_metric(t, kd) for t, kd in zip(rows["task"], rows["kind"])]
    text = rows["kind"] == "text"
    if prompt is not None:
        keep &= (rows["prompt"] == prompt) | text
    if k is not None:
        keep &= (rows["k"] == k) | text
    return rows[keep].drop_duplicates(["model", "task", "prompt", "k"])


def model_scores(rows: pd.DataFrame, models: pd.DataFrame, prompt: str = "task_specific",
                 k: int = 0) -> pd.DataFrame:
    """``scores`` under ``prompt``; a model never evaluated with ``prompt`` (a tailored adapter trained with
    another prompt is evaluated with its own) contributes its rows under whatever prompt it was scored with."""
    s = scores(rows, prompt, k)
    other = rows[rows["model"].isin(set(models["model"]) - set(s["model"]))]
    return pd.concat([s, scores(other, None, k)]) if len(other) else s


def accuracy_tasks(rows: pd.DataFrame) -> list[str]:
    """Tasks scored by accuracy, in the order they were evaluated."""
    acc = rows[rows["kind"].isin(SCORED_KINDS)]
    return list(dict.fromkeys(acc["task"]))


def main_table(rows: pd.DataFrame, models: pd.DataFrame, prompt: str = "task_specific", k: int = 0,
               dense: str = "dense") -> tuple[pd.DataFrame, dict]:
    """The paper's table: one row per model label, accuracy per task (in %), the average, recovery.

    - ``avg``: mean accuracy over the paper's seven tasks that were evaluated (all accuracy tasks if none
      were); a row that covers only some of them (a tailored adapter trained for two tasks) averages those.
    - ``recovery %`` = 100 · avg / dense avg on the same tasks (the paper's measure: 95.68% at 20%).
    - ``recovery vs chance %`` = 100 · (avg − chance) / (dense avg − chance), over the tasks where the dense
      model is above chance by more than two standard errors (elsewhere the dense model's accuracy is noise or
      below chance, and the ratio would divide by it).
    - then SST-2 and other accuracy tasks, SQuAD EM/F1, XSum ROUGE (in %) and perplexity where evaluated.

    Returns ``(table, notes)``; ``notes`` has ``near_chance`` (tasks flagged for the dense model),
    ``average_over`` (tasks in ``avg``) and ``recovery_vs_chance_over``.
    """
    models = main_runs(models)
    s = model_scores(rows, models, prompt, k)
    s = s[s["model"].isin(models["model"])]
    acc_tasks = accuracy_tasks(s)
    avg_tasks = [t for t in PAPER_TASKS if t in acc_tasks] or acc_tasks
    dense_s = s[s["model"] == dense].set_index("task")
    near = [t for t in acc_tasks if t in dense_s.index and bool(dense_s.loc[t, "near_chance"])]
    signal = [t for t in avg_tasks if t not in near]
    chance = s.dropna(subset=["chance"]).groupby("task")["chance"].first()
    labels = list(dict.fromkeys(models["label"]))
    out = []
    for label in labels:
        names = models.loc[models["label"] == label, "model"]
        info = models[models["label"] == label].iloc[0]
        mine = s[s["model"].isin(names)].drop_duplicates("task").set_index("task")
        row: dict = {"model": label, "removed %": 100 * float(info.get("share", 0.0) or 0.0)}
        for t in acc_tasks:
            row[t] = 100 * mine.loc[t, "value"] if t in mine.index else np.nan
        have = [t for t in avg_tasks if t in mine.index and t in dense_s.index]
        row["avg"] = 100 * mine.loc[have, "value"].mean() if have else np.nan
        dense_avg = dense_s.loc[have, "value"].mean() if have else 0.0
        row["recovery %"] = row["avg"] / dense_avg if dense_avg > 0 else np.nan  # avg is in %, so this is too
        sig = [t for t in signal if t in have]
        row["recovery vs chance %"] = np.nan
        if sig:
            gain = mine.loc[sig, "value"].mean() - chance[sig].mean()
            dense_gain = dense_s.loc[sig, "value"].mean() - chance[sig].mean()
            row["recovery vs chance %"] = 100 * gain / dense_gain if dense_gain > 0 else np.nan
        mine_rows = rows[rows["model"].isin(names)]
        for (task, metric), col in GENERATION_COLUMNS.items():
            if task in set(rows["task"]):
                hit = mine_rows[(mine_rows["task"] == task) & (mine_rows["metric"] == metric) & (mine_rows["k"] == k)]
                hit = hit.sort_values("prompt", key=lambda p: p != prompt)  # the table's prompt first
                row[col] = 100 * hit["value"].iloc[0] if len(hit) else np.nan
        if (rows["metric"] == "perplexity").any():
            ppl = mine_rows[mine_rows["metric"] == "perplexity"]
            row["perplexity"] = ppl["value"].iloc[0] if len(ppl) else np.nan
        out.append(row)
    table = pd.DataFrame(out)
    ordered = ["model", "removed %"] + avg_tasks + ["avg", "recovery %", "recovery vs chance %"]
    table = table[ordered + [c for c in table.columns if c not in ordered]]
    table = table.rename(columns={t: f"{t} †" for t in near})
    notes = {"near_chance": near, "average_over": avg_tasks, "recovery_vs_chance_over": signal,
             "prompt": prompt, "k": k, "metrics": {t: table_metric(t) for t in acc_tasks}}
    return table.round(2), notes


def accuracy_vs_n_frame(rows: pd.DataFrame, models: pd.DataFrame, prompt: str = "task_specific", k: int = 0,
                        dense: str = "dense") -> pd.DataFrame:
    """What ``tailored.figures.lora.plot_accuracy_vs_n`` draws: the LoRA data-sweep runs against their ``n``.

    One row per (task, run): ``task, method`` (the recipe), ``n, accuracy, ci_low, ci_high, chance``; the dense
    model and the checkpoint the sweep tuned are added with ``n = 0`` (drawn as reference lines). Empty when
    the run has no sweep.
    """
    sweep = models[models["n"].notna()] if "n" in models.columns else models.iloc[:0]
    if sweep.empty:
        return pd.DataFrame(columns=["task", "method", "n", "accuracy", "ci_low", "ci_high", "chance"])
    s = model_scores(rows, models, prompt, k)
    s = s[s["kind"].isin(SCORED_KINDS)]
    refs = [dense] + list(dict.fromkeys(sweep["base"]))
    out = []
    for _, m in sweep.iterrows():
        for _, r in s[s["model"] == m["model"]].iterrows():
            out.append({"task": r["task"], "method": m["recipe"] or "lora", "n": int(m["n"]), "accuracy": r["value"],
                        "ci_low": r["ci_low"], "ci_high": r["ci_high"], "chance": r["chance"]})
    tasks = list(dict.fromkeys(o["task"] for o in out))
    for ref in refs:
        for _, r in s[(s["model"] == ref) & s["task"].isin(tasks)].iterrows():
            out.append({"task": r["task"], "method": ref, "n": 0, "accuracy": r["value"], "ci_low": r["ci_low"],
                        "ci_high": r["ci_high"], "chance": r["chance"]})
    return pd.DataFrame(out).sort_values(["task", "n"], kind="stable").reset_index(drop=True)


def tailored_vs_generic(rows: pd.DataFrame, models: pd.DataFrame, prompt: str = "task_specific", k: int = 0,
                        validation: dict | None = None, examples: pd.DataFrame | None = None,
                        n_boot: int = 10_000, seed: int = 0) -> pd.DataFrame:
    """Did tailoring beat the generic recipe? One row per (checkpoint, task a tailored adapter was trained on).

    Columns: ``checkpoint, task, metric, n, generic, tailored`` (scores), ``difference`` (tailored − generic)
    with ``diff_low``/``diff_high``, its 95% interval, and ``verdict``: "tailored better" or "generic better" when
    the interval excludes 0, else "not established". With ``examples`` (``example_frame``) the interval is a
    paired bootstrap over the examples both adapters were scored on; without, it is built from the two standard
    errors as if the samples were independent (conservative). With ``validation`` (notebook 04's ``runs``
    metrics: ``{run name: {"validation": {task: loss}}}``), the held-out loss per answer token of both adapters
    is added (``val_loss_generic``, ``val_loss_tailored``): a finer instrument than accuracy on a few examples,
    measured on train-split examples that no adapter trained on.
    """
    lora = main_runs(models[models["kind"] == "lora"])
    s = scores(rows[rows["kind"] != "text"], prompt, k).set_index(["model", "task"])
    out = []
    for base, part in lora.groupby("base", sort=False):
        generic = part.loc[part["recipe"] == "generic", "model"].tolist()
        if not generic:
            continue
        g = generic[0]
        for _, t in part[part["recipe"] == "tailored"].iterrows():
            trained = t["tasks"].split(", ") if t["tasks"] != "all" else []
            paired = (paired_bootstrap(paired_values(examples, (g, prompt, k), (t["model"], prompt, k), trained),
                                       n_boot=n_boot, seed=seed)["tasks"] if examples is not None else {})
            for task in trained:
                if (g, task) not in s.index or (t["model"], task) not in s.index:
                    continue
                a, b = s.loc[(g, task)], s.loc[(t["model"], task)]
                if task in paired:
                    diff, low, high = (paired[task][x] for x in ("estimate", "low", "high"))
                else:
                    diff, half = (float(v) for v in _difference(a, b))
                    low, high = diff - half, diff + half
                decided = verdict(low, high)
                row = {"checkpoint": base, "task": task, "metric": a["metric"], "n": int(b["n"]),
                       "generic": float(a["value"]), "tailored": float(b["value"]), "difference": diff,
                       "diff_low": low, "diff_high": high,
                       "verdict": {"supported": "tailored better", "contradicted": "generic better"}.get(
                           decided, "not established")}
                if validation:
                    row["val_loss_generic"] = validation.get(g, {}).get("validation", {}).get(task, np.nan)
                    row["val_loss_tailored"] = validation.get(t["model"], {}).get("validation", {}).get(task, np.nan)
                out.append(row)
    return pd.DataFrame(out)


def _difference(a, b):
    """``b − a`` of two scores (rows or frames with ``value`` and ``stderr``) and the half-width of its 95%
    interval from the two standard errors as if the samples were independent (conservative for the same
    examples)."""
    return b["value"] - a["value"], 1.96 * np.hypot(a["stderr"], b["stderr"])


# ============================================================================== per-example records
# Every example's evidence, one row per (model, task, prompt, k, example): what the paired statistics read and
# what the study publishes (``write_examples``). Scored answers: ``gold``, ``pred``, ``pred_norm``, ``acc``,
# ``acc_norm``, every answer's ``loglikelihoods`` (nats) and ``choice_bytes``; generated ones: ``prediction``
# and its scores; perplexity: one row per window with its summed ``nll`` (nats) and ``tokens``.
KEY_COLUMNS = ("model", "task", "prompt", "k", "id")
RECORD_COLUMNS = (*KEY_COLUMNS, "gold", "pred", "pred_norm", "acc", "acc_norm", "loglikelihoods", "choice_bytes",
                  "prediction", "exact_match", "f1", "rouge1", "rouge2", "rougeL", "nll", "tokens")
GENERATION_METRICS = ("exact_match", "f1", "rouge1", "rouge2", "rougeL")
EXAMPLES_FORMAT = "tailored per-example records v1"


def example_frame(results: Mapping[str, Sequence[Mapping[str, Any]]]) -> pd.DataFrame:
    """Per-example records of every evaluation: ``{model: [evaluate_task results]}`` -> one row per (model,
    task, prompt, k, example ``id``) with the record's fields (``RECORD_COLUMNS``) and ``margin``
    (``add_margins``). What paired statistics read; a (model, task, prompt, k, id) seen twice is kept once."""
    frames = []
    for model, rs in results.items():
        for r in rs:
            per = r.get("per_example")
            if not per or not per.get("ids"):
                continue
            part = pd.DataFrame({("id" if name == "ids" else name): list(v) for name, v in per.items()})
            for name, value in (("k", int(r["k"])), ("prompt", r["prompt"]), ("task", r["task"]), ("model", model)):
                part.insert(0, name, value)
            frames.append(part)
    if not frames:
        return pd.DataFrame(columns=[*KEY_COLUMNS, "margin"])
    out = pd.concat(frames, ignore_index=True)
    out["id"] = out["id"].astype(str)
    return add_margins(out.drop_duplicates(list(KEY_COLUMNS)).reset_index(drop=True))


def add_margins(examples: pd.DataFrame) -> pd.DataFrame:
    """``examples`` with ``margin``: the gold answer's score minus the best wrong one's (``gold_margin``), scored
    as the task's table metric is (nats for ``acc`` tasks, nats per byte for ``acc_norm`` ones); ``nan`` where
    there are no log-likelihoods (generated answers, perplexity windows)."""
    out = examples.copy()
    if "loglikelihoods" not in out.columns:
        out["margin"] = np.nan
        return out
    norm = out["task"].map(lambda t: table_metric(t) == "acc_norm")
    out["margin"] = [gold_margin(lls, int(g), nb if n else None) if isinstance(lls, list) else np.nan
                     for lls, g, nb, n in zip(out["loglikelihoods"], out["gold"], out["choice_bytes"], norm)]
    return out


def _fmt(column: str, value: Any) -> str:
    """One cell of the published file, in a fixed format (so that the same run writes the same bytes)."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return ""
    if column == "loglikelihoods":
        return ";".join(f"{v:.4f}" for v in value)
    if column == "choice_bytes":
        return ";".join(str(int(v)) for v in value)
    if column in ("k", "gold", "pred", "pred_norm", "acc", "acc_norm", "exact_match", "tokens"):
        return str(int(value))
    if column in ("f1", "rouge1", "rouge2", "rougeL"):
        return f"{value:.6f}"
    if column == "nll":
        return f"{value:.4f}"
    return str(value)


def write_examples(examples: pd.DataFrame, path: str | Path, models: pd.DataFrame | None = None,
                   settings: ClaimSettings | None = None) -> Path:
    """Write the per-example records as one gzip-compressed CSV, byte-stable (gzip mtime 0, sorted rows, fixed
    float formats: log-likelihoods to 1e-4 nats).

    The first line is ``# <EXAMPLES_FORMAT> <JSON>``: the run's ``models`` frame and the analysis ``settings``,
    everything ``tables_from_examples`` needs besides the rows; then the CSV (``RECORD_COLUMNS`` that occur;
    lists joined by ``;``). ``read_examples`` reads it back.
    """
    present = [c for c in RECORD_COLUMNS if c in examples.columns]
    frame = examples[present].copy()
    frame["prompt"] = frame["prompt"].where(frame["prompt"].notna(), "")
    frame = frame.sort_values(list(KEY_COLUMNS), kind="stable")
    header = {"models": json.loads(models.to_json(orient="records")) if models is not None else [],
              "settings": settings.to_dict() if settings is not None else {}}
    lines = pd.DataFrame({c: [_fmt(c, v) for v in frame[c]] for c in present})
    text = f"# {EXAMPLES_FORMAT} {json.dumps(header, sort_keys=True)}\n" + lines.to_csv(index=False, lineterminator="\n")
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        gz.write(text.encode("utf-8"))
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path


def read_examples(path: str | Path) -> tuple[pd.DataFrame, dict]:
    """``(examples, header)`` of a file ``write_examples`` wrote: the records (lists parsed, ``margin`` added) and
    ``{"models": models frame, "settings": ClaimSettings}``. Needs no model and no data cache."""
    with gzip.open(path, "rt", encoding="utf-8", newline="") as fh:
        first = fh.readline()
        if not first.startswith(f"# {EXAMPLES_FORMAT} "):
            raise ValueError(f"{path} is not a per-example file of tailored ({EXAMPLES_FORMAT!r} expected on its "
                             "first line): write one with tailored.analysis.write_examples")
        header = json.loads(first[len(f"# {EXAMPLES_FORMAT} "):])
        raw = pd.read_csv(fh, dtype=str, keep_default_na=False)
    frame = pd.DataFrame({"model": raw["model"], "task": raw["task"],
                          "prompt": raw["prompt"].where(raw["prompt"] != "", None), "k": raw["k"].astype(int),
                          "id": raw["id"]})
    for c in raw.columns:
        if c in frame.columns or c == "prediction":
            continue
        if c in ("loglikelihoods", "choice_bytes"):
            kind = float if c == "loglikelihoods" else int
            frame[c] = [[kind(v) for v in s.split(";")] if s else None for s in raw[c]]
        else:
            frame[c] = pd.to_numeric(raw[c].where(raw[c] != "", None), errors="raise").astype(float)
    if "prediction" in raw.columns:
        frame["prediction"] = raw["prediction"]
    models = pd.DataFrame(header.get("models") or [], columns=["model", "label", "kind", "share", "base", "recipe",
                                                                 "tasks", "prompt", "n"])
    return add_margins(frame), {"models": models, "settings": ClaimSettings.from_dict(header.get("settings") or {})}


def on_shared_examples(examples: pd.DataFrame, groups: Sequence[Sequence[tuple[str, str | None, int]]]) -> pd.DataFrame:
    """The records a comparison reads, every setting on the same examples.

    ``groups``: lists of evaluations ``(model, prompt, k)`` meant to be read side by side (the bars of one
    panel, the points of one curve). Per group and task, the records of its evaluations are cut to the example
    ids every one of them was scored on; a setting scored on more examples than the others (the headline at a
    claim's n, a prompt at ``limit``) would otherwise be drawn on examples the others never saw. Only the named
    evaluations are returned, text tasks (perplexity windows) whole; an evaluation two groups name keeps the
    examples either kept.
    """
    cells = cell_index(examples)
    kept = []
    for group in groups:
        named = {(m, None if pd.isna(p) else p, int(k)) for (m, p, k) in group}
        keys = [key for key in cells if (key[0], None if pd.isna(key[2]) else key[2], int(key[3])) in named]
        for task in dict.fromkeys(key[1] for key in keys):
            mine = [cells[key] for key in keys if key[1] == task]
            if TASKS.get(task) is not None and TASKS[task].kind == "text":
                kept += [part.reset_index() for part in mine]
                continue
            common = mine[0].index
            for part in mine[1:]:
                common = common.intersection(part.index)
            kept += [part.loc[part.index.isin(common)].reset_index() for part in mine]
    if not kept:
        return examples.iloc[:0]
    out = pd.concat(kept, ignore_index=True)[list(examples.columns)]
    return out.drop_duplicates(list(KEY_COLUMNS)).reset_index(drop=True)


def _scored_by_choice(task: str) -> bool:
    return TASKS[task].kind in SCORED_KINDS if task in TASKS else True


def headline_examples(examples: pd.DataFrame, models: pd.DataFrame, prompt: str | None, k: int) -> pd.DataFrame:
    """What ``main_table`` reads: every model's accuracy records under ``prompt`` at ``k`` shots (a model never
    scored under ``prompt`` with the first prompt it was scored under), cut to the examples every model of the
    table was scored on (``on_shared_examples``), so each column compares its rows on the same questions; the
    other tasks' records (generated answers, perplexity) as they are."""
    choice = examples["task"].map(_scored_by_choice)
    acc = examples[choice]
    group = []
    for m in main_runs(models)["model"]:
        mine = acc[(acc["model"] == m) & (acc["k"] == k)]
        if len(mine):
            group.append((m, prompt if (mine["prompt"] == prompt).any() else mine["prompt"].iloc[0], k))
    return pd.concat([on_shared_examples(acc, [group]), examples[~choice]], ignore_index=True)


def shared_n(examples: pd.DataFrame) -> dict[str, int]:
    """``{task: examples per evaluation}`` of records cut by ``on_shared_examples`` (the most, if groups differ)."""
    sizes = examples.groupby(["model", "task", "prompt", "k"], dropna=False).size()
    return {t: int(n) for t, n in sizes.groupby(level="task", sort=False).max().items()}


def task_chance(task: str, examples: pd.DataFrame | None = None) -> float | None:
    """Accuracy of uniform guessing on a task (``tasks.yaml``), or the mean of 1 / (number of answers) over its
    examples; ``None`` for generated and text tasks."""
    info = TASKS.get(task)
    if info is not None and info.kind not in SCORED_KINDS:
        return None
    if info is not None and info.chance is not None:
        return float(info.chance)
    if examples is None or "loglikelihoods" not in examples.columns:
        return None
    counts = [len(v) for v in examples.loc[examples["task"] == task, "loglikelihoods"] if isinstance(v, list)]
    return float(np.mean([1 / c for c in counts])) if counts else None


ROW_COLUMNS = ["model", "task", "kind", "prompt", "k", "n", "metric", "value", "stderr", "ci_low", "ci_high", "chance",
               "majority", "near_chance"]


def rows_from_examples(examples: pd.DataFrame) -> pd.DataFrame:
    """The long result rows (``tailored.evaluate.result_rows``' columns but timings) recomputed from per-example
    records: per (model, task, prompt, k) each metric's mean, standard error, 95% interval, chance and
    ``near_chance``; perplexity as ``exp(Σ nll / Σ tokens)`` over the windows. What ``main_table`` reads."""
    out = []
    for (model, task, prompt, k), part in examples.groupby(["model", "task", "prompt", "k"], dropna=False, sort=False):
        kind = TASKS[task].kind if task in TASKS else "multiple_choice"
        base = {"model": model, "task": task, "kind": kind, "prompt": None if pd.isna(prompt) else prompt, "k": int(k),
                "n": len(part)}
        if kind == "text":
            nll = float(part["nll"].sum() / part["tokens"].sum())
            for metric, value in (("perplexity", float(np.exp(nll))), ("nll", nll)):
                out.append({**base, "metric": metric, "value": value, "stderr": np.nan, "ci_low": np.nan,
                            "ci_high": np.nan, "chance": None, "majority": None, "near_chance": None})
            continue
        chance = task_chance(task, part)
        for metric in (*ACCURACY_METRICS, *GENERATION_METRICS):
            if metric not in part.columns or part[metric].isna().all():
                continue
            mean, se = mean_stderr(part[metric].to_numpy(float))
            low, high = ci95(mean, se)
            near = not_above_chance(mean, chance, se) if metric in ACCURACY_METRICS and chance is not None else None
            out.append({**base, "metric": metric, "value": mean, "stderr": se, "ci_low": low, "ci_high": high,
                        "chance": chance, "majority": None, "near_chance": near})
    return pd.DataFrame(out, columns=ROW_COLUMNS)


# ============================================================================== paired statistics, verdicts
Z975 = 1.959963984540054  # two-sided 95%
Z80 = 0.8416212335729143  # one-sided 80% power
BOOT_CHUNK = 500  # bootstrap replicates drawn at once: the index array is BOOT_CHUNK x n examples
VERDICTS = ("supported", "contradicted", "no effect beyond ±δ", "not settled")
# Tailored-LLaMA's recovery: share of the dense model's accuracy the pruned model keeps after tailored tuning,
# pruned / dense average of its seven tasks, in %, by share of parameters pruned (LLaMA-7B)
PAPER_RECOVERY = {0.2: 95.68, 0.5: 86.54}
PAPER_RECOVERY_SOURCE = "Tailored-LLaMA (Aftab & Davy 2024, arXiv 2410.19185), abstract"


@dataclass(frozen=True)
class ClaimSettings:
    """How the claims are decided (notebook 05's parameters; stored in the per-example file's header).

    - ``headline``: (prompt, k) of the main table and the pruning claims; ``lora_prompt``: the prompt the LoRA
      claims compare adapters with (the one the tailored recipe trains with).
    - ``deciding_tasks``: the tasks every deciding row pools, fixed before the run from the dense model alone
      (those it is above chance on); empty: every accuracy task the dense model was scored on.
    - ``claim_checkpoints``, ``prompt_models``, ``fewshot_models``: which models each claim is made for
      (empty: every pruned checkpoint; dense and the claim checkpoints).
    - ``delta`` (accuracy points) and ``margin_delta`` (standard deviations of the dense model's margin): an
      interval inside ±δ is "no effect beyond ±δ"; ``half_width``: the half-width (points) a deciding row aims
      at (a wider one says how many examples it would need); ``tolerance``: points a task may lose to pruning
      and still tolerate a share.
    """

    headline: tuple[str, int] = ("harness", 0)
    lora_prompt: str = "task_specific"
    deciding_tasks: tuple[str, ...] = ()
    claim_checkpoints: tuple[str, ...] = ()
    prompt_models: tuple[str, ...] = ()
    fewshot_models: tuple[str, ...] = ()
    k_sweep: tuple[int, ...] = ()
    delta: float = 2.0
    margin_delta: float = 0.05
    half_width: float = 2.0
    tolerance: float = 5.0
    n_boot: int = 10_000
    seed: int = 0

    def to_dict(self) -> dict:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ClaimSettings:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown claim settings {unknown}; known: {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def cell_index(examples: pd.DataFrame) -> dict[tuple, pd.DataFrame]:
    """``{(model, task, prompt, k): its records indexed by example id}``: every evaluation, looked up once."""
    prompts = examples["prompt"].where(examples["prompt"].notna(), None)
    return {(m, t, p, int(k)): part.set_index("id")
            for (m, t, p, k), part in examples.assign(prompt=prompts).groupby(
                ["model", "task", "prompt", "k"], dropna=False, sort=False)}


def paired_values(examples: pd.DataFrame | Mapping[tuple, pd.DataFrame], a: tuple[str, str | None, int],
                  b: tuple[str, str | None, int], tasks: Sequence[str] | None = None,
                  column: str | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{task: (values of a, values of b)}`` on the examples both were scored on, in the same order.

    ``a`` and ``b`` are ``(model, prompt, k)``; ``column`` is what is compared: each task's table metric
    (``table_metric``) by default, or e.g. ``"margin"``. Examples where either value is missing are left out.
    ``examples``: the records, or their ``cell_index``.
    """
    cells = examples if isinstance(examples, Mapping) else cell_index(examples)
    out = {}
    for task in tasks if tasks is not None else sorted({key[1] for key in cells}):
        pa, pb = cells.get((a[0], task, a[1], a[2])), cells.get((b[0], task, b[1], b[2]))
        name = column or table_metric(task)
        if pa is None or pb is None or name not in pa.columns or name not in pb.columns:
            continue
        common = pa.index.intersection(pb.index)
        va, vb = pa.loc[common, name].to_numpy(float), pb.loc[common, name].to_numpy(float)
        keep = np.isfinite(va) & np.isfinite(vb)
        if keep.any():
            out[task] = (va[keep], vb[keep])
    return out


def _task_seed(seed: int, task: str) -> list[int]:
    """A seed of its own for each task: resamples of two tasks of the same size must not be the same draw."""
    return [seed, zlib.crc32(task.encode())]


def boot_means(values: np.ndarray, n_boot: int, seed: int | Sequence[int]) -> np.ndarray:
    """Column means of ``values`` (n examples, columns) over ``n_boot`` resamples of its rows with replacement,
    the same rows for every column (what pairs the columns): ``(n_boot, columns)``. Rows of few distinct values
    (0/1 accuracy of a pair of models: four) are drawn as multinomial counts of each distinct row, the same
    distribution at a fraction of the cost; others in chunks of ``BOOT_CHUNK`` replicates, so memory stays at
    ``BOOT_CHUNK × n`` indices whatever ``n_boot``."""
    values = np.asarray(values, dtype=float)
    n = len(values)
    rng = np.random.default_rng(seed)
    unique, inverse = np.unique(values, axis=0, return_inverse=True)
    if len(unique) <= 64:  # 0/1 scores: resampling n rows = drawing how many of each distinct row, all at once
        freq = np.bincount(inverse.ravel(), minlength=len(unique)) / n
        return rng.multinomial(n, freq, size=n_boot) @ unique / n
    out = np.empty((n_boot, values.shape[1]))
    for start in range(0, n_boot, BOOT_CHUNK):
        m = min(n_boot, start + BOOT_CHUNK) - start
        idx = rng.integers(0, n, size=(m, n)) + n * np.arange(m)[:, None]  # row r draws from slots r·n … r·n + n−1
        counts = np.bincount(idx.ravel(), minlength=m * n).reshape(m, n)  # how often each example was drawn
        out[start:start + m] = counts @ values / n  # (m, n) @ (n, columns): the resampled means
    return out


def paired_bootstrap(pairs: Mapping[str, tuple[np.ndarray, np.ndarray]], n_boot: int = 10_000, seed: int = 0,
                     statistic: str = "difference", chance: Mapping[str, float] | None = None) -> dict:
    """``b − a`` per task and pooled over tasks, with 95% intervals from a paired bootstrap.

    Each replicate resamples the examples of every task with replacement, the same examples for ``a`` and
    ``b`` (the pairing), so what two models share cancels. ``statistic``:

    - ``"difference"``: the mean of ``b − a`` per task; pooled: the mean of the task means (each task weighs
      the same, as in the paper's average);
    - ``"recovery"``: ``(b − chance) / (a − chance)`` with ``a`` the dense model, pooled as
      ``mean(b − chance) / mean(a − chance)`` over tasks: the share of above-chance accuracy kept;
    - ``"ratio"``: ``mean(b) / mean(a)``, the paper's recovery (chance ignored).

    Returns ``{"tasks": {task: row}, "pooled": row}`` with rows ``n, estimate, low, high, half, se`` (``half``:
    the interval's half-width) and ``mde``: the smallest true difference this n would detect with 80% power at
    the 5% level (``2.80 · se``).
    """
    if statistic not in ("difference", "recovery", "ratio"):
        raise ValueError(f"statistic {statistic!r} is not difference, recovery or ratio")
    tasks = [t for t, (a, b) in pairs.items() if len(a)]
    if not tasks:
        return {"tasks": {}, "pooled": None}
    chance = {} if statistic == "ratio" else dict(chance or {})
    point_a, point_b, boot_a, boot_b = {}, {}, {}, {}
    for t in tasks:
        a, b = (np.asarray(x, dtype=float) for x in pairs[t])
        if len(a) != len(b):
            raise ValueError(f"{t}: {len(a)} and {len(b)} scores: a paired comparison needs the same examples")
        point_a[t], point_b[t] = a.mean(), b.mean()
        boots = boot_means(np.column_stack([a, b]), n_boot, _task_seed(seed, t))
        boot_a[t], boot_b[t] = boots[:, 0], boots[:, 1]

    def stat(ma, mb, ts):
        if statistic == "difference":
            return np.mean([mb[t] - ma[t] for t in ts], axis=0)
        above_a = np.mean([ma[t] - chance.get(t, 0.0) for t in ts], axis=0)
        above_b = np.mean([mb[t] - chance.get(t, 0.0) for t in ts], axis=0)
        return above_b / np.where(above_a == 0, np.nan, above_a)

    def row(ts):
        estimate = float(stat(point_a, point_b, ts))
        boots = np.asarray(stat(boot_a, boot_b, ts), dtype=float)
        boots = boots[np.isfinite(boots)]
        low, high = (np.percentile(boots, [2.5, 97.5]) if len(boots) and np.isfinite(estimate) else (np.nan, np.nan))
        se = float(boots.std(ddof=1)) if len(boots) > 1 else np.nan
        return {"n": int(sum(len(pairs[t][0]) for t in ts)), "estimate": estimate, "low": float(low),
                "high": float(high), "half": float(high - low) / 2, "se": se, "mde": (Z975 + Z80) * se}

    return {"tasks": {t: row([t]) for t in tasks}, "pooled": row(tasks)}


def no_effect(delta: float) -> str:
    """The equivalence verdict's words for a margin ``delta``."""
    return f"no effect beyond ±{delta:g}"


def verdict(low: float, high: float, threshold: float = 0.0, delta: float | None = None) -> str:
    """The verdict of a 95% interval ``[low, high]`` on a claim that the effect exceeds ``threshold``.

    ``supported`` when the whole interval lies above ``threshold``, ``contradicted`` when it lies below;
    otherwise, with a ``delta``, ``no effect beyond ±delta`` when it lies inside ``(threshold − delta,
    threshold + delta)`` (an equivalence: the sample rules out any effect as large as delta); else ``not
    settled`` (the data cannot tell at this n). An interval that excludes the threshold is supported (or
    contradicted) even when it is narrower than ±delta: a real effect, smaller than delta.
    """
    if not (np.isfinite(low) and np.isfinite(high)):
        return "not settled"
    if low > threshold:
        return "supported"
    if high < threshold:
        return "contradicted"
    if delta is not None and threshold - delta < low and high < threshold + delta:
        return no_effect(delta)
    return "not settled"


def examples_for_half_width(n: int, half: float, target: float) -> int:
    """Examples a row would need for a half-width of ``target``, from its own: an interval narrows as
    ``1 / sqrt(n)`` (its variance per example stays), so ``n · (half / target)²``, spread over the tasks as now."""
    return int(math.ceil(n * (half / target) ** 2))


def paper_position(paper: float, low: float, high: float) -> str:
    """Where the paper's figure lies against our 95% interval: inside, above or below it."""
    return "inside" if low <= paper <= high else "above" if paper > high else "below"


def margin_scales(cells: Mapping[tuple, pd.DataFrame], dense: str, headline: tuple[str, int],
                  tasks: Sequence[str]) -> dict[str, float]:
    """Per task, the standard deviation of the dense model's gold margin under the headline prompt: the ruler of
    every margin row (a change of 0.05 of it moves accuracy by at most 2 points when margins are about normal,
    whose density never exceeds 0.4 / SD)."""
    out = {}
    for t in tasks:
        part = cells.get((dense, t, headline[0], headline[1]))
        if part is not None and "margin" in part.columns:
            sd = float(part["margin"].dropna().std(ddof=1))
            if np.isfinite(sd) and sd > 0:
                out[t] = sd
    return out


# ------------------------------------------------------------------------------------------ the claims
KIND_SCALE = {"difference": 100.0, "margin": 1.0, "recovery": 100.0, "ratio": 100.0}  # points, SD, %, %
KIND_THRESHOLD = {"difference": 0.0, "margin": 0.0, "recovery": 0.5, "ratio": 0.5}
CLAIM_COLUMNS = ["claim", "comparison", "row", "measure", "tasks", "n", "estimate", "low", "high", "half-width",
                 "threshold", "delta", "verdict", "n for half-width", "paper", "paper vs ours"]
TASK_COLUMNS = ["claim", "comparison", "row", "task", "measure", "n", "estimate", "low", "high", "half-width",
                "verdict"]


def _task_order(task: str) -> tuple[int, str]:
    """The paper's seven tasks in its order, then the others by name: an order no file layout changes."""
    return (PAPER_TASKS.index(task) if task in PAPER_TASKS else len(PAPER_TASKS), task)


class _Claims:
    """Collects claim rows: each a paired comparison of two (model, prompt, k) on the same examples."""

    def __init__(self, examples: pd.DataFrame, models: pd.DataFrame, settings: ClaimSettings):
        self.s, self.cells = settings, cell_index(examples)
        main = main_runs(models)
        self.main = main
        self.dense = main.loc[main["kind"] == "dense", "model"].iloc[0] if (main["kind"] == "dense").any() else None
        scored = sorted({t for (m, t, p, k) in self.cells if m == self.dense and (p, k) == tuple(settings.headline)
                         and table_metric(t) in ACCURACY_METRICS}, key=_task_order)
        self.deciding = [t for t in settings.deciding_tasks if t in scored] if settings.deciding_tasks else scored
        self.chance = {t: task_chance(t, examples) for t in {key[1] for key in self.cells}}
        self.scales = margin_scales(self.cells, self.dense, tuple(settings.headline), self.deciding)
        self.rows: list[dict] = []
        self.per_task: list[dict] = []

    def add(self, claim: str, comparison: str, row: str, kind: str, a: tuple, b: tuple, tasks: Sequence[str],
            label: str, share: float | None = None) -> None:
        pairs = paired_values(self.cells, a, b, tasks, column="margin" if kind == "margin" else None)
        if kind == "margin":
            pairs = {t: (va / self.scales[t], vb / self.scales[t]) for t, (va, vb) in pairs.items() if t in self.scales}
        if not pairs:
            return
        stat = "difference" if kind == "margin" else kind
        out = paired_bootstrap(pairs, n_boot=self.s.n_boot, seed=self.s.seed, statistic=stat, chance=self.chance)
        scale, threshold = KIND_SCALE[kind], KIND_THRESHOLD[kind] * KIND_SCALE[kind]
        if kind == "ratio":  # a model at chance keeps chance / dense of the accuracy: "keeps most" must beat that
            dense_mean = np.mean([va.mean() for va, _ in pairs.values()])
            threshold = max(threshold, scale * np.mean([self.chance.get(t) or 0.0 for t in pairs]) / dense_mean)
        delta = {"difference": self.s.delta, "margin": self.s.margin_delta}.get(kind)
        p = out["pooled"]
        est, low, high, half = (scale * p[x] for x in ("estimate", "low", "high", "half"))
        paper = PAPER_RECOVERY.get(round(share, 1)) if kind == "ratio" and share is not None and abs(
            share - round(share, 1)) < 0.02 else None
        self.rows.append({"claim": claim, "comparison": comparison, "row": row, "measure": _measure(kind, label),
                          "tasks": ", ".join(pairs), "n": p["n"], "estimate": est, "low": low, "high": high,
                          "half-width": half, "threshold": threshold, "delta": np.nan if delta is None else delta,
                          "verdict": verdict(low, high, threshold, delta),
                          "n for half-width": (examples_for_half_width(p["n"], half, self.s.half_width)
                                               if row == "deciding" and half > self.s.half_width else np.nan),
                          "paper": np.nan if paper is None else paper,
                          "paper vs ours": "" if paper is None else paper_position(paper, low, high)})
        for t, r in out["tasks"].items():
            t_est, t_low, t_high, t_half = (scale * r[x] for x in ("estimate", "low", "high", "half"))
            self.per_task.append({"claim": claim, "comparison": comparison, "row": row, "task": t,
                                  "measure": _measure(kind, label, t, self.scales.get(t)), "n": r["n"],
                                  "estimate": t_est, "low": t_low, "high": t_high, "half-width": t_half,
                                  "verdict": verdict(t_low, t_high, threshold, delta)})


def _measure(kind: str, label: str, task: str | None = None, scale: float | None = None) -> str:
    """What a row measures, in words and units; per task with the task's metric (and the margin's ruler)."""
    metric = table_metric(task) if task else "accuracy"
    if kind == "difference":
        return f"{label}, {metric} points"
    if kind == "margin":
        if not task:
            return f"{label}, gold margin (SD of the dense model's)"
        unit = "nats per byte" if metric == "acc_norm" else "nats"
        return f"{label}, gold margin (SD of the dense model's; 1 SD = {scale:.3g} {unit})"
    if kind == "recovery":
        return f"{label}, share of above-chance {metric} kept (%)"
    return f"{label}, {metric} ratio, the paper's recovery (%)"


def claim_verdicts(examples: pd.DataFrame, models: pd.DataFrame,
                   settings: ClaimSettings = ClaimSettings()) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The study's claims, each a paired comparison on the same examples with a computed verdict.

    Every claim has a **deciding** row (the paired difference in accuracy points pooled over the deciding
    tasks: each task weighs the same) and a **margin** row (the paired change of the gold answer's margin over
    the best wrong answer, in SD of the dense model's margin, ``margin_scales``), each with its 95% paired
    bootstrap interval and a ``verdict`` (``supported``, ``contradicted``, ``no effect beyond ±δ``, ``not
    settled``); a deciding row wider than ``half_width`` says how many examples it would need.

    1. *pruning costs accuracy*: dense − pruned under the headline, for each claim checkpoint; beside it
       *pruning keeps most accuracy*: the share of above-chance accuracy kept, supported above 50%.
    2. *LoRA recovers accuracy*: each adapter − its checkpoint under ``lora_prompt``, on the deciding tasks it
       was trained for; for a tailored adapter also *tailored LoRA keeps most accuracy*: pruned + LoRA / dense
       (the paper's measure) on those tasks, and on the paper's seven under the headline, each beside the
       paper's own figure (``PAPER_RECOVERY``): inside, above or below our interval.
    3. *tailored beats generic*: tailored − generic adapter of a checkpoint, ``lora_prompt``.
    4. *task-specific prompts beat general ones*: task-specific − general prompt, each prompt model.
    5. *few-shot helps*: the largest k of ``k_sweep`` − the smallest, task-specific prompt, each few-shot model.
    6. *the best pruning level depends on the task* (``pruning_levels``).

    Returns ``(pooled, per_task)`` (``CLAIM_COLUMNS``, ``TASK_COLUMNS``).
    """
    pooled, per_task, _ = decide_claims(examples, models, settings)
    return pooled, per_task


def decide_claims(examples: pd.DataFrame, models: pd.DataFrame,
                  settings: ClaimSettings) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """``claim_verdicts``' two tables and ``pruning_levels``' per-(task, share) table, bootstrapped once."""
    c, s = _Claims(examples, models, settings), settings
    if c.dense is None:
        return pd.DataFrame(columns=CLAIM_COLUMNS), pd.DataFrame(columns=TASK_COLUMNS), pd.DataFrame()
    head, lora_p = tuple(s.headline), (s.lora_prompt, s.headline[1])
    pruned = c.main[c.main["kind"] == "pruned"]
    checkpoints = [m for m in pruned["model"] if not s.claim_checkpoints or m in s.claim_checkpoints]
    for m in checkpoints:
        for kind in ("difference", "margin"):
            c.add("pruning costs accuracy", f"dense vs {m}", "deciding" if kind == "difference" else "margin", kind,
                  (m, *head), (c.dense, *head), c.deciding, "dense − pruned")
        c.add("pruning keeps most accuracy", f"{m} vs dense", "share kept", "recovery", (c.dense, *head), (m, *head),
              c.deciding, "pruned vs dense")
    lora = c.main[c.main["kind"] == "lora"]
    for _, m in lora.iterrows():
        trained = [t for t in c.deciding if m["tasks"] in ("all", "") or t in m["tasks"].split(", ")]
        for kind in ("difference", "margin"):
            c.add("LoRA recovers accuracy", f"{m['label']} vs {m['base']}", "deciding" if kind == "difference"
                  else "margin", kind, (m["base"], *lora_p), (m["model"], *lora_p), trained, "LoRA − pruned")
        if m["recipe"] == "tailored":  # decided on the share of above-chance accuracy kept, as pruning's claim;
            # the paper's plain ratio beside it, for its own figure (a model at chance already keeps chance / dense)
            c.add("tailored LoRA keeps most accuracy", f"{m['label']} vs dense", "share kept", "recovery",
                  (c.dense, *lora_p), (m["model"], *lora_p), trained, "pruned + LoRA vs dense")
            c.add("tailored LoRA keeps most accuracy", f"{m['label']} vs dense", "paper's measure", "ratio",
                  (c.dense, *lora_p), (m["model"], *lora_p), trained, "pruned + LoRA / dense", share=m["share"])
            seven = [t for t in PAPER_TASKS if m["tasks"] in ("all", "") or t in m["tasks"].split(", ")]
            c.add("tailored LoRA keeps most accuracy", f"{m['label']} vs dense", "paper's 7 tasks", "ratio",
                  (c.dense, *head), (m["model"], *head), seven, "pruned + LoRA / dense", share=m["share"])
    for base, part in lora.groupby("base", sort=False):
        generic, tailored = part[part["recipe"] == "generic"], part[part["recipe"] == "tailored"]
        for _, t in tailored.iterrows():
            if generic.empty:
                continue
            trained = [x for x in c.deciding if t["tasks"] in ("all", "") or x in t["tasks"].split(", ")]
            for kind in ("difference", "margin"):
                c.add("tailored beats generic", f"{base}: tailored vs generic LoRA", "deciding" if kind == "difference"
                      else "margin", kind, (generic["model"].iloc[0], *lora_p), (t["model"], *lora_p), trained,
                      "tailored − generic")
    plain = [c.dense, *checkpoints]
    for m in [x for x in (s.prompt_models or plain)]:
        for kind in ("difference", "margin"):
            c.add("task-specific prompts beat general ones", m, "deciding" if kind == "difference" else "margin", kind,
                  (m, "general", s.headline[1]), (m, "task_specific", s.headline[1]), c.deciding,
                  "task-specific − general")
    if len(s.k_sweep) > 1:
        lo, hi = min(s.k_sweep), max(s.k_sweep)
        for m in (s.fewshot_models or plain):
            for kind in ("difference", "margin"):
                c.add("few-shot helps", f"{m}: {hi} vs {lo} shots", "deciding" if kind == "difference" else "margin",
                      kind, (m, "task_specific", lo), (m, "task_specific", hi), c.deciding, f"{hi} − {lo} shots")
    levels, tolerated, row = pruning_levels(examples, models, settings, cells=c.cells, deciding=c.deciding)
    if row is not None:
        c.rows.append(row)
        c.per_task += tolerated.to_dict(orient="records")
    pooled = pd.DataFrame(c.rows, columns=CLAIM_COLUMNS).astype({"n": int})
    pooled["n for half-width"] = [int(v) if np.isfinite(v) else "" for v in pooled["n for half-width"].astype(float)]
    return pooled, pd.DataFrame(c.per_task, columns=TASK_COLUMNS).astype({"n": int}), levels


# ------------------------------------------------------------------------------------------ pruning levels
LEVEL_CLAIM = "the best pruning level depends on the task"


def _tolerated(means: np.ndarray, shares: Sequence[float], tolerance: float) -> np.ndarray:
    """The largest share each replicate tolerates: ``means`` (replicates, levels) of accuracy, level 0 dense,
    levels by share; a level is tolerated while it and every smaller one lose less than ``tolerance`` (a
    fraction) against dense. ``(replicates,)`` shares."""
    ok = (means[:, :1] - means[:, 1:]) < tolerance  # (replicates, levels - 1)
    first_bad = np.where(ok.all(axis=1), ok.shape[1], np.argmin(ok, axis=1))  # levels passed before a failure
    return np.asarray([0.0, *shares[1:]])[first_bad]


def pruning_levels(examples: pd.DataFrame, models: pd.DataFrame, settings: ClaimSettings = ClaimSettings(),
                   cells: Mapping[tuple, pd.DataFrame] | None = None,
                   deciding: Sequence[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame, dict | None]:
    """Does the best level of pruning depend on the task? Accuracy and margin at every share removed.

    For each deciding task: the dense model and every pruned checkpoint under the headline, on the examples all
    were scored on; accuracy (%) and the gold margin with 95% bootstrap intervals, the loss against dense
    (points, paired). The **tolerated share** of a task is the largest share whose loss, and every smaller
    share's, stays under ``tolerance`` points; its interval comes from the same bootstrap (examples resampled
    once per replicate for every share). The claim: the tolerated shares differ between tasks, *supported* when
    some pair of tasks' difference has a Bonferroni-corrected 95% interval that excludes 0, *no effect beyond
    ±step* when every pair's lies within one step of the share grid, else *not settled*.

    Returns ``(levels, tolerated, claim row)``: ``levels`` one row per (task, share); ``tolerated`` per task
    (``TASK_COLUMNS``); the row ``None`` with fewer than two pruned levels or two tasks.
    """
    s = settings
    cells = cells if cells is not None else cell_index(examples)
    main = main_runs(models)
    dense = main.loc[main["kind"] == "dense", "model"]
    ladder = main[main["kind"] == "pruned"].sort_values("share", kind="stable")
    names = [*dense.iloc[:1], *ladder["model"]]
    shares = [0.0, *ladder["share"].astype(float)]
    tasks = list(deciding) if deciding is not None else list(s.deciding_tasks)
    levels, tolerated, boots = [], [], {}
    comparison = f"largest share losing < {s.tolerance:g} points"
    for t in tasks:
        parts = [cells.get((m, t, s.headline[0], s.headline[1])) for m in names]
        if len(parts) < 3 or any(p is None for p in parts):
            continue
        ids = parts[0].index
        for p in parts[1:]:
            ids = ids.intersection(p.index)
        metric = table_metric(t)
        acc = np.column_stack([p.loc[ids, metric].to_numpy(float) for p in parts])
        margin = np.column_stack([p.loc[ids, "margin"].to_numpy(float) for p in parts])
        rep = boot_means(np.hstack([acc, margin]), s.n_boot, _task_seed(s.seed, t))
        b_acc, b_margin = rep[:, :len(names)], rep[:, len(names):]
        for j, (m, share) in enumerate(zip(names, shares)):
            loss = b_acc[:, 0] - b_acc[:, j]
            levels.append({"task": t, "metric": metric, "model": m, "share": 100 * share, "n": len(ids),
                           "accuracy": 100 * acc[:, j].mean(), **_interval("accuracy", 100 * b_acc[:, j]),
                           "loss": 100 * (acc[:, 0].mean() - acc[:, j].mean()), **_interval("loss", 100 * loss),
                           "margin": margin[:, j].mean(), **_interval("margin", b_margin[:, j])})
        point = float(_tolerated(acc.mean(axis=0)[None, :], shares, s.tolerance / 100)[0])
        boots[t] = _tolerated(b_acc, shares, s.tolerance / 100)
        low, high = np.percentile(100 * boots[t], [2.5, 97.5])
        tolerated.append({"claim": LEVEL_CLAIM, "comparison": comparison, "row": "tolerated share", "task": t,
                          "measure": f"largest share removed losing < {s.tolerance:g} {metric} points (%)",
                          "n": len(ids), "estimate": 100 * point, "low": float(low), "high": float(high),
                          "half-width": float(high - low) / 2, "verdict": ""})
    return pd.DataFrame(levels), pd.DataFrame(tolerated, columns=TASK_COLUMNS), _level_row(tolerated, boots, shares, s)


def _interval(name: str, replicates: np.ndarray) -> dict[str, float]:
    low, high = np.percentile(replicates, [2.5, 97.5])
    return {f"{name} low": float(low), f"{name} high": float(high)}


def _level_row(tolerated: list[dict], boots: Mapping[str, np.ndarray], shares: Sequence[float],
               s: ClaimSettings) -> dict | None:
    """The claim row of ``pruning_levels``: the pair of tasks whose tolerated shares differ most, with its
    Bonferroni-corrected interval, and the verdict over all pairs."""
    if len(tolerated) < 2:
        return None
    step = float(np.round(100 * np.min(np.diff(shares))))  # the grid's step (targets are met within a point)
    point = {r["task"]: r["estimate"] for r in tolerated}
    pairs = list(itertools.combinations(point, 2))
    q = 2.5 / len(pairs)
    bounds = {(a, b): np.percentile(100 * (boots[a] - boots[b]), [q, 100 - q]) for a, b in pairs}
    a, b = max(pairs, key=lambda ab: abs(point[ab[0]] - point[ab[1]]))
    if point[a] < point[b]:
        a, b = b, a
    low, high = (float(v) for v in 100 * np.percentile(boots[a] - boots[b], [q, 100 - q]))
    if any(lo > 0 or hi < 0 for lo, hi in bounds.values()):
        decided = "supported"
    elif all(-step <= lo and hi <= step for lo, hi in bounds.values()):
        decided = no_effect(step)
    else:
        decided = "not settled"
    return {"claim": LEVEL_CLAIM, "comparison": f"largest share losing < {s.tolerance:g} points: {a} vs {b}",
            "row": "deciding", "measure": f"difference in tolerated share between tasks, points of share "
            f"(Bonferroni over {len(pairs)} pairs)", "tasks": ", ".join(point), "n": int(sum(r["n"] for r in tolerated)),
            "estimate": point[a] - point[b], "low": low, "high": high, "half-width": (high - low) / 2, "threshold": 0.0, "delta": step,
            "verdict": decided, "n for half-width": np.nan, "paper": np.nan, "paper vs ours": ""}


# ------------------------------------------------------------------------------------------ findings
def findings(pooled: pd.DataFrame, per_task: pd.DataFrame | None = None) -> pd.DataFrame:
    """One computed sentence per claim: each comparison's deciding estimate with its interval and verdict, its
    share kept or the paper's figure where the claim has them, the margin's verdict; for the pruning-level
    claim each task's tolerated share (from ``per_task``). Columns ``claim, finding``."""
    out = []
    for claim, part in pooled.groupby("claim", sort=False):
        bits = [_phrase(comparison, {row["row"]: row for _, row in rows.iterrows()})
                for comparison, rows in part.groupby("comparison", sort=False)]
        if claim == LEVEL_CLAIM and per_task is not None:
            tol = per_task[(per_task["claim"] == claim) & (per_task["row"] == "tolerated share")]
            bits.insert(0, "tolerated share " + ", ".join(f"{r.task} {r.estimate:.0f}% [{r.low:.0f}, {r.high:.0f}]"
                                                          for r in tol.itertuples()))
        widest = part.loc[part["n"].idxmax()]
        out.append({"claim": claim, "finding": f"{claim[0].upper()}{claim[1:]}: " + "; ".join(bits)
                    + f" (up to {int(widest['n']):,} paired examples, on {widest['tasks']})."})
    return pd.DataFrame(out, columns=["claim", "finding"])


def _phrase(comparison: str, rows: Mapping[str, pd.Series]) -> str:
    """One comparison in words: 'dense vs block_20: +3.1 points [+1.2, +4.9], supported; margin +0.110 SD, …'."""
    parts = []
    if "deciding" in rows:
        r = rows["deciding"]
        unit = "points of share" if "points of share" in r["measure"] else "points"
        parts.append(f"{r['estimate']:+.1f} {unit} [{r['low']:+.1f}, {r['high']:+.1f}], {r['verdict']}")
    for name, what in (("share kept", "share kept"), ("paper's measure", "by the paper's ratio"),
                       ("paper's 7 tasks", "on the paper's 7 tasks")):
        if name in rows:
            r = rows[name]
            text = f"{what} {r['estimate']:.1f}% [{r['low']:.1f}, {r['high']:.1f}], {r['verdict']}"
            if "ratio" in r["measure"]:
                text += f" against the {r['threshold']:.0f}% a model at chance keeps"
            if r["paper vs ours"]:
                text += f" (the paper's {r['paper']:.2f}% lies {r['paper vs ours']}" + (
                    ")" if r["paper vs ours"] == "inside" else " it)")
            parts.append(text)
    if "margin" in rows:
        parts.append(f"margin {rows['margin']['estimate']:+.3f} SD, {rows['margin']['verdict']}")
    return f"{comparison}: " + ", ".join(parts)


# ------------------------------------------------------------------------------------------ from the file alone
TABLE_FORMATS = {"eval_claims": ".3g", "eval_claims_by_task": ".3g", "eval_main_table": ".2f",
                 "eval_pruning_levels": ".3g"}


def tables_from_examples(examples: pd.DataFrame, models: pd.DataFrame,
                         settings: ClaimSettings) -> dict[str, Any]:
    """Every table notebook 05 derives from per-example records: ``eval_main_table`` (on the examples every one
    of its models was scored on, ``headline_examples``; its ``notes`` say how many per task in ``n``),
    ``eval_claims``, ``eval_claims_by_task``, ``eval_pruning_levels`` and ``eval_findings``. The notebook and
    ``python -m tailored.analysis`` both call this on the records read back from the published file."""
    prompt, k = settings.headline
    headline = headline_examples(examples, models, prompt, k)
    table, notes = main_table(rows_from_examples(headline), models, prompt=prompt, k=k)
    notes["n"] = {t: n for t, n in shared_n(headline).items() if t in notes["metrics"]}  # the accuracy tasks
    claims, by_task, levels = decide_claims(examples, models, settings)
    return {"eval_main_table": table, "notes": notes, "eval_claims": claims, "eval_claims_by_task": by_task,
            "eval_pruning_levels": levels, "eval_findings": findings(claims, by_task)}


def table_csv(table: pd.DataFrame, name: str) -> str:
    """A table as ``tailored.figures.save_table`` writes its CSV, in the table's float format."""
    return table.to_csv(index=False, float_format=f"%{TABLE_FORMATS.get(name, '.4g')}")


def check_published(path: str | Path, folder: str | Path | None = None,
                    names: Sequence[str] = ("eval_claims", "eval_main_table")) -> dict[str, bool]:
    """Recompute the tables from a per-example file and compare them, byte for byte, with the CSVs in ``folder``
    (default: the file's own): ``{name: identical}``. A missing CSV counts as different."""
    examples, header = read_examples(path)
    tables = tables_from_examples(examples, header["models"], header["settings"])
    folder = Path(folder) if folder is not None else Path(path).parent
    return {n: (folder / f"{n}.csv").exists() and (folder / f"{n}.csv").read_text() == table_csv(tables[n], n)
            for n in names}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tailored.analysis figures/study/examples.csv.gz``: recompute the claims and the headline
    table from the published per-example file alone and compare them with the committed CSVs beside it
    (``--out DIR`` writes them there instead). Exit status 1 if any differs."""
    ap = argparse.ArgumentParser(prog="python -m tailored.analysis", description=main.__doc__.split("\n\n")[0])
    ap.add_argument("examples", type=Path, help="a per-example file (examples.csv.gz)")
    ap.add_argument("--out", type=Path, help="write the recomputed CSVs (and the findings) here instead of comparing")
    ap.add_argument("--against", type=Path, help="the folder of the committed CSVs (default: the file's own)")
    args = ap.parse_args(argv)
    if args.out:
        examples, header = read_examples(args.examples)
        tables = tables_from_examples(examples, header["models"], header["settings"])
        for name in ("eval_claims", "eval_claims_by_task", "eval_main_table", "eval_findings"):
            atomic_write_text(args.out / f"{name}.csv", table_csv(tables[name], name))
        print(tables["eval_findings"].to_string(index=False))
        return 0
    same = check_published(args.examples, args.against)
    for name, ok in same.items():
        print(f"{name}.csv: {'identical' if ok else 'DIFFERS'} (recomputed from {args.examples})")
    return 0 if all(same.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
