"""Structured pruning: decide which coupled units go (``plan_pruning``), then remove them (``apply``).

The ``Plan`` and the cut itself live one level down, in ``tailored.removal`` (they need no scores); this
module chooses the units and, in ``apply``, compensates the layers that read them before they are cut.

LLM-Pruner removes whole coupled groups (an attention head with its q/k/v rows and o_proj columns, an
MLP channel with its gate/up rows and down_proj column), so the pruned model is a smaller *dense* model:
no masks, no sparse kernels. Three styles, as in LLM-Pruner:

- **block-wise** (``mode="block"``): attention units and MLP channels inside a range of layers. The first
  and last layers are the most sensitive and are kept: LLM-Pruner prunes layers 4..29 of LLaMA-7B's 32
  (``--block_*_layer_start 4 --block_*_layer_end 30``); the default range here scales that to the
  model's depth, ``round(4/32·L) .. round(30/32·L)`` (end exclusive), never touching the first or last.
- **channel-wise** (``mode="channel"``): the hidden dimension, through every layer, the embedding, the
  norms and the LM head.
- **layer-wise** (``mode="layer"``): whole decoder layers, those of lowest mean importance.

*Target.* LLM-Pruner's ``--pruning_ratio`` is the share of units removed in each pruned layer, not the
share of parameters removed: with layers 0-3 and 30-31 untouched and embeddings never pruned, its
"50%" LLaMA-7B keeps about 4.1B of 6.7B. Here ``target`` is the share of parameters actually removed, of
the decoder layers (``denominator="decoder"``, default) or of the whole model (``"model"``). Removing one
unit removes ``params_per_unit`` parameters, so the planner solves (by bisection) for the per-layer ratio
that removes ``target`` of them, then reports the LLM-Pruner ratio that is equivalent.

*GQA.* A key-value head is shared by ``g`` query heads. ``attention="kv"`` removes a key-value head
together with its query heads (the unit of the ``"attention"`` group sets); ``attention="qheads"`` keeps
every key-value head and removes the same number of query heads from each key-value group, because the
forward pass (``repeat_kv``) needs every group to serve the same number of query heads.

Typical use::

    plan = plan_pruning(graph, scores, target=0.2)      # nothing is touched yet
    print(plan.describe())
    model = apply(plan, model, graph)                    # in place; `graph` now describes the old model
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from tailored.choices import ALLOCATIONS, ATTENTION, COMPENSATIONS, DENOMINATORS, MODES, NORMALIZATIONS
from tailored.graph import Graph, GroupSet
from tailored.importance import Activations, readers
from tailored.removal import (
    Plan,
    cut,
    layer_params,
    make_plan,
    non_decoder_per_hidden_unit,
    params_per_unit,
    planned_cuts,
)

TOLERANCE = 0.01  # the achieved share must be within 1 percentage point of the target


# ============================================================================================ planning
def default_layer_range(num_layers: int) -> tuple[int, int]:
    """LLM-Pruner's layers 4..30 (end exclusive) of 32, scaled to ``num_layers``; first and last always kept."""
    start = max(1, math.floor(4 / 32 * num_layers + 0.5))
    end = min(num_layers - 1, math.floor(30 / 32 * num_layers + 0.5))
    if end <= start:
        raise ValueError(f"a model with {num_layers} decoder layers has no layers between its first and last "
                         "to prune block-wise; pass layer_range=(start, end) explicitly")
    return start, end


