"""Recovery of the best 20% model at the class budget: plain LoRA against LoRA distilled from the dense model.

    python benchmarks/bench_recovery.py                      # prune (or reuse), train each recipe, measure
    python benchmarks/bench_recovery.py --recipes plain,distill_all --limit 100

The pruned model: ``--method`` (default ``fisher_refit``, the best of ``bench_pruning.py``) at ``--share`` of
the decoder, calibrated on 32 × 256 Wikipedia tokens, saved once under ``--work`` and reloaded for every
recipe. Every recipe trains one adapter on the class profile's tailored data (``params/class.yaml``,
04_lora_tune: piqa, arc_easy, winogrande, sst2 mixed, 500 training examples each, 20 validation examples
each, lr 1e-3, batch 8, 10% warm-up, at most 12,000 training tokens) and differs only in its loss:

- ``plain``: the answer-only LM loss (the class recipe);
- ``distill_answer``: KL to the dense model's next-token distribution on the answer tokens only;
- ``distill_all``: the KL on every token of each example (the prompt's tokens teach too);
- ``distill_mix``: half LM loss, half KL on every token;
- ``distill_wiki``: not the tasks' data but Wikipedia training articles (windows of 256 tokens, disjoint
  from the held-out ones), KL on every token: what the same budget does for perplexity.

Measured for the dense model, the pruned one and each recipe: the answer-token validation loss (the same
loss for all), held-out Wikipedia perplexity (``bench_pruning.py``'s protocol: 20,480 tokens, windows of
128) and zero-shot accuracy with the task-specific prompt on ``--limit`` evaluation examples of
``--eval-tasks``. Results go to ``--out`` (JSON) and a Markdown table is printed.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_pruning import held_out_text, make_batch  # noqa: E402

from tailored import evaluate, scoring  # noqa: E402
from tailored.adapters import merge  # noqa: E402
from tailored.checkpoint import load_pruned, save_pruned  # noqa: E402
from tailored.lora import LoraSettings, train_lora, validation_loss  # noqa: E402
from tailored.models import load  # noqa: E402
from tailored.recipes import METHODS, prune_model  # noqa: E402
from tailored.recovery_data import TrainExample, encode, train_and_validation  # noqa: E402

CLASS_TASKS = ["piqa", "arc_easy", "winogrande", "sst2"]
CLASS_BUDGET = dict(lr=1e-3, warmup_ratio=0.1, batch_size=8, max_steps=40, max_tokens=12000, max_seq_len=256,
                    save_every=10)
RECIPES = {
    "plain": {},
    "distill_answer": {"distill": 1.0, "distill_tokens": "answer"},
    "distill_all": {"distill": 1.0, "distill_tokens": "all"},
    "distill_mix": {"distill": 0.5, "distill_tokens": "all"},
    "distill_wiki": {"distill": 1.0, "distill_tokens": "all"},  # trained on Wikipedia windows, see wiki_examples
}


def wiki_examples(tok, n: int = 200, seq_len: int = 256) -> list[TrainExample]:
    """Windows of the Wikipedia *calibration* articles as examples (first half prompt, second half answer)."""
    rows = make_batch(tok, "wikipedia", (n, seq_len), seed=1)
    out = []
    for i, ids in enumerate(rows.tolist()):
        text = tok.decode(ids)
        cut = len(text) // 2
        out.append(TrainExample(text[:cut], text[cut:], f"wikipedia/{i}"))
    return out


def measure(model, tok, text: str, val, tasks: list[str], limit: int) -> dict:
    t0 = time.perf_counter()
    out = {"validation_loss": validation_loss(model, [encode(tok, e, 256) for e in val], tok.pad_token_id),
           "perplexity": scoring.perplexity(model, tok, [text], max_length=128, stride=128)["perplexity"]}
    for task in tasks:
        r = evaluate.evaluate_task(model, tok, task, prompt="task_specific", k=0, limit=limit, progress=False)
        out[f"acc_{task}"] = r["metrics"]["acc"]  # LLM-Pruner's convention for ARC-e, PIQA (and SST-2)
    out["accuracy_mean"] = sum(out[f"acc_{t}"] for t in tasks) / len(tasks) if tasks else None
    out["measure_s"] = round(time.perf_counter() - t0, 1)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="fisher_refit")
    ap.add_argument("--share", type=float, default=0.2)
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--eval-tasks", default="arc_easy,piqa,sst2")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--ppl-tokens", type=int, default=20480)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default="runs/bench_recovery")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "recovery_cpu.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    work, out_path = Path(args.work), Path(args.out)
    tasks = [t for t in args.eval_tasks.split(",") if t]

    dense, tok = load("smollm2-135m")
    text = held_out_text(tok, args.ppl_tokens)
    train, val = train_and_validation(CLASS_TASKS, n=500, n_validation=20)
    doc = json.loads(out_path.read_text()) if out_path.exists() else {}
    doc.setdefault("rows", {})
    doc["settings"] = {"method": args.method, "share": args.share, "tasks": CLASS_TASKS, "budget": CLASS_BUDGET,
                       "eval_tasks": tasks, "limit": args.limit, "ppl_tokens": args.ppl_tokens,
                       "threads": args.threads, "n_train": len(train), "n_validation": len(val),
                       "command": " ".join(["python", "benchmarks/bench_recovery.py", *(argv or sys.argv[1:])])}

    def save():
        doc["updated"] = datetime.datetime.now().isoformat(timespec="seconds")
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(doc, indent=1) + "\n")

    ckpt = work / f"pruned_{args.method}_{round(100 * args.share)}"
    if not (ckpt / "pruning.json").exists():
        batch = make_batch(tok, "wikipedia", (32, 256))
        pruned = prune_model(copy.deepcopy(dense), batch, args.share, METHODS[args.method], progress=False)
        save_pruned(pruned.model, tok, ckpt, pruned.record)
    if "dense" not in doc["rows"]:
        doc["rows"]["dense"] = measure(dense, tok, text, val, tasks, args.limit)
        save()
    if "pruned" not in doc["rows"]:
        doc["rows"]["pruned"] = measure(load_pruned(ckpt)[0], tok, text, val, tasks, args.limit)
        save()
    for name in args.recipes.split(","):
        if name in doc["rows"]:
            continue
        model, _ = load_pruned(ckpt)
        settings = LoraSettings(**CLASS_BUDGET, **RECIPES[name])
        t0 = time.perf_counter()
        examples = wiki_examples(tok) if name == "distill_wiki" else train
        result = train_lora(model, tok, examples, settings, work / "adapters" / name, validation=val, progress=False,
                            teacher=dense if settings.distill > 0 else None)
        train_s = time.perf_counter() - t0
        row = measure(merge(result.model), tok, text, val, tasks, args.limit)
        row.update({"steps": result.steps, "tokens": result.tokens, "train_s": round(train_s, 1),
                    "settings": settings.to_dict()})
        doc["rows"][name] = row
        save()
        print(f"{name}: {row}", flush=True)
    dense_row = doc["rows"]["dense"]
    print("\n| model | validation loss | perplexity (× dense) | " + " | ".join(tasks) + " | mean |")
    print("|---|---|---|" + "---|" * (len(tasks) + 1))
    for name, r in doc["rows"].items():
        print(f"| {name} | {r['validation_loss']:.3f} | {r['perplexity']:.2f} ({r['perplexity'] / dense_row['perplexity']:.2f}×) | "
              + " | ".join(f"{r[f'acc_{t}']:.3f}" for t in tasks) + f" | {r['accuracy_mean']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
