"""A run's held-out evaluation: the table before training and after every stage, and each GRPO
stage's objective (mean sampled reward on held-out prompts) before and after it.

Every result is saved in the stage's ``eval/`` folder the moment it exists and read back on a
rerun, so an interrupted evaluation is completed, never repeated nor silently skipped:

    <dir>/metrics.json             the held-out table (``geovlm.eval``), predictions.jsonl beside it
    <dir>/sampled_reward.json      a GRPO stage's objective before and after it
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from geovlm.config import RunConfig
from geovlm.data.schema import Sample
from geovlm.loop import StageContext
from geovlm.runtime import Runtime

ModelGetter = Callable[[], tuple]


def held_out_samples(config: RunConfig, test: list[Sample]) -> list[Sample]:
    """The test samples of the run's tasks, at most ``eval.max_samples_per_task`` of each, in
    task order (batches of one task have similar answer lengths, so generation stops together)."""
    from geovlm.data.sources import select_tasks

    samples = select_tasks(test, config.data.tasks)
    cap = config.eval.max_samples_per_task
    if cap:
        seen: dict[str, int] = {}
        kept = []
        for sample in samples:
            if seen.get(sample.task, 0) < cap:
                kept.append(sample)
                seen[sample.task] = seen.get(sample.task, 0) + 1
        samples = kept
    from geovlm.tasks import registry

    return sorted(samples, key=lambda sample: registry.index(sample.task))


def summary(
    config: RunConfig,
    runtime: Runtime,
    samples: list[Sample],
    out_dir: Path,
    label: str,
    get_model: ModelGetter,
) -> dict | None:
    """``{task: {headline metric: value, ...}}`` after ``label`` (``report.held_out_rows``):
    saved by an earlier run of the same config, else evaluated now (``get_model`` is called only
    then); None with evaluation off."""
    from geovlm.report import held_out_rows

    saved = out_dir / "metrics.json"
    if saved.is_file():
        data = json.loads(saved.read_text())
        headline = {task: tuple(v) for task, v in data["summary"].items()}
        return held_out_rows(data["metrics"], headline)
    if not config.eval.enabled or not samples:
        return None
    from geovlm.data.loader import auto_workers
    from geovlm.eval import evaluate

    model, processor = get_model()
    out_dir.mkdir(parents=True, exist_ok=True)
    report = evaluate(
        model,
        processor,
        samples,
        batch_size=config.eval.batch_size,
        max_new_tokens=config.eval.max_new_tokens,
        convention=config.model.box_convention,
        use_embeddings=config.eval.use_embeddings,
        predictions_path=out_dir / "predictions.jsonl",
        desc=f"eval {label}",
        rank=runtime.rank,
        world_size=runtime.world_size,
        rollout_engine=config.rollout.engine,
        workers=auto_workers(runtime.device, config.data.workers),
    )
    if runtime.is_main:
        report.save(saved)
        print(f"\n## Held-out evaluation after {label}\n\n{report.table()}\n", flush=True)
    return held_out_rows(report.metrics, report.summary())


def majority_baseline(samples: list[Sample], convention: str) -> dict[str, float]:
    """``{task: headline metric}`` of answering every held-out sample of a task with the task's
    most frequent answer, for the tasks whose answers are labels (every target has a ``label``,
    ``labels`` or ``count``): the score a policy that ignores the image gets."""
    from collections import Counter

    from geovlm.eval import EvalReport
    from geovlm.metrics import task_metrics

    by_task: dict[str, list] = {}
    for sample in samples:
        by_task.setdefault(sample.task, []).append(sample.target)
    out = {}
    for task, targets in by_task.items():
        if not all(t.label is not None or t.labels or t.count is not None for t in targets):
            continue
        answer = Counter(t.answer for t in targets).most_common(1)[0][0]
        completions = [f"<answer>{answer}</answer>"] * len(targets)
        metrics = task_metrics(task, completions, targets, convention=convention)
        out[task] = EvalReport({task: metrics}).summary()[task][1]
    return out


def grpo_objective(
    ctx: StageContext, samples: list[Sample], get_before: ModelGetter, get_after: ModelGetter
) -> dict:
    """Mean sampled reward on held-out prompts of the stage's tasks before and after it: saved by
    an earlier run, else computed now ({} when off or when the stage has no held-out prompts)."""
    config = ctx.config
    out = ctx.stage_dir / "eval" / "sampled_reward.json"
    if out.is_file():
        return json.loads(out.read_text())
    if not (config.eval.enabled and config.eval.sampled_reward and samples):
        return {}
    from geovlm.grpo import sampled_reward

    kwargs = dict(num_generations=config.eval.sampled_generations, seed=config.seed)
    before_model, before_processor = get_before()
    before = sampled_reward(before_model, before_processor, samples, ctx, **kwargs)
    del before_model
    after_model, after_processor = get_after()
    after = sampled_reward(after_model, after_processor, samples, ctx, **kwargs)
    result = {
        "tasks": sorted({s.task for s in samples}),
        "prompts": len(samples),
        "before": before,
        "after": after,
    }
    if ctx.is_main:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(
            f"\nGRPO objective of {ctx.stage.name} on {len(samples)} held-out prompts of "
            f"{result['tasks']} ({config.eval.sampled_generations} samples each): mean reward "
            f"{before['reward']:.3f} -> {after['reward']:.3f}",
            flush=True,
        )
    return result
