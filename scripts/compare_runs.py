"""Does a rerun with the same seed give the same accuracies? Compare notebook 05's results of two run directories.

    python scripts/compare_runs.py runs/class runs/class_again
    python scripts/compare_runs.py runs/class runs/study     # the models both runs built the same way

Each run's ``metrics/05_evaluate.json`` lists every scored (model, task, prompt, k) with its metric values and
``n``. Rows present in both runs with the same ``n`` are compared value by value; where the runs scored a
different number of examples (the class and study profiles do) the shorter run's examples are the first of the
longer one's seeded subset, and the per-example answers kept in each run's ``eval/`` store are compared on the
shared examples. Perplexities are compared when both runs measured them on the same number of held-out tokens.
Prints one line per compared row that differs and a summary; exits 1 if any differs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def results(run: Path) -> dict[tuple, dict]:
    """``{(model, task, prompt, k, metric): row}`` of notebook 05's results, with the row's per-example answers
    where the run's ``eval/`` store still holds them (found by the row's task, prompt, k, n and seconds)."""
    path = run / "metrics" / "05_evaluate.json"
    if not path.exists():
        raise SystemExit(f"{path} does not exist: run notebook 05 there first (tailored run --only 05)")
    stored = {}
    for f in (run / "eval").glob("*.json"):
        d = json.loads(f.read_text())
        stored[(d["task"], d.get("prompt"), d["k"], d["n"], d["seconds"])] = d.get("per_example")
    metrics = json.loads(path.read_text())
    ppl_tokens = metrics.get("settings", {}).get("ppl_tokens")
    out = {}
    for row in metrics["results"]:
        per = stored.get((row["task"], row["prompt"], row["k"], row["n"], row["seconds"]))
        # a perplexity is comparable only on the same held-out tokens (its n counts documents)
        prompt = row["prompt"] if row["prompt"] is not None else f"{ppl_tokens} tokens"
        out[(row["model"], row["task"], prompt, row["k"], row["metric"])] = {**row, "per_example": per}
    return out


def compare(a: dict, b: dict, models: set[str] | None = None) -> tuple[int, int, list[str]]:
    """(rows compared, example answers compared, what differs)."""
    rows = answers = 0
    differ = []
    for key in sorted(set(a) & set(b), key=str):
        if models and key[0] not in models:
            continue
        ra, rb = a[key], b[key]
        if ra["n"] == rb["n"]:
            rows += 1
            if ra["value"] != rb["value"]:
                differ.append(f"{key}: {ra['value']} vs {rb['value']} (n = {ra['n']})")
        pa, pb = ra["per_example"], rb["per_example"]
        metric = key[-1]
        if pa and pb and metric in pa and metric in pb:
            va, vb = dict(zip(pa["ids"], pa[metric])), dict(zip(pb["ids"], pb[metric]))
            shared = [i for i in va if i in vb]
            answers += len(shared)
            changed = sum(va[i] != vb[i] for i in shared)
            if changed:
                differ.append(f"{key}: {changed} of {len(shared)} shared examples answered differently")
    return rows, answers, differ


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_a", type=Path)
    ap.add_argument("run_b", type=Path)
    ap.add_argument("--models", default="", help="comma-separated model names to compare (default: all shared)")
    args = ap.parse_args(argv)
    models = set(filter(None, args.models.split(",")))
    rows, answers, differ = compare(results(args.run_a), results(args.run_b), models)
    for line in differ:
        print(line)
    print(f"{args.run_a} vs {args.run_b}: {rows} results with the same n compared value by value, {answers} "
          f"per-example answers on shared examples; {len(differ)} differ")
    return 1 if differ or not (rows or answers) else 0


if __name__ == "__main__":
    sys.exit(main())
