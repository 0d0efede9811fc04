"""The study's analysis: tables of scores, recovery, and the claims, computed from evaluation rows.

Everything here reads two pandas frames:

- ``rows``: the long rows of ``tailored.evaluate.result_rows`` (one per model, task, prompt, k and metric,
  with ``value``, ``stderr``, ``ci_low``/``ci_high``, ``chance``, ``majority``, ``near_chance``);
- ``models``: one row per evaluated model (``models_frame``): ``model`` (the name in ``rows``), ``label`` (its
  row in the main table; several models may share one, e.g. one tailored adapter per task), ``kind``
  (dense, pruned, lora), ``share`` (share of decoder parameters removed, 0 for dense) and ``recipe``.

::

    table, notes = main_table(rows, models, prompt="task_specific", k=5)
    pooled, per_task = claim_verdicts(example_frame(results_by_model), models, ("harness", 0), k_sweep=[0, 5])

Which number a task reports follows LLM-Pruner's table, which Tailored-LLaMA copies: ``acc_norm`` for
HellaSwag, ARC-Challenge and OpenBookQA, ``acc`` for the others (LLaMA-7B's 72.99 on HellaSwag and 67.45 on
ARC-Easy there are the harness's acc_norm and acc). SQuAD reports F1, XSum ROUGE-L. The figures of these
tables are drawn by ``tailored.figures.evaluate``; this module imports no plotting library.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

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
    acc = rows[rows["kind"].isin(["classification", "multiple_choice"])]
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
    s = s[s["kind"].isin(["classification", "multiple_choice"])]
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


# ============================================================================== paired statistics, verdicts
Z975 = 1.959963984540054  # two-sided 95%
Z80 = 0.8416212335729143  # one-sided 80% power
VERDICTS = ("supported", "contradicted", "not settled")


def example_frame(results: Mapping[str, Sequence[Mapping[str, Any]]]) -> pd.DataFrame:
    """Per-example scores of every evaluation: ``{model: [evaluate_task results]}`` -> one row per (model,
    task, prompt, k, example id) with a column per metric (0/1 for accuracy). What paired statistics read."""
    frames = []
    for model, rs in results.items():
        for r in rs:
            per = r.get("per_example")
            if not per or not per.get("ids"):
                continue
            part = pd.DataFrame({k: v for k, v in per.items()})
            part.insert(0, "k", r["k"])
            part.insert(0, "prompt", r["prompt"])
            part.insert(0, "task", r["task"])
            part.insert(0, "model", model)
            frames.append(part)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["model", "task", "prompt", "k", "ids"])


def paired_values(examples: pd.DataFrame, a: tuple[str, str | None, int], b: tuple[str, str | None, int],
                  tasks: Sequence[str] | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{task: (scores of a, scores of b)}`` on the examples both were scored on, in the same order.

    ``a`` and ``b`` are ``(model, prompt, k)``; each task's table metric (``table_metric``) is compared.
    """
    out = {}

    def pick(model, prompt, k, task):
        part = examples[(examples["model"] == model) & (examples["task"] == task) & (examples["k"] == k)]
        part = part[part["prompt"] == prompt] if prompt is not None else part[part["prompt"].isna()]
        return part.drop_duplicates("ids").set_index("ids")

    for task in tasks if tasks is not None else sorted(set(examples["task"])):
        metric = table_metric(task)
        pa, pb = pick(*a, task), pick(*b, task)
        if metric not in pa.columns or metric not in pb.columns:
            continue
        common = pa.index.intersection(pb.index)
        if len(common):
            out[task] = (pa.loc[common, metric].to_numpy(float), pb.loc[common, metric].to_numpy(float))
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

    Returns ``{"tasks": {task: row}, "pooled": row}`` with rows ``n, estimate, low, high, se`` and ``mde``:
    the smallest true difference this n would detect with 80% power at the 5% level (``2.80 · se``).
    """
    rng = np.random.default_rng(seed)
    tasks = [t for t, (a, b) in pairs.items() if len(a)]
    if not tasks:
        return {"tasks": {}, "pooled": None}
    chance = chance or {}
    point_a, point_b, boot_a, boot_b = {}, {}, {}, {}
    for t in tasks:
        a, b = (np.asarray(x, dtype=float) for x in pairs[t])
        if len(a) != len(b):
            raise ValueError(f"{t}: {len(a)} and {len(b)} scores: a paired comparison needs the same examples")
        idx = rng.integers(0, len(a), size=(n_boot, len(a)))
        point_a[t], point_b[t] = a.mean(), b.mean()
        boot_a[t], boot_b[t] = a[idx].mean(1), b[idx].mean(1)

    if statistic not in ("difference", "recovery", "ratio"):
        raise ValueError(f"statistic {statistic!r} is not difference, recovery or ratio")
    if statistic == "ratio":
        chance = {}

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
        low, high = (np.percentile(boots, [2.5, 97.5]) if len(boots) else (np.nan, np.nan))
        se = float(boots.std(ddof=1)) if len(boots) > 1 else np.nan
        return {"n": int(sum(len(pairs[t][0]) for t in ts)), "estimate": estimate, "low": float(low),
                "high": float(high), "se": se, "mde": (Z975 + Z80) * se}

    return {"tasks": {t: row([t]) for t in tasks}, "pooled": row(tasks)}


def verdict(low: float, high: float, threshold: float = 0.0) -> str:
    """``supported`` when the whole 95% interval lies above ``threshold``, ``contradicted`` when it lies below,
    else ``not settled`` (the data cannot tell at this n)."""
    if not (np.isfinite(low) and np.isfinite(high)):
        return "not settled"
    return "supported" if low > threshold else "contradicted" if high < threshold else "not settled"


def claim_verdicts(examples: pd.DataFrame, models: pd.DataFrame, headline: tuple[str, int] = ("harness", 0),
                   k_sweep: Sequence[int] = (), chance: Mapping[str, float] | None = None,
                   near_chance: Sequence[str] = (), tasks: Sequence[str] = PAPER_TASKS, n_boot: int = 10_000,
                   seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The study's claims, each a paired comparison on the same examples with a computed verdict.

    ``examples``: ``example_frame`` of the evaluations; ``headline``: the main table's (prompt, k).
    Claims and how each is decided (95% paired-bootstrap interval of the pooled statistic over ``tasks``):

    0. *pruning costs accuracy*: dense vs pruned, ``dense − pruned`` in points over the tasks where the dense model
       is above chance: the largest effect a run can show; supported when the whole interval is above 0 (the
       run has enough examples to see what pruning costs).
    1. *pruning keeps most accuracy*: pruned vs dense, the share of above-chance accuracy kept,
       ``mean(pruned − chance) / mean(dense − chance)`` over the tasks where the dense model is above chance by
       more than two standard errors (``near_chance`` lists the others: there it has no accuracy to keep);
       supported when the whole interval is above one half. The paper's measure, ``pruned / dense``, is reported beside it.
    2. *LoRA recovers accuracy*: each main adapter vs its pruned checkpoint, on the headline: above 0.
    3. *tailored beats generic*: the tailored vs the generic adapter of a checkpoint, on the tasks the tailored
       one was trained for, with the task-specific prompt both were scored with: above 0.
    4. *task-specific prompts beat general ones*: the same model, task-specific vs general prompt: above 0.
    5. *few-shot helps*: the same model, the largest k of ``k_sweep`` vs 0 shots (task-specific prompt): above 0.

    Returns ``(pooled, per_task)``: one row per (claim, comparison) with ``tasks, n, estimate, low, high, mde``
    (differences in accuracy points, recoveries in %), the ``threshold`` and the ``verdict``; and the same per task.
    """
    chance = dict(chance or {})
    prompt, k = headline
    main = main_runs(models)
    dense = main.loc[main["kind"] == "dense", "model"].tolist()
    signal = [t for t in tasks if t not in near_chance]
    rows, per_task = [], []

    def add(claim, comparison, a, b, on_tasks, statistic="difference", threshold=0.0, scale=100.0, note=""):
        pairs = paired_values(examples, a, b, on_tasks)
        if not pairs:  # e.g. the dense model is at chance on every task: nothing to keep, nothing to decide
            return
        out = paired_bootstrap(pairs, n_boot=n_boot, seed=seed, statistic=statistic, chance=chance)
        p = out["pooled"]
        rows.append({"claim": claim, "comparison": comparison, "measure": note or statistic,
                     "tasks": len(pairs), "n": p["n"], "estimate": scale * p["estimate"], "low": scale * p["low"],
                     "high": scale * p["high"], "mde": scale * p["mde"], "threshold": scale * threshold,
                     "verdict": verdict(p["low"], p["high"], threshold)})
        for t, r in out["tasks"].items():
            per_task.append({"claim": claim, "comparison": comparison, "task": t, "n": r["n"],
                             "estimate": scale * r["estimate"], "low": scale * r["low"], "high": scale * r["high"],
                             "verdict": verdict(r["low"], r["high"], threshold)})

    if dense:
        for _, m in main[main["kind"] == "pruned"].iterrows():
            a, b = (dense[0], prompt, k), (m["model"], prompt, k)
            add("pruning costs accuracy", f"dense vs {m['model']}", b, a, signal,
                note="dense − pruned (points)")
            add("pruning keeps most accuracy", f"{m['model']} vs dense", a, b, signal, "recovery", 0.5,
                note="share of above-chance accuracy kept (%)")
            add("pruning keeps most accuracy", f"{m['model']} vs dense", a, b, tasks, "ratio", 0.5,
                note="pruned / dense, the paper's recovery (%)")
    for _, m in main[main["kind"] == "lora"].iterrows():
        trained = [t for t in tasks if m["tasks"] in ("all", "") or t in m["tasks"].split(", ")]
        add("LoRA recovers accuracy", f"{m['label']} vs {m['base']}", (m["base"], prompt, k),
            (m["model"], prompt, k), trained, note="difference (points)")
    lora = main[main["kind"] == "lora"]
    for base, part in lora.groupby("base", sort=False):
        generic = part[part["recipe"] == "generic"]
        for _, t in part[part["recipe"] == "tailored"].iterrows():
            if generic.empty:
                continue
            trained = [x for x in tasks if t["tasks"] == "all" or x in t["tasks"].split(", ")]
            own = t["prompt"] or "task_specific"
            add("tailored beats generic", f"{base}: tailored vs generic LoRA", (generic["model"].iloc[0], own, k),
                (t["model"], own, k), trained, note=f"difference (points), {own} prompt")
    for _, m in main[main["kind"] != "lora"].iterrows():
        add("task-specific prompts beat general ones", m["model"], (m["model"], "general", k),
            (m["model"], "task_specific", k), tasks, note="difference (points)")
    if len(k_sweep) > 1:
        lo, hi = min(k_sweep), max(k_sweep)
        for _, m in main[main["kind"] != "lora"].iterrows():
            add("few-shot helps", f"{m['model']}: {hi} vs {lo} shots", (m["model"], "task_specific", lo),
                (m["model"], "task_specific", hi), tasks, note="difference (points)")
    return pd.DataFrame(rows), pd.DataFrame(per_task)
