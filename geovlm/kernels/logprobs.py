"""Selective log-softmax over logits, ``log_softmax(logits / T)[ids]``: the op under the fused GRPO
loss (``grpo_loss.py``) and the no-grad log-probs of the old / reference / sampling policies.

Shapes: logits ``[B, T, V]`` with ``T = L`` (TRL's convention) or ``T = L + 1`` (Liger's: the last
position predicts past the completion and is dropped), token ids ``[B, L]``, optional mask
``[B, L]`` (rows where it is 0 are not read and give 0). Outputs ``[B, L]``: the log-prob of each
id under ``softmax(logits / temperature)`` (fp32; the compute dtype of the spec path), and
optionally the entropy of that distribution. An id outside ``[0, V)`` at an unmasked position
gives NaN rather than an out-of-bounds read.

This file holds the whole op: the Triton forward and backward kernels, the spec path, and the
autograd function ``SelectiveLogSoftmaxFunction`` that dispatches between them (``_dispatch``).

Forward kernel: one program per row, an online logsumexp over vocab blocks in fp32, keeping the
row max ``m`` and ``log sum exp(x - m)`` apart. That is safe for all-negative rows, -inf entries
and whole -inf blocks, and gives ``logp = (x_id - m) - log_sum`` and ``softmax = exp((x - m) -
log_sum)`` without the cancellation of ``x - logsumexp`` when the logits are far from 0. Those two
statistics (8 bytes a row) are all the backward saves besides the logits themselves.

Backward kernel: autograd hands ``g = dLoss/dlogp [B, L]``; one pass reads each logits row again
and writes ``g * (onehot(id) - softmax) / T``, into the logits buffer itself when ``inplace``
(rows with ``g == 0``, e.g. masked tokens and the dropped last position, are written as zeros
without being read).

Spec path (CPU tensors, fp64, ``backend="torch"``): ``reference.selective_log_softmax`` and
``reference.entropy_from_logits`` on a few rows at a time (``_dispatch.row_chunks``); its backward
is autograd through the same spec, chunk by chunk, so there is no second derivation of the math.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from ._dispatch import row_chunks, use_triton, vocab_configs

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


# (BLOCK_V, num_warps) candidates, tuned per vocabulary size and dtype on first use. Tuning runs
# the kernel several times, so the gradient buffer (the logits themselves when in place) is
# restored after each trial.
BWD_CONFIGS = [(2048, 4), (4096, 4), (4096, 8), (4096, 16), (8192, 8), (8192, 16)]


@triton.autotune(configs=vocab_configs(BWD_CONFIGS), key=["vocab"], restore_value=["grad_ptr"])
@triton.jit
def _grad_logits_kernel(
    logits_ptr,
    grad_ptr,
    ids_ptr,
    g_ptr,
    max_ptr,
    logsum_ptr,
    seq_len,
    n_pos,
    vocab,
    stride_lb,
    stride_lt,
    stride_gb,
    stride_gt,
    stride_ib,
    stride_il,
    inv_temperature,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // n_pos
    t = row % n_pos
    scored = t < seq_len
    # Flat [B, L] index of this row's statistics (clamped for the dropped last position).
    stat = b * seq_len + tl.minimum(t, seq_len - 1)
    g = tl.load(g_ptr + stat, mask=scored, other=0.0)
    out = grad_ptr + b * stride_gb + t * stride_gt
    cols = tl.arange(0, BLOCK_V)
    if g == 0.0:
        zeros = tl.zeros([BLOCK_V], dtype=grad_ptr.dtype.element_ty)
        for start in range(0, vocab, BLOCK_V):
            offs = start + cols
            tl.store(out + offs, zeros, mask=offs < vocab)
    else:
        base = logits_ptr + b * stride_lb + t * stride_lt
        m = tl.load(max_ptr + stat)
        log_sum = tl.load(logsum_ptr + stat)
        idx = tl.load(ids_ptr + b * stride_ib + t * stride_il).to(tl.int64)
        scale = g * inv_temperature
        for start in range(0, vocab, BLOCK_V):
            offs = start + cols
            in_vocab = offs < vocab
            x = tl.load(base + offs, mask=in_vocab, other=-float("inf")).to(tl.float32)
            x = x * inv_temperature
            p = tl.exp((x - m) - log_sum)
            grad = (tl.where(offs == idx, 1.0, 0.0) - p) * scale
            tl.store(out + offs, grad.to(grad_ptr.dtype.element_ty), mask=in_vocab)


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


def _no_autocast(t: torch.Tensor):
    """The spec runs at its own precision even inside a caller's autocast region."""
    return torch.autocast(t.device.type, enabled=False)


def _triton_forward(logits, ids, mask, temperature, with_entropy):
    """``(logp, row_max, log_sum, entropy or None)``, each ``[B, L]`` fp32, from the kernel."""
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


def _triton_grad_logits(logits, ids, g, row_max, log_sum, temperature, inplace):
    src = logits if logits.stride(-1) == 1 else logits.contiguous()
    out = src if inplace else torch.empty_like(src)
    b, n_pos, vocab = src.shape
    seq = ids.shape[1]
    if b * n_pos > 0:
        _grad_logits_kernel[(b * n_pos,)](
            src, out, ids, g, row_max, log_sum, seq, n_pos, vocab,
            src.stride(0), src.stride(1), out.stride(0), out.stride(1),
            ids.stride(0), ids.stride(1), 1.0 / temperature,
        )
    return out


