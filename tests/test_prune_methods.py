"""The pruning methods of issue 13 on the tiny models: shares, reloads, compensation, determinism."""

from __future__ import annotations

import copy
import dataclasses
import json
import random

import pytest
import torch

from tailored.anatomy import decoder_layers, decoder_parameters
from tailored.checkpoint import load_pruned, save_pruned
from tailored.graph import trace
from tailored.importance import (
    Activations,
    activation_statistics,
    block_influence,
    calibration_batch,
    compute_importance,
    readers,
)
from tailored.methods import LADDER, changes, ladder
from tailored.models import load
from tailored.prune import apply, make_plan, plan_pruning
from tailored.recipes import METHODS, Method, PruningCache, prune_model, summarize_curve
from tailored.speed import FastDecoder

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = [f"Document {i}. " + "Structured pruning removes whole heads and channels, then LoRA recovers. " * 12
         for i in range(6)]
_DENSE: dict = {}


def dense(spec: str = "tiny"):
    """A fresh copy of a tiny model (weights made once per variant), its tokenizer and a calibration batch."""
    if spec not in _DENSE:
        model, tok = load(spec)
        _DENSE[spec] = (model, tok, calibration_batch(tok, TEXTS, n_samples=4, seq_len=48))
    model, tok, batch = _DENSE[spec]
    return copy.deepcopy(model), tok, batch


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def target_for(method: Method) -> float:
    """The tiny models have 4 layers; LLM-Pruner's range keeps 2 of them whole, so 50% is out of its reach."""
    return 0.25 if method.layer_range is None else 0.5


