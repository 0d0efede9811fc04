"""Figures of the importance stage: where the important units are, and how the estimators agree.

- ``plot_unit_heatmaps``: layer × unit maps of one estimator for attention (key-value groups), query heads
  and MLP channels (channels sorted within each layer and averaged in bins, so 1536 channels fit a row).
- ``plot_estimator_correlation``: Spearman rank correlation between estimators (seaborn heatmap).
- ``plot_estimate_vs_truth``: each unit's score against the true loss change of removing it (the check).
- ``plot_depth_profile``: mean unit importance per layer, relative to the average layer, one line per
  estimator: LLM-Pruner found the first and last layers matter most, and this lets the reader check it.

The tables behind them (``layer_matrix``, ``estimator_correlation``, ``depth_profile``) are plain functions
too, so a notebook can print or save the numbers next to the picture.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib.ticker import FuncFormatter

from tailored.figures import plt
from tailored.graph import Graph, GroupSet
from tailored.importance import Importance, spearman

KIND_TITLES = {"attention": "attention (key-value groups)", "qheads": "query heads", "mlp": "MLP channels",
               "hidden": "hidden channels"}


def _groupsets(importance: Importance, graph: Graph, kind: str) -> list[GroupSet]:
    """The group sets of ``kind`` that were scored, in layer order."""
    have = set(importance.groupsets)
    gs = [g for g in graph.of_kind(kind) if g.name in have]
    return sorted(gs, key=lambda g: (g.layer is None, g.layer or 0))


def _log10(values: np.ndarray) -> np.ndarray:
    """Scores on a log10 scale (they span orders of magnitude); zeros are clipped to the smallest float32."""
    return np.log10(np.clip(values, np.finfo(np.float32).tiny, None))


def layer_matrix(importance: Importance, graph: Graph, kind: str, estimator: str = "param_first",
                 reduction: str = "sum", bins: int | None = None, sort: bool = False) -> tuple[np.ndarray, list[int]]:
    """(layers, units) scores of one kind; with ``sort`` each row is sorted high to low, with ``bins`` the
    (sorted) row is averaged into that many equal bins. Returns the matrix and the layer numbers."""
    gs = _groupsets(importance, graph, kind)
    if not gs:
        raise ValueError(f"no {kind!r} group sets were scored; scored: {list(importance.groupsets)[:4]}…")
    rows = []
    for g in gs:
        v = importance.score(estimator, g.name, reduction).double().numpy()
        if sort or bins:
            v = np.sort(v)[::-1]
        if bins and bins < len(v):
            v = np.array([chunk.mean() for chunk in np.array_split(v, bins)])
        rows.append(v)
    width = max(len(r) for r in rows)  # pruned models may have unequal rows: pad with NaN
    mat = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        mat[i, :len(r)] = r
    return mat, [g.layer for g in gs]


def plot_unit_heatmaps(importance: Importance, graph: Graph, estimator: str = "param_first",
                       reduction: str = "sum", kinds: Sequence[str] = ("attention", "qheads", "mlp"),
                       mlp_bins: int = 64):
    """One panel per kind: rows are layers, columns units, colour log10 importance.

    Attention units and query heads keep their order (unit 0, 1, …); MLP channels are sorted within each
    layer and averaged in ``mlp_bins`` bins, so a row reads as that layer's importance distribution."""
    kinds = [k for k in kinds if _groupsets(importance, graph, k)]
    if not kinds:
        raise ValueError("none of the asked kinds was scored")
    widths = [3 if k == "mlp" else 1 for k in kinds]
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.2 + 2.6 * sum(widths), 0.5 + 0.16 * graph.num_layers + 1.2),
                             gridspec_kw={"width_ratios": widths}, squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        binned = kind in ("mlp", "hidden")
        mat, layers = layer_matrix(importance, graph, kind, estimator, reduction, bins=mlp_bins if binned else None)
        im = ax.imshow(_log10(mat), aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_yticks(range(len(layers)))
        ax.set_yticklabels([str(layer) for layer in layers], fontsize=6)
        ax.set_ylabel("layer")
        ax.set_xlabel("channel rank (binned, high → low)" if binned else "unit")
        if not binned:
            ax.set_xticks(range(mat.shape[1]))
        ax.set_title(KIND_TITLES.get(kind, kind))
        fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02).set_label("log10 importance", fontsize=7)
    fig.suptitle(f"{estimator} importance per layer ({reduction} over members)")
    fig.tight_layout()
    return fig


