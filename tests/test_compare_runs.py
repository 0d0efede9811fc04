"""scripts/compare_runs.py: same-seed reruns compared value by value and example by example."""

from __future__ import annotations

import importlib.util
import json

from tailored.paths import REPO_ROOT

spec = importlib.util.spec_from_file_location("compare_runs", REPO_ROOT / "scripts" / "compare_runs.py")
compare_runs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare_runs)


def _run(folder, n, answers, ppl_tokens=8192, ppl=30.0):
    (folder / "metrics").mkdir(parents=True)
    (folder / "eval").mkdir()
    rows = [{"model": "dense", "task": "piqa", "prompt": "harness", "k": 0, "n": n, "metric": "acc",
             "value": sum(answers[:n]) / n, "seconds": 1.5},
            {"model": "dense", "task": "wikitext", "prompt": None, "k": 0, "n": 3, "metric": "perplexity",
             "value": ppl, "seconds": 2.5}]
    (folder / "metrics" / "05_evaluate.json").write_text(json.dumps({"results": rows,
                                                                     "settings": {"ppl_tokens": ppl_tokens}}))
    stored = {"task": "piqa", "prompt": "harness", "k": 0, "n": n, "seconds": 1.5,
              "per_example": {"ids": [str(i) for i in range(n)], "acc": answers[:n]}}
    (folder / "eval" / "a.json").write_text(json.dumps(stored))
    return folder


def test_identical_runs_agree_and_a_changed_answer_is_found(tmp_path):
    answers = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    a = _run(tmp_path / "a", 6, answers)
    assert compare_runs.main([str(a), str(_run(tmp_path / "b", 6, answers))]) == 0
    changed = answers[:2] + [0.0] + answers[3:]
    assert compare_runs.main([str(a), str(_run(tmp_path / "c", 6, changed))]) == 1


def test_a_smaller_run_is_compared_on_its_shared_examples_and_perplexity_only_on_the_same_tokens(tmp_path):
    answers = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    rows, n_answers, differ = compare_runs.compare(compare_runs.results(_run(tmp_path / "a", 6, answers)),
                                                   compare_runs.results(_run(tmp_path / "b", 4, answers,
                                                                             ppl_tokens=512, ppl=40.0)))
    assert (rows, n_answers, differ) == (0, 4, [])  # accuracies at different n and perplexities on other tokens