# -------------------------------------------------------------------------------------- shares
@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_removes_its_share_within_one_point(name):
    model, _, batch = dense("tiny")
    before = decoder_parameters(model)
    method = METHODS[name]
    width = model.config.intermediate_size
    if method.round_to >= width:  # fisher_bias_round128 on a 128-wide MLP: the same method at the tiny model's scale
        method = dataclasses.replace(method, round_to=width // 4)
    target = target_for(method)
    pruned = prune_model(model, batch, target, method, progress=False)
    assert all(layer.mlp.gate_proj.out_features % method.round_to == 0 for layer in decoder_layers(pruned.model))
    assert abs(pruned.share_decoder - target) <= 0.01
    assert pruned.share_decoder == pytest.approx(1 - decoder_parameters(pruned.model) / before)
    assert len(pruned.record["rounds"]) == len(pruned.plans) <= METHODS[name].rounds
    assert torch.isfinite(logits(pruned.model, batch[:1])).all()


def test_rounds_reach_the_share_step_by_step_and_record_each_round():
    model, _, batch = dense("tiny-qwen2")
    pruned = prune_model(model, batch, 0.5, Method(estimator="param_first", layer_range="all", rounds=4),
                         progress=False)
    steps = [r["target_of_dense"] for r in pruned.record["rounds"]]
    assert steps == pytest.approx([0.125, 0.25, 0.375, 0.5])
    assert abs(pruned.share_decoder - 0.5) <= 0.01


# ------------------------------------------------------------------------------------- reloads
@pytest.mark.parametrize("spec,name", [("tiny", "flap"), ("tiny-qwen2", "fisher_refit"),
                                       ("tiny-qwen2", "fisher_refit_4_rounds"), ("tiny", "depth_block_influence"),
                                       ("tiny-qwen2", "param_first_4_rounds")])
def test_pruned_model_reloads_with_identical_logits(tmp_path, spec, name):
    model, tok, batch = dense(spec)
    pruned = prune_model(model, batch, target_for(METHODS[name]), name, progress=False)
    out = save_pruned(pruned.model, tok, tmp_path / name, pruned.record)
    reloaded, _ = load_pruned(out)
    assert torch.equal(logits(reloaded, batch), logits(pruned.model, batch))
    meta = json.loads((out / "pruning.json").read_text())
    assert meta["record"]["method"] == METHODS[name].to_dict()
    if METHODS[name].compensation != "none":
        assert meta["added_biases"] and all(n.endswith(("o_proj.bias", "down_proj.bias")) for n in meta["added_biases"])
        assert all(reloaded.get_parameter(n).shape == pruned.model.get_parameter(n).shape for n in meta["added_biases"])
    else:
        assert meta["added_biases"] == []


def test_qwen2_keeps_its_own_qkv_biases_and_they_are_not_listed_as_added(tmp_path):
    model, tok, batch = dense("tiny-qwen2")
    pruned = prune_model(model, batch, 0.5, "flap", progress=False)
    out = save_pruned(pruned.model, tok, tmp_path / "q", pruned.record)
    added = json.loads((out / "pruning.json").read_text())["added_biases"]
    assert not any("q_proj" in n or "k_proj" in n or "v_proj" in n for n in added)
    assert decoder_layers(load_pruned(out)[0])[1].self_attn.q_proj.bias is not None


def test_fast_decoder_uses_the_added_biases():
    model, _, batch = dense("tiny")
    pruned = prune_model(model, batch, 0.5, "fisher_refit", progress=False).model
    prompt = batch[:1, :12]
    hf = pruned.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(FastDecoder(pruned, max_len=64).generate(prompt, 6), hf)


# -------------------------------------------------------------------------------- compensation
def _reader_error(dense_model, pruned_model, batch, kept: dict[str, list[int]]) -> dict[str, float]:
    """Per reader: mean squared difference of its output, dense vs pruned, on the *same* (dense) inputs."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [dense_model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, a[0]))
             for n in kept]
    with torch.no_grad():
        dense_model(input_ids=batch)
        for h in hooks:
            h.remove()
        return {n: float((dense_model.get_submodule(n)(x) - pruned_model.get_submodule(n)(x[..., kept[n]]))
                         .square().mean()) for n, x in seen.items()}


@pytest.mark.parametrize("spec", ["tiny", "tiny-qwen2"])
def test_bias_compensation_lowers_the_output_error_on_the_calibration_set_and_refit_lowers_it_more(spec):
    base, _, batch = dense(spec)
    graph = trace(base)
    acts = activation_statistics(base, graph, batch, full=True, progress=False)
    scores = compute_importance(base, graph, batch, estimators=("param_first",), progress=False).select("param_first")
    plan = plan_pruning(graph, scores, target=0.4, layer_range=(0, 4))
    kept = {mod: [i for u in units for i in graph.by_name(name).members[mi].index[u]]  # reader -> kept columns
            for name, units in plan.keep.items() for mi, mod in readers(base, graph.by_name(name))}
    errors, final = {}, {}
    for how in ("none", "bias", "refit"):
        model = copy.deepcopy(base)
        apply(plan, model, graph, compensation=how, activations=acts, damping=0.0)
        errors[how] = _reader_error(base, model, batch, kept)
        final[how] = float((logits(model, batch) - logits(base, batch)).square().mean())
    for n in errors["none"]:
        assert errors["bias"][n] < errors["none"][n]
        assert errors["refit"][n] <= errors["bias"][n] * (1 + 1e-6)
    assert final["refit"] < final["bias"] < final["none"]


def test_refit_without_damping_is_the_least_squares_solution_on_the_calibration_inputs():
    base, _, batch = dense("tiny")
    graph = trace(base)
    acts = activation_statistics(base, graph, batch, full=True, progress=False)
    mlp = graph.by_name("layers.2.mlp")
    keep = list(range(0, mlp.units, 2))
    x = []
    h = base.model.layers[2].mlp.down_proj.register_forward_hook(lambda m, a, o: x.append(a[0].detach()))
    with torch.no_grad():
        base(input_ids=batch)
    h.remove()
    x = x[0].reshape(-1, x[0].shape[-1]).double()  # (tokens, 128)
    w = base.model.layers[2].mlp.down_proj.weight.detach().double()
    z = torch.cat([x[:, keep], torch.ones(len(x), 1, dtype=torch.float64)], 1)  # (tokens, kept + 1)
    solution = torch.linalg.lstsq(z, x @ w.T).solution  # (kept + 1, out)
    model = copy.deepcopy(base)
    apply(make_plan(graph, {mlp.name: keep}), model, graph, compensation="refit", activations=acts, damping=0.0)
    down = model.model.layers[2].mlp.down_proj
    torch.testing.assert_close(down.weight.double(), solution[:-1].T, atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(down.bias.double(), solution[-1], atol=2e-4, rtol=1e-3)


def test_compensation_needs_statistics_and_refuses_what_it_cannot_do():
    model, _, batch = dense("tiny")
    graph = trace(model)
    mlp = graph.by_name("layers.1.mlp")
    plan = make_plan(graph, {mlp.name: range(64)})
    with pytest.raises(ValueError, match="needs the calibration statistics"):
        apply(plan, model, graph, compensation="bias")
    diag = activation_statistics(model, graph, batch, progress=False)
    with pytest.raises(ValueError, match="full second moments"):
        apply(plan, copy.deepcopy(model), graph, compensation="refit", activations=diag)
    with pytest.raises(ValueError, match="block-wise"):
        apply(make_plan(graph, {}, drop_layers=[1]), model, graph, compensation="bias", activations=diag)
    with pytest.raises(ValueError, match="compensation"):
        Method(mode="layer", estimator="block_influence", compensation="bias")


# --------------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("name", ["random", "fisher_refit_4_rounds", "depth_block_influence"])
def test_a_seeded_rerun_gives_the_same_pruned_weights(name):
    runs = []
    for _ in range(2):
        model, _, batch = dense("tiny-qwen2")
        runs.append(prune_model(model, batch, target_for(METHODS[name]), name, seed=3, progress=False).model)
    a, b = runs[0].state_dict(), runs[1].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------- depth
def test_depth_pruning_removes_the_layer_that_changes_the_residual_stream_least(tmp_path):
    model, tok, batch = dense("tiny")
    with torch.no_grad():  # layer 2 adds (almost) nothing to the residual stream
        model.model.layers[2].self_attn.o_proj.weight.mul_(1e-4)
        model.model.layers[2].mlp.down_proj.weight.mul_(1e-4)
    bi = block_influence(model, batch, progress=False)
    assert bi.shape == (4,) and int(bi.argmin()) == 2 and float(bi[2]) < 1e-3
    pruned = prune_model(model, batch, 0.25, "depth_block_influence", progress=False)
    assert pruned.plans[0].drop_layers == (2,) and pruned.record["rounds"][0]["dropped_dense_layers"] == [2]
    assert len(decoder_layers(pruned.model)) == 3 and pruned.model.config.num_hidden_layers == 3
    reloaded, _ = load_pruned(save_pruned(pruned.model, tok, tmp_path / "d", pruned.record))
    assert torch.equal(logits(reloaded, batch), logits(pruned.model, batch))


def test_depth_pruning_one_layer_per_round_keeps_dense_layer_numbers_in_the_record():
    model, _, batch = dense("tiny")
    pruned = prune_model(model, batch, 0.5, Method(estimator="block_influence", mode="layer", layer_range="all",
                                                   rounds=2), progress=False)
    dropped = [i for r in pruned.record["rounds"] for i in r["dropped_dense_layers"]]
    assert len(dropped) == len(set(dropped)) == 2 and len(decoder_layers(pruned.model)) == 2


# ---------------------------------------------------------------------------- the estimators
def test_reader_statistics_and_fisher_fluctuation_match_a_direct_computation():
    model, _, batch = dense("tiny")
    graph = trace(model)
    acts = activation_statistics(model, graph, batch, gradients=True, micro_batch=2, progress=False)
    att = graph.by_name("layers.1.attention")
    o = model.model.layers[1].self_attn.o_proj
    xs, gs = [], []

    def hook(_m, a, out):
        xs.append(a[0].detach())
        out.register_hook(lambda g: gs.append(g.detach()))
    h = o.register_forward_hook(hook)
    for ids in batch:  # one sample at a time, gradient of the *summed* token loss
        emb = model.get_input_embeddings()(ids[None]).detach().requires_grad_(True)
        loss = model(inputs_embeds=emb, labels=ids[None]).loss * (len(ids) - 1)
        loss.backward()
    h.remove()
    model.zero_grad(set_to_none=True)
    x = torch.cat(xs).reshape(-1, o.in_features).double()  # (tokens, in)
    g = torch.cat(gs).reshape(-1, o.out_features).double()  # (tokens, out)
    name = "model.layers.1.self_attn.o_proj"
    torch.testing.assert_close(acts.mean[name].double(), x.mean(0), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(acts.fisher[name].double(), g.square().mean(0), atol=1e-6, rtol=1e-3)
    imp = compute_importance(model, graph, batch, estimators=("fisher_fluctuation", "fluctuation"),
                             kinds=("attention",), activations=acts, progress=False)
    w, f = o.weight.detach().double(), g.square().mean(0)
    cols = att.member("o_proj.weight").index
    for u, ix in enumerate(cols):  # the readable version: ½ Σ_h F_h Var_t(W_h,S x_t,S); Σ_j Var(x_j) ‖W_:,j‖²
        y = x[:, list(ix)] @ w[:, list(ix)].T  # (tokens, out): the unit's contribution to the output
        expected = 0.5 * (f * y.var(0, unbiased=False)).sum()
        assert float(imp.score("fisher_fluctuation", att.name)[u]) == pytest.approx(float(expected), rel=1e-3)
        flap = (x[:, list(ix)].var(0, unbiased=False) * w[:, list(ix)].square().sum(0)).sum()
        assert float(imp.score("fluctuation", att.name)[u]) == pytest.approx(float(flap), rel=1e-3)


def test_activations_save_and_load(tmp_path):
    model, _, batch = dense("tiny")
    acts = activation_statistics(model, trace(model), batch, gradients=True, progress=False)
    back = Activations.load(acts.save(tmp_path / "activations.safetensors"))
    assert back.tokens == acts.tokens and back.settings == acts.settings
    for part in ("mean", "second", "fisher"):
        assert getattr(back, part).keys() == getattr(acts, part).keys()
        assert all(torch.equal(getattr(back, part)[k], getattr(acts, part)[k]) for k in getattr(acts, part))


def test_calibration_windows_from_one_document_never_overlap_and_are_seeded():
    _, tok, _ = dense("tiny")
    rng = random.Random(0)
    text = "".join(rng.choice("abcdefghij ") for _ in range(1000))  # no 100-byte piece occurs twice
    a = calibration_batch(tok, [text], n_samples=5, seq_len=100, per_text=5, seed=1)
    assert torch.equal(a, calibration_batch(tok, [text], n_samples=5, seq_len=100, per_text=5, seed=1))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    starts = sorted(next(s for s in range(len(ids)) if ids[s:s + 100] == row.tolist()) for row in a)
    assert all(b - s >= 100 for s, b in zip(starts, starts[1:]))
    with pytest.raises(ValueError, match="per_text"):
        calibration_batch(tok, [text], n_samples=20, seq_len=100, per_text=5)


def test_cost_normalization_compares_scores_per_parameter():
    model, _, _ = dense("tiny")
    graph = trace(model)
    # every unit scores exactly its own parameter count: per parameter they are all alike (a head scores
    # far more than a channel), except layer 2's MLP channels, cheaper per parameter: they go first
    scores = {g.name: torch.tensor(g.params_per_unit, dtype=torch.float32) for g in graph.groups}
    scores["layers.2.mlp"] = scores["layers.2.mlp"] * torch.linspace(0.1, 0.9, 128)
    plan = plan_pruning(graph, scores, target=0.1, allocation="global", normalize="cost", layer_range=(0, 4))
    assert set(plan.keep) == {"layers.2.mlp"}


def test_the_verdict_names_the_best_method_per_share_and_its_margins():
    rows = [{"method": "random", "target": 0.2, "perplexity": 100.0},
            {"method": "param_first", "target": 0.2, "perplexity": 80.0},
            {"method": "fisher_refit", "target": 0.2, "perplexity": 40.0},
            {"method": "depth_block_influence", "target": 0.2, "error": "out of reach"}]
    v = summarize_curve(rows, dense_perplexity=20.0)
    assert v["shares"][0.2] == {"best": "fisher_refit", "perplexity": 40.0, "x_dense": 2.0,
                                "x_better_than_floor": 2.5, "x_better_than_baseline": 2.0}
    assert v["sentence"].startswith("At 20% of the decoder, fisher_refit keeps perplexity at 40.0 (2.00× dense")


def test_a_curve_cache_gives_the_same_weights_as_pruning_from_scratch(one_thread):
    """Shares of one method reuse the dense model's first-round statistics and scores: the same result."""
    model, _ = load("tiny")
    batch = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    cache = PruningCache()
    for method in ("fisher_refit", "param_first", "flap"):
        for share in (0.2, 0.4):
            cached = prune_model(copy.deepcopy(model), batch, share, method, progress=False, cache=cache)
            fresh = prune_model(copy.deepcopy(model), batch, share, method, progress=False)
            a, b = cached.model.state_dict(), fresh.model.state_dict()
            assert a.keys() == b.keys()
            for k in a:
                torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert len(cache) == 3


def test_a_cache_entry_of_other_weights_or_windows_is_not_used(one_thread):
    model, _ = load("tiny")
    batch = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    cache = PruningCache()
    prune_model(copy.deepcopy(model), batch, 0.2, "param_first", progress=False, cache=cache)
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.parameters()).mul_(2.0)
    again = prune_model(copy.deepcopy(other), batch, 0.2, "param_first", progress=False, cache=cache)
    fresh = prune_model(copy.deepcopy(other), batch, 0.2, "param_first", progress=False)
    assert all(torch.equal(a, b) for a, b in zip(again.model.state_dict().values(), fresh.model.state_dict().values()))


