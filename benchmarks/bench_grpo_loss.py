"""Fused GRPO loss over logits (``geovlm.kernels.grpo_loss``) against TRL's eager path and, on
CUDA, Liger-Kernel's ``triton_grpo_loss``.

**CPU** (pytest-benchmark: ``make bench``, or ``pytest benchmarks/bench_grpo_loss.py``): fp32
logits ``[B, L + 1, V]`` at a smoke shape and a medium one, one torch thread; ours runs its
chunked torch path. Groups, each checked to agree (loss and gradient) before it is timed:

- ``grpo_loss <loss_type>/<IS level> fwd+bwd`` (TRL's default ``dapo`` with token-level ratios,
  and ``grpo`` with sequence-level ratios; beta = 0.04, ragged completion mask): ours
  (``grpo_loss(..., reduce=True, inplace=False)`` then ``torch.autograd.grad``) against TRL's
  eager path: ``trl.trainer.utils.selective_log_softmax`` (what ``GRPOTrainer`` runs on CPU)
  followed by the GRPO math of ``reference.grpo_loss_from_logps``, which
  ``tests/test_kernels/test_reference.py`` checks against TRL's own ``_compute_loss``;
- ``selective_log_softmax (no grad)``, the old-policy / reference pass: ours against TRL's.

**CUDA** (the script: ``python benchmarks/bench_grpo_loss.py [--csv PATH]``, run by
``gpu_check.sh``): bf16 logits at Qwen2.5-VL's vocabulary (V = 151,936) with B x L = 4k and 16k
completion tokens (B x 1,024), completions of ragged length (a quarter of the positions masked on
average), ``dapo``/token and ``grpo``/sequence, beta = 0.04. Methods, each differentiated w.r.t.
the logits (``torch.autograd.grad``, no accumulation copy):

- ``ours``: ``geovlm.kernels.grpo_loss(..., reduce=True)``;
- ``liger``: ``liger_kernel.transformers.grpo_loss.triton_grpo_loss(..., reduce=True)``;
- ``eager``: TRL's non-Triton path: ``logits / T`` then a per-sequence ``log_softmax`` + gather
  (the loop TRL uses for bf16 logits), then the same GRPO math (``reference.grpo_loss_from_logps``).

Times are medians (``triton.testing.do_bench``) of forward, backward (repeated on one retained
graph) and forward + backward, timed with ``inplace=False`` so every call reads real logits
(in-place backward moves the same bytes). Peak memory is one forward + backward with the methods'
defaults (``inplace=True`` for ours and Liger), above the inputs. The bandwidth floor is the
bytes the algorithm must move (valid rows read in forward, read again in backward, every gradient
row written) over the copy bandwidth measured in the same run; ``floor%`` is floor time / time.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import sys
from collections.abc import Callable
from dataclasses import dataclass

import _provenance  # benchmarks/: the script's directory is on sys.path, and pytest's rootdir
import _timing
import pytest
import torch
import torch.nn.functional as F
from _compare import Case, anchor, close, ours, time_method

from geovlm.kernels import grpo_loss, reference, selective_log_softmax

VOCAB = 151_936
CUDA_SHAPES = [(4, 1_024), (16, 1_024)]  # (B, L): 4k and 16k completion tokens
CPU_SHAPES = [(2, 33, 2_003), (4, 256, 16_384)]  # (B, L, V): smoke, medium
CONFIGS = [
    dict(loss_type="dapo", importance_sampling_level="token"),
    dict(loss_type="grpo", importance_sampling_level="sequence"),
]
COMMON = dict(temperature=0.9, beta=0.04, eps_low=0.2, eps_high=0.28)


@dataclass
class Inputs:
    logits: torch.Tensor
    ids: torch.Tensor
    mask: torch.Tensor
    adv: torch.Tensor
    old: torch.Tensor
    ref: torch.Tensor


def make_inputs(b: int, seq: int, vocab: int, device: str, dtype: torch.dtype) -> Inputs:
    g = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(b, seq + 1, vocab, device=device, generator=g) * 2).to(dtype)
    ids = torch.randint(0, vocab, (b, seq), device=device, generator=g)
    lengths = torch.randint(seq // 2, seq + 1, (b, 1), device=device, generator=g)
    mask = (torch.arange(seq, device=device)[None, :] < lengths).long()
    adv = torch.randn(b, device=device, generator=g)
    logp = selective_log_softmax(logits, ids, COMMON["temperature"])
    # Old / reference log-probs near the policy's, as in training (ratios around 1).
    old = logp + 0.05 * torch.randn(b, seq, device=device, generator=g)
    ref = logp + 0.05 * torch.randn(b, seq, device=device, generator=g)
    return Inputs(logits.requires_grad_(True), ids, mask, adv, old, ref)


def eager_logps(logits: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """TRL's fallback: scale, then log_softmax + gather one sequence at a time (bf16 stays bf16)."""
    scaled = logits[:, :-1] / temperature
    rows = [F.log_softmax(row, dim=-1).gather(-1, idx[:, None])[:, 0]
            for row, idx in zip(scaled, ids, strict=True)]
    return torch.stack(rows)


