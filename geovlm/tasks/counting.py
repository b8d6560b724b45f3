"""counting: object counting, a number.

* parse: one non-negative number in digits or words ("none" is 0; "3 or 4" is no answer).
* accuracy: ``"exact"`` or ``"smooth"`` (``RewardOptions.counting``).
* metrics: ``accuracy``, ``mae`` and ``answered``.
* records: the first number of the answer (digits, or a word up to "twenty"); it must be a
  non-negative integer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from geovlm import earthdial_metrics
from geovlm.data.readers import Exchange
from geovlm.data.scenes import OBJECT_CLASSES, PLURALS
from geovlm.data.schema import Target
from geovlm.data.synthetic import SceneContext, class_counts, noun, reading_order, region_of
from geovlm.metrics import MetricOptions, sample_mean
from geovlm.rewards.options import RewardOptions
from geovlm.rewards.parse import ParseOptions, parse_count, parse_number
from geovlm.tasks.spec import TaskSpec

_NUMBER_WORDS = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
}


def parse(answer: str, target: Target, options: ParseOptions) -> float | None:
    return parse_count(answer)


def counting_accuracy(
    parsed: Sequence[float | None], targets: Sequence[Target], options: RewardOptions
) -> np.ndarray:
    """Counting with true count ``n`` and answer ``k``.

    ``"exact"`` (default): ``1[k == n]``; ``"smooth"``: ``max(0, 1 - |k - n| / max(n, 1))``,
    partial credit falling linearly to 0 at an error of ``n`` (of 1 for ``n = 0``).
    """
    out = np.zeros(len(parsed))
    for i, (k, t) in enumerate(zip(parsed, targets, strict=True)):
        if k is None or t.count is None:
            continue
        n = float(t.count)
        if options.counting == "exact":
            out[i] = float(k == n)
        else:
            out[i] = max(0.0, 1.0 - abs(k - n) / max(n, 1.0))
    return out


def counting_metrics(
    answers: Sequence[str | None],
    targets: Sequence[Target],
    options: MetricOptions | None = None,
) -> dict:
    """counting: ``accuracy`` = [parsed count == gold count] (``parse_count``: digits or words,
    "none" is 0, a hedge "3 or 4" is unanswered); ``mae`` = mean |parsed - gold| over the answers
    that parse; ``answered`` = fraction of answers that parse to a count.
    """
    correct, errors = [], []
    for answer, target in zip(answers, targets, strict=True):
        gold = target.count if target.count is not None else parse_number(target.answer)
        value = parse_count(answer)
        correct.append(value is not None and gold is not None and value == gold)
        if value is not None and gold is not None:
            errors.append(abs(value - gold))
    return {
        "accuracy": sample_mean(correct),
        "mae": sample_mean(errors),
        "answered": len(errors) / len(correct) if correct else 0.0,
    }


def _count(answer: str, exchange: Exchange) -> int:
    match = re.search(r"(?<![\d.])[-+]?\d+(?:\.\d+)?", answer)
    if match:
        value = float(match.group(0))
        if value < 0 or value != int(value):
            raise exchange.error(f"a count must be a non-negative integer, got {value}")
        return int(value)
    for word in re.findall(r"[a-z]+", answer.lower()):
        if word in _NUMBER_WORDS:
            return _NUMBER_WORDS[word]
    raise exchange.error(f"no number in the answer {answer!r}")


def from_record(exchange: Exchange) -> Target:
    n = _count(exchange.plain_answer(), exchange)
    return Target(task="counting", answer=str(n), image_size=exchange.image_size, count=n)


def generate(ctx: SceneContext) -> tuple[str, str, Target]:
    """How many objects of a class the scene has; now and then a class it lacks (0)."""
    counts = class_counts(ctx.objects)
    absent = [c for c in OBJECT_CLASSES if c not in counts]
    category = ctx.choice(absent if absent and ctx.rng.random() < 0.15 else list(counts))
    members = reading_order(o for o in ctx.objects if o.category == category)
    n = len(members)
    if n == 0:
        think = f"I see no {PLURALS[category]}."
    else:
        think = (
            f"I see {n} {noun(category, n)}: "
            + ", ".join(region_of(o, ctx.size) for o in members)
            + "."
        )
    target = ctx.target(str(n), count=n, meta={"category": category})
    return ctx.prompt(plural=PLURALS[category]), think, target


COUNTING = TaskSpec(
    name="counting",
    description="object counting: a number",
    parse=parse,
    accuracy=counting_accuracy,
    metrics={
        "geovlm": counting_metrics,
        "earthdial": earthdial_metrics.classification_metrics,
    },
    headline="accuracy",
    prompts={
        "default": (
            "How many {plural} are there?",
            "Count the {plural}.",
            "How many {plural} are in the image?",
        )
    },
    generate=generate,
    from_record=from_record,
    aliases=("count",),
)

SPECS = (COUNTING,)
