"""Figures of notebook 03: the pruning trade-off curve, the widths a plan keeps, and those widths beside notebook
02's per-layer importance (did the planner cut where the scores were low?)."""

from __future__ import annotations

import math

import pandas as pd
import torch
from matplotlib.colors import to_rgb

from tailored.figures import plt
from tailored.figures.importance import KIND_TITLES, depth_profile
from tailored.graph import Graph
from tailored.importance import Importance, spearman

ESTIMATOR_LABELS = {"param_first": "Taylor, 1st order |w·g|", "param_second": "Taylor, 2nd order ½w²F",
                    "param_mix": "Taylor, mixed", "vectorize": "Taylor, vector-wise", "l1": "magnitude L1",
                    "l2": "magnitude L2", "activation": "activation-aware |W|·‖X‖", "random": "random"}


METHOD_LABELS = {"random": "random (the floor)", "param_first": "Taylor 1st order (LLM-Pruner)",
                 "param_second": "Taylor 2nd order (LLM-Pruner)", "param_first_4_rounds": "Taylor 1st order, 4 rounds",
                 "param_first_8_rounds": "Taylor 1st order, 8 rounds", "flap": "FLAP (fluctuation, bias)",
                 "flap_no_bias": "FLAP without bias compensation", "fisher_local": "Fisher fluctuation, local",
                 "fisher_bias_local": "Fisher fluctuation, local, bias", "fisher_bias": "Fisher fluctuation, bias",
                 "fisher_refit": "Fisher fluctuation, refit (ours)",
                 "depth_block_influence": "whole layers, block influence (ShortGPT)"}


def perplexity_curve(df: pd.DataFrame, dense_ppl: float, title: str = ""):
    """Perplexity (log scale) against the share of decoder parameters removed, one line per method.

    ``df`` columns: ``method`` (or ``estimator``), share (achieved, 0–1), perplexity; random dashed. Every
    line starts at the dense point (0% removed) and marks each measured share, with its 95% interval where
    ``ppl_low`` and ``ppl_high`` are given.
    """
    key = "method" if "method" in df.columns else "estimator"
    fig, ax = plt.subplots(figsize=(7.0, 4.2))
    for name, part in df.dropna(subset=["perplexity"]).groupby(key, sort=False):
        part = part.sort_values("share")  # every line starts at the dense model: nothing removed, dense_ppl
        line, = ax.plot([0.0, *(100 * part["share"])], [dense_ppl, *part["perplexity"]], marker="o", ms=4,
                        label=METHOD_LABELS.get(name, ESTIMATOR_LABELS.get(name, name)),
                        ls="--" if name == "random" else "-")
        if {"ppl_low", "ppl_high"} <= set(part.columns):  # each point's 95% interval over the windows
            ax.errorbar(100 * part["share"], part["perplexity"], fmt="none", ecolor=line.get_color(), capsize=2,
                        yerr=[part["perplexity"] - part["ppl_low"], part["ppl_high"] - part["perplexity"]], lw=0.9)
    ax.axhline(dense_ppl, color="black", lw=0.8, ls=":")
    ax.plot([0.0], [dense_ppl], "s", color="black", ms=6, label=f"dense ({dense_ppl:.1f})", zorder=5)
    ax.set_yscale("log")
    ax.set_xlabel("decoder parameters removed (%)")
    ax.set_ylabel("perplexity (log scale, lower is better)")
    ax.set_title(title or "Too much pruning hurts: perplexity against the share removed")
    ax.grid(alpha=0.3, which="both")
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


def kept_widths(plans: dict, num_layers: int, dense: dict):
    """Kept query heads and MLP channels per layer, for each named plan (dense drawn as the outline).

    ``plans``: name -> Plan; ``dense``: {"q_heads": int, "mlp": int}.
    """
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.4), sharex=True)
    layers = list(range(num_layers))
    for ax, key, label in ((axes[0], "q_heads", "query heads kept"), (axes[1], "mlp", "MLP channels kept")):
        ax.bar(layers, [dense[key]] * num_layers, color="#dddddd", label="dense", width=0.85)
        for i, (name, plan) in enumerate(plans.items()):
            kept = {w["layer"]: w[key] for w in plan.widths}
            ax.step(layers, [kept.get(layer, 0) for layer in layers], where="mid", lw=1.8, color=f"C{i}",
                    label=name)
        ax.set_xlabel("decoder layer")
        ax.set_ylabel(label)
        ax.set_ylim(0, dense[key] * 1.08)
    axes[0].legend(frameon=False, fontsize=8, loc="lower left")
    fig.suptitle(f"Kept width per layer; left whole in every plan: {_whole_layers(plans, num_layers, dense)}")
    fig.tight_layout()
    return fig


def _whole_layers(plans: dict, num_layers: int, dense: dict) -> str:
    """The layers every plan keeps at full width, read from the plans ("layers 0-3, 29", or "no layer")."""
    whole = [layer for layer in range(num_layers)
             if all(all(w[k] == dense[k] for k in dense) for plan in plans.values()
                    for w in plan.widths if w["layer"] == layer)
             and all(any(w["layer"] == layer for w in plan.widths) for plan in plans.values())]
    if not whole:
        return "no layer"
    runs, start = [], whole[0]
    for a, b in zip(whole, whole[1:] + [None]):
        if b != a + 1:
            runs.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ("layer " if len(whole) == 1 else "layers ") + ", ".join(runs)


