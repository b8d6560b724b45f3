"""SFT stage: next-token cross-entropy on the assistant tokens only.

Per optimizer step the loss is ``sum of token NLLs / number of assistant tokens`` over the whole
gradient-accumulation window (not a mean of per-micro-batch means, which would weight short
samples more: the well-known gradient-accumulation bug). AdamW, warm-up + cosine schedule,
periodic teacher-forced validation loss, atomic checkpoints with exact resume.

Packing (``stage.packing``, see ``geovlm.data.packing`` and ``geovlm.packed``) puts several
samples of a micro-batch into one row instead of padding each to the longest; the loss counts
exactly the same labels.

* ``"off"``: every micro-batch is padded.
* ``"on"``: every micro-batch is packed into rows of at most ``max_length`` tokens (one row with
  flash-attention 2, which is truly padding-free); an error at the start of the stage if the
  model or the installed transformers cannot run packed sequences.
* ``"auto"`` (default), when the model supports packing: with flash-attention 2 every
  micro-batch is packed (one row; varlen attention costs what the samples cost alone, so
  padding is pure waste). With SDPA or eager attention, packed rows carry a dense block-diagonal
  mask whose cost grows with the square of the row width, so a micro-batch is packed only into
  rows no wider than its longest sample, and only when that saves rows: never more attention
  work than the padded batch, less MLP / projection work (measured on CPU in
  benchmarks/RESULTS.md, "SFT packing"). Otherwise it stays padded.

Shared prefix (``stage.prompt_sharing``, default on, under ``packing: auto`` with SDPA / eager
attention): the leading tokens every sample of the micro-batch shares (the chat template's system
turn) run once, every row attends to their KV cache, and only the rests are packed
(``geovlm.sft_prefix``), whenever that runs fewer positions than the padded or packed batch
(``model_batch``). On the embedded default it halves the positions and makes a step 1.4x faster.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from geovlm.config import StageConfig
from geovlm.data.collate import collate_sft, pad_token_id
from geovlm.data.loader import auto_workers, prefetched
from geovlm.data.packing import plan_rows, sequence_lengths
from geovlm.data.schema import Sample
from geovlm.distributed import Engine, prepare_engine
from geovlm.loop import (
    StageContext,
    batch_indices,
    checkpoint_stage,
    resume_if_possible,
    step_progress,
    step_seed,
)
from geovlm.model import forward_hidden, forward_logits, lm_head_weight
from geovlm.packed import attention_implementation, pack_for_model, packing_unsupported
from geovlm.profiling import StepProfiler, nvtx_range
from geovlm.runtime import all_reduce_sum, seed_everything
from geovlm.sft_prefix import (
    SharedPrefixBatch,
    prefix_sharing_unsupported,
    shared_prefix_forward,
    split_shared_prefix,
)


def batch_to_device(
    batch: dict | SharedPrefixBatch, device: torch.device
) -> dict | SharedPrefixBatch:
    """A model batch (``model_batch``'s dict or ``SharedPrefixBatch``) on ``device``."""
    if isinstance(batch, SharedPrefixBatch):
        return batch.to(device)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def token_nll_sum(
    model, batch: dict | SharedPrefixBatch, fused_linear: bool = False
) -> tuple[torch.Tensor, int]:
    """Sum of next-token NLLs over positions whose label is not -100, and their count.

    ``batch``: a padded or packed batch (a dict), or a ``SharedPrefixBatch`` (its prefix runs
    once, ``geovlm.sft_prefix``).

    Only labelled positions reach ``lm_head``: the prompt (instruction and image tokens, most of
    an EO sample) never becomes ``[T, V]`` logits. By default the model's own forward keeps the
    positions where any row has a label (``logits_to_keep`` as an index tensor; works under
    every engine); with ``fused_linear`` the NLL comes from
    ``geovlm.kernels.linear_selective_log_softmax`` on the labelled hidden states and
    ``lm_head.weight``, so no logits exist at all (the Triton kernel on CUDA).
    """
    shared = isinstance(batch, SharedPrefixBatch)
    labels = batch.labels if shared else batch["labels"]
    inputs = None if shared else {k: v for k, v in batch.items() if k != "labels"}
    targets = labels[:, 1:]  # position t predicts token t + 1
    labelled = targets != -100
    count = int(labelled.sum())
    if fused_linear:
        from geovlm.kernels.linear_grpo_loss import linear_selective_log_softmax

        if shared:
            hidden = shared_prefix_forward(model, batch, "hidden")
        else:
            hidden = forward_hidden(model, inputs)
        hidden = hidden[:, :-1][labelled]  # [N, H]
        logps = linear_selective_log_softmax(hidden, lm_head_weight(model), targets[labelled])
        return -logps.sum(), count
    positions = labelled.any(dim=0).nonzero().squeeze(1)  # [K]
    if shared:
        logits = shared_prefix_forward(model, batch, "logits", positions)
    else:
        logits = forward_logits(model, inputs, logits_to_keep=positions)
    logits = logits.float()  # [B, K, V]
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        targets[:, positions].reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )
    return nll, count


