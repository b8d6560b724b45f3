"""Group-relative advantages (GRPO) from per-completion rewards.

``rewards`` is ``[P * G]`` with the ``G`` completions of each prompt contiguous. For each group,
``A_i = r_i - mean(r_group)``, then divided by ``std + 1e-4`` where ``std`` is the unbiased
standard deviation of the group (``scale="group"``, GRPO), of the whole batch (``"batch"``), or
not divided at all (``"none"``, Dr. GRPO's mean-only advantages). These are TRL's definitions.
A group whose rewards are all equal gets zero advantages, hence zero policy gradient.
"""

from __future__ import annotations

import torch

EPS = 1e-4


def _unbiased_std(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    n = x.numel() if dim is None else x.shape[dim]
    if n < 2:
        return torch.zeros(()) if dim is None else torch.zeros(x.shape[0], dtype=x.dtype)
    return x.std(dim=dim, unbiased=True) if dim is not None else x.std(unbiased=True)


def group_advantages(
    rewards: torch.Tensor, num_generations: int, scale: str = "group"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages ``[P*G]`` and, per completion, whether its group had zero reward std.

    Args:
        rewards: float ``[P * G]``, groups contiguous.
        num_generations: ``G``.
        scale: ``"group"``, ``"batch"`` or ``"none"``.
    """
    if rewards.ndim != 1 or rewards.numel() % num_generations:
        raise ValueError(
            f"rewards of shape {tuple(rewards.shape)} do not split into groups of {num_generations}"
        )
    rewards = rewards.to(torch.float64)
    grouped = rewards.view(-1, num_generations)
    mean = grouped.mean(dim=1).repeat_interleave(num_generations)
    group_std = _unbiased_std(grouped, dim=1).repeat_interleave(num_generations)
    advantages = rewards - mean
    if scale == "group":
        advantages = advantages / (group_std + EPS)
    elif scale == "batch":
        advantages = advantages / (_unbiased_std(rewards) + EPS)
    elif scale != "none":
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    zero_std = torch.isclose(group_std, torch.zeros_like(group_std))
    # The group mean of equal floats can differ from them by an ulp; such a group carries no
    # signal, so its advantages are exactly zero rather than ulp / 1e-4.
    advantages = torch.where(zero_std, torch.zeros_like(advantages), advantages)
    return advantages, zero_std
