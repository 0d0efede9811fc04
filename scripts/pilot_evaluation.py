"""A pilot for the study's evaluation plan: per-example scores of the dense model and two pruned checkpoints.

What ``tailored.plan`` needs before the study runs, measured on the study's own seeded examples:

1. which tasks the dense model is above chance on (harness prompt, zero-shot, ``--n-dense`` examples per task):
   the deciding tasks, chosen from the dense model alone;
2. the per-example variance of the paired comparisons the claims make (dense vs pruned at 20% and 50%, the
   task-specific vs the general prompt, k shots vs none) on those tasks;
3. each evaluation's seconds per example, measured side by side in one process (ratios between tasks, prompts
   and k are what the plan uses; absolute times depend on the machine and its load, recorded beside them).

The checkpoints are pruned here as notebook 03 of the study profile prunes them (``fisher_refit``, the study's
calibration of 32 windows of 256 Wikipedia tokens), without writing a run directory. Every finished evaluation
is kept in ``--out``/results/ (a rerun resumes); the per-example file is ``--out``/examples.csv.gz, the format
the study publishes (``tailored.analysis.write_examples``)::

    OMP_NUM_THREADS=1 nice -n 10 python scripts/pilot_evaluation.py --out runs/pilot
    OMP_NUM_THREADS=1 nice -n 10 python scripts/pilot_evaluation.py --out runs/pilot --timing piqa arc_easy
    python -m tailored.plan runs/pilot/examples.csv.gz --timing runs/pilot/timing.csv
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import pandas as pd
import torch

from tailored import analysis, data
from tailored.evaluate import EvalJob, evaluate_jobs, evaluate_task, load_examples, not_above_chance
from tailored.importance import calibration_batch
from tailored.models import load
from tailored.recipes import prune_model
from tailored.rundir import EvalStore

ACCURACY_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "sst2")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/pilot"))
    ap.add_argument("--n-dense", type=int, default=400, help="dense examples per task (harness, k = 0)")
    ap.add_argument("--n-pruned", type=int, default=300, help="examples per above-chance task for the pruned models")
    ap.add_argument("--n-prompts", type=int, default=300, help="examples per above-chance task, other prompts")
    ap.add_argument("--n-shots", type=int, default=150, help="examples per above-chance task with k shots")
    ap.add_argument("--shots", type=int, nargs="*", default=[25])
    ap.add_argument("--shares", type=float, nargs="*", default=[0.2, 0.5])
    ap.add_argument("--timing", nargs="*", metavar="TASK",
                    help="only time these tasks: harness, general and task-specific prompts at k = 0 and the "
                         "task-specific prompt at each --shots, side by side on the same examples, and perplexity")
    ap.add_argument("--timing-n", type=int, default=30, help="examples per timed evaluation")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.timing:
        return timing(args)
    store, seconds = EvalStore(args.out), []
    loaded = load_examples(list(ACCURACY_TASKS), max(args.n_dense, args.n_pruned, args.n_prompts), seed=0)
    results: dict[str, list[dict]] = {}

    def run(name, model, tokenizer, jobs):
        for job, r in zip(jobs, evaluate_jobs(model, tokenizer, jobs, loaded.__getitem__, store=store,
                                                model_id=f"pilot-{name}", desc=name, batch_size=16)):
            results.setdefault(name, []).append(r)
            seconds.append({"model": name, "task": job.task, "prompt": job.prompt, "k": job.k, "n": r["n"],
                            "seconds_per_example": r["seconds"] / r["n"], "load1": os.getloadavg()[0]})
            print(f"{name} {job.label}: acc {r['metrics']['acc']:.3f} in {r['seconds']:.0f} s", flush=True)

    dense, tokenizer = load("smollm2-135m")
    run("dense", dense, tokenizer, [EvalJob(t, "harness", 0, args.n_dense) for t in ACCURACY_TASKS])
    above = [r["task"] for r in results["dense"]
             if not not_above_chance(r["metrics"][analysis.table_metric(r["task"])], r["chance"],
                                     r["stderr"][analysis.table_metric(r["task"])])]
    print(f"dense above chance by two standard errors at n = {args.n_dense}: {above}", flush=True)
    run("dense", dense, tokenizer, [EvalJob(t, p, 0, args.n_prompts) for t in above
                                    for p in ("task_specific", "general")]
        + [EvalJob(t, "task_specific", k, args.n_shots) for t in above for k in args.shots])
    batch = calibration_batch(tokenizer, data.text_corpus("calibration"), n_samples=32, seq_len=256, seed=0)
    cache: dict = {}
    for share in args.shares:
        name = f"block_{round(100 * share)}"
        pruned = prune_model(copy.deepcopy(dense), batch, share, "fisher_refit", cache=cache, progress=False).model
        run(name, pruned, tokenizer, [EvalJob(t, "harness", 0, args.n_pruned) for t in above])
        del pruned
    (args.out / "results.json").write_text(json.dumps({"results": results, "seconds": seconds}))
    analysis.write_examples(analysis.example_frame(results), args.out / "examples.csv.gz")
    pd.DataFrame(seconds).to_csv(args.out / "costs.csv", index=False)
    (args.out / "pilot.json").write_text(json.dumps({"above_chance": above, "args": {k: str(v) for k, v in
                                                     vars(args).items()}, "finished": time.time()}, indent=1))


def timing(args) -> None:
    """Seconds per example of each (task, prompt, k) against the harness prompt at k = 0, measured side by side
    (interleaved, twice, on the same examples) with the load average beside each; and one perplexity pass
    (seconds per model). ``timing.csv``: what ``tailored.plan.combine_costs`` scales the reference costs by."""
    dense, tokenizer = load("smollm2-135m")
    loaded = load_examples(list(args.timing), args.timing_n, seed=0)
    rows = []
    for rep in range(2):
        for task in args.timing:
            evaluated, train = loaded[task]
            for prompt, k in [("harness", 0), ("general", 0), ("task_specific", 0)] + [("task_specific", k)
                                                                                     for k in args.shots]:
                r = evaluate_task(dense, tokenizer, task, prompt=prompt, k=k, examples=evaluated,
                                  train_examples=train, progress=False)
                rows.append({"task": task, "prompt": prompt, "k": k, "k_used": r["k_used"], "n": r["n"], "rep": rep,
                             "seconds_per_example": r["seconds"] / r["n"], "load1": os.getloadavg()[0]})
                print(rows[-1], flush=True)
    t0 = time.perf_counter()
    evaluate_task(dense, tokenizer, "wikitext", ppl_tokens=51200, max_length=128, progress=False)
    rows.append({"task": "wikitext", "prompt": "", "k": 0, "k_used": 0, "n": 1, "rep": 0,
                 "seconds_per_example": time.perf_counter() - t0, "load1": os.getloadavg()[0]})
    args.out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(args.out / "timing.csv", index=False)


if __name__ == "__main__":
    main()
