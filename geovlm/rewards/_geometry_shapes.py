"""Scalar Numba kernels for one pair of boxes: axis-aligned IoU / GIoU / DIoU / CIoU and the IoU of
two convex polygons (rotated boxes and quadrilaterals) by Sutherland-Hodgman clipping in float64.

Shapes:
* ``xyxy`` rows: ``x1, y1, x2, y2``.
* Rotated rows: ``cx, cy, w, h, angle_deg``, the box's corners being
  ``(cx, cy) + R(angle) (±w/2, ±h/2)`` with ``R(a) = [[cos a, -sin a], [sin a, cos a]]``: the angle
  is counter-clockwise in a frame with y pointing up (as ``shapely.affinity.rotate``); on an image,
  whose y points down, the same numbers turn the box clockwise on screen (as OpenCV and mmrotate).
* Quadrilateral rows: ``x1, y1, ..., x4, y4`` (DOTA's 8-point polygons), in any vertex order and
  orientation: the convex hull of the four points is used, so a non-convex or self-intersecting
  quadrilateral is scored as its hull.

Rotated boxes and quadrilaterals are first *prepared* (``prepare_polygons``) into
``[N, PREP_COLS]`` rows ``cx, cy, n_vertices, area, radius, x0, y0, ..., x3, y3``, the vertices
counter-clockwise and relative to the centre ``(cx, cy)``. A pair is clipped in the frame of its
first box, so huge coordinates (1e7 px offsets) lose no precision, and each box's trigonometry is
paid once per array rather than once per pair. ``radius`` bounds the polygon for a cheap early exit.

Every value is finite and in ``[0, 1]``: a box with a zero or negative side, a collinear
quadrilateral, or any NaN / inf coordinate scores 0. GIoU / DIoU / CIoU (in ``[-1, 1]``, CIoU
slightly below) are rescaled to ``(v + 1) / 2`` and clamped, so that 0 stays the worst value.
"""

from __future__ import annotations

import math

import numba
import numpy as np

KIND_IOU = 0
KIND_GIOU = 1
KIND_DIOU = 2
KIND_CIOU = 3
KIND_POLYGON = 4

PREP_COLS = 13
# Sutherland-Hodgman on 4 + 4 vertices: each clip step at most doubles the vertex count even when
# rounding makes the subject slightly non-convex, so 4 * 2**4 bounds every intermediate polygon.
CLIP_CAPACITY = 64

_FOUR_OVER_PI_SQ = 4.0 / (math.pi * math.pi)


@numba.njit(cache=True)
def _clamp01(x: float) -> float:
    if x > 1.0:
        return 1.0
    if x > 0.0:
        return x
    return 0.0  # also NaN


@numba.njit(cache=True)
def iou_xyxy(a: np.ndarray, i: int, b: np.ndarray, j: int) -> float:
    """IoU of ``a[i]`` and ``b[j]`` (kept branch-light: it is the hot loop of most rewards)."""
    aw, ah = a[i, 2] - a[i, 0], a[i, 3] - a[i, 1]
    bw, bh = b[j, 2] - b[j, 0], b[j, 3] - b[j, 1]
    area_a, area_b = aw * ah, bw * bh
    # The `not (x > 0)` form also rejects NaN; finite areas rule out inf coordinates.
    if not (aw > 0.0 and ah > 0.0 and bw > 0.0 and bh > 0.0):
        return 0.0
    if not (math.isfinite(area_a) and math.isfinite(area_b)):
        return 0.0
    iw = min(a[i, 2], b[j, 2]) - max(a[i, 0], b[j, 0])
    ih = min(a[i, 3], b[j, 3]) - max(a[i, 1], b[j, 1])
    if not (iw > 0.0 and ih > 0.0):
        return 0.0
    inter = iw * ih
    return _clamp01(inter / (area_a + area_b - inter))


