"""Fused GRPO loss over logits: Triton forward and backward around the reference GRPO math.

Shapes: logits ``[B, L + 1, V]`` (Liger's convention: the last position is dropped; ``[B, L, V]``
is accepted too), completion ids / mask / old, ref log-probs ``[B, L]``, advantages ``[B]``.

Forward: one Triton pass over each logits row (``logprobs._logsoftmax_fwd_kernel``) gives the
policy log-probs ``[B, L]`` and saves, per row, the max and ``log sum exp`` (8 bytes a token);
nothing vocab-sized is saved besides the logits themselves. The O(B * L) GRPO objective (ratios,
clipping, KL, every ``loss_type``, sequence-level importance sampling and its cross-token terms)
is ``reference.grpo_per_token_loss`` on those ``[B, L]`` log-probs, differentiated by autograd,
so there is one definition of the math and the gradient is exact for every option.

Backward: autograd hands ``SelectiveLogSoftmaxFunction`` ``g = dLoss/dlogp [B, L]``; one Triton
pass reads each logits row again and writes ``g * (onehot(id) - softmax) / temperature``, into
the logits buffer itself when ``inplace=True`` (rows with ``g == 0``, e.g. masked tokens and the
dropped last position, are written as zeros without being read). CPU tensors take the chunked
torch path (``_chunked.py``) with the same math.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _chunked, reference
from ._backend import use_triton, vocab_configs
from .logprobs import forward_stats

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


class SelectiveLogSoftmaxFunction(torch.autograd.Function):
    """``log_softmax(logits / T)[ids]`` with the one-pass Triton (or chunked torch) backward.

    ``forward(logits [B, T, V], ids [B, L], mask [B, L] | None, temperature, inplace, with_entropy,
    backend) -> (logp [B, L] fp32, entropy [B, L] fp32 | None)``; the entropy is not
    differentiable. With ``inplace`` the backward overwrites ``logits`` with its gradient, so the
    graph can be backpropagated once and the logits must not be used afterwards.
    """

    @staticmethod
    def forward(ctx, logits, ids, mask, temperature, inplace, with_entropy, backend):
        logp, row_max, log_sum, entropy = forward_stats(
            logits, ids, mask, temperature, with_entropy, backend
        )
        ctx.save_for_backward(logits, ids, mask, row_max, log_sum)
        ctx.temperature = temperature
        ctx.inplace = inplace
        ctx.backend = backend
        if entropy is not None:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, _grad_entropy):
        logits, ids, mask, row_max, log_sum = ctx.saved_tensors
        if grad_logp is None:
            return (None,) * 7
        g = grad_logp.to(row_max.dtype)
        if mask is not None:
            # Masked rows output a constant 0 (their statistics are not computed): no gradient.
            g = g.masked_fill(mask == 0, 0.0)
        g = g.contiguous()
        if not use_triton(ctx.backend, logits, _grad_logits_kernel):
            out = logits if ctx.inplace else torch.empty_like(logits)
            return _chunked.grad_logits(logits, ids, g, row_max, log_sum, ctx.temperature, out), \
                None, None, None, None, None, None
        src = logits if logits.stride(-1) == 1 else logits.contiguous()
        out = src if ctx.inplace else torch.empty_like(src)
        b, n_pos, vocab = src.shape
        seq = ids.shape[1]
        if b * n_pos > 0:
            _grad_logits_kernel[(b * n_pos,)](
                src, out, ids, g, row_max, log_sum, seq, n_pos, vocab,
                src.stride(0), src.stride(1), out.stride(0), out.stride(1),
                ids.stride(0), ids.stride(1), 1.0 / ctx.temperature,
            )
        return out, None, None, None, None, None, None


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


def grpo_loss(
    logits: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    completion_ids: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor | None = None,
    temperature: float = 0.9,
    beta: float = 0.04,
    eps_low: float = 0.2,
    eps_high: float = 0.4,
    inplace: bool = True,
    loss_type: str = "dapo",
    max_completion_length: int | None = None,
    importance_sampling_level: str = "token",
    reduce: bool = False,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vllm_is_ratio: torch.Tensor | None = None,
    delta: float | None = None,
    use_bias_correction_kl: bool = False,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    *,
    backend: str = "auto",
):
    """Drop-in for Liger's ``triton_grpo_loss``: same arguments, defaults and return values.

    Args: logits ``[B, L + 1, V]`` (any float dtype; fp32 math), old_logp / ref_logp ``[B, L]`` or
    None (old None = on-policy; ref required when ``beta != 0``), completion_ids ``[B, L]``,
    advantages ``[B]``, completion_mask ``[B, L]`` or None, vllm_is_ratio ``[B, L]``, ``[B, 1]``
    or ``[B]``. The options are TRL's (see ``reference.py``); every ``loss_type`` works at both
    importance-sampling levels, as in TRL.

    Returns, with ``reduce=True``: ``(loss, [kl_mean, clip_ratio])`` (``kl_mean`` only when
    ``beta != 0``; token-weighted means over the mask). With ``reduce=False``:
    ``(per_token_loss, per_token_kl or None, is_clipped)``, each ``[B, L]`` and zero where masked;
    ``per_token_loss`` is differentiable and not yet normalised.
    """
    logp, _ = fused_log_probs(
        logits, completion_ids, completion_mask, temperature, inplace, False, backend
    )
    terms = reference.grpo_per_token_loss(
        logp, old_logp, ref_logp, advantages, completion_mask,
        beta=beta, eps_low=eps_low, eps_high=eps_high, loss_type=loss_type,
        importance_sampling_level=importance_sampling_level, delta=delta,
        use_bias_correction_kl=use_bias_correction_kl, vllm_is_ratio=vllm_is_ratio,
        sapo_temperature_pos=sapo_temperature_pos, sapo_temperature_neg=sapo_temperature_neg,
        vespo_k_pos=vespo_k_pos, vespo_lambda_pos=vespo_lambda_pos,
        vespo_k_neg=vespo_k_neg, vespo_lambda_neg=vespo_lambda_neg,
    )
    mask = terms.mask
    kl = None if terms.per_token_kl is None else terms.per_token_kl * mask
    if not reduce:
        return terms.per_token_loss * mask, kl, terms.is_clipped * mask
    loss = reference.reduce_grpo_loss(
        terms.per_token_loss, mask, loss_type, max_completion_length, num_items_in_batch
    )
    n_tokens = mask.sum().clamp(min=1.0)
    metrics = [] if kl is None else [kl.detach().sum() / n_tokens]
    metrics.append((terms.is_clipped * mask).sum() / n_tokens)
    return loss, metrics
