"""The study's paired statistics on synthetic data with a known answer: a difference that must be found, and
one that must not."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tailored.analysis import example_frame, paired_bootstrap, paired_values, verdict


def _correct(p: float, n: int, rng) -> np.ndarray:
    return (rng.random(n) < p).astype(float)


def test_a_real_difference_is_found_and_its_interval_covers_it():
    rng = np.random.default_rng(1)
    pairs = {}
    for task, n in (("piqa", 600), ("arc_easy", 500)):
        a = _correct(0.55, n, rng)
        b = np.where(rng.random(n) < 0.15, 1.0, a)  # b = a, plus 15% of the examples turned right
        pairs[task] = (a, b)
    out = paired_bootstrap(pairs, n_boot=4000, seed=0)
    pooled = out["pooled"]
    true = np.mean([pairs[t][1].mean() - pairs[t][0].mean() for t in pairs])
    assert pooled["estimate"] == pytest.approx(true)
    assert pooled["low"] < true < pooled["high"] and pooled["low"] > 0
    assert verdict(pooled["low"], pooled["high"]) == "supported"
    assert 0 < pooled["mde"] < pooled["estimate"]  # the n could detect a difference this large
    assert out["tasks"]["piqa"]["n"] == 600 and pooled["n"] == 1100


def test_no_difference_is_not_declared_and_the_error_rate_is_about_five_percent():
    rng = np.random.default_rng(2)
    found = 0
    for rep in range(200):
        a, b = _correct(0.6, 300, rng), _correct(0.6, 300, rng)  # the same model twice: no difference
        r = paired_bootstrap({"boolq": (a, b)}, n_boot=1000, seed=rep)["pooled"]
        found += verdict(r["low"], r["high"]) != "not settled"
    assert found <= 25, f"{found} of 200 null comparisons called a difference (5% expected)"


def test_pairing_makes_a_shared_difficulty_cancel():
    """Two models that fail the same hard examples: the paired interval is far narrower than independent."""
    rng = np.random.default_rng(3)
    hard = rng.random(1000) < 0.5
    a = np.where(hard, 0.0, 1.0)
    b = a.copy()
    b[np.flatnonzero(hard)[:40]] = 1.0  # b solves 40 more
    r = paired_bootstrap({"t": (a, b)}, n_boot=2000)["pooled"]
    independent_se = np.sqrt(a.var() / len(a) + b.var() / len(b))
    assert r["se"] < independent_se / 3 and verdict(r["low"], r["high"]) == "supported"


def test_recovery_relative_to_chance():
    dense = np.array([1.0] * 80 + [0.0] * 20)  # 0.8, chance 0.5: 0.3 above chance
    pruned = np.array([1.0] * 65 + [0.0] * 35)  # 0.65: keeps half of it
    r = paired_bootstrap({"t": (dense, pruned)}, n_boot=2000, statistic="recovery", chance={"t": 0.5})["pooled"]
    assert r["estimate"] == pytest.approx(0.5)
    assert r["low"] < 0.5 < r["high"] and verdict(r["low"], r["high"], threshold=0.5) == "not settled"


def test_paired_values_align_the_same_examples():
    results = {
        "dense": [{"task": "piqa", "prompt": "harness", "k": 0,
                   "per_example": {"ids": ["a", "b", "c"], "acc": [1, 0, 1], "acc_norm": [1, 1, 1]}}],
        "pruned": [{"task": "piqa", "prompt": "harness", "k": 0,
                    "per_example": {"ids": ["c", "a", "d"], "acc": [0, 1, 1], "acc_norm": [0, 0, 0]}}],
    }
    frame = example_frame(results)
    assert isinstance(frame, pd.DataFrame) and len(frame) == 6
    a, b = paired_values(frame, ("dense", "harness", 0), ("pruned", "harness", 0))["piqa"]
    assert list(a) == [1.0, 1.0] and list(b) == [1.0, 0.0]  # examples a and c, in the same order
    with pytest.raises(ValueError, match="same examples"):
        paired_bootstrap({"t": (np.ones(3), np.ones(4))})


def test_claim_verdicts_decide_each_claim_from_paired_examples():
    from tailored.analysis import claim_verdicts, models_frame
    from tailored.rundir import RunModel

    rng = np.random.default_rng(4)
    n = 400
    dense = {t: _correct(0.75, n, rng) for t in ("piqa", "arc_easy")}
    results = {"dense": [], "p50": [], "p50+t": []}
    for t, d in dense.items():
        kept = np.where(rng.random(n) < 0.1, 0.0, d)  # pruning loses 10% of the dense model's right answers
        tuned = np.where(rng.random(n) < 0.3, 1.0, kept)  # LoRA wins many back
        for model, values in (("dense", d), ("p50", kept), ("p50+t", tuned)):
            results[model].append({"task": t, "prompt": "harness", "k": 0,
                                   "per_example": {"ids": [str(i) for i in range(n)], "acc": list(values)}})
    models = models_frame([RunModel("dense", "dense", "m"), RunModel("p50", "pruned", "d", 0.5),
                           RunModel("p50+t", "lora", "d", 0.5, base="p50", recipe="tailored", tasks=("piqa",),
                                    prompt="task_specific")])
    pooled, per_task = claim_verdicts(example_frame(results), models, ("harness", 0),
                                      chance={"piqa": 0.5, "arc_easy": 0.25}, tasks=("piqa", "arc_easy"), n_boot=2000)
    by = {(r.claim, r.measure.split(" (")[0]): r for r in pooled.itertuples()}
    kept = by[("pruning keeps most accuracy", "share of above-chance accuracy kept")]
    assert kept.verdict == "supported" and kept.low > 50  # keeps ~87% of what is above chance
    cost = by[("pruning costs accuracy", "dense − pruned")]
    assert cost.verdict == "supported" and cost.low > 0 and cost.tasks == 2  # losing 10% of right answers shows
    assert by[("LoRA recovers accuracy", "difference")].verdict == "supported"
    assert by[("LoRA recovers accuracy", "difference")].tasks == 1  # trained for piqa: scored on piqa
    assert set(per_task["task"]) == {"piqa", "arc_easy"}
