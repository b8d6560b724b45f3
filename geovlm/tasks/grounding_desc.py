"""grounding_desc: grounding description, describe the image and box the objects mentioned.

* parse: ``(text without boxes, [K, 4] boxes)``; at least one box when the target has boxes.
* accuracy: ``box reward * ((1 - v) + v * lexical score)``, the text paid only as far as the boxes
  ground it (``RewardOptions.grounding``; ``"sum"`` is the paper's ``(1 - v) B + v L``).
* metrics: acc@0.5 / acc@0.25 and EarthDial's box precision of the boxes, ROUGE and METEOR of
  the text; headline ``acc@0.5``.
* records: the answer with its boxes (as axis-aligned boxes) and its text as the first reference;
  an EarthDial record's boxes are its ``obj_ids``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from geovlm import earthdial_metrics
from geovlm.data.readers import Exchange, enclosing_box
from geovlm.data.schema import Target
from geovlm.data.synthetic import (
    COVER_NOUN,
    SceneContext,
    detection_meta,
    inventory,
    join_phrases,
    reading_order,
    scene_captions,
)
from geovlm.metrics import MetricOptions, box_metrics, box_pairs, caption_metrics
from geovlm.rewards import semantic
from geovlm.rewards.accuracy import box_reward, text_scores
from geovlm.rewards.options import RewardOptions
from geovlm.rewards.parse import ParseOptions, normalize_text, parse_boxes, strip_boxes
from geovlm.tasks._captions import record_captions
from geovlm.tasks.spec import TaskSpec


def parse(
    answer: str, target: Target, options: ParseOptions
) -> tuple[str, np.ndarray] | None:
    boxes = parse_boxes(
        answer,
        target.image_size,
        convention=options.convention,
        resized_size=options.resized_size,
    )
    text = strip_boxes(answer)
    if not normalize_text(text):
        return None
    needs_boxes = target.boxes is not None and len(target.boxes) > 0
    return (text, boxes) if len(boxes) or not needs_boxes else None


def grounding_accuracy(
    parsed: Sequence[tuple[str, np.ndarray] | None],
    targets: Sequence[Target],
    options: RewardOptions,
) -> np.ndarray:
    """Grounding description, with ``B`` the box reward of the answer's boxes against the
    grounded objects (``multi_det``'s), ``L`` the lexical metric ``options.lexical`` of its text
    (boxes removed) against the reference descriptions, through the caption guard, and
    ``v = grounding_text_weight``:

    * ``"gated"`` (default): ``B * ((1 - v) + v * L)``: the text earns only as much as its boxes
      ground it, so the right text with a junk box (the whole image, a grid) earns nothing. A
      target without boxes is scored ``B * L`` (``B`` is 1 for an answer without boxes);
    * ``"sum"``: ``(1 - v) * B + v * L``, the paper's.
    """
    boxes = [None if p is None else p[1] for p in parsed]
    words = [None if p is None else p[0] for p in parsed]
    box_score = box_reward(boxes, targets, options, "multibox", 4)
    metric = semantic.LEXICAL_METRICS[options.lexical]
    text_score = text_scores(words, targets, metric, options.caption_guard)
    v = options.grounding_text_weight
    if options.grounding == "sum":
        return (1.0 - v) * box_score + v * text_score
    grounded = np.array([t.boxes is not None and len(t.boxes) > 0 for t in targets], dtype=bool)
    text_weight = np.where(grounded, v, 1.0)
    return box_score * ((1.0 - text_weight) + text_weight * text_score)


def grounding_metrics(
    answers: Sequence[str | None],
    targets: Sequence[Target],
    options: MetricOptions | None = None,
) -> dict:
    """grounding_desc: the boxes of the description against ``Target.boxes`` (``acc@0.5``,
    ``acc@0.25`` and EarthDial's ``box_precision@0.5`` / ``@0.25``, defined as for referred
    detection, over all the boxes of the description), and its text without boxes against the
    references (``rouge_1``, ``rouge_l``, ``meteor`` of ``caption_metrics``).
    """
    options = options or MetricOptions()
    preds, gts = box_pairs(answers, targets, options.convention, options.pixel_budget)
    out = box_metrics(preds, gts, (0.5, 0.25))
    out.update(caption_metrics(answers, targets, meteor_backend=options.meteor_backend))
    return out


def from_record(exchange: Exchange) -> Target:
    captions = record_captions(exchange, exchange.plain_answer())
    # EarthDial's grounding records list the grounded objects' boxes in obj_ids (its script
    # scores against those); elsewhere they are the boxes written in the answer.
    found = exchange.field_boxes("obj_ids") or exchange.answer_boxes
    arr = np.stack([enclosing_box(b) for b in found]) if found else np.zeros((0, 4))
    return Target(
        task="grounding_desc",
        answer=exchange.rerendered_answer(rotated=False),
        image_size=exchange.image_size,
        boxes=arr,
        box_format="xyxy",
        captions=captions,
    )


def generate(ctx: SceneContext) -> tuple[str, str, Target]:
    """The scene described object by object, each object's box after its phrase."""
    ordered = reading_order(ctx.objects)
    boxes = np.array([o.xyxy for o in ordered], dtype=np.float64)
    rendered, snapped = ctx.render(boxes)
    phrases = [f"a {o.color} {o.category}" for o in ordered]
    answer = f"{COVER_NOUN[ctx.cover]} with " + join_phrases(
        [f"{p} {b}" for p, b in zip(phrases, rendered, strict=True)]
    )
    plain = f"{COVER_NOUN[ctx.cover]} with " + join_phrases(phrases)
    think = f"I see {COVER_NOUN[ctx.cover]} with {inventory(ordered)}."
    target = ctx.target(
        answer,
        boxes=snapped,
        box_format="xyxy",
        captions=(plain, *scene_captions(ctx)[:2]),
        meta=detection_meta(ordered, ctx.size),
    )
    return ctx.prompt(), think, target


GROUNDING_DESC = TaskSpec(
    name="grounding_desc",
    description="grounding description: describe the image and box the objects mentioned",
    parse=parse,
    accuracy=grounding_accuracy,
    metrics={
        "geovlm": grounding_metrics,
        "earthdial": earthdial_metrics.grounding_metrics,
    },
    headline="acc@0.5",
    prompts={
        "default": (
            "Describe the image and locate the objects.",
            "Give a grounded description of the image.",
        )
    },
    generate=generate,
    from_record=from_record,
    aliases=("grounding", "grounded_description"),
    tags=("grounding",),
)

SPECS = (GROUNDING_DESC,)
