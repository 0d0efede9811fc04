"""GPU check at LLaMA-7B shape with random weights: one command, a few minutes, figures printed and saved.

    python benchmarks/gpu_check.py --out gpu_check.json            # on a GPU machine (bf16)
    python benchmarks/gpu_check.py --shape small --device cpu      # a dry run of the same code on a CPU

It measures, in one process and side by side:
1. speed of the dense 7B shape against the same shape with half of its decoder parameters removed
   (block-wise, layers 4–30 as in LLM-Pruner, random scores — speed depends on shapes, not on which units go):
   prefill of 512 tokens, decode tokens/s at batch 1 and 16 with HF eager ``generate`` and with
   ``FastDecoder`` (CUDA-graph decode step), and the dense decode's share of the memory-bandwidth floor;
2. peak GPU memory of the importance step (first-order Taylor, 10 × 128 tokens, gradient checkpointing)
   against a plain forward + backward that keeps every gradient;
3. one LoRA step (rank 8, all seven projections) on the pruned shape: seconds and peak memory.
Nothing here needs weights or data from outside: the model is random, the tokens are random ids.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import time

import torch

SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=8, vocab_size=1000),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def peak_reset(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def bandwidth_gbs(device) -> float | None:
    """Measured device-to-device copy bandwidth (read + write bytes per second)."""
    if device.type != "cuda":
        return None
    x = torch.empty(2**30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * 10 * x.numel() / (time.perf_counter() - t) / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--share", type=float, default=0.5, help="share of decoder parameters removed")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", default="gpu_check.json")
    args = parser.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    from tailored.graph import trace
    from tailored.importance import compute_importance
    from tailored.models import resolve_dtype
    from tailored.prune import apply, plan_pruning
    from tailored.speed import compare

    device, dtype = torch.device(args.device), resolve_dtype(args.dtype)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "dtype": args.dtype, "shape": args.shape,
              "command": "python benchmarks/gpu_check.py " + " ".join(f"--{k.replace('_', '-')} {v}"
                                                                       for k, v in vars(args).items())}
    cfg = LlamaConfig(**SHAPES[args.shape], max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    t = time.perf_counter()
    with torch.device(device):
        dense = LlamaForCausalLM(cfg).to(dtype).eval()
    log(f"dense {sum(p.numel() for p in dense.parameters()) / 1e9:.2f} B params built in {time.perf_counter() - t:.1f} s")

    t = time.perf_counter()
    graph = trace(dense)
    result["trace_s"] = time.perf_counter() - t
    scores = {g.name: torch.rand(g.units) for g in graph.groups}
    plan = plan_pruning(graph, scores, target=args.share)
    pruned = apply(plan, copy.deepcopy(dense), graph)
    result["plan"] = {"share_decoder": plan.share_decoder, "share_model": plan.share_model,
                      "llm_pruner_ratio": plan.llm_pruner_ratio, "params_after": plan.params_after}
    log(f"traced in {result['trace_s']:.1f} s; pruned {plan.share_decoder:.1%} of the decoder")

    # 1. speed, side by side
    rows = compare({"dense": dense, f"pruned_{round(100 * args.share)}": pruned}, prompt_len=128,
                   new_tokens=args.new_tokens, batches=(1, 16), prefill_len=512, repeats=3)
    bw = bandwidth_gbs(device)
    if bw:
        weight_bytes = sum(p.numel() * p.element_size() for p in dense.parameters())
        floor = bw * 1e9 / 2 / weight_bytes  # copy bandwidth counts read + write; decode only reads weights
        result["bandwidth_GBs"] = bw
        result["dense_decode_floor_tok_s"] = floor
        result["dense_decode_share_of_floor"] = rows[0]["decode_tok_s_bs1"] / floor
    result["speed"] = rows
    for r in rows:
        log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))

    # 2. importance memory: plain forward+backward keeping all grads vs the hook-based importance step
    ids = torch.randint(0, cfg.vocab_size, (10, 128), device=device)
    dense.gradient_checkpointing_enable()
    dense.train()
    peak_reset(device)
    loss = dense(ids, labels=ids).loss
    loss.backward()
    result["plain_fwd_bwd_peak_GiB"] = peak_gib(device)
    dense.zero_grad(set_to_none=True)
    del loss
    peak_reset(device)
    t = time.perf_counter()
    compute_importance(dense, graph, ids, estimators=("param_first",), micro_batch=len(ids), progress=False)
    result["importance_s"] = time.perf_counter() - t
    result["importance_peak_GiB"] = peak_gib(device)
    log(f"importance {result['importance_s']:.1f} s, peak {result['importance_peak_GiB']} GiB vs plain "
        f"{result['plain_fwd_bwd_peak_GiB']} GiB")
    del dense
    peak_reset(device)

    # 3. one LoRA step on the pruned shape
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(pruned, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"]))
    lora.train()
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-4)
    batch = torch.randint(0, cfg.vocab_size, (8, 256), device=device)
    for _ in range(3):  # the first step warms up kernels; time the last
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        lora(batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        result["lora_step_s"] = time.perf_counter() - t
    result["lora_tokens_per_s"] = batch.numel() / result["lora_step_s"]
    result["lora_peak_GiB"] = peak_gib(device)
    log(f"LoRA step {result['lora_step_s']:.3f} s ({result['lora_tokens_per_s']:.0f} tok/s), "
        f"peak {result['lora_peak_GiB']} GiB")

    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2, default=str)
    print(json.dumps({k: v for k, v in result.items() if k != "speed"}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
