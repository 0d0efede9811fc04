"""GPU check at LLaMA-7B shape with random weights: one command, a few minutes, figures printed and saved.

    python benchmarks/gpu_check.py --out gpu_check.json               # on a GPU machine (bf16)
    python benchmarks/gpu_check.py --model tiny --device cpu          # a dry run of the same code on a CPU

It measures, in one process and side by side:
1. peak memory of the importance step (first-order Taylor, 10 × 128 tokens in one pass) against a plain
   forward + backward that keeps every gradient, both measured the same way: eval mode (no dropout), with
   and without recomputing the decoder layers' activations (``compute_importance(recompute_activations=…)``, the
   plain pass flagged the same way), each peak taken *above the weights resident before it*; it prints
   the ratio the target is stated in (importance / plain, ≤ 0.75) and the absolute peak of notebook 02
   (weights + the step's own peak, ≤ 16 GiB);
2. speed of the dense shape against the same shape with half of its decoder parameters removed (block-wise,
   layers 4–30 as in LLM-Pruner, random scores — speed depends on shapes, not on which units go): prefill
   of 512 tokens; decode tokens/s at batch 1 and 16 (128-token prompts) with HF eager ``generate`` and with
   ``FastDecoder`` (CUDA-graph decode step), *decode steps alone* — the prompt's prefill (2048 tokens at
   batch 16) is timed separately and reported as ``prompt_prefill_ms_bs<b>`` — and the dense decode's share
   of the memory-bandwidth floor (the weights and the KV cache read once per token at the measured *read*
   bandwidth: a share above 100% stops the check, since no decoder beats it); the same 50% with kept MLP
   widths rounded to multiples of ``--round-to`` (128: the paper profile's ``fisher_bias_round128``) beside
   them, so what alignment buys in speed is measured in the same run; and each model's decode tokens/s at the
   largest batch that fits (doubling from 32 to ``--max-batch``), where width pruning is said to pay;
3. LoRA steps (rank 8, all seven projections, 16 × 256 tokens, answer-only loss on the last quarter, bf16
   autocast, activations recomputed, as notebook 04 at the paper's settings) on the pruned shape: seconds,
   weights and peak memory.
Nothing here needs weights or data from outside: the model is random (``random:llama-7b``), the tokens are
random ids.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from tailored.anatomy import decoder_layers, preserved, set_recompute_activations  # noqa: E402
from tailored.graph import trace  # noqa: E402
from tailored.importance import compute_importance  # noqa: E402
from tailored.lora import LoraSettings, measure_throughput  # noqa: E402
from tailored.models import load  # noqa: E402
from tailored.prune import apply, plan_pruning  # noqa: E402
from tailored.speed import compare  # noqa: E402

GIB = 2**30


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def resident(device) -> float | None:
    """GiB allocated now (the weights and whatever else is alive), and the peak counter reset to it."""
    gc.collect()
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated() / GIB


def own_peak(device, base: float | None) -> float | None:
    """The peak since ``resident`` above what was resident then: the step's own memory."""
    return None if base is None else torch.cuda.max_memory_allocated() / GIB - base


def bandwidth_gbs(device) -> dict | None:
    """Measured memory bandwidth, GB/s: ``copy`` (device-to-device copy: bytes read + bytes written per second)
    and ``read`` (a reduction over 1 GiB: bytes read per second, the traffic a decode step makes)."""
    if device.type != "cuda":
        return None
    x = torch.ones(2**29, dtype=torch.bfloat16, device=device)  # 1 GiB
    y = torch.empty_like(x)

    def rate(fn, bytes_moved: int) -> float:
        fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
        return 10 * bytes_moved / (time.perf_counter() - t) / 1e9

    size = x.numel() * x.element_size()
    out = {"copy": rate(lambda: y.copy_(x), 2 * size), "read": rate(lambda: x.sum(dtype=torch.float32), size)}
    return out


def mlp_widths(model) -> list[int]:
    """Kept MLP channels per layer."""
    return [layer.mlp.gate_proj.out_features for layer in decoder_layers(model)]


def saturated_decode(models: dict, device, new_tokens: int, start: int = 16, max_batch: int = 256) -> dict:
    """``FastDecoder`` decode tokens/s of each model at the largest batch that fits (doubling from ``start`` up to
    ``max_batch``, the cap a few-minute check affords): where width pruning is said to pay, beside batch 1."""
    out = {}
    for name, model in models.items():
        best = None
        batch = start * 2
        while batch <= max_batch:
            try:
                row = compare({name: model}, prompt_len=128, new_tokens=new_tokens, batches=(batch,), prefill_len=128,
                              repeats=1, eager=False)[0]
            except torch.OutOfMemoryError:
                break
            finally:
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            best = {"batch": batch, "decode_tok_s": row[f"decode_tok_s_bs{batch}"], "capped": batch * 2 > max_batch}
            batch *= 2
        out[name] = best
    return out


