"""What the box tasks share (referred_det, referred_det_rot, multi_det): the answer is a list of
boxes.

* parse: the boxes of the answer (``[K, 4]`` xyxy, or ``[K, 5]`` rotated), in original-image
  pixels; ``K = 0`` only for an explicit "none" ("No objects.", "[]").
* records: the answer's boxes (at least one), converted to the task's layout; ``meta`` gets
  ``n_objects``, ``objects`` (single / multiple) and the ``size`` bucket of the mean box area.
"""

from __future__ import annotations

import numpy as np

from geovlm.data.readers import Exchange, as_rotated, enclosing_box
from geovlm.data.schema import Target
from geovlm.data.splits import size_bucket
from geovlm.rewards.parse import ParseOptions, parse_boxes, says_none


def parse_answer_boxes(
    answer: str, target: Target, options: ParseOptions, rotated: bool
) -> np.ndarray | None:
    """The answer's boxes, or ``None`` when it gives none without saying "none"."""
    boxes = parse_boxes(
        answer,
        target.image_size,
        rotated=rotated,
        convention=options.convention,
        resized_size=options.resized_size,
    )
    return boxes if len(boxes) or says_none(answer) else None


def box_target(exchange: Exchange, task: str, rotated: bool) -> Target:
    """The Target of a record whose answer lists the boxes of ``task``."""
    if not exchange.answer_boxes:
        raise exchange.error(f"no box in the answer {exchange.answer!r}")
    arr = np.stack([as_rotated(b) if rotated else enclosing_box(b) for b in exchange.answer_boxes])
    n = len(arr)
    area = float(np.mean([(b[2] - b[0]) * (b[3] - b[1]) for b in map(enclosing_box, arr)]))
    meta = {
        "n_objects": n,
        "objects": "single" if n == 1 else "multiple",
        "size": size_bucket(area, exchange.image_size),
    }
    return Target(
        task=task,
        answer=", ".join(exchange.render(b) for b in arr),
        image_size=exchange.image_size,
        boxes=arr,
        box_format="rotated" if rotated else "xyxy",
        meta=meta,
    )
