"""Batched box geometry for detection and grounding rewards (Numba kernels, float64, no torch).

Box layouts, told apart by their column count ``D``:
* ``4``: axis-aligned ``x1, y1, x2, y2``.
* ``5``: rotated ``cx, cy, w, h, angle_deg``, counter-clockwise: corners are
  ``(cx, cy) + R(angle) (±w/2, ±h/2)`` with ``R(a) = [[cos a, -sin a], [sin a, cos a]]`` applied to
  the numbers themselves (y up; on an image with y down it turns clockwise on screen, as in
  OpenCV and mmrotate). ``convert_rotated`` translates other conventions.
* ``8``: quadrilateral ``x1, y1, ..., x4, y4`` (DOTA), any vertex order; scored as the convex hull
  of its four points.

When two operands differ in layout, the simpler one is promoted (xyxy -> rotated -> quadrilateral),
so a model's axis-aligned box can be scored against rotated ground truth.

Every IoU-like value is finite and in ``[0, 1]``; a box with a zero or negative side, a collinear
quadrilateral, or a NaN / inf coordinate scores 0. ``kind="giou" | "diou" | "ciou"`` (xyxy only)
returns the textbook value ``v`` in ``[-1, 1]`` rescaled to ``(v + 1) / 2``, so 0 stays the worst.

CSR rewards take all candidates at once: ``pred [P, D]`` with ``pred_offsets [C + 1]`` (candidate
``c`` owns ``pred[pred_offsets[c]:pred_offsets[c + 1]]``) and ``gt [G, D]`` with ``gt_offsets``:
``[C + 1]`` (one ground-truth set per candidate) or ``[S + 1]`` with ``sample_index [C]`` naming
each candidate's sample, so the G candidates of a prompt share one copy. A candidate with no
boxes against a sample with no boxes scores 1 (nothing to find, nothing claimed); one empty side
alone scores 0. Only the first ``max_pred_boxes`` (``max_dets`` for AP, COCO's 100) predicted
boxes are matched; the rest still count as predictions, so flooding the answer with boxes can
never raise a reward and costs at most ``max_pred_boxes * n_gt`` pair evaluations per candidate.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from geovlm.rewards import _geometry_batch as _batch
from geovlm.rewards import _geometry_match as _match
from geovlm.rewards import _geometry_shapes as _shapes

MetricKind = Literal["iou", "giou", "diou", "ciou"]
AngleConvention = Literal["deg_ccw", "deg_cw", "rad_ccw", "rad_cw", "le90", "le90_deg"]

_KINDS = {
    "iou": _shapes.KIND_IOU,
    "giou": _shapes.KIND_GIOU,
    "diou": _shapes.KIND_DIOU,
    "ciou": _shapes.KIND_CIOU,
}
_WIDTHS = (4, 5, 8)
ANGLE_CONVENTIONS: tuple[str, ...] = ("deg_ccw", "deg_cw", "rad_ccw", "rad_cw", "le90", "le90_deg")
# pycocotools' recall grid, built with the same expression so searchsorted sees identical floats.
_COCO_RECALL_THRESHOLDS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1)


# --------------------------------------------------------------------------- validation helpers


def _box_array(boxes, name: str) -> np.ndarray:
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.ndim == 1 and arr.size == 0:
        return arr.reshape(0, 0)  # width decided by the other operand
    if arr.ndim != 2 or arr.shape[1] not in _WIDTHS:
        raise ValueError(
            f"{name} must be [K, 4] xyxy, [K, 5] rotated or [K, 8] quadrilateral boxes, "
            f"got shape {arr.shape}"
        )
    return np.ascontiguousarray(arr)


def _invalid_rows(boxes: np.ndarray) -> np.ndarray:
    """Rows the kernels score 0, so that promotion cannot turn them into valid shapes."""
    finite = np.isfinite(boxes).all(axis=1)
    if boxes.shape[1] == 4:
        return ~(finite & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]))
    if boxes.shape[1] == 5:
        return ~(finite & (boxes[:, 2] > 0) & (boxes[:, 3] > 0))
    return ~finite


def _promote(boxes: np.ndarray, width: int) -> np.ndarray:
    if boxes.shape[1] in (0, width):
        return boxes.reshape(boxes.shape[0], width)
    invalid = _invalid_rows(boxes)
    out = xyxy_to_rotated(boxes) if boxes.shape[1] == 4 else boxes
    if width == 8:
        out = rotated_to_quad(out)
    out[invalid] = np.nan
    return out


def _common_layout(
    a: np.ndarray, b: np.ndarray, kind: str, prepare: bool = True
) -> tuple[np.ndarray, np.ndarray, int]:
    """Promote both operands to one layout. Returns the kernel operands (polygons prepared
    unless ``prepare`` is False) and the kind code."""
    if kind not in _KINDS:
        raise ValueError(f"unknown kind {kind!r}; known: {sorted(_KINDS)}")
    width = max(a.shape[1], b.shape[1])
    if width == 0:
        width = 4
    if kind != "iou" and width != 4:
        raise ValueError(f"kind={kind!r} is defined for xyxy boxes only (got {width} columns)")
    a, b = _promote(a, width), _promote(b, width)
    if width == 4:
        return a, b, _KINDS[kind]
    if not prepare:
        return a, b, _shapes.KIND_POLYGON
    return _shapes.prepare_polygons(a), _shapes.prepare_polygons(b), _shapes.KIND_POLYGON


def _offsets(offsets, n_rows: int, name: str) -> np.ndarray:
    arr = np.asarray(offsets)
    if arr.ndim != 1 or arr.shape[0] < 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be a 1-D integer array [n + 1], got {arr.dtype} {arr.shape}")
    arr = np.ascontiguousarray(arr, dtype=np.int64)
    if arr[0] != 0 or arr[-1] != n_rows or np.any(np.diff(arr) < 0):
        raise ValueError(
            f"{name} must start at 0, never decrease and end at the box count {n_rows}; "
            f"got first={arr[0]}, last={arr[-1]}"
        )
    return arr


def _csr_operands(pred, pred_offsets, gt, gt_offsets, sample_index):
    pred_arr = _box_array(pred, "pred")
    gt_arr = _box_array(gt, "gt")
    p_off = _offsets(pred_offsets, pred_arr.shape[0], "pred_offsets")
    g_off = _offsets(gt_offsets, gt_arr.shape[0], "gt_offsets")
    n_cand, n_samples = p_off.shape[0] - 1, g_off.shape[0] - 1
    if sample_index is None:
        if n_samples != n_cand:
            raise ValueError(
                f"gt_offsets describes {n_samples} samples but pred_offsets {n_cand} candidates; "
                "pass sample_index to map candidates to samples"
            )
        gt_index = np.arange(n_cand, dtype=np.int64)
    else:
        gt_index = np.asarray(sample_index)
        if gt_index.shape != (n_cand,) or not np.issubdtype(gt_index.dtype, np.integer):
            raise ValueError(f"sample_index must be [{n_cand}] integers, got {gt_index.shape}")
        gt_index = np.ascontiguousarray(gt_index, dtype=np.int64)
        if n_cand and (gt_index.min() < 0 or gt_index.max() >= n_samples):
            raise ValueError(f"sample_index must lie in [0, {n_samples})")
    a, b, code = _common_layout(pred_arr, gt_arr, "iou")
    return a, p_off, b, g_off, gt_index, code


def _positive_int(value: int, name: str) -> int:
    if int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _threshold(value: float) -> float:
    value = float(value)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"iou_threshold must lie in (0, 1], got {value}")
    return value


# --------------------------------------------------------------------------- pairwise values


def iou_pairs(a, b, kind: MetricKind = "iou") -> np.ndarray:
    """Elementwise IoU (or rescaled GIoU / DIoU / CIoU) of ``a [N, D]``, ``b [N, D']``: ``[N]``."""
    a_arr, b_arr = _box_array(a, "a"), _box_array(b, "b")
    if a_arr.shape[0] != b_arr.shape[0]:
        raise ValueError(
            f"iou_pairs needs as many boxes in a ({a_arr.shape[0]}) as in b ({b_arr.shape[0]})"
        )
    x, y, code = _common_layout(a_arr, b_arr, kind, prepare=False)
    if code == _shapes.KIND_POLYGON:
        return _batch.polygon_pairs_kernel(x, y)
    return _batch.xyxy_pairs_kernel(x, y, code)


def iou_matrix(a, b, kind: MetricKind = "iou") -> np.ndarray:
    """IoU (or rescaled GIoU / DIoU / CIoU) of each ``a [N, D]`` with each ``b [M, D']``:
    ``[N, M]``."""
    x, y, code = _common_layout(_box_array(a, "a"), _box_array(b, "b"), kind)
    return _batch.matrix_kernel(x, y, code)


# --------------------------------------------------------------------------- matching


def linear_assignment(cost, maximize: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Optimal assignment of a finite ``cost [N, M]`` (Hungarian), as scipy's
    ``linear_sum_assignment``: ``(rows, cols)``, ``min(N, M)`` pairs sorted by row."""
    arr = np.asarray(cost, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"cost must be a 2-D matrix, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("cost must be finite (no NaN or inf entries)")
    if arr.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    work = -arr if maximize else arr
    if work.shape[0] <= work.shape[1]:
        rows = np.arange(work.shape[0], dtype=np.int64)
        return rows, _match.linear_assignment_kernel(np.ascontiguousarray(work))
    cols = np.arange(work.shape[1], dtype=np.int64)
    rows = _match.linear_assignment_kernel(np.ascontiguousarray(work.T))
    order = np.argsort(rows)
    return rows[order], cols[order]


def greedy_match(score, iou_threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Greedy one-to-one matching of ``score [N, M]`` (e.g. an IoU matrix): pairs with
    ``score >= iou_threshold`` and ``score > 0`` taken from the highest score down (ties in
    row-major order). Returns ``(rows, cols)`` sorted by row."""
    arr = np.ascontiguousarray(score, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"score must be a 2-D matrix, got shape {arr.shape}")
    if not np.isfinite(iou_threshold):
        raise ValueError(f"iou_threshold must be finite, got {iou_threshold}")
    rows, cols = _match.greedy_match_kernel(arr, float(iou_threshold))
    order = np.argsort(rows)
    return rows[order], cols[order]


# --------------------------------------------------------------------------- detection rewards


def _floor(floor: float) -> float:
    value = float(floor)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"floor must lie in [0, 1], got {floor!r}")
    return value


def _chance(chance, n_gt: int) -> np.ndarray:
    if chance is None:
        return np.zeros(0)
    arr = np.ascontiguousarray(chance, dtype=np.float64)
    if arr.shape != (n_gt,) or not np.isfinite(arr).all():
        raise ValueError(f"chance must be [{n_gt}] finite values (one per gt box), got {arr.shape}")
    return arr


def whole_image_iou(gt, image_sizes) -> np.ndarray:
    """IoU of the whole-image box with each true box, ``[G]``: what an answer that boxes the whole
    image scores against it (``gt [G, 4 | 5]``, ``image_sizes [G, 2]`` of ``(width, height)``)."""
    boxes = _box_array(gt, "gt")
    sizes = np.asarray(image_sizes, dtype=np.float64).reshape(-1, 2)
    if sizes.shape[0] != boxes.shape[0]:
        raise ValueError(f"{sizes.shape[0]} image sizes for {boxes.shape[0]} boxes")
    if boxes.shape[0] == 0:
        return np.zeros(0)
    width, height = sizes[:, 0], sizes[:, 1]
    if boxes.shape[1] == 4:
        whole = np.stack([np.zeros_like(width), np.zeros_like(height), width, height], axis=1)
    else:
        zero = np.zeros_like(width)
        whole = np.stack([width / 2, height / 2, width, height, zero], axis=1)
    return iou_pairs(whole, boxes)


def first_box_iou(
    pred, pred_offsets, gt, gt_offsets, *, sample_index=None, chance=None, floor: float = 0.0
) -> np.ndarray:
    """IoU of each candidate's first box with its sample's first box -> ``[C]`` (0 if either is
    missing): the referred-detection reward.

    ``chance [G]`` (one per gt box, e.g. ``whole_image_iou``) rescales the IoU to
    ``max(0, (IoU - chance) / (1 - chance))``: a box no better than the whole image earns 0; with
    it, an IoU below ``floor`` earns 0 too (a gate: the credit above it is unchanged).
    """
    a, p_off, b, g_off, gt_index, code = _csr_operands(
        pred, pred_offsets, gt, gt_offsets, sample_index
    )
    return _batch.first_box_kernel(
        a, p_off, b, g_off, gt_index, code, _chance(chance, len(b)), _floor(floor)
    )


def multibox_reward(
    pred,
    pred_offsets,
    gt,
    gt_offsets,
    *,
    sample_index=None,
    max_pred_boxes: int = 100,
    chance=None,
    extra_penalty: bool = False,
    floor: float = 0.0,
) -> np.ndarray:
    """Matched credit penalised for missing and extra boxes -> ``[C]`` in ``[0, 1]``.

    A pair's credit is its IoU, or with ``chance [G]`` (one per gt box, e.g.
    ``whole_image_iou``) ``max(0, (IoU - b) / (1 - b))``, ``b`` what a blind layout of as many
    boxes reaches: ``max(chance, min(n * chance, 1 / (n * chance), 0.5))`` for ``n`` predicted
    boxes (the tile of an ``n``-tile grid that holds the true box; one box: the whole image). A
    whole-image box or a grid earns nothing; with ``chance``, a pair whose IoU is below ``floor``
    earns nothing either (a gate: the credit above it is unchanged). Over the optimal (Hungarian)
    one-to-one matching of the credits:

    * default: ``sum of credit / max(n_pred, n_gt)``: a missing box adds 0 to the sum, an extra one
      adds 1 to the divisor, so ``n_pred`` boxes against ``n_gt <= n_pred`` targets score at most
      ``n_gt / n_pred``;
    * ``extra_penalty``: ``(sum of credit - max(n_pred - n_gt, 0)) / n_gt``, clipped at 0: every
      box beyond the true count cancels one perfectly matched box, so a hedge of several boxes for
      one object, or a grid, scores 0.
    """
    max_pred = _positive_int(max_pred_boxes, "max_pred_boxes")
    a, p_off, b, g_off, gt_index, code = _csr_operands(
        pred, pred_offsets, gt, gt_offsets, sample_index
    )
    return _batch.multibox_kernel(
        a,
        p_off,
        b,
        g_off,
        gt_index,
        code,
        max_pred,
        _chance(chance, len(b)),
        bool(extra_penalty),
        _floor(floor),
    )


def detection_prf(
    pred,
    pred_offsets,
    gt,
    gt_offsets,
    iou_threshold: float = 0.5,
    *,
    sample_index=None,
    max_pred_boxes: int = 100,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and F1 ``[C]`` each, true positives from greedy matching
    (``greedy_match``) at ``iou_threshold``. Both sides empty gives 1, 1, 1."""
    threshold = _threshold(iou_threshold)
    max_pred = _positive_int(max_pred_boxes, "max_pred_boxes")
    a, p_off, b, g_off, gt_index, code = _csr_operands(
        pred, pred_offsets, gt, gt_offsets, sample_index
    )
    out = _batch.prf_kernel(a, p_off, b, g_off, gt_index, code, threshold, max_pred)
    return out[:, 0].copy(), out[:, 1].copy(), out[:, 2].copy()


def average_precision(
    pred,
    pred_scores,
    pred_offsets,
    gt,
    gt_offsets,
    iou_threshold: float = 0.5,
    *,
    sample_index=None,
    max_dets: int = 100,
) -> np.ndarray:
    """AP at ``iou_threshold`` of each candidate against its sample -> ``[C]``, with COCO's
    protocol (pycocotools, one image and one class: 101-point interpolated precision).

    ``pred_scores [P]`` ranks each candidate's boxes (NaN ranks last); ``None`` ranks them in the
    order given, as a model lists them.
    """
    threshold = _threshold(iou_threshold)
    max_det = _positive_int(max_dets, "max_dets")
    a, p_off, b, g_off, gt_index, code = _csr_operands(
        pred, pred_offsets, gt, gt_offsets, sample_index
    )
    n_pred = p_off[-1]
    if pred_scores is None:
        scores = np.zeros(n_pred)  # a stable sort keeps the given order
    else:
        scores = np.asarray(pred_scores, dtype=np.float64)
        if scores.shape != (n_pred,):
            raise ValueError(f"pred_scores must be [{n_pred}] (one per box), got {scores.shape}")
        scores = np.where(np.isnan(scores), -np.inf, scores)
    return _batch.ap_kernel(
        a, scores, p_off, b, g_off, gt_index, code, threshold, max_det, _COCO_RECALL_THRESHOLDS
    )


# --------------------------------------------------------------------------- converters


def _rotated_array(boxes, name: str = "boxes") -> np.ndarray:
    arr = np.array(boxes, dtype=np.float64, ndmin=2)
    if arr.ndim != 2 or arr.shape[1] != 5:
        raise ValueError(f"{name} must be [K, 5] rotated boxes, got shape {arr.shape}")
    return arr


def _cos_sin_degrees(angle: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """As the kernels: reduced exactly mod 360 and exact at multiples of 90 degrees."""
    with np.errstate(invalid="ignore"):  # inf angles become NaN: a degenerate box, by design
        t = np.mod(angle, 360.0)
        rad = np.deg2rad(t)
        c, s = np.cos(rad), np.sin(rad)
    for value, (cv, sv) in (
        (0.0, (1.0, 0.0)),
        (90.0, (0.0, 1.0)),
        (180.0, (-1.0, 0.0)),
        (270.0, (0.0, -1.0)),
    ):
        hit = t == value
        c[hit], s[hit] = cv, sv
    return c, s


def convert_rotated(
    boxes, src: AngleConvention = "deg_ccw", dst: AngleConvention = "deg_ccw"
) -> np.ndarray:
    """Rotated boxes ``[K, 5]`` from one angle convention to another -> ``[K, 5]``.

    ``deg_ccw`` is the project's own; ``*_cw`` negate the angle; ``rad_*`` are in radians.
    ``le90`` is mmrotate's long-edge convention (also GeoGround's): radians, ``w >= h`` and the
    angle in ``[-pi/2, pi/2)`` (``le90_deg``: the same in degrees, ``[-90, 90)``); any box
    converts to it and back without changing its shape.
    """
    for conv in (src, dst):
        if conv not in ANGLE_CONVENTIONS:
            raise ValueError(f"unknown angle convention {conv!r}; known: {ANGLE_CONVENTIONS}")
    out = _rotated_array(boxes).copy()
    angle = out[:, 4]
    if src.startswith("rad") or src == "le90":
        angle = np.rad2deg(angle)
    if src.endswith("_cw"):
        angle = -angle
    if dst.startswith("le90"):
        swap = out[:, 2] < out[:, 3]
        out[swap, 2], out[swap, 3] = out[swap, 3], out[swap, 2]
        angle = np.where(swap, angle + 90.0, angle)
        # A rectangle is symmetric under a half turn, so the angle is defined mod 180.
        angle = np.mod(angle + 90.0, 180.0) - 90.0
    if dst.endswith("_cw"):
        angle = -angle
    if dst.startswith("rad") or dst == "le90":
        angle = np.deg2rad(angle)
    out[:, 4] = angle
    return out


def rotated_to_quad(boxes) -> np.ndarray:
    """Corners of rotated boxes ``[K, 5]`` -> ``[K, 8]`` counter-clockwise ``x1, y1, ..., x4, y4``,
    starting from the corner at local ``(-w/2, -h/2)``."""
    arr = _rotated_array(boxes)
    cx, cy, w, h, angle = arr.T
    c, s = _cos_sin_degrees(angle)
    out = np.empty((arr.shape[0], 8))
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite boxes give NaN corners
        for k, (sx, sy) in enumerate(((-1, -1), (1, -1), (1, 1), (-1, 1))):
            lx, ly = sx * 0.5 * w, sy * 0.5 * h
            out[:, 2 * k] = cx + (c * lx - s * ly)
            out[:, 2 * k + 1] = cy + (s * lx + c * ly)
    return out


def rotated_to_xyxy(boxes) -> np.ndarray:
    """Axis-aligned hull ``[K, 4]`` of rotated boxes ``[K, 5]``."""
    arr = _rotated_array(boxes)
    cx, cy, w, h, angle = arr.T
    c, s = _cos_sin_degrees(angle)
    ex = 0.5 * (np.abs(w * c) + np.abs(h * s))
    ey = 0.5 * (np.abs(w * s) + np.abs(h * c))
    return np.stack([cx - ex, cy - ey, cx + ex, cy + ey], axis=1)


def quad_to_xyxy(quads) -> np.ndarray:
    """Axis-aligned hull ``[K, 4]`` of quadrilaterals ``[K, 8]``."""
    arr = np.array(quads, dtype=np.float64, ndmin=2)
    if arr.ndim != 2 or arr.shape[1] != 8:
        raise ValueError(f"quads must be [K, 8], got shape {arr.shape}")
    xs, ys = arr[:, 0::2], arr[:, 1::2]
    return np.stack([xs.min(1), ys.min(1), xs.max(1), ys.max(1)], axis=1)


def xyxy_to_rotated(boxes) -> np.ndarray:
    """Axis-aligned ``[K, 4]`` -> rotated ``[K, 5]`` with angle 0 (negative sides kept as is)."""
    arr = np.array(boxes, dtype=np.float64, ndmin=2)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"boxes must be [K, 4] xyxy, got shape {arr.shape}")
    x1, y1, x2, y2 = arr.T
    zero = np.zeros_like(x1)
    return np.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1, zero], axis=1)
