"""Fused linear GRPO loss (hidden x lm_head, no [N, V] logits) against the paths it replaces.

Methods, each forward + backward w.r.t. the hidden states and the lm_head weight (dapo, beta
0.04, temperature 0.9, ragged completion mask):

- ``fused`` (ours): ``geovlm.kernels.linear_grpo_loss``;
- ``materialised``: the lm_head matmul to ``[B, L, V]`` logits, then an eager log-softmax + gather
  (``reference.selective_log_softmax`` on CUDA, TRL's own ``selective_log_softmax`` on CPU) and
  the GRPO math of ``reference.grpo_loss_from_logps`` (which the test suite checks against TRL's
  ``_compute_loss``);
- ``liger``: Liger-Kernel's chunked ``LigerFusedLinearGRPOLoss`` (``compiled=False``: its
  torch.compile of the loss math only shortens the small elementwise part and costs a minute of
  compilation per shape);
- CUDA only: ``logits_kernel`` (the lm_head matmul, then ``geovlm.kernels.grpo_loss`` on the
  logits) and ``matmul_floor`` (6 N H V FLOPs, 2 NHV forward and 4 NHV backward, at the bf16 rate
  of the lm_head-shaped GEMM measured in the same run).

**CPU** (pytest-benchmark: ``make bench``, or ``pytest benchmarks/bench_linear_grpo_loss.py``):
fp32, one torch thread, a smoke shape and a medium one; group ``linear_grpo_loss fwd+bwd``, ours
against the materialised path and Liger, loss and both gradients checked to agree before timing.
The CPU path is the chunked torch one: it trades time for bounded memory.

**CUDA** (the script: ``python benchmarks/bench_linear_grpo_loss.py [--csv PATH]``, run by
``gpu_check.sh``): bf16 Qwen2.5-VL shapes (H = 2,048 for 3B, 3,584 for 7B; V = 151,936; N = 8k
and 16k completion tokens as B x 1,024): median time (``triton.testing.do_bench``), peak memory
above the inputs and the ratios to the fused kernel.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import _provenance  # benchmarks/: the script's directory is on sys.path, and pytest's rootdir
import _timing
import pytest
import torch
from _compare import Case, anchor, close, ours, time_method

from geovlm.kernels import grpo_loss, linear_grpo_loss, linear_selective_log_softmax, reference

VOCAB = 151_936
SEQ = 1_024
CUDA_SHAPES = [(2_048, 8), (2_048, 16), (3_584, 8), (3_584, 16)]  # (H, B): N = B * 1,024
CPU_SHAPES = [(64, 4, 61, 2_003), (128, 2, 256, 16_384)]  # (H, B, L, V): smoke, medium
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


def trl_logps(logits: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """TRL's own ``selective_log_softmax`` (the GPU image lacks TRL: CPU only)."""
    from trl.trainer.utils import selective_log_softmax as trl_selective_log_softmax

    return trl_selective_log_softmax(logits, ids, temperature)


def fused_loss(x: Inputs) -> torch.Tensor:
    return linear_grpo_loss(x.hidden, x.weight, x.ids, x.adv, old_logp=x.old, ref_logp=x.ref,
                            completion_mask=x.mask, **OPTIONS)[0]


def materialised_loss(x: Inputs, logps: Callable = reference.selective_log_softmax
                      ) -> torch.Tensor:
    opts = dict(OPTIONS)
    temperature = opts.pop("temperature")
    logp = logps(x.hidden @ x.weight.t(), x.ids, temperature)
    return reference.grpo_loss_from_logps(logp, x.old, x.ref, x.adv, x.mask, **opts)[0]


def logits_kernel_loss(x: Inputs) -> torch.Tensor:
    logits = x.hidden @ x.weight.t()
    return grpo_loss(logits, x.old, x.ref, x.ids, x.adv, x.mask, reduce=True, **OPTIONS)[0]


def liger_loss() -> Callable[[Inputs], torch.Tensor] | None:
    """Liger's chunked fused-linear GRPO loss, or None without liger-kernel."""
    try:
        from liger_kernel.chunked_loss.grpo_loss import LigerFusedLinearGRPOLoss
    except ImportError:
        return None
    module = LigerFusedLinearGRPOLoss(
        beta=OPTIONS["beta"], compiled=False, use_ref_model=True,
        epsilon_low=OPTIONS["eps_low"], epsilon_high=OPTIONS["eps_high"],
        loss_type=OPTIONS["loss_type"], temperature=OPTIONS["temperature"],
    )
    return lambda x: module(x.hidden, x.weight, x.ids, x.mask, x.adv,
                            ref_per_token_logps=x.ref, old_per_token_logps=x.old)[0]


