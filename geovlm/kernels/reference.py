"""The spec: pure-torch GRPO loss and log-prob math that every kernel in ``geovlm.kernels`` is
tested against, and that their CPU path evaluates chunk by chunk.

Shapes: logits ``[B, L, V]`` (any float dtype, computed in at least fp32), token ids ``[B, L]``,
per-token log-probs ``[B, L]``, advantages ``[B]`` (``[B, 1]`` and ``[B, L]`` are accepted too),
completion mask ``[B, L]`` (bool, int or float 0/1), vLLM importance-sampling ratio ``[B, L]``,
``[B, 1]`` or ``[B]``; hidden states ``[N, H]`` and ``lm_head.weight`` ``[V, H]`` for the logits
``linear_logits``.

``grpo_loss_from_logps`` is TRL's ``GRPOTrainer._compute_loss`` (trl 1.16) restated as a function of
the policy's per-token log-probs, configured by ``GRPOLossOptions`` (``options.py``): every
``loss_type``, token- or sequence-level importance sampling, the two-sided clip ``delta``, the k3
KL estimator with optional bias correction, the vLLM importance-sampling ratio and
``num_items_in_batch``. It is differentiable with respect to ``per_token_logps``; the fused kernels
get their per-token gradient ``dLoss/dlogp`` from it by autograd, so the GRPO math has exactly one
definition. Two deliberate differences from TRL, both at the trainer boundary: the loss is not
divided by the gradient-accumulation steps (the caller does that), and ``num_items_in_batch``
follows Liger's ``triton_grpo_loss`` (see ``dapo_normalizer``). Positions where the mask is 0 are
zeroed in every input before use, so padding garbage (inf, NaN) cannot leak into the loss or its
gradient. Nothing here communicates between processes.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .options import (
    LOSS_TYPES,
    PPO_CLIP_LOSS_TYPES,
    TOKEN_NORMALISED_LOSS_TYPES,
    GRPOLossOptions,
    check_choice,
    resolve_options,
)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """fp32 for half/bf16/fp32 inputs; fp64 stays fp64 so float64 oracles stay exact."""
    return torch.promote_types(t.dtype, torch.float32)


def check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")


def selective_log_softmax(
    logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """``log_softmax(logits / temperature)[..., ids]``: ``[B, L, V]``, ``[B, L]`` -> ``[B, L]``."""
    check_temperature(temperature)
    if logits.shape[:-1] != ids.shape:
        raise ValueError(
            f"ids shape {tuple(ids.shape)} must be logits.shape[:-1] = {tuple(logits.shape[:-1])}"
        )
    # log_softmax subtracts the row max first, which is exact in floating point, so rows far
    # from 0 (e.g. all near -1e4) keep full precision; ``x - logsumexp(x)`` would not.
    logp = F.log_softmax(logits.to(compute_dtype(logits)) / temperature, dim=-1)
    return torch.gather(logp, -1, ids.long().unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Shannon entropy (nats) of ``softmax(logits / temperature)``: ``[..., V]`` -> ``[...]``."""
    check_temperature(temperature)
    logp = F.log_softmax(logits.to(compute_dtype(logits)) / temperature, dim=-1)
    p = logp.exp()
    # -inf logits have p == 0 and contribute 0; 0 * -inf would be NaN, in the value and in its
    # gradient, so logp is zeroed there before the product.
    return -(p * logp.masked_fill(p == 0, 0.0)).sum(-1)


