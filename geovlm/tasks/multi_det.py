"""multi_det: multi-object detection, the boxes of every object of the asked class(es).

* parse: the answer's ``[K, 4]`` boxes (``K = 0`` for an explicit "none").
* accuracy: the multi-box reward (matched IoU over ``max(n_pred, n_gt)``).
* metrics: COCO-style ``mAP@0.5`` / ``mAP@0.25`` per asked class, and ``f1@0.5``.
* records: the answer's boxes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from geovlm import earthdial_metrics
from geovlm.data.readers import Exchange
from geovlm.data.scenes import OBJECT_CLASSES, PLURALS
from geovlm.data.schema import Target
from geovlm.data.synthetic import (
    SceneContext,
    class_counts,
    detection_meta,
    inventory,
    reading_order,
    region_of,
)
from geovlm.metrics import (
    MetricOptions,
    box_pairs,
    matched_counts,
    mean_average_precision,
    sample_mean,
)
from geovlm.rewards.accuracy import box_reward
from geovlm.rewards.options import RewardOptions
from geovlm.rewards.parse import ParseOptions, normalize_text
from geovlm.tasks._boxes import box_target, parse_answer_boxes
from geovlm.tasks.spec import TaskSpec


def parse(answer: str, target: Target, options: ParseOptions) -> np.ndarray | None:
    return parse_answer_boxes(answer, target, options, rotated=False)


def multi_detection_accuracy(
    parsed: Sequence[np.ndarray | None], targets: Sequence[Target], options: RewardOptions
) -> np.ndarray:
    """Multi-object detection: the multi-box reward

    ``R = sum of IoU over the optimal (Hungarian) one-to-one matching / max(n_pred, n_gt)``:
    a missed object adds 0 to the sum, an extra box adds 1 to the divisor (so flooding cannot
    pay), and no boxes against no objects scores 1.
    """
    return box_reward(parsed, targets, options, "multibox", 4)


def detection_class(target: Target) -> str:
    """The class a detection sample asks for: ``label``, ``labels``, ``meta["categories"]`` or
    ``meta["category"]`` (several classes asked together form one class), else "object".
    """
    names: Sequence[str] = ()
    if target.label:
        names = (target.label,)
    elif target.labels:
        names = target.labels
    elif target.meta.get("categories"):
        names = tuple(target.meta["categories"])
    elif target.meta.get("category"):
        names = (target.meta["category"],)
    normalised = sorted({normalize_text(str(name)) for name in names} - {""})
    return ", ".join(normalised) or "object"


def detection_metrics(
    answers: Sequence[str | None],
    targets: Sequence[Target],
    options: MetricOptions | None = None,
) -> dict:
    """multi_det: ``mAP@0.5`` and ``mAP@0.25`` (``mean_average_precision``) and the per-sample
    one-to-one ``f1@0.5`` = 2 TP / (P + G) (1 when both are empty), mean over samples.
    """
    options = options or MetricOptions()
    preds, gts = box_pairs(answers, targets, options.convention, options.pixel_budget)
    classes = [detection_class(t) for t in targets]
    out: dict[str, float] = {}
    for tau in (0.5, 0.25):
        value = mean_average_precision(preds, gts, classes, tau)
        if value is not None:
            out[f"mAP@{tau:g}"] = value
    tp = matched_counts(preds, gts, 0.5)
    n_pred = np.array([len(p) for p in preds])
    n_gt = np.array([len(g) for g in gts])
    total = (n_pred + n_gt).astype(np.float64)
    out["f1@0.5"] = sample_mean(np.where(total > 0, 2.0 * tp / np.maximum(total, 1.0), 1.0))
    return out


def from_record(exchange: Exchange) -> Target:
    return box_target(exchange, "multi_det", rotated=False)


def generate(ctx: SceneContext) -> tuple[str, str, Target]:
    """Every object of one class of the scene (a quarter of the time: of two classes)."""
    present = list(class_counts(ctx.objects))
    if len(present) > 1 and ctx.rng.random() < 0.25:
        picked = sorted(
            ctx.rng.choice(present, size=2, replace=False).tolist(), key=OBJECT_CLASSES.index
        )
        prompt = ctx.prompt("pair", plural_a=PLURALS[picked[0]], plural_b=PLURALS[picked[1]])
    else:
        picked = [ctx.choice(present)]
        prompt = ctx.prompt(plural=PLURALS[picked[0]], singular=picked[0])
    found = reading_order(o for o in ctx.objects if o.category in picked)
    boxes = np.array([o.xyxy for o in found], dtype=np.float64)
    where = ", ".join(region_of(o, ctx.size) for o in found)
    think = f"I find {inventory(found)}: {where}."
    meta = {**detection_meta(found, ctx.size), "categories": tuple(picked)}
    texts, snapped = ctx.render(boxes)
    target = ctx.target(", ".join(texts), boxes=snapped, box_format="xyxy", meta=meta)
    return prompt, think, target


MULTI_DET = TaskSpec(
    name="multi_det",
    description="multi-object detection: every object of the asked class(es)",
    parse=parse,
    accuracy=multi_detection_accuracy,
    metrics={
        "geovlm": detection_metrics,
        "earthdial": earthdial_metrics.multi_detection_metrics,
    },
    headline="mAP@0.5",
    prompts={
        "default": (
            "Detect all {plural}.",
            "Find every {singular}.",
            "Give the boxes of all {plural}.",
        ),
        "pair": ("Detect all {plural_a} and {plural_b}.",),
    },
    generate=generate,
    from_record=from_record,
    aliases=("detection", "det", "od"),
)

SPECS = (MULTI_DET,)
