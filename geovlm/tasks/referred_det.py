"""referred_det / referred_det_rot: referred object detection, the box(es) of the object(s) a
phrase refers to: axis-aligned, or rotated.

* parse: the answer's boxes (``[K, 4]``, or ``[K, 5]`` for the rotated task).
* accuracy: the multi-box or first-box IoU reward (``RewardOptions.referred_reward``); the
  rotated task on axis-aligned hulls (the paper's) or exact rotated IoU
  (``RewardOptions.rotated_iou``).
* metrics: ``acc@0.5`` and EarthDial's ``box_precision@0.5``, overall and per size and
  single / multiple split; ``mean_iou`` (the matched IoU the multi-box reward pays).
* records: the answer's boxes; a GeoChat ``[refer]`` whose boxes carry an angle is the rotated
  task.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from geovlm import earthdial_metrics
from geovlm.data.readers import Exchange
from geovlm.data.scenes import SceneObject
from geovlm.data.schema import Target
from geovlm.data.synthetic import (
    REGION_PHRASE,
    SceneContext,
    detection_meta,
    join_phrases,
    noun,
    reading_order,
    region_of,
)
from geovlm.metrics import (
    MetricOptions,
    box_metrics,
    box_pairs,
    detection_splits,
    sample_mean,
)
from geovlm.rewards.accuracy import box_reward
from geovlm.rewards.options import RewardOptions
from geovlm.rewards.parse import ParseOptions
from geovlm.tasks._boxes import box_target, parse_answer_boxes
from geovlm.tasks.spec import TaskSpec


def parse_xyxy(answer: str, target: Target, options: ParseOptions) -> np.ndarray | None:
    return parse_answer_boxes(answer, target, options, rotated=False)


def parse_rotated(answer: str, target: Target, options: ParseOptions) -> np.ndarray | None:
    return parse_answer_boxes(answer, target, options, rotated=True)


def referred_detection_accuracy(
    parsed: Sequence[np.ndarray | None], targets: Sequence[Target], options: RewardOptions
) -> np.ndarray:
    """Referred detection (axis-aligned): IoU of the answer's box with the referred object's.

    ``"multibox"`` (default): ``sum IoU over the optimal one-to-one matching / max(n_pred,
    n_gt)``, which is the IoU for one box each and divides by the box count when the answer
    floods boxes; ``"first_box"``: ``IoU(first predicted box, first true box)``.
    """
    return box_reward(parsed, targets, options, options.referred_reward, 4)


def rotated_detection_accuracy(
    parsed: Sequence[np.ndarray | None], targets: Sequence[Target], options: RewardOptions
) -> np.ndarray:
    """Referred detection with rotated boxes: ``referred_detection_accuracy`` on

    * ``"hbb"`` (default): the axis-aligned hulls of predicted and true boxes, the paper's
      axis-aligned IoU reward;
    * ``"rotated"``: the rotated rectangles themselves (exact polygon IoU).
    """
    if options.rotated_iou == "hbb":
        return box_reward(parsed, targets, options, options.referred_reward, 4)
    return box_reward(parsed, targets, options, options.referred_reward, 5)


def matched_iou(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray]) -> np.ndarray:
    """Per sample ``[C]``: the IoU summed over the optimal one-to-one matching of predicted and
    true boxes, over ``max(P, G)`` (``geometry.multibox_reward``, what the multi-box accuracy
    reward pays): the IoU itself for one box each, 0 without a readable box, 1 when neither side
    has a box. Rotated IoU where the true boxes are rotated (``[K, 5]``), as ``acc@0.5``."""
    from geovlm.rewards.geometry import multibox_reward

    out = np.zeros(len(preds))
    for width in (4, 5):
        index = [i for i, gt in enumerate(gts) if gt.shape[1] == width]
        if not index:
            continue
        flat = {}
        for side, boxes in (("pred", preds), ("gt", gts)):
            chosen = [boxes[i] for i in index]
            offsets = np.zeros(len(chosen) + 1, dtype=np.int64)
            offsets[1:] = np.cumsum([len(b) for b in chosen])
            rows = np.concatenate(chosen) if offsets[-1] else np.zeros((0, width))
            flat[side] = (np.ascontiguousarray(rows, dtype=np.float64), offsets)
        out[index] = multibox_reward(*flat["pred"], *flat["gt"])
    return out


def referred_detection_metrics(
    answers: Sequence[str | None],
    targets: Sequence[Target],
    options: MetricOptions | None = None,
) -> dict:
    """referred_det / referred_det_rot: ``acc@0.5`` and EarthDial's ``box_precision@0.5``, overall
    and per split ``/small``, ``/medium``, ``/large`` (``size_bucket``), ``/single``,
    ``/multiple`` (one or several gt boxes), and ``mean_iou`` (``matched_iou``, mean over
    samples), which shows boxes moving closer before they cross the 0.5 threshold. IoU is
    rotated IoU where the gt boxes are rotated.
    """
    options = options or MetricOptions()
    preds, gts = box_pairs(answers, targets, options.convention, options.pixel_budget)
    out = box_metrics(preds, gts, (0.5,), detection_splits(targets))
    out["mean_iou"] = sample_mean(matched_iou(preds, gts))
    return out


def read_axis_aligned(exchange: Exchange) -> Target:
    """Axis-aligned boxes; a GeoChat ``[refer]`` with angled boxes is the rotated task."""
    if exchange.from_tag and any(box.shape[0] == 5 for box in exchange.answer_boxes):
        return box_target(exchange, "referred_det_rot", rotated=True)
    return box_target(exchange, "referred_det", rotated=False)


def read_rotated(exchange: Exchange) -> Target:
    return box_target(exchange, "referred_det_rot", rotated=True)


def _referring_expressions(
    objects: Sequence[SceneObject], size: tuple[int, int]
) -> list[tuple[str, list[SceneObject], str]]:
    """Every expression that picks out exactly a set of objects: ``(text, referents, kind)``."""
    out: list[tuple[str, list[SceneObject], str]] = []
    by_class: dict[str, list[SceneObject]] = {}
    for obj in objects:
        by_class.setdefault(obj.category, []).append(obj)
    for category, members in by_class.items():
        out.append((f"the {noun(category, len(members))}", members, "class"))
        colors = {o.color for o in members}
        if len(colors) > 1:
            for color in sorted(colors):
                group = [o for o in members if o.color == color]
                out.append((f"the {color} {noun(category, len(group))}", group, "color"))
        if len(members) > 1:
            regions = [region_of(o, size) for o in members]
            for obj, region in zip(members, regions, strict=True):
                if regions.count(region) == 1:
                    out.append((f"the {category} {REGION_PHRASE[region]}", [obj], "position"))
    return out


def generate(ctx: SceneContext) -> tuple[str, str, Target]:
    """The boxes of the objects a referring expression (class, colour or position) picks out."""
    expressions = _referring_expressions(ctx.objects, ctx.size)
    # Single-object expressions are drawn twice as often: most referring benchmarks are singular.
    weights = np.array([2.0 if len(refs) == 1 else 1.0 for _, refs, _ in expressions])
    pick = int(ctx.rng.choice(len(expressions), p=weights / weights.sum()))
    text, referents, kind = expressions[pick]
    referents = reading_order(referents)
    rotated = ctx.task == "referred_det_rot"
    boxes = np.array([o.rbox if rotated else o.xyxy for o in referents], dtype=np.float64)
    n = len(referents)
    fields = {
        "ref": text,
        "box_word": "box" if n == 1 else "boxes",
        "rot_word": "a rotated box" if n == 1 else "rotated boxes",
    }
    where = [REGION_PHRASE[region_of(o, ctx.size)] for o in referents]
    if n == 1:
        think = f"I see a {referents[0].color} {referents[0].category} {where[0]}"
        think += f", turned {round(referents[0].rbox[4])} degrees." if rotated else "."
    else:
        think = f"I find {n} of them: {join_phrases(where)}."
    meta = {
        **detection_meta(referents, ctx.size),
        "category": referents[0].category,
        "expression": kind,
    }
    texts, snapped = ctx.render(boxes)
    target = ctx.target(
        ", ".join(texts),
        boxes=snapped,
        box_format="rotated" if rotated else "xyxy",
        meta=meta,
    )
    return ctx.prompt(**fields), think, target


REFERRED_DET = TaskSpec(
    name="referred_det",
    description="referred object detection, axis-aligned box(es) of the referred object(s)",
    parse=parse_xyxy,
    accuracy=referred_detection_accuracy,
    metrics={
        "geovlm": referred_detection_metrics,
        "earthdial": earthdial_metrics.detection_metrics,
    },
    headline="acc@0.5",
    prompts={"default": ("Locate {ref}.", "Find {ref}.", "Give the {box_word} of {ref}.")},
    generate=generate,
    from_record=read_axis_aligned,
    aliases=("rec", "refer", "referring", "referring_detection"),
    tags=("refer",),
)

REFERRED_DET_ROT = TaskSpec(
    name="referred_det_rot",
    description="referred object detection, rotated box(es) of the referred object(s)",
    parse=parse_rotated,
    accuracy=rotated_detection_accuracy,
    metrics={
        "geovlm": referred_detection_metrics,
        "earthdial": earthdial_metrics.detection_metrics,
    },
    headline="acc@0.5",
    prompts={
        "default": (
            "Locate {ref} with {rot_word}.",
            "Give the rotated {box_word} of {ref}.",
        )
    },
    generate=generate,
    from_record=read_rotated,
    aliases=("rotated_rec",),
)

SPECS = (REFERRED_DET, REFERRED_DET_ROT)
