"""Benchmark geovlm.rewards.geometry against shapely 2's vectorised ufuncs, a numpy reference and
a per-sample Python loop in the style of VLM-R1's rewards (Python-float IoU per candidate, scipy
for the assignment).

Run: ``python benchmarks/bench_rewards_geometry.py [--quick]``. Prints one table row per case:
median time of ours, of the anchor measured in the same run on the same inputs, and their ratio;
then the first-call cost (Numba compile with an empty cache, and load from a warm disk cache),
each measured in a fresh subprocess.

Realistic batch: 64 prompts x G = 16 candidates, each with 1-10 predicted boxes, against 1-10
ground-truth boxes per prompt on a 1000 x 1000 image (candidates share their prompt's ground truth
through ``sample_index``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np
import shapely
from scipy.optimize import linear_sum_assignment

from geovlm.rewards import geometry as geo

PROMPTS, GROUP, MAX_BOXES = 64, 16, 10


def median_time(fn, repeats: int, inner: int = 1) -> tuple[float, float]:
    """Median and minimum seconds per call over ``repeats`` timings of ``inner`` calls each (the
    minimum shows the uncontended cost when other processes share the cores)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - start) / inner)
    return statistics.median(times), min(times)


def realistic_batch(rng, rotated: bool):
    """CSR predictions of PROMPTS * GROUP candidates and the per-prompt ground truth."""
    gts, preds = [], []
    for _ in range(PROMPTS):
        k = int(rng.integers(1, MAX_BOXES + 1))
        centre = rng.uniform(50, 950, (k, 2))
        size = rng.uniform(10, 120, (k, 2))
        if rotated:
            gt = np.column_stack([centre, size, rng.uniform(-90, 90, k)])
        else:
            gt = np.column_stack([centre - size / 2, centre + size / 2])
        gts.append(gt)
        for _ in range(GROUP):
            n = int(rng.integers(1, MAX_BOXES + 1))
            pick = gt[rng.integers(0, k, n)]
            noise = rng.normal(0, 6.0, pick.shape)
            if rotated:
                noise[:, 2:4] = np.abs(noise[:, 2:4])
                noise[:, 4] *= 2.0
            pred = pick + noise
            fresh = rng.uniform(size=n) < 0.25  # some boxes on nothing
            if rotated:
                pred[fresh, :2] = rng.uniform(50, 950, (fresh.sum(), 2))
            else:
                pred[fresh] += rng.uniform(-400, 400, (fresh.sum(), 1))
            preds.append(pred)
    pred_off = np.concatenate([[0], np.cumsum([len(p) for p in preds])]).astype(np.int64)
    gt_off = np.concatenate([[0], np.cumsum([len(g) for g in gts])]).astype(np.int64)
    sample_index = np.repeat(np.arange(PROMPTS), GROUP)
    return np.concatenate(preds), pred_off, preds, np.concatenate(gts), gt_off, gts, sample_index


