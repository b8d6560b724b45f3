"""temporal_cls: temporal classification of a bi-temporal pair, the kind of change."""

from __future__ import annotations

from geovlm import earthdial_metrics
from geovlm.data.scenes import CHANGE_KINDS
from geovlm.data.schema import Target
from geovlm.data.synthetic import SceneContext, change_summary
from geovlm.tasks._labels import (
    classification_accuracy,
    classification_metrics,
    label_target,
    parse_single_label,
)
from geovlm.tasks.spec import TaskSpec


def generate(ctx: SceneContext) -> tuple[str, str, Target]:
    """The scene's change, out of ``CHANGE_KINDS``."""
    kind = ctx.scene.change
    target = ctx.target(kind, label=kind, classes=CHANGE_KINDS, meta={"change": kind})
    return ctx.prompt(), change_summary(ctx), target


TEMPORAL_CLS = TaskSpec(
    name="temporal_cls",
    description="temporal classification on a bi-temporal pair: the kind of change",
    parse=parse_single_label,
    accuracy=classification_accuracy,
    metrics={
        "geovlm": classification_metrics,
        "earthdial": earthdial_metrics.classification_metrics,
    },
    headline="accuracy",
    prompts={
        "default": (
            "Classify the change: no change, objects added, objects removed or land cover change.",
            "Which kind of change is it: no change, objects added, objects removed or land cover "
            "change?",
        )
    },
    generate=generate,
    from_record=label_target,
    aliases=("temporal_classification",),
    bitemporal=True,
)

SPECS = (TEMPORAL_CLS,)
