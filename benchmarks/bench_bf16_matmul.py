"""bf16 against fp32 matrix products on this CPU, in the layouts a model uses (one thread, milliseconds).

Whether bf16 can speed up CPU scoring depends on what the CPU exposes to torch, not on its model name:
``torch.backends.cpu.get_cpu_capability()`` and the ``avx512_bf16`` / ``amx_bf16`` flags of /proc/cpuinfo.
Without them bf16 products fall back to slow conversions. Prints the capability beside the timings::

    OMP_NUM_THREADS=1 python benchmarks/bench_bf16_matmul.py
"""

from __future__ import annotations

import time
from pathlib import Path

import torch


def bench(x: torch.Tensor, w: torch.Tensor, n: int = 5) -> float:
    """Milliseconds per ``F.linear(x, w)`` (the mean of ``n`` calls after one warm-up)."""
    torch.nn.functional.linear(x, w)
    t0 = time.perf_counter()
    for _ in range(n):
        torch.nn.functional.linear(x, w)
    return (time.perf_counter() - t0) / n * 1e3


def cpu_flags() -> list[str]:
    info = Path("/proc/cpuinfo")
    line = next((ln for ln in info.read_text().splitlines() if ln.startswith("flags")), "") if info.exists() else ""
    return sorted(f for f in line.split() if "avx512" in f or "amx" in f or f in ("avx", "avx2"))


def main() -> None:
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"flags {' '.join(cpu_flags()) or 'none listed'}")
    for m in (256, 1024):  # tokens per batch; SmolLM2-135M's MLP up projection: 576 -> 1536
        a32, w32 = torch.randn(m, 576), torch.randn(1536, 576)
        a16, w16 = a32.bfloat16(), w32.bfloat16()
        fp32 = bench(a32, w32)
        bf16 = bench(a16, w16)
        print(f"{m:5d} x 576 @ 576 x 1536: fp32 {fp32:8.2f} ms, bf16 {bf16:8.2f} ms, bf16 speed {fp32 / bf16:.2f}x")


if __name__ == "__main__":
    main()
