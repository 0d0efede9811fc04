"""Removing coupled units from a model: the ``Plan`` of what goes, and ``remove``, which cuts it out.

A plan keeps, per group set of the graph (``tailored.graph``), the units that stay; ``make_plan`` counts what
explicit choices add up to, and ``remove`` replaces every member's parameter by a smaller one, so the pruned
model is a smaller *dense* model. Deciding *which* units go (scores, allocation, a target share) is the
planner's job (``tailored.prune.plan_pruning``), and giving the readers of removed units back what they
contributed needs calibration statistics (``tailored.prune.apply``, which ends here). This module needs
neither: notebook 01 removes hand-picked units with it, and shows that cutting one matrix alone
(``narrow``) breaks the model::

    plan = make_plan(graph, {"layers.3.attention": [1, 2]})   # keep kv groups 1 and 2 of layer 3
    remove(plan, model, graph)                                 # in place; `graph` now describes the old model
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch

from tailored.anatomy import decoder_layers, sync_module_attributes
from tailored.graph import Graph, GroupSet

Cuts = dict[int, tuple[torch.nn.Parameter, dict[int, set[int]]]]  # id(tensor) -> (tensor, dim -> entries removed)


# ================================================================================================ the plan
@dataclass(frozen=True)
class Plan:
    """What to remove, and what it adds up to. Made by ``plan_pruning`` (or ``make_plan``); JSON via ``to_dict``.

    ``keep`` maps a group set name to the unit indices that stay (ascending); group sets not named are
    left whole. ``drop_layers`` lists decoder layers removed whole (layer-wise pruning). Shares are
    fractions of parameters removed: ``share_decoder`` of the decoder layers, ``share_model`` of the model.
    ``widths`` has one row per decoder layer that remains: its query heads, key-value heads, MLP channels
    and hidden size after pruning (``layer`` is its index in the dense model).
    """

    keep: Mapping[str, tuple[int, ...]]
    drop_layers: tuple[int, ...]
    params_before: int
    params_after: int
    decoder_params_before: int
    decoder_params_after: int
    widths: tuple[Mapping[str, int], ...]
    llm_pruner_ratio: float  # LLM-Pruner's --pruning_ratio that removes as many parameters (see module doc)
    unit_ratios: Mapping[str, float]  # share of units removed in the pruned layers, per group set kind
    settings: Mapping[str, object] = field(default_factory=dict)  # mode, target, allocation, ... as asked

    @property
    def share_decoder(self) -> float:
        """Share of the decoder layers' parameters removed."""
        return 1 - self.decoder_params_after / self.decoder_params_before

    @property
    def share_model(self) -> float:
        """Share of all the model's parameters removed (embeddings and LM head included)."""
        return 1 - self.params_after / self.params_before

    def to_dict(self) -> dict:
        d = asdict(self)
        d["keep"] = {k: list(v) for k, v in self.keep.items()}
        d["drop_layers"] = list(self.drop_layers)
        d["widths"] = [dict(w) for w in self.widths]
        d["unit_ratios"] = dict(self.unit_ratios)
        d["settings"] = dict(self.settings)
        d["share_decoder"] = self.share_decoder
        d["share_model"] = self.share_model
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> Plan:
        settings = dict(d.get("settings", {}))
        if settings.get("layer_range") is not None:
            settings["layer_range"] = tuple(settings["layer_range"])
        return cls(keep={k: tuple(v) for k, v in d["keep"].items()}, drop_layers=tuple(d["drop_layers"]),
                   params_before=d["params_before"], params_after=d["params_after"],
                   decoder_params_before=d["decoder_params_before"],
                   decoder_params_after=d["decoder_params_after"],
                   widths=tuple(dict(w) for w in d["widths"]), llm_pruner_ratio=d["llm_pruner_ratio"],
                   unit_ratios=dict(d["unit_ratios"]), settings=settings)

    def describe(self) -> str:
        """A few lines for a notebook: what was asked, what it adds up to, the widths per layer."""
        s = self.settings
        asked = (f"{s['mode']}-wise, {s.get('allocation')} allocation, target {s['target']:.1%} of the "
                 f"{s.get('denominator', 'decoder')} parameters" if "target" in s else "hand-made plan")
        lines = [
            asked,
            f"removed {self.share_decoder:.2%} of the decoder ({self.decoder_params_before:,} -> "
            f"{self.decoder_params_after:,}), {self.share_model:.2%} of the model ({self.params_before:,} -> "
            f"{self.params_after:,})",
            f"LLM-Pruner pruning ratio equivalent: {self.llm_pruner_ratio:.3f}"
            + "".join(f"; {k} units removed {v:.1%}" for k, v in self.unit_ratios.items()),
        ]
        if self.drop_layers:
            lines.append(f"dropped layers: {list(self.drop_layers)}")
        lines.append("layer  q_heads  kv_heads  mlp  hidden")
        lines += [f"{w['layer']:>5}  {w['q_heads']:>7}  {w['kv_heads']:>8}  {w['mlp']:>4}  {w['hidden']:>6}"
                  for w in self.widths]
        return "\n".join(lines)