# --------------------------------------------------------------------------- CPU: pytest-benchmark

MATERIALISED = "materialised logits + TRL selective_log_softmax"
LIGER = "Liger LigerFusedLinearGRPOLoss (chunked)"


def cpu_shape_id(shape: tuple[int, int, int, int]) -> str:
    h, b, seq, v = shape
    return f"H={h} N={b * seq:,} V={v:,} fp32"


@pytest.fixture(scope="module", params=CPU_SHAPES, ids=cpu_shape_id)
def linear_case(request) -> Case:
    x = make_inputs(*request.param, "cpu", torch.float32)

    def loss_and_grads(loss: Callable[[Inputs], torch.Tensor]):
        def run():
            value = loss(x)
            return value, *torch.autograd.grad(value, (x.hidden, x.weight))

        return run

    methods = {
        "ours": ours(loss_and_grads(fused_loss)),
        MATERIALISED: anchor(loss_and_grads(lambda x: materialised_loss(x, trl_logps))),
    }
    liger = liger_loss()
    if liger is not None:
        methods[LIGER] = anchor(loss_and_grads(liger))
    return Case("linear_grpo_loss dapo fwd+bwd", cpu_shape_id(request.param), methods,
                close(rtol=5e-5))


@pytest.mark.parametrize("method", ["ours", MATERIALISED, LIGER])
def test_linear_grpo_loss(benchmark, linear_case, method):
    if method not in linear_case.methods:
        pytest.skip("liger-kernel is not installed")
    time_method(benchmark, linear_case, method)


# --------------------------------------------------------------------------- CUDA: the script


def bench_shape(h: int, b: int, seq: int, v: int) -> list[dict]:
    x = make_inputs(h, b, seq, v, "cuda", torch.bfloat16)
    n = b * seq

    def step(loss: Callable[[Inputs], torch.Tensor]) -> Callable[[], None]:
        def call():
            x.hidden.grad = None
            x.weight.grad = None
            loss(x).backward()
        return call

    methods = {"fused": fused_loss, "materialised": materialised_loss,
               "logits_kernel": logits_kernel_loss}
    liger = liger_loss()
    if liger is not None:
        methods["liger"] = liger
    rows = []
    for name, loss in methods.items():
        call = step(loss)
        try:
            ms = _timing.median_ms(call, warmup_ms=50, rep_ms=400)
            mem = _timing.peak_bytes(call) / 2**20
        except torch.OutOfMemoryError:
            ms, mem = float("nan"), float("nan")
            torch.cuda.empty_cache()
        rows.append(dict(shape=f"H={h} N={n} V={v}", method=name, ms=ms, peak_mib=mem))
        print(f"  {name:14s} {ms:10.3f} ms  {mem:10.1f} MiB", flush=True)
    x.hidden.grad = None
    x.weight.grad = None

    rate = _timing.matmul_rate(n, v, h)
    floor_ms = 6 * n * h * v / rate * 1e3
    rows.append(dict(shape=f"H={h} N={n} V={v}", method="matmul_floor", ms=floor_ms,
                     peak_mib=float("nan"), tflops=rate / 1e12))
    print(f"  {'matmul_floor':14s} {floor_ms:10.3f} ms  (lm_head GEMM at {rate / 1e12:.3g} "
          "TFLOP/s)", flush=True)
    fused = rows[0]
    for row in rows:
        row["time_vs_fused"] = row["ms"] / fused["ms"]
        row["mem_vs_fused"] = row["peak_mib"] / fused["peak_mib"]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", help="write every row to this CSV file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: this script times the Triton kernels on a GPU; the CPU "
              "benchmarks run through pytest-benchmark (make bench)", file=sys.stderr)
        return 2
    print(f"device: {_provenance.machine('cuda')}  torch {torch.__version__}  "
          f"commit {_provenance.commit()}")
    rows = []
    for h, b in CUDA_SHAPES:
        print(f"H={h} B={b} L={SEQ} V={VOCAB}", flush=True)
        rows += bench_shape(h, b, SEQ, VOCAB)
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