def estimator_correlation(importance: Importance, graph: Graph, kind: str = "mlp", reduction: str = "sum",
                          estimators: Sequence[str] | None = None, pooled: bool = False) -> pd.DataFrame:
    """Spearman correlation between estimators' rankings of the units of ``kind``.

    Default: the mean over layers of the within-layer correlation (what matters when each layer is pruned
    by its own ranking); ``pooled=True`` ranks all units of all layers together (global pruning)."""
    estimators = list(estimators or importance.estimators)
    gs = _groupsets(importance, graph, kind)
    if not gs:
        raise ValueError(f"no {kind!r} group sets were scored")
    out = pd.DataFrame(np.eye(len(estimators)), index=estimators, columns=estimators)
    for i, a in enumerate(estimators):
        for b in estimators[i + 1:]:
            if pooled:
                va = torch.cat([importance.score(a, g.name, reduction) for g in gs])
                vb = torch.cat([importance.score(b, g.name, reduction) for g in gs])
                r = spearman(va, vb)
            else:
                r = float(np.nanmean([spearman(importance.score(a, g.name, reduction),
                                               importance.score(b, g.name, reduction)) for g in gs]))
            out.loc[a, b] = out.loc[b, a] = r
    return out


def plot_estimator_correlation(importance: Importance, graph: Graph, kind: str = "mlp", reduction: str = "sum",
                               estimators: Sequence[str] | None = None, pooled: bool = False):
    """Annotated heatmap of ``estimator_correlation`` (−1 … 1)."""
    corr = estimator_correlation(importance, graph, kind, reduction, estimators, pooled)
    n = len(corr)
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * n, 0.9 + 0.6 * n))
    sns.heatmap(corr, vmin=-1, vmax=1, center=0, cmap="vlag", annot=True, fmt=".2f", square=True,
                cbar_kws={"label": "Spearman ρ", "shrink": 0.8}, annot_kws={"fontsize": 7}, ax=ax)
    how = "all layers pooled" if pooled else "mean over layers"
    ax.set_title(f"Rank agreement of estimators: {KIND_TITLES.get(kind, kind)}\n({reduction} reduction, {how})")
    fig.tight_layout()
    return fig


def depth_profile(importance: Importance, graph: Graph, kinds: Sequence[str] = ("attention", "mlp"),
                  reduction: str = "sum", estimators: Sequence[str] | None = None) -> pd.DataFrame:
    """Long table: kind, estimator, layer, mean unit score, and ``relative`` = that mean over the mean of all
    layers (1 = an average layer)."""
    estimators = list(estimators or importance.estimators)
    rows = []
    for kind in kinds:
        gs = _groupsets(importance, graph, kind)
        for est in estimators:
            means = np.array([importance.score(est, g.name, reduction).double().mean().item() for g in gs])
            rel = means / means.mean() if means.mean() > 0 else np.full_like(means, np.nan)
            rows += [{"kind": kind, "estimator": est, "layer": g.layer, "mean": m, "relative": r}
                     for g, m, r in zip(gs, means, rel)]
    return pd.DataFrame(rows, columns=["kind", "estimator", "layer", "mean", "relative"])


def plot_depth_profile(importance: Importance, graph: Graph, kinds: Sequence[str] = ("attention", "mlp"),
                       reduction: str = "sum", estimators: Sequence[str] | None = None):
    """Mean importance per layer relative to the average layer, one line per estimator, one panel per kind.

    The first and last layers are shaded: if LLM-Pruner's observation holds here, the gradient estimators
    rise there (which is why it leaves them unpruned)."""
    table = depth_profile(importance, graph, kinds, reduction, estimators)
    kinds = [k for k in kinds if (table["kind"] == k).any()]
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.6 * len(kinds), 3.2), squeeze=False, sharey=True)
    for ax, kind in zip(axes[0], kinds):
        sub = table[table["kind"] == kind]
        for est, part in sub.groupby("estimator", sort=False):
            style = ":" if est == "random" else "-"
            ax.plot(part["layer"], part["relative"], style, marker="o", markersize=2.5, linewidth=1.2, label=est)
        last = int(sub["layer"].max())
        for x in (0, last):
            ax.axvspan(x - 0.5, x + 0.5, color="0.9", zorder=0)
        ax.axhline(1.0, color="0.5", linewidth=0.6)
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_title(KIND_TITLES.get(kind, kind))
    for ax in axes[0]:  # after every set_yscale: the panels share y, and each call resets its formatters
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
    axes[0][0].set_ylabel("mean unit importance / mean over layers")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(f"Importance across depth ({reduction} reduction; first and last layers shaded)")
    fig.tight_layout()
    return fig


def plot_estimate_vs_truth(estimates: dict[str, torch.Tensor], truth: torch.Tensor, title: str):
    """One panel per estimator: each unit's score against the true loss change of removing it alone.

    ``estimates``: estimator -> scores of the same units as ``truth`` (``zeroing_loss_change``). The scores are
    on their own scales, so each panel has its own x axis; what matters is whether the points rise together
    (the panel's Spearman ρ in its title). The picture that shows why a gradient estimates importance.
    """
    names = list(estimates)
    fig, axes = plt.subplots(1, len(names), figsize=(3.0 * len(names), 3.0), sharey=True, squeeze=False)
    y = truth.float().numpy()
    for ax, name in zip(axes[0], names):
        x = estimates[name].float().numpy()
        ax.scatter(x, y, s=12, alpha=0.7, color="C0" if name != "random" else "C7")
        ax.set_title(f"{name}  (ρ = {spearman(estimates[name], truth):.2f})", fontsize=9)
        ax.set_xlabel("estimated importance")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("true loss change when removed")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
