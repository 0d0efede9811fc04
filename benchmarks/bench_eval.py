"""Naive vs prefix-cached vs prefix-cached + shared-context few-shot evaluation: time and score differences.

    python benchmarks/bench_eval.py                          # arc_easy, 50 examples, k = 25, SmolLM2-135M, CPU
    python benchmarks/bench_eval.py --paths cached,shared --k 5 --task hellaswag
    python benchmarks/bench_eval.py --task piqa --device cuda

All runs score the same token ids (see ``tailored.evaluate``); the naive one re-encodes the 25-shot prefix
and the question for every answer of every example, ``cached`` encodes the prefix once and reuses its KV
cache, ``shared`` also reads each question once for all its answers (one packed row, a 4-D mask). The script
prints the times, the speed-ups against the first path, and the largest difference between the paths'
log-likelihoods; it asserts nothing. (On a GPU a 135M model is bound by Python overhead, not arithmetic, so the speed-up there
is smaller than on a CPU; ``--random-init`` times a model of the same shapes when the weights are not at hand.)
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from tailored import data
from tailored.evaluate import evaluate_task
from tailored.models import load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="arc_easy")
    parser.add_argument("--prompt", default="harness")
    parser.add_argument("--k", type=int, default=25)
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--paths", default="naive,cached,shared",
                        help="comma-separated, timed in this order: naive, cached (prefix KV cache), shared "
                             "(prefix cache + each context read once for all its answers)")
    parser.add_argument("--random-init", action="store_true",
                        help="--model is an HF folder: take its config and tokenizer, random weights (the same "
                             "shapes and token ids, so the same time; scores are then meaningless)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.random_init:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        torch.manual_seed(args.seed)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model))
        model = model.to(device=args.device, dtype=getattr(torch, args.dtype)).eval()
    else:
        model, tokenizer = load(args.model, device=args.device, dtype=args.dtype)
    examples = data.load_task(args.task, split="eval", limit=args.limit, seed=args.seed)
    train = data.load_task(args.task, split="train")
    common = dict(task=args.task, prompt=args.prompt, k=args.k, seed=args.seed, batch_size=args.batch_size,
                  examples=examples, train_examples=train, details=True, progress=False)

    settings = {"naive": dict(use_prefix_cache=False, share_context=False),
                "cached": dict(use_prefix_cache=True, share_context=False),
                "shared": dict(use_prefix_cache=True, share_context=True)}
    paths = args.paths.split(",")
    unknown = [p for p in paths if p not in settings]
    if unknown:
        parser.error(f"unknown path(s) {unknown}; choose from {list(settings)}")
    # warm-up of every path (first-call allocations; on a GPU, kernel plan selection), then the timed runs
    for path in paths:
        evaluate_task(model, tokenizer, **settings[path], **{**common, "examples": examples[:2]})
    runs = {}
    for path in paths:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        runs[path] = evaluate_task(model, tokenizer, **settings[path], **common)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        runs[path]["wall"] = time.perf_counter() - t0

    first = runs[paths[0]]
    lls = {p: np.concatenate([r["loglikelihoods"] for r in runs[p]["examples"]]) for p in paths}
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"model {args.model} ({args.dtype}) on {device}; task {args.task}, prompt {args.prompt}, "
          f"{first['n']} examples, {len(lls[paths[0]])} requests")
    print(f"k = {args.k} requested, {first['k_used']} used; shared prefix {first['prefix_tokens']} tokens; "
          f"batch size {args.batch_size}")
    for p in paths:
        r = runs[p]
        same = all(a["pred"] == b["pred"] and a["pred_norm"] == b["pred_norm"]
                   for a, b in zip(first["examples"], r["examples"]))
        print(f"{p:>7}: {r['wall']:8.2f} s  {first['wall'] / r['wall']:5.1f}x   acc {r['metrics']['acc']:.3f}  "
              f"acc_norm {r['metrics']['acc_norm']:.3f}   max |delta log-likelihood| vs {paths[0]} "
              f"{np.abs(lls[p] - lls[paths[0]]).max():.2e} nats; same predictions: {same}")


if __name__ == "__main__":
    main()
