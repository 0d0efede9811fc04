"""How long does ``tailored.graph.trace`` take? Median of 3 traces per model (after one warm-up).

    python benchmarks/bench_trace.py                 # tiny and SmolLM2-135M
    python benchmarks/bench_trace.py --models tiny   # just one

Prints wall-clock and CPU seconds per trace. Target: SmolLM2-135M under 10 s on a 2-core laptop CPU.
Loading the model is not timed. SmolLM2 needs the converted checkpoint (``tailored prepare``).
"""

from __future__ import annotations

import argparse
import statistics
import time

from tailored.graph import trace
from tailored.models import load


def bench(spec: str, repeats: int = 3) -> dict:
    model, _ = load(spec)
    trace(model)  # warm-up: first-call costs of autograd and the attention code
    wall, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        graph = trace(model)
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    kinds = {k: len(graph.of_kind(k)) for k in ("attention", "qheads", "mlp", "hidden")}
    return {"model": spec, "wall_s": statistics.median(wall), "cpu_s": statistics.median(cpu),
            "layers": graph.num_layers, "group_sets": kinds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny", "smollm2-135m"])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"{'model':<16}{'layers':>7}{'wall s (median)':>17}{'cpu s':>8}  group sets")
    for spec in args.models:
        r = bench(spec, args.repeats)
        print(f"{r['model']:<16}{r['layers']:>7}{r['wall_s']:>17.3f}{r['cpu_s']:>8.3f}  {r['group_sets']}")


if __name__ == "__main__":
    main()