def _spec_forward(logits, ids, mask, temperature, with_entropy):
    """``(logp, entropy or None)`` ``[B, L]`` in the compute dtype: the spec on the unmasked rows,
    a chunk of rows at a time (masked rows are 0 and never read)."""
    b, seq = ids.shape
    vocab = logits.shape[-1]
    logp = torch.zeros(b, seq, dtype=reference.compute_dtype(logits), device=logits.device)
    entropy = torch.zeros_like(logp) if with_entropy else None
    keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask != 0
    rows_b, rows_t = keep.nonzero(as_tuple=True)
    for rows in row_chunks(rows_b.numel(), vocab):
        bi, ti = rows_b[rows], rows_t[rows]
        x = logits[bi, ti]
        idx = ids[bi, ti].long()
        in_range = (idx >= 0) & (idx < vocab)
        with _no_autocast(x):
            chunk = reference.selective_log_softmax(x, idx.clamp(0, vocab - 1), temperature)
            logp[bi, ti] = chunk.masked_fill(~in_range, float("nan"))
            if entropy is not None:
                entropy[bi, ti] = reference.entropy_from_logits(x, temperature)
    return logp, entropy


def _spec_grad_logits(logits, ids, g, temperature, inplace):
    """``dLoss/dlogits`` (zero where ``g == 0`` and at a dropped last position) by autograd
    through the spec, a chunk of rows at a time; each chunk is read before it is overwritten, so
    ``inplace`` may write into ``logits``."""
    out = logits if inplace else torch.empty_like(logits)
    seq = ids.shape[1]
    vocab = logits.shape[-1]
    active = g != 0
    rows_b, rows_t = active.nonzero(as_tuple=True)
    for rows in row_chunks(rows_b.numel(), vocab):
        bi, ti = rows_b[rows], rows_t[rows]
        x = logits[bi, ti].requires_grad_(True)
        idx = ids[bi, ti].long()
        in_range = (idx >= 0) & (idx < vocab)
        with torch.enable_grad(), _no_autocast(x):
            chunk = reference.selective_log_softmax(x, idx.clamp(0, vocab - 1), temperature)
        (grad,) = torch.autograd.grad(chunk, x, g[bi, ti].to(chunk.dtype))
        # An id outside the vocabulary has a NaN log-prob, and so a NaN gradient.
        out[bi, ti] = grad.masked_fill(~in_range[:, None], float("nan")).to(out.dtype)
    out[:, :seq].masked_fill_(~active[..., None], 0.0)
    out[:, seq:] = 0.0
    return out


def _forward(logits, ids, mask, temperature, with_entropy, backend):
    """``(logp, entropy or None, saved statistics or None, whether Triton ran)``."""
    check_logits_ids(logits, ids, mask)
    reference.check_temperature(temperature)
    if use_triton(backend, logits, _logsoftmax_fwd_kernel):
        logp, row_max, log_sum, entropy = _triton_forward(
            logits, ids, mask, temperature, with_entropy
        )
        return logp, entropy, (row_max, log_sum), True
    logp, entropy = _spec_forward(logits, ids, mask, temperature, with_entropy)
    return logp, entropy, None, False


class SelectiveLogSoftmaxFunction(torch.autograd.Function):
    """``log_softmax(logits / T)[ids]`` with the one-pass Triton (or chunked spec) backward.

    ``forward(logits [B, T, V], ids [B, L], mask [B, L] | None, temperature, inplace, with_entropy,
    backend) -> (logp [B, L], entropy [B, L] | None)``; the entropy is not differentiable. With
    ``inplace`` the backward overwrites ``logits`` with its gradient, so the graph can be
    backpropagated once and the logits must not be used afterwards.
    """

    @staticmethod
    def forward(ctx, logits, ids, mask, temperature, inplace, with_entropy, backend):
        logp, entropy, stats, ran_triton = _forward(
            logits, ids, mask, temperature, with_entropy, backend
        )
        ctx.save_for_backward(logits, ids, mask, *(stats or (None, None)))
        ctx.temperature = temperature
        ctx.inplace = inplace
        ctx.ran_triton = ran_triton
        if entropy is not None:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, _grad_entropy):
        logits, ids, mask, row_max, log_sum = ctx.saved_tensors
        if grad_logp is None:
            return (None,) * 7
        g = grad_logp.to(torch.float32 if ctx.ran_triton else reference.compute_dtype(logits))
        if mask is not None:
            # Masked rows output a constant 0 (their statistics are not computed): no gradient.
            g = g.masked_fill(mask == 0, 0.0)
        if ctx.ran_triton:
            grad = _triton_grad_logits(
                logits, ids, g.contiguous(), row_max, log_sum, ctx.temperature, ctx.inplace
            )
        else:
            grad = _spec_grad_logits(logits, ids, g, ctx.temperature, ctx.inplace)
        return grad, None, None, None, None, None, None


def fused_log_probs(
    logits: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    inplace: bool = False,
    return_entropy: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Differentiable log-probs ``[B, L]`` (and no-grad entropy) from logits ``[B, T, V]``.

    ``T`` is ``L`` or ``L + 1`` (last position dropped). Masked rows give 0 and a zero gradient.
    """
    return SelectiveLogSoftmaxFunction.apply(
        logits, ids, mask, temperature, inplace, return_entropy, backend
    )


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
    (they give 0). CUDA tensors run the Triton kernel, others the spec chunk by chunk.
    """
    logp, entropy, _, _ = _forward(logits, ids, mask, temperature, return_entropy, backend)
    return (logp, entropy) if return_entropy else logp
