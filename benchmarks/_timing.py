"""Shared measuring helpers for the kernel benchmarks.

- ``median_ms(fn)``: median milliseconds per call; ``triton.testing.do_bench`` on CUDA (after a
  warm-up call that also compiles), a ``perf_counter`` median on CPU.
- ``peak_bytes(fn)``: CUDA peak memory allocated during one call, above what was allocated before.
- ``copy_bandwidth(device)``: bytes per second of a large device-to-device copy (read + write
  counted), the practical memory-bandwidth ceiling the roofline compares against.
- ``matmul_rate(m, n, k)``: bf16 FLOP/s of an ``[m, k] x [k, n]`` GEMM on CUDA.
- ``machine()``, ``commit()``, ``load()``: what a RESULTS.md row names.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable

import torch


def median_ms(fn: Callable[[], object], device: str, repeats: int = 15) -> float:
    """Median milliseconds of ``fn()``; warm-up calls (compilation, autotuning, caches, and the
    CPU thread pool, which starts slowly on a loaded machine) are not timed."""
    for _ in range(1 if device == "cuda" else 5):
        fn()
    if device == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def peak_bytes(fn: Callable[[], object]) -> int:
    """Peak CUDA bytes allocated while ``fn()`` runs, above the bytes live before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def copy_bandwidth(device: str = "cuda", nbytes: int = 2 << 30) -> float:
    """Bytes/s of ``dst.copy_(src)`` on ``nbytes`` (2 x nbytes moved per copy)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / (ms * 1e-3)


def matmul_rate(m: int, n: int, k: int, device: str = "cuda") -> float:
    """bf16 FLOP/s of one ``[m, k] @ [k, n]`` GEMM (2 m n k FLOPs)."""
    a = torch.randn(m, k, dtype=torch.bfloat16, device=device)
    b = torch.randn(k, n, dtype=torch.bfloat16, device=device)
    ms = median_ms(lambda: a @ b, device)
    return 2 * m * n * k / (ms * 1e-3)


def machine() -> str:
    """GPU name on CUDA, else the CPU model and core count."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    model = platform.processor() or "CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines()
                     if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def load() -> str:
    """The 1-minute load average (the machine may be shared)."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "n/a"