def make_plan(graph: Graph, keep: Mapping[str, Sequence[int]], drop_layers: Sequence[int] = (),
              **settings) -> Plan:
    """A plan from explicit choices: ``keep[name]`` = unit indices that stay. Counts what they add up to.

    ``plan_pruning`` ends here; it is public so a notebook can prune hand-picked units (e.g. one head).
    A plan narrows layers (``keep``) or drops them (``drop_layers``), not both; and it prunes either the
    hidden dimension or attention/MLP units, since those share weights (apply one plan, re-trace, then
    plan the next).
    """
    keep = {name: tuple(sorted(int(u) for u in units)) for name, units in keep.items()}
    drop = tuple(sorted(int(i) for i in drop_layers))
    groups = {name: graph.by_name(name) for name in keep}
    validate_keep(graph, keep, drop, groups)

    removed_total = removed_decoder = 0
    for name, units in keep.items():
        g = groups[name]
        gone = set(range(g.units)) - set(units)
        total = sum(p for u, p in enumerate(params_per_unit(g)) if u in gone)
        removed_total += total
        removed_decoder += total - len(gone) * non_decoder_per_hidden_unit(graph) if g.kind == "hidden" else total
    if drop:
        removed_total += len(drop) * layer_params(graph)
        removed_decoder += len(drop) * layer_params(graph)

    # LLM-Pruner's ratio r removes r of every prunable unit of the pruned layers (and r of the hidden
    # channels channel-wise), so its equivalent is what we removed over what those units hold.
    scope = _pruned_scope(graph, keep, settings)
    unit_ratios: dict[str, float] = {}
    for kind in dict.fromkeys(g.kind for g in scope):
        same = [g for g in scope if g.kind == kind]
        gone = sum(g.units - len(keep.get(g.name, range(g.units))) for g in same)
        unit_ratios[kind] = gone / sum(g.units for g in same)
    if drop:
        candidates = range(*settings["layer_range"]) if settings.get("layer_range") else range(graph.num_layers)
        unit_ratios["layer"] = len(drop) / len(candidates)
        llm_ratio = len(drop) / graph.num_layers
    else:
        prunable = sum(sum(params_per_unit(g)) for g in scope)
        llm_ratio = removed_total / prunable if prunable else 0.0
    return Plan(keep=keep, drop_layers=drop, params_before=graph.total_params,
                params_after=graph.total_params - removed_total, decoder_params_before=graph.decoder_params,
                decoder_params_after=graph.decoder_params - removed_decoder,
                widths=_widths(graph, keep, drop), llm_pruner_ratio=llm_ratio, unit_ratios=unit_ratios,
                settings=settings)



