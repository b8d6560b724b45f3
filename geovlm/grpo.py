"""GRPO stage: rollouts -> task rewards -> group advantages -> clipped-ratio loss with KL.

One step (DESIGN.md, "How data flows")::

    P prompts (this rank's shard)  --rollout engine-->     P*G completions (geovlm.engines)
    rewards.score(tasks, texts, targets)                    [P*G] total + components (CPU, numba)
    group_advantages(total, G, scale)                       [P*G]
    ref log-probs (the stage's start model: a frozen copy, or with LoRA the policy with its
                   adapters disabled; skipped when beta == 0)
    old log-probs (mu > 1: the policy before this batch's first update; else on-policy)
    mu x (policy forward -> grpo loss -> backward -> clip -> AdamW step)

The loss comes from ``geovlm.kernels``: on CUDA the fused linear kernel consumes the last hidden
state and ``lm_head.weight`` (no [N, V] logits), else the logits kernel / its reference. Rewards,
advantages and kernels are plain function calls on plain data.

With ``stage.prompt_sharing`` (the default) every pass runs each prompt once per group, not G
times (``geovlm.prefix``): the rollout's prefill, the reference / old log-probs, and the policy
forward with grad (activation checkpointing included), whose gradients reach the prompt through
the repeated KV cache. Under every engine: DDP, FSDP2 and DeepSpeed ZeRO-2/3 (each pass goes
through the model's own forward there, see ``geovlm.prefix``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from geovlm.advantages import group_advantages
from geovlm.config import StageConfig
from geovlm.data.loader import auto_workers, prefetched
from geovlm.data.schema import Sample
from geovlm.distributed import Engine, prepare_engine, prepare_reference
from geovlm.engines import build_engine
from geovlm.engines.base import EngineSetup, Rollouts, Sampling, prompt_preparer
from geovlm.loop import (
    StageContext,
    batch_indices,
    checkpoint_stage,
    resume_if_possible,
    step_progress,
    step_seed,
)
from geovlm.profiling import StepProfiler, nvtx_range
from geovlm.runtime import gather_rows, reduce_metrics, seed_everything


@dataclass
class PolicyBatch:
    """One optimisation batch: the rollouts (rows are completions, groups contiguous), their
    advantages and the log-probs the loss compares against.

    Attributes:
        rollouts: the ``Rollouts``; its tensors are used in place, nothing is copied.
        advantages: ``[R]`` float32.
        old_logps / ref_logps: ``[R, Lc]`` float32 or None.
    """

    rollouts: Rollouts
    advantages: torch.Tensor
    old_logps: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None

    @property
    def completion_ids(self) -> torch.Tensor:
        """``[R, Lc]``."""
        return self.rollouts.completion_ids

    @property
    def completion_mask(self) -> torch.Tensor:
        """``[R, Lc]``."""
        return self.rollouts.completion_mask

    @property
    def prompts(self) -> dict:
        """The ``R / G`` distinct prompts (``[R / G, P]`` tensors and their images)."""
        return self.rollouts.unique_prompt

    @property
    def num_generations(self) -> int:
        return self.rollouts.num_generations

    @property
    def prompt_length(self) -> int:
        """``P``, the (left-padded) prompt length."""
        return self.rollouts.prompt_length

    @functools.cached_property
    def inputs(self) -> dict:
        """Prompt + completion per row (``[R, P + Lc]``, each row's images): the full forward's
        input, built once and only when a pass runs without prompt sharing."""
        return self.rollouts.model_inputs()


def shares_prompts(ctx: StageContext) -> bool:
    """Whether the rollouts and the teacher-forced passes run each prompt once per group."""
    return ctx.stage.prompt_sharing


def build_policy_batch(rollouts, advantages: torch.Tensor, device: torch.device) -> PolicyBatch:
    """The rollouts (already on the model's device) with their advantages on ``device``."""
    return PolicyBatch(rollouts, advantages.to(device=device, dtype=torch.float32))


def completion_outputs(
    model, batch: PolicyBatch, share_prompt: bool, output: Literal["hidden", "logits"]
) -> torch.Tensor:
    """``[R, Lc, V]`` logits (or ``[R, Lc, H]`` hidden states) predicting each completion token:
    each prompt run once (``geovlm.prefix``), or prompt + completion per row."""
    from geovlm.model import forward_hidden, forward_logits
    from geovlm.prefix import completion_outputs as shared_outputs

    if share_prompt:
        return shared_outputs(
            model,
            batch.prompts,
            batch.completion_ids,
            batch.completion_mask,
            batch.num_generations,
            output,
        )
    length = batch.completion_ids.shape[1]
    if output == "hidden":
        start = batch.prompt_length - 1
        return forward_hidden(model, batch.inputs)[:, start : start + length]
    # Only positions P-1 .. P+L-1 are needed: keep the last L+1 (the prompt's logits would be
    # [R, P, V] of waste, 151,936 wide on a real Qwen).
    return forward_logits(model, batch.inputs, logits_to_keep=length + 1)[:, :length]


def completion_logps(
    model, batch: PolicyBatch, temperature: float, share_prompt: bool = True
) -> torch.Tensor:
    """Per-token log-probs ``[R, Lc]`` (fp32, no grad) of the completions under ``model``."""
    from geovlm.kernels import selective_log_softmax

    with torch.no_grad():
        logits = completion_outputs(model, batch, share_prompt, "logits")
        return selective_log_softmax(logits, batch.completion_ids, temperature).float()


def reference_logps(
    engine: Engine, reference, batch: PolicyBatch, temperature: float, share_prompt: bool
) -> torch.Tensor:
    """``[R, Lc]`` log-probs (fp32, no grad) under the stage's start model: its frozen copy
    ``reference``, or, with LoRA adapters (``reference`` None), the policy with them disabled,
    which is the same model without a second copy of its weights."""
    if reference is not None:
        return completion_logps(reference, batch, temperature, share_prompt)
    with engine.adapters_disabled():
        return completion_logps(engine.policy, batch, temperature, share_prompt)


def policy_loss(
    model, batch: PolicyBatch, ctx: StageContext, fused_linear: bool = False
) -> tuple[torch.Tensor, dict]:
    """The GRPO loss of ``batch`` under ``model`` (with grad) and TRL's metrics.

    ``linear_grpo_loss`` on the last hidden state and ``lm_head.weight`` with ``fused_linear``
    (the engine's choice), else ``grpo_loss`` on the completion logits: both the one GRPO math of
    ``geovlm.kernels.reference``, with the stage's ``loss_options()``. The kernels never
    communicate: the dapo / cispo / vespo normaliser gets the completion-token count of the
    whole step over every rank (``num_items_in_batch``), summed here.
    """
    from geovlm.kernels import grpo_loss, linear_grpo_loss
    from geovlm.model import lm_head_weight
    from geovlm.runtime import all_reduce_sum

    options = ctx.stage.loss_options()
    shared = shares_prompts(ctx)
    mask = batch.completion_mask
    num_items = all_reduce_sum(int(mask.sum())) if options.normalises_by_batch_tokens else None
    if fused_linear:
        hidden = completion_outputs(model, batch, shared, "hidden")
        return linear_grpo_loss(
            hidden,
            lm_head_weight(model),
            batch.completion_ids,
            batch.advantages,
            old_logp=batch.old_logps,
            ref_logp=batch.ref_logps,
            completion_mask=mask,
            options=options,
            num_items_in_batch=num_items,
        )
    logits = completion_outputs(model, batch, shared, "logits")
    return grpo_loss(
        logits,
        batch.old_logps,
        batch.ref_logps,
        batch.completion_ids,
        batch.advantages,
        mask,
        inplace=False,
        reduce=True,
        num_items_in_batch=num_items,
        options=options,
        named_metrics=True,
    )


def reward_options(ctx: StageContext, processor):
    """The stage's reward choices, with the model's box convention and pixel budget."""
    from dataclasses import asdict

    from geovlm.data.collate import pixel_budget
    from geovlm.rewards import RewardOptions

    min_pixels, max_pixels = pixel_budget(processor)
    return RewardOptions(
        convention=ctx.config.model.box_convention,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        embedding_device=str(ctx.device),
        **asdict(ctx.stage.rewards),
    )


def score_rollouts(rollouts, samples: list[Sample], stage: StageConfig, options):
    """Task rewards of every rollout row, routed by its sample's task (prompt echoes ignored)."""
    from geovlm.rewards import score

    rows = [samples[int(i)] for i in rollouts.sample_index]
    return score(
        [s.task for s in rows],
        rollouts.texts,
        [s.target for s in rows],
        weights=stage.reward_weights or None,
        options=options,
        prompts=[s.prompt for s in rows],
    )


def sampled_reward(
    model,
    processor,
    samples: list[Sample],
    ctx: StageContext,
    num_generations: int = 4,
    batch_size: int = 64,
    seed: int = 0,
    desc: str | None = None,
) -> dict[str, float]:
    """The GRPO objective on held-out prompts: mean reward of completions sampled at the stage's
    temperature (``num_generations`` per prompt, seeded), overall and per component.

    Greedy metrics move only when an argmax flips; this is the quantity GRPO optimises, so it is
    what shows whether a stage improved its tasks. ``desc``: a progress bar over the prompts
    with that label, drawn by rank 0 (none when ``None``).
    """
    from tqdm.auto import tqdm

    stage, options = ctx.stage, reward_options(ctx, processor)
    setup = EngineSetup(share_prompt=shares_prompts(ctx))
    rollout_engine = build_engine(ctx.config.rollout.engine, model, processor, setup)
    totals: dict[str, list[np.ndarray]] = {}
    per_call = max(1, batch_size // num_generations)
    bar = tqdm(total=len(samples), desc=desc, disable=desc is None or not ctx.is_main,
               dynamic_ncols=True)
    for start in range(0, len(samples), per_call):
        chunk = samples[start : start + per_call]
        sampling = Sampling(
            max_new_tokens=stage.max_new_tokens,
            temperature=stage.temperature,
            top_p=stage.top_p,
            seed=seed + start,
        )
        rollouts = rollout_engine.generate(chunk, num_generations, sampling)
        rewards = score_rollouts(rollouts, chunk, stage, options)
        totals.setdefault("reward", []).append(rewards.total)
        for name, values in rewards.components.items():
            totals.setdefault(f"reward/{name}", []).append(values)
        bar.update(len(chunk))
    bar.close()
    return {name: float(np.concatenate(parts).mean()) for name, parts in totals.items()}


def reward_metrics(
    total: np.ndarray, components: dict[str, np.ndarray], zero_std: np.ndarray, lengths: np.ndarray
) -> dict[str, float]:
    """Per-component reward mean/std, completion length, zero-variance group fraction."""
    metrics = {
        "reward": float(np.mean(total)),
        "reward_std": float(np.std(total)),
        "zero_std_frac": float(np.mean(zero_std)),
        "completion_length": float(np.mean(lengths)),
    }
    for name, values in components.items():
        metrics[f"reward/{name}"] = float(np.mean(values))
        metrics[f"reward/{name}_std"] = float(np.std(values))
    return metrics


def token_weights(metrics: dict, batch: PolicyBatch, stage: StageConfig) -> dict[str, float]:
    """This rank's weight of each loss metric that is a mean over completion tokens."""
    tokens = float(batch.completion_mask.sum())
    keys = ["kl"]
    if stage.importance_sampling_level == "token":
        keys += [k for k in metrics if k.startswith("clip_ratio/") and k.endswith("_mean")]
        keys.append("cispo_clip_ratio")
    return {k: tokens for k in keys if k in metrics}


def run_grpo(
    model,
    processor,
    train: list[Sample],
    ctx: StageContext,
    profile: bool = False,
    anchor: list[Sample] | None = None,
) -> Engine:
    """Optimise ``model`` with GRPO for ``ctx.stage.steps`` steps (resuming if possible).

    ``anchor``: the samples of the stage's SFT anchor (``geovlm.anchor.anchor_samples``), whose
    weighted next-token loss joins every step's loss; None or empty: no anchor.
    Returns the engine holding the trained (possibly wrapped or sharded) model.
    """
    stage = ctx.stage
    if not train:
        raise ValueError(f"stage {stage.name!r}: no training samples for tasks {stage.tasks}")
    if stage.batch_size % ctx.world_size:
        raise ValueError(
            f"stage {stage.name!r}: batch_size {stage.batch_size} (prompts per step) must be a "
            f"multiple of the world size {ctx.world_size}"
        )
    reference = None
    if stage.beta != 0.0 and not ctx.config.model.lora.enabled:
        # The frozen reference is the model this stage starts from (the SFT / previous stage),
        # copied before the policy is wrapped, and sharded like the policy.
        reference = prepare_reference(model, ctx.config, stage, ctx.runtime)
    engine = prepare_engine(model, ctx.config, stage, ctx.runtime)
    start, _ = resume_if_possible(ctx, engine)
    policy, model = engine.policy, engine.model
    sft_anchor = None
    if anchor:
        from geovlm.anchor import SFTAnchor

        sft_anchor = SFTAnchor(
            anchor, processor, ctx, engine.uses_fused_linear, engine.shards_parameters
        )
    # Sharded parameters need every rank in every forward of generate().
    synced = ctx.world_size > 1 and ctx.config.distributed.strategy != "ddp"
    per_rank = stage.batch_size // ctx.world_size
    options = reward_options(ctx, processor)
    # Built after the resume: an engine holding its own copy of the weights starts from them.
    setup = EngineSetup(share_prompt=shares_prompts(ctx), synced_ranks=synced)
    rollout_engine = build_engine(ctx.config.rollout.engine, policy, processor, setup)
    sampling = Sampling(
        max_new_tokens=stage.max_new_tokens, temperature=stage.temperature, top_p=stage.top_p
    )

    def step_prompts(step: int) -> list[Sample]:
        """This rank's prompts of ``step``: a pure function of the step, so resumable."""
        idx = batch_indices(len(train), stage.batch_size, step, ctx.config.seed + ctx.index)
        return [train[i] for i in idx[ctx.rank * per_rank : (ctx.rank + 1) * per_rank]]

    # The engine's CPU work on the prompts (images, chat template, tokens) runs ahead of the
    # loop in background workers when the engine can split it off and workers are available.
    prepare = prompt_preparer(rollout_engine)
    steps = range(start, stage.steps)
    workers = auto_workers(ctx.device, ctx.config.data.workers) if prepare is not None else 0
    ahead = (
        prefetched(lambda step: prepare(step_prompts(step)), steps, workers)
        if workers
        else (None for _ in steps)
    )
    profiler = StepProfiler(ctx.config.run_dir / "profile", stage.name, profile and ctx.is_main)
    bar = step_progress(ctx, start)
    for step, prepared in zip(bar, ahead, strict=True):
        profiler.step()
        seed_everything(step_seed(ctx.config.seed, ctx.index, step))
        prompts = step_prompts(step)

        with nvtx_range("grpo/rollout"):
            policy.eval()
            extra = {} if prepared is None else {"prepared": prepared}
            rollouts = rollout_engine.generate(prompts, stage.num_generations, sampling, **extra)
            policy.train()
        with nvtx_range("grpo/reward"):
            rewards = score_rollouts(rollouts, prompts, stage, options)
        # Every rank's rewards (a few floats per row): the advantages and the reward metrics are
        # those of the global batch. Groups never straddle ranks, but scale_rewards="batch"
        # divides by the std of the whole batch.
        all_total, all_components, all_lengths = gather_rows(
            (rewards.total, rewards.components, rollouts.lengths.cpu().numpy())
        )
        all_advantages, all_zero_std = group_advantages(
            torch.as_tensor(all_total, dtype=torch.float64),
            stage.num_generations,
            stage.scale_rewards,
        )
        mine = slice(ctx.rank * len(rewards.total), (ctx.rank + 1) * len(rewards.total))
        batch = build_policy_batch(rollouts, all_advantages[mine], ctx.device)
        if stage.beta != 0.0:
            with nvtx_range("grpo/ref_logps"):
                batch.ref_logps = reference_logps(
                    engine, reference, batch, stage.temperature, shares_prompts(ctx)
                )
        if stage.num_iterations > 1:
            with nvtx_range("grpo/old_logps"):
                batch.old_logps = completion_logps(
                    policy, batch, stage.temperature, shares_prompts(ctx)
                )

        # mu iterations on the same rollouts; the schedule advances once per step.
        lr = engine.lr
        loss_metrics: dict[str, float] = {}
        for iteration in range(stage.num_iterations):
            with nvtx_range("grpo/loss"):
                loss, metrics = policy_loss(model, batch, ctx, engine.uses_fused_linear)
            total = loss
            if sft_anchor is not None:
                with nvtx_range("grpo/anchor"):
                    anchor_loss, anchor_nll = sft_anchor.loss(model, step)
                total = loss + anchor_loss
            with nvtx_range("grpo/backward"):
                engine.backward(total)
            with nvtx_range("grpo/optimizer"):
                grad_norm = engine.step(advance_schedule=iteration + 1 == stage.num_iterations)
            # "loss" stays the GRPO loss alone (comparable with and without an anchor).
            loss_metrics = {"loss": loss.item(), "grad_norm": grad_norm}
            if sft_anchor is not None:
                loss_metrics["anchor_nll"] = anchor_nll
            loss_metrics.update({k: float(v) for k, v in metrics.items()})
        # The next rollout samples from the updated weights (a no-op for the built-in engine,
        # which samples with ``policy`` itself; vLLM / SGLang engines load them here).
        rollout_engine.sync_weights(policy)

        record = {"stage": stage.name, "kind": "grpo", "step": step, "lr": lr}
        # Metrics of the global batch: reward statistics over every rank's rows, token means
        # weighted by each rank's tokens (TRL's global_masked_mean).
        record.update(reward_metrics(all_total, all_components, all_zero_std.numpy(), all_lengths))
        record.update(reduce_metrics(loss_metrics, token_weights(loss_metrics, batch, stage)))
        if "clip_ratio/region_mean" in record:
            record["clip_ratio"] = record["clip_ratio/region_mean"]
        if ctx.log is not None and ctx.is_main:
            ctx.log.write(record)
        bar.set_postfix(reward=f"{record['reward']:.3f}", loss=f"{record['loss']:.3f}")
        if stage.save_every and (step + 1) % stage.save_every == 0 and step + 1 < stage.steps:
            checkpoint_stage(ctx, engine, processor, step + 1)
    profiler.close()
    bar.close()
    return engine
