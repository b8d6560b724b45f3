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

    by_task: dict[str, list] = {}
    for sample in samples:
        by_task.setdefault(sample.task, []).append(sample.target)
    out = {}
    for task, targets in by_task.items():
        if not all(t.label is not None or t.labels or t.count is not None for t in targets):
            continue
        answer = Counter(t.answer for t in targets).most_common(1)[0][0]
        out[task] = _scores(task, [answer] * len(targets), targets, convention)[0]
    return out


def blind_baseline(train: list[Sample], test: list[Sample], convention: str) -> dict[str, float]:
    """``{task: headline metric}`` of answers that ignore the image: ``majority_baseline`` for the
    label tasks, ``prompt_prior_baseline`` for the box tasks (tasks that are neither have none)."""
    return {**majority_baseline(test, convention),
            **prompt_prior_baseline(train, test, convention)}


def _scores(task: str, answers: list[str], targets: list, convention: str) -> tuple[float, float]:
    """(headline metric, mean IoU or 0) of giving ``answers[i]`` for ``targets[i]``."""
    from geovlm.eval import EvalReport
    from geovlm.metrics import task_metrics

    completions = [f"<answer>{answer}</answer>" for answer in answers]
    metrics = task_metrics(task, completions, targets, convention=convention)
    return EvalReport({task: metrics}).summary()[task][1], metrics.get("mean_iou", 0.0)


def _best_answer(
    task: str, group: list[Sample], convention: str, max_candidates: int, max_targets: int
) -> str:
    """The answer among the group's first ``max_candidates`` distinct target answers that scores
    best (headline metric, then mean IoU) when given for each of its first ``max_targets``."""
    answers = list(dict.fromkeys(s.target.answer for s in group))[:max_candidates]
    targets = [s.target for s in group[:max_targets]]
    return max(answers, key=lambda a: _scores(task, [a] * len(targets), targets, convention))


def prompt_prior_baseline(
    train: list[Sample],
    test: list[Sample],
    convention: str,
    max_candidates: int = 16,
    max_targets: int = 32,
) -> dict[str, float]:
    """``{task: headline metric}`` of an image-blind box policy on the held-out ``test`` samples,
    for the tasks whose targets are only boxes (detection): each held-out prompt gets
    the answer, among the train targets of the same prompt text, that scores best on them (the
    task's headline metric, then mean IoU); prompts no train sample has get the task's best
    answer over its whole train split.

    The box counterpart of ``majority_baseline``: a referring expression such as "the building in
    the top right" already says roughly where the box is, and large objects fill much of the
    image, so the prompt alone earns part of the IoU reward and of acc@0.5. A policy has learnt
    to read the image only where it beats this. ``max_candidates`` bounds the answers tried per
    prompt (the first distinct ones) and ``max_targets`` the train samples they are scored on."""

    def boxes_only(sample: Sample) -> bool:
        t = sample.target
        return (t.boxes is not None and t.label is None and not t.labels and t.count is None
                and not t.captions)

    out = {}
    for task in dict.fromkeys(s.task for s in test):
        held = [s for s in test if s.task == task]
        seen = [s for s in train if s.task == task]
        if not seen or not all(boxes_only(s) for s in held + seen):
            continue
        by_prompt: dict[str, list[Sample]] = {}
        for sample in seen:
            by_prompt.setdefault(sample.prompt, []).append(sample)

        limits = (convention, max_candidates, max_targets)
        prompts = {s.prompt for s in held}
        chosen = {p: _best_answer(task, by_prompt[p], *limits) for p in prompts if p in by_prompt}
        if len(chosen) < len(prompts):
            chosen[None] = _best_answer(task, seen, *limits)  # for prompts train lacks
        answers = [chosen.get(s.prompt, chosen.get(None)) for s in held]
        out[task] = _scores(task, answers, [s.target for s in held], convention)[0]
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

    result: dict = {"tasks": sorted({s.task for s in samples}), "prompts": len(samples)}
    for when, get_model in (("before", get_before), ("after", get_after)):
        model, processor = get_model()
        result[when] = sampled_reward(
            model, processor, samples, ctx, num_generations=config.eval.sampled_generations,
            seed=config.seed, desc=f"objective {ctx.stage.name} ({when})",
        )
        del model  # one model at a time
    if ctx.is_main:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(
            f"\nGRPO objective of {ctx.stage.name} on {len(samples)} held-out prompts of "
            f"{result['tasks']} ({config.eval.sampled_generations} samples each): mean reward "
            f"{result['before']['reward']:.3f} -> {result['after']['reward']:.3f}",
            flush=True,
        )
    return result
