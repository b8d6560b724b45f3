"""Batched Numba kernels over CSR box sets: pairwise values, dense matrices, and the detection
rewards of many candidates against per-sample ground truth in one call.

Inputs are validated by the caller; polygons arrive prepared (``prepare_polygons``), except in
``polygon_pairs_kernel``, which takes raw rotated / quadrilateral rows.
* ``pred`` ``[P, D]`` flat boxes of all candidates, ``pred_offsets`` ``[C + 1]`` int64: candidate
  ``c`` owns rows ``pred_offsets[c]:pred_offsets[c + 1]``.
* ``gt`` ``[G, D]`` flat ground-truth boxes, ``gt_offsets`` ``[S + 1]`` int64, and ``gt_index``
  ``[C]`` int64: candidate ``c`` is scored against sample ``gt_index[c]`` (so G candidates of one
  prompt share one copy of its ground truth).
* ``kind``: a ``KIND_*`` code of ``_geometry_shapes``; ``D`` is 4 for the xyxy kinds and
  ``PREP_COLS`` for ``KIND_POLYGON``.

Cost bounds: only the first ``max_pred`` boxes of a candidate are matched (the rest still count
as predictions, so truncation can only lower a reward), which keeps the Hungarian step at
O(max_pred^2 * n_gt) per candidate; rows and columns without any overlap are dropped before it.
Every candidate costs at most ``max_pred * n_gt`` pair evaluations, each with a bounding-circle
early exit for polygons.
"""

from __future__ import annotations

import numba
import numpy as np

from geovlm.rewards._geometry_match import greedy_pairs, hungarian
from geovlm.rewards._geometry_shapes import (
    KIND_IOU,
    KIND_POLYGON,
    PREP_COLS,
    iou_xyxy,
    new_work,
    polygon_iou,
    prepare_row,
    xyxy_metric,
)

# The kind is branched on outside the pair loops: a loop body with one known metric compiles to
# tight code (about 5x faster for xyxy IoU than a per-pair dispatch).


@numba.njit(cache=True)
def _one_pair(a: np.ndarray, i: int, b: np.ndarray, j: int, kind: int, work: np.ndarray) -> float:
    if kind == KIND_POLYGON:
        return polygon_iou(a, i, b, j, work)
    if kind == KIND_IOU:
        return iou_xyxy(a, i, b, j)
    return xyxy_metric(a, i, b, j, kind)


@numba.njit(cache=True)
def xyxy_pairs_kernel(a: np.ndarray, b: np.ndarray, kind: int) -> np.ndarray:
    """Elementwise IoU / rescaled GIoU / DIoU / CIoU of raw xyxy rows."""
    n = a.shape[0]
    out = np.empty(n)
    if kind == KIND_IOU:
        for i in range(n):
            out[i] = iou_xyxy(a, i, b, i)
    else:
        for i in range(n):
            out[i] = xyxy_metric(a, i, b, i, kind)
    return out


