"""Fused linear GRPO loss (hidden x lm_head, no [N, V] logits) against the paths it replaces.

Run: ``python benchmarks/bench_linear_grpo_loss.py [--csv PATH]``. On CUDA it times bf16
Qwen2.5-VL shapes (H = 2,048 for 3B, 3,584 for 7B; V = 151,936; N = 8k and 16k completion tokens
as B x 1,024); on CPU one tiny fp32 smoke shape. For each shape, forward + backward of:

- ``fused``: ``geovlm.kernels.linear_grpo_loss`` (this kernel);
- ``materialised``: the lm_head matmul to [B, L, V] logits, then the eager torch reference
  (``reference.selective_log_softmax`` + ``grpo_loss_from_logps``);
- ``logits_kernel``: the lm_head matmul, then ``geovlm.kernels.grpo_loss`` on the logits;
- ``liger``: Liger-Kernel's chunked ``LigerFusedLinearGRPOLoss`` (``compiled=False``: its
  torch.compile of the loss math only shortens the small elementwise part and costs a minute of
  compilation per shape), skipped when liger-kernel is not installed;
- ``matmul_floor``: 6 N H V FLOPs (2 NHV forward, 4 NHV backward) at the bf16 rate of the
  lm_head-shaped GEMM measured in the same run.

Every row gives the median time (``triton.testing.do_bench`` on CUDA, a perf_counter median on
CPU), the peak memory above the inputs (CUDA only) and the ratios to the fused kernel. Timing
helpers are local: ``benchmarks/_timing.py`` did not exist when this was written.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from geovlm.kernels import reference
from geovlm.kernels.grpo_loss import grpo_loss
from geovlm.kernels.linear_grpo_loss import linear_grpo_loss, linear_selective_log_softmax

VOCAB = 151_936
SEQ = 1_024
CUDA_SHAPES = [(2_048, 8), (2_048, 16), (3_584, 8), (3_584, 16)]  # (H, B): N = B * 1,024
CPU_SHAPE = (64, 4, 61, 2_003)  # (H, B, L, V)
OPTIONS = dict(beta=0.04, eps_low=0.2, eps_high=0.28, loss_type="dapo", temperature=0.9)


@dataclass
class Inputs:
    hidden: torch.Tensor
    weight: torch.Tensor
    ids: torch.Tensor
    mask: torch.Tensor
    adv: torch.Tensor
    old: torch.Tensor
    ref: torch.Tensor


def make_inputs(h: int, b: int, seq: int, v: int, device: str, dtype: torch.dtype) -> Inputs:
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(b, seq, h, device=device, dtype=dtype, generator=g)
    weight = torch.randn(v, h, device=device, dtype=dtype, generator=g) / h**0.5
    ids = torch.randint(0, v, (b, seq), device=device, generator=g)
    lengths = torch.randint(seq // 2, seq + 1, (b, 1), device=device, generator=g)
    mask = torch.arange(seq, device=device)[None, :] < lengths
    adv = torch.randn(b, device=device, generator=g)
    # Old / reference log-probs near the policy's, as in training (ratios around 1).
    with torch.no_grad():
        logp = linear_selective_log_softmax(hidden, weight, ids,
                                            temperature=OPTIONS["temperature"])
    old = logp + 0.05 * torch.randn(b, seq, device=device, generator=g)
    ref = logp + 0.05 * torch.randn(b, seq, device=device, generator=g)
    return Inputs(hidden.requires_grad_(), weight.requires_grad_(), ids, mask, adv, old, ref)


def run_fused(x: Inputs) -> None:
    loss, _ = linear_grpo_loss(x.hidden, x.weight, x.ids, x.adv, old_logp=x.old, ref_logp=x.ref,
                               completion_mask=x.mask, **OPTIONS)
    loss.backward()


def run_materialised(x: Inputs) -> None:
    opts = dict(OPTIONS)
    temperature = opts.pop("temperature")
    logits = x.hidden @ x.weight.t()
    logp = reference.selective_log_softmax(logits, x.ids, temperature)
    loss, _ = reference.grpo_loss_from_logps(logp, x.old, x.ref, x.adv, x.mask, **opts)
    loss.backward()


def run_logits_kernel(x: Inputs) -> None:
    logits = x.hidden @ x.weight.t()
    loss, _ = grpo_loss(logits, x.old, x.ref, x.ids, x.adv, x.mask, reduce=True, **OPTIONS)
    loss.backward()


def liger_runner() -> Callable[[Inputs], None] | None:
    try:
        from liger_kernel.chunked_loss.grpo_loss import LigerFusedLinearGRPOLoss
    except ImportError:
        return None
    opts = dict(OPTIONS)
    module = LigerFusedLinearGRPOLoss(
        beta=opts["beta"], compiled=False, use_ref_model=True, epsilon_low=opts["eps_low"],
        epsilon_high=opts["eps_high"], loss_type=opts["loss_type"],
        temperature=opts["temperature"],
    )

    def run(x: Inputs) -> None:
        loss, _ = module(x.hidden, x.weight, x.ids, x.mask, x.adv,
                         ref_per_token_logps=x.ref, old_per_token_logps=x.old)
        loss.backward()

    return run


def time_ms(fn: Callable[[], None], cuda: bool, repeats: int) -> float:
    if cuda:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=50, rep=400, return_mode="median"))
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def peak_mib(fn: Callable[[], None]) -> float:
    """Peak CUDA memory above what was allocated before the call (inputs, weights), in MiB."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bench_shape(h: int, b: int, seq: int, v: int, device: str) -> list[dict]:
    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    x = make_inputs(h, b, seq, v, device, dtype)
    n = b * seq

    def step(run):
        def call():
            x.hidden.grad = None
            x.weight.grad = None
            run(x)
        return call

    methods = {"fused": run_fused, "materialised": run_materialised,
               "logits_kernel": run_logits_kernel}
    liger = liger_runner()
    if liger is not None:
        methods["liger"] = liger
    rows = []
    for name, run in methods.items():
        call = step(run)
        try:
            call()  # compile / autotune outside the timing
            ms = time_ms(call, cuda, repeats=21)
            mem = peak_mib(call) if cuda else float("nan")
        except torch.OutOfMemoryError:
            ms, mem = float("nan"), float("nan")
            torch.cuda.empty_cache()
        rows.append(dict(shape=f"H={h} N={n} V={v}", method=name, ms=ms, peak_mib=mem))
        print(f"  {name:14s} {ms:10.3f} ms  {mem:10.1f} MiB", flush=True)
    x.hidden.grad = None
    x.weight.grad = None

    with torch.no_grad():
        h2d = x.hidden.detach().reshape(n, h)
        w = x.weight.detach()
        gemm_ms = time_ms(lambda: torch.mm(h2d, w.t()), cuda, repeats=21)
    rate = 2 * n * h * v / (gemm_ms * 1e-3)
    floor_ms = 6 * n * h * v / rate * 1e3
    rows.append(dict(shape=f"H={h} N={n} V={v}", method="matmul_floor", ms=floor_ms,
                     peak_mib=float("nan"), tflops=rate / 1e12))
    print(f"  {'matmul_floor':14s} {floor_ms:10.3f} ms  (lm_head GEMM at {rate / 1e12:.3g} "
          "TFLOP/s)", flush=True)
    fused = rows[0]
    for row in rows:
        row["time_vs_fused"] = row["ms"] / fused["ms"]
        row["mem_vs_fused"] = row["peak_mib"] / fused["peak_mib"] if cuda else float("nan")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"],
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--csv", help="write every row to this CSV file")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        shapes = [(h, b, SEQ, VOCAB) for h, b in CUDA_SHAPES]
        print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    else:
        shapes = [CPU_SHAPE]
        # One thread: intra-op threads fighting other processes for shared cores swamp the
        # differences at this size.
        torch.set_num_threads(1)
        print("device: cpu, 1 thread (smoke shape; the torch paths, not the Triton kernels)")
    rows = []
    for h, b, seq, v in shapes:
        print(f"H={h} B={b} L={seq} V={v}", flush=True)
        rows += bench_shape(h, b, seq, v, args.device)
    print("\nshape                       method          median ms   peak MiB   time/fused "
          "mem/fused")
    for r in rows:
        print(f"{r['shape']:27s} {r['method']:14s} {r['ms']:10.3f} {r['peak_mib']:10.1f} "
              f"{r['time_vs_fused']:10.2f} {r['mem_vs_fused']:9.2f}")
    if args.csv:
        os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