def max_share(config: dict, layer_range: tuple[int, int], attention: str = "kv", round_to: int = 1) -> float:
    """The largest share of the decoder's parameters block-wise pruning of ``layer_range`` can remove: every group
    of those layers down to the units it must keep (one key-value group, or one query head per key-value group;
    ``round_to`` MLP channels), as ``tailored.prune.plan_pruning`` counts them. From the config alone::

        kv group    (H/K)·d·h q rows + 2·d·h k, v rows + (H/K)·d·h o columns (+ their biases)
        MLP channel 3·h (gate and up rows, a down column; + 2 biases)

    with hidden ``h``, ``H`` query and ``K`` key-value heads of ``d`` channels."""
    h, heads, layers = config["hidden_size"], config["num_attention_heads"], config["num_hidden_layers"]
    kv = config.get("num_key_value_heads") or heads
    d = config.get("head_dim") or h // heads
    inter = config["intermediate_size"]
    qkv_bias = config.get("model_type") == "qwen2" or bool(config.get("attention_bias"))
    o_bias, mlp_bias = bool(config.get("attention_bias")), bool(config.get("mlp_bias"))
    q_head = 2 * d * h + (d if qkv_bias else 0)  # a query head: its q rows and o columns
    kv_group = (heads // kv) * q_head + 2 * (d * h + (d if qkv_bias else 0))
    channel = 3 * h + (2 if mlp_bias else 0)
    per_layer = (kv * kv_group + (h if o_bias else 0) + inter * channel + (h if mlp_bias else 0)
                 + 2 * h)  # + the two RMSNorms
    attn = (heads - kv) * q_head if attention == "qheads" else (kv - 1) * kv_group
    removable = attn + (inter - max(1, round_to)) * channel
    start, end = layer_range
    return (end - start) * removable / (layers * per_layer)


def plan_pruning(graph: Graph, scores: Mapping[str, torch.Tensor], target: float = 0.2, mode: str = "block",
                 allocation: str = "local", layer_range: tuple[int, int] | None = None, round_to: int = 1,
                 attention: str = "kv", denominator: str = "decoder", normalize: str = "kind",
                 layer_scores: Mapping[int, float] | Sequence[float] | torch.Tensor | None = None,
                 tolerance: float | None = TOLERANCE) -> Plan:
    """Choose the units to remove so that ``target`` of the parameters go (within 1 percentage point).

    ``scores[name]`` is a float tensor ``(units,)`` per group set (higher = more important); only the group
    sets the mode prunes are read: ``"attention"`` (or ``"qheads"``) and ``"mlp"`` of the layers in
    ``layer_range`` for block- and layer-wise, ``"hidden"`` for channel-wise.

    Allocation (block-wise):

    - ``"local"``: every pruned layer loses the same share of its units, LLM-Pruner's default. A ratio ``r``
      removes ``round(r·units)`` of the lowest-scored units in each group set.
    - ``"global"``: units compete across layers, so unimportant layers lose more. Raw scores of a head and
      of an MLP channel are not comparable (a head holds hundreds of times more weights, and its score
      sums over them), so each score is first divided by the mean score of its kind (attention or MLP)
      over the pruned layers: 1.0 means "an average head" or "an average channel". One threshold on the
      normalized scores then decides everywhere.

    ``normalize`` says how global allocation makes scores comparable across layers and kinds:

    - ``"kind"`` (default, as above): each score over the mean score of its kind in the pruned layers.
    - ``"layer"``: FLAP's standardization, ``(s − mean) / std`` within each group set (one layer, one
      kind), so that every layer's scores are on the same scale; a unit competes by how far it sits below
      its own layer's average.
    - ``"cost"``: each score over the parameters its unit removes (``params_per_unit``): for scores that
      estimate a loss change, the threshold then removes the least loss per parameter first (the greedy
      answer to "remove this many parameters at the least cost").
    - ``"none"``: the scores as given (already comparable, e.g. an estimated loss change per unit).

    Layer-wise pruning (``mode="layer"``) ranks layers by the mean kind-normalized score of their units,
    or by ``layer_scores`` when given: one number per decoder layer (higher = more important), e.g.
    ``tailored.importance.block_influence``.

    Heads are coarse (SmolLM2 has 3 key-value heads per layer), so the ratio (or threshold) is solved in
    two steps: first for attention and MLP together, which fixes how many heads go; then again for the MLP
    alone, with the heads fixed, so the fine-grained channels land the total on the target.

    ``round_to`` makes kept MLP / hidden widths multiples of it (64 or 128 match GPU matrix tiles; the paper
    profile keeps 128); heads are whole units already. A group set always keeps at least one unit (one query head per key-value group).
    Layer-wise pruning removes whole layers, so its share moves in steps of one layer: it drops the number
    of layers closest to the target, the ones of lowest mean (kind-normalized) importance.

    Raises ``ValueError`` for a target outside (0, 1), a layer range outside the model, missing scores, or
    a target that cannot be reached within ``tolerance`` (1 percentage point; ``None``: the closest plan
    is returned, as the intermediate rounds of iterative pruning want); nothing is touched.
    """
    _check_choice("mode", mode, MODES)
    _check_choice("allocation", allocation, ALLOCATIONS)
    _check_choice("attention", attention, ATTENTION)
    _check_choice("denominator", denominator, DENOMINATORS)
    _check_choice("normalize", normalize, NORMALIZATIONS)
    if not isinstance(target, (int, float)) or not 0 < target < 1:
        raise ValueError(f"pruning target {target!r} is outside (0, 1): it is the share of parameters to remove")
    if int(round_to) != round_to or round_to < 1:
        raise ValueError(f"round_to={round_to!r} must be a positive integer (kept widths are multiples of it)")
    round_to = int(round_to)
    L = graph.num_layers
    if mode == "channel":
        layer_range = (0, L)
    elif layer_range is None:
        layer_range = default_layer_range(L)
    else:
        layer_range = tuple(int(x) for x in layer_range)
        if len(layer_range) != 2 or not 0 <= layer_range[0] < layer_range[1] <= L:
            raise ValueError(f"layer_range={layer_range} is outside the model's {L} decoder layers: give "
                             f"(start, end) with 0 <= start < end <= {L}; end is exclusive")
    settings = dict(mode=mode, target=float(target), allocation=allocation, layer_range=layer_range,
                    round_to=round_to, attention=attention, denominator=denominator)
    if normalize != "kind":  # recorded only when asked, so plans made before this option compare equal
        settings["normalize"] = normalize
    denom = graph.decoder_params if denominator == "decoder" else graph.total_params
    goal = target * denom  # parameters to remove, counted as the denominator counts them

    if mode == "layer":
        if layer_scores is not None:
            drop = _choose_layers_by(graph, _layer_scores(graph, layer_scores), layer_range, goal)
            settings["layer_scores"] = [float(x) for x in _layer_scores(graph, layer_scores)]
        else:
            drop = _choose_layers(graph, scores, layer_range, attention, goal)
        return make_plan(graph, {}, drop_layers=drop, **settings)

    kinds = ("hidden",) if mode == "channel" else ("attention" if attention == "kv" else "qheads", "mlp")
    slots = [_Prunable(g, _scores_for(g, scores), graph, round_to, denominator)
             for kind in kinds for g in _groups_of_kind(graph, kind)
             if g.layer is None or layer_range[0] <= g.layer < layer_range[1]]
    most = sum(s.cost(s.min_keep) for s in slots)
    if goal > most + TOLERANCE * denom:
        raise ValueError(f"target {target:.1%} of the {denominator} parameters is out of reach: pruning "
                         f"{'the hidden dimension' if mode == 'channel' else f'layers {layer_range[0]}..{layer_range[1] - 1}'}"
                         f" down to one unit per group removes at most {most / denom:.1%}; "
                         "widen layer_range or lower the target")
    if allocation == "global" and mode == "block":
        _normalize(slots, normalize)
    setting = "threshold" if allocation == "global" else "ratio"

    # Step 1: attention and MLP together; this fixes the (coarse) attention units.
    x = _bisect(lambda v: sum(s.cost(s.kept_at(setting, v)) for s in slots), goal, *_setting_range(setting, slots))
    kept = {s.group.name: s.kept_at(setting, x) for s in slots}
    # Step 2: the fine-grained kind alone closes the gap left by the rounding of heads.
    channels = [s for s in slots if s.group.kind in ("mlp", "hidden")]
    fixed = sum(s.cost(kept[s.group.name]) for s in slots if s not in channels)
    x_channels = _bisect(lambda v: sum(s.cost(s.kept_at(setting, v)) for s in channels), goal - fixed,
                         *_setting_range(setting, channels))
    kept.update({s.group.name: s.kept_at(setting, x_channels) for s in channels})

    keep = {s.group.name: s.keep_indices(kept[s.group.name]) for s in slots if kept[s.group.name] < s.group.units}
    plan = make_plan(graph, keep, **settings)
    achieved = plan.share_decoder if denominator == "decoder" else plan.share_model
    if tolerance is not None and abs(achieved - target) > tolerance:
        raise ValueError(f"target {target:.1%} cannot be met within 1 percentage point with round_to={round_to}, "
                         f"allocation={allocation!r}: the closest plan removes {achieved:.2%} of the {denominator} "
                         "parameters (units are too coarse); lower round_to, use allocation='global', or widen "
                         "layer_range")
    return plan


# ----------------------------------------------------------------------------------- solver pieces
class _Prunable:
    """One group set being pruned: its scores, the cost of removing units, and the allowed kept widths."""

    def __init__(self, group: GroupSet, scores: torch.Tensor, graph: Graph, round_to: int, denominator: str):
        self.group = group
        self.scores = scores
        counts = params_per_unit(group)
        if group.kind == "hidden" and denominator == "decoder":
            off = non_decoder_per_hidden_unit(graph)
            counts = tuple(p - off for p in counts)
        self.params_per_unit = counts
        self.norm = scores  # replaced by kind-normalized scores for global allocation
        if group.kind == "qheads":
            if group.parent is None:
                raise ValueError(f"{group.name}: a 'qheads' group set needs `parent` (its kv group per head)")
            self.kv_groups = max(group.parent) + 1
            self.step = self.min_keep = self.kv_groups  # one query head per kv group, the same in every group
        elif group.kind == "attention":
            self.step = self.min_keep = 1
        else:
            if group.units < round_to:
                raise ValueError(f"{group.name} has {group.units} units, fewer than round_to={round_to}")
            self.step = self.min_keep = round_to
        # Units from most to least important (ties: the lower index stays); removal cost by kept count.
        self.order = sorted(range(group.units), key=lambda i: (-float(scores[i]), i))
        self._cost: dict[int, int] = {}

    def kept_at(self, setting: str, x: float) -> int:
        """Units kept at ratio ``x`` (local) or at threshold ``x`` on the normalized scores (global)."""
        u = self.group.units
        raw = (1 - x) * u if setting == "ratio" else u - int((self.norm < x).sum())
        kept = self.step * math.floor(raw / self.step + 0.5)
        return u if raw >= u else max(self.min_keep, min(u, kept))

    def keep_indices(self, kept: int) -> tuple[int, ...]:
        """The ``kept`` highest-scored units; for query heads, the best ``kept / kv`` of every kv group."""
        if self.group.kind != "qheads":
            return tuple(sorted(self.order[:kept]))
        per_group = kept // self.kv_groups
        out = []
        for kv in range(self.kv_groups):
            out += [h for h in self.order if self.group.parent[h] == kv][:per_group]
        return tuple(sorted(out))

    def cost(self, kept: int) -> int:
        """Parameters removed (as the denominator counts them) when ``kept`` units stay."""
        if kept not in self._cost:
            stay = set(self.keep_indices(kept))
            self._cost[kept] = sum(p for i, p in enumerate(self.params_per_unit) if i not in stay)
        return self._cost[kept]


def _normalize(slots: list[_Prunable], how: str) -> None:
    """Set each slot's ``norm`` scores, those the global threshold compares (see ``plan_pruning``)."""
    if how == "kind":
        _normalize_per_kind(slots)
    elif how == "layer":
        for s in slots:
            spread = s.scores.std() if s.scores.numel() > 1 else torch.zeros((), dtype=s.scores.dtype)
            s.norm = (s.scores - s.scores.mean()) / spread if spread > 0 else torch.zeros_like(s.scores)
    elif how == "cost":
        for s in slots:
            s.norm = s.scores / torch.tensor(s.params_per_unit, dtype=s.scores.dtype).clamp_min(1)
    else:
        for s in slots:
            s.norm = s.scores


def _normalize_per_kind(slots: list[_Prunable]) -> None:
    """Divide each score by the mean score of its kind over the pruned layers (1.0 = an average unit)."""
    for kind in {s.group.kind for s in slots}:
        same = [s for s in slots if s.group.kind == kind]
        mean = torch.cat([s.scores for s in same]).mean().clamp_min(1e-30)
        for s in same:
            s.norm = s.scores / mean


def _setting_range(setting: str, slots: list[_Prunable]) -> tuple[float, float]:
    if setting == "ratio":
        return 0.0, 1.0
    allv = torch.cat([s.norm for s in slots])
    return float(allv.min()) - 1.0, float(allv.max()) + 1.0


def _bisect(removed, goal: float, lo: float, hi: float, steps: int = 80) -> float:
    """The setting value whose (monotone, stepwise) ``removed(setting)`` is closest to ``goal``."""
    if removed(lo) >= goal:
        return lo
    if removed(hi) <= goal:
        return hi
    for _ in range(steps):  # invariant: removed(lo) < goal <= removed(hi)
        mid = (lo + hi) / 2
        if removed(mid) < goal:
            lo = mid
        else:
            hi = mid
    return lo if goal - removed(lo) < removed(hi) - goal else hi


def _choose_layers(graph: Graph, scores: Mapping[str, torch.Tensor], layer_range: tuple[int, int],
                   attention: str, goal: float) -> tuple[int, ...]:
    """Layer-wise: the layers of lowest mean kind-normalized importance, as many as come closest to ``goal``."""
    candidates = list(range(*layer_range))
    kinds = ("attention" if attention == "kv" else "qheads", "mlp")
    per_layer = {i: [] for i in candidates}
    for kind in kinds:
        gs = [g for g in _groups_of_kind(graph, kind) if g.layer in per_layer]
        vals = {g.layer: _scores_for(g, scores) for g in gs}
        mean = torch.cat(list(vals.values())).mean().clamp_min(1e-30)
        for i, v in vals.items():
            per_layer[i].append(float((v / mean).mean()))
    importance = {i: sum(v) / len(v) for i, v in per_layer.items()}
    n = min(len(candidates), graph.num_layers - 1, max(1, round(goal / layer_params(graph))))
    return tuple(sorted(sorted(candidates, key=lambda i: (importance[i], i))[:n]))


def _layer_scores(graph: Graph, layer_scores) -> torch.Tensor:
    s = torch.as_tensor(layer_scores if not isinstance(layer_scores, Mapping)
                        else [layer_scores[i] for i in range(graph.num_layers)], dtype=torch.float64).flatten()
    if s.numel() != graph.num_layers:
        raise ValueError(f"layer_scores has {s.numel()} values but the model has {graph.num_layers} decoder layers")
    if not torch.isfinite(s).all():
        raise ValueError("layer_scores holds NaN or inf; check the layer importance estimate")
    return s


def _choose_layers_by(graph: Graph, layer_scores: torch.Tensor, layer_range: tuple[int, int],
                      goal: float) -> tuple[int, ...]:
    """Layer-wise by given per-layer scores: the lowest-scored layers in range, as many as come closest to ``goal``."""
    candidates = list(range(*layer_range))
    n = min(len(candidates), graph.num_layers - 1, max(1, round(goal / layer_params(graph))))
    return tuple(sorted(sorted(candidates, key=lambda i: (float(layer_scores[i]), i))[:n]))


# ----------------------------------------------------------------------------------- bookkeeping
def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {allowed}")


def _groups_of_kind(graph: Graph, kind: str) -> list[GroupSet]:
    gs = graph.of_kind(kind)
    if not gs:
        raise ValueError(f"the graph has no {kind!r} group sets; re-run tailored.graph.trace on the dense model")
    return gs


def _scores_for(group: GroupSet, scores: Mapping[str, torch.Tensor]) -> torch.Tensor:
    if group.name not in scores:
        raise ValueError(f"scores has no entry for group set {group.name!r} (kind {group.kind!r}); compute "
                         "importance for every group set the mode prunes")
    s = torch.as_tensor(scores[group.name]).detach().to("cpu", torch.float64).flatten()
    if s.numel() != group.units:
        raise ValueError(f"scores[{group.name!r}] has {s.numel()} values but the group set has {group.units} units")
    if not torch.isfinite(s).all():
        raise ValueError(f"scores[{group.name!r}] holds NaN or inf; check the importance estimate")
    return s


# =============================================================================================== apply
def apply(plan: Plan, model: torch.nn.Module, graph: Graph, compensation: str = "none",
          activations: Activations | None = None, damping: float = 0.01) -> torch.nn.Module:
    """Remove what ``plan`` says from ``model``, in place, and return it: ``tailored.removal.remove`` (see there
    for what changes), after an optional compensation of the removed units' readers.

    ``compensation`` (block-wise plans; needs ``activations`` of this model, from
    ``tailored.importance.activation_statistics``) gives back to each *reader* of the removed units (the
    ``o_proj`` / ``down_proj`` whose input columns go) what the removed columns contributed on average:

    - ``"bias"`` (FLAP): b ← b + W_:,R μ_R, the removed columns R times their inputs' calibration mean; a
      Linear built without a bias gets one (``checkpoint.save_pruned`` records it, ``load_pruned`` rebuilds it).
    - ``"refit"``: the least-squares answer to the same question, which also lets the kept columns K take
      over what the removed ones carried: the affine map [W'_K, b'] minimizing E‖W x + b − W'_K x_K − b'‖² on
      the calibration inputs, i.e. W'_K = W_K + W_R A_K, b' = b + W_R a with [A_K, a] = E[x_R zᵀ] (E[z zᵀ] +
      λ)⁻¹ the regression of x_R on z = [x_K; 1], λ = ``damping`` × the mean of diag E[x_K x_Kᵀ] (ridge,
      as SparseGPT dampens). ``"bias"`` is the special case that regresses on the constant alone. Needs the
      full second moments (``activation_statistics(..., full=True)``).
    """
    _check_choice("compensation", compensation, COMPENSATIONS)
    groups = {name: graph.by_name(name) for name in plan.keep}
    cuts = planned_cuts(plan, model, graph)  # every new index set first: a bad plan fails before any weight changes
    if compensation != "none":
        if activations is None:
            raise ValueError(f"compensation={compensation!r} needs the calibration statistics of the readers: pass "
                             "activations=tailored.importance.activation_statistics(model, graph, batch)")
        if plan.drop_layers or any(g.kind == "hidden" for g in groups.values()):
            raise ValueError(f"compensation={compensation!r} applies to block-wise plans (heads and MLP channels), "
                             "not to dropped layers or the hidden dimension; use compensation='none'")
        if not damping >= 0:
            raise ValueError(f"damping={damping!r} must be >= 0 (the ridge added to E[x xᵀ], relative to its mean diagonal)")
    if compensation != "none":  # on the dense weights, before any column is cut
        readers_of = {name: readers(model, g) for name, g in groups.items()}
        for name, units in plan.keep.items():
            gone = sorted(set(range(groups[name].units)) - set(units))
            for mi, mod_name in readers_of[name]:
                removed = sorted(i for u in gone for i in groups[name].members[mi].index[u])
                if removed:
                    _compensate(model.get_submodule(mod_name), mod_name, removed, compensation, activations, damping)
    return cut(model, cuts, plan.drop_layers)


@torch.no_grad()
def _compensate(linear: torch.nn.Linear, name: str, removed: Sequence[int], how: str, acts: Activations,
                damping: float) -> None:
    """Give ``linear`` back what its input columns ``removed`` contributed (see ``apply``), in place."""
    w = linear.weight.detach().to(torch.float64)  # (out, in)
    if name not in acts.mean:
        raise ValueError(f"the activations hold no statistics for {name}: compute them on this model "
                         "(activation_statistics(model, graph, batch))")
    dev = w.device  # statistics are kept on the CPU; the solve runs where the weight lives
    mu = acts.mean[name].to(device=dev, dtype=torch.float64)
    if mu.numel() != w.shape[1]:
        raise ValueError(f"the activations of {name} have {mu.numel()} input channels but its weight has "
                         f"{w.shape[1]}: they were computed on another (differently pruned) model")
    b = linear.bias.detach().to(torch.float64) if linear.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64, device=dev)
    r = torch.tensor(removed, dtype=torch.long, device=dev)
    w_r = w[:, r]  # (out, |R|)
    if how == "bias":
        b = b + w_r @ mu[r]
    else:
        second = acts.second[name]
        if second.dim() != 2:
            raise ValueError(f"compensation='refit' needs the full second moments of {name}'s input: collect them "
                             "with activation_statistics(..., full=True)")
        m = second.to(device=dev, dtype=torch.float64)
        k = torch.tensor(sorted(set(range(w.shape[1])) - set(removed)), dtype=torch.long, device=dev)
        d = len(k)
        gram = torch.empty(d + 1, d + 1, dtype=torch.float64, device=dev)  # E[z zᵀ], z = [x_K; 1]
        gram[:d, :d] = m[k][:, k]
        gram[:d, :d].diagonal().add_(damping * float(m[k, k].mean()))
        gram[:d, d] = gram[d, :d] = mu[k]
        gram[d, d] = 1.0
        cross = torch.cat([m[r][:, k], mu[r][:, None]], dim=1)  # E[x_R zᵀ]: (|R|, d + 1)
        a = torch.linalg.solve(gram, cross.T).T  # x_R ≈ a z: (|R|, d + 1)
        update = w_r @ a  # (out, d + 1)
        linear.weight[:, k] += update[:, :d].to(linear.weight.dtype)
        b = b + update[:, d]
    bias = b.to(device=linear.weight.device, dtype=linear.weight.dtype)
    if linear.bias is None:
        linear.bias = torch.nn.Parameter(bias, requires_grad=linear.weight.requires_grad)
    else:
        linear.bias.copy_(bias)


# ============================================================================================ trade-off
def sweep(dense: torch.nn.Module, graph: Graph, scores: Mapping[str, Mapping[str, torch.Tensor]],
          shares: Sequence[float], measure, progress: bool = True, **plan_kw) -> list[dict]:
    """Prune a copy of ``dense`` to every share with every estimator's scores; ``measure(model)`` each one.

    ``scores``: estimator name -> (group set name -> scores). ``plan_kw`` go to ``plan_pruning``. Returns one
    row per (estimator, share): the asked and achieved shares and what ``measure`` returned (a float or a dict).
    The dense model is never modified.
    """
    rows = []
    jobs = [(est, share) for est in scores for share in shares]
    for est, share in tqdm(jobs, desc="prune + measure", disable=not progress):
        plan = plan_pruning(graph, scores[est], target=share, **plan_kw)
        model = apply(plan, copy.deepcopy(dense), graph)
        value = measure(model)
        del model
        row = {"estimator": est, "target": share, "share": plan.share_decoder, "share_model": plan.share_model}
        row.update(value if isinstance(value, Mapping) else {"value": value})
        rows.append(row)
    return rows
