"""Teacher-forced GRPO passes by length group (``geovlm.prefix.length_chunks``) against one
padded pass.

Run: ``python benchmarks/bench_length_chunks.py [--checkpoint DIR] [--repeats N] [--threads T]``.

The batch is the preset's ``grpo_det`` step: 8 referred-detection prompts of the embedded world
x G=16 completions sampled with its temperature and token budget. ``--checkpoint`` samples them
from a trained policy directory (e.g. ``runs/tiny-cpu/stages/0-sft/final``), whose completions
end at their own EOS; without it the untrained tiny policy samples them (every row would run to
the budget), and each row is then cut at a length drawn uniformly from 16 .. 48 (seed 0), the
spread of the default run's detection completions (mean ~28, longest ~46).

Two passes per batch, as a GRPO step runs them: the reference log-probs (no grad) and the
policy's loss forward + backward (the stage's loss with its KL term).
Anchor: one pass over all rows padded to the longest (``length_chunks`` returning one group,
what ``completion_outputs`` did before). Ours: the rows grouped by length as shipped. Both must
give the same log-probs and gradients (to float rounding) before their times count. A sweep
over the per-pass cost constant shows where ``PASS_COST_TOKENS`` comes from.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time
from dataclasses import asdict

import _provenance  # benchmarks/_provenance.py: the script's directory is on sys.path
import torch

from geovlm import prefix
from geovlm.config import load_config
from geovlm.data.sources import load_splits, select_tasks
from geovlm.data.synthetic import corpus
from geovlm.engines.base import EngineSetup, Sampling
from geovlm.engines.builtin import BuiltinEngine
from geovlm.kernels import grpo_loss, selective_log_softmax
from geovlm.model import build_policy

SHIPPED = prefix.length_chunks


def one_group(lengths: torch.Tensor, *args, **kwargs) -> list[torch.Tensor]:
    return [torch.arange(lengths.shape[0], device=lengths.device)]


def with_pass_cost(cost: int):
    return lambda lengths: SHIPPED(lengths, pass_cost=cost)


def load_model(checkpoint: str | None, config):
    if checkpoint is None:
        test = load_splits(config.data, config.model.box_convention)["test"]
        return build_policy(
            tokenizer_corpus=corpus(test), tiny=asdict(config.model.tiny), seed=config.seed
        )
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32)
    return model, AutoProcessor.from_pretrained(checkpoint)


def cut_rows(rollouts, eos_id: int, pad_id: int, seed: int = 0) -> None:
    """Ends row ``i`` at a length drawn from 16 .. 48 (an EOS there, padding after)."""
    ids, mask = rollouts.completion_ids, rollouts.completion_mask
    generator = torch.Generator().manual_seed(seed)
    width = ids.shape[1]
    lengths = torch.randint(16, width + 1, (ids.shape[0],), generator=generator)
    positions = torch.arange(width)
    ids[positions[None] == (lengths[:, None] - 1)] = eos_id
    ids[positions[None] >= lengths[:, None]] = pad_id
    mask.copy_((positions[None] < lengths[:, None]).long())


def passes(model, batch, stage) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Reference log-probs, then the stage's GRPO loss forward + backward: ``(logps, grads)``."""
    ids, mask, generations = batch.completion_ids, batch.completion_mask, batch.num_generations
    with torch.no_grad():
        logits = prefix.completion_outputs(model, batch.prompts, ids, mask, generations, "logits")
        reference = selective_log_softmax(logits, ids, stage.temperature)
    model.zero_grad(set_to_none=True)
    logits = prefix.completion_outputs(model, batch.prompts, ids, mask, generations, "logits")
    loss, _ = grpo_loss(
        logits, None, reference, ids, batch.advantages, mask, inplace=False, reduce=True,
        num_items_in_batch=int(mask.sum()), options=stage.loss_options(),
    )
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    return (reference * mask), grads


def time_side(model, batch, stage, chunks, repeats: int):
    prefix.length_chunks = chunks
    try:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            result = passes(model, batch, stage)
            times.append(time.perf_counter() - start)
    finally:
        prefix.length_chunks = SHIPPED
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="a trained policy directory")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="default: the preset's")
    args = parser.parse_args()

    config = load_config(None, ["data.n_train_scenes=0", "data.n_val_scenes=0"])
    test = load_splits(config.data, config.model.box_convention)["test"]
    model, processor = load_model(args.checkpoint, config)
    torch.set_num_threads(args.threads or config.threads or torch.get_num_threads())
    det = next(s for s in config.stages if s.name == "grpo_det")
    engine = BuiltinEngine(model, processor, EngineSetup(share_prompt=True))
    rollouts = engine.generate(
        select_tasks(test, ["referred_det"])[: det.batch_size],
        det.num_generations,
        Sampling(max_new_tokens=det.max_new_tokens, temperature=det.temperature, seed=0),
    )
    if args.checkpoint is None:
        cut_rows(rollouts, engine.eos_ids[0], engine.pad_id)
    model.train()
    lengths = rollouts.completion_mask.sum(dim=1)
    advantages = torch.randn(lengths.shape[0], generator=torch.Generator().manual_seed(1))

    from geovlm.grpo import build_policy_batch

    batch = build_policy_batch(rollouts, advantages, torch.device("cpu"))
    print(f"# {_provenance.machine()}, load {_provenance.load_text()}, "
          f"commit {_provenance.commit()}, {datetime.date.today()}, "
          f"{torch.get_num_threads()} thread(s)")
    source = (
        f"checkpoint {args.checkpoint}"
        if args.checkpoint
        else "untrained policy, rows cut at 16..48"
    )
    print(f"# {lengths.shape[0]} rows x {rollouts.completion_ids.shape[1]} positions; completion "
          f"lengths mean {lengths.float().mean():.1f}, min {int(lengths.min())}, "
          f"max {int(lengths.max())}; {source}")
    anchor_time, (anchor_logps, anchor_grads) = time_side(
        model, batch, det, one_group, args.repeats
    )
    print("| grouping | groups (rows x positions) | positions run | s per step's two passes "
          "| ratio to one padded pass |")
    print("|---|---|---|---|---|")
    width = int(prefix.needed_positions(batch.completion_mask).max())
    print(f"| anchor: one padded pass | {lengths.shape[0]} x {width} | {lengths.shape[0] * width} "
          f"| {anchor_time:.3f} | 1.00x |")
    needed = prefix.needed_positions(batch.completion_mask)
    for cost in (0, 64, 128, prefix.PASS_COST_TOKENS, 512, 1024):
        groups = SHIPPED(needed, pass_cost=cost)
        shape = ", ".join(f"{len(g)} x {int(needed[g].max())}" for g in groups)
        positions = sum(len(g) * int(needed[g].max()) for g in groups)
        seconds, (logps, grads) = time_side(
            model, batch, det, with_pass_cost(cost), args.repeats
        )
        torch.testing.assert_close(logps, anchor_logps, rtol=1e-5, atol=1e-5)
        for ours, theirs in zip(grads, anchor_grads, strict=True):
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)
        label = f"pass cost {cost}" + (" (shipped)" if cost == prefix.PASS_COST_TOKENS else "")
        print(f"| {label} | {shape} | {positions} | {seconds:.3f} | "
              f"{anchor_time / seconds:.2f}x |")


if __name__ == "__main__":
    main()
