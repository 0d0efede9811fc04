"""The fast decode path gives the same greedy tokens as HF generate, for every tiny architecture."""

from __future__ import annotations

import pytest
import torch

from tailored.models import load
from tailored.speed import FastDecoder, compare, sizes


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static-step"])
@pytest.mark.parametrize("spec", ["tiny", "tiny-mha", "tiny-qwen2", "tiny-tied"])
def test_fast_decoder_matches_hf_greedy_generate(spec, static):
    model, _ = load(spec)
    ids = torch.randint(0, 250, (3, 9), generator=torch.Generator().manual_seed(1))
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12,
                         do_sample=False, pad_token_id=0)
    # the static step (masked attention over the whole cache) is what a CUDA graph replays on a GPU
    out = FastDecoder(model, max_batch=3, max_len=32, static=static).generate(ids, 12)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static-step"])
def test_one_decoder_serves_every_batch_up_to_its_largest(static):
    """speed.compare builds one FastDecoder per model for all its batch sizes: smaller batches use the first rows
    of its cache and give HF's tokens too."""
    model, _ = load("tiny")
    fast = FastDecoder(model, max_batch=4, max_len=32, static=static)
    for bsz in (1, 3, 4):
        ids = torch.randint(0, 250, (bsz, 7), generator=torch.Generator().manual_seed(bsz))
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, min_new_tokens=10,
                             do_sample=False, pad_token_id=0)
        assert torch.equal(fast.generate(ids, 10), ref)


def test_fast_decoder_refuses_more_than_its_static_cache():
    model, _ = load("tiny")
    with pytest.raises(ValueError, match="exceeds the decoder's static cache"):
        FastDecoder(model, max_batch=1, max_len=8).generate(torch.zeros(1, 6, dtype=torch.long), 4)


def test_compare_reports_side_by_side_rows():
    dense, _ = load("tiny")
    small, _ = load("tiny", seed=1)
    rows = compare({"a": dense, "b": small}, prompt_len=4, new_tokens=3, batches=(1,), prefill_len=8, repeats=1,
                   eager=False)
    assert [r["model"] for r in rows] == ["a", "b"]
    assert rows[0]["decode_tok_s_bs1_speedup"] == 1.0 and rows[1]["share_removed"] == 0.0
    assert rows[0]["macs_per_token"] > 0 and rows[0]["prefill_ms"] > 0


def test_loaders_are_measured_one_at_a_time_and_give_the_same_rows():
    """A dict of loaders is read model by model, each freed before the next is loaded (what a 24 GB GPU needs);
    the rows have the same keys and sizes as for models in memory, and say they were not interleaved."""
    import gc
    import weakref

    alive = []

    def loader(seed):
        def read():
            assert not [r for r in alive if r() is not None], "a model was still in memory when the next was read"
            model = load("tiny", seed=seed)[0]
            alive.append(weakref.ref(model))
            return model
        return read

    kw = dict(prompt_len=4, new_tokens=3, batches=(1,), prefill_len=8, repeats=1, eager=False)
    gc.collect()
    by_loader = compare({"a": loader(0), "b": loader(1)}, **kw)
    in_memory = compare({"a": load("tiny")[0], "b": load("tiny", seed=1)[0]}, **kw)
    assert [r["model"] for r in by_loader] == ["a", "b"] and set(by_loader[0]) == set(in_memory[0])
    assert [r["interleaved"] for r in by_loader + in_memory] == [False, False, True, True]
    assert [r["params"] for r in by_loader] == [r["params"] for r in in_memory]
    alive.clear()
    assert sizes({"a": loader(0), "b": loader(1)}) == sizes({"a": load("tiny")[0], "b": load("tiny", seed=1)[0]})


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static-step"])
def test_fast_decoder_runs_pruned_models_with_per_layer_shapes(static):
    from tailored.graph import trace
    from tailored.prune import apply, plan_pruning

    model, _ = load("tiny")
    graph = trace(model)
    gen = torch.Generator().manual_seed(0)
    scores = {g.name: torch.rand(g.units, generator=gen) for g in graph.groups}
    plan = plan_pruning(graph, scores, target=0.4, allocation="global", layer_range=(0, 4))
    pruned = apply(plan, model, graph)
    widths = {(w["q_heads"], w["mlp"]) for w in plan.widths}
    assert len(widths) > 1, "global allocation should leave layers of different widths"
    ids = torch.randint(0, 250, (2, 5), generator=gen)
    ref = pruned.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8,
                          do_sample=False, pad_token_id=0)
    assert torch.equal(FastDecoder(pruned, max_batch=2, max_len=16, static=static).generate(ids, 8), ref)


def test_decode_speed_counts_decode_steps_alone_and_reports_the_prompt_prefill():
    model, _ = load("tiny")
    row = compare({"a": model}, prompt_len=6, new_tokens=4, batches=(1, 2), prefill_len=8, repeats=1)[0]
    for b in (1, 2):
        assert row[f"prompt_prefill_ms_bs{b}"] > 0 and row[f"hf_prompt_prefill_ms_bs{b}"] > 0
        assert row[f"decode_tok_s_bs{b}"] > 0 and row[f"hf_decode_tok_s_bs{b}"] > 0
    with pytest.raises(ValueError, match="at least 2 new tokens"):
        compare({"a": model}, new_tokens=1, batches=(1,), repeats=1)


def test_the_decode_floor_reads_every_weight_and_the_kv_cache_once_per_token_at_the_read_bandwidth():
    """Issue 24's example: LLaMA-7B in bf16 (12.55 GiB) at 4.24 TB/s is about 3.2 ms a token, about 310 tokens/s;
    the old floor halved the bandwidth and put the measured 190 tokens/s at 121% of what memory allows."""
    import importlib.util

    from transformers import AutoModelForCausalLM

    from tailored import paths
    from tailored.models import random_config

    spec = importlib.util.spec_from_file_location("gpu_check", paths.REPO_ROOT / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(random_config("llama-7b"), dtype=torch.bfloat16)
    floor = gpu_check.decode_floor(model, {"read": 4240.0, "copy": 4000.0}, prompt_len=128, new_tokens=64)
    weights = sum(p.numel() for p in model.parameters()) * 2
    kv = 2 * 32 * 32 * 128 * (128 + 32) * 2  # keys and values, 32 layers x 32 heads x 128, at the mean cache length
    assert floor["weight_bytes"] == weights and floor["kv_bytes_per_token"] == kv
    assert floor["floor_tok_s"] == pytest.approx(4240e9 / (weights + kv))
    assert 300 < floor["floor_tok_s"] < 320 and 3.1 < floor["floor_ms_per_token"] < 3.3
    assert 0.55 < 190 / floor["floor_tok_s"] < 0.65  # the H200's measured dense decode: about 61%, not 121%
