"""Selective log-softmax (+ entropy) over logits in one pass: the forward half of the fused GRPO
loss, and the no-grad log-probs of the old / reference / sampling policies.

Shapes: logits ``[B, T, V]`` with ``T = L`` (TRL's convention) or ``T = L + 1`` (Liger's: the last
position predicts past the completion and is dropped), token ids ``[B, L]``, optional mask
``[B, L]`` (rows where it is 0 are not read and give 0). Outputs ``[B, L]`` fp32: the log-prob of
each id under ``softmax(logits / temperature)``, and optionally the entropy of that distribution.

The Triton kernel runs one program per row: an online logsumexp over vocab blocks, in fp32,
keeping the row max ``m`` and ``log sum exp(x - m)`` apart. That is safe for all-negative rows,
-inf entries and whole -inf blocks, and gives ``logp = (x_id - m) - log_sum`` and (in backward)
``softmax = exp((x - m) - log_sum)`` without the cancellation of ``x - logsumexp`` when the logits
are far from 0. The backward of the fused loss (``grpo_loss.py``) reads these two statistics. An id
outside ``[0, V)`` at an unmasked position gives NaN rather than an out-of-bounds read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _chunked
from ._backend import use_triton, vocab_configs

# (BLOCK_V, num_warps) candidates, tuned per vocabulary size and dtype on first use: from one warp
# streaming a row (Liger's choice) to 16 warps on 8k-wide blocks.
FWD_CONFIGS = [(2048, 1), (2048, 4), (4096, 4), (4096, 8), (8192, 8), (8192, 16)]


@triton.autotune(configs=vocab_configs(FWD_CONFIGS), key=["vocab"])
@triton.jit
def _logsoftmax_fwd_kernel(
    logits_ptr,
    ids_ptr,
    mask_ptr,
    logp_ptr,
    max_ptr,
    logsum_ptr,
    entropy_ptr,
    seq_len,
    vocab,
    stride_lb,
    stride_lt,
    stride_ib,
    stride_il,
    stride_mb,
    stride_ml,
    inv_temperature,
    HAS_MASK: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // seq_len
    t = row % seq_len
    keep = True
    if HAS_MASK:
        keep = tl.load(mask_ptr + b * stride_mb + t * stride_ml) != 0
    if keep:
        base = logits_ptr + b * stride_lb + t * stride_lt
        cols = tl.arange(0, BLOCK_V)
        m = -float("inf")
        s = 0.0
        ez = 0.0  # sum exp(x - m) * (x - m), for the entropy
        for start in range(0, vocab, BLOCK_V):
            offs = start + cols
            x = tl.load(base + offs, mask=offs < vocab, other=-float("inf")).to(tl.float32)
            # A multiply: an fp32 division per element would cost more than the memory traffic.
            x = x * inv_temperature
            m_new = tl.maximum(m, tl.max(x, axis=0))
            # While every value seen is -inf there is nothing to rescale: shift by 0, not -inf,
            # so that exp(-inf - -inf) never makes a NaN.
            m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
            alpha = tl.exp(m - m_safe)
            e = tl.exp(x - m_safe)
            if WITH_ENTROPY:
                shift = tl.where(s > 0, m - m_safe, 0.0)
                # where() before the product: e * (x - m) would be 0 * -inf = NaN at -inf entries.
                ez_blk = tl.sum(e * tl.where(e > 0, x - m_safe, 0.0), axis=0)
                ez = alpha * (ez + shift * s) + ez_blk
            s = s * alpha + tl.sum(e, axis=0)
            m = m_safe
        log_sum = tl.log(s)
        idx = tl.load(ids_ptr + b * stride_ib + t * stride_il).to(tl.int64)
        in_range = (idx >= 0) & (idx < vocab)
        x_id = tl.load(base + tl.where(in_range, idx, 0)).to(tl.float32) * inv_temperature
        logp = tl.where(in_range, (x_id - m) - log_sum, float("nan"))
        tl.store(logp_ptr + row, logp)
        tl.store(max_ptr + row, m)
        tl.store(logsum_ptr + row, log_sum)
        if WITH_ENTROPY:
            tl.store(entropy_ptr + row, log_sum - ez / s)
    else:
        tl.store(logp_ptr + row, 0.0)
        tl.store(max_ptr + row, 0.0)
        tl.store(logsum_ptr + row, 0.0)
        if WITH_ENTROPY:
            tl.store(entropy_ptr + row, 0.0)


def check_logits_ids(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None) -> None:
    """Shape checks shared by every entry point, with errors that say what was expected."""
    if logits.dim() != 3 or ids.dim() != 2:
        raise ValueError(
            f"logits must be [B, T, V] and ids [B, L]; got {tuple(logits.shape)}, "
            f"{tuple(ids.shape)}"
        )
    b, seq = ids.shape
    if logits.shape[0] != b or logits.shape[1] not in (seq, seq + 1):
        raise ValueError(
            f"logits {tuple(logits.shape)} must be [B, L, V] or [B, L + 1, V] for ids [B, L] = "
            f"{tuple(ids.shape)}"
        )
    if logits.shape[-1] == 0:
        raise ValueError("logits have an empty vocabulary dimension")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"ids must be int32 or int64, got {ids.dtype}")
    if mask is not None and mask.shape != ids.shape:
        raise ValueError(f"mask must be [B, L] = {tuple(ids.shape)}, got {tuple(mask.shape)}")
    for name, t in (("ids", ids), ("mask", mask)):
        if t is not None and t.device != logits.device:
            raise ValueError(f"{name} is on {t.device} but logits are on {logits.device}")


def forward_stats(
    logits: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    with_entropy: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(logp, row_max, log_sum, entropy or None)``, each ``[B, L]``; see the module docstring."""
    check_logits_ids(logits, ids, mask)
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if not use_triton(backend, logits, _logsoftmax_fwd_kernel):
        return _chunked.forward_stats(logits, ids, mask, temperature, with_entropy)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    b, seq = ids.shape
    vocab = logits.shape[-1]
    logp = torch.empty(b, seq, dtype=torch.float32, device=logits.device)
    row_max = torch.empty_like(logp)
    log_sum = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if with_entropy else None
    if b * seq == 0:
        return logp, row_max, log_sum, entropy
    mask_arg = mask if mask is not None else ids
    if mask_arg.dtype == torch.bool:
        mask_arg = mask_arg.view(torch.uint8)
    _logsoftmax_fwd_kernel[(b * seq,)](
        logits, ids, mask_arg, logp, row_max, log_sum,
        entropy if entropy is not None else logp,
        seq, vocab, logits.stride(0), logits.stride(1), ids.stride(0), ids.stride(1),
        mask_arg.stride(0), mask_arg.stride(1), 1.0 / temperature,
        HAS_MASK=mask is not None, WITH_ENTROPY=with_entropy,
    )
    return logp, row_max, log_sum, entropy


@torch.no_grad()
def selective_log_softmax(
    logits: torch.Tensor,
    ids: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """No-grad ``log_softmax(logits / temperature)`` at ``ids``: ``[B, T, V], [B, L] -> [B, L]``.

    ``T`` is ``L`` or ``L + 1`` (the last position is then dropped, as Liger does). With
    ``return_entropy`` also returns the per-token entropy ``[B, L]``. ``mask [B, L]`` skips rows
    (they give 0). CUDA tensors run the Triton kernel, others the chunked torch path.
    """
    logp, _, _, entropy = forward_stats(logits, ids, mask, temperature, return_entropy, backend)
    return (logp, entropy) if return_entropy else logp
