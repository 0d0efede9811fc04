"""The named pruning methods the study compares: a ``Method`` is a choice at each stage of pruning.

The stages are separate on purpose (``importance`` scores, ``prune`` plans and cuts); a method names the
estimator that scores the units, how the planner allocates and normalizes, which layers it may touch, what
``apply`` gives back to the readers of removed units, and in how many rounds. ``tailored.recipes.prune_model``
runs one. Pure data (no torch): the parameter check (``tailored.params``) reads the table, so every notebook
can name a method, and a profile's methods can be checked against what notebook 02 scores, before any step
runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tailored.choices import (
    ALLOCATIONS,
    ATTENTION,
    COMPENSATIONS,
    ESTIMATORS,
    LAYER_ESTIMATORS,
    MODES,
    NORMALIZATIONS,
)
from tailored.records import from_dict


@dataclass(frozen=True)
class Method:
    """The choices that make a pruning method (see ``tailored.importance`` and ``tailored.prune``).

    ``estimator``: a ``tailored.importance`` estimator, or ``"block_influence"`` (layer-wise only).
    ``layer_range``: ``None`` for LLM-Pruner's range (first and last layers kept, ``default_layer_range``),
    ``"all"`` for every layer, or ``(start, end)`` in the dense model's layer numbers (end exclusive).
    ``compensation`` and ``damping`` go to ``prune.apply``; the others to ``prune.plan_pruning``.
    """

    estimator: str = "param_first"
    reduction: str = "sum"
    mode: str = "block"
    allocation: str = "local"
    normalize: str = "kind"
    layer_range: tuple[int, int] | str | None = None
    attention: str = "kv"
    round_to: int = 1
    compensation: str = "none"
    rounds: int = 1
    damping: float = 0.01

    def __post_init__(self):
        if isinstance(self.layer_range, list):  # from YAML / JSON
            object.__setattr__(self, "layer_range", tuple(self.layer_range))
        self.validate()

    def validate(self) -> None:
        def bad(msg: str):
            raise ValueError(f"Method: {msg}")

        if self.estimator not in ESTIMATORS and self.estimator not in LAYER_ESTIMATORS:
            bad(f"estimator {self.estimator!r} is not one of {list(ESTIMATORS) + list(LAYER_ESTIMATORS)}")
        if self.estimator in LAYER_ESTIMATORS and self.mode != "layer":
            bad(f"estimator {self.estimator!r} scores whole layers: use it with mode='layer'")
        for name, allowed in (("mode", MODES), ("allocation", ALLOCATIONS), ("normalize", NORMALIZATIONS),
                              ("attention", ATTENTION), ("compensation", COMPENSATIONS)):
            if getattr(self, name) not in allowed:
                bad(f"{name} {getattr(self, name)!r} is not one of {allowed}")
        if self.compensation != "none" and self.mode != "block":
            bad(f"compensation {self.compensation!r} applies to block-wise pruning only, not mode={self.mode!r}")
        if not isinstance(self.rounds, int) or self.rounds < 1:
            bad(f"rounds {self.rounds!r} must be a positive integer (1: one shot; LLM-Pruner's iterative_steps)")
        lr = self.layer_range
        if not (lr is None or lr == "all" or (isinstance(lr, tuple) and len(lr) == 2)):
            bad(f"layer_range {lr!r} must be None (LLM-Pruner's range), 'all', or (start, end)")

    @property
    def scores_units(self) -> bool:
        """Whether the method scores units with a ``tailored.importance`` estimator (notebook 02 can compute it),
        not whole layers (``block_influence``, measured on the model being pruned)."""
        return self.estimator in ESTIMATORS

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layer_range"] = list(self.layer_range) if isinstance(self.layer_range, tuple) else self.layer_range
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> Method:
        return from_dict(cls, d)


# The methods the study compares (benchmarks/bench_pruning.py, notebook 03). Names say what they are.
METHODS: dict[str, Method] = {
    # the floor and LLM-Pruner's estimators: local allocation over LLM-Pruner's layer range
    "random": Method(estimator="random"),
    "param_first": Method(estimator="param_first"),
    "param_second": Method(estimator="param_second"),
    "param_first_4_rounds": Method(estimator="param_first", rounds=4),
    "param_first_8_rounds": Method(estimator="param_first", rounds=8),
    # FLAP: fluctuation, standardized per layer, one global threshold over every layer, biases added back
    "flap": Method(estimator="flap", allocation="global", normalize="none", layer_range="all", compensation="bias"),
    "flap_no_bias": Method(estimator="flap", allocation="global", normalize="none", layer_range="all"),
    "fluctuation_local_bias": Method(estimator="fluctuation", compensation="bias"),
    # ours: the loss each unit's fluctuation costs, compared per parameter across all layers and kinds; the
    # local ones keep LLM-Pruner's allocation, so param_first -> fisher_local -> fisher_bias_local -> fisher_bias
    # -> fisher_refit changes one group of fields at a time (LADDER)
    "fisher_local": Method(estimator="fisher_fluctuation"),
    "fisher_bias_local": Method(estimator="fisher_fluctuation", compensation="bias"),
    "fisher_bias": Method(estimator="fisher_fluctuation", allocation="global", normalize="cost",
                          layer_range="all", compensation="bias"),
    "fisher_refit": Method(estimator="fisher_fluctuation", allocation="global", normalize="cost",
                           layer_range="all", compensation="refit"),
    # fisher_bias with every kept MLP width a multiple of 64 or 128 channels (GPU matrix tiles; the paper
    # profile's method): what the alignment costs in perplexity is benchmarks/bench_pruning.py's (README there)
    "fisher_bias_round64": Method(estimator="fisher_fluctuation", allocation="global", normalize="cost",
                                  layer_range="all", compensation="bias", round_to=64),
    "fisher_bias_round128": Method(estimator="fisher_fluctuation", allocation="global", normalize="cost",
                                   layer_range="all", compensation="bias", round_to=128),
    "fisher_refit_4_rounds": Method(estimator="fisher_fluctuation", allocation="global", normalize="cost",
                                    layer_range="all", compensation="refit", rounds=4),
    # depth pruning: whole layers of lowest block influence (ShortGPT), once or one layer at a time
    "depth_block_influence": Method(estimator="block_influence", mode="layer", layer_range="all"),
    "depth_block_influence_iterative": Method(estimator="block_influence", mode="layer", layer_range="all",
                                              rounds=15),  # SmolLM2: about one of its 30 layers per round
}


# The fields of a Method by the choice they make, for saying what one method changes from another.
FIELD_GROUPS: dict[str, tuple[str, ...]] = {
    "estimator": ("estimator", "reduction"),
    "allocation": ("mode", "allocation", "normalize", "layer_range", "attention", "round_to"),
    "compensation": ("compensation", "damping"),
    "rounds": ("rounds",),
}
# From LLM-Pruner's method to ours, one group of fields at a time (notebook 03's curve can draw it rung by rung).
LADDER = ("param_first", "fisher_local", "fisher_bias_local", "fisher_bias", "fisher_refit")


def _field_text(name: str, value) -> str:
    return "LLM-Pruner's range" if name == "layer_range" and value is None else str(value)


def changes(before: Method, after: Method) -> dict[str, str]:
    """What ``after`` changes from ``before``, per group of fields (``FIELD_GROUPS``): ``{"compensation":
    "compensation bias → refit"}``; empty for the same method. Read from the dataclasses' fields, never typed."""
    out = {}
    for group, names in FIELD_GROUPS.items():
        moved = [f"{n} {_field_text(n, getattr(before, n))} → {_field_text(n, getattr(after, n))}"
                 for n in names if getattr(before, n) != getattr(after, n)]
        if moved:
            out[group] = ", ".join(moved)
    return out


def ladder(names: Sequence[str]) -> list[dict]:
    """One row per method of ``names`` in order: ``rung`` (0, 1, ...), ``method``, ``changed`` (the groups of
    fields that differ from the rung before, ``changes``), ``what changed`` (their fields, old → new) and
    ``one change`` (whether exactly one group moved: the rung's point on the curve isolates that choice)."""
    rows = []
    for i, name in enumerate(names):
        diff = changes(METHODS[names[i - 1]], METHODS[name]) if i else {}
        start = ", ".join(f"{g} {getattr(METHODS[name], g)}" for g in FIELD_GROUPS)  # each group's own field
        rows.append({"rung": i, "method": name, "changed": ", ".join(diff) if i else "(start)",
                     "what changed": "; ".join(diff.values()) if i else f"the first rung: {start}",
                     "one change": len(diff) == 1 if i else True})
    return rows
