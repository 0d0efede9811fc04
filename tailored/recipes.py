"""Pruning methods, one call each: score the units, plan, compensate, apply, in one or several rounds.

The stages below this module are separate on purpose (``importance`` scores, ``prune`` plans and cuts);
a *method* is a choice at each of them, and the study compares methods. ``Method`` names the choices,
``METHODS`` holds the ones the study compares (both in ``tailored.methods``), and ``prune_model`` runs one::

    batch = calibration_batch(tokenizer, data.text_corpus("calibration"), n_samples=32, seq_len=256)
    pruned = prune_model(copy.deepcopy(dense), batch, target=0.2, method=METHODS["fisher_refit"])
    checkpoint.save_pruned(pruned.model, tokenizer, out_dir, pruned.record)

*Rounds* (LLM-Pruner's ``--iterative_steps``). With ``rounds=R`` the target is reached in R steps: after
round k, k/R of the target share of the *dense* decoder is gone, and before each round the graph is traced
again and the units are scored again on the partly pruned model, with the same calibration batch (units
that matter more once their neighbours are gone can then be kept). Layer-wise pruning by block influence
with as many rounds as layers to drop removes one layer at a time and measures again after each.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from tailored.anatomy import count_parameters, decoder_layers, decoder_parameters, weights_fingerprint
from tailored.choices import LAYER_ESTIMATORS, READER_ESTIMATORS
from tailored.graph import Graph, trace
from tailored.importance import (
    Activations,
    Importance,
    activation_statistics,
    batch_sha256,
    block_influence,
    compute_importance,
)
from tailored.methods import METHODS, Method
from tailored.prune import TOLERANCE, apply, default_layer_range, plan_pruning
from tailored.removal import Plan


@dataclass(frozen=True)
class Pruned:
    """What ``prune_model`` made: the pruned ``model`` (the one passed in, changed in place), each round's
    ``Plan`` (in the layer numbers and unit indices of the model as it was at that round), the shares of
    the dense decoder and model removed, and ``record``, JSON for ``checkpoint.save_pruned``."""

    model: torch.nn.Module = field(repr=False)
    plans: tuple[Plan, ...]
    share_decoder: float
    share_model: float
    record: dict


def _layer_range(method: Method, graph: Graph, kept: list[int], dense_layers: int) -> tuple[int, int]:
    """The method's layer range in the current model's layer numbers (``kept``: dense numbers of its layers)."""
    if method.layer_range == "all":
        return 0, graph.num_layers
    start, end = method.layer_range if method.layer_range is not None else default_layer_range(dense_layers)
    return sum(1 for i in kept if i < start), sum(1 for i in kept if i < end)


@dataclass(frozen=True, eq=False)
class FirstRound:
    """What a method's first round reads from the *dense* model before it plans: the ``graph``, the unit
    ``scores`` (``{group set: (units,)}``; empty for depth pruning) or ``layer_scores`` (``(layers,)``), and the
    readers' ``activations`` when scoring or compensation needs them.

    It is a function of the method's scoring settings (``scoring``: the method with one round and no
    compensation), the dense weights (``weights``: ``anatomy.weights_fingerprint``) and the calibration batch
    (``batch``: ``importance.batch_sha256``) only, so it is made once per method and reused for every share of
    a curve (``PruningCache``). ``source`` says where the scores came from: ``"importance"`` (scores saved by
    notebook 02, passed as ``prune_model(..., importance=...)``) or ``"computed"`` (scored here).
    """

    scoring: Method
    weights: str
    batch: str
    graph: Graph = field(repr=False)
    scores: Mapping[str, torch.Tensor] = field(repr=False)
    layer_scores: torch.Tensor | None = field(default=None, repr=False)
    activations: Activations | None = field(default=None, repr=False)
    source: str = "computed"


class PruningCache:
    """The first rounds (``FirstRound``) of the methods ``prune_model`` ran on one dense model and batch, one
    per method's scoring settings. Pass one cache to the calls that prune fresh copies of the same dense model
    (a curve of shares); an entry made from other weights or another batch is never used."""

    def __init__(self) -> None:
        self._rounds: dict[Method, FirstRound] = {}

    def get(self, scoring: Method, weights: str, batch: str) -> FirstRound | None:
        found = self._rounds.get(scoring)
        return found if found is not None and (found.weights, found.batch) == (weights, batch) else None

    def put(self, first: FirstRound) -> None:
        self._rounds[first.scoring] = first

    def __len__(self) -> int:
        return len(self._rounds)


def prune_model(model: torch.nn.Module, batch: torch.Tensor, target: float, method: Method | str = "param_first",
                micro_batch: int = 1, seed: int = 0, progress: bool = True,
                activations: Activations | None = None, importance: Importance | None = None,
                cache: PruningCache | None = None) -> Pruned:
    """Prune ``model`` in place so that ``target`` of its decoder parameters go, the way ``method`` says.

    ``method``: a ``Method`` or the name of one in ``METHODS``. ``batch``: calibration token ids
    (n_samples, seq_len), scored again in every round. Each round traces the model, scores its units
    (``compute_importance``; ``activation_statistics`` for the reader estimators and for compensation;
    ``block_influence`` for depth pruning), plans the round's share of the *dense* decoder (k/R of
    ``target`` gone after round k) and applies it. The result is a function of the weights, the batch and
    ``seed`` (``random`` scores draw from ``seed + round``): a rerun gives the same weights.

    ``importance``: unit scores of this dense model on this ``batch`` (notebook 02's ``importance.safetensors``).
    When they hold the method's estimator and reduction, the first round plans from them instead of scoring
    again (the same numbers: 02 scores with the same seed); later rounds score the partly pruned model here.
    They must have been computed on this batch and, where they record it, on these weights.

    ``activations``: statistics already collected on this (dense) model and ``batch``, used in the first round
    instead of collecting them again; they must hold what the method needs (``gradients=True`` for
    ``fisher_fluctuation``, ``full=True`` for ``refit``). Compensation collects what it needs otherwise.

    ``cache``: a ``PruningCache`` shared by calls that prune fresh copies of the *same* dense model with the
    same batch (a curve of shares): the first round (``FirstRound``) is computed once per method.

    Raises ``ValueError`` (before touching the model) for an unknown method, a target outside (0, 1), or
    importance scores of other windows or weights; a round whose plan cannot meet its share within 1
    percentage point raises as ``plan_pruning`` does.
    """
    method = _named(method)
    if not isinstance(target, (int, float)) or not 0 < target < 1:
        raise ValueError(f"pruning target {target!r} is outside (0, 1): it is the share of decoder parameters to remove")
    dense_decoder, dense_total = decoder_parameters(model), count_parameters(model)
    dense_layers = len(decoder_layers(model))
    kept_layers = list(range(dense_layers))  # dense numbers of the layers still there
    plans: list[Plan] = []
    rounds = []
    first = _first_round(model, batch, method, micro_batch, seed, progress, activations, importance, cache)
    source = first.source
    for k in range(method.rounds):
        graph = first.graph if k == 0 else trace(model, seed=seed)
        goal = target * dense_decoder * (k + 1) / method.rounds - (dense_decoder - graph.decoder_params)
        share = goal / graph.decoder_params
        if share <= 0:  # an earlier round already removed this round's share (coarse units)
            continue
        if k == 0:
            scores, layer_scores, acts = first.scores, first.layer_scores, first.activations
            first = None  # later rounds score the partly pruned model; the cache (if any) keeps the dense one
        else:
            scores, layer_scores, acts = _score(model, graph, batch, method, seed + k, micro_batch, progress)
        last = k == method.rounds - 1  # only the final share must be met within 1 point
        plan = plan_pruning(graph, scores, target=min(share, 1 - 1e-9), layer_scores=layer_scores,
                            tolerance=TOLERANCE if last else None, mode=method.mode, allocation=method.allocation,
                            normalize=method.normalize, layer_range=_layer_range(method, graph, kept_layers, dense_layers),
                            attention=method.attention, round_to=method.round_to)
        apply(plan, model, graph, compensation=method.compensation, activations=acts, damping=method.damping)
        dropped = [kept_layers[j] for j in plan.drop_layers]  # in the dense model's layer numbers
        kept_layers = [i for i in kept_layers if i not in dropped]
        plans.append(plan)
        rounds.append({"round": k + 1, "target_of_dense": target * (k + 1) / method.rounds,
                       "share_of_current": share, "dropped_dense_layers": dropped, "plan": plan.to_dict()})
        del acts
    share_decoder = 1 - decoder_parameters(model) / dense_decoder
    if method.mode != "layer" and abs(share_decoder - target) > TOLERANCE:
        raise ValueError(f"{method.rounds} rounds removed {share_decoder:.2%} of the decoder, not {target:.1%} "
                         "within 1 percentage point; use fewer rounds or finer units (round_to=1)")
    record = {"method": method.to_dict(), "target": float(target), "share_decoder": share_decoder,
              "share_model": 1 - count_parameters(model) / dense_total, "seed": seed,
              "calibration": {"n_samples": int(batch.shape[0]), "seq_len": int(batch.shape[1])},
              "first_round_scores": source, "rounds": rounds}
    return Pruned(model=model, plans=tuple(plans), share_decoder=share_decoder,
                  share_model=record["share_model"], record=record)


def _named(method: Method | str) -> Method:
    if isinstance(method, str):
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; the named methods are {list(METHODS)} "
                             "(or pass a Method(...))")
        return METHODS[method]
    return method


def _block_kinds(method: Method) -> tuple[str, ...]:
    """The group set kinds the method scores and prunes."""
    if method.mode == "channel":
        return ("hidden",)
    return ("attention" if method.attention == "kv" else "qheads", "mlp")


def _first_round(model: torch.nn.Module, batch: torch.Tensor, method: Method, micro_batch: int, seed: int,
                 progress: bool, activations: Activations | None, importance: Importance | None,
                 cache: PruningCache | None) -> FirstRound:
    """The dense model's graph, scores and statistics for ``method``: from the cache, from ``importance``, or
    computed; then completed with what compensation needs (and put in the cache)."""
    scoring = dataclasses.replace(method, rounds=1, compensation="none", damping=0.0)
    checked = cache is not None or importance is not None  # a pass over the weights, only where it is compared
    weights, batch_id = (weights_fingerprint(model) if checked else ""), batch_sha256(batch)
    first = cache.get(scoring, weights, batch_id) if cache is not None else None
    if first is None:
        graph = trace(model, seed=seed)
        saved = importance is not None and (method.estimator, method.reduction) in {k[:2] for k in importance}
        if saved:
            _check_fits(importance, weights, batch_id)
            first = FirstRound(scoring, weights, batch_id, graph, importance.select(method.estimator, method.reduction),
                               activations=activations, source="importance")
        else:
            scores, layer_scores, acts = _score(model, graph, batch, method, seed, micro_batch, progress, activations)
            first = FirstRound(scoring, weights, batch_id, graph, scores, layer_scores, acts)
    acts = first.activations
    refit = method.compensation == "refit"
    if method.compensation != "none" and (acts is None or (refit and acts.settings.get("full") is not True)):
        acts = activation_statistics(model, first.graph, batch, kinds=_block_kinds(method),
                                     full=True if refit else None, micro_batch=micro_batch, progress=progress)
        first = dataclasses.replace(first, activations=acts)  # the means (and moments) compensation reads
    if cache is not None:
        cache.put(first)
    return first


def _check_fits(importance: Importance, weights: str, batch_id: str) -> None:
    """Refuse saved scores of other calibration windows or of other weights than the model being pruned."""
    if importance.settings.get("batch_sha256") != batch_id:
        raise ValueError("the importance scores were computed on other calibration windows than this batch: "
                         "prune on the windows notebook 02 saved (calibration.safetensors), or rerun notebook 02")
    if importance.settings.get("weights", weights) != weights:
        raise ValueError("the importance scores were computed on other weights than this model's (another model, "
                         "dtype or seed): rerun notebook 02 on the dense model that is pruned here")


def _score(model: torch.nn.Module, graph: Graph, batch: torch.Tensor, method: Method, seed: int, micro_batch: int,
           progress: bool, activations: Activations | None = None
           ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, Activations | None]:
    """(unit scores, layer scores, readers' statistics) of the model as it is now, scored the way ``method``
    scores. ``activations`` given are used instead of collecting them (they must fit the method)."""
    if method.estimator in LAYER_ESTIMATORS:
        return {}, block_influence(model, batch, micro_batch=micro_batch, progress=progress), None
    kinds = _block_kinds(method)
    acts = activations
    if acts is not None:
        if method.estimator == "fisher_fluctuation" and not acts.fisher:
            raise ValueError("the activations passed hold no output Fisher: fisher_fluctuation needs "
                             "activation_statistics(..., gradients=True)")
    elif method.estimator in READER_ESTIMATORS or method.compensation != "none":
        acts = activation_statistics(model, graph, batch, kinds=kinds,
                                     full=True if method.compensation == "refit" else None,
                                     gradients=method.estimator == "fisher_fluctuation",
                                     micro_batch=micro_batch, progress=progress)
    imp = compute_importance(model, graph, batch, estimators=(method.estimator,), reductions=(method.reduction,),
                             kinds=kinds, micro_batch=micro_batch, seed=seed, progress=progress,
                             activations=acts if method.estimator in READER_ESTIMATORS else None)
    return imp.select(method.estimator, method.reduction), None, acts


def summarize_curve(rows: Sequence[Mapping], dense_perplexity: float, floor: str = "random",
                    baseline: str = "param_first") -> dict:
    """Which method kept most at each share, and by how much: a verdict computed from a curve.

    ``rows``: one mapping per (method, share) with ``method``, ``target`` and ``perplexity`` (as
    ``bench_pruning.py`` and notebook 03 make them; rows without a perplexity are skipped). Returns, per
    share, the best method (lowest perplexity, ``floor`` excluded) with its perplexity, × dense, × better
    than ``floor`` and than ``baseline`` (LLM-Pruner's estimator), plus ``sentence``: the same in words.
    """
    shares = sorted({float(r["target"]) for r in rows if r.get("perplexity") is not None})
    out: dict = {"shares": {}}
    words = []
    for t in shares:
        at = {r["method"]: float(r["perplexity"]) for r in rows
              if float(r["target"]) == t and r.get("perplexity") is not None}
        candidates = {m: v for m, v in at.items() if m != floor}
        if not candidates:
            continue
        best = min(candidates, key=candidates.get)
        ppl = candidates[best]
        entry = {"best": best, "perplexity": ppl, "x_dense": ppl / dense_perplexity,
                 "x_better_than_floor": at[floor] / ppl if floor in at else None,
                 "x_better_than_baseline": at[baseline] / ppl if baseline in at else None}
        out["shares"][t] = entry
        text = f"at {t:.0%} of the decoder, {best} keeps perplexity at {ppl:.1f} ({entry['x_dense']:.2f}× dense"
        if entry["x_better_than_floor"] is not None:
            text += f", {entry['x_better_than_floor']:.1f}× lower than {floor} ({at[floor]:.1f})"
        if entry["x_better_than_baseline"] is not None and best != baseline:
            text += f", {entry['x_better_than_baseline']:.1f}× lower than {baseline} ({at[baseline]:.1f})"
        words.append(text + ")")
    out["sentence"] = ("; ".join(words) + ".") if words else "no perplexities to compare."
    out["sentence"] = out["sentence"][0].upper() + out["sentence"][1:]
    return out


__all__ = ["LAYER_ESTIMATORS", "METHODS", "FirstRound", "Method", "Pruned", "PruningCache", "prune_model",
           "summarize_curve"]