def linear_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``hidden @ weight.T + bias`` in the compute dtype of ``hidden`` (fp32, or fp64 for fp64):
    ``[..., H]``, ``[V, H]``, ``[V]`` -> ``[..., V]``. Each input is rounded to that dtype as
    stored, so bf16 weights and activations multiply exactly."""
    dtype = compute_dtype(hidden)
    return F.linear(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))


def gamma_weights(
    advantages: torch.Tensor,
    log_ratio_per_token: torch.Tensor,
    mask: torch.Tensor,
    importance_sampling_ratio: torch.Tensor | None,
    k_pos: float,
    lambda_pos: float,
    k_neg: float,
    lambda_neg: float,
) -> torch.Tensor:
    """VESPO's detached sequence weight ``phi(w) = exp(lambda + k log w - lambda w)``: ``[B, 1]``.

    ``w`` is the sequence-level ratio ``prod pi/pi_old`` (times the vLLM ratio when given), clamped
    in log space to ``[log 1e-8, 20]`` as TRL does; advantages ``[B, 1]``, the rest ``[B, L]``.
    """
    with torch.no_grad():
        lower_clamp = math.log(1e-8)
        seq_log_ratio = (log_ratio_per_token.clamp(-20.0, 20.0) * mask).sum(-1, keepdim=True)
        if importance_sampling_ratio is not None:
            log_is = torch.log(importance_sampling_ratio).clamp(lower_clamp, 20.0)
            seq_log_ratio = seq_log_ratio + log_is.sum(-1, keepdim=True)
        log_w = seq_log_ratio.clamp(lower_clamp, 20.0)
        nonneg = advantages >= 0
        k = torch.where(nonneg, k_pos, k_neg).to(log_w.dtype)
        lam = torch.where(nonneg, lambda_pos, lambda_neg).to(log_w.dtype).clamp(min=1e-4)
        phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
        return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def dapo_normalizer(
    mask: torch.Tensor, num_items_in_batch: int | float | torch.Tensor | None = None
) -> torch.Tensor:
    """Token normaliser of dapo / cispo / vespo for this process (no communication).

    The contract, Liger's and TRL's: ``num_items_in_batch`` is the number of completion tokens of
    the whole batch, over every process (and every gradient-accumulation micro-batch the
    optimiser step spans); the normaliser is it over the world size, so that data parallelism's
    mean over processes makes the loss a mean over all those tokens. The caller computes it (an
    all-reduce of its token count under data parallelism). Without it the normaliser is this
    call's own token count: right for one process, and for several only when they hold equally
    many tokens.
    """
    if num_items_in_batch is not None:
        n = torch.as_tensor(num_items_in_batch, device=mask.device).to(mask.dtype)
        return (n / _world_size()).clamp(min=1.0)
    return mask.sum().clamp(min=1.0)


def _as_2d(t: torch.Tensor, name: str, b: int, seq: int, dtype: torch.dtype) -> torch.Tensor:
    """[B] -> [B, 1]; [B, 1] and [B, L] pass; anything else is an error naming ``name``."""
    if t.dim() == 1:
        t = t.unsqueeze(-1)
    if t.dim() != 2 or t.shape[0] != b or t.shape[1] not in (1, seq):
        raise ValueError(
            f"{name} must be [B], [B, 1] or [B, L] with B={b}, L={seq}; got {tuple(t.shape)}"
        )
    return t.to(dtype)


def _masked_mean_per_seq(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """TRL's ``masked_seq_mean``: [B] (NaN for a sequence with no valid token)."""
    if x.shape[1] == 1:
        return x.squeeze(1)
    return (x * mask).sum(-1) / mask.sum(-1)


def _global_masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """TRL's ``global_masked_mean`` on one process: a [B, 1] value is averaged over sequences."""
    if x.shape[1] == 1:
        return x.sum() / x.shape[0]
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def _nan_extreme(x: torch.Tensor, largest: bool) -> torch.Tensor:
    keep = x[~torch.isnan(x)]
    if keep.numel() == 0:
        return torch.full((), float("nan"), dtype=x.dtype, device=x.device)
    return keep.max() if largest else keep.min()


class GRPOTerms(NamedTuple):
    """The unreduced GRPO objective; every tensor ``[B, L]`` except the 0-dim metrics."""

    per_token_loss: torch.Tensor  # includes beta * kl; not yet multiplied by the mask
    per_token_kl: torch.Tensor | None  # None when beta == 0
    is_clipped: torch.Tensor  # 1.0 where the ratio was clipped (0 for sapo / vespo)
    mask: torch.Tensor  # the completion mask in the compute dtype
    metrics: dict[str, torch.Tensor]  # TRL's logged names, detached