def kv_bytes_per_token(config, batch: int, positions: float, dtype_bytes: int) -> float:
    """Bytes of keys and values one decode step reads at ``positions`` cached tokens (all layers, ``batch`` rows)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * positions * batch * dtype_bytes


def decode_floor(model, bandwidth: dict, prompt_len: int, new_tokens: int) -> dict:
    """The fastest batch-1 decode the memory allows: every weight and the KV cache read once per token, at the
    measured read bandwidth. Tokens/s at or above it cannot be measured; a share above 100% is a wrong floor."""
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    dtype_bytes = next(model.parameters()).element_size()
    kv = kv_bytes_per_token(model.config, 1, prompt_len + new_tokens / 2, dtype_bytes)  # the mean cache length
    read = bandwidth["read"] * 1e9
    return {"weight_bytes": weight_bytes, "kv_bytes_per_token": kv, "read_bandwidth_GBs": bandwidth["read"],
            "floor_ms_per_token": 1e3 * (weight_bytes + kv) / read, "floor_tok_s": read / (weight_bytes + kv)}


def plain_forward_backward(model, ids: torch.Tensor, recompute: bool) -> None:
    """One forward + backward over ``ids`` keeping every gradient, in eval mode like ``compute_importance``."""
    with preserved(model):
        model.eval()
        if recompute:
            set_recompute_activations(model, True)
            for layer in decoder_layers(model):
                layer.training = True  # as compute_importance does: recompute the layers, no dropout
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()


def importance_memory(dense, graph, vocab: int, device, result: dict) -> None:
    ids = torch.randint(0, vocab, (10, 128), generator=torch.Generator().manual_seed(0)).to(device)
    result["weights_dense_GiB"] = resident(device)
    rows = {}
    for recompute in (False, True):
        base = resident(device)
        t = time.perf_counter()
        plain_forward_backward(dense, ids, recompute)
        sync(device)
        plain_s, plain = time.perf_counter() - t, own_peak(device, base)
        dense.zero_grad(set_to_none=True)
        base = resident(device)
        t = time.perf_counter()
        compute_importance(dense, graph, ids, estimators=("param_first",), micro_batch=len(ids), progress=False,
                           recompute_activations=recompute)
        sync(device)
        imp_s, imp = time.perf_counter() - t, own_peak(device, base)
        row = {"plain_own_peak_GiB": plain, "importance_own_peak_GiB": imp, "plain_s": plain_s, "importance_s": imp_s,
               "ratio": imp / plain if plain else None,
               "notebook_02_peak_GiB": None if imp is None else result["weights_dense_GiB"] + imp}
        rows["recomputed" if recompute else "not_recomputed"] = row
        log(f"importance, {'with' if recompute else 'without'} recomputation: own peak {row['importance_own_peak_GiB']} "
            f"GiB vs plain fwd+bwd {row['plain_own_peak_GiB']} GiB (ratio {row['ratio']}, target <= 0.75); "
            f"weights + step = {row['notebook_02_peak_GiB']} GiB (target <= 16); {imp_s:.1f} s vs {plain_s:.1f} s")
    result["importance_memory"] = rows


def lora_steps(pruned, device, result: dict, batch: int = 16, seq: int = 256) -> None:
    """LoRA steps of ``batch`` x ``seq`` with activations recomputed (``lora.measure_throughput``, the measure
    notebook 04's budget uses), and their memory above the resident pruned weights."""
    settings = LoraSettings(batch_size=batch, micro_batch_size=batch, max_seq_len=seq, recompute_activations=True,
                            dropout=0.1, rank=8, alpha=16.0, lr=1e-4)
    result["weights_pruned_GiB"] = base = resident(device)
    measured = measure_throughput(pruned, settings, batch_size=batch, seq_len=seq, steps=2, warmup=1)
    result["lora"] = {"batch": batch, "seq_len": seq, "recompute_activations": True,
                      "step_s": measured["s_per_step"], "tokens_per_s": measured["tokens_per_s"],
                      "own_peak_GiB": own_peak(device, base),
                      "notebook_04_peak_GiB": None if base is None else torch.cuda.max_memory_allocated() / GIB}
    log(f"LoRA {batch} x {seq}: {result['lora']['step_s']:.3f} s per step "
        f"({result['lora']['tokens_per_s']:.0f} tok/s), peak {result['lora']['notebook_04_peak_GiB']} GiB "
        f"(weights {result['weights_pruned_GiB']} GiB; target <= 40)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:llama-7b", help="random:<shape>, tiny, or a model directory")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--share", type=float, default=0.5, help="share of decoder parameters removed")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=256, help="largest batch the saturated decode tries")
    parser.add_argument("--round-to", type=int, default=128, help="a second 50%% with kept MLP widths in multiples "
                        "of this (1: none)")
    parser.add_argument("--out", default="gpu_check.json")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "dtype": args.dtype, "model": args.model,
              "command": "python benchmarks/gpu_check.py " + " ".join(f"--{k.replace('_', '-')} {v}"
                                                                       for k, v in vars(args).items())}
    t = time.perf_counter()
    dense, _ = load(args.model, device=args.device, dtype=args.dtype)
    vocab = dense.config.vocab_size
    log(f"dense {sum(p.numel() for p in dense.parameters()) / 1e9:.2f} B params built in {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    graph = trace(dense)
    result["trace_s"] = time.perf_counter() - t

    # 1. importance memory (dense alone resident, as in notebook 02)
    importance_memory(dense, graph, vocab, device, result)

    # 2. speed, side by side
    scores = {g.name: torch.rand(g.units, generator=torch.Generator().manual_seed(0)) for g in graph.groups}
    try:
        plan = plan_pruning(graph, scores, target=args.share)
        aligned_plan = plan_pruning(graph, scores, target=args.share, round_to=args.round_to) if args.round_to > 1 else None
    except ValueError as err:  # a small model's LLM-Pruner layer range cannot reach the share
        parser.error(f"{err} (a smaller --share, e.g. 0.3, fits the tiny models)")
    pruned = apply(plan, copy.deepcopy(dense), graph)
    name = f"pruned_{round(100 * args.share)}"
    models = {"dense": dense, name: pruned}
    result["plan"] = {"share_decoder": plan.share_decoder, "share_model": plan.share_model,
                      "llm_pruner_ratio": plan.llm_pruner_ratio, "params_after": plan.params_after,
                      "mlp_widths": mlp_widths(pruned)}
    if aligned_plan is not None:
        models[f"{name}_round{args.round_to}"] = apply(aligned_plan, copy.deepcopy(dense), graph)
        result["aligned_plan"] = {"round_to": args.round_to, "share_decoder": aligned_plan.share_decoder,
                                  "params_after": aligned_plan.params_after,
                                  "mlp_widths": mlp_widths(models[f"{name}_round{args.round_to}"])}
    log(f"traced in {result['trace_s']:.1f} s; pruned {plan.share_decoder:.1%} of the decoder"
        + (f" ({aligned_plan.share_decoder:.1%} with widths in multiples of {args.round_to})" if aligned_plan else ""))
    rows = compare(models, prompt_len=128, new_tokens=args.new_tokens, batches=(1, 16), prefill_len=512, repeats=3)
    bw = bandwidth_gbs(device)
    if bw:
        floor = decode_floor(dense, bw, prompt_len=128, new_tokens=args.new_tokens)
        share = rows[0]["decode_tok_s_bs1"] / floor["floor_tok_s"]
        result.update(bandwidth_GBs=bw, dense_decode_floor=floor, dense_decode_floor_tok_s=floor["floor_tok_s"],
                      dense_decode_share_of_floor=share)
        if share > 1.0:  # faster than reading the weights once a token: the floor, not the decoder, is wrong
            raise SystemExit(f"dense decode at {share:.0%} of the bandwidth floor ({floor['floor_tok_s']:.0f} tok/s): "
                             "the floor is wrong, not the decoder")
        log(f"read bandwidth {bw['read']:.0f} GB/s (copy {bw['copy']:.0f}); dense decode floor "
            f"{floor['floor_tok_s']:.0f} tok/s, measured {rows[0]['decode_tok_s_bs1']:.0f} ({share:.0%}; target >= 70%)")
    result["speed"] = rows
    for r in rows:
        log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    result["saturated_decode"] = saturated_decode(models, device, args.new_tokens, max_batch=args.max_batch)
    for name, best in result["saturated_decode"].items():
        log(f"{name}: " + ("no batch above 16 fits" if best is None else
                           f"{best['decode_tok_s']:.0f} decode tok/s at batch {best['batch']}"
                           + (" (the cap, not the memory)" if best["capped"] else " (the largest that fits)")))
    models.clear()  # the dense model and the aligned copy gone: notebook 04 holds the pruned model alone
    del dense
    gc.collect()

    # 3. LoRA steps on the pruned shape (the dense model gone, as in notebook 04)
    lora_steps(pruned, device, result)

    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2, default=str)
    print(json.dumps({k: v for k, v in result.items() if k != "speed"}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
