"""Figures of notebook 05: few-shot accuracy of dense, pruned and LoRA-tuned models.

The tables and numbers they draw come from ``tailored.analysis``::

    fig = plot_accuracy_vs_k(rows, ["arc_easy", "sst2"], prompt="task_specific")
    fig = plot_prompts(rows, k=5)
    fig = plot_accuracy_vs_share(rows, models, prompt="harness", tasks=["piqa"], lora_rows=rows,
                                 lora_prompt="task_specific")
    fig = plot_tailored_vs_generic(tailored_vs_generic(rows, models, k=5))
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from tailored.analysis import (
    PAPER_TASKS,
    accuracy_tasks,
    main_runs,
    model_scores,
    scores,
    table_metric,
)
from tailored.data import SCORED_KINDS
from tailored.figures import plt

PROMPT_LABELS = {"harness": "harness (lm-eval default)", "general": "general instruction",
                 "task_specific": "task-specific"}
RECIPE_MARKERS = {"": "o", "generic": "s", "tailored": "*"}


def plot_accuracy_vs_k(rows: pd.DataFrame, tasks: Sequence[str], prompt: str = "task_specific",
                       models: Sequence[str] | None = None, ncols: int = 3):
    """Accuracy against the number of shots k, one panel per task, one line per model, 95% CI bands.

    The x axis is symmetric-log (k = 0, 1, 5, 25 spread evenly); the dotted line is chance. Each panel's title
    gives its examples per point: draw it from rows on shared examples (``tailored.analysis.on_shared_examples``)
    so that every k is read on the same questions.
    """
    s = scores(rows, prompt)
    s = s[s["task"].isin(tasks)]
    tasks = [t for t in tasks if t in set(s["task"])]
    models = list(models or dict.fromkeys(s["model"]))
    ncols = max(1, min(ncols, len(tasks)))
    nrows = max(1, -(-len(tasks) // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.3 * ncols, 2.8 * nrows), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        part = s[s["task"] == task]
        for i, m in enumerate(models):
            line = part[part["model"] == m].sort_values("k")
            if line.empty:
                continue
            ax.plot(line["k"], line["value"], marker="o", ms=4, color=f"C{i}", label=m)
            ax.fill_between(line["k"], line["ci_low"], line["ci_high"], color=f"C{i}", alpha=0.15, lw=0)
        if part["chance"].notna().any():
            ax.axhline(part["chance"].dropna().iloc[0], color="0.5", ls=":", lw=1, label="chance")
        ks = sorted(set(part["k"]))
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlim(-0.15, max(ks) * 1.15 + 0.15)
        ax.set_xticks(ks, [str(int(v)) for v in ks])
        ax.minorticks_off()
        n = sorted(set(part["n"].astype(int)))
        ax.set_title(f"{task} ({table_metric(task)}, n = {'–'.join(map(str, n[::max(1, len(n) - 1)]))})", fontsize=9)
        ax.set_xlabel("shots k")
        ax.set_ylabel("accuracy" if table_metric(task).startswith("acc") else table_metric(task))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tasks):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.suptitle(f"More shots, {prompt} prompt: accuracy against k (bands: 95% CI)")
    fig.tight_layout(rect=(0, 0.1 / nrows, 1, 1))  # room below the panels: the legend covers no band
    fig.legend(handles, labels, fontsize=7, frameon=False, loc="lower center", ncols=min(len(labels), 6))
    return fig


def plot_prompts(rows: pd.DataFrame, k: int, models: Sequence[str] | None = None,
                 prompts: Sequence[str] | None = None):
    """Grouped bars per task, one bar per prompt, 95% CI error bars; one panel per model.

    Chance is a short black line over each task's bars. Generation tasks show F1 (SQuAD) or ROUGE-L (XSum).
    Each tick gives the task's examples per bar: draw it from rows on shared examples, one group per model
    (``tailored.analysis.on_shared_examples``), so a panel's bars are read on the same questions.
    """
    s = scores(rows, None, k)
    s = s[s["kind"] != "text"]
    models = list(models or dict.fromkeys(s["model"]))
    prompts = list(prompts or dict.fromkeys(s["prompt"].dropna()))
    tasks = list(dict.fromkeys(s["task"]))
    width = 0.8 / max(1, len(prompts))
    fig, axes = plt.subplots(len(models), 1, figsize=(max(6.0, 1.0 * len(tasks) + 2), 2.8 * len(models) + 0.4),
                             squeeze=False, sharey=True)
    x = np.arange(len(tasks))
    for ax, m in zip(axes[:, 0], models):
        part = s[s["model"] == m].set_index(["task", "prompt"])
        for j, p in enumerate(prompts):
            vals = np.array([part["value"].get((t, p), np.nan) for t in tasks], dtype=float)
            lo = np.array([part["ci_low"].get((t, p), np.nan) for t in tasks], dtype=float)
            hi = np.array([part["ci_high"].get((t, p), np.nan) for t in tasks], dtype=float)
            ax.bar(x + (j - (len(prompts) - 1) / 2) * width, vals, width, color=f"C{j}",
                   yerr=[np.nan_to_num(vals - lo), np.nan_to_num(hi - vals)], capsize=2, error_kw={"lw": 0.8},
                   label=PROMPT_LABELS.get(p, p))
        for i, t in enumerate(tasks):
            ch = s.loc[s["task"] == t, "chance"].dropna()
            if len(ch):
                ax.hlines(ch.iloc[0], i - 0.45, i + 0.45, color="black", lw=1)
        n = part["n"].groupby(level="task").max()
        ax.set_xticks(x, [f"{t}\n{table_metric(t)}" + (f"\nn = {int(n[t])}" if t in n.index else "") for t in tasks],
                      fontsize=7)
        ax.set_ylabel(f"{m}\nscore")
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.suptitle(f"Does the prompt matter? {k}-shot scores per prompt, each panel on shared examples "
                 "(bars: 95% CI; black: chance)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))  # room above the panels: no bar hidden
    fig.legend(handles, labels, fontsize=7, frameon=False, ncols=len(prompts), loc="upper center",
               bbox_to_anchor=(0.5, 1 - 0.3 / fig.get_figheight()))
    return fig


def _average(part: pd.DataFrame, tasks: Sequence[str]) -> pd.DataFrame:
    """Per model: the mean over ``tasks`` of its scores and the 95% interval of that mean (the tasks' samples
    are independent: se = sqrt(Σ se²) / T); only models scored on every one of ``tasks``."""
    part = part[part["task"].isin(tasks)]
    g = part.groupby("model", sort=False)
    out = pd.DataFrame({"value": g["value"].mean(), "se": g["stderr"].apply(lambda v: np.sqrt((v ** 2).sum()) / len(v)),
                        "tasks": g["task"].nunique()})
    out = out[out["tasks"] == len(tasks)]
    return out.assign(low=out["value"] - 1.96 * out["se"], high=out["value"] + 1.96 * out["se"])


def plot_accuracy_vs_share(rows: pd.DataFrame, models: pd.DataFrame, prompt: str = "task_specific",
                           k: int = 0, tasks: Sequence[str] | None = None, lora_rows: pd.DataFrame | None = None,
                           lora_prompt: str | None = None):
    """Accuracy against the share of decoder parameters removed, in two panels read on shared examples.

    - left, *what pruning costs*: the models without LoRA under ``prompt`` (``rows``: cut to the examples all of
      them were scored on), a thin line per accuracy task and a thick one for the average over ``tasks`` (the
      deciding tasks; the paper's seven where evaluated if none are given) with its 95% band;
    - right, *what LoRA wins back* (when ``lora_rows`` holds LoRA-tuned models): the average over the same
      ``tasks`` under ``lora_prompt`` of the dense model, the checkpoints tuned and their adapters (square:
      generic recipe, star: tailored), all on the examples every one of them was scored on, 95% bars.

    Every point of a panel averages the same tasks on the same questions; the legend and titles say how many.
    """
    models = main_runs(models)
    info = models[["model", "share", "recipe", "kind"]].rename(columns={"kind": "model_kind"})

    def scored(frame, p):
        out = model_scores(frame, models, p, k).merge(info, on="model")
        return out[out["kind"].isin(SCORED_KINDS)]

    s = scored(rows, prompt)
    plain = s[s["model_kind"] != "lora"]
    acc_tasks = accuracy_tasks(plain)
    avg_tasks = [t for t in (tasks or [t for t in PAPER_TASKS if t in acc_tasks] or acc_tasks) if t in acc_tasks]
    tuned = scored(lora_rows, lora_prompt or prompt) if lora_rows is not None else s.iloc[:0]
    has_lora = (tuned["model_kind"] == "lora").any()
    fig, axes = plt.subplots(1, 2 if has_lora else 1, figsize=(11.0 if has_lora else 6.6, 4.2), squeeze=False)
    ax = axes[0, 0]
    for i, t in enumerate(acc_tasks):
        line = plain[plain["task"] == t].sort_values("share")
        ax.plot(100 * line["share"], line["value"], color=f"C{i % 10}", lw=1, marker=".", alpha=0.6,
                ls="-" if t in avg_tasks else ":", label=f"{t} (n = {int(line['n'].max())})")
    avg = _average(plain, avg_tasks).join(plain.groupby("model")["share"].first()).sort_values("share")
    ax.fill_between(100 * avg["share"], avg["low"], avg["high"], color="black", alpha=0.12, lw=0)
    ax.plot(100 * avg["share"], avg["value"], color="black", lw=2.2, marker="o",
            label=f"average of the {len(avg_tasks)} solid tasks (95% band)")
    ax.set_title(f"What pruning costs ({prompt} prompt, k = {k})", fontsize=10)
    ax.set_ylabel("accuracy (each task's metric)")
    if has_lora:
        bx = axes[0, 1]
        both = _average(tuned, avg_tasks).join(tuned.groupby("model")[["share", "recipe", "model_kind"]].first())
        base = both[both["model_kind"] != "lora"].sort_values("share")
        bx.plot(100 * base["share"], base["value"], color="black", lw=1.6, marker="o", label="no LoRA")
        bx.fill_between(100 * base["share"], base["low"], base["high"], color="black", alpha=0.12, lw=0)
        for j, (recipe, part) in enumerate(both[both["model_kind"] == "lora"].groupby("recipe")):
            bx.errorbar(100 * part["share"] + 1.2 * (j - 0.5), part["value"],  # side by side, not on each other
                        yerr=[part["value"] - part["low"], part["high"] - part["value"]],
                        ls="none", marker=RECIPE_MARKERS.get(recipe, "D"), ms=10, color="black", capsize=3,
                        mfc="white" if recipe == "generic" else "gold", label=f"+ {recipe} LoRA")
        left_out = sorted(set(tuned.loc[tuned["model_kind"] == "lora", "model"]) - set(both.index))
        if left_out:  # an adapter not scored on every one of the tasks would average other questions
            bx.text(0.01, 0.01, "not scored on every task, left out: " + ", ".join(left_out), fontsize=6.5,
                    transform=bx.transAxes, va="bottom", color="0.35")
        n = tuned[tuned["task"].isin(avg_tasks)].groupby("task")["n"].max()
        bx.set_title(f"What LoRA wins back ({lora_prompt or prompt} prompt, k = {k})\naverage of the same tasks on "
                     f"{', '.join(f'{int(v)} {t}' for t, v in n.items())} examples", fontsize=9)
        bx.legend(fontsize=7, frameon=False, loc="best")
    chance = s[s["task"].isin(avg_tasks)].dropna(subset=["chance"]).groupby("task")["chance"].first()
    for a in axes.flat:
        if len(chance) == len(avg_tasks):
            a.axhline(chance.mean(), color="0.5", ls=":", lw=1, label="their average chance" if a is ax else None)
        a.set_xlabel("decoder parameters removed (%)")
        a.grid(alpha=0.3)
    ax.legend(fontsize=7, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=2)
    fig.tight_layout()
    return fig


def plot_tailored_vs_generic(frame: pd.DataFrame):
    """Tailored minus generic accuracy per (checkpoint, task) with its 95% interval; right of 0: tailoring won."""
    n = len(frame)
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * n + 1.4))
    y = np.arange(n)[::-1]
    colors = frame["verdict"].map({"tailored better": "C2", "generic better": "C3"}).fillna("0.35")
    ax.errorbar(100 * frame["difference"], y, xerr=[100 * (frame["difference"] - frame["diff_low"]),
                                                    100 * (frame["diff_high"] - frame["difference"])],
                fmt="none", ecolor="0.6", capsize=3)
    ax.scatter(100 * frame["difference"], y, c=list(colors), zorder=3, s=40)
    ax.axvline(0, color="black", lw=1)
    ax.set_yticks(y, [f"{c} · {t} ({m}, n = {int(n)})" for c, t, m, n in zip(frame["checkpoint"], frame["task"],
                                                                               frame["metric"], frame["n"])])
    ax.set_xlabel("tailored − generic LoRA (accuracy points; bar: 95% paired interval)")
    ax.set_title("Does tailoring beat the generic recipe? (each row on its own n: a bar's width is its sample's)",
                 fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    return fig


VERDICT_COLORS = {"supported": "C2", "contradicted": "C3", "not settled": "0.45"}
EQUIVALENT_COLOR = "C0"  # "no effect beyond ±δ"


def _verdict_color(v: str) -> str:
    return VERDICT_COLORS.get(v, EQUIVALENT_COLOR if str(v).startswith("no effect") else "0.45")


def _claim_panel(ax, rows: pd.DataFrame, xlabel: str) -> None:
    """One panel of ``plot_claims``: estimates with 95% intervals, coloured by verdict; dotted: the threshold,
    shaded: ±δ around it where the row has one."""
    y = np.arange(len(rows))[::-1]
    ax.errorbar(rows["estimate"], y, xerr=[rows["estimate"] - rows["low"], rows["high"] - rows["estimate"]],
                fmt="none", ecolor="0.6", capsize=3)
    ax.scatter(rows["estimate"], y, c=[_verdict_color(v) for v in rows["verdict"]], zorder=3, s=30)
    for yi, (_, r) in zip(y, rows.iterrows()):
        thr = r["threshold"] if np.isfinite(r.get("threshold", np.nan)) else (50.0 if "%" in r["measure"] else 0.0)
        ax.plot([thr, thr], [yi - 0.4, yi + 0.4], color="black", lw=1, ls=":")
        if np.isfinite(r["delta"]) and "margin" not in r["measure"]:
            ax.fill_betweenx([yi - 0.4, yi + 0.4], thr - r["delta"], thr + r["delta"], color=EQUIVALENT_COLOR,
                             alpha=0.12, lw=0)
        if np.isfinite(r.get("paper", np.nan)):
            ax.scatter([r["paper"]], [yi], marker="x", color="black", s=30, zorder=4)
    ax.set_yticks(y, [f"{r['claim']} · {r['comparison']}\n{r['measure']} ({r['tasks'].count(',') + 1} tasks, "
                      f"n = {r['n']})" for _, r in rows.iterrows()], fontsize=6.5)
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)


def plot_claims(pooled: pd.DataFrame):
    """The claims, one panel per scale: each measure of a share kept (%, the dotted line at the row's threshold:
    50% of the above-chance accuracy, or for the paper's plain ratio what a model at chance keeps; a cross marks
    the paper's own figure; the two measures get a panel each) and differences in accuracy points (dotted at 0, shaded ±δ), each row
    with its 95% paired interval and coloured by verdict. Margin rows (in SD of the dense model's margin) are
    left to the table."""
    shares = pooled[pooled["measure"].str.contains("%", regex=False)]
    points = pooled[(pooled["row"] == "deciding") & ~pooled["measure"].str.contains("%", regex=False)
                    & ~pooled["measure"].str.contains("points of share", regex=False)]
    panels = [(shares[shares["measure"] == m], m) for m in dict.fromkeys(shares["measure"])]  # one scale each
    panels += [(points, "difference (accuracy points)")] if len(points) else []
    heights = [max(1.5, 0.42 * len(part) + 0.6) for part, _ in panels] or [1.5]
    fig, axes = plt.subplots(len(panels) or 1, 1, figsize=(8.4, sum(heights) + 1.2), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, (part, label) in zip(axes[:, 0], panels):
        _claim_panel(ax, part, label)
    handles = [axes[0, 0].scatter([], [], c=color, s=30, label=name)
               for name, color in (*VERDICT_COLORS.items(), ("no effect beyond ±δ", EQUIVALENT_COLOR))]
    if len(shares) and shares["paper"].notna().any():
        handles.append(axes[0, 0].scatter([], [], marker="x", color="black", s=30, label="the paper's figure"))
    fig.suptitle("The study's claims, decided on paired examples (bars: 95% paired-bootstrap intervals; dotted: the "
                 "threshold; margin and pruning-level rows: the table)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.55 / fig.get_figheight()))
    fig.legend(handles=handles, fontsize=7, frameon=False, loc="upper center", ncols=len(handles),
               bbox_to_anchor=(0.5, 1 - 0.3 / fig.get_figheight()))
    return fig


def plot_pruning_levels(levels: pd.DataFrame, tolerated: pd.DataFrame | None = None, tolerance: float | None = None):
    """Per task, accuracy (%) and the gold margin against the share of decoder parameters removed, with 95%
    bootstrap intervals; a vertical tick marks the largest share each task tolerates (from ``tolerated``, the
    per-task rows of ``tailored.analysis.pruning_levels``)."""
    fig, (acc_ax, margin_ax) = plt.subplots(1, 2, figsize=(10.0, 3.8))
    tol = {} if tolerated is None else dict(zip(tolerated["task"], tolerated["estimate"]))
    for i, (task, part) in enumerate(levels.groupby("task", sort=False)):
        part = part.sort_values("share")
        color, x = f"C{i % 10}", part["share"] + 0.4 * (i - 1)  # a small offset keeps the bars apart
        acc_ax.errorbar(x, part["accuracy"], yerr=[part["accuracy"] - part["accuracy low"],
                                                   part["accuracy high"] - part["accuracy"]],
                        color=color, marker="o", ms=4, capsize=2, lw=1.2, label=f"{task} ({part['metric'].iloc[0]})")
        margin_ax.errorbar(x, part["margin"], yerr=[part["margin"] - part["margin low"],
                                                    part["margin high"] - part["margin"]],
                           color=color, marker="o", ms=4, capsize=2, lw=1.2)
        if task in tol:
            acc_ax.axvline(tol[task] + 0.4 * (i - 1), color=color, ls="--", lw=0.8, alpha=0.7)
    acc_ax.set_ylabel("accuracy (%)")
    margin_ax.set_ylabel("gold margin (nats; per byte for acc_norm)")
    for ax in (acc_ax, margin_ax):
        ax.set_xlabel("decoder parameters removed (%)")
        ax.grid(alpha=0.3)
    acc_ax.legend(fontsize=7, frameon=False)
    what = f"dashed: the largest share losing < {tolerance:g} points" if tolerance is not None else "dashed: tolerated"
    fig.suptitle(f"Does the best pruning level depend on the task? (95% intervals; {what})", fontsize=10)
    fig.tight_layout()
    return fig
