"""Scoring speed, lever by lever: examples per second per task, the same examples, side by side in one run.

    python benchmarks/bench_eval.py                                   # the seven paper tasks + SST-2, k = 0
    python benchmarks/bench_eval.py --tasks arc_easy --k 25 --configs naive,before,final
    python benchmarks/bench_eval.py --configs final,bf16 --limit 300  # bf16 against float32: agreement
    python benchmarks/bench_eval.py --costs --json benchmarks/results/eval_costs_cpu.json   # seconds per example

Each configuration is one way of calling ``tailored.scoring.score_token_requests`` on the very same token ids
(tokenization is done once, outside the timings). ``CONFIGS`` lists them in the order the levers were added:
``before`` is the scorer as it was (a fixed 16 rows per pass, the requests with the same context in one row, the
few-shot prefix's keys and values copied into every row, the LM head on every position from a batch's first
scored one); each next configuration adds one lever, so each ratio to the previous column is that lever's effect.
Configurations are timed in turn, ``--rounds`` times (the median is reported), and every configuration is
compared with the first: the largest log-likelihood difference, and how many predictions (``acc`` and
``acc_norm``) differ. ``--costs`` times ``evaluate_task`` end to end (tokenization included) at the final
settings: what a study's planner multiplies by its number of examples. The machine's load is recorded beside
every figure; the script asserts nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tailored import data
from tailored.analysis import PAPER_TASKS
from tailored.evaluate import _longest_request, evaluate_task
from tailored.metrics import choice_predictions
from tailored.models import load
from tailored.prompts import get_prompt
from tailored.scoring import build_fewshot_prefix, score_token_requests
from tailored.speed import machine_load
from tailored.tokens import encode_request, padding_id

OFF = dict(batch_size=16, use_prefix_cache=True, share_context=True, batch_tokens=None, shared_prefix=False,
           scored_head=False, grouped=False)
# name -> (settings, threads, weights dtype); each after "before" adds one lever to the one above it
CONFIGS = {
    "naive": (OFF | dict(use_prefix_cache=False, share_context=False), 1, "float32"),
    "before": (OFF, 1, "float32"),
    "head": (OFF | dict(scored_head=True), 1, "float32"),
    "packed": (OFF | dict(scored_head=True, grouped=True), 1, "float32"),
    "budget": (OFF | dict(scored_head=True, grouped=True, batch_size=64, batch_tokens="auto"), 1, "float32"),
    "shared": (OFF | dict(scored_head=True, grouped=True, batch_size=64, batch_tokens="auto",
                          shared_prefix=True), 1, "float32"),
    "final": (OFF | dict(scored_head=True, grouped=True, batch_size=64, batch_tokens="auto",
                         shared_prefix=True), 2, "float32"),
    "bf16": (OFF | dict(scored_head=True, grouped=True, batch_size=64, batch_tokens="auto",
                        shared_prefix=True, score_dtype="bfloat16"), 2, "float32"),
    "bf16_weights": (OFF | dict(scored_head=True, grouped=True, batch_size=64, batch_tokens="auto",
                                shared_prefix=True), 2, "bfloat16"),
}
FINAL = dict(batch_size=64, batch_tokens="auto")  # evaluate_task's settings for --costs


def task_requests(task: str, prompt_name: str, k: int, limit: int, seed: int, tokenizer, max_tokens: int):
    """The encoded requests of ``limit`` examples, one group per example, and the prefix ids: what is scored."""
    prompt = get_prompt(task, prompt_name)
    examples = data.load_task(task, split="eval", limit=limit, seed=seed)
    train = data.load_task(task, split="train") if k else []
    prefix = build_fewshot_prefix(task, prompt, k, train, seed, tokenizer, max_tokens=max_tokens,
                                  longest_request=_longest_request(tokenizer, prompt, examples, 0),
                                  exclude_ids=[ex.id for ex in examples])
    requests, groups = [], []
    for ex in examples:
        reqs = [encode_request(tokenizer, c, a) for c, a in prompt.requests(ex)]
        groups.append(list(range(len(requests), len(requests) + len(reqs))))
        requests += reqs
    return prompt, examples, prefix, requests, groups


def predictions(prompt, examples, groups, lls) -> list[tuple[int, int]]:
    return [choice_predictions(lls[g[0]:g[-1] + 1], prompt.choice_texts(ex)) for ex, g in zip(examples, groups)]


def time_config(models, name: str, prefix_ids, requests, groups, pad_id,
                threads: int | None = None) -> tuple[float, np.ndarray]:
    settings, own_threads, weights = CONFIGS[name]
    settings = dict(settings)
    torch.set_num_threads(threads or own_threads)
    grouped = settings.pop("grouped")
    t0 = time.perf_counter()
    lls = score_token_requests(models[weights], prefix_ids, requests, pad_id=pad_id,
                               groups=groups if grouped else None, **settings)
    return time.perf_counter() - t0, lls


def levers(args, models, tokenizer) -> dict:
    configs = args.configs.split(",")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        sys.exit(f"unknown configuration(s) {unknown}; choose from {list(CONFIGS)}")
    max_tokens = models["float32"].config.max_position_embeddings
    record = {"tasks": {}}
    for task in args.tasks:
        prompt, examples, prefix, requests, groups = task_requests(task, args.prompt, args.k, args.limit, args.seed,
                                                                   tokenizer, max_tokens)
        pad = padding_id(tokenizer)
        for name in configs:  # warm-up: first-call allocations
            time_config(models, name, list(prefix.token_ids), requests[:8], [g for g in groups if g[-1] < 8], pad)
        walls: dict[str, list[float]] = {c: [] for c in configs}
        lls: dict[str, np.ndarray] = {}
        load = [machine_load()]
        for _ in range(args.rounds):
            for name in configs:
                wall, lls[name] = time_config(models, name, list(prefix.token_ids), requests, groups, pad, args.threads)
                walls[name].append(wall)
        load.append(machine_load())
        ref = predictions(prompt, examples, groups, lls[configs[0]])
        rows = {}
        for i, name in enumerate(configs):
            pred = predictions(prompt, examples, groups, lls[name])
            wall = statistics.median(walls[name])
            metric = {m: float(np.mean([p[j] == prompt.gold_index(ex) for p, ex in zip(pred, examples)]))
                      for j, m in enumerate(("acc", "acc_norm"))}
            rows[name] = {"seconds": wall, "examples_per_s": len(examples) / wall, "walls": walls[name],
                          "vs_previous": (statistics.median(walls[configs[i - 1]]) / wall) if i else 1.0,
                          "max_abs_dll": float(np.abs(lls[name] - lls[configs[0]]).max()),
                          "acc_differing": sum(a[0] != b[0] for a, b in zip(pred, ref)),
                          "acc_norm_differing": sum(a[1] != b[1] for a, b in zip(pred, ref)), **metric}
        record["tasks"][task] = {"n": len(examples), "requests": len(requests), "k_used": prefix.k_used,
                                 "prefix_tokens": prefix.n_tokens, "load": load, "configs": rows}
        print(f"\n{task} ({args.prompt}, k = {prefix.k_used}, {len(examples)} examples, {len(requests)} requests; "
              f"load {load[0]['load1']} -> {load[1]['load1']})")
        if args.json:  # after every task, so that an interrupted run keeps what it measured
            write(args, record)
        for name, r in rows.items():
            print(f"  {name:>12}: {r['examples_per_s']:7.2f} ex/s  {r['vs_previous']:5.2f}x previous   acc "
                  f"{r['acc']:.3f} acc_norm {r['acc_norm']:.3f}   vs {configs[0]}: max |dll| {r['max_abs_dll']:.1e}, "
                  f"predictions differing {r['acc_differing']} / {r['acc_norm_differing']}")
    return record


def costs(args, model, tokenizer) -> dict:
    """Seconds per example of ``evaluate_task`` at the final settings, per (task, prompt, k)."""
    torch.set_num_threads(args.threads or 2)
    cases = [(t, p, 0) for t in args.tasks for p in ("harness", "task_specific")]
    cases += [(t, "task_specific", 25) for t in ("arc_easy", "piqa", "hellaswag") if t in args.tasks]
    rows = []
    for task, prompt, k in cases:
        examples = data.load_task(task, split="eval", limit=args.limit, seed=args.seed)
        train = data.load_task(task, split="train")
        evaluate_task(model, tokenizer, task, prompt=prompt, k=k, examples=examples[:4], train_examples=train,
                      progress=False, **FINAL)  # warm-up
        before = machine_load()
        t0 = time.perf_counter()
        out = evaluate_task(model, tokenizer, task, prompt=prompt, k=k, examples=examples, train_examples=train,
                            progress=False, score_dtype=args.score_dtype, **FINAL)
        wall = time.perf_counter() - t0
        rows.append({"task": task, "prompt": prompt, "k": k, "k_used": out["k_used"], "n": out["n"],
                     "prefix_tokens": out["prefix_tokens"], "seconds": wall, "s_per_example": wall / out["n"],
                     "load_before": before, "load_after": machine_load()})
        print(f"{task:>14} {prompt:>13} k={k:<2} (used {out['k_used']:>2}): {wall / out['n']:.3f} s per example "
              f"({out['n']} examples, load {before['load1']})")
    return {"threads": torch.get_num_threads(), "score_dtype": args.score_dtype, "rows": rows}


def table(record: dict) -> str:
    """A saved record as a Markdown table: examples per second per task and configuration (x the previous one),
    or seconds per example (``--costs``), with the load."""
    if "rows" in record:
        lines = ["| task | prompt | k (used) | n | s / example | load |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['task']} | {r['prompt']} | {r['k']} ({r['k_used']}) | {r['n']} | {r['s_per_example']:.3f} | "
                  f"{r['load_before']['load1']} |" for r in record["rows"]]
        return "\n".join(lines)
    configs = list(next(iter(record["tasks"].values()))["configs"])
    lines = ["| task (n) | " + " | ".join(configs) + " | predictions differing (acc / acc_norm) | load |",
             "|---|" + "---|" * (len(configs) + 2)]
    for task, t in record["tasks"].items():
        cells = [f"{c['examples_per_s']:.2f}" + (f" ({c['vs_previous']:.2f}×)" if i else "")
                 for i, c in enumerate(t["configs"].values())]
        differing = ", ".join(f"{name} {c['acc_differing']}/{c['acc_norm_differing']}"
                              for name, c in list(t["configs"].items())[1:] if c["acc_differing"] or c["acc_norm_differing"])
        lines.append(f"| {task} ({t['n']}) | " + " | ".join(cells) + f" | {differing or 'none'} | "
                     f"{t['load'][0]['load1']}–{t['load'][1]['load1']} |")
    return "\n".join(lines)


def agreement(record: dict, other: str = "bf16", share: float = 0.99, points: float = 0.5) -> str:
    """bf16 (``other``) against the record's first configuration, per task, as a Markdown table with a verdict:
    kept when at least ``share`` of the predictions are identical and every accuracy is within ``points``."""
    lines = ["| task | n | acc fp32 → bf16 | acc_norm fp32 → bf16 | identical predictions (acc / acc_norm) | "
             "max Δ log-lik | verdict |", "|---|---|---|---|---|---|---|"]
    for task, t in record["tasks"].items():
        ref, got, n = next(iter(t["configs"].values())), t["configs"][other], t["n"]
        same = [1 - got[f"{m}_differing"] / n for m in ("acc", "acc_norm")]
        close = all(abs(100 * (got[m] - ref[m])) <= points for m in ("acc", "acc_norm"))
        verdict = "keeps predictions" if min(same) >= share and close else "**changes predictions**"
        lines.append(f"| {task} | {n} | {100 * ref['acc']:.1f} → {100 * got['acc']:.1f} | {100 * ref['acc_norm']:.1f} → "
                     f"{100 * got['acc_norm']:.1f} | {100 * same[0]:.1f}% / {100 * same[1]:.1f}% | "
                     f"{got['max_abs_dll']:.2f} | {verdict} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="a spec for tailored.models.load (a pruned folder too)")
    parser.add_argument("--tasks", nargs="+", default=list(PAPER_TASKS) + ["sst2"])
    parser.add_argument("--prompt", default="harness")
    parser.add_argument("--k", type=int, default=0)
    parser.add_argument("--limit", type=int, default=50, help="examples per task (the seeded subset)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=1, help="times each configuration is timed (median)")
    parser.add_argument("--configs", default="before,head,packed,budget,shared,final",
                        help=f"comma-separated, timed in this order; from {list(CONFIGS)}")
    parser.add_argument("--costs", action="store_true", help="seconds per example of evaluate_task instead")
    parser.add_argument("--score-dtype", default="float32", help="with --costs")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for every configuration (default: each its own; --costs: 2)")
    parser.add_argument("--json", type=Path, default=None, help="write the record here")
    parser.add_argument("--table", type=Path, default=None, metavar="RECORD", help="only print a saved record's table")
    parser.add_argument("--agreement", type=Path, default=None, metavar="RECORD",
                        help="only print a saved record's bf16-against-fp32 agreement table")
    args = parser.parse_args()
    if args.table or args.agreement:
        record = json.loads((args.table or args.agreement).read_text(encoding="utf-8"))
        print(table(record) if args.table else agreement(record))
        return

    model, tokenizer = load(args.model)
    models = {"float32": model}
    if not args.costs and any(CONFIGS[c][2] == "bfloat16" for c in args.configs.split(",") if c in CONFIGS):
        models["bfloat16"] = copy.deepcopy(model).to(torch.bfloat16)
    record = costs(args, model, tokenizer) if args.costs else levers(args, models, tokenizer)
    if args.json:
        write(args, record)
        print(f"wrote {args.json}")


def write(args, record: dict) -> None:
    record = {"command": "python benchmarks/bench_eval.py " + " ".join(sys.argv[1:]), "model": args.model,
              "torch": torch.__version__, "finished": time.strftime("%Y-%m-%d %H:%M:%S"), **record}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
