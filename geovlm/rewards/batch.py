"""``score``: the rewards of a batch of completions of mixed tasks, as one ``RewardBatch``.

``score(tasks, completions [C], targets [C]) -> RewardBatch`` with ``components["format"] [C]``,
``components["accuracy"] [C]`` (float64, each in [0, 1]) and
``total [C] = w_format[task] * format + w_accuracy[task] * accuracy``. Each completion is parsed
once (``parse.extract_answer`` then ``parse.parse_for_task``; completions with the same answer to
the same target and prompt share one parse); the parse feeds both components.
Completions are grouped by task and each group is scored by one call of its accuracy function, so
the geometry and text kernels see whole batches. Parsers, accuracy functions and default weights
are the tasks' ``TaskSpec`` s in the registry (``geovlm.tasks.registry``): a registered task is
scored like a built-in one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from geovlm.data.schema import Target
from geovlm.rewards.format import format_reward
from geovlm.rewards.options import RewardOptions
from geovlm.rewards.parse import extract_answer, parse_for_task, resized_size_for, valid_unicode

COMPONENTS: tuple[str, ...] = ("format", "accuracy")


@dataclass
class RewardBatch:
    """Rewards of ``C`` completions.

    Attributes:
        total: ``[C]`` float64, the weighted sum of the components (what GRPO normalises).
        components: name -> ``[C]`` float64 in [0, 1] (``"format"``, ``"accuracy"``).
    """

    total: np.ndarray
    components: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.total)


def _task_list(tasks: Sequence[str] | str, targets: Sequence[Target]) -> list[str]:
    from geovlm.tasks import registry

    names = [tasks] * len(targets) if isinstance(tasks, str) else list(tasks)
    if len(names) != len(targets):
        raise ValueError(f"{len(names)} tasks for {len(targets)} targets")
    known = set(registry.names())
    for i, (name, target) in enumerate(zip(names, targets, strict=True)):
        if name not in known:
            raise ValueError(
                f"completion {i}: unknown task {name!r}; known: {sorted(registry.names())}"
            )
        if target.task != name:
            raise ValueError(f"completion {i}: task {name!r} but its target is {target.task!r}")
    return names


def resolve_weights(
    weights: Mapping[str, float] | Mapping[str, Mapping[str, float]] | None,
    tasks: Iterable[str],
) -> dict[str, tuple[float, float]]:
    """task -> ``(format weight, accuracy weight)`` of each of ``tasks``: its ``TaskSpec``'s, with
    ``weights`` applied.

    ``weights`` is either component -> weight for every task (``{"format": 0.5}``) or
    task -> {component -> weight} (``{"counting": {"accuracy": 2.0}}``, any registered task);
    weights are finite, >= 0.
    """
    from geovlm.tasks import registry

    out = {}
    for task in tasks:
        spec = registry.get(task)
        out[task] = (spec.format_weight, spec.accuracy_weight)
    if not weights:
        return out
    if set(weights) <= set(COMPONENTS):
        per_task = {task: weights for task in out}
    elif set(weights) <= set(registry.names()):
        per_task = weights
    else:
        raise ValueError(
            f"weights keys must all be components {COMPONENTS} or all be tasks, "
            f"got {sorted(weights)}"
        )
    for task, comp in per_task.items():
        if not isinstance(comp, Mapping) or not set(comp) <= set(COMPONENTS):
            raise ValueError(f"weights for {task!r} must map {COMPONENTS} to numbers, got {comp!r}")
        for name, value in comp.items():
            if not (np.isfinite(value) and value >= 0):
                raise ValueError(f"weight {task}.{name} must be finite and >= 0, got {value!r}")
        if task in out:
            format_weight, accuracy_weight = out[task]
            out[task] = (
                float(comp.get("format", format_weight)),
                float(comp.get("accuracy", accuracy_weight)),
            )
    return out


def _bounded(values: np.ndarray) -> np.ndarray:
    """The [0, 1] guarantee of every component, whatever a custom accuracy function returns."""
    return np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0), 0.0, 1.0)


def score(
    tasks: Sequence[str] | str,
    completions: Sequence[str],
    targets: Sequence[Target],
    weights: Mapping[str, float] | Mapping[str, Mapping[str, float]] | None = None,
    *,
    options: RewardOptions | None = None,
    prompts: Sequence[str | None] | None = None,
) -> RewardBatch:
    """Format and accuracy rewards of ``completions`` against ``targets``, routed by task.

    Never raises on model output: any ``str`` completion, of any length and any code points (lone
    surrogates are read as ``?``), gets finite components in [0, 1]. A completion that is not a
    ``str`` (``None``, bytes, a chat message) scores 0 on every component; unwrap chat messages
    first (``geovlm.rewards.trl`` does). The work per completion is bounded (``parse``: answers
    over ``MAX_ANSWER_CHARS`` are not read, at most ``MAX_BOXES`` boxes; ``RewardOptions``:
    ``max_pred_boxes`` matched). Bad arguments (unknown task, mismatched lengths, bad weights)
    are ``ValueError`` s.

    Args:
        tasks: one task name for the whole batch, or one per completion (must equal
            ``targets[i].task``).
        completions: the generated texts.
        targets: the ground truth of each completion; the G completions of one prompt may share
            one ``Target`` object (its boxes are then matched once).
        weights: component weights, for every task or per task (``resolve_weights``).
        options: the accuracy rewards' choices (``RewardOptions``; defaults follow the paper but
            where its rewards can be gamed, ``docs/rewards.md``).
        prompts: the prompt of each completion; answer blocks echoed from it are ignored, and
            parsers may read the choices it offers (vqa).
    """
    from geovlm.tasks import registry

    options = options or RewardOptions()
    names = _task_list(tasks, targets)
    task_weights = resolve_weights(weights, dict.fromkeys(names))
    if len(completions) != len(targets):
        raise ValueError(f"{len(completions)} completions but {len(targets)} targets")
    if prompts is not None and len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")

    completions = [valid_unicode(c) if isinstance(c, str) else None for c in completions]
    prompt_texts = [
        valid_unicode(p) if isinstance(p, str) else None for p in (prompts or [None] * len(targets))
    ]
    parsed: list[object | None] = []
    # A group's completions often give the same answer ("yes", one box): each distinct (answer,
    # target, prompt) is parsed once and its typed answer shared (rewards never mutate it).
    seen: dict[tuple[str | None, int, str | None], object | None] = {}
    for completion, target, prompt in zip(completions, targets, prompt_texts, strict=True):
        answer = extract_answer(completion, prompt)
        key = (answer, id(target), prompt)
        if key not in seen:
            resized = None
            if options.convention == "qwen25vl":
                resized = resized_size_for(
                    tuple(target.image_size), options.min_pixels, options.max_pixels
                )
            seen[key] = parse_for_task(
                answer,
                target,
                convention=options.convention,
                resized_size=resized,
                synonyms=options.synonyms,
                prompt=prompt,
            )
        parsed.append(seen[key])
    fmt = format_reward(completions, targets, parsed=parsed)

    accuracy = np.zeros(len(completions))
    w_format = np.zeros(len(completions))
    w_accuracy = np.zeros(len(completions))
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(name, []).append(i)
    for name, index in groups.items():
        accuracy_of = registry.get(name).accuracy
        values = accuracy_of([parsed[i] for i in index], [targets[i] for i in index], options)
        accuracy[index] = _bounded(values)
        w_format[index], w_accuracy[index] = task_weights[name]
    fmt = _bounded(fmt)
    return RewardBatch(
        total=w_format * fmt + w_accuracy * accuracy,
        components={"format": fmt, "accuracy": accuracy},
    )
