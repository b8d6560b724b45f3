"""scene_cls: scene classification, one land-cover / scene label for the image."""

from __future__ import annotations

from geovlm import earthdial_metrics
from geovlm.data.scenes import LAND_COVERS
from geovlm.data.schema import Target
from geovlm.data.synthetic import COVER_CUES, SceneContext
from geovlm.tasks._labels import (
    classification_accuracy,
    classification_metrics,
    label_target,
    parse_single_label,
)
from geovlm.tasks.spec import TaskSpec


def generate(ctx: SceneContext) -> tuple[str, str, Target]:
    """The land cover of the scene, out of ``LAND_COVERS``."""
    think = f"I see {COVER_CUES[ctx.cover]}. The scene is {ctx.cover}."
    target = ctx.target(ctx.cover, label=ctx.cover, classes=LAND_COVERS)
    return ctx.prompt(), think, target


SCENE_CLS = TaskSpec(
    name="scene_cls",
    description="scene classification: one land-cover / scene label",
    parse=parse_single_label,
    accuracy=classification_accuracy,
    metrics={
        "geovlm": classification_metrics,
        "earthdial": earthdial_metrics.classification_metrics,
    },
    headline="accuracy",
    prompts={
        "default": (
            "Classify the scene.",
            "What is the land cover in this image?",
            "Which scene class is this image?",
        )
    },
    generate=generate,
    from_record=label_target,
    aliases=("scene_classification", "classification", "cls"),
)

SPECS = (SCENE_CLS,)
