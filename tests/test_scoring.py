"""The scorer's speed levers compute what the plain forward pass computes (tiny random LLaMA with GQA, CPU)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from tailored import evaluate as ev
from tailored import scoring, tokens
from tailored.models import load
from tailored.prompts import get_prompt

WORDS = "the a cat dog runs jumps over under quickly blue red science water energy light plants sun".split()


@pytest.fixture(scope="module")
def tiny(one_thread):
    return load("tiny")


def by_hand(model, prefix_ids, requests) -> list[float]:
    """One plain forward pass over prefix + context + continuation per request: the reference."""
    out = []
    for ctx, cont in requests:
        ids = list(prefix_ids) + ctx + cont
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        start = len(prefix_ids) + len(ctx)
        out.append(sum(logp[start - 1 + j, t].item() for j, t in enumerate(cont)))
    return out


def sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))) for _ in range(n)]


def winogrande_requests(tok, n: int = 6):
    """WinoGrande-style requests: two options that differ at the blank, the same continuation after it."""
    prompt = get_prompt("winogrande", "harness")
    requests, groups = [], []
    for i, s in enumerate(sentences(n, 5)):
        words = s.split()
        cut = len(words) // 2
        ex = type("Ex", (), {})()
        ex.fields = {"sentence": " ".join(words[:cut] + ["_"] + words[cut:]) + ".", "option1": "cat",
                     "option2": "blue water"}
        ex.choices, ex.label, ex.id, ex.task = ("cat", "blue water"), 0, f"w{i}", "winogrande"
        reqs = [tokens.encode_request(tok, c, a) for c, a in prompt.requests(ex)]
        groups.append(list(range(len(requests), len(requests) + len(reqs))))
        requests += reqs
    return requests, groups


def test_shared_prefix_attention_scores_equal_the_plain_forward_pass(tiny):
    model, tok = tiny
    prefix = tokens.encode(tok, "\n\n".join(sentences(4, 1)) + "\n\n")
    requests = [tokens.encode_request(tok, s, " " + a) for s in sentences(5, 2) for a in ("yes", "no way", "red")]
    reference = by_hand(model, prefix, requests)
    for shared in (True, False):
        got = scoring.score_token_requests(model, prefix, requests, batch_size=4, shared_prefix=shared)
        np.testing.assert_allclose(got, reference, atol=1e-4, rtol=0, err_msg=f"shared_prefix={shared}")


def test_shared_prefix_is_never_copied_into_rows(tiny, monkeypatch):
    """The prefix reaches the attention as one (1, kv_heads, P, head_dim) copy, whatever the batch."""
    model, tok = tiny
    seen = []
    real = scoring.shared_prefix_attention

    def spy(module, query, key, value, attention_mask, shared_prefix=None, **kw):
        k, _ = shared_prefix[module.layer_idx]
        seen.append((query.shape[0], k.shape[0], k.shape[2]))
        return real(module, query, key, value, attention_mask, shared_prefix=shared_prefix, **kw)

    monkeypatch.setattr(scoring, "_cache_for_batch", lambda *a: pytest.fail("the prefix was copied per row"))
    scoring.AttentionInterface.register(scoring.SHARED_PREFIX, spy)
    try:
        prefix = tokens.encode(tok, " ".join(sentences(3, 3)))
        requests = [tokens.encode_request(tok, s, " yes") for s in sentences(6, 4)]
        scoring.score_token_requests(model, prefix, requests, batch_size=6, batch_tokens=None)
    finally:
        scoring.AttentionInterface.register(scoring.SHARED_PREFIX, real)
    assert seen and all(batch == 6 and rows == 1 and p == len(prefix) - 1 for batch, rows, p in seen)


def test_winogrande_options_share_the_sentence_before_the_blank(tiny):
    model, tok = tiny
    requests, groups = winogrande_requests(tok)
    rows = scoring._pack_rows([], requests, scoring._groups(requests, True, groups), cached=0)
    for row, g in zip(rows, groups):
        (c0, k0), (c1, k1) = requests[g[0]], requests[g[1]]
        assert len(row.base) == scoring._common_length([c0 + k0[:-1], c1 + k1[:-1]]) > 0
        assert row.length < len(c0) + len(k0) - 1 + len(c1) + len(k1) - 1  # the common part is read once
    reference = by_hand(model, [], requests)
    packed = scoring.score_token_requests(model, [], requests, groups=groups, batch_size=3)
    np.testing.assert_allclose(packed, reference, atol=1e-4, rtol=0)


def test_groups_must_cover_every_request_once(tiny):
    model, tok = tiny
    requests, _ = winogrande_requests(tok, 2)
    with pytest.raises(ValueError, match="exactly once"):
        scoring.score_token_requests(model, [], requests, groups=[[0, 1], [1, 2]])


def test_token_budget_batches_hold_at_most_the_budget():
    lengths = [300, 120, 100, 90, 40, 40, 40, 30, 10, 10]
    order = list(range(len(lengths)))  # already longest first
    batches = scoring._batches(order, 8, lengths, max_tokens=256)
    assert [i for b in batches for i in b] == order
    assert batches[0] == [0]  # longer than the budget: alone
    assert all(len(b) * lengths[b[0]] <= 256 for b in batches[1:]) and max(len(b) for b in batches) <= 8
    assert scoring._batches(order, 4) == [order[0:4], order[4:8], order[8:]]
    with pytest.raises(ValueError, match="batch_tokens = 0"):
        scoring._batches(order, 8, lengths, max_tokens=0)


def test_lm_head_on_scored_positions_only_gives_the_same_scores(tiny):
    model, tok = tiny
    requests = [tokens.encode_request(tok, s, " " + a) for s in sentences(7, 6) for a in ("cat", "the blue sun")]
    kw = dict(batch_size=5, batch_tokens=None)
    np.testing.assert_allclose(scoring.score_token_requests(model, [], requests, scored_head=True, **kw),
                               scoring.score_token_requests(model, [], requests, scored_head=False, **kw),
                               atol=1e-5, rtol=0)


def test_bfloat16_scoring_is_close_and_recorded(tiny):
    model, tok = tiny
    requests = [tokens.encode_request(tok, s, " " + a) for s in sentences(4, 7) for a in ("cat", "water")]
    fp32 = scoring.score_token_requests(model, tokens.encode(tok, "A: b\n\n"), requests)
    bf16 = scoring.score_token_requests(model, tokens.encode(tok, "A: b\n\n"), requests, score_dtype="bfloat16")
    assert not np.array_equal(fp32, bf16) and np.abs(fp32 - bf16).max() < 0.5
    assert next(model.parameters()).dtype == torch.float32  # the weights are left as they were
    with pytest.raises(ValueError, match="score_dtype = 'int8'"):
        scoring.score_token_requests(model, [], requests, score_dtype="int8")


class Store(dict):
    def get(self, key):
        return super().get(key)

    def put(self, key, result):
        self[key] = result


def test_a_result_stored_in_one_precision_is_not_reused_for_another(tiny):
    model, tok = tiny
    examples = [type("Ex", (), {"id": f"s{i}", "task": "sst2", "fields": {"sentence": s},
                                "choices": ("negative", "positive"), "label": i % 2, "references": ()})()
                for i, s in enumerate(sentences(3, 8))]
    jobs = [ev.EvalJob("sst2", "harness", 0)]
    store = Store()
    common = dict(examples=lambda task: (examples, []), store=store, model_id="tiny", progress=False)
    fp32 = ev.evaluate_jobs(model, tok, jobs, **common)[0]
    again = ev.evaluate_jobs(model, tok, jobs, score_dtype="float32", **common)[0]
    assert len(store) == 1 and again is store[next(iter(store))]  # float32 found under its old key
    bf16 = ev.evaluate_jobs(model, tok, jobs, score_dtype="bfloat16", **common)[0]
    assert len(store) == 2 and (fp32["score_dtype"], bf16["score_dtype"]) == ("float32", "bfloat16")
    assert fp32["dtype"] == "float32"
