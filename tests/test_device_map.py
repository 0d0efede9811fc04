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