# ----------------------------------------------------------------------------------- bookkeeping
def params_per_unit(group: GroupSet) -> tuple[int, ...]:
    if len(group.params_per_unit) != group.units:
        raise ValueError(f"{group.name}: params_per_unit has {len(group.params_per_unit)} entries for "
                         f"{group.units} units; re-run tailored.graph.trace")
    return tuple(group.params_per_unit)


def non_decoder_per_hidden_unit(graph: Graph) -> int:
    """Parameters of one hidden channel outside the decoder layers (embedding column, final norm, LM head).

    Every parameter outside the decoder layers of a LLaMA-family model has one hidden-sized dimension,
    so they add up to ``(total - decoder) / hidden`` per channel.
    """
    outside = graph.total_params - graph.decoder_params
    if outside % graph.hidden_size:
        raise ValueError(f"{outside} parameters outside the decoder layers do not divide by hidden size "
                         f"{graph.hidden_size}: this architecture has non-hidden parameters there")
    return outside // graph.hidden_size


def layer_params(graph: Graph) -> int:
    if graph.decoder_params % graph.num_layers:
        raise ValueError("decoder layers differ in size; layer-wise pruning expects the dense model's graph")
    return graph.decoder_params // graph.num_layers


def _pruned_scope(graph: Graph, keep: Mapping, settings: Mapping) -> list[GroupSet]:
    """The group sets LLM-Pruner's ratio would act on: every set of the pruned kinds in the pruned layers."""
    mode = settings.get("mode")
    if mode == "channel":
        return graph.of_kind("hidden")
    if mode == "block":
        kinds = ("attention" if settings.get("attention", "kv") == "kv" else "qheads", "mlp")
        layers = set(range(*settings["layer_range"]))
    else:  # a hand-made plan: the kinds and layers it touches
        kinds = tuple(dict.fromkeys(graph.by_name(n).kind for n in keep))
        layers = {graph.by_name(n).layer for n in keep}
    return [g for k in kinds for g in graph.of_kind(k) if g.kind == "hidden" or g.layer in layers]


def validate_keep(graph: Graph, keep: Mapping[str, tuple[int, ...]], drop: tuple[int, ...],
              groups: Mapping[str, GroupSet]) -> None:
    """Refuse plans that would break the model, before anything is touched."""
    for name, units in keep.items():
        g = groups[name]
        if not units:
            raise ValueError(f"the plan removes every unit of {name} ({g.kind}); a layer must keep at least one "
                             "head and one channel (drop the layer with mode='layer' instead)")
        if units[0] < 0 or units[-1] >= g.units or len(set(units)) != len(units):
            raise ValueError(f"keep[{name!r}] must be distinct unit indices in 0..{g.units - 1}")
        if g.kind == "qheads":
            per_kv = [sum(1 for u in units if g.parent[u] == kv) for kv in range(max(g.parent) + 1)]
            if len(set(per_kv)) != 1 or per_kv[0] == 0:
                raise ValueError(f"{name}: query heads kept per kv group are {per_kv}; every kv group must keep "
                                 "the same number (>= 1) of query heads (GQA's repeat_kv needs it)")
    kinds = {g.kind for g in groups.values()}
    if "hidden" in kinds and len(kinds) > 1:
        raise ValueError("a plan cannot prune the hidden dimension together with heads or channels (they share "
                         "weights): apply one plan, re-trace, then plan the next")
    by_layer: dict[int, set[str]] = {}
    for g in groups.values():
        if g.layer is not None:
            by_layer.setdefault(g.layer, set()).add(g.kind)
    for layer, ks in by_layer.items():
        if {"attention", "qheads"} <= ks:
            raise ValueError(f"layer {layer}: a plan prunes either kv units or query heads of a layer, not both")
    if drop:
        if keep:
            raise ValueError("a plan either drops layers or narrows them, not both")
        if drop[0] < 0 or drop[-1] >= graph.num_layers or len(set(drop)) != len(drop):
            raise ValueError(f"drop_layers={list(drop)} must be distinct layers in 0..{graph.num_layers - 1}")
        if len(drop) >= graph.num_layers:
            raise ValueError("the plan drops every decoder layer; keep at least one")