# importance kind -> the width a plan keeps of it (a key of ``Plan.widths``)
_KEPT = {"attention": "kv_heads", "mlp": "mlp"}
_SHORT = {"attention": "key-value groups", "mlp": "MLP"}


def widths_and_importance(importance: Importance, graph: Graph, plans: dict, dense: dict, estimator: str,
                          reduction: str = "sum") -> pd.DataFrame:
    """Long table, one row per plan, kind (attention, mlp) and decoder layer: ``relative``, notebook 02's mean
    unit score of the layer over the mean of all layers (``depth_profile``: 1 = an average layer), and ``kept``,
    the share of the layer's units the plan keeps (0 for a layer removed whole).

    ``plans``: name -> Plan; ``dense``: {"kv_heads": int, "mlp": int}, the dense widths.
    """
    profile = depth_profile(importance, graph, kinds=tuple(_KEPT), reduction=reduction, estimators=[estimator])
    rows = []
    for name, plan in plans.items():
        kept = {w["layer"]: w for w in plan.widths}
        for r in profile.itertuples():
            key = _KEPT[r.kind]
            rows.append({"plan": name, "kind": r.kind, "layer": int(r.layer), "relative": r.relative,
                         "kept": kept[r.layer][key] / dense[key] if r.layer in kept else 0.0})
    return pd.DataFrame(rows, columns=["plan", "kind", "layer", "relative", "kept"])


def _score_kept_rho(part: pd.DataFrame) -> float | None:
    """Spearman ρ across layers between importance and share kept; ``None`` when every layer keeps the same."""
    if part["kept"].nunique() == 1:
        return None
    return spearman(torch.tensor(part["relative"].to_numpy()), torch.tensor(part["kept"].to_numpy()))


def cut_where_scores_low(table: pd.DataFrame, plan: str) -> dict[str, str]:
    """Per kind, one sentence read from ``widths_and_importance``'s rows of ``plan``: the Spearman correlation
    across layers between a layer's importance and the share of it the plan keeps (positive: the low-scored
    layers were cut most), or that every layer keeps the same share."""
    out = {}
    for kind, part in table[table["plan"] == plan].groupby("kind", sort=False):
        label, rho = KIND_TITLES.get(kind, kind), _score_kept_rho(part)
        if rho is None:
            out[kind] = f"{label}: every layer keeps {part['kept'].iloc[0]:.0%}, whatever its score"
            continue
        how = ("cut most where the scores were low" if rho >= 0.5 else "followed the scores weakly" if rho > 0.1
               else "did not cut where the scores were low" if not math.isnan(rho) else "cannot be compared")
        out[kind] = f"{label}: Spearman ρ = {rho:+.2f} across layers between score and share kept; the planner {how}"
    return out


def widths_vs_importance(table: pd.DataFrame, estimator: str):
    """Two panels sharing the decoder-layer axis: above, notebook 02's per-layer importance of ``estimator``
    (relative to the average layer, log scale, one line per kind); below, the share of each kind every plan keeps.
    The title is computed from ``table`` (``widths_and_importance``): the correlation for the most cut plan."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7.5, 5.4), sharex=True, height_ratios=(1, 1.2))
    first = table[table["plan"] == table["plan"].iloc[0]]
    for i, (kind, part) in enumerate(first.groupby("kind", sort=False)):
        top.plot(part["layer"], part["relative"], marker="o", ms=3, color=f"C{i}", label=KIND_TITLES.get(kind, kind))
    top.axhline(1.0, color="0.5", lw=0.6)
    top.set_yscale("log")
    top.set_ylabel(f"{estimator} score\n/ mean over layers")
    top.legend(frameon=False, fontsize=8)
    for i, (kind, by_kind) in enumerate(table.groupby("kind", sort=False)):
        plans = list(by_kind.groupby("plan", sort=False))
        for j, (plan, part) in enumerate(plans):  # one colour per kind, darker the later (more cut) the plan
            shade = [1 - (0.3 + 0.7 * (j + 1) / len(plans)) * (1 - c) for c in to_rgb(f"C{i}")]
            bottom.step(part["layer"], part["kept"], where="mid", color=shade, lw=1.6, ls=("-", "--")[i % 2],
                        label=f"{plan}: {KIND_TITLES.get(kind, kind)}")
    bottom.set_ylim(0, 1.05)
    bottom.set_xlabel("decoder layer")
    bottom.set_ylabel("share of the layer kept")
    bottom.legend(frameon=False, fontsize=7, loc="best")
    most_cut = table.groupby("plan", sort=False)["kept"].mean().idxmin()
    said = []
    for kind, part in table[table["plan"] == most_cut].groupby("kind", sort=False):
        rho = _score_kept_rho(part)
        said.append(f"{_SHORT.get(kind, kind)}: " + (f"every layer keeps {part['kept'].iloc[0]:.0%}" if rho is None
                                                     else f"ρ(score, share kept) = {rho:+.2f} across layers"))
    fig.suptitle(f"Where each checkpoint cut, beside notebook 02's {estimator} scores\nthe most cut, {most_cut}: "
                 + "; ".join(said), fontsize=9)
    fig.tight_layout()
    return fig
