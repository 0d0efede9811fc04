"""Naive vs prefix-cached few-shot evaluation: the time each takes and how far their scores differ.

    python benchmarks/bench_eval.py                          # arc_easy, 50 examples, k = 25, SmolLM2-135M, CPU
    python benchmarks/bench_eval.py --task piqa --device cuda

Both runs score the same token ids (see ``tailored.evaluate``); the naive one re-encodes the 25-shot
prefix for every answer of every example, the cached one encodes it once and reuses its KV cache. The
script prints the times, the speed-up, and the largest difference between the two paths' log-likelihoods;
it asserts nothing. (On a GPU a 135M model is bound by Python overhead, not arithmetic, so the speed-up there
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

    # warm-up of both paths (first-call allocations; on a GPU, kernel and cuDNN plan selection), then the timed runs
    for cached in (False, True):
        evaluate_task(model, tokenizer, use_prefix_cache=cached, **{**common, "examples": examples[:2]})
    runs = {}
    for cached in (False, True):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        runs[cached] = evaluate_task(model, tokenizer, use_prefix_cache=cached, **common)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        runs[cached]["wall"] = time.perf_counter() - t0

    naive, fast = runs[False], runs[True]
    lls_naive = np.concatenate([r["loglikelihoods"] for r in naive["examples"]])
    lls_fast = np.concatenate([r["loglikelihoods"] for r in fast["examples"]])
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"model {args.model} ({args.dtype}) on {device}; task {args.task}, prompt {args.prompt}, "
          f"{naive['n']} examples, {len(lls_naive)} requests")
    print(f"k = {args.k} requested, {fast['k_used']} used; shared prefix {fast['prefix_tokens']} tokens; "
          f"batch size {args.batch_size}")
    print(f"naive (prefix re-encoded per request): {naive['wall']:8.2f} s   acc {naive['metrics']['acc']:.3f}  "
          f"acc_norm {naive['metrics']['acc_norm']:.3f}")
    print(f"prefix KV cache (encoded once):        {fast['wall']:8.2f} s   acc {fast['metrics']['acc']:.3f}  "
          f"acc_norm {fast['metrics']['acc_norm']:.3f}")
    print(f"speed-up {naive['wall'] / fast['wall']:.1f}x; max |delta log-likelihood| "
          f"{np.abs(lls_naive - lls_fast).max():.2e} nats (of values down to {lls_naive.min():.1f}); "
          f"same predictions: {all(a['pred'] == b['pred'] and a['pred_norm'] == b['pred_norm'] for a, b in zip(naive['examples'], fast['examples']))}")


if __name__ == "__main__":
    main()