@numba.njit(cache=True)
def polygon_pairs_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise IoU of raw rotated / quadrilateral rows: each box is used once, so it is
    prepared on the fly into a two-row scratch rather than into a full prepared array."""
    n = a.shape[0]
    out = np.empty(n)
    work = new_work()
    scratch = np.empty((4, 8))
    prepared = np.empty((2, PREP_COLS))
    for i in range(n):
        prepare_row(a[i], prepared[0], scratch)
        prepare_row(b[i], prepared[1], scratch)
        out[i] = polygon_iou(prepared, 0, prepared, 1, work)
    return out


@numba.njit(cache=True)
def _fill_block(
    a: np.ndarray,
    rows: np.ndarray,
    n: int,
    b: np.ndarray,
    b0: int,
    m: int,
    kind: int,
    out: np.ndarray,
    work: np.ndarray,
) -> None:
    """``out[r, j] = metric(a[rows[r]], b[b0 + j])`` for ``r < n``, ``j < m``."""
    if kind == KIND_POLYGON:
        for r in range(n):
            for j in range(m):
                out[r, j] = polygon_iou(a, rows[r], b, b0 + j, work)
    elif kind == KIND_IOU:
        for r in range(n):
            for j in range(m):
                out[r, j] = iou_xyxy(a, rows[r], b, b0 + j)
    else:
        for r in range(n):
            for j in range(m):
                out[r, j] = xyxy_metric(a, rows[r], b, b0 + j, kind)


@numba.njit(cache=True)
def matrix_kernel(a: np.ndarray, b: np.ndarray, kind: int) -> np.ndarray:
    n, m = a.shape[0], b.shape[0]
    out = np.empty((n, m))
    _fill_block(a, np.arange(n), n, b, 0, m, kind, out, new_work())
    return out


@numba.njit(cache=True)
def _block_sizes(
    pred_offsets: np.ndarray, gt_offsets: np.ndarray, gt_index: np.ndarray, max_pred: int
) -> tuple[int, int]:
    """Largest matched prediction count and largest ground-truth count over the candidates."""
    max_n = 0
    max_m = 0
    for c in range(pred_offsets.shape[0] - 1):
        n = min(pred_offsets[c + 1] - pred_offsets[c], max_pred)
        g = gt_index[c]
        m = gt_offsets[g + 1] - gt_offsets[g]
        max_n = max(max_n, n)
        max_m = max(max_m, m)
    return max_n, max_m


@numba.njit(cache=True)
def above_chance(iou: float, chance: float, floor: float) -> float:
    """``iou`` rescaled so that ``chance`` (the whole-image box's IoU with the true box) maps to 0
    and 1 stays 1; values below ``chance``, or below ``floor`` (a gate that leaves the credit of
    the IoUs it passes alone), give 0. A true box that is the whole image (``chance >= 1``) keeps
    its IoU."""
    if iou < floor:
        return 0.0
    if chance >= 1.0:
        return iou
    value = (iou - chance) / (1.0 - chance)
    return value if value > 0.0 else 0.0


# The most a blind layout of several boxes is credited with: objects about one grid tile in size
# are as well boxed by a grid as by an honest answer, and a chance near 1 would crush both.
MAX_LAYOUT_CHANCE = 0.5


@numba.njit(cache=True)
def blind_chance(whole: float, n_pred: int) -> float:
    """The IoU a blind layout of ``n_pred`` boxes reaches with a true box whose whole-image IoU is
    ``whole`` (its share of the image): an ``n_pred``-tile grid, whose tile holding the box has
    IoU ``n_pred * whole`` (the box fits in a tile) or ``1 / (n_pred * whole)`` (a tile fits in
    the box), capped at ``MAX_LAYOUT_CHANCE``, never below ``whole`` (one box: the whole image)."""
    x = n_pred * whole
    tile = x if x <= 1.0 else 1.0 / x
    return max(whole, min(tile, MAX_LAYOUT_CHANCE))


@numba.njit(cache=True)
def first_box_kernel(
    pred: np.ndarray,
    pred_offsets: np.ndarray,
    gt: np.ndarray,
    gt_offsets: np.ndarray,
    gt_index: np.ndarray,
    kind: int,
    chance: np.ndarray,
    floor: float,
) -> np.ndarray:
    """IoU of each candidate's first box with its sample's first; rescaled by ``above_chance``
    with ``chance[G]`` (one per true box) and gated at ``floor`` unless ``chance`` is empty."""
    n_cand = pred_offsets.shape[0] - 1
    out = np.zeros(n_cand)
    work = new_work()
    rescale = chance.shape[0] > 0
    for c in range(n_cand):
        g = gt_index[c]
        if pred_offsets[c + 1] > pred_offsets[c] and gt_offsets[g + 1] > gt_offsets[g]:
            value = _one_pair(pred, pred_offsets[c], gt, gt_offsets[g], kind, work)
            out[c] = above_chance(value, chance[gt_offsets[g]], floor) if rescale else value
    return out


@numba.njit(cache=True)
def multibox_kernel(
    pred: np.ndarray,
    pred_offsets: np.ndarray,
    gt: np.ndarray,
    gt_offsets: np.ndarray,
    gt_index: np.ndarray,
    kind: int,
    max_pred: int,
    chance: np.ndarray,
    extra_penalty: bool,
    floor: float,
) -> np.ndarray:
    """Optimal-assignment credit sum per candidate: divided by ``max(n_pred, n_gt)``, or with
    ``extra_penalty`` minus ``max(n_pred - n_gt, 0)`` and divided by ``n_gt``. A pair's credit is
    its IoU, rescaled by ``above_chance`` with ``blind_chance(chance[g], n_pred)`` (``chance[G]``
    the whole-image IoU of each true box) and gated at ``floor`` unless ``chance`` is empty."""
    n_cand = pred_offsets.shape[0] - 1
    out = np.zeros(n_cand)
    max_n, max_m = _block_sizes(pred_offsets, gt_offsets, gt_index, max_pred)
    short, long = min(max_n, max_m), max(max_n, max_m)
    iou = np.empty((max_n, max_m))
    cost = np.empty((short, long))
    rows = np.empty(max_n, dtype=np.int64)
    keep_rows = np.empty(max_n, dtype=np.int64)
    keep_cols = np.empty(max_m, dtype=np.int64)
    row_to_col = np.empty(short, dtype=np.int64)
    u = np.empty(short + 1)
    v = np.empty(long + 1)
    minv = np.empty(long + 1)
    owner = np.empty(long + 1, dtype=np.int64)
    way = np.empty(long + 1, dtype=np.int64)
    used = np.empty(long + 1, dtype=np.bool_)
    work = new_work()
    rescale = chance.shape[0] > 0
    for c in range(n_cand):
        p0 = pred_offsets[c]
        n_total = pred_offsets[c + 1] - p0
        g = gt_index[c]
        g0 = gt_offsets[g]
        m = gt_offsets[g + 1] - g0
        if n_total == 0 and m == 0:
            out[c] = 1.0  # nothing to find and nothing claimed
            continue
        if n_total == 0 or m == 0:
            continue
        n = min(n_total, max_pred)
        for i in range(n):
            rows[i] = p0 + i
        _fill_block(pred, rows, n, gt, g0, m, kind, iou, work)
        if rescale:
            for j in range(m):
                for i in range(n):
                    blind = blind_chance(chance[g0 + j], n_total)
                    iou[i, j] = above_chance(iou[i, j], blind, floor)
        r = 0
        for i in range(n):
            for j in range(m):
                if iou[i, j] > 0.0:
                    keep_rows[r] = i
                    r += 1
                    break
        if r == 0:
            continue
        k = 0
        for j in range(m):
            for i in range(n):
                if iou[i, j] > 0.0:
                    keep_cols[k] = j
                    k += 1
                    break
        total = 0.0
        if r == 1 or k == 1:
            # One side has a single overlapping box: the best single pair is optimal.
            for a in range(r):
                for b in range(k):
                    total = max(total, iou[keep_rows[a], keep_cols[b]])
        else:
            transpose = r > k
            nr, nc = (k, r) if transpose else (r, k)
            for a in range(nr):
                for b in range(nc):
                    if transpose:
                        cost[a, b] = -iou[keep_rows[b], keep_cols[a]]
                    else:
                        cost[a, b] = -iou[keep_rows[a], keep_cols[b]]
            hungarian(cost, nr, nc, row_to_col, u, v, minv, owner, way, used)
            for a in range(nr):
                total -= cost[a, row_to_col[a]]
        if extra_penalty:
            total = (total - max(n_total - m, 0)) / m
        else:
            total = total / max(n_total, m)
        out[c] = min(max(total, 0.0), 1.0)
    return out


@numba.njit(cache=True)
def prf_kernel(
    pred: np.ndarray,
    pred_offsets: np.ndarray,
    gt: np.ndarray,
    gt_offsets: np.ndarray,
    gt_index: np.ndarray,
    kind: int,
    threshold: float,
    max_pred: int,
) -> np.ndarray:
    """``[C, 3]`` precision, recall, F1 after greedy matching at ``threshold``."""
    n_cand = pred_offsets.shape[0] - 1
    out = np.zeros((n_cand, 3))
    max_n, max_m = _block_sizes(pred_offsets, gt_offsets, gt_index, max_pred)
    iou = np.empty((max_n, max_m))
    short = min(max_n, max_m)
    rows = np.empty(max_n, dtype=np.int64)
    match_rows = np.empty(short, dtype=np.int64)
    match_cols = np.empty(short, dtype=np.int64)
    row_taken = np.empty(max_n, dtype=np.bool_)
    col_taken = np.empty(max_m, dtype=np.bool_)
    work = new_work()
    for c in range(n_cand):
        p0 = pred_offsets[c]
        n_total = pred_offsets[c + 1] - p0
        g = gt_index[c]
        g0 = gt_offsets[g]
        m = gt_offsets[g + 1] - g0
        if n_total == 0 and m == 0:
            out[c, 0] = 1.0
            out[c, 1] = 1.0
            out[c, 2] = 1.0
            continue
        if n_total == 0 or m == 0:
            continue
        n = min(n_total, max_pred)
        for i in range(n):
            rows[i] = p0 + i
        _fill_block(pred, rows, n, gt, g0, m, kind, iou, work)
        tp = greedy_pairs(iou, n, m, threshold, match_rows, match_cols, row_taken, col_taken)
        out[c, 0] = tp / n_total
        out[c, 1] = tp / m
        out[c, 2] = 2.0 * tp / (n_total + m)
    return out


@numba.njit(cache=True)
def ap_kernel(
    pred: np.ndarray,
    scores: np.ndarray,
    pred_offsets: np.ndarray,
    gt: np.ndarray,
    gt_offsets: np.ndarray,
    gt_index: np.ndarray,
    kind: int,
    threshold: float,
    max_dets: int,
    recall_thresholds: np.ndarray,
) -> np.ndarray:
    """Per-candidate AP with the COCO protocol (pycocotools ``evaluateImg`` + ``accumulate``):
    detections by descending score (stable), the first ``max_dets`` kept, each matched to the
    free ground truth of highest IoU >= ``threshold`` (ties to the later one), the precision
    envelope sampled at ``recall_thresholds``."""
    n_cand = pred_offsets.shape[0] - 1
    out = np.zeros(n_cand)
    work = new_work()
    best_start = min(threshold, 1.0 - 1e-10)
    n_rec = recall_thresholds.shape[0]
    for c in range(n_cand):
        p0 = pred_offsets[c]
        n_total = pred_offsets[c + 1] - p0
        g = gt_index[c]
        g0 = gt_offsets[g]
        m = gt_offsets[g + 1] - g0
        if n_total == 0 and m == 0:
            out[c] = 1.0
            continue
        if n_total == 0 or m == 0:
            continue
        nd = min(n_total, max_dets)
        rows = np.argsort(-scores[p0 : p0 + n_total], kind="mergesort")[:nd] + p0
        iou = np.empty((nd, m))
        _fill_block(pred, rows, nd, gt, g0, m, kind, iou, work)
        gt_taken = np.zeros(m, dtype=np.bool_)
        tp_cum = np.empty(nd)
        fp_cum = np.empty(nd)
        tp = 0.0
        fp = 0.0
        for d in range(nd):
            best = best_start
            match = -1
            for j in range(m):
                if gt_taken[j]:
                    continue
                value = iou[d, j]
                if value < best:
                    continue
                best = value
                match = j
            if match >= 0:
                gt_taken[match] = True
                tp += 1.0
            else:
                fp += 1.0
            tp_cum[d] = tp
            fp_cum[d] = fp
        recall = tp_cum / m
        precision = tp_cum / (tp_cum + fp_cum)
        for d in range(nd - 1, 0, -1):
            if precision[d] > precision[d - 1]:
                precision[d - 1] = precision[d]
        total = 0.0
        for t in range(n_rec):
            idx = np.searchsorted(recall, recall_thresholds[t])
            if idx < nd:
                total += precision[idx]
        out[c] = total / n_rec
    return out
