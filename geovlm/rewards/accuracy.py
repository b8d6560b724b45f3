"""Building blocks of the accuracy rewards, shared by the task modules (``geovlm.tasks``).

A task's accuracy function takes the typed answers of one task (its parser's output, one per
completion, ``None`` when the completion gave no usable answer), their ``Target`` s and the
``RewardOptions``, and returns ``[C]`` float64 in ``[0, 1]``; ``None`` scores 0. The helpers below
score a whole batch in one call of the geometry / text kernels (CSR boxes, lists of strings):

* ``box_reward``: the multi-box or first-box reward of predicted boxes against the targets' (IoU
  above the whole-image box's, extra boxes cancelling matched ones; or the paper's plain IoU);
* ``text_scores``: a text metric of the answers against their ``references``, optionally through
  the caption guard (``caption_guard``);
* ``references``: a target's reference sentences (the one definition the metrics use too).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np

from geovlm.data.schema import Target
from geovlm.rewards import geometry
from geovlm.rewards.caption_guard import caption_guard
from geovlm.rewards.options import RewardOptions
from geovlm.rewards.parse import strip_boxes


def _scatter(n: int, index: np.ndarray, values) -> np.ndarray:
    out = np.zeros(n)
    if len(index):
        out[index] = np.asarray(values, dtype=np.float64)
    return out


def references(target: Target) -> list[str]:
    """Reference sentences: the target's captions, else its answer (boxes stripped)."""
    if target.captions:
        return [strip_boxes(c) for c in target.captions]
    ref = strip_boxes(target.answer)
    return [ref] if ref else []


def text_scores(
    parsed_text: Sequence[str | None],
    targets: Sequence[Target],
    metric: Callable[[list[str], list[list[str]]], np.ndarray],
    guard: bool = False,
) -> np.ndarray:
    """``[C]``: ``metric(answers, references)`` where an answer parsed and its target has
    references; 0 elsewhere. ``guard`` multiplies each score by ``caption_guard.caption_guard``
    (nothing for a caption without content, less for one longer than its references)."""
    index, candidates, refs = [], [], []
    for i, (answer, target) in enumerate(zip(parsed_text, targets, strict=True)):
        target_refs = references(target)
        if answer and target_refs:
            index.append(i)
            candidates.append(answer)
            refs.append(target_refs)
    if not index:
        return np.zeros(len(parsed_text))
    values = np.asarray(metric(candidates, refs), dtype=np.float64)
    if guard:
        values = values * caption_guard(candidates, refs)
    return _scatter(len(parsed_text), np.array(index, dtype=np.int64), values)


def _box_csr(boxes: Sequence[np.ndarray], width: int) -> tuple[np.ndarray, np.ndarray]:
    counts = np.array([len(b) for b in boxes], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    flat = (
        np.concatenate([np.asarray(b, dtype=np.float64).reshape(-1, width) for b in boxes])
        if boxes
        else np.zeros((0, width))
    )
    return flat.reshape(-1, width), offsets


def _gt_csr(
    targets: Sequence[Target], width: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Ground-truth CSR with one copy per distinct Target, each candidate's sample index, and the
    image size ``[G, 2]`` of every true box."""
    slot: dict[int, int] = {}
    unique: list[np.ndarray] = []
    sizes: list[tuple[int, int]] = []
    sample_index = np.empty(len(targets), dtype=np.int64)
    for i, t in enumerate(targets):
        key = id(t)
        if key not in slot:
            slot[key] = len(unique)
            unique.append(_target_boxes(t, width))
            sizes.extend([tuple(t.image_size)] * len(unique[-1]))
        sample_index[i] = slot[key]
    flat, offsets = _box_csr(unique, width)
    return flat, offsets, sample_index, np.asarray(sizes, dtype=np.float64).reshape(-1, 2)


def _target_boxes(target: Target, width: int) -> np.ndarray:
    if target.boxes is None:
        return np.zeros((0, width))
    boxes = np.asarray(target.boxes, dtype=np.float64)
    if width == 4 and boxes.shape[1] == 5:
        return geometry.rotated_to_xyxy(boxes) if len(boxes) else np.zeros((0, 4))
    if width == 5 and boxes.shape[1] == 4:
        return geometry.xyxy_to_rotated(boxes) if len(boxes) else np.zeros((0, 5))
    return boxes


def box_reward(
    pred: Sequence[np.ndarray],
    targets: Sequence[Target],
    options: RewardOptions,
    kind: Literal["multibox", "first_box"],
    width: int,
) -> np.ndarray:
    """``[C]`` box reward of every candidate; an answer without usable boxes (``None``) scores 0.

    ``pred`` holds ``[K, 4]`` xyxy or ``[K, 5]`` rotated pixel boxes (or ``None``) per candidate;
    predicted and true boxes are compared as ``width`` 4 (axis-aligned hulls) or 5 (rotated).
    A pair's credit is its IoU; with ``options.box_credit == "above_chance"`` (default) its IoU
    above a blind layout's, ``max(0, (IoU - b) / (1 - b))`` with ``b`` the IoU of the whole image
    with the true box (one predicted box; ``"first_box"``), or for ``n`` predicted boxes the IoU
    the tile of an ``n``-tile grid holding it reaches (``geometry.multibox_reward``), so boxing
    the whole image (or the hull of an image-diagonal box) or tiling it earns nothing; and a box
    whose IoU is below ``options.min_box_iou`` earns nothing, so a large box around a roughly
    located object does not either.

    ``"multibox"``: the optimal one-to-one matching of the credits; ``"above_chance"`` divides
    their sum, less one for every box beyond the true count, by the true count (a second box for
    one object cancels the first: a hedge or a grid scores 0); ``"iou"`` divides it by
    ``max(n_pred, n_gt)``. ``"first_box"``: the credit of the first predicted and the first true
    box. No boxes against no objects scores 1 ("none", "[]").
    """
    boxes = [np.zeros((0, width)) if p is None else _pred_width(p, width) for p in pred]
    flat, offsets = _box_csr(boxes, width)
    gt, gt_offsets, sample_index, sizes = _gt_csr(targets, width)
    above_chance = options.box_credit == "above_chance"
    chance = geometry.whole_image_iou(gt, sizes) if above_chance else None
    floor = options.min_box_iou
    if kind == "first_box":
        out = geometry.first_box_iou(
            flat, offsets, gt, gt_offsets, sample_index=sample_index, chance=chance, floor=floor
        )
    else:
        out = geometry.multibox_reward(
            flat,
            offsets,
            gt,
            gt_offsets,
            sample_index=sample_index,
            max_pred_boxes=options.max_pred_boxes,
            chance=chance,
            extra_penalty=above_chance,
            floor=floor,
        )
    # An answer without usable boxes is not the claim "nothing here", even where nothing is.
    out[[p is None for p in pred]] = 0.0
    return out


def _pred_width(boxes: np.ndarray, width: int) -> np.ndarray:
    if boxes.shape[1] == width:
        return boxes
    return geometry.rotated_to_xyxy(boxes) if len(boxes) else np.zeros((0, width))