def grpo_per_token_loss(
    per_token_logps: torch.Tensor,
    old_per_token_logps: torch.Tensor | None,
    ref_per_token_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor | None,
    options: GRPOLossOptions | None = None,
    *,
    vllm_is_ratio: torch.Tensor | None = None,
    **option_keywords,
) -> GRPOTerms:
    """The unreduced GRPO objective, before the ``loss_type`` normalisation (see ``GRPOTerms``).

    The options come as ``options`` or as ``GRPOLossOptions`` keywords (``loss_type="grpo"``...),
    not both; ``temperature`` and ``max_completion_length`` play no part here. ``metrics`` holds
    TRL's names: ``kl`` (when ``beta != 0``); ``clip_ratio/low_mean``, ``high_mean``,
    ``region_mean``, ``low_min``, ``high_max`` for the PPO-clipped types; ``cispo_clip_ratio``;
    ``vespo/phi_seq_mean``.
    """
    opts = resolve_options(options, **option_keywords)
    loss_type, beta, eps_low, eps_high = opts.loss_type, opts.beta, opts.eps_low, opts.eps_high
    if per_token_logps.dim() != 2:
        raise ValueError(f"per_token_logps must be [B, L], got {tuple(per_token_logps.shape)}")
    b, seq = per_token_logps.shape
    dtype = compute_dtype(per_token_logps)
    for name, t in (("old_per_token_logps", old_per_token_logps),
                    ("ref_per_token_logps", ref_per_token_logps),
                    ("completion_mask", completion_mask)):
        if t is not None and t.shape != per_token_logps.shape:
            raise ValueError(
                f"{name} must be [B, L] = {tuple(per_token_logps.shape)}, got {tuple(t.shape)}"
            )
    if beta != 0.0 and ref_per_token_logps is None:
        raise ValueError("ref_per_token_logps is required when beta != 0")

    if completion_mask is None:
        mask = torch.ones(b, seq, dtype=dtype, device=per_token_logps.device)
    else:
        mask = completion_mask.to(dtype)
    valid = mask != 0
    zero = torch.zeros((), dtype=dtype, device=per_token_logps.device)
    logps = torch.where(valid, per_token_logps.to(dtype), zero)
    if old_per_token_logps is None:
        old = logps.detach()
    else:
        old = torch.where(valid, old_per_token_logps.to(dtype), zero)
    adv = _as_2d(advantages, "advantages", b, seq, dtype)
    ratio = None if vllm_is_ratio is None else _as_2d(vllm_is_ratio, "vllm_is_ratio", b, seq, dtype)

    log_ratio = logps - old
    if opts.importance_sampling_level == "token":
        log_weights = log_ratio
    else:
        log_weights = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_weights)

    per_token_kl = None
    if beta != 0.0:
        ref = torch.where(valid, ref_per_token_logps.to(dtype), zero)
        per_token_kl = torch.exp(ref - logps) - (ref - logps) - 1
        if opts.use_bias_correction_kl:
            per_token_kl = per_token_kl * coef_1

    metrics: dict[str, torch.Tensor] = {}
    if loss_type == "cispo":
        clamped = torch.clamp(coef_1, max=eps_high).detach()
        per_token_loss = -clamped * adv * logps
        clipped = ((coef_1 > eps_high) & (adv > 0)).to(dtype)
        metrics["cispo_clip_ratio"] = _global_masked_mean(clipped, mask)
    elif loss_type in PPO_CLIP_LOSS_TYPES:
        coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
        if opts.delta is not None:
            coef_1 = torch.clamp(coef_1, max=opts.delta)
        per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)
        # TRL measures clipping on the delta-clamped coef_1.
        low = ((coef_1 < 1 - eps_low) & (adv < 0)).to(dtype)
        high = ((coef_1 > 1 + eps_high) & (adv > 0)).to(dtype)
        region = clipped = torch.maximum(low, high)
        metrics["clip_ratio/low_mean"] = _global_masked_mean(low, mask)
        metrics["clip_ratio/high_mean"] = _global_masked_mean(high, mask)
        metrics["clip_ratio/region_mean"] = _global_masked_mean(region, mask)
        metrics["clip_ratio/low_min"] = _nan_extreme(_masked_mean_per_seq(low, mask), False)
        metrics["clip_ratio/high_max"] = _nan_extreme(_masked_mean_per_seq(high, mask), True)
    elif loss_type == "sapo":
        temps = torch.where(
            adv > 0, opts.sapo_temperature_pos, opts.sapo_temperature_neg
        ).to(dtype)
        per_token_loss = -(torch.sigmoid(temps * (coef_1 - 1)) * 4 / temps) * adv
        clipped = torch.zeros_like(per_token_loss)
    else:
        phi = gamma_weights(adv, log_ratio, mask, ratio, opts.vespo_k_pos, opts.vespo_lambda_pos,
                            opts.vespo_k_neg, opts.vespo_lambda_neg)
        per_token_loss = -phi * adv * logps
        metrics["vespo/phi_seq_mean"] = _global_masked_mean(phi, mask)
        clipped = torch.zeros_like(per_token_loss)

    # VESPO folds the vLLM ratio into phi instead.
    if ratio is not None and loss_type != "vespo":
        per_token_loss = per_token_loss * ratio
    if per_token_kl is not None:
        per_token_loss = per_token_loss + beta * per_token_kl
        metrics["kl"] = _global_masked_mean(per_token_kl, mask)
    return GRPOTerms(
        per_token_loss.expand(b, seq),
        per_token_kl,
        clipped.detach().expand(b, seq),
        mask,
        {k: v.detach() for k, v in metrics.items()},
    )


