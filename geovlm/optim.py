"""The optimizer and learning-rate schedule every stage and engine uses.

AdamW over the trainable parameters (no weight decay on biases and norm weights); linear warm-up
then cosine decay to ``min_lr_ratio`` of the peak, stepped once per optimizer step.
"""

from __future__ import annotations

import math

import torch

from geovlm.config import StageConfig


def make_optimizer(model: torch.nn.Module, stage: StageConfig) -> torch.optim.AdamW:
    """AdamW over trainable parameters; no weight decay on biases and norm weights."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": stage.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=stage.lr, betas=(0.9, 0.99), eps=1e-8)


def make_scheduler(optimizer: torch.optim.Optimizer, stage: StageConfig):
    """Linear warm-up over ``warmup_ratio`` of the steps, then cosine decay to ``min_lr_ratio``."""
    warmup = max(1, int(round(stage.warmup_ratio * stage.steps)))
    total = max(stage.steps, warmup + 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return stage.min_lr_ratio + (1.0 - stage.min_lr_ratio) * cosine

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