def trl_logps(logits: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """TRL's own ``selective_log_softmax`` (its eager path off CUDA; the GPU image lacks TRL)."""
    from trl.trainer.utils import selective_log_softmax as trl_selective_log_softmax

    return trl_selective_log_softmax(logits[:, :-1], ids, temperature)


def loss_fn(method: str, x: Inputs, config: dict, inplace: bool) -> Callable[[], torch.Tensor]:
    """``ours`` / ``liger`` / ``eager`` (the bf16 loop TRL falls back to) / ``trl`` (TRL's
    ``selective_log_softmax``): a zero-argument forward returning the reduced loss."""
    opts = {**COMMON, **config}
    if method == "ours":
        return lambda: grpo_loss(x.logits, x.old, x.ref, x.ids, x.adv, x.mask, inplace=inplace,
                                 reduce=True, **opts)[0]
    if method == "liger":
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss

        return lambda: triton_grpo_loss(x.logits, x.old, x.ref, x.ids, x.adv, x.mask,
                                        inplace=inplace, reduce=True, **opts)[0]
    logps = {"eager": eager_logps, "trl": trl_logps}[method]
    temperature = opts.pop("temperature")
    return lambda: reference.grpo_loss_from_logps(
        logps(x.logits, x.ids, temperature), x.old, x.ref, x.adv, x.mask, **opts)[0]


# --------------------------------------------------------------------------- CPU: pytest-benchmark

TRL_EAGER = "TRL eager (selective_log_softmax + loss math)"


def cpu_shape_id(shape: tuple[int, int, int]) -> str:
    b, seq, vocab = shape
    return f"B={b} L={seq} V={vocab:,} fp32"


@pytest.fixture(scope="module", params=CPU_SHAPES, ids=cpu_shape_id)
def cpu_inputs(request) -> tuple[Inputs, str]:
    return make_inputs(*request.param, "cpu", torch.float32), cpu_shape_id(request.param)


def loss_and_grad(forward: Callable[[], torch.Tensor], logits: torch.Tensor):
    def run():
        loss = forward()
        return loss, torch.autograd.grad(loss, logits)[0]

    return run


def loss_case(x: Inputs, shape: str, config: dict) -> Case:
    name = f"{config['loss_type']}/{config['importance_sampling_level']}"
    return Case(f"grpo_loss {name} fwd+bwd", shape, {
        "ours": ours(loss_and_grad(loss_fn("ours", x, config, inplace=False), x.logits)),
        TRL_EAGER: anchor(loss_and_grad(loss_fn("trl", x, config, inplace=False), x.logits)),
    }, close(rtol=1e-5))


@pytest.fixture(scope="module")
def dapo_token(cpu_inputs):
    return loss_case(*cpu_inputs, CONFIGS[0])


@pytest.mark.parametrize("method", ["ours", TRL_EAGER])
def test_grpo_loss_dapo_token(benchmark, dapo_token, method):
    time_method(benchmark, dapo_token, method)


@pytest.fixture(scope="module")
def grpo_sequence(cpu_inputs):
    return loss_case(*cpu_inputs, CONFIGS[1])


@pytest.mark.parametrize("method", ["ours", TRL_EAGER])
def test_grpo_loss_grpo_sequence(benchmark, grpo_sequence, method):
    time_method(benchmark, grpo_sequence, method)


@pytest.fixture(scope="module")
def log_probs(cpu_inputs):
    x, shape = cpu_inputs
    temperature = COMMON["temperature"]
    return Case("selective_log_softmax (no grad)", shape, {
        "ours": ours(lambda: selective_log_softmax(x.logits.detach(), x.ids, temperature)),
        "TRL selective_log_softmax": anchor(
            lambda: trl_logps(x.logits.detach(), x.ids, temperature)),
    }, close(rtol=1e-5))


@pytest.mark.parametrize("method", ["ours", "TRL selective_log_softmax"])
def test_selective_log_softmax(benchmark, log_probs, method):
    time_method(benchmark, log_probs, method)


# --------------------------------------------------------------------------- CUDA: the script


def backward_only(loss: torch.Tensor, logits: torch.Tensor) -> Callable[[], object]:
    """Repeated backward through one retained graph: the backward alone."""
    return lambda: torch.autograd.grad(loss, logits, retain_graph=True)


def measure(method: str, x: Inputs, config: dict) -> dict:
    fwd = loss_fn(method, x, config, inplace=False)
    fwd_ms = _timing.median_ms(fwd)
    both_ms = _timing.median_ms(lambda: torch.autograd.grad(fwd(), x.logits))
    bwd_ms = _timing.median_ms(backward_only(fwd(), x.logits))
    saved = x.logits.detach().clone()
    default = loss_fn(method, x, config, inplace=True)
    peak = _timing.peak_bytes(lambda: torch.autograd.grad(default(), x.logits))
    with torch.no_grad():
        x.logits.copy_(saved)  # the in-place backward overwrote them
    del saved
    return dict(fwd_ms=fwd_ms, bwd_ms=bwd_ms, both_ms=both_ms, peak=peak)


def floor_bytes(x: Inputs) -> int:
    """Valid rows read in forward and backward, every gradient row written."""
    b, rows, vocab = x.logits.shape
    size = x.logits.element_size()
    valid = int(x.mask.sum())
    return (2 * valid + b * rows) * vocab * size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--csv", help="also write the rows to this CSV file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this script times the Triton kernels on a GPU; the CPU "
              "benchmarks run through pytest-benchmark (make bench)", file=sys.stderr)
        return 2
    dtype, methods = torch.bfloat16, ["ours", "liger", "eager"]
    bandwidth = _timing.copy_bandwidth()
    header = (f"machine: {_provenance.machine('cuda')} | date: {datetime.date.today()} | "
              f"commit: {_provenance.commit()} | load: {_provenance.load_text()} | "
              f"copy bandwidth: {bandwidth / 1e9:.0f} GB/s")
    rows = []
    for b, seq in CUDA_SHAPES:
        x = make_inputs(b, seq, VOCAB, "cuda", dtype)
        floor_ms = floor_bytes(x) / bandwidth * 1e3
        for config in CONFIGS:
            results = {m: measure(m, x, config) for m in methods}
            for method, r in results.items():
                rows.append(dict(
                    shape=f"B={b} L={seq} V={VOCAB} {str(dtype).removeprefix('torch.')}",
                    loss=f"{config['loss_type']}/{config['importance_sampling_level']}",
                    method=method, fwd_ms=r["fwd_ms"], bwd_ms=r["bwd_ms"], both_ms=r["both_ms"],
                    peak_gib=r["peak"] / 2**30,
                    vs_ours=r["both_ms"] / results["ours"]["both_ms"],
                    floor_pct=100 * floor_ms / r["both_ms"],
                ))
        del x
        torch.cuda.empty_cache()
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["machine", *rows[0]])
            writer.writeheader()
            writer.writerows({"machine": header, **r} for r in rows)
    print(header)
    print("| shape | loss | method | fwd ms | bwd ms | fwd+bwd ms | peak GiB | time / ours "
          "| floor % |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['loss']} | {r['method']} | {r['fwd_ms']:.3f} | "
              f"{r['bwd_ms']:.3f} | {r['both_ms']:.3f} | {r['peak_gib']:.2f} | "
              f"{r['vs_ours']:.2f} | {r['floor_pct']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
