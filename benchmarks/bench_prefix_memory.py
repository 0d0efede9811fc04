"""Host memory of few-shot scoring: the cached prefix copied into every row vs attended to as one copy.

    python benchmarks/bench_prefix_memory.py                          # random:llama-1b, fp32, 1,536-token prefix, 16 rows
    python benchmarks/bench_prefix_memory.py --model random:llama-7b --device cuda --dtype bfloat16

Each way runs in a fresh process: build the model, encode the prefix, then score 16 rows of requests after it
(``tailored.scoring.score_token_requests``, one pass). On the CPU the peak resident set of the scoring pass
alone is read from ``VmHWM`` after resetting it (``/proc/self/clear_refs``) once the weights and the prefix's
keys and values are in memory; on CUDA, ``torch.cuda.max_memory_allocated`` above the memory allocated then.
``copied`` is the way before ``shared_prefix_attention`` (the cache's first update concatenates the expanded
prefix, so every row gets its own copy of every layer's keys and values); ``shared`` reads the one copy. The
script prints both peaks, the keys and values a per-row copy takes (rows x prefix tokens x 2 x layers x kv heads
x head_dim x bytes), and the largest score difference between the two ways.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from tailored.models import load
from tailored.scoring import _encode_prefix, score_token_requests
from tailored.speed import machine_load


def _rss_gib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20  # kB -> GiB
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(args) -> dict:
    """One way, in this process: the peak memory of one scoring pass above what was resident before it."""
    torch.set_num_threads(args.threads)
    model, _ = load(args.model, device=args.device, dtype=args.dtype)
    cfg = model.config
    rng = np.random.default_rng(0)
    prefix = rng.integers(10, cfg.vocab_size, args.prefix_tokens).tolist()
    requests = [(rng.integers(10, cfg.vocab_size, args.ctx_tokens).tolist(),
                 rng.integers(10, cfg.vocab_size, 4).tolist()) for _ in range(args.rows)]
    cuda = args.device.startswith("cuda")
    with torch.inference_mode():  # the prefix once before, so that the allocator has seen its size
        _encode_prefix(model, prefix[:-1])
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**30
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current resident set
        before = _rss_gib("VmRSS")
    scores = score_token_requests(model, prefix, requests, batch_size=args.rows, batch_tokens=None,
                                  shared_prefix=args.way == "shared")
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else _rss_gib("VmHWM")
    kv_heads, layers = cfg.num_key_value_heads, cfg.num_hidden_layers
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_row = 2 * layers * kv_heads * head_dim * next(model.parameters()).element_size() * (args.prefix_tokens - 1)
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    return {"way": args.way, "before_gib": before, "peak_gib": peak, "above_gib": peak - before,
            "weights_gib": weights, "copies_gib": args.rows * per_row / 2**30, "scores": scores.tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:llama-1b")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prefix-tokens", type=int, default=1536)
    parser.add_argument("--ctx-tokens", type=int, default=24, help="each row's own context tokens")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--way", choices=["copied", "shared"], help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.way:
        print(json.dumps(child(args)))
        return
    runs, load = {}, [machine_load()]
    for way in ("copied", "shared"):
        argv = [a for a in sys.argv[1:] if not a.startswith("--json")]
        if args.json:
            argv = [a for a in argv if a != str(args.json)]
        out = subprocess.run([sys.executable, __file__, *argv, "--way", way], capture_output=True, text=True,
                             check=True)
        runs[way] = json.loads(out.stdout.strip().splitlines()[-1])
    load.append(machine_load())
    diff = float(np.abs(np.array(runs["copied"]["scores"]) - np.array(runs["shared"]["scores"])).max())
    for way, r in runs.items():
        print(f"{way:>7}: peak {r['peak_gib']:.2f} GiB, {r['above_gib']:.2f} GiB above the {r['before_gib']:.2f} "
              f"resident before the pass (weights {r['weights_gib']:.2f} GiB)")
    print(f"per-row copies of the prefix's keys and values: {runs['copied']['copies_gib']:.2f} GiB "
          f"({args.rows} rows x {args.prefix_tokens - 1} cached tokens); max |score difference| {diff:.1e} nats; "
          f"load {load[0]['load1']} -> {load[1]['load1']}")
    if args.json:
        record = {"command": "python benchmarks/bench_prefix_memory.py " + " ".join(sys.argv[1:]), "load": load,
                  "max_abs_score_diff": diff, **{w: {k: v for k, v in r.items() if k != "scores"}
                                                 for w, r in runs.items()}}
        args.json.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
