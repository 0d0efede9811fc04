"""Figures of the LoRA stage: training curves of generic and tailored recovery, accuracy against data size.

    fig = plot_loss_curves({"generic": generic_result, "tailored boolq": boolq_result})
    fig = plot_accuracy_vs_n(df)       # columns: task, method, n, accuracy (+ ci_low, ci_high, chance)
    fig = plot_validation_vs_n(df, references={"no LoRA": 2.9})   # columns: n, validation_loss (+ run)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from tailored.figures import plt
from tailored.lora import read_train_metrics

KIND_STYLE = {"generic": {"linestyle": "--"}, "tailored": {"linestyle": "-"}}


def _curves(run) -> tuple[list[tuple[int, float]], list[tuple[int, float]], float | None]:
    """(training curve, validation curve, trained tokens per step) of a TrainResult, a finished run's folder, or a
    list of (step, loss) (no tokens: the x axis stays in steps)."""
    if isinstance(run, (str, Path)):
        run = read_train_metrics(run)
    if hasattr(run, "losses"):
        per_step = run.tokens / run.steps if getattr(run, "steps", 0) and getattr(run, "tokens", 0) else None
        return list(run.losses), list(getattr(run, "validation", ())), per_step
    return [tuple(x) for x in run], [], None


def _smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing running mean over ``window`` steps (the first points average what there is)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_loss_curves(runs: Mapping[str, object], kinds: Mapping[str, str] | None = None, smooth: int = 1,
                     ax=None, title: str = "LoRA recovery: loss on the answer tokens"):
    """Loss against trained tokens (the budget both recipes share), several runs on one axes.

    ``runs`` maps a label to a ``TrainResult``, a finished run's ``out_dir``, or a list of (step, loss).
    ``kinds`` marks each label ``"generic"`` (dashed) or ``"tailored"`` (solid); by default a label that
    contains "generic" is generic. Validation losses, where recorded, are the main mark (large dots joined);
    the training loss is drawn thin behind them. The x axis is the step times the run's mean trained tokens per
    step (prompt + answer, ``TrainResult.tokens / steps``), so runs with the same token budget end together
    however long their examples are; runs given as bare (step, loss) lists keep a step axis. Note that the
    training curves of different data are not comparable in level (the answers differ).
    """
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6.0, 3.6))
    in_tokens = True
    for i, (label, run) in enumerate(runs.items()):
        train, val, per_step = _curves(run)
        in_tokens = in_tokens and per_step is not None
        scale = (per_step or 1.0) / (1000.0 if per_step else 1.0)
        kind = (kinds or {}).get(label, "generic" if "generic" in label.lower() else "tailored")
        color = f"C{i % 10}"
        if train:
            steps, losses = zip(*train)
            ax.plot([scale * x for x in steps], _smooth(list(losses), max(1, smooth)), color=color, lw=0.9,
                    alpha=0.45, label=f"{label} ({kind}): training", **KIND_STYLE.get(kind, {}))
        if val:
            vs, vl = zip(*val)
            ax.plot([scale * x for x in vs], vl, marker="o", ms=5, lw=1.6, color=color,
                    label=f"{label} ({kind}): validation", **KIND_STYLE.get(kind, {}))
    ax.set_xlabel("trained tokens (thousands, prompt + answer)" if in_tokens else "optimizer step")
    ax.set_ylabel("loss per answer token (nats)" + (f"; training: mean of {smooth} steps" if smooth > 1 else ""))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)  # off the curves
    fig.tight_layout()
    return fig


def plot_accuracy_vs_n(df, n: str = "n", value: str = "accuracy", method: str = "method", task: str = "task",
                       low: str = "ci_low", high: str = "ci_high", chance: str = "chance", ncols: int = 4):
    """Accuracy against the number of training examples, one panel per task, one line per method.

    ``df`` has one row per (task, method, n) with columns ``n``, ``accuracy`` and ``method`` (e.g.
    "generic", "tailored"), optionally ``task``, ``ci_low``/``ci_high`` (drawn as error bars) and ``chance``
    (a dotted line). Rows with ``n == 0`` are references without LoRA (e.g. "pruned", "dense"): drawn as
    horizontal lines across the panel. The x axis is logarithmic (n = 50, 500, ...).
    """
    tasks = list(dict.fromkeys(df[task])) if task in df.columns else [None]
    ncols = max(1, min(ncols, len(tasks)))
    nrows = -(-len(tasks) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.0 * ncols, 2.6 * nrows), squeeze=False, sharey=False)
    colors: dict[str, str] = {}
    for ax, name in zip(axes.flat, tasks):
        part = df if name is None else df[df[task] == name]
        tuned, refs = part[part[n] > 0], part[part[n] == 0]
        for m, rows in tuned.groupby(method, sort=False):
            rows = rows.sort_values(n)
            color = colors.setdefault(m, f"C{len(colors) % 10}")
            err = None
            if low in rows.columns and high in rows.columns:
                err = [rows[value] - rows[low], rows[high] - rows[value]]
            ax.errorbar(rows[n], rows[value], yerr=err, color=color, marker="o", ms=4, lw=1.4, capsize=2,
                        label=str(m), **KIND_STYLE.get(str(m), {}))
        for i, (_, r) in enumerate(refs.iterrows()):
            ax.axhline(r[value], color="0.3", lw=1.0, linestyle=(0, (4, 2 + 2 * i)), label=f"{r[method]} (no LoRA)")
        if chance in part.columns and part[chance].notna().any():
            ax.axhline(float(part[chance].dropna().iloc[0]), color="0.6", lw=0.8, linestyle=":", label="chance")
        if len(tuned):
            ax.set_xscale("log")
            ticks = sorted(set(tuned[n]))
            ax.set_xticks(ticks, [str(int(t)) for t in ticks])
            ax.minorticks_off()
        ax.set_title(name or "")
        ax.set_xlabel("training examples n")
        ax.set_ylabel(value)
    for ax in list(axes.flat)[len(tasks):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    axes.flat[0].legend(handles, labels, fontsize=7, frameon=False)
    fig.tight_layout()
    return fig


def plot_validation_vs_n(df, references: Mapping[str, float] | None = None, n: str = "n",
                         value: str = "validation_loss", group: str = "run", ax=None,
                         title: str = "How much data is enough? Validation loss against n"):
    """Validation loss of the final adapter against the number of training examples ``n`` (log axis).

    ``df`` has one row per trained adapter with columns ``n`` and ``validation_loss``; with a ``group``
    column (e.g. "tailored" or "tailored-piqa") one line is drawn per group. ``references`` are losses
    without a sweep (e.g. the pruned model before LoRA, the generic adapter), drawn as horizontal lines.
    Lower is better; every point was trained with the same budget of steps (or tokens), so what changes
    along a line is only how many *different* examples the steps were drawn from.
    """
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(5.0, 3.4))
    groups = list(dict.fromkeys(df[group])) if group in df.columns else [None]
    for i, name in enumerate(groups):
        rows = (df if name is None else df[df[group] == name]).sort_values(n)
        ax.plot(rows[n], rows[value], marker="o", ms=4, lw=1.4, color=f"C{i % 10}", label=name or "tailored")
    for j, (label, loss) in enumerate((references or {}).items()):
        ax.axhline(loss, color=f"C{(len(groups) + j) % 10}", lw=1.0, linestyle=(0, (4, 2 + 2 * j)), label=label)
    if len(df):
        ax.set_xscale("log")
        ticks = sorted(set(df[n]))
        ax.set_xticks(ticks, [str(int(t)) for t in ticks])
        ax.minorticks_off()
    ax.set_xlabel("training examples n (per task)")
    ax.set_ylabel("validation loss per answer token (nats)")
    ax.set_title(title)
    ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return fig
