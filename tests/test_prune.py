"""Planning and applying structured pruning on the tiny models (GQA 4/2 heads, 4 layers, hidden 64, MLP 128)."""

from __future__ import annotations

import pytest
import torch

from tailored.anatomy import count_parameters, decoder_parameters
from tailored.graph import trace
from tailored.models import load
from tailored.prune import Plan, apply, default_layer_range, make_plan, plan_pruning

_GRAPHS: dict = {}


pytestmark = pytest.mark.usefixtures("one_thread")


def dense(spec: str = "tiny"):
    """A fresh dense tiny model, its tokenizer and its graph (traced once per variant)."""
    model, tok = load(spec)
    if spec not in _GRAPHS:
        _GRAPHS[spec] = trace(model)
    return model, tok, _GRAPHS[spec]


def random_scores(graph, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {gs.name: torch.rand(gs.units, generator=g) for gs in graph.groups}


def logits(model, ids, mask=None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def ids_of(tok, texts=("The cat sat on the mat.",)):
    batch = tok(list(texts), return_tensors="pt", padding=True)
    return batch.input_ids, batch.attention_mask


def zero_columns(model, param: str, cols) -> None:
    with torch.no_grad():
        dict(model.named_parameters())[param][:, list(cols)] = 0


# ------------------------------------------------------------------------------------ exactness
def test_removing_nothing_leaves_logits_identical():
    model, tok, graph = dense()
    ids, _ = ids_of(tok)
    before = logits(model, ids)
    keep_all = {g.name: range(g.units) for g in graph.groups if g.kind in ("attention", "mlp")}
    plan = make_plan(graph, keep_all)
    assert plan.share_decoder == 0
    apply(plan, model, graph)
    assert torch.equal(logits(model, ids), before)


@pytest.mark.parametrize("spec", ["tiny", "tiny-qwen2"])
def test_removing_mlp_channels_equals_zeroing_their_down_proj_columns(spec):
    model, tok, graph = dense(spec)
    ids, _ = ids_of(tok)
    mlp = graph.by_name("layers.2.mlp")
    gone = [3, 17, 64, 127]
    reference, _, _ = dense(spec)
    down = mlp.member("down_proj.weight")
    zero_columns(reference, down.param, [i for u in gone for i in down.index[u]])
    apply(make_plan(graph, {mlp.name: [u for u in range(mlp.units) if u not in gone]}), model, graph)
    assert model.model.layers[2].mlp.down_proj.in_features == 124
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spec", ["tiny", "tiny-mha", "tiny-qwen2"])
def test_removing_a_kv_unit_equals_zeroing_its_o_proj_columns(spec):
    model, tok, graph = dense(spec)
    ids, _ = ids_of(tok)
    att = graph.by_name("layers.1.attention")
    reference, _, _ = dense(spec)
    o = att.member("o_proj.weight")
    zero_columns(reference, o.param, o.index[0])
    apply(make_plan(graph, {att.name: range(1, att.units)}), model, graph)
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), atol=1e-5, rtol=1e-5)


def test_kv_units_take_their_query_heads_along():
    model, _, graph = dense()
    apply(make_plan(graph, {"layers.1.attention": [1]}), model, graph)
    attn = model.model.layers[1].self_attn
    assert attn.k_proj.out_features == attn.v_proj.out_features == 16  # 1 kv head
    assert attn.q_proj.out_features == attn.o_proj.in_features == 32  # its 2 query heads
    assert attn.num_key_value_groups == 2


def test_removing_query_heads_evenly_keeps_gqa_consistent():
    model, tok, graph = dense()
    ids, _ = ids_of(tok)
    qh = graph.by_name("layers.2.qheads")
    assert qh.parent == (0, 0, 1, 1)
    keep = [1, 2]  # one query head from each kv group
    reference, _, _ = dense()
    o = qh.member("o_proj.weight")
    zero_columns(reference, o.param, [i for u in (0, 3) for i in o.index[u]])
    apply(make_plan(graph, {qh.name: keep}), model, graph)
    attn = model.model.layers[2].self_attn
    assert attn.num_key_value_groups == 1 and attn.k_proj.out_features == 32
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), atol=1e-5, rtol=1e-5)


