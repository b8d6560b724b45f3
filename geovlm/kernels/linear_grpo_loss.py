"""The GRPO loss straight from hidden states and ``lm_head.weight``: the [N, V] logits never exist.

    linear_grpo_loss(hidden [B, L, H], weight [V, H], completion_ids [B, L], advantages [B],
                     old_logp=, ref_logp=, completion_mask=, bias=, options= | option keywords)
        -> (loss scalar fp32, metrics dict): the loss of ``reference.grpo_loss_from_logps``

The log-probs come from the fused linear op (``linear_logprobs.py``); the GRPO math on them is the
spec, the one definition shared with the logits loss ``grpo_loss``: autograd hands dLoss/dlogp
[N] to the op's backward, so the two losses cannot drift.
"""

from __future__ import annotations

import torch

from . import reference
from ._dispatch import Backend
from .linear_logprobs import linear_selective_log_softmax
from .options import GRPOLossOptions, resolve_options


def _align_hidden(hidden: torch.Tensor, b: int, seq: int) -> torch.Tensor:
    """[B, L, H], [B, L + 1, H] (the logits loss's layout: the last position is dropped) or
    [B * L, H] -> [B, L, H]."""
    if hidden.dim() == 3 and hidden.shape[0] == b and hidden.shape[1] in (seq, seq + 1):
        return hidden[:, :seq]
    if hidden.dim() == 2 and hidden.shape[0] == b * seq:
        return hidden.view(b, seq, hidden.shape[1])
    raise ValueError(
        f"hidden must be [B, L, H], [B, L + 1, H] or [B * L, H] for completion_ids [B, L] = "
        f"[{b}, {seq}], got {tuple(hidden.shape)}"
    )


def linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    completion_ids: torch.Tensor,
    advantages: torch.Tensor,
    *,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    completion_mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    options: GRPOLossOptions | None = None,
    vllm_is_ratio: torch.Tensor | None = None,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    vocab_chunk_size: int | None = None,
    backend: Backend = "auto",
    **option_keywords,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO loss from the policy's last hidden states and ``lm_head.weight``.

    hidden ``[B, L, H]`` aligned with ``completion_ids [B, L]`` (``[B, L + 1, H]`` and
    ``[B * L, H]`` are accepted too), weight ``[V, H]``, bias ``[V]``, advantages ``[B]``;
    ``old_logp``, ``ref_logp``, ``completion_mask`` ``[B, L]``; ``vllm_is_ratio`` and
    ``num_items_in_batch`` as in ``reference.grpo_loss_from_logps``. The loss options come as
    ``options`` or as ``GRPOLossOptions`` keywords (``loss_type="grpo"``, ``temperature=1.0``...),
    not both; their defaults are ``grpo_loss``'s (Liger's, temperature 0.9 included). Ids at
    masked positions are never read (padding may hold any value). ``vocab_chunk_size`` and
    ``backend``: ``linear_selective_log_softmax``. Returns ``(loss, metrics)`` with TRL's metric
    names.
    """
    opts = resolve_options(options, **option_keywords)
    if completion_ids.dim() != 2:
        raise ValueError(f"completion_ids must be [B, L], got {tuple(completion_ids.shape)}")
    b, seq = completion_ids.shape
    hidden = _align_hidden(hidden, b, seq)
    if completion_mask is not None:
        if tuple(completion_mask.shape) != (b, seq):
            raise ValueError(
                f"completion_mask must be [B, L] = [{b}, {seq}], got {tuple(completion_mask.shape)}"
            )
        completion_ids = torch.where(
            completion_mask.to(torch.bool), completion_ids, torch.zeros_like(completion_ids)
        )
    logp = linear_selective_log_softmax(
        hidden, weight, completion_ids, bias, opts.temperature,
        vocab_chunk_size=vocab_chunk_size, backend=backend,
    )
    return reference.grpo_loss_from_logps(
        logp, old_logp, ref_logp, advantages, completion_mask, opts,
        vllm_is_ratio=vllm_is_ratio, num_items_in_batch=num_items_in_batch,
    )