def check_packing(model, stage: StageConfig) -> None:
    """Raise ValueError, naming the stage and the reason, if ``packing=on`` cannot pack."""
    if stage.packing == "on" and (reason := packing_unsupported(model)) is not None:
        raise ValueError(f"stage {stage.name!r}: packing=on, but {reason}; use packing=auto or off")


def packing_capacity(model, batch: dict, stage: StageConfig) -> int | None:
    """Row capacity to pack ``batch`` with under ``stage.packing``, or None to keep it padded.

    The rule is the module docstring's (``check_packing`` vets ``"on"`` once per stage).
    """
    if stage.packing == "off" or (stage.packing == "auto" and packing_unsupported(model)):
        return None
    if stage.packing == "on" or attention_implementation(model) == "flash_attention_2":
        return stage.max_length
    lengths = sequence_lengths(batch)
    capacity = max(lengths)
    return capacity if len(plan_rows(lengths, capacity)) < len(lengths) else None


def model_batch(
    model, batch: dict, stage: StageConfig, pad_id: int, sharded: bool = False
) -> dict | SharedPrefixBatch:
    """What the model runs for the right-padded micro-batch ``batch``.

    Padded, or packed (``packing_capacity``); or, with ``stage.prompt_sharing`` under
    ``packing: auto`` on a model that supports it (SDPA / eager attention) and whose
    parameters are not sharded (``sharded``: FSDP2 / ZeRO-3, whose backward gathers a layer's
    weights when the gradient reaches that layer's output, which the prefix pass's output never
    gets: only its KV cache is read), the rows' shared leading tokens once and the rests packed
    (``geovlm.sft_prefix``), when that runs fewer token positions than the padded or packed
    batch. The loss is the same whichever runs.
    """
    capacity = packing_capacity(model, batch, stage)
    if capacity is None:
        positions = batch["input_ids"].numel()
    else:
        lengths = sequence_lengths(batch)
        plan = plan_rows(lengths, capacity)
        positions = len(plan) * max(sum(lengths[i] for i in row) for row in plan)
    if (
        stage.prompt_sharing
        and stage.packing == "auto"
        and not sharded
        and prefix_sharing_unsupported(model) is None
    ):
        with nvtx_range("sft/share_prefix"):
            shared = split_shared_prefix(model, batch, pad_id)
        if shared is not None and shared.tokens() < positions:
            return shared
    if capacity is None:
        return batch
    with nvtx_range("sft/pack"):
        return pack_for_model(model, batch, capacity, pad_id)