@numba.njit(cache=True)
def xyxy_metric(a: np.ndarray, i: int, b: np.ndarray, j: int, kind: int) -> float:
    """Rescaled GIoU / DIoU / CIoU (``kind``) of ``a[i]`` and ``b[j]``."""
    ax1, ay1, ax2, ay2 = a[i, 0], a[i, 1], a[i, 2], a[i, 3]
    bx1, by1, bx2, by2 = b[j, 0], b[j, 1], b[j, 2], b[j, 3]
    aw, ah = ax2 - ax1, ay2 - ay1
    bw, bh = bx2 - bx1, by2 - by1
    area_a, area_b = aw * ah, bw * bh
    if not (aw > 0.0 and ah > 0.0 and bw > 0.0 and bh > 0.0):
        return 0.0
    if not (math.isfinite(area_a) and math.isfinite(area_b)):
        return 0.0
    iw = min(ax2, bx2) - max(ax1, bx1)
    ih = min(ay2, by2) - max(ay1, by1)
    inter = iw * ih if (iw > 0.0 and ih > 0.0) else 0.0
    union = area_a + area_b - inter
    iou = _clamp01(inter / union)
    cw = max(ax2, bx2) - min(ax1, bx1)
    ch = max(ay2, by2) - min(ay1, by1)
    if kind == KIND_GIOU:
        enclosing = cw * ch
        value = iou - (enclosing - union) / enclosing
    else:
        diag_sq = cw * cw + ch * ch
        dx = 0.5 * ((bx1 + bx2) - (ax1 + ax2))
        dy = 0.5 * ((by1 + by2) - (ay1 + ay2))
        value = iou - (dx * dx + dy * dy) / diag_sq
        if kind == KIND_CIOU:
            dv = math.atan(bw / bh) - math.atan(aw / ah)
            v = _FOUR_OVER_PI_SQ * dv * dv
            denom = (1.0 - iou) + v
            # Identical aspect ratios and IoU 1 make alpha 0/0; the penalty is 0 there.
            if denom > 0.0:
                value -= v * v / denom
    return _clamp01(0.5 * (value + 1.0))


@numba.njit(cache=True)
def _cos_sin_degrees(angle: float) -> tuple[float, float]:
    """cos and sin of an angle in degrees, reduced exactly mod 360, exact at multiples of 90."""
    t = np.fmod(angle, 360.0)
    if t < 0.0:
        t += 360.0
    if t == 0.0:
        return 1.0, 0.0
    if t == 90.0:
        return 0.0, 1.0
    if t == 180.0:
        return -1.0, 0.0
    if t == 270.0:
        return 0.0, -1.0
    r = t * (math.pi / 180.0)
    return math.cos(r), math.sin(r)


@numba.njit(cache=True)
def _prepare_rotated(box: np.ndarray, out: np.ndarray) -> None:
    cx, cy, w, h, angle = box[0], box[1], box[2], box[3], box[4]
    out[0] = cx
    out[1] = cy
    area = w * h
    ok = (
        w > 0.0
        and h > 0.0
        and math.isfinite(cx)
        and math.isfinite(cy)
        and math.isfinite(angle)
        and math.isfinite(area)
    )
    if not ok:
        out[2] = 0.0
        out[3] = 0.0
        return
    c, s = _cos_sin_degrees(angle)
    hw, hh = 0.5 * w, 0.5 * h
    # Local corners (-,-), (+,-), (+,+), (-,+) are counter-clockwise; a rotation keeps that.
    sx = (-1.0, 1.0, 1.0, -1.0)
    sy = (-1.0, -1.0, 1.0, 1.0)
    for k in range(4):
        lx, ly = sx[k] * hw, sy[k] * hh
        out[5 + 2 * k] = c * lx - s * ly
        out[6 + 2 * k] = s * lx + c * ly
    out[2] = 4.0
    out[3] = area
    out[4] = math.sqrt(hw * hw + hh * hh)


@numba.njit(cache=True)
def _cross(ox: float, oy: float, ax: float, ay: float, bx: float, by: float) -> float:
    return (ax - ox) * (by - oy) - (ay - oy) * (bx - ox)


@numba.njit(cache=True)
def _prepare_quad(box: np.ndarray, out: np.ndarray, scratch: np.ndarray) -> None:
    out[2] = 0.0
    out[3] = 0.0
    for k in range(8):
        if not math.isfinite(box[k]):
            out[0] = 0.0
            out[1] = 0.0
            return
    cx = 0.25 * (box[0] + box[2] + box[4] + box[6])
    cy = 0.25 * (box[1] + box[3] + box[5] + box[7])
    out[0] = cx
    out[1] = cy
    xs, ys, hx, hy = scratch[0], scratch[1], scratch[2], scratch[3]
    for k in range(4):
        xs[k] = box[2 * k] - cx
        ys[k] = box[2 * k + 1] - cy
    # Andrew's monotone chain on four points (insertion sort by x then y), collinear points dropped.
    for k in range(1, 4):
        x, y = xs[k], ys[k]
        m = k - 1
        while m >= 0 and (xs[m] > x or (xs[m] == x and ys[m] > y)):
            xs[m + 1] = xs[m]
            ys[m + 1] = ys[m]
            m -= 1
        xs[m + 1] = x
        ys[m + 1] = y
    n = 0
    for k in range(4):
        while n >= 2 and _cross(hx[n - 2], hy[n - 2], hx[n - 1], hy[n - 1], xs[k], ys[k]) <= 0.0:
            n -= 1
        hx[n] = xs[k]
        hy[n] = ys[k]
        n += 1
    lower = n + 1
    for k in range(2, -1, -1):
        while (
            n >= lower and _cross(hx[n - 2], hy[n - 2], hx[n - 1], hy[n - 1], xs[k], ys[k]) <= 0.0
        ):
            n -= 1
        hx[n] = xs[k]
        hy[n] = ys[k]
        n += 1
    n -= 1  # the chain ends where it started
    if n < 3:
        return
    area = 0.0
    radius_sq = 0.0
    for k in range(n):
        k1 = (k + 1) % n
        area += hx[k] * hy[k1] - hx[k1] * hy[k]
        radius_sq = max(radius_sq, hx[k] * hx[k] + hy[k] * hy[k])
        out[5 + 2 * k] = hx[k]
        out[6 + 2 * k] = hy[k]
    area *= 0.5
    if not (area > 0.0 and math.isfinite(area)):
        return
    out[2] = float(n)
    out[3] = area
    out[4] = math.sqrt(radius_sq)


