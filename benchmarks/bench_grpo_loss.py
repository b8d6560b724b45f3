"""Fused GRPO loss over logits (``geovlm.kernels.grpo_loss``) against Liger-Kernel's
``triton_grpo_loss`` and the eager torch path TRL falls back to.

Run: ``python benchmarks/bench_grpo_loss.py [--csv PATH]``. On CUDA: bf16 logits
``[B, L + 1, V]`` at Qwen2.5-VL's vocabulary (V = 151,936) with B x L = 4k and 16k completion
tokens (B x 1,024), completions of ragged length (a quarter of the positions masked on average),
TRL's default ``dapo`` loss with token-level ratios and the ``grpo`` loss with sequence-level
ratios, beta = 0.04. On CPU: one tiny fp32 smoke shape (ours on the chunked torch path, eager).

Methods, each differentiated w.r.t. the logits (``torch.autograd.grad``, no accumulation copy):

- ``ours``: ``geovlm.kernels.grpo_loss(..., reduce=True)``;
- ``liger``: ``liger_kernel.transformers.grpo_loss.triton_grpo_loss(..., reduce=True)`` (CUDA only);
- ``eager``: TRL's non-Triton path: ``logits / T`` then a per-sequence ``log_softmax`` + gather
  (the loop TRL uses for bf16 logits), then the same GRPO math (``reference.grpo_loss_from_logps``).

Times are medians (``do_bench`` on CUDA) of forward, backward (repeated on one retained graph) and
forward + backward, timed with ``inplace=False`` so every call reads real logits (in-place backward
moves the same bytes). Peak memory is one forward + backward with the methods' defaults
(``inplace=True`` for ours and Liger), above the inputs. The bandwidth floor is the bytes the
algorithm must move (valid rows read in forward, read again in backward, every gradient row
written) over the copy bandwidth measured in the same run; ``floor%`` is floor time / time.
"""

from __future__ import annotations

import argparse
import csv
import datetime
from collections.abc import Callable
from dataclasses import dataclass

import _timing  # benchmarks/_timing.py: the script's directory is on sys.path
import torch
import torch.nn.functional as F

from geovlm.kernels import reference
from geovlm.kernels.grpo_loss import grpo_loss
from geovlm.kernels.logprobs import selective_log_softmax

VOCAB = 151_936
CUDA_SHAPES = [(4, 1_024), (16, 1_024)]  # (B, L): 4k and 16k completion tokens
CPU_SHAPE = (2, 33, 2_003)  # (B, L, V)
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


def loss_fn(method: str, x: Inputs, config: dict, inplace: bool) -> Callable[[], torch.Tensor]:
    opts = {**COMMON, **config}
    if method == "ours":
        return lambda: grpo_loss(x.logits, x.old, x.ref, x.ids, x.adv, x.mask, inplace=inplace,
                                 reduce=True, **opts)[0]
    if method == "liger":
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss

        return lambda: triton_grpo_loss(x.logits, x.old, x.ref, x.ids, x.adv, x.mask,
                                        inplace=inplace, reduce=True, **opts)[0]
    temperature = opts.pop("temperature")
    return lambda: reference.grpo_loss_from_logps(
        eager_logps(x.logits, x.ids, temperature), x.old, x.ref, x.adv, x.mask, **opts)[0]


def backward_only(loss: torch.Tensor, logits: torch.Tensor) -> Callable[[], object]:
    """Repeated backward through one retained graph: the backward alone."""
    return lambda: torch.autograd.grad(loss, logits, retain_graph=True)


def measure(method: str, x: Inputs, config: dict, device: str) -> dict:
    fwd = loss_fn(method, x, config, inplace=False)
    fwd_ms = _timing.median_ms(fwd, device)
    both_ms = _timing.median_ms(lambda: torch.autograd.grad(fwd(), x.logits), device)
    bwd_ms = _timing.median_ms(backward_only(fwd(), x.logits), device)
    peak = None
    if device == "cuda":
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--csv", help="also write the rows to this CSV file")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        shapes = [(b, seq, VOCAB) for b, seq in CUDA_SHAPES]
        dtype, methods = torch.bfloat16, ["ours", "liger", "eager"]
        bandwidth = _timing.copy_bandwidth(device)
    else:
        shapes, dtype, methods, bandwidth = [CPU_SHAPE], torch.float32, ["ours", "eager"], None
    header = (f"machine: {_timing.machine()} | date: {datetime.date.today()} | "
              f"commit: {_timing.commit()} | load: {_timing.load()}")
    if bandwidth:
        header += f" | copy bandwidth: {bandwidth / 1e9:.0f} GB/s"
    rows = []
    for b, seq, vocab in shapes:
        x = make_inputs(b, seq, vocab, device, dtype)
        floor_ms = floor_bytes(x) / bandwidth * 1e3 if bandwidth else None
        for config in CONFIGS:
            results = {m: measure(m, x, config, device) for m in methods}
            for method, r in results.items():
                rows.append(dict(
                    shape=f"B={b} L={seq} V={vocab} {str(dtype).removeprefix('torch.')}",
                    loss=f"{config['loss_type']}/{config['importance_sampling_level']}",
                    method=method, fwd_ms=r["fwd_ms"], bwd_ms=r["bwd_ms"], both_ms=r["both_ms"],
                    peak_gib=None if r["peak"] is None else r["peak"] / 2**30,
                    vs_ours=r["both_ms"] / results["ours"]["both_ms"],
                    floor_pct=None if floor_ms is None else 100 * floor_ms / r["both_ms"],
                ))
        del x
        if device == "cuda":
            torch.cuda.empty_cache()
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["machine", *rows[0]])
            writer.writeheader()
            writer.writerows({"machine": header, **r} for r in rows)
    fmt = lambda v, spec: "-" if v is None else format(v, spec)
    print(header)
    print("| shape | loss | method | fwd ms | bwd ms | fwd+bwd ms | peak GiB | time / ours "
          "| floor % |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['loss']} | {r['method']} | {r['fwd_ms']:.3f} | "
              f"{r['bwd_ms']:.3f} | {r['both_ms']:.3f} | {fmt(r['peak_gib'], '.2f')} | "
              f"{r['vs_ours']:.2f} | {fmt(r['floor_pct'], '.0f')} |")


if __name__ == "__main__":
    main()
