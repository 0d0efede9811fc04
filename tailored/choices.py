"""The names a study's parameters choose among: importance estimators, group reductions, the pruner's
settings and the prompts.

A leaf (it imports nothing of ours): ``tailored.params`` checks every notebook's parameters against these
names before anything runs, and so stands on this module rather than on the stages that implement them
(``importance``, ``prune``, ``prompts``). Notebook 01 therefore does not depend on the pruner's code: a change
to the planner reruns the steps that prune, not the trace. Each stage imports its names from here, so
there is one list of each.
"""

from __future__ import annotations

# Importance estimators, name -> equation per weight (tailored.importance's docstring says what each is);
# the order is the order of figures and tables.
ESTIMATORS: dict[str, str] = {
    "param_first": "|w·g|",
    "param_second": "½·w²·F",
    "param_mix": "|w·g − ½·w²·F|",
    "vectorize": "|Σ_slice w·g|",
    "random": "U(0,1) per unit",
    "l1": "|w|",
    "l2": "w²",
    "activation": "|w|·‖X‖₂",
    "fluctuation": "Σ_j Var(x_j)·‖W_:,j‖² (readers)",
    "flap": "mean_j z(Var(x_j)·‖W_:,j‖²) (readers; squared for heads)",
    "fisher_fluctuation": "½·Σ_h F_h·Var(W_h,S x_S) (readers)",
}
GRADIENT_ESTIMATORS = ("param_first", "param_second", "param_mix", "vectorize")
FISHER_ESTIMATORS = ("param_second", "param_mix")  # need one backward pass per calibration sample
READER_ESTIMATORS = ("fluctuation", "flap", "fisher_fluctuation")  # from Activations: statistics of the readers' inputs
LAYER_ESTIMATORS = ("block_influence",)  # scores of whole layers, for mode="layer" (not an ESTIMATORS entry)

# How a unit's member scores are combined into one.
REDUCTIONS: dict[str, str] = {
    "sum": "Σ over members",
    "mean": "mean over members",
    "max": "max over members",
    "prod": "Π over members, as the geometric mean (Π)^(1/members), computed in log space",
    "root": "the root member alone (LLM-Pruner's 'first')",
}

# The pruner's settings (tailored.prune.plan_pruning and apply say what each does).
MODES = ("block", "channel", "layer")
ALLOCATIONS = ("local", "global")
ATTENTION = ("kv", "qheads")
DENOMINATORS = ("decoder", "model")
NORMALIZATIONS = ("kind", "layer", "cost", "none")  # how global allocation makes scores comparable
COMPENSATIONS = ("none", "bias", "refit")  # what apply gives back to the readers of removed units

# The prompts of every task (tailored/prompts.yaml).
PROMPT_NAMES = ("harness", "general", "task_specific")