@numba.njit(cache=True)
def prepare_row(box: np.ndarray, out: np.ndarray, scratch: np.ndarray) -> None:
    """One ``[5]`` rotated or ``[8]`` quadrilateral row into ``out`` ``[PREP_COLS]``;
    ``scratch`` is ``[4, 8]``."""
    for k in range(PREP_COLS):
        out[k] = 0.0
    if box.shape[0] == 5:
        _prepare_rotated(box, out)
    else:
        _prepare_quad(box, out, scratch)


@numba.njit(cache=True)
def prepare_polygons(boxes: np.ndarray) -> np.ndarray:
    """``[N, 5]`` rotated or ``[N, 8]`` quadrilateral rows -> ``[N, PREP_COLS]`` prepared rows."""
    n = boxes.shape[0]
    out = np.empty((n, PREP_COLS))
    scratch = np.empty((4, 8))
    for i in range(n):
        prepare_row(boxes[i], out[i], scratch)
    return out


@numba.njit(cache=True)
def polygon_iou(p: np.ndarray, i: int, q: np.ndarray, j: int, work: np.ndarray) -> float:
    """IoU of prepared polygons ``p[i]`` and ``q[j]``; ``work`` is a ``[3, CLIP_CAPACITY * 2]``
    scratch buffer (reused across calls so the inner loop allocates nothing)."""
    area_p, area_q = p[i, 3], q[j, 3]
    if not (area_p > 0.0 and area_q > 0.0):
        return 0.0
    dx = q[j, 0] - p[i, 0]
    dy = q[j, 1] - p[i, 1]
    reach = p[i, 4] + q[j, 4]
    if not (dx * dx + dy * dy < reach * reach):
        return 0.0
    same = True
    for k in range(PREP_COLS):
        if p[i, k] != q[j, k]:
            same = False
            break
    if same:
        return 1.0  # clipping a polygon by itself leaves rounding residue; identity is exact.
    src = work[0]
    dst = work[1]
    side = work[2]
    n = int(p[i, 2])
    for k in range(2 * n):
        src[k] = p[i, 5 + k]
    m = int(q[j, 2])
    for e in range(m):
        e1 = (e + 1) % m
        qx0, qy0 = q[j, 5 + 2 * e] + dx, q[j, 6 + 2 * e] + dy
        ex, ey = q[j, 5 + 2 * e1] + dx - qx0, q[j, 6 + 2 * e1] + dy - qy0
        for k in range(n):
            side[k] = ex * (src[2 * k + 1] - qy0) - ey * (src[2 * k] - qx0)
        out = 0
        for k in range(n):
            kp = k - 1 if k > 0 else n - 1
            s_cur, s_prev = side[k], side[kp]
            if (s_cur >= 0.0) != (s_prev >= 0.0):
                t = s_prev / (s_prev - s_cur)
                dst[2 * out] = src[2 * kp] + t * (src[2 * k] - src[2 * kp])
                dst[2 * out + 1] = src[2 * kp + 1] + t * (src[2 * k + 1] - src[2 * kp + 1])
                out += 1
            if s_cur >= 0.0:
                dst[2 * out] = src[2 * k]
                dst[2 * out + 1] = src[2 * k + 1]
                out += 1
        if out < 3:
            return 0.0
        src, dst = dst, src
        n = out
    twice_area = 0.0
    for k in range(n):
        k1 = k + 1 if k + 1 < n else 0
        twice_area += src[2 * k] * src[2 * k1 + 1] - src[2 * k1] * src[2 * k + 1]
    inter = min(max(0.5 * twice_area, 0.0), area_p, area_q)
    return _clamp01(inter / (area_p + area_q - inter))


@numba.njit(cache=True)
def new_work() -> np.ndarray:
    """Scratch buffer for ``polygon_iou``."""
    return np.empty((3, 2 * CLIP_CAPACITY))