def _heads_layout(graph: Graph, layer: int) -> tuple[int, int]:
    """(query heads per kv head, kv heads) of a dense layer, read from its attention group set."""
    att = [g for g in graph.of_kind("attention") if g.layer == layer]
    if att:
        g = att[0]
        q, k = g.member("q_proj.weight"), g.member("k_proj.weight")
        return q.unit_width(0) // k.unit_width(0), g.units
    qh = [g for g in graph.of_kind("qheads") if g.layer == layer]
    if qh and qh[0].parent is not None:
        kv = max(qh[0].parent) + 1
        return qh[0].units // kv, kv
    return 0, 0


def _widths(graph: Graph, keep: Mapping[str, tuple[int, ...]], drop: tuple[int, ...]) -> tuple[dict, ...]:
    hidden = graph.of_kind("hidden")
    h = len(keep[hidden[0].name]) if hidden and hidden[0].name in keep else graph.hidden_size
    rows = []
    for i in range(graph.num_layers):
        if i in drop:
            continue
        g, kv = _heads_layout(graph, i)
        q = g * kv
        for gs in graph.groups:
            if gs.layer != i or gs.name not in keep:
                continue
            if gs.kind == "attention":
                kv = len(keep[gs.name])
                q = g * kv
            elif gs.kind == "qheads":
                q = len(keep[gs.name])
        mlp = [gs for gs in graph.of_kind("mlp") if gs.layer == i]
        m = (len(keep[mlp[0].name]) if mlp[0].name in keep else mlp[0].units) if mlp else 0
        rows.append({"layer": i, "q_heads": q, "kv_heads": kv, "mlp": m, "hidden": h})
    return tuple(rows)


# ============================================================================================= the cut
def remove(plan: Plan, model: torch.nn.Module, graph: Graph) -> torch.nn.Module:
    """Remove what ``plan`` says from ``model``, in place, and return it.

    Each member's parameter is replaced by a smaller ``nn.Parameter`` (``index_select`` on the member's
    dimension), the modules' size attributes follow (``Linear.in/out_features``, ``Embedding.embedding_dim``,
    the attention's ``num_key_value_groups``), and a tied embedding / LM head stays one tensor. The model's
    config keeps the dense widths (a stock config cannot say "layer 5 has 2 kv heads"; the checkpoint
    records the per-layer shapes); only layer-wise pruning changes it, to ``num_hidden_layers`` (and
    ``layer_types``) of the layers kept, which the forward pass and the KV cache read. ``graph`` must
    describe ``model`` as it is now (the dense model); afterwards it is stale: trace again before planning
    more pruning. Every index is checked before any weight changes (``planned_cuts``).
    """
    return cut(model, planned_cuts(plan, model, graph), plan.drop_layers)


def planned_cuts(plan: Plan, model: torch.nn.Module, graph: Graph) -> Cuts:
    """Which entries of which tensor ``plan`` removes, checked against ``model``: a bad plan (one made for
    another model, or for this one before it was pruned) fails here, before any weight changes."""
    params = dict(model.named_parameters(remove_duplicate=False))
    groups = {name: graph.by_name(name) for name in plan.keep}
    validate_keep(graph, plan.keep, plan.drop_layers, groups)  # again: a plan may come from JSON or by hand
    cuts: Cuts = {}
    for name, units in plan.keep.items():
        g = groups[name]
        gone = sorted(set(range(g.units)) - set(units))
        for m in g.members:
            if m.param not in params:
                raise ValueError(f"graph member {m.param} (group set {name}) is not a parameter of the model: "
                                 "the graph was traced from another model, or the model was already pruned")
            p = params[m.param]
            removed = {i for u in gone for i in m.index[u]}
            if removed and max(removed) >= p.shape[m.dim]:
                raise ValueError(f"{m.param} has {p.shape[m.dim]} entries along dim {m.dim} but the graph indexes "
                                 f"{max(removed)}: the graph does not describe this model (already pruned?)")
            cuts.setdefault(id(p), (p, {}))[1].setdefault(m.dim, set()).update(removed)
    return cuts


