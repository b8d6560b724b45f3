"""CUDA measurement for the kernel benchmarks' GPU mode (run by ``gpu_check.sh``).

CPU timings go through pytest-benchmark (``make bench``); these helpers are for CUDA only:

- ``median_ms(fn)``: median milliseconds per call, ``triton.testing.do_bench`` after a warm-up
  call that also compiles and autotunes;
- ``peak_bytes(fn)``: peak memory allocated during one call, above what was allocated before;
- ``copy_bandwidth()``: bytes per second of a large device-to-device copy (read + write counted),
  the practical memory-bandwidth ceiling the roofline compares against;
- ``matmul_rate(m, n, k)``: bf16 FLOP/s of an ``[m, k] x [k, n]`` GEMM.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def median_ms(fn: Callable[[], object], warmup_ms: int = 25, rep_ms: int = 200) -> float:
    """Median milliseconds of ``fn()`` on CUDA; the first call (compilation, autotuning) and
    ``do_bench``'s own warm-up are not timed. ``rep_ms`` is do_bench's target total time."""
    from triton.testing import do_bench

    fn()
    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def peak_bytes(fn: Callable[[], object]) -> int:
    """Peak CUDA bytes allocated while ``fn()`` runs, above the bytes live before it."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Bytes/s of ``dst.copy_(src)`` on ``nbytes`` (2 x nbytes moved per copy)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").fill_(1.0)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3)


def matmul_rate(m: int, n: int, k: int) -> float:
    """bf16 FLOP/s of one ``[m, k] @ [k, n]`` GEMM (2 m n k FLOPs) on CUDA."""
    a = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(k, n, dtype=torch.bfloat16, device="cuda")
    ms = median_ms(lambda: a @ b)
    return 2 * m * n * k / (ms * 1e-3)
