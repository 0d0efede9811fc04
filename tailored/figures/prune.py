"""Figures of notebook 03: the pruning trade-off curve and the widths a plan keeps."""

from __future__ import annotations

import pandas as pd

from tailored.figures import plt

ESTIMATOR_LABELS = {"param_first": "Taylor, 1st order |w·g|", "param_second": "Taylor, 2nd order ½w²F",
                    "param_mix": "Taylor, mixed", "vectorize": "Taylor, vector-wise", "l1": "magnitude L1",
                    "l2": "magnitude L2", "activation": "activation-aware |W|·‖X‖", "random": "random"}


METHOD_LABELS = {"random": "random (the floor)", "param_first": "Taylor 1st order (LLM-Pruner)",
                 "param_second": "Taylor 2nd order (LLM-Pruner)", "param_first_4_rounds": "Taylor 1st order, 4 rounds",
                 "param_first_8_rounds": "Taylor 1st order, 8 rounds", "flap": "FLAP (fluctuation, bias)",
                 "flap_no_bias": "FLAP without bias compensation", "fisher_bias": "Fisher fluctuation, bias",
                 "fisher_refit": "Fisher fluctuation, refit (ours)",
                 "depth_block_influence": "whole layers, block influence (ShortGPT)"}


def perplexity_curve(df: pd.DataFrame, dense_ppl: float, title: str = ""):
    """Perplexity (log scale) against the share of decoder parameters removed, one line per method.

    ``df`` columns: ``method`` (or ``estimator``), share (achieved, 0–1), perplexity; random dashed. Every
    line starts at the dense point (0% removed) and marks each measured share.
    """
    key = "method" if "method" in df.columns else "estimator"
    fig, ax = plt.subplots(figsize=(7.0, 4.2))
    for name, part in df.dropna(subset=["perplexity"]).groupby(key, sort=False):
        part = part.sort_values("share")  # every line starts at the dense model: nothing removed, dense_ppl
        ax.plot([0.0, *(100 * part["share"])], [dense_ppl, *part["perplexity"]], marker="o", ms=4,
                label=METHOD_LABELS.get(name, ESTIMATOR_LABELS.get(name, name)), ls="--" if name == "random" else "-")
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