def python_iou(a, b) -> float:
    """VLM-R1's style: one pair of xyxy boxes in Python floats."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def python_multibox(preds, gts, sample_index) -> list[float]:
    out = []
    for pred, s in zip(preds, sample_index, strict=True):
        gt = gts[s]
        p, g = pred.tolist(), gt.tolist()
        iou = np.array([[python_iou(x, y) for y in g] for x in p])
        r, c = linear_sum_assignment(iou, maximize=True)
        out.append(float(iou[r, c].sum()) / max(len(p), len(g)))
    return out


def python_prf(preds, gts, sample_index, threshold=0.5) -> list[float]:
    out = []
    for pred, s in zip(preds, sample_index, strict=True):
        p, g = pred.tolist(), gts[s].tolist()
        pairs = sorted(
            ((python_iou(x, y), i, j) for i, x in enumerate(p) for j, y in enumerate(g)),
            reverse=True,
        )
        used_p, used_g, tp = set(), set(), 0
        for value, i, j in pairs:
            if value < threshold:
                break
            if i not in used_p and j not in used_g:
                used_p.add(i)
                used_g.add(j)
                tp += 1
        out.append(2 * tp / (len(p) + len(g)))
    return out


def shapely_polygons(rotated: np.ndarray):
    return shapely.polygons(geo.rotated_to_quad(rotated).reshape(-1, 4, 2))


def shapely_iou(pa, pb):
    inter = shapely.area(shapely.intersection(pa, pb))
    return inter / (shapely.area(pa) + shapely.area(pb) - inter)


def shapely_multibox(preds, gts, sample_index) -> list[float]:
    polys = [shapely_polygons(g) for g in gts]
    out = []
    for pred, s in zip(preds, sample_index, strict=True):
        pp, gp = shapely_polygons(pred), polys[s]
        iou = shapely_iou(pp[:, None], gp[None, :])
        r, c = linear_sum_assignment(iou, maximize=True)
        out.append(float(iou[r, c].sum()) / max(len(pred), len(gp)))
    return out


def numpy_iou_matrix(a, b):
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def numpy_iou_pairs(a, b):
    iw = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = iw * ih
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_a + area_b - inter)


FIRST_CALL = textwrap.dedent(
    """
    import time
    t0 = time.perf_counter()
    import numpy as np
    from geovlm.rewards import geometry as geo
    t1 = time.perf_counter()
    x = np.array([[0, 0, 2, 2], [1, 1, 3, 3.0]])
    r = geo.xyxy_to_rotated(x)
    off = np.array([0, 2])
    for boxes in (x, r):
        geo.iou_pairs(boxes, boxes)
        geo.iou_matrix(boxes, boxes)
        geo.first_box_iou(boxes, off, boxes, off)
        geo.multibox_reward(boxes, off, boxes, off)
        geo.detection_prf(boxes, off, boxes, off)
        geo.average_precision(boxes, None, off, boxes, off)
    geo.iou_pairs(x, x, "ciou")
    geo.linear_assignment(np.ones((2, 3)))
    geo.greedy_match(np.ones((2, 3)))
    t2 = time.perf_counter()
    print(t1 - t0, t2 - t1)
    """
)


def first_call_seconds(cache_dir: str) -> tuple[float, float]:
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    out = subprocess.run(
        [sys.executable, "-c", FIRST_CALL], env=env, capture_output=True, text=True, check=True
    )
    imp, call = out.stdout.split()
    return float(imp), float(call)


def fmt(times: tuple[float, float]) -> str:
    return f"{times[0] * 1e3:.3f} ({times[1] * 1e3:.3f}) ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    reps = 5 if args.quick else 21
    rng = np.random.default_rng(0)
    rows = []

    def row(case, shape, ours, anchor_name, anchor):
        rows.append((case, shape, ours, anchor_name, anchor, anchor[0] / ours[0]))

    # Rotated IoU, elementwise pairs (half of them overlapping).
    n = 10_000
    a = np.column_stack(
        [rng.uniform(0, 100, (n, 2)), rng.uniform(2, 30, (n, 2)), rng.uniform(-180, 180, n)]
    )
    b = a + np.column_stack([rng.normal(0, 8, (n, 2)), np.zeros((n, 2)), rng.normal(0, 20, n)])
    pa, pb = shapely_polygons(a), shapely_polygons(b)
    np.testing.assert_allclose(geo.iou_pairs(a, b), shapely_iou(pa, pb), atol=1e-9)
    ours = median_time(lambda: geo.iou_pairs(a, b), reps)
    row(
        "rotated iou_pairs",
        f"{n} pairs",
        ours,
        "shapely prebuilt polygons",
        median_time(lambda: shapely_iou(pa, pb), max(3, reps // 4)),
    )
    row(
        "rotated iou_pairs",
        f"{n} pairs",
        ours,
        "shapely from [N,5] arrays",
        median_time(
            lambda: shapely_iou(shapely_polygons(a), shapely_polygons(b)), max(3, reps // 4)
        ),
    )
    m = 300
    ours = median_time(lambda: geo.iou_matrix(a[:m], b[:m]), reps)
    row(
        "rotated iou_matrix",
        f"{m}x{m}",
        ours,
        "shapely prebuilt polygons",
        median_time(lambda: shapely_iou(pa[:m, None], pb[None, :m]), max(3, reps // 4)),
    )

    # Axis-aligned IoU matrix.
    x = rng.uniform(0, 900, (1000, 2))
    x = np.column_stack([x, x + rng.uniform(5, 100, (1000, 2))])
    y = x[::-1] + rng.normal(0, 5, x.shape)
    np.testing.assert_allclose(geo.iou_matrix(x, y), numpy_iou_matrix(x, y), atol=1e-12)
    row(
        "xyxy iou_matrix",
        "1000x1000",
        median_time(lambda: geo.iou_matrix(x, y), reps),
        "numpy broadcast",
        median_time(lambda: numpy_iou_matrix(x, y), reps),
    )
    xp, yp = x[:1024], y[:1024]
    np.testing.assert_allclose(geo.iou_pairs(xp, yp), numpy_iou_pairs(xp, yp), atol=1e-12)
    row(
        "xyxy iou_pairs",
        "1024 pairs",
        median_time(lambda: geo.iou_pairs(xp, yp), reps, inner=50),
        "numpy elementwise",
        median_time(lambda: numpy_iou_pairs(xp, yp), reps, inner=50),
    )

    # The realistic GRPO reward batch.
    pred, pred_off, preds, gt, gt_off, gts, sidx = realistic_batch(rng, rotated=False)
    shape = f"{PROMPTS}x{GROUP} cands, <={MAX_BOXES} vs <={MAX_BOXES} boxes"
    got = geo.multibox_reward(pred, pred_off, gt, gt_off, sample_index=sidx)
    np.testing.assert_allclose(got, python_multibox(preds, gts, sidx), atol=1e-12)
    row(
        "multibox_reward xyxy",
        shape,
        median_time(
            lambda: geo.multibox_reward(pred, pred_off, gt, gt_off, sample_index=sidx),
            reps,
            inner=5,
        ),
        "python loop + scipy",
        median_time(lambda: python_multibox(preds, gts, sidx), max(3, reps // 4)),
    )
    f1 = geo.detection_prf(pred, pred_off, gt, gt_off, sample_index=sidx)[2]
    np.testing.assert_allclose(f1, python_prf(preds, gts, sidx), atol=1e-12)
    row(
        "detection_prf xyxy",
        shape,
        median_time(
            lambda: geo.detection_prf(pred, pred_off, gt, gt_off, sample_index=sidx), reps, inner=5
        ),
        "python loop greedy",
        median_time(lambda: python_prf(preds, gts, sidx), max(3, reps // 4)),
    )
    ap = lambda: geo.average_precision(pred, None, pred_off, gt, gt_off, sample_index=sidx)
    row(
        "average_precision xyxy",
        shape,
        median_time(ap, reps, inner=5),
        "python loop + scipy (multibox)",
        median_time(lambda: python_multibox(preds, gts, sidx), max(3, reps // 4)),
    )
    fb = lambda: geo.first_box_iou(pred, pred_off, gt, gt_off, sample_index=sidx)
    first_py = lambda: [
        python_iou(p[0].tolist(), gts[s][0].tolist()) for p, s in zip(preds, sidx, strict=True)
    ]
    row(
        "first_box_iou xyxy",
        f"{PROMPTS * GROUP} cands",
        median_time(fb, reps, inner=20),
        "python loop",
        median_time(first_py, reps),
    )

    pred, pred_off, preds, gt, gt_off, gts, sidx = realistic_batch(rng, rotated=True)
    got = geo.multibox_reward(pred, pred_off, gt, gt_off, sample_index=sidx)
    np.testing.assert_allclose(got, shapely_multibox(preds, gts, sidx), atol=1e-9)
    row(
        "multibox_reward rotated",
        shape,
        median_time(
            lambda: geo.multibox_reward(pred, pred_off, gt, gt_off, sample_index=sidx),
            reps,
            inner=5,
        ),
        "python loop shapely + scipy",
        median_time(lambda: shapely_multibox(preds, gts, sidx), max(3, reps // 4)),
    )

    width = max(len(r[0]) for r in rows)
    shape_w = max(len(r[1]) for r in rows)
    anchor_w = max(len(r[3]) for r in rows)
    print(
        f"{'case':<{width}}  {'shape':<{shape_w}}  {'ours median (min)':>21}  "
        f"{'anchor':<{anchor_w}}  {'anchor median (min)':>21}  {'ratio':>7}"
    )
    for case, shp, ours, anchor_name, anchor, ratio in rows:
        print(
            f"{case:<{width}}  {shp:<{shape_w}}  {fmt(ours):>21}  {anchor_name:<{anchor_w}}  "
            f"{fmt(anchor):>21}  {ratio:>6.1f}x"
        )

    with tempfile.TemporaryDirectory() as cache:
        cold_import, cold = first_call_seconds(cache)
        warm_import, warm = first_call_seconds(cache)
    print(
        f"first call of every public function: compile {cold:.2f} s (empty Numba cache), "
        f"{warm:.2f} s from the disk cache; import {cold_import:.2f} s / {warm_import:.2f} s"
    )


if __name__ == "__main__":
    main()
