"""A model directory spread over two devices with accelerate's dispatch (``load(device_map=…)``), on a CPU:
the layers split between the CPU and the disk give the same logits and the same scores as one device."""

from __future__ import annotations

import pytest
import torch

from tailored.evaluate import loglikelihood
from tailored.models import build_tiny, load

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_a_model_split_over_cpu_and_disk_scores_like_one_on_a_single_device(tmp_path):
    model, tok = build_tiny("tiny", seed=0)
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    split = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
             "model.layers.1": "cpu", "model.layers.2": "disk", "model.layers.3": "disk", "model.norm": "cpu",
             "lm_head": "cpu"}
    whole, _ = load(str(tmp_path / "tiny"))
    spread, _ = load(str(tmp_path / "tiny"), device_map=split)
    assert spread.hf_device_map == split
    assert {p.device.type for p in spread.model.layers[3].parameters()} == {"meta"}  # read from disk when run
    ids = tok(["spread over two devices"], return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(whole(ids).logits, spread(ids).logits)
    requests = [("Is a plum a fruit?\nAnswer:", " yes"), ("Is a plum a fruit?\nAnswer:", " no")]
    assert loglikelihood(spread, tok, requests).tolist() == pytest.approx(loglikelihood(whole, tok, requests).tolist())


def test_device_map_is_refused_for_models_built_in_code():
    with pytest.raises(ValueError, match="device_map is for model directories"):
        load("tiny", device_map="auto")


def test_a_pruned_checkpoint_spreads_over_devices_and_scores_the_same(tmp_path):
    """Layers of different widths cannot go through from_pretrained: load_pruned builds, then dispatches."""
    from tailored.checkpoint import load_pruned, save_pruned
    from tailored.graph import trace
    from tailored.prune import apply, plan_pruning

    model, tok = build_tiny("tiny", seed=0)
    graph = trace(model)
    g = torch.Generator().manual_seed(0)
    plan = plan_pruning(graph, {gs.name: torch.rand(gs.units, generator=g) for gs in graph.groups}, target=0.3)
    apply(plan, model, graph)
    path = save_pruned(model, tok, tmp_path / "pruned", {"target": 0.3, "plan": plan.to_dict()})
    split = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
             "model.layers.1": "disk", "model.layers.2": "cpu", "model.layers.3": "disk", "model.norm": "cpu",
             "lm_head": "cpu"}
    whole, _ = load_pruned(path)
    spread, _ = load(str(path), device_map=split)  # through models.load, as notebooks 02 and 05 call it
    assert spread.hf_device_map == split
    assert {p.device.type for p in spread.model.layers[1].parameters()} == {"meta"}  # read from disk when run
    widths = [layer.mlp.up_proj.out_features for layer in spread.model.layers]
    assert len(set(widths)) > 1  # really pruned unevenly
    ids = tok(["spread over two devices"], return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(whole(ids).logits, spread(ids).logits)
    auto, _ = load_pruned(path, device_map="auto")  # accelerate's placement: here, one CPU holds it all
    with torch.no_grad():
        torch.testing.assert_close(whole(ids).logits, auto(ids).logits)