@torch.no_grad()
def validation_loss(
    model,
    processor,
    samples: list[Sample],
    ctx: StageContext,
    fused_linear: bool = False,
    sharded: bool = False,
) -> float:
    """Teacher-forced mean token NLL on ``samples`` (assistant tokens only); ``sharded`` as
    for ``model_batch``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    size = ctx.stage.batch_size
    for start in range(0, len(samples), size):
        batch = collate_sft(samples[start : start + size], processor, ctx.stage.max_length)
        batch = model_batch(model, batch, ctx.stage, pad_token_id(processor), sharded)
        nll, n = token_nll_sum(model, batch_to_device(batch, ctx.device), fused_linear)
        total += float(nll)
        count += n
    model.train(was_training)
    return total / max(count, 1)


def run_sft(
    model,
    processor,
    train: list[Sample],
    val: list[Sample],
    ctx: StageContext,
    profile: bool = False,
) -> Engine:
    """Train ``model`` for ``ctx.stage.steps`` optimizer steps (resuming if possible).

    Returns the engine holding the trained (possibly wrapped or sharded) model.
    """
    stage = ctx.stage
    if not train:
        raise ValueError(f"stage {stage.name!r}: no training samples for tasks {stage.tasks}")
    check_packing(model, stage)
    pad_id = pad_token_id(processor)
    engine = prepare_engine(model, ctx.config, stage, ctx.runtime)
    start, _ = resume_if_possible(ctx, engine)
    model = engine.model
    model.train()
    micro = stage.batch_size // ctx.world_size
    if micro < 1 or stage.batch_size % ctx.world_size:
        raise ValueError(
            f"stage {stage.name!r}: batch_size {stage.batch_size} must be a multiple of "
            f"the world size {ctx.world_size}"
        )

    def window(step: int) -> list[dict]:
        """This rank's micro-batches of ``step``'s accumulation window, collated. The whole
        window comes first so that the loss is normalised by its total token count."""
        out = []
        for accum in range(stage.grad_accum):
            global_step = step * stage.grad_accum + accum
            idx = batch_indices(len(train), stage.batch_size, global_step, ctx.config.seed)
            mine = idx[ctx.rank * micro : (ctx.rank + 1) * micro]
            out.append(collate_sft([train[i] for i in mine], processor, stage.max_length))
        return out

    workers = auto_workers(ctx.device, ctx.config.data.workers)
    batches = prefetched(window, range(start, stage.steps), workers)
    bar = step_progress(ctx, start)
    profiler = StepProfiler(ctx.config.run_dir / "profile", stage.name, profile and ctx.is_main)
    for step, windows in zip(bar, batches, strict=True):
        profiler.step()
        seed_everything(step_seed(ctx.config.seed, ctx.index, step))
        local_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in windows)
        # The global batch's token count: every rank normalises by the same number.
        total_tokens = all_reduce_sum(local_tokens)
        loss_sum = 0.0
        for batch in windows:
            batch = model_batch(model, batch, stage, pad_id, engine.shards_parameters)
            with nvtx_range("sft/forward"):
                batch = batch_to_device(batch, ctx.device)
                nll, _ = token_nll_sum(model, batch, engine.uses_fused_linear)
                # Scale by world size: DDP averages gradients over ranks.
                loss = nll * ctx.world_size / max(total_tokens, 1)
            with nvtx_range("sft/backward"):
                engine.backward(loss)
            loss_sum += nll.item()
        lr = engine.lr
        with nvtx_range("sft/optimizer"):
            grad_norm = engine.step()
        record = {
            "stage": stage.name,
            "kind": "sft",
            "step": step,
            "loss": all_reduce_sum(loss_sum) / max(total_tokens, 1),
            "grad_norm": grad_norm,
            "lr": lr,
            "tokens": total_tokens,
        }
        last = step + 1 == stage.steps
        if stage.eval_every and ((step + 1) % stage.eval_every == 0 or last) and val:
            record["val_loss"] = validation_loss(
                model, processor, val, ctx, engine.uses_fused_linear, engine.shards_parameters
            )
        if ctx.log is not None and ctx.is_main:
            ctx.log.write(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.1e}")
        if stage.save_every and (step + 1) % stage.save_every == 0 and not last:
            checkpoint_stage(ctx, engine, processor, step + 1)
    profiler.close()
    bar.close()
    return engine
