"""Pruned checkpoints: safetensors + pruning.json, reloaded exactly, usable by generate and PEFT."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tailored import checkpoint
from tailored.checkpoint import load_pruned, save_pruned
from tailored.graph import trace
from tailored.models import load
from tailored.prune import apply, plan_pruning

PROMPT = "The quick brown fox"


pytestmark = pytest.mark.usefixtures("one_thread")


def pruned(spec: str = "tiny", mode: str = "block", attention: str = "kv", target: float = 0.2):
    model, tok = load(spec)
    graph = trace(model)
    g = torch.Generator().manual_seed(0)
    scores = {gs.name: torch.rand(gs.units, generator=g) for gs in graph.groups}
    plan = plan_pruning(graph, scores, target=target, mode=mode, attention=attention)
    apply(plan, model, graph)
    record = {"method": f"{mode}-wise", "estimator": "random", "target": target,
              "share": plan.share_decoder, "plan": plan.to_dict()}
    return model, tok, record


def logits(model, tok):
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One GQA model pruned block-wise (uneven heads and channels per layer), saved once."""
    model, tok, record = pruned("tiny", attention="qheads")
    path = save_pruned(model, tok, tmp_path_factory.mktemp("ckpt") / "pruned", record)
    return model, tok, path


@pytest.mark.parametrize("spec, mode", [("tiny", "block"), ("tiny-qwen2", "block"), ("tiny", "channel"),
                                        ("tiny-qwen2", "layer")])
def test_pruned_checkpoint_reloads_with_identical_logits(tmp_path, spec, mode):
    model, tok, record = pruned(spec, mode)
    save_pruned(model, tok, tmp_path / "ckpt", record)
    again, tok2 = load_pruned(tmp_path / "ckpt")
    assert torch.equal(logits(again, tok2), logits(model, tok))
    assert sum(p.numel() for p in again.parameters()) == sum(p.numel() for p in model.parameters())


def test_checkpoint_files_and_record(saved):
    model, _, path = saved
    names = {p.name for p in path.iterdir()}
    assert {"model.safetensors", "config.json", "pruning.json", "tokenizer.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in names)  # no pickle
    meta = json.loads((path / "pruning.json").read_text())
    layer1 = meta["layers"][1]
    attn = model.model.layers[1].self_attn
    assert layer1["q_proj"] == list(attn.q_proj.weight.shape)
    assert layer1["num_heads"] * layer1["head_dim"] == attn.q_proj.out_features
    assert layer1["num_kv_heads"] == 2 and layer1["hidden_size"] == 64
    assert meta["record"]["estimator"] == "random" and meta["record"]["plan"]["keep"]
    config = json.loads((path / "config.json").read_text())
    assert config["num_attention_heads"] == 4 and config["intermediate_size"] == 128  # the dense architecture


def test_reloaded_checkpoint_generates_the_same_tokens(saved):
    model, tok, path = saved
    again, tok2 = load_pruned(path)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(again.generate(ids, **kw), model.generate(ids, **kw))


def test_peft_lora_wraps_the_reloaded_model(saved):
    from peft import LoraConfig, get_peft_model

    _, tok, path = saved
    model, _ = load_pruned(path)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    ids = tok(PROMPT, return_tensors="pt").input_ids
    out = peft_model(input_ids=ids, labels=ids)
    out.loss.backward()
    lora_a = peft_model.base_model.model.model.layers[1].self_attn.q_proj.lora_A["default"].weight
    assert lora_a.grad is not None and lora_a.shape[1] == 64


def test_tied_embeddings_stay_tied_after_reload(tmp_path):
    model, tok, record = pruned("tiny-tied", "channel", target=0.25)
    save_pruned(model, tok, tmp_path / "tied", record)
    again, _ = load_pruned(tmp_path / "tied")
    assert again.lm_head.weight is again.model.embed_tokens.weight
    assert again.lm_head.weight.shape == (257, 48)
    assert torch.equal(logits(again, tok), logits(model, tok))


def test_load_in_another_dtype_and_through_models_load(saved):
    _, tok, path = saved
    half, _ = load_pruned(path, dtype=torch.bfloat16)
    assert half.model.layers[1].mlp.down_proj.weight.dtype == torch.bfloat16
    via_load, _ = load(str(path))  # any place a model can be named, a pruned folder can
    assert torch.equal(logits(via_load, tok), logits(saved[0], tok))


def test_loading_never_unpickles(saved, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", refuse)
    load_pruned(saved[2])


# ------------------------------------------------------------------------------------------ errors
def test_corrupted_weights_file_is_named(saved, tmp_path):
    import shutil

    path = shutil.copytree(saved[2], tmp_path / "broken")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors is damaged: .*notebook 03"):  # its seal says so first
        load_pruned(path)
    (path / "SHA256SUMS").unlink()  # a checkpoint saved before seals: the header read names it
    with pytest.raises(ValueError, match="model.safetensors: cannot be read"):
        load_pruned(path)


def test_shape_mismatch_names_file_tensor_and_both_shapes(saved, tmp_path):
    import shutil

    path = shutil.copytree(saved[2], tmp_path / "mismatch")
    meta = json.loads((path / "pruning.json").read_text())
    name = "model.layers.1.mlp.down_proj.weight"
    true_shape = meta["shapes"][name]
    meta["shapes"][name] = [true_shape[0], true_shape[1] + 6]
    (path / "pruning.json").write_text(json.dumps(meta))
    (path / "SHA256SUMS").unlink()  # edited by hand: the seal would refuse it before the shapes are read
    expected = (f"model.safetensors: {name} has shape \\({true_shape[0]}, {true_shape[1]}\\) but pruning.json "
                f"says \\({true_shape[0]}, {true_shape[1] + 6}\\)")
    with pytest.raises(ValueError, match=expected):
        load_pruned(path)


def test_a_folder_that_is_not_a_checkpoint_says_what_is_missing(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="missing model.safetensors, pruning.json"):
        load_pruned(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_pruned(tmp_path / "nowhere")


def test_a_failed_save_leaves_the_previous_checkpoint_intact(saved, tmp_path, monkeypatch):
    model, tok, src = saved
    path = shutil.copytree(src, tmp_path / "good")
    before = (path / "model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "write_safetensors", crash)  # the writer checkpoint.py imported
    with pytest.raises(OSError, match="disk full"):
        save_pruned(model, tok, path, {})
    assert (path / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good"]  # no temporary folder left behind
    load_pruned(path)
