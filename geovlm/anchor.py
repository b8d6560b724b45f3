"""The SFT anchor of a GRPO stage: next-token loss on the tasks the stage does not train.

GeoVLM-R1 runs GRPO task by task. A stage's policy gradient reaches only its own tasks' prompts,
yet it moves weights every task shares: on the embedded default the referred-detection stage
taught the model to answer region-caption prompts (which also name a box) with a box, and one
seed's region-caption ROUGE-L fell from 0.55 to 0.26 (benchmarks/RESULTS.md, "A tenth look").
InstructGPT met the same forgetting in PPO by mixing the pretraining gradient into each update
("PPO-ptx"). Here each GRPO step adds

    anchor_weight x (sum of next-token NLLs of anchor_batch_size SFT samples / their tokens)

to the GRPO loss, the samples drawn from the training data of ``anchor_tasks`` (by default every
task of the run the stage does not train), so the other tasks' answers stay what the SFT taught
while the stage's own tasks are optimised by their rewards alone.

Shapes and scaling follow the SFT stage (``geovlm.sft``): the batch is collated and run as an SFT
micro-batch (shared prefix or packing as the stage's ``packing`` / ``prompt_sharing`` say) and
the NLL is normalised by the global label-token count times the world size, as the GRPO loss is
(DDP averages gradients over ranks).
"""

from __future__ import annotations

import torch

from geovlm.config import StageConfig
from geovlm.data.collate import collate_sft, pad_token_id
from geovlm.data.schema import Sample
from geovlm.loop import StageContext, batch_indices
from geovlm.runtime import all_reduce_sum

# The anchor's sample order is its own stream, independent of the stage's prompt order.
SEED_OFFSET = 7919


def anchored_tasks(stage: StageConfig, trained: list[str], run_tasks: list[str]) -> list[str]:
    """The tasks the anchor of ``stage`` keeps: ``stage.anchor_tasks``, or every task of the run
    (``run_tasks``) the stage does not train (``trained``); none when the anchor is off."""
    if stage.kind != "grpo" or stage.anchor_weight == 0:
        return []
    candidates = stage.anchor_tasks if stage.anchor_tasks is not None else run_tasks
    trained = set(trained)
    return [t for t in candidates if t not in trained]


def anchor_samples(train: list[Sample], stage: StageConfig, tasks: list[str]) -> list[Sample]:
    """The training samples of ``tasks`` (``anchored_tasks``) the anchor of ``stage`` draws
    from; empty when the anchor is off, an error when it is on and finds none."""
    if stage.anchor_weight == 0:
        return []
    kept = set(tasks)
    samples = [s for s in train if s.task in kept]
    if not samples:
        raise ValueError(
            f"stage {stage.name!r}: anchor_weight {stage.anchor_weight} but no training samples "
            f"of the tasks it should keep ({sorted(tasks) or 'none: the stage trains every task'})"
        )
    return samples


class SFTAnchor:
    """Draws a GRPO step's anchor samples and computes their weighted SFT loss.

    Args:
        samples: ``anchor_samples(...)`` (non-empty).
        processor: the policy's processor.
        ctx: the stage's context (stage config, rank, world size, device).
        uses_fused_linear / shards_parameters: the engine's choices, as the SFT stage uses them.
    """

    def __init__(
        self,
        samples: list[Sample],
        processor,
        ctx: StageContext,
        uses_fused_linear: bool,
        shards_parameters: bool,
    ):
        stage = ctx.stage
        if stage.anchor_batch_size % ctx.world_size:
            raise ValueError(
                f"stage {stage.name!r}: anchor_batch_size {stage.anchor_batch_size} must be a "
                f"multiple of the world size {ctx.world_size}"
            )
        self.samples, self.processor, self.ctx = samples, processor, ctx
        self.fused_linear, self.sharded = uses_fused_linear, shards_parameters
        self.pad_id = pad_token_id(processor)

    def step_samples(self, step: int) -> list[Sample]:
        """This rank's anchor samples of ``step``: a pure function of the step (resumable)."""
        ctx, stage = self.ctx, self.ctx.stage
        seed = ctx.config.seed + ctx.index + SEED_OFFSET
        idx = batch_indices(len(self.samples), stage.anchor_batch_size, step, seed)
        per_rank = stage.anchor_batch_size // ctx.world_size
        return [self.samples[i] for i in idx[ctx.rank * per_rank : (ctx.rank + 1) * per_rank]]

    def loss(self, model, step: int) -> tuple[torch.Tensor, float]:
        """``(anchor_weight x NLL / tokens (x world size), the global NLL per token)`` of the
        step's anchor samples under ``model``, with grad."""
        from geovlm.sft import batch_to_device, model_batch, token_nll_sum

        ctx, stage = self.ctx, self.ctx.stage
        collated = collate_sft(self.step_samples(step), self.processor, stage.max_length)
        tokens = all_reduce_sum(int((collated["labels"][:, 1:] != -100).sum()))
        batch = model_batch(model, collated, stage, self.pad_id, self.sharded)
        nll, _ = token_nll_sum(model, batch_to_device(batch, ctx.device), self.fused_linear)
        per_token = all_reduce_sum(float(nll.detach())) / max(tokens, 1)
        return stage.anchor_weight * nll * ctx.world_size / max(tokens, 1), per_token
