"""Memory and time of the importance step (``compute_importance``) against plain forward + backward passes.

    python benchmarks/bench_importance.py                        # SmolLM2-135M, CPU, 10 × 128 tokens
    python benchmarks/bench_importance.py --device cuda          # the same on a GPU
    python benchmarks/bench_importance.py --random-init          # SmolLM2's shapes, random weights (no checkpoint)

Measured side by side in one run, on the class profile's calibration (10 samples × 128 tokens):

- peak memory of each case above what the loaded model already occupies, divided by that of ONE plain
  forward + backward of the whole batch that keeps every gradient (target for first-order: ≤ 0.75);
- wall time of each case divided by the time of the same forward + backward passes without the importance
  hooks (target for first-order: ≤ 1.3), and by the time of the one plain whole-batch pass.

How memory is measured. CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
what was allocated before (exact: every tensor goes through torch's allocator). CPU: tracemalloc cannot see
torch's buffers, so each case runs in a fresh subprocess: load the model, one no-grad warm-up forward, then
reset the kernel's resident-set high-water mark (``echo 5 > /proc/self/clear_refs``), run the case once and
read ``VmHWM − VmRSS(before)``. The subprocesses run with ``MALLOC_MMAP_THRESHOLD_=1048576`` so that
glibc gives every buffer of 1 MiB or more its own mapping and returns it to the kernel when freed: resident
memory then tracks live tensors instead of what the heap keeps cached. Where ``clear_refs`` is refused, a
thread samples VmRSS every millisecond instead (it can miss very short peaks).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tailored.graph import trace  # noqa: E402
from tailored.importance import GRADIENT_ESTIMATORS, calibration_batch, compute_importance  # noqa: E402

# SmolLM2-135M-Instruct's shapes, for --random-init (memory and time do not depend on the weights' values)
SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
                     max_position_embeddings=8192, rms_norm_eps=1e-5)

# name -> (what runs, keyword arguments); micro_batch None = the whole batch in one pass
CASES = {
    "plain fwd+bwd, whole batch": ("plain", {"micro_batch": None}),
    "plain fwd+bwd, per sample": ("plain", {"micro_batch": 1}),
    "param_first (default, per sample)": ("importance", {"estimators": ("param_first",), "micro_batch": 1}),
    "param_first, one pass": ("importance", {"estimators": ("param_first",), "micro_batch": None}),
    "all 4 gradient estimators": ("importance", {"estimators": GRADIENT_ESTIMATORS, "micro_batch": 1}),
}


def same_passes(case: str) -> str:
    """The plain case that runs the same forward + backward passes as ``case``."""
    return "plain fwd+bwd, per sample" if CASES[case][1]["micro_batch"] == 1 else "plain fwd+bwd, whole batch"


# ----------------------------------------------------------------------------------------------- setup
def setup(args):
    """Model (eval mode, on the device), its graph and the calibration batch (n_samples, seq_len)."""
    device = torch.device(args.device)
    if args.random_init:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE))
        tokenizer = None
    else:
        from tailored.models import load

        model, tokenizer = load(args.model, device=args.device)
    model.eval()
    graph = trace(model)
    batch, source = None, "random tokens"
    if tokenizer is not None:
        try:
            from tailored.data import text_corpus

            batch = calibration_batch(tokenizer, text_corpus("calibration"), args.samples, args.seq_len, seed=0)
            source = "tailored.data.text_corpus('calibration') (Wikipedia)"
        except Exception as exc:  # the data cache may not be prepared: the numbers do not depend on it
            source = f"random tokens ({type(exc).__name__}: calibration text unavailable)"
    if batch is None:
        vocab = model.get_input_embeddings().num_embeddings
        batch = torch.randint(0, vocab, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    return model, graph, batch.to(device), source


def kinds_arg(args):
    return None if args.kinds == "all" else tuple(args.kinds.split(","))


def run_case(case: str, model, graph, batch, args) -> None:
    """Run one case once. Plain cases keep every gradient (as a training step before optimizer.step would)."""
    what, kw = CASES[case]
    n = batch.shape[0]
    mb = kw["micro_batch"] or n
    if what == "plain":
        model.zero_grad(set_to_none=True)
        for i in range(0, n, mb):
            ids = batch[i:i + mb]
            (model(input_ids=ids, labels=ids, use_cache=False).loss * (ids.shape[0] / n)).backward()
    else:
        compute_importance(model, graph, batch, estimators=kw["estimators"], micro_batch=mb,
                           kinds=kinds_arg(args), progress=False)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------- memory
def _status(field: str) -> float:
    """A field of /proc/self/status in MiB (VmRSS, VmHWM)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


