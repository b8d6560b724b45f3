"""The GRPO loss over logits: a drop-in for Liger-Kernel's ``triton_grpo_loss``.

Shapes: logits ``[B, L + 1, V]`` (Liger's convention: the last position is dropped; ``[B, L, V]``
is accepted too), completion ids / mask / old, ref log-probs ``[B, L]``, advantages ``[B]``.

The log-probs come from the selective log-softmax op (``logprobs.py``: one Triton pass over each
logits row forward, one backward, 8 bytes a token saved); the O(B * L) GRPO objective on them --
ratios, clipping, KL, every ``loss_type``, sequence-level importance sampling and its cross-token
terms -- is the spec, ``reference.grpo_per_token_loss``, differentiated by autograd. So there is
one definition of the math and the gradient is exact for every option.

How far the drop-in goes (each point is tested against the installed Liger-Kernel):

* Same positional and keyword arguments, defaults and return values as ``triton_grpo_loss``, and
  the same numbers wherever Liger implements TRL's loss.
* ``luspo`` follows TRL 1.16 (a masked sum per sequence, averaged over sequences); Liger 0.8.5
  averages ``loss * tokens`` over every position, padding included, so the two differ whenever a
  completion is padded.
* ``vespo``, ``cispo`` and ``sapo`` at ``importance_sampling_level="sequence"`` are computed (as
  TRL computes them); Liger refuses vespo there and rejects cispo / sapo at sequence level.
* Without ``num_items_in_batch`` the dapo / cispo / vespo normaliser is the call's own token count;
  Liger all-reduces the mask over processes inside the loss. Pass ``num_items_in_batch`` (see
  ``reference.dapo_normalizer``) and the two agree under data parallelism too.
* Additions, keyword-only: ``options`` (a ``GRPOLossOptions`` instead of the loose option
  keywords), ``named_metrics`` (TRL's metric dict instead of Liger's list) and ``backend``.
"""

from __future__ import annotations

import torch

from . import reference
from .logprobs import fused_log_probs
from .options import DEFAULT_OPTIONS, GRPOLossOptions, resolve_options

_D = DEFAULT_OPTIONS


def grpo_loss(
    logits: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    completion_ids: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor | None = None,
    temperature: float = _D.temperature,
    beta: float = _D.beta,
    eps_low: float = _D.eps_low,
    eps_high: float = _D.eps_high,
    inplace: bool = True,
    loss_type: str = _D.loss_type,
    max_completion_length: int | None = _D.max_completion_length,
    importance_sampling_level: str = _D.importance_sampling_level,
    reduce: bool = False,
    sapo_temperature_pos: float = _D.sapo_temperature_pos,
    sapo_temperature_neg: float = _D.sapo_temperature_neg,
    vllm_is_ratio: torch.Tensor | None = None,
    delta: float | None = _D.delta,
    use_bias_correction_kl: bool = _D.use_bias_correction_kl,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    vespo_k_pos: float = _D.vespo_k_pos,
    vespo_lambda_pos: float = _D.vespo_lambda_pos,
    vespo_k_neg: float = _D.vespo_k_neg,
    vespo_lambda_neg: float = _D.vespo_lambda_neg,
    *,
    options: GRPOLossOptions | None = None,
    named_metrics: bool = False,
    backend: str = "auto",
):
    """Drop-in for Liger's ``triton_grpo_loss`` (see the module docstring for how far it goes).

    Args: logits ``[B, L + 1, V]`` (any float dtype; fp32 math), old_logp / ref_logp ``[B, L]`` or
    None (old None = on-policy; ref required when ``beta != 0``), completion_ids ``[B, L]``,
    advantages ``[B]``, completion_mask ``[B, L]`` or None, vllm_is_ratio ``[B, L]``, ``[B, 1]``
    or ``[B]``; ``num_items_in_batch`` as in ``reference.dapo_normalizer``. The loss options are
    ``GRPOLossOptions``' fields, given loose (Liger's way) or as ``options`` -- not both: with
    ``options`` every loose option must keep its default. ``inplace`` writes the gradient into
    the logits (they must not be used after the backward). ``backend``: ``_dispatch``.

    Returns, with ``reduce=True``: ``(loss, [kl_mean, clip_ratio])`` (``kl_mean`` only when
    ``beta != 0``; token-weighted means over the mask), or with ``named_metrics`` ``(loss,
    metrics)``, TRL's metric names as ``linear_grpo_loss`` returns them. With ``reduce=False``:
    ``(per_token_loss, per_token_kl or None, is_clipped)``, each ``[B, L]`` and zero where
    masked; ``per_token_loss`` is differentiable and not yet normalised.
    """
    opts = resolve_options(
        options, temperature=temperature, beta=beta, eps_low=eps_low, eps_high=eps_high,
        loss_type=loss_type, max_completion_length=max_completion_length,
        importance_sampling_level=importance_sampling_level,
        sapo_temperature_pos=sapo_temperature_pos, sapo_temperature_neg=sapo_temperature_neg,
        delta=delta, use_bias_correction_kl=use_bias_correction_kl, vespo_k_pos=vespo_k_pos,
        vespo_lambda_pos=vespo_lambda_pos, vespo_k_neg=vespo_k_neg,
        vespo_lambda_neg=vespo_lambda_neg,
    )
    logp, _ = fused_log_probs(
        logits, completion_ids, completion_mask, opts.temperature, inplace, False, backend
    )
    terms = reference.grpo_per_token_loss(
        logp, old_logp, ref_logp, advantages, completion_mask, opts, vllm_is_ratio=vllm_is_ratio
    )
    mask = terms.mask
    kl = None if terms.per_token_kl is None else terms.per_token_kl * mask
    if not reduce:
        return terms.per_token_loss * mask, kl, terms.is_clipped * mask
    loss = reference.reduce_grpo_loss(
        terms.per_token_loss, mask, opts.loss_type, opts.max_completion_length, num_items_in_batch
    )
    if named_metrics:
        return loss, terms.metrics
    n_tokens = mask.sum().clamp(min=1.0)
    metrics = [] if kl is None else [kl.detach().sum() / n_tokens]
    metrics.append((terms.is_clipped * mask).sum() / n_tokens)
    return loss, metrics