# The estimators notebook 02 computes by default: every group set kind, every reduction, in one call.
NOTEBOOK_02 = ["param_first", "param_second", "param_mix", "vectorize", "l1", "l2", "activation", "random", "flap",
               "fisher_fluctuation"]


@pytest.mark.parametrize("name", ["fisher_refit", "flap", "random", "param_first", "fisher_bias_local",
                                  "param_first_4_rounds"])
def test_pruning_from_notebook_02s_scores_gives_the_weights_scoring_again_gives(name):
    """03 plans from 02's importance.safetensors: bit for bit what scoring the units again in 03 made."""
    model, _, batch = dense("tiny")
    saved = compute_importance(model, trace(model), batch, estimators=NOTEBOOK_02, reductions=("sum", "mean"),
                               progress=False)
    target = target_for(METHODS[name])
    planned = prune_model(copy.deepcopy(model), batch, target, name, importance=saved, progress=False)
    scored = prune_model(copy.deepcopy(model), batch, target, name, progress=False)
    assert planned.record["first_round_scores"] == "importance" and scored.record["first_round_scores"] == "computed"
    a, b = planned.model.state_dict(), scored.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_saved_scores_of_other_windows_or_weights_are_refused():
    model, _, batch = dense("tiny")
    saved = compute_importance(model, trace(model), batch, estimators=["param_first"], progress=False)
    with pytest.raises(ValueError, match="other calibration windows"):
        prune_model(copy.deepcopy(model), batch[:2], 0.25, "param_first", importance=saved, progress=False)
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.parameters()).mul_(2.0)
    with pytest.raises(ValueError, match="other weights"):
        prune_model(other, batch, 0.25, "param_first", importance=saved, progress=False)


def test_the_ladder_changes_one_group_of_fields_at_a_time_and_says_which():
    rows = ladder(["random", *LADDER])
    assert all(r["one change"] for r in rows)
    assert [r["changed"] for r in rows[1:]] == ["estimator", "estimator", "compensation", "allocation", "compensation"]
    assert changes(METHODS["fisher_bias"], METHODS["fisher_refit"]) == {"compensation": "compensation bias → refit"}
    assert changes(METHODS["fisher_local"], METHODS["fisher_local"]) == {}
    jump = ladder(["param_first", "fisher_refit"])[1]  # the study's curve today: three choices in one step
    assert not jump["one change"] and jump["changed"] == "estimator, allocation, compensation"
