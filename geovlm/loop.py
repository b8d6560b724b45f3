"""Plumbing shared by the SFT and GRPO stages: data order, seeds, metrics, resume, checkpoints.

Exact resume rests on two rules: the samples of step ``s`` are a pure function of (seed, stage,
s), and every step reseeds the RNGs from (seed, stage, s) before it draws anything. A resumed run
therefore replays exactly what an uninterrupted one would, given the optimizer state saved in the
checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from geovlm.checkpoint import latest_checkpoint, prune_checkpoints
from geovlm.config import RunConfig, StageConfig
from geovlm.runtime import Runtime

if TYPE_CHECKING:
    from geovlm.distributed import Engine
    from geovlm.trackers import Trackers


@dataclass
class StageContext:
    """What a stage needs to know about the run it is part of."""

    config: RunConfig
    stage: StageConfig
    index: int
    runtime: Runtime
    log: MetricsLog | None = None

    @property
    def stage_dir(self) -> Path:
        return self.config.run_dir / "stages" / f"{self.index}-{self.stage.name}"

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @property
    def rank(self) -> int:
        return self.runtime.rank

    @property
    def world_size(self) -> int:
        return self.runtime.world_size

    @property
    def is_main(self) -> bool:
        return self.runtime.is_main


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


class MetricsLog:
    """Append-only JSONL of per-step metrics; one line per (stage, step). Every record also goes
    to the run's experiment trackers (``geovlm.trackers``), which follow its truncation."""

    def __init__(self, path: Path, enabled: bool = True, trackers: Trackers | None = None):
        self.path = Path(path)
        self.enabled = enabled
        self.trackers = trackers
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
        if self.trackers is not None:
            self.trackers.log_record(clean)

    def records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate(self, stage: str, keep_through_step: int) -> None:
        """Drop this stage's records after ``keep_through_step`` (recomputed on resume)."""
        if not self.enabled:
            return
        if self.trackers is not None:
            self.trackers.rewind(stage, keep_through_step + 1)
        if not self.path.is_file():
            return
        kept = [
            r
            for r in self.records()
            if not (r.get("stage") == stage and r.get("step", -1) > keep_through_step)
        ]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(self.path)


def resume_if_possible(ctx: StageContext, engine: Engine) -> tuple[int, dict[str, Any]]:
    """Load the newest checkpoint of this stage into ``engine``; returns (next step, extras).

    Records of this stage after the checkpoint (an interrupted attempt's) are dropped: the
    stage recomputes them.
    """
    path = latest_checkpoint(ctx.stage_dir)
    if path is None:
        return 0, {}
    step, extra = engine.load_checkpoint(path)
    if ctx.log is not None:
        ctx.log.truncate(ctx.stage.name, step - 1)
    if ctx.is_main:
        print(f"[{ctx.index}] {ctx.stage.name}: resuming at step {step} from {path}", flush=True)
    return step, extra


def checkpoint_stage(
    ctx: StageContext, engine: Engine, processor, next_step: int, extra: dict | None = None
) -> Path:
    """Save ``checkpoint-<next_step>`` (the step to run next) and drop older ones (collective)."""
    directory = engine.save_checkpoint(
        ctx.stage_dir / f"checkpoint-{next_step}", processor, ctx.config, next_step, extra
    )
    if ctx.is_main:
        prune_checkpoints(ctx.stage_dir, keep=1)
    return directory