class _Sampler(threading.Thread):
    """Fallback peak-RSS meter: samples VmRSS every millisecond."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.stop = _status("VmRSS"), threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, _status("VmRSS"))
            time.sleep(0.001)


def memory_worker(case: str, args) -> dict:
    """In a fresh process: the peak memory of one run of ``case`` above the loaded model, in MiB."""
    model, graph, batch, _ = setup(args)
    with torch.no_grad():  # warm-up: lazy initializations that are not part of either step
        model(input_ids=batch[:1], use_cache=False)
    model.zero_grad(set_to_none=True)
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run_case(case, model, graph, batch, args)
        torch.cuda.synchronize()
        return {"peak_mib": (torch.cuda.max_memory_allocated() - before) / 2**20, "method": "cuda allocator"}
    before = _status("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM to the current RSS
        if _status("VmHWM") > before + 16:
            raise OSError("VmHWM was not reset")
    except OSError:
        sampler = _Sampler()
        sampler.start()
        run_case(case, model, graph, batch, args)
        sampler.stop.set()
        sampler.join()
        return {"peak_mib": sampler.peak - before, "method": "VmRSS sampled every 1 ms"}
    run_case(case, model, graph, batch, args)
    return {"peak_mib": _status("VmHWM") - before, "method": "VmHWM after clear_refs"}


def measure_memory(case: str, argv: list[str]) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576", "TQDM_DISABLE": "1"}
    out = subprocess.run([sys.executable, __file__, *argv, "--worker", case], env=env, capture_output=True,
                         text=True)
    if out.returncode != 0:
        print(f"memory worker for {case!r} failed:\n{out.stderr[-3000:]}", file=sys.stderr)
        return {"peak_mib": float("nan"), "method": "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ time
def measure_time(model, graph, batch, args) -> dict[str, float]:
    """Median wall seconds per case: one warm-up each, then ``repeats`` rounds with the cases interleaved
    (so a slow spell of a shared machine hits all of them alike)."""
    times: dict[str, list[float]] = {c: [] for c in CASES}
    for case in CASES:
        run_case(case, model, graph, batch, args)
    for _ in range(args.repeats):
        for case in CASES:
            model.zero_grad(set_to_none=True)
            gc.collect()
            sync(args.device)
            t = time.perf_counter()
            run_case(case, model, graph, batch, args)
            sync(args.device)
            times[case].append(time.perf_counter() - t)
    model.zero_grad(set_to_none=True)
    return {c: statistics.median(v) for c, v in times.items()}


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="a spec for tailored.models.load")
    ap.add_argument("--random-init", action="store_true", help="SmolLM2-135M's shapes with random weights")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--kinds", default="all", help="comma-separated group kinds to score, or 'all'")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(memory_worker(args.worker, args)))
        return
    argv = ["--model", args.model, "--device", args.device, "--samples", str(args.samples), "--seq-len",
            str(args.seq_len), "--kinds", args.kinds, "--threads", str(args.threads)]
    argv += ["--random-init"] if args.random_init else []

    model, graph, batch, source = setup(args)
    name = "SmolLM2-135M shapes, random weights" if args.random_init else args.model
    dev = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"model: {name} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"{next(model.parameters()).dtype}) on {dev}; torch {torch.__version__}")
    print(f"calibration: {tuple(batch.shape)} tokens from {source}; group kinds scored: {args.kinds}")

    mem = {}
    for case in CASES:
        mem[case] = measure_memory(case, argv)
        print(f"  memory {case:<36} {mem[case]['peak_mib']:8.0f} MiB ({mem[case]['method']})", flush=True)
    times = measure_time(model, graph, batch, args)

    base_mem = mem["plain fwd+bwd, whole batch"]["peak_mib"]
    base_time = times["plain fwd+bwd, whole batch"]
    rows = []
    print()
    print(f"{'case':<36}{'peak MiB':>9}{'/ plain batch':>14}{'time s':>9}{'/ same passes':>14}{'/ plain batch':>14}")
    for case in CASES:
        r = {"case": case, "peak_mib": mem[case]["peak_mib"], "memory_ratio": mem[case]["peak_mib"] / base_mem,
             "time_s": times[case], "time_ratio_same_passes": times[case] / times[same_passes(case)],
             "time_ratio_plain_batch": times[case] / base_time}
        rows.append(r)
        print(f"{case:<36}{r['peak_mib']:>9.0f}{r['memory_ratio']:>14.2f}{r['time_s']:>9.2f}"
              f"{r['time_ratio_same_passes']:>14.2f}{r['time_ratio_plain_batch']:>14.2f}")
    first = next(r for r in rows if r["case"].startswith("param_first (default"))
    print()
    print(f"first-order (default): memory ratio {first['memory_ratio']:.2f} (target ≤ 0.75), "
          f"time ratio {first['time_ratio_same_passes']:.2f} vs the same passes (target ≤ 1.3), "
          f"{first['time_ratio_plain_batch']:.2f} vs one whole-batch pass")
    print("peak = memory above the loaded model during the step; plain passes keep every gradient.")
    if args.json:
        methods = sorted({m["method"] for m in mem.values()})
        Path(args.json).write_text(json.dumps({"model": name, "device": dev, "batch": list(batch.shape),
                                               "kinds": args.kinds, "memory_method": methods, "rows": rows},
                                              indent=2))


if __name__ == "__main__":
    main()