def reduce_grpo_loss(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str,
    max_completion_length: int | None = None,
    num_items_in_batch: int | float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Normalise ``per_token_loss [B, L]`` into the scalar loss the way ``loss_type`` asks
    (``num_items_in_batch``: see ``dapo_normalizer``)."""
    check_choice("loss_type", loss_type, LOSS_TYPES)
    masked = per_token_loss * mask
    if loss_type in TOKEN_NORMALISED_LOSS_TYPES:
        return masked.sum() / dapo_normalizer(mask, num_items_in_batch)
    if loss_type in ("grpo", "sapo"):
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        length = per_token_loss.shape[1] if max_completion_length is None else max_completion_length
        return masked.sum() / (per_token_loss.shape[0] * length)
    # luspo: TRL 1.16's masked sum per sequence, averaged over sequences.
    return masked.sum(-1).mean()


def grpo_loss_from_logps(
    per_token_logps: torch.Tensor,
    old_per_token_logps: torch.Tensor | None,
    ref_per_token_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor | None,
    options: GRPOLossOptions | None = None,
    *,
    vllm_is_ratio: torch.Tensor | None = None,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    **option_keywords,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO loss (scalar, fp32 or fp64) and TRL's logged metrics from log-probs ``[B, L]``.

    The options come as ``options`` or as ``GRPOLossOptions`` keywords, not both.
    ``old_per_token_logps=None`` means on-policy (the ratio is ``exp(logp - logp.detach())``).
    ``num_items_in_batch``: see ``dapo_normalizer``. See the module docstring.
    """
    opts = resolve_options(options, **option_keywords)
    terms = grpo_per_token_loss(
        per_token_logps, old_per_token_logps, ref_per_token_logps, advantages, completion_mask,
        opts, vllm_is_ratio=vllm_is_ratio,
    )
    loss = reduce_grpo_loss(
        terms.per_token_loss, terms.mask, opts.loss_type, opts.max_completion_length,
        num_items_in_batch,
    )
    return loss, terms.metrics