def test_uneven_query_heads_per_kv_group_are_refused():
    _, _, graph = dense()
    with pytest.raises(ValueError, match="same number"):
        make_plan(graph, {"layers.2.qheads": [0, 1, 2]})


@pytest.mark.parametrize("mode, attention", [("block", "kv"), ("block", "qheads"), ("channel", "kv"),
                                             ("layer", "kv")])
def test_eager_and_sdpa_agree_after_pruning(mode, attention):
    model, tok, graph = dense()
    plan = plan_pruning(graph, random_scores(graph), target=0.2, mode=mode, attention=attention)
    apply(plan, model, graph)
    ids, mask = ids_of(tok, ["A short one.", "A somewhat longer sentence here."])  # left padding
    model.set_attn_implementation("eager")
    eager = logits(model, ids, mask)
    model.set_attn_implementation("sdpa")
    real = mask.bool()  # padded positions attend to nothing; the two kernels fill them differently
    torch.testing.assert_close(logits(model, ids, mask)[real], eager[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode, attention", [("block", "kv"), ("block", "qheads"), ("layer", "kv")])
def test_generate_with_cache_matches_without_cache(mode, attention):
    model, tok, graph = dense("tiny-qwen2" if mode == "layer" else "tiny")
    apply(plan_pruning(graph, random_scores(graph), target=0.2, mode=mode, attention=attention), model, graph)
    ids, mask = ids_of(tok, ["Once upon a"])
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    cached = model.generate(ids, use_cache=True, **kw)
    uncached = model.generate(ids, use_cache=False, **kw)
    assert cached.shape[1] == ids.shape[1] + 8
    assert torch.equal(cached, uncached)


# ------------------------------------------------------------------------------------------ targets
@pytest.mark.parametrize("target", [0.2, 0.5])
@pytest.mark.parametrize("allocation", ["local", "global"])
@pytest.mark.parametrize("attention", ["kv", "qheads"])
def test_block_target_is_met_within_one_point(target, allocation, attention):
    model, _, graph = dense()
    # the default range (layers 1-2 of 4) cannot lose half the decoder; take all layers for 0.5
    layer_range = (0, 4) if target == 0.5 else None
    plan = plan_pruning(graph, random_scores(graph), target=target, allocation=allocation,
                        attention=attention, layer_range=layer_range)
    assert abs(plan.share_decoder - target) <= 0.01
    dec_before, total_before = decoder_parameters(model), count_parameters(model)
    apply(plan, model, graph)
    assert decoder_parameters(model) == plan.decoder_params_after
    assert count_parameters(model) == plan.params_after
    assert 1 - decoder_parameters(model) / dec_before == pytest.approx(plan.share_decoder)
    assert 1 - count_parameters(model) / total_before == pytest.approx(plan.share_model)
    assert plan.share_model < plan.share_decoder  # embeddings are never pruned block-wise


def test_target_can_be_a_share_of_the_whole_model():
    _, _, graph = dense()
    plan = plan_pruning(graph, random_scores(graph), target=0.2, denominator="model", layer_range=(0, 4))
    assert abs(plan.share_model - 0.2) <= 0.01


def test_llm_pruner_ratio_is_larger_than_the_share_removed():
    _, _, graph = dense()
    plan = plan_pruning(graph, random_scores(graph), target=0.2)
    # only layers 1-2 of 4 are pruned, so each loses about twice the overall share
    assert plan.llm_pruner_ratio == pytest.approx(0.4, abs=0.02)
    assert plan.settings["layer_range"] == (1, 3)
    assert all(w["q_heads"] == 4 and w["mlp"] == 128 for w in plan.widths if w["layer"] in (0, 3))


def test_default_layer_range_scales_llm_pruner_4_to_30_of_32():
    assert default_layer_range(32) == (4, 30)
    assert default_layer_range(30) == (4, 28)  # SmolLM2-135M
    assert default_layer_range(4) == (1, 3)  # first and last always kept


def test_global_allocation_prunes_the_unimportant_layer_harder():
    _, _, graph = dense()
    scores = random_scores(graph)
    scores["layers.2.mlp"] = scores["layers.2.mlp"] * 0.1
    widths = {w["layer"]: w for w in plan_pruning(graph, scores, target=0.2, allocation="global").widths}
    assert widths[2]["mlp"] < widths[1]["mlp"]
    local = {w["layer"]: w for w in plan_pruning(graph, scores, target=0.2, allocation="local").widths}
    assert local[2]["mlp"] == local[1]["mlp"]


def test_pruning_keeps_the_highest_scored_units():
    _, _, graph = dense()
    scores = random_scores(graph)
    plan = plan_pruning(graph, scores, target=0.2)
    for name, keep in plan.keep.items():
        gone = sorted(set(range(graph.by_name(name).units)) - set(keep))
        assert scores[name][list(keep)].min() >= scores[name][gone].max()


def test_round_to_makes_kept_widths_multiples():
    _, _, graph = dense()
    plan = plan_pruning(graph, random_scores(graph), target=0.2, round_to=8, allocation="global")
    assert all(w["mlp"] % 8 == 0 for w in plan.widths)
    assert abs(plan.share_decoder - 0.2) <= 0.01


def test_the_paper_profile_keeps_every_mlp_width_a_multiple_of_128_at_llama_shapes():
    """Kept widths are multiples of round_to (above), and a whole layer is kept at its own width: at LLaMA-7B and
    LLaMA-3-8B shape that is a multiple of 128 too, so every width the paper profile saves is one."""
    import yaml

    from tailored.methods import METHODS
    from tailored.models import RANDOM_SHAPES
    from tailored.runner import PARAMS_DIR

    paper = yaml.safe_load((PARAMS_DIR / "paper.yaml").read_text())
    method = METHODS[paper["steps"]["03_prune"]["method"]]
    assert method.round_to == 128 and method.mode == "block"
    for shape in ("llama-7b", "llama-2-7b", "llama-3-8b"):
        assert RANDOM_SHAPES[shape]["intermediate_size"] % method.round_to == 0, shape
        head_dim = RANDOM_SHAPES[shape]["hidden_size"] // RANDOM_SHAPES[shape]["num_attention_heads"]
        assert head_dim % method.round_to == 0, shape  # whole heads go: attention widths stay multiples


def test_channel_wise_prunes_the_hidden_dimension_and_keeps_tied_weights_tied():
    model, tok, graph = dense("tiny-tied")
    plan = plan_pruning(graph, random_scores(graph), target=0.25, mode="channel")
    apply(plan, model, graph)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.embed_tokens.weight.shape == (257, 48)
    assert model.model.norm.weight.shape == (48,)
    assert model.model.layers[0].self_attn.q_proj.in_features == 48
    assert abs(plan.share_decoder - 0.25) <= 0.01
    assert logits(model, ids_of(tok)[0]).shape[-1] == 257


def test_layer_wise_drops_the_least_important_layers():
    model, tok, graph = dense()
    scores = random_scores(graph)
    for kind in ("attention", "mlp"):
        scores[f"layers.1.{kind}"] = scores[f"layers.1.{kind}"] * 0.01
    plan = plan_pruning(graph, scores, target=0.25, mode="layer")
    assert plan.drop_layers == (1,)
    assert plan.share_decoder == 0.25
    apply(plan, model, graph)
    assert len(model.model.layers) == 3 == model.config.num_hidden_layers
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]


def test_plan_round_trips_through_json():
    import json

    _, _, graph = dense()
    plan = plan_pruning(graph, random_scores(graph), target=0.2, attention="qheads")
    again = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan
    assert "LLM-Pruner" in plan.describe()


# ----------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, message", [
    (dict(target=0.0), "outside \\(0, 1\\)"),
    (dict(target=1.0), "outside \\(0, 1\\)"),
    (dict(target=1.2), "share of parameters"),
    (dict(layer_range=(0, 9)), "outside the model"),
    (dict(layer_range=(3, 2)), "outside the model"),
    (dict(mode="unstructured"), "mode"),
    (dict(target=0.5), "out of reach"),  # layers 1-2 of 4 hold too few parameters
])
def test_bad_input_raises_before_anything_is_touched(kwargs, message):
    _, _, graph = dense()
    with pytest.raises(ValueError, match=message):
        plan_pruning(graph, random_scores(graph), **kwargs)


