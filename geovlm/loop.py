"""Plumbing shared by the SFT and GRPO stages: optimizer, schedule, data order, metrics, resume.

Exact resume rests on two rules: the samples of step ``s`` are a pure function of (seed, stage,
s), and every step reseeds the RNGs from (seed, stage, s) before it draws anything. A resumed run
therefore replays exactly what an uninterrupted one would, given the optimizer state saved in the
checkpoint.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from geovlm.checkpoint import latest_checkpoint, load_trainer_state, save_checkpoint
from geovlm.config import RunConfig, StageConfig


@dataclass
class StageContext:
    """What a stage needs to know about the run it is part of."""

    config: RunConfig
    stage: StageConfig
    index: int
    device: torch.device
    rank: int = 0
    world_size: int = 1
    log: MetricsLog | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def stage_dir(self) -> Path:
        return self.config.run_dir / "stages" / f"{self.index}-{self.stage.name}"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def uses_fused_linear(self) -> bool:
        """Whether losses take the fused linear kernel on the last hidden state and
        ``lm_head.weight`` (no ``[tokens, V]`` logits): ``model.fused_linear_loss``, "auto" = on
        CUDA.

        Not when parameters are sharded (FSDP2, ZeRO-3; ``extras["shards_parameters"]``, set by
        the stage once its engine exists): the kernel reads ``lm_head.weight`` directly. Under
        DDP / ZeRO-1/2 the model body still runs through the wrapper's forward
        (``model.forward_hidden``), so gradients are synchronised as usual.
        """
        if self.extras.get("shards_parameters", False):
            return False
        setting = self.config.model.fused_linear_loss
        return setting == "on" or (setting == "auto" and self.device.type == "cuda")


def step_progress(ctx: StageContext, start: int):
    """The stage's steps ``start .. steps-1`` as a progress bar (rank 0 only draws it)."""
    from tqdm.auto import tqdm

    return tqdm(
        range(start, ctx.stage.steps),
        initial=start,
        total=ctx.stage.steps,
        desc=f"[{ctx.index}] {ctx.stage.name}",
        disable=not ctx.is_main,
        dynamic_ncols=True,
    )


def step_seed(seed: int, stage_index: int, step: int) -> int:
    """A distinct, reproducible seed for every (stage, step)."""
    return (seed * 1_000_003 + stage_index * 10_007 + step) % (2**31 - 1)


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def batch_indices(n_items: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Indices of step ``step``'s batch: consecutive slices of per-epoch seeded permutations."""
    if n_items <= 0:
        raise ValueError("cannot draw a batch from an empty dataset")
    start = step * batch_size
    out: list[int] = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n_items)
        perm = np.random.default_rng((seed, epoch)).permutation(n_items)
        take = min(batch_size - len(out), n_items - offset)
        out.extend(int(i) for i in perm[offset : offset + take])
    return out


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


class MetricsLog:
    """Append-only JSONL of per-step metrics; one line per (stage, step)."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {
            k: (float(v) if isinstance(v, np.floating | torch.Tensor) else v)
            for k, v in record.items()
        }
        with self.path.open("a") as handle:
            handle.write(json.dumps(clean) + "\n")

    def records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate(self, stage: str, keep_through_step: int) -> None:
        """Drop this stage's records after ``keep_through_step`` (recomputed on resume)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [
            r
            for r in self.records()
            if not (r.get("stage") == stage and r.get("step", -1) > keep_through_step)
        ]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(self.path)


def resume_if_possible(ctx: StageContext, engine) -> tuple[int, dict[str, Any]]:
    """Load the newest checkpoint of this stage into ``engine``; returns (next step, extras).

    Every rank reads the full weights and optimizer state (they load in a single process too);
    DeepSpeed ZeRO ranks additionally reload their own optimizer shard.
    """
    path = latest_checkpoint(ctx.stage_dir)
    if path is None:
        return 0, {}
    from geovlm.checkpoint import load_model_state

    state = load_trainer_state(path)
    engine.load_state(load_model_state(path, engine.policy), state["optimizer"], state["scheduler"])
    engine.load_optimizer_shards(path, ctx.rank, ctx.world_size)
    if ctx.log is not None:
        ctx.log.truncate(ctx.stage.name, state["step"] - 1)
    return state["step"], state.get("extra", {})


def checkpoint_stage(ctx: StageContext, engine, processor, next_step: int, extra=None) -> Path:
    """Save ``checkpoint-<next_step>`` (the step to run next) and drop older ones.

    Collective: every rank gathers its part of the full state; rank 0 writes the checkpoint.
    """
    from geovlm.checkpoint import prune_checkpoints
    from geovlm.distributed import barrier

    model_state = engine.full_model_state()
    optimizer_state = engine.optimizer_state()
    directory = ctx.stage_dir / f"checkpoint-{next_step}"
    sharded = getattr(engine, "zero_stage", 0) > 0
    if sharded:
        shard_dir = ctx.stage_dir / f".optimizer_shards-{next_step}"
        shard_dir.mkdir(parents=True, exist_ok=True)
        torch.save(engine.model.optimizer.state_dict(), shard_dir / f"rank{ctx.rank}.pt")
        barrier()
    if ctx.is_main:
        save_checkpoint(
            directory,
            engine.policy,
            processor,
            ctx.config,
            step=next_step,
            model_state=model_state,
            optimizer_state=optimizer_state or None,
            scheduler_state=engine.scheduler.state_dict(),
            extra=extra,
        )
        if sharded:
            (ctx.stage_dir / f".optimizer_shards-{next_step}").rename(
                directory / "optimizer_shards"
            )
        prune_checkpoints(ctx.stage_dir, keep=1)
    barrier()
    return directory
