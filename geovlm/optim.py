"""The optimizer and learning-rate schedule every stage and engine uses.

AdamW over the trainable parameters (no weight decay on biases and norm weights); linear warm-up
then cosine decay to ``min_lr_ratio`` of the peak, stepped once per optimizer step.
"""

from __future__ import annotations

import math

import torch

from geovlm.config import StageConfig

# AdamW's moment decay and epsilon (the stage config leaves them fixed).
ADAM_BETAS = (0.9, 0.99)
ADAM_EPS = 1e-8


def parameter_groups(model: torch.nn.Module, stage: StageConfig) -> list[dict]:
    """The trainable parameters in two groups: with the stage's weight decay, and without it
    (biases and norm weights)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name else decay).append(param)
    return [
        {"params": decay, "weight_decay": stage.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(model: torch.nn.Module, stage: StageConfig) -> torch.optim.AdamW:
    """AdamW over trainable parameters; no weight decay on biases and norm weights."""
    return torch.optim.AdamW(
        parameter_groups(model, stage), lr=stage.lr, betas=ADAM_BETAS, eps=ADAM_EPS
    )


def warmup_steps(stage: StageConfig) -> int:
    """Steps of linear warm-up: ``warmup_ratio`` of the stage's steps, at least 1."""
    return max(1, int(round(stage.warmup_ratio * stage.steps)))


def make_scheduler(optimizer: torch.optim.Optimizer, stage: StageConfig):
    """Linear warm-up over ``warmup_ratio`` of the steps, then cosine decay to ``min_lr_ratio``."""
    warmup = warmup_steps(stage)
    total = max(stage.steps, warmup + 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return stage.min_lr_ratio + (1.0 - stage.min_lr_ratio) * cosine

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
