"""Random models of real LLaMA shapes (``random:<shape>``): built where and as asked, once, and usable anywhere."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from tailored import runner
from tailored.checkpoint import load_pruned, save_pruned
from tailored.graph import trace
from tailored.models import RANDOM_SHAPES, build_random, load, random_config
from tailored.paths import REPO_ROOT
from tailored.prune import apply, plan_pruning

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=300)  # a real shape's code path at test size


def test_shapes_are_the_real_ones():
    c7, c8 = random_config("random:llama-7b"), random_config("random:llama-3-8b")
    assert (c7.num_hidden_layers, c7.hidden_size, c7.num_attention_heads, c7.num_key_value_heads,
            c7.intermediate_size, c7.vocab_size) == (32, 4096, 32, 32, 11008, 32000)
    assert (c8.num_attention_heads, c8.num_key_value_heads, c8.intermediate_size, c8.vocab_size) == (32, 8, 14336, 128256)
    assert c8.rope_parameters["rope_theta"] == 500000.0
    for name in RANDOM_SHAPES:  # the byte tokenizer's ids (< 257) fit every vocabulary
        assert random_config(f"random:{name}").eos_token_id == 256 < random_config(f"random:{name}").vocab_size


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_random_model_has_the_dtype_device_ties_and_real_rotary_asked_for(dtype):
    model, tok = build_random("random:llama-1b", dtype=dtype, **SMALL)  # llama-1b ties its embeddings
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert model.lm_head.weight is model.model.embed_tokens.weight
    inv_freq = model.model.rotary_emb.inv_freq
    head_dim = SMALL["hidden_size"] // SMALL["num_attention_heads"]
    expected = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    assert inv_freq.dtype == torch.float32 and torch.allclose(inv_freq, expected)
    w = model.model.layers[0].mlp.up_proj.weight.float()
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))
    ids = tok(["random weights, real shapes"], return_tensors="pt").input_ids
    assert int(ids.max()) < model.config.vocab_size
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_same_seed_same_weights_other_seed_other_weights():
    a, _ = build_random("random:llama-7b", seed=0, **SMALL)
    b, _ = build_random("random:llama-7b", seed=0, **SMALL)
    c, _ = build_random("random:llama-7b", seed=1, **SMALL)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if pa.dim() > 1:
            assert not torch.equal(pa, pc), name
    rows = a.model.layers[0].mlp.gate_proj.weight
    assert len({tuple(r[:8].tolist()) for r in rows}) == rows.shape[0], "rows repeat"


def test_runner_accepts_random_shapes_and_names_them_when_wrong():
    assert runner._check_model("random:llama-7b") is None
    assert runner._check_model("random:llama-1b") is None
    problem = runner._check_model("random:llama-9b")
    assert "random:llama-7b" in problem and "random:llama-3-8b" in problem


def test_pruned_checkpoint_of_a_random_model_reloads_with_identical_logits(tmp_path):
    model, tok = build_random("random:llama-3-8b", **SMALL)
    graph = trace(model)
    scores = {g.name: torch.rand(g.units, generator=torch.Generator().manual_seed(0)) for g in graph.groups}
    pruned = apply(plan_pruning(graph, scores, target=0.3, layer_range=(0, 4)), model, graph)
    out = save_pruned(pruned, tok, tmp_path / "pruned")
    again, tok2 = load(str(out))  # wherever a model path is accepted
    ids = tok2(["pruned random model"], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(pruned(ids).logits, again(ids).logits)
    reloaded, _ = load_pruned(out)
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in pruned.parameters())


def test_a_1b_model_in_bf16_costs_one_copy_of_host_memory():
    """Built on the meta device and allocated once in bf16: the peak resident set grows by one copy, not an
    fp32 copy first (which would be twice as large again)."""
    code = textwrap.dedent("""
        import json, resource, torch, transformers
        from transformers import LlamaForCausalLM  # import the modeling code before measuring
        from tailored.models import load
        torch.set_num_threads(1)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        model, _ = load("random:llama-1b", dtype="bfloat16")
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        print(json.dumps({"before": before, "after": after, "weights": weights,
                          "dtypes": sorted({str(p.dtype) for p in model.parameters()})}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         cwd=REPO_ROOT, env={**__import__("os").environ, "PYTHONPATH": str(REPO_ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["dtypes"] == ["torch.bfloat16"]
    assert 2.2 * 2**30 < r["weights"] < 2.4 * 2**30  # 1.24 B parameters (tied) in bf16
    grown = r["after"] - r["before"]
    assert grown < 1.25 * r["weights"], f"peak resident set grew by {grown / 2**30:.2f} GiB for " \
                                        f"{r['weights'] / 2**30:.2f} GiB of weights"