def test_missing_scores_are_named():
    _, _, graph = dense()
    scores = random_scores(graph)
    del scores["layers.2.mlp"]
    with pytest.raises(ValueError, match="layers.2.mlp"):
        plan_pruning(graph, scores, target=0.2)


def test_a_plan_removing_every_head_of_a_layer_is_refused_and_the_model_untouched():
    model, _, graph = dense()
    with pytest.raises(ValueError, match="every unit"):
        make_plan(graph, {"layers.1.attention": []})
    # a plan edited by hand (e.g. in its JSON) is checked again by apply, before any weight changes
    d = plan_pruning(graph, random_scores(graph), target=0.2).to_dict()
    d["keep"]["layers.1.attention"] = []
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="every unit"):
        apply(Plan.from_dict(d), model, graph)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_applying_a_plan_to_an_already_pruned_model_is_refused():
    model, _, graph = dense()
    plan = plan_pruning(graph, random_scores(graph), target=0.2, mode="channel")
    apply(plan, model, graph)
    with pytest.raises(ValueError, match="already pruned"):
        apply(plan, model, graph)


def test_the_kept_widths_title_says_which_layers_every_plan_left_whole():
    """The figure's title is read from the plans, not typed: a method that cuts the last layer says so."""
    from types import SimpleNamespace

    from tailored.figures.prune import _whole_layers

    dense = {"q_heads": 4, "mlp": 8}

    def plan(*mlp):
        return SimpleNamespace(widths=[{"layer": i, "q_heads": 4, "mlp": m} for i, m in enumerate(mlp)])

    assert _whole_layers({"a": plan(8, 8, 4, 8, 8)}, 5, dense) == "layers 0-1, 3-4"
    assert _whole_layers({"a": plan(8, 8, 4, 8, 8), "b": plan(8, 4, 4, 4, 8)}, 5, dense) == "layers 0, 4"
    assert _whole_layers({"a": plan(4, 8, 4, 4, 4)}, 5, dense) == "layer 1"
    assert _whole_layers({"a": plan(4, 4, 4, 4, 4)}, 5, dense) == "no layer"


