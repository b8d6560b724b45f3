"""Geometry rewards (``geovlm.rewards.geometry``, Numba, float64) against shapely, pycocotools,
numpy and the per-sample Python loops of VLM-R1-style reward functions.

pytest-benchmark groups (``make bench``, or ``pytest benchmarks/bench_rewards_geometry.py``),
each ours and its anchors on the same inputs, checked to agree before they are timed:

- rotated ``iou_pairs`` (10,000 pairs, half overlapping) and ``iou_matrix`` (300 x 300): shapely 2's
  vectorised ``intersection`` / ``area`` on prebuilt polygons, and built from the ``[N, 5]`` arrays;
- axis-aligned ``iou_matrix`` (1,000 x 1,000): pycocotools ``mask.iou`` and a numpy broadcast;
  ``iou_pairs`` (the same 1,000 pairs): numpy elementwise;
- the realistic GRPO reward batch: 64 prompts x G = 16 candidates, each with 1-10 predicted
  boxes against its prompt's 1-10 ground-truth boxes on a 1000 x 1000 image (candidates share
  their prompt's ground truth through ``sample_index``): ``multibox_reward`` (Python-float IoU
  per pair + scipy ``linear_sum_assignment``; rotated: shapely polygons + scipy),
  ``detection_prf`` (Python greedy matching), ``average_precision`` (pycocotools ``COCOeval``
  per candidate, boxes ranked in the order given), ``first_box_iou`` (Python loop).
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import shapely
from _compare import Case, anchor, close, ours, time_method
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from scipy.optimize import linear_sum_assignment

from geovlm.rewards import geometry as geo

PROMPTS, GROUP, MAX_BOXES = 64, 16, 10
BATCH_SHAPE = f"{PROMPTS}x{GROUP} cands, 1-{MAX_BOXES} vs 1-{MAX_BOXES} boxes"


def realistic_batch(rng: np.random.Generator, rotated: bool):
    """CSR predictions of PROMPTS * GROUP candidates and the per-prompt ground truth:
    ``(pred, pred_offsets, preds, gt, gt_offsets, gts, sample_index)``."""
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
                # Noise may swap a small box's corners: keep x1 <= x2, y1 <= y2, the only boxes
                # pycocotools defines an IoU for.
                pred = np.column_stack([np.minimum(pred[:, :2], pred[:, 2:]),
                                        np.maximum(pred[:, :2], pred[:, 2:])])
            preds.append(pred)
    pred_off = np.concatenate([[0], np.cumsum([len(p) for p in preds])]).astype(np.int64)
    gt_off = np.concatenate([[0], np.cumsum([len(g) for g in gts])]).astype(np.int64)
    sample_index = np.repeat(np.arange(PROMPTS), GROUP)
    return np.concatenate(preds), pred_off, preds, np.concatenate(gts), gt_off, gts, sample_index


# --------------------------------------------------------------------------- anchors


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
        p, g = pred.tolist(), gts[s].tolist()
        iou = np.array([[python_iou(x, y) for y in g] for x in p])
        r, c = linear_sum_assignment(iou, maximize=True)
        out.append(float(iou[r, c].sum()) / max(len(p), len(g)))
    return out


def python_prf(preds, gts, sample_index, threshold=0.5) -> list[float]:
    """F1 of greedy matching by decreasing IoU, per candidate."""
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


def coco_average_precision(preds, gts, sample_index, threshold=0.5) -> list[float]:
    """pycocotools' AP (one image, one class, 101-point interpolation) per candidate, its boxes
    ranked in the order given (descending scores), as ``geo.average_precision(..., None, ...)``."""

    def annotation(k, box, **extra):
        x1, y1, x2, y2 = (float(v) for v in box)
        return {"id": k + 1, "image_id": 1, "category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": (x2 - x1) * (y2 - y1), "iscrowd": 0, **extra}

    out = []
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        for pred, s in zip(preds, sample_index, strict=True):
            truth = COCO()
            truth.dataset = {"images": [{"id": 1}], "categories": [{"id": 1}],
                             "annotations": [annotation(k, b) for k, b in enumerate(gts[s])]}
            truth.createIndex()
            detections = truth.loadRes([annotation(k, b, score=1.0 - k / len(pred))
                                        for k, b in enumerate(pred)])
            evaluation = COCOeval(truth, detections, "bbox")
            evaluation.params.iouThrs = np.array([threshold])
            evaluation.params.maxDets = [100]
            evaluation.params.areaRng = [[0.0, 1e10]]
            evaluation.params.areaRngLbl = ["all"]
            evaluation.evaluate()
            evaluation.accumulate()
            precision = evaluation.eval["precision"][0, :, 0, 0, 0]
            out.append(float(precision[precision > -1].mean()))
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


def xywh(boxes: np.ndarray) -> np.ndarray:
    return np.column_stack([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]])


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


# --------------------------------------------------------------------------- inputs


@pytest.fixture(scope="module")
def rotated_boxes():
    """10,000 rotated boxes and a perturbed copy (about half the pairs overlap)."""
    rng = np.random.default_rng(0)
    n = 10_000
    a = np.column_stack(
        [rng.uniform(0, 100, (n, 2)), rng.uniform(2, 30, (n, 2)), rng.uniform(-180, 180, n)]
    )
    b = a + np.column_stack([rng.normal(0, 8, (n, 2)), np.zeros((n, 2)), rng.normal(0, 20, n)])
    return a, b, shapely_polygons(a), shapely_polygons(b)


@pytest.fixture(scope="module")
def xyxy_boxes():
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 900, (1000, 2))
    x = np.column_stack([x, x + rng.uniform(5, 100, (1000, 2))])
    return x, x[::-1] + rng.normal(0, 5, x.shape)


@pytest.fixture(scope="module")
def xyxy_batch():
    return realistic_batch(np.random.default_rng(2), rotated=False)


@pytest.fixture(scope="module")
def rotated_batch():
    return realistic_batch(np.random.default_rng(3), rotated=True)


# --------------------------------------------------------------------------- groups
# Each fixture is one group (built once, so the reference anchor's result is computed once); the
# test below it times each of its methods.


@pytest.fixture(scope="module")
def rotated_iou_pairs(rotated_boxes):
    a, b, pa, pb = rotated_boxes
    return Case("rotated iou_pairs", f"{len(a):,} pairs", {
        "ours": ours(lambda: geo.iou_pairs(a, b)),
        "shapely prebuilt polygons": anchor(lambda: shapely_iou(pa, pb)),
        "shapely from [N,5] arrays": anchor(
            lambda: shapely_iou(shapely_polygons(a), shapely_polygons(b))),
    }, close(atol=1e-9))


@pytest.mark.parametrize("method", ["ours", "shapely prebuilt polygons",
                                    "shapely from [N,5] arrays"])
def test_rotated_iou_pairs(benchmark, rotated_iou_pairs, method):
    time_method(benchmark, rotated_iou_pairs, method)


@pytest.fixture(scope="module")
def rotated_iou_matrix(rotated_boxes):
    a, b, pa, pb = rotated_boxes
    m = 300
    return Case("rotated iou_matrix", f"{m}x{m}", {
        "ours": ours(lambda: geo.iou_matrix(a[:m], b[:m])),
        "shapely prebuilt polygons": anchor(lambda: shapely_iou(pa[:m, None], pb[None, :m])),
    }, close(atol=1e-9))


@pytest.mark.parametrize("method", ["ours", "shapely prebuilt polygons"])
def test_rotated_iou_matrix(benchmark, rotated_iou_matrix, method):
    time_method(benchmark, rotated_iou_matrix, method)


@pytest.fixture(scope="module")
def xyxy_iou_matrix(xyxy_boxes):
    x, y = xyxy_boxes
    xw, yw, crowd = xywh(x), xywh(y), np.zeros(len(y), np.uint8)
    return Case("xyxy iou_matrix", f"{len(x):,}x{len(y):,}", {
        "ours": ours(lambda: geo.iou_matrix(x, y)),
        "pycocotools mask.iou": anchor(lambda: coco_mask.iou(xw, yw, crowd)),
        "numpy broadcast": anchor(lambda: numpy_iou_matrix(x, y)),
    }, close(atol=1e-12))


@pytest.mark.parametrize("method", ["ours", "pycocotools mask.iou", "numpy broadcast"])
def test_xyxy_iou_matrix(benchmark, xyxy_iou_matrix, method):
    time_method(benchmark, xyxy_iou_matrix, method)


@pytest.fixture(scope="module")
def xyxy_iou_pairs(xyxy_boxes):
    x, y = xyxy_boxes
    return Case("xyxy iou_pairs", f"{len(x):,} pairs", {
        "ours": ours(lambda: geo.iou_pairs(x, y)),
        "numpy elementwise": anchor(lambda: numpy_iou_pairs(x, y)),
    }, close(atol=1e-12))


@pytest.mark.parametrize("method", ["ours", "numpy elementwise"])
def test_xyxy_iou_pairs(benchmark, xyxy_iou_pairs, method):
    time_method(benchmark, xyxy_iou_pairs, method)


@pytest.fixture(scope="module")
def multibox_reward_xyxy(xyxy_batch):
    pred, pred_off, preds, gt, gt_off, gts, sidx = xyxy_batch
    return Case("multibox_reward xyxy", BATCH_SHAPE, {
        "ours": ours(lambda: geo.multibox_reward(pred, pred_off, gt, gt_off, sample_index=sidx)),
        "python loop + scipy": anchor(lambda: python_multibox(preds, gts, sidx)),
    }, close(atol=1e-12))


@pytest.mark.parametrize("method", ["ours", "python loop + scipy"])
def test_multibox_reward_xyxy(benchmark, multibox_reward_xyxy, method):
    time_method(benchmark, multibox_reward_xyxy, method)


@pytest.fixture(scope="module")
def detection_prf_xyxy(xyxy_batch):
    pred, pred_off, preds, gt, gt_off, gts, sidx = xyxy_batch
    return Case("detection_prf xyxy (F1)", BATCH_SHAPE, {
        "ours": ours(lambda: geo.detection_prf(pred, pred_off, gt, gt_off, sample_index=sidx)[2]),
        "python loop, greedy": anchor(lambda: python_prf(preds, gts, sidx)),
    }, close(atol=1e-12))


@pytest.mark.parametrize("method", ["ours", "python loop, greedy"])
def test_detection_prf_xyxy(benchmark, detection_prf_xyxy, method):
    time_method(benchmark, detection_prf_xyxy, method)


@pytest.fixture(scope="module")
def average_precision_xyxy(xyxy_batch):
    pred, pred_off, preds, gt, gt_off, gts, sidx = xyxy_batch
    return Case("average_precision xyxy", BATCH_SHAPE, {
        "ours": ours(lambda: geo.average_precision(pred, None, pred_off, gt, gt_off,
                                                   sample_index=sidx)),
        # About 3 ms a candidate, seconds a call: a few rounds are enough.
        "pycocotools COCOeval per candidate": anchor(
            lambda: coco_average_precision(preds, gts, sidx), rounds=3),
    }, close(atol=1e-12))


@pytest.mark.parametrize("method", ["ours", "pycocotools COCOeval per candidate"])
def test_average_precision_xyxy(benchmark, average_precision_xyxy, method):
    time_method(benchmark, average_precision_xyxy, method)


@pytest.fixture(scope="module")
def first_box_iou_xyxy(xyxy_batch):
    pred, pred_off, preds, gt, gt_off, gts, sidx = xyxy_batch
    return Case("first_box_iou xyxy", f"{len(preds):,} cands", {
        "ours": ours(lambda: geo.first_box_iou(pred, pred_off, gt, gt_off, sample_index=sidx)),
        "python loop": anchor(lambda: [python_iou(p[0].tolist(), gts[s][0].tolist())
                                       for p, s in zip(preds, sidx, strict=True)]),
    }, close(atol=1e-12))


@pytest.mark.parametrize("method", ["ours", "python loop"])
def test_first_box_iou_xyxy(benchmark, first_box_iou_xyxy, method):
    time_method(benchmark, first_box_iou_xyxy, method)


@pytest.fixture(scope="module")
def multibox_reward_rotated(rotated_batch):
    pred, pred_off, preds, gt, gt_off, gts, sidx = rotated_batch
    return Case("multibox_reward rotated", BATCH_SHAPE, {
        "ours": ours(lambda: geo.multibox_reward(pred, pred_off, gt, gt_off, sample_index=sidx)),
        "python loop, shapely + scipy": anchor(lambda: shapely_multibox(preds, gts, sidx)),
    }, close(atol=1e-9))


@pytest.mark.parametrize("method", ["ours", "python loop, shapely + scipy"])
def test_multibox_reward_rotated(benchmark, multibox_reward_rotated, method):
    time_method(benchmark, multibox_reward_rotated, method)
