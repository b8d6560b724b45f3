"""region_caption: region captioning, describe the object inside a given box.

* parse / accuracy: the answer sentence, scored by the hybrid embedding + lexical reward.
* metrics: ROUGE-1, ROUGE-L and METEOR against the references; headline ``rouge_l``.
* records: the answer is the first reference; the first box of the prompt is the region.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from geovlm import earthdial_metrics
from geovlm.data.readers import Exchange, enclosing_box
from geovlm.data.schema import Target
from geovlm.data.splits import size_bucket
from geovlm.data.synthetic import (
    COVER_PLACE,
    REGION_PHRASE,
    SceneContext,
    detection_meta,
    region_of,
)
from geovlm.metrics import MetricOptions, caption_metrics
from geovlm.tasks._captions import caption_target, hybrid_caption_accuracy, parse_caption
from geovlm.tasks.spec import TaskSpec


def region_caption_metrics(
    answers: Sequence[str | None],
    targets: Sequence[Target],
    options: MetricOptions | None = None,
) -> dict:
    """``rouge_1``, ``rouge_l``, ``meteor`` (``metrics.caption_metrics``)."""
    options = options or MetricOptions()
    return caption_metrics(answers, targets, meteor_backend=options.meteor_backend)


def from_record(exchange: Exchange) -> Target:
    region = enclosing_box(exchange.prompt_boxes[0]) if exchange.prompt_boxes else None
    return caption_target(exchange, region)


def generate(ctx: SceneContext) -> tuple[str, str, Target]:
    """Four descriptions of one object, asked about by its box."""
    obj = ctx.choice(ctx.objects)
    (text,), (region,) = ctx.render(np.array([obj.xyxy], dtype=np.float64))
    where = REGION_PHRASE[region_of(obj, ctx.size)]
    size = size_bucket(obj.area, ctx.size)
    captions = (
        f"a {obj.color} {obj.category} {COVER_PLACE[ctx.cover]}",
        f"a {size} {obj.color} {obj.category}",
        f"a {obj.category} {where} of the image",
        f"there is a {obj.color} {obj.category} {where}",
    )
    think = f"The box is {where}. Inside it I see a {obj.color} {obj.category}."
    meta = {**detection_meta([obj], ctx.size), "category": obj.category}
    target = ctx.target(captions[0], captions=captions, region=region, meta=meta)
    return ctx.prompt(box=text), think, target


REGION_CAPTION = TaskSpec(
    name="region_caption",
    description="region captioning: describe the object inside a given box",
    parse=parse_caption,
    accuracy=hybrid_caption_accuracy,
    metrics={
        "geovlm": region_caption_metrics,
        "earthdial": earthdial_metrics.region_caption_metrics,
    },
    headline="rouge_l",
    prompts={"default": ("Describe the object in {box}.", "What is in the region {box}?")},
    generate=generate,
    from_record=from_record,
    aliases=("region_captioning", "identify"),
    tags=("identify",),
)

SPECS = (REGION_CAPTION,)