def cut(model: torch.nn.Module, cuts: Cuts, drop_layers: Sequence[int] = ()) -> torch.nn.Module:
    """Shrink every tensor of ``cuts`` (from ``planned_cuts``), drop ``drop_layers``, and make the modules'
    size attributes agree with the new shapes; in place. ``cuts`` is emptied as it goes: each old tensor is let
    go as soon as its smaller copy is in place, so the cut holds one tensor twice at a time, not the model (a
    LLaMA-7B and its pruned copy at once would not fit a 24 GB card)."""
    owners = _owners(model)
    for key in list(cuts):
        p, dims = cuts.pop(key)
        _shrink(owners, p, dims)
        del p
    if drop_layers:
        _drop_layers(model, drop_layers)
    sync_module_attributes(model)
    return model


def narrow(model: torch.nn.Module, param: str, dim: int, remove) -> None:
    """Remove the entries ``remove`` along ``dim`` of ONE parameter, in place, and nothing else.

    This is what ``apply`` does to every member of a coupled group; done to one matrix alone it breaks the
    model (notebook 01 shows the forward pass failing), which is why the groups exist. ``Linear`` and
    ``Embedding`` size attributes follow the new shape; a tied tensor shrinks everywhere it is used.
    """
    p = model.get_parameter(param)
    _shrink(_owners(model), p, {dim: {int(i) for i in remove}})
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            mod.out_features, mod.in_features = mod.weight.shape
        elif isinstance(mod, torch.nn.Embedding):
            mod.num_embeddings, mod.embedding_dim = mod.weight.shape


def _owners(model: torch.nn.Module) -> dict[int, list[tuple[torch.nn.Module, str]]]:
    """``id(parameter) -> [(module, attribute)]``: every place that holds each tensor (tied ones: several)."""
    owners: dict[int, list[tuple[torch.nn.Module, str]]] = {}
    for mod in model.modules():
        for attr, p in mod._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((mod, attr))
    return owners


@torch.no_grad()
def _shrink(owners: dict, p: torch.nn.Parameter, removed: Mapping[int, set[int]]) -> None:
    """Replace ``p`` by a smaller parameter without the ``removed[dim]`` entries, wherever it is held."""
    new = p.detach()
    for dim, gone in removed.items():
        kept = [i for i in range(p.shape[dim]) if i not in gone]
        new = new.index_select(dim, torch.tensor(kept, dtype=torch.long, device=p.device))
    new_p = torch.nn.Parameter(new.contiguous(), requires_grad=p.requires_grad)
    for mod, attr in owners[id(p)]:  # a tied embedding and LM head get the same new tensor
        setattr(mod, attr, new_p)


def _drop_layers(model: torch.nn.Module, drop: Sequence[int]) -> None:
    layers = decoder_layers(model)
    kept = [layer for i, layer in enumerate(layers) if i not in set(drop)]
    for parent in model.modules():
        for attr, child in parent._modules.items():
            if child is layers:
                setattr(parent, attr, torch.nn.ModuleList(kept))
    for new_idx, layer in enumerate(kept):
        for mod in layer.modules():  # the KV cache is indexed by each attention's layer_idx
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = new_idx
    config = getattr(model, "config", None)
    if config is not None:
        if getattr(config, "layer_types", None) is not None:
            config.layer_types = [t for i, t in enumerate(config.layer_types) if i not in set(drop)]
        config.num_hidden_layers = len(kept)