def test_the_widths_beside_importance_figure_says_whether_the_plan_cut_where_the_scores_were_low(tmp_path):
    from tailored.figures import save_figure
    from tailored.figures.prune import cut_where_scores_low, widths_and_importance, widths_vs_importance
    from tailored.importance import compute_importance

    model, _, graph = dense()
    batch = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    imp = compute_importance(model, graph, batch, estimators=("param_first",), reductions=("sum",), progress=False)
    scores = imp.select("param_first", "sum")
    plans = {"global": plan_pruning(graph, scores, target=0.3, allocation="global", normalize="cost",
                                    layer_range=(0, graph.num_layers)),
             "local": plan_pruning(graph, scores, target=0.2, layer_range=(0, graph.num_layers))}
    cfg = model.config
    table = widths_and_importance(imp, graph, plans, {"kv_heads": cfg.num_key_value_heads,
                                                      "mlp": cfg.intermediate_size}, "param_first")
    assert len(table) == 2 * 2 * graph.num_layers and table["kept"].between(0, 1).all()
    mlp = table[(table["plan"] == "global") & (table["kind"] == "mlp")]
    kept = {w["layer"]: w["mlp"] / cfg.intermediate_size for w in plans["global"].widths}
    assert mlp.set_index("layer")["kept"].to_dict() == kept  # the plan's own widths, not recomputed
    said = cut_where_scores_low(table, "local")
    assert said["mlp"].startswith("MLP channels: every layer keeps")  # local allocation: one ratio for all layers
    rho = f"{spearman_of(mlp['relative'], mlp['kept']):+.2f}"
    assert f"Spearman ρ = {rho}" in cut_where_scores_low(table, "global")["mlp"]
    assert save_figure(widths_vs_importance(table, "param_first"), tmp_path, "w").stat().st_size > 1000


def spearman_of(a, b) -> float:
    from tailored.importance import spearman

    return spearman(torch.tensor(a.to_numpy()), torch.tensor(b.to_numpy()))
