"""change_det: change detection on a bi-temporal pair, yes or no.

* parse: ``True`` for yes, ``False`` for no (``parse_yes_no``; "yes or no" is neither).
* accuracy: ``1[answer == truth]``; metrics: ``accuracy`` (``label_correct``).
* records: the first "yes" / "no" word of the answer is the label.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from geovlm import earthdial_metrics
from geovlm.data.readers import Exchange
from geovlm.data.scenes import CHANGE_KINDS
from geovlm.data.schema import Target
from geovlm.data.synthetic import SceneContext, change_summary
from geovlm.rewards.options import RewardOptions
from geovlm.rewards.parse import ParseOptions, parse_yes_no
from geovlm.tasks._labels import classification_metrics
from geovlm.tasks.spec import TaskSpec


def parse(answer: str, target: Target, options: ParseOptions) -> bool | None:
    return parse_yes_no(answer)


def yes_no_accuracy(
    parsed: Sequence[bool | None], targets: Sequence[Target], options: RewardOptions
) -> np.ndarray:
    """Change detection: ``1[answer == truth]`` for the yes/no of ``target.label``."""
    out = np.zeros(len(parsed))
    for i, (pred, t) in enumerate(zip(parsed, targets, strict=True)):
        truth = parse_yes_no(t.label or t.answer)
        out[i] = float(pred is not None and truth is not None and pred == truth)
    return out


def from_record(exchange: Exchange) -> Target:
    words = re.findall(r"[a-z]+", exchange.answer.lower())
    label = next((w for w in words if w in ("yes", "no")), None)
    if label is None:
        raise exchange.error(f"a change_det answer must say yes or no, got {exchange.answer!r}")
    return Target(
        task="change_det",
        answer=label,
        image_size=exchange.image_size,
        label=label,
        classes=("yes", "no"),
    )


# Every change kind is equally likely (geovlm.data.scenes), so a scene changes 3 times in 4. This
# share of the changed scenes is shown as a no-change pair (the first image beside the scene
# imaged again without its change) so that "yes" and "no" are equally likely: always answering
# one of them scores 0.5.
_P_UNCHANGED = 1 / len(CHANGE_KINDS)
NO_CHANGE_PAIR_SHARE = (0.5 - _P_UNCHANGED) / (1 - _P_UNCHANGED)


def generate(ctx: SceneContext) -> tuple[str, str, Target]:
    """Whether the image pair shows a change (any change kind but "no change")."""
    if ctx.scene.change != "no change" and ctx.rng.random() < NO_CHANGE_PAIR_SHARE:
        ctx.after = ctx.scene.unchanged_after()
    answer = "no" if ctx.change == "no change" else "yes"
    target = ctx.target(answer, label=answer, classes=("yes", "no"), meta={"change": ctx.change})
    return ctx.prompt(), change_summary(ctx), target


CHANGE_DET = TaskSpec(
    name="change_det",
    description="change detection on a bi-temporal pair: yes / no",
    parse=parse,
    accuracy=yes_no_accuracy,
    metrics={
        "geovlm": classification_metrics,
        "earthdial": earthdial_metrics.classification_metrics,
    },
    headline="accuracy",
    prompts={
        "default": (
            "Has anything changed between the two images?",
            "Is there any change between the images?",
        )
    },
    generate=generate,
    from_record=from_record,
    aliases=("change_detection",),
    bitemporal=True,
)

SPECS = (CHANGE_DET,)
