"""geovlm.rewards.geometry against oracles: shapely (rotated / polygon IoU, bounds, rotation
direction), torchvision and hand-computed values (IoU / GIoU / DIoU / CIoU), scipy's
linear_sum_assignment (equal total cost), pycocotools (AP), and plain-Python references for the
greedy matcher and the CSR rewards; plus regression cases from rotated-IoU bug reports."""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pytest
import shapely
import shapely.affinity
import torch
import torchvision.ops as tv_ops
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.optimize import linear_sum_assignment

from geovlm.rewards import geometry as geo

# ----------------------------------------------------------------------------- oracle helpers


def _rand_rotated(rng, n, centre=10.0, spread=6.0, size=(0.5, 12.0)):
    return np.column_stack(
        [
            rng.uniform(centre - spread, centre + spread, (n, 2)),
            rng.uniform(*size, (n, 2)),
            rng.uniform(-400.0, 400.0, n),
        ]
    )


def _rand_xyxy(rng, n, spread=10.0, size=(0.3, 6.0)):
    lo = rng.uniform(0.0, spread, (n, 2))
    return np.column_stack([lo, lo + rng.uniform(*size, (n, 2))])


def _shapely_rotated(boxes):
    """Rotated boxes as shapely polygons built by shapely's own rotation (counter-clockwise)."""
    polys = []
    for cx, cy, w, h, angle in np.asarray(boxes, dtype=np.float64):
        rect = shapely.box(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
        polys.append(shapely.affinity.rotate(rect, angle, origin=(cx, cy)))
    return np.array(polys, dtype=object)


def _shapely_quads(quads):
    """Convex hull of each quadrilateral's four points (the documented semantics)."""
    points = shapely.multipoints(np.asarray(quads).reshape(-1, 4, 2))
    return shapely.convex_hull(points)


def _shapely_iou(pa, pb):
    inter = shapely.area(shapely.intersection(pa, pb))
    union = shapely.area(pa) + shapely.area(pb) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _numpy_iou_matrix(a, b):
    """Float64 reference IoU of valid xyxy boxes."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def _oracle_matrix(a, b):
    if a.shape[1] == 4:
        return _numpy_iou_matrix(a, b)
    pa, pb = _shapely_rotated(a), _shapely_rotated(b)
    return _shapely_iou(pa[:, None], pb[None, :]).reshape(len(a), len(b))


def _csr(rng, counts, make):
    boxes = [make(rng, k) for k in counts]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return np.concatenate(boxes, axis=0), offsets, boxes


def _jitter(rng, boxes, scale):
    out = boxes + rng.normal(0.0, scale, boxes.shape)
    if boxes.shape[1] == 4:
        out[:, 2:] = np.maximum(out[:, 2:], out[:, :2] + 0.05)
    else:
        out[:, 2:4] = np.abs(out[:, 2:4]) + 0.05
    return out


def _python_greedy(score, threshold):
    pairs = sorted(
        (
            (-score[i, j], i, j)
            for i in range(score.shape[0])
            for j in range(score.shape[1])
            if score[i, j] >= threshold and score[i, j] > 0
        ),
    )
    rows, cols, taken_r, taken_c = [], [], set(), set()
    for _, i, j in pairs:
        if i not in taken_r and j not in taken_c:
            taken_r.add(i)
            taken_c.add(j)
            rows.append(i)
            cols.append(j)
    return rows, cols


# ----------------------------------------------------------------------------- axis-aligned


def test_xyxy_iou_matches_float64_reference_and_torchvision():
    rng = np.random.default_rng(11)
    a, b = _rand_xyxy(rng, 37), _rand_xyxy(rng, 23)
    want = _numpy_iou_matrix(a, b)
    np.testing.assert_allclose(geo.iou_matrix(a, b), want, rtol=0, atol=1e-14)
    tv = tv_ops.box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    np.testing.assert_allclose(geo.iou_matrix(a, b), tv, rtol=0, atol=1e-12)
    np.testing.assert_allclose(geo.iou_pairs(a[:23], b), np.diag(want), rtol=0, atol=1e-14)


@pytest.mark.parametrize(
    ("a", "b", "iou", "giou", "diou", "ciou"),
    [
        # overlapping squares: inter 1, union 7, hull 3x3, centres sqrt(2) apart, diagonal^2 18
        ([0, 0, 2, 2], [1, 1, 3, 3], 1 / 7, 1 / 7 - 2 / 9, 1 / 7 - 2 / 18, 1 / 7 - 2 / 18),
        # crossed 4x2 and 2x4: inter 4, union 12, hull 4x4, centre distance^2 2, diagonal^2 32
        (
            [0, 0, 4, 2],
            [0, 0, 2, 4],
            1 / 3,
            1 / 3 - 4 / 16,
            1 / 3 - 2 / 32,
            1 / 3
            - 2 / 32
            - (lambda v: v * v / (2 / 3 + v))(
                4 / math.pi**2 * (math.atan(2.0) - math.atan(0.5)) ** 2
            ),
        ),
        # disjoint unit squares: union 2, hull 3x1, centres 2 apart, diagonal^2 10
        ([0, 0, 1, 1], [2, 0, 3, 1], 0.0, -1 / 3, -4 / 10, -4 / 10),
        ([1, 2, 5, 7], [1, 2, 5, 7], 1.0, 1.0, 1.0, 1.0),
    ],
)
def test_giou_diou_ciou_hand_computed(a, b, iou, giou, diou, ciou):
    a, b = np.array([a], float), np.array([b], float)
    for kind, raw in (("iou", None), ("giou", giou), ("diou", diou), ("ciou", ciou)):
        want = iou if raw is None else (raw + 1.0) / 2.0
        assert geo.iou_pairs(a, b, kind)[0] == pytest.approx(want, abs=1e-15)
        assert geo.iou_pairs(b, a, kind)[0] == pytest.approx(want, abs=1e-15)


@pytest.mark.parametrize(
    ("kind", "fn"),
    [
        ("giou", tv_ops.generalized_box_iou),
        ("diou", tv_ops.distance_box_iou),
        ("ciou", tv_ops.complete_box_iou),
    ],
)
def test_giou_diou_ciou_match_torchvision(kind, fn):
    rng = np.random.default_rng(5)
    a, b = _rand_xyxy(rng, 19), _rand_xyxy(rng, 29)
    want = (fn(torch.from_numpy(a), torch.from_numpy(b)).numpy() + 1.0) / 2.0
    # torchvision adds eps = 1e-7 to the DIoU / CIoU denominators.
    np.testing.assert_allclose(geo.iou_matrix(a, b, kind), want, rtol=0, atol=1e-7)


def test_metric_kinds_need_xyxy():
    with pytest.raises(ValueError, match="xyxy"):
        geo.iou_pairs(np.ones((1, 5)), np.ones((1, 5)), "giou")
    with pytest.raises(ValueError, match="unknown kind"):
        geo.iou_pairs(np.ones((1, 4)), np.ones((1, 4)), "siou")


# ----------------------------------------------------------------------------- rotated / quads


def test_rotated_iou_matches_shapely():
    rng = np.random.default_rng(1)
    a = _rand_rotated(rng, 600)
    b = _rand_rotated(rng, 600)
    b[:300, :2] = a[:300, :2] + rng.normal(0.0, 1.5, (300, 2))  # many real overlaps
    want = _shapely_iou(_shapely_rotated(a), _shapely_rotated(b))
    got = geo.iou_pairs(a, b)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
    assert (want > 0).mean() > 0.4
    m = geo.iou_matrix(a[:13], b[:17])
    np.testing.assert_allclose(m, _oracle_matrix(a[:13], b[:17]), rtol=0, atol=1e-9)


def test_quadrilateral_iou_matches_shapely_in_any_vertex_order():
    rng = np.random.default_rng(2)
    n = 400
    # General convex quadrilaterals: rotated boxes under random shears and scalings.
    quads = geo.rotated_to_quad(_rand_rotated(rng, n)).reshape(n, 4, 2)
    centre = quads.mean(axis=1, keepdims=True)
    shear = rng.uniform(-0.6, 0.6, (n, 2, 2)) + np.eye(2)
    quads = np.einsum("nij,nkj->nki", shear, quads - centre) + centre
    perm = rng.permuted(np.tile(np.arange(4), (n, 1)), axis=1)  # random order, either orientation
    shuffled = np.take_along_axis(quads, perm[:, :, None], axis=1).reshape(n, 8)
    other = geo.rotated_to_quad(_rand_rotated(rng, n))
    want = _shapely_iou(_shapely_quads(shuffled), _shapely_quads(other))
    np.testing.assert_allclose(geo.iou_pairs(shuffled, other), want, rtol=0, atol=1e-9)
    # Non-convex (a dart) is scored as its hull; collinear points have no area.
    dart = np.array([[0, 0, 4, 0, 1, 1, 0, 4]], float)
    square = np.array([[0, 0, 2, 0, 2, 2, 0, 2]], float)
    want = _shapely_iou(_shapely_quads(dart), _shapely_quads(square))
    np.testing.assert_allclose(geo.iou_pairs(dart, square), want, rtol=0, atol=1e-12)
    line = np.array([[0, 0, 1, 1, 2, 2, 3, 3]], float)
    assert geo.iou_pairs(line, square)[0] == 0.0


def test_mixed_layouts_are_promoted():
    rng = np.random.default_rng(3)
    a = _rand_xyxy(rng, 31)
    r = _rand_rotated(rng, 31)
    want = _shapely_iou(_shapely_rotated(geo.xyxy_to_rotated(a)), _shapely_rotated(r))
    np.testing.assert_allclose(geo.iou_pairs(a, r), want, rtol=0, atol=1e-9)
    np.testing.assert_allclose(geo.iou_pairs(geo.rotated_to_quad(r), a), want, rtol=0, atol=1e-9)
    bad = a.copy()
    bad[:, 2] = bad[:, 0] - 1.0  # negative width stays degenerate after promotion
    assert np.all(geo.iou_pairs(bad, geo.xyxy_to_rotated(a)) == 0.0)
    assert np.all(geo.iou_pairs(bad, geo.rotated_to_quad(geo.xyxy_to_rotated(a))) == 0.0)


def test_identical_rotated_boxes_give_exactly_one():
    # mmcv / detectron2 reports: identical rotated boxes scored 0, 0.5 or > 1.
    rng = np.random.default_rng(4)
    boxes = _rand_rotated(rng, 200)
    boxes[:50, 4] = rng.choice([0.0, 90.0, -90.0, 180.0, 45.0, 1e6], 50)
    boxes[50:100, :2] += 1e8
    assert np.all(geo.iou_pairs(boxes, boxes) == 1.0)
    quads = geo.rotated_to_quad(boxes)
    assert np.all(geo.iou_pairs(quads, quads) == 1.0)


def test_same_box_in_other_representations_gives_one():
    rng = np.random.default_rng(6)
    boxes = _rand_rotated(rng, 100)
    swapped = boxes[:, [0, 1, 3, 2, 4]] + np.array([0, 0, 0, 0, 90.0])
    for other in (
        swapped,
        boxes + np.array([0, 0, 0, 0, 360.0]),
        boxes - np.array([0, 0, 0, 0, 180.0]),
        geo.convert_rotated(boxes, dst="le90_deg"),
    ):
        np.testing.assert_allclose(geo.iou_pairs(boxes, other), 1.0, rtol=0, atol=1e-12)


@pytest.mark.parametrize("eps", [1e-6, 1e-9, 1e-12])
def test_nearly_identical_rotated_boxes(eps):
    rng = np.random.default_rng(7)
    a = _rand_rotated(rng, 300, centre=0.0, spread=3.0)
    b = a + rng.normal(0.0, eps, a.shape)
    want = _shapely_iou(_shapely_rotated(a), _shapely_rotated(b))
    got = geo.iou_pairs(a, b)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
    assert np.all(got <= 1.0) and np.all(got > 1.0 - 1e-4)


def test_thin_boxes_of_width_1e_7():
    # Two boxes 1e-7 wide and 5 long, offset by 0.3e-7 across: IoU exactly 0.7 / 1.3. Rounding the
    # corners (~1e-16 of the length) moves the thin side by ~1e-9 of its width, hence rtol 1e-7.
    rng = np.random.default_rng(8)
    angle = rng.uniform(-360, 360, 50)
    c, s = np.cos(np.deg2rad(angle)), np.sin(np.deg2rad(angle))
    w = 1e-7
    a = np.column_stack([np.zeros(50), np.zeros(50), np.full(50, w), np.full(50, 5.0), angle])
    b = a.copy()
    b[:, 0], b[:, 1] = 0.3 * w * c, 0.3 * w * s
    np.testing.assert_allclose(geo.iou_pairs(a, b), 0.7 / 1.3, rtol=1e-7)
    # Boxes whose both sides are ~1e-7 keep full relative precision: shapely to 1e-9.
    tiny = _rand_rotated(rng, 300, centre=0.0, spread=1e-7, size=(1e-7, 3e-7))
    other = _rand_rotated(rng, 300, centre=0.0, spread=1e-7, size=(1e-7, 3e-7))
    want = _shapely_iou(_shapely_rotated(tiny), _shapely_rotated(other))
    assert (want > 0).mean() > 0.5
    np.testing.assert_allclose(geo.iou_pairs(tiny, other), want, rtol=0, atol=1e-9)


def test_non_intersecting_and_touching_boxes_give_zero():
    rng = np.random.default_rng(9)
    a = _rand_rotated(rng, 100, size=(1.0, 3.0))
    b = a.copy()
    b[:, 0] += 10.0  # beyond any diagonal
    assert np.all(geo.iou_pairs(a, b) == 0.0)
    edge = np.array([[0.0, 0.0, 2.0, 2.0, 30.0]])
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    touching = edge + np.array([[2 * c, 2 * s, 0, 0, 0]])  # shares one whole edge
    assert geo.iou_pairs(edge, touching)[0] == pytest.approx(0.0, abs=1e-15)
    corner = np.array([[0.0, 0.0, 1.0, 1.0]]), np.array([[1.0, 1.0, 2.0, 2.0]])
    assert geo.iou_pairs(*corner)[0] == 0.0


def test_huge_coordinates_keep_precision():
    # Coordinates on a 2**-20 grid stay exact after a 1e7 shift, so shapely at the origin is the
    # exact answer for the shifted boxes too.
    rng = np.random.default_rng(10)
    grid = 2.0**-20
    a = _rand_rotated(rng, 300, centre=0.0, spread=5.0)
    b = a + np.column_stack([rng.normal(0, 2.0, (300, 2)), np.zeros((300, 3))])
    b[:, 2:4] = np.abs(b[:, 2:4])
    a[:, :2], b[:, :2] = np.round(a[:, :2] / grid) * grid, np.round(b[:, :2] / grid) * grid
    want = _shapely_iou(_shapely_rotated(a), _shapely_rotated(b))
    shift = np.array([1e7, -3e6, 0, 0, 0])
    np.testing.assert_allclose(geo.iou_pairs(a + shift, b + shift), want, rtol=0, atol=1e-9)
    qa = np.round(geo.rotated_to_quad(a) / grid) * grid
    qb = np.round(geo.rotated_to_quad(b) / grid) * grid
    want = _shapely_iou(_shapely_quads(qa), _shapely_quads(qb))
    quad_shift = np.tile([1e7, -3e6], 4)
    got = geo.iou_pairs(qa + quad_shift, qb + quad_shift)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)


def test_angles_beyond_a_full_turn():
    rng = np.random.default_rng(12)
    a, b = _rand_rotated(rng, 200, spread=2.0), _rand_rotated(rng, 200, spread=2.0)
    want = _shapely_iou(_shapely_rotated(a), _shapely_rotated(b))
    for turns in (-1000, -3, -1, 1, 2, 7, 12345):
        a2 = a.copy()
        a2[:, 4] += 360.0 * turns
        np.testing.assert_allclose(geo.iou_pairs(a2, b), want, rtol=0, atol=1e-9)


def test_degenerate_and_non_finite_boxes_give_zero():
    good_r = np.array([5.0, 5.0, 4.0, 3.0, 20.0])
    good_x = np.array([1.0, 1.0, 4.0, 5.0])
    bad_r = [
        [5, 5, 0, 3, 0],
        [5, 5, -4, 3, 0],
        [5, 5, 4, 0, 10],
        [np.nan, 5, 4, 3, 0],
        [5, 5, 4, 3, np.nan],
        [np.inf, 5, 4, 3, 0],
        [5, 5, np.inf, 3, 0],
        [5, 5, 4, 3, np.inf],
        [5, 5, 1e200, 1e200, 0],
    ]
    bad_x = [
        [1, 1, 1, 5],
        [4, 1, 1, 5],
        [1, 5, 4, 1],
        [np.nan, 1, 4, 5],
        [1, 1, np.inf, 5],
        [-np.inf, 1, 4, 5],
        [-1e200, -1e200, 1e200, 1e200],
    ]
    for bad, good in ((np.array(bad_r, float), good_r), (np.array(bad_x, float), good_x)):
        for kind in ("iou", "giou", "diou", "ciou") if bad.shape[1] == 4 else ("iou",):
            goods = np.tile(good, (len(bad), 1))
            assert np.all(geo.iou_pairs(bad, goods, kind) == 0.0)
            assert np.all(geo.iou_pairs(goods, bad, kind) == 0.0)
            assert np.all(geo.iou_pairs(bad, bad, kind) == 0.0)
    nan_quad = np.array([[0, 0, 1, 0, 1, np.nan, 0, 1]], float)
    assert geo.iou_pairs(nan_quad, nan_quad)[0] == 0.0


_garbage = st.floats(allow_nan=True, allow_infinity=True, width=64)


@settings(max_examples=150, deadline=None)
@given(
    arrays(np.float64, (6, 5), elements=_garbage),
    arrays(np.float64, (6, 5), elements=st.floats(-1e6, 1e6) | _garbage),
)
def test_any_input_gives_a_finite_value_in_unit_range(a, b):
    for x, y in ((a, b), (a[:, :4], b[:, :4]), (geo.rotated_to_quad(b), a)):
        for kind in ("iou", "giou", "diou", "ciou") if x.shape[1] == 4 else ("iou",):
            out = geo.iou_matrix(x, y, kind)
            assert np.all(np.isfinite(out)) and np.all((out >= 0) & (out <= 1))


# ----------------------------------------------------------------------------- matching


def test_linear_assignment_equals_scipy_total_cost():
    rng = np.random.default_rng(13)
    for trial in range(120):
        n, m = rng.integers(1, 14, 2)
        if trial % 3 == 0:
            cost = rng.integers(0, 4, (n, m)).astype(float)  # many ties
        else:
            cost = rng.normal(0.0, 10.0, (n, m))
        maximize = bool(trial % 2)
        rows, cols = geo.linear_assignment(cost, maximize=maximize)
        want_r, want_c = linear_sum_assignment(cost, maximize=maximize)
        assert len(rows) == min(n, m)
        assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
        assert np.all(np.diff(rows) > 0)
        assert cost[rows, cols].sum() == pytest.approx(cost[want_r, want_c].sum(), abs=1e-9)
    assert geo.linear_assignment(np.zeros((0, 3)))[0].shape == (0,)
    with pytest.raises(ValueError, match="finite"):
        geo.linear_assignment(np.array([[1.0, np.inf]]))


def test_greedy_match_equals_python_reference():
    rng = np.random.default_rng(14)
    for trial in range(60):
        n, m = rng.integers(1, 12, 2)
        score = np.round(rng.uniform(0, 1, (n, m)), 1 if trial % 2 else 6)  # ties when rounded
        score[rng.uniform(size=(n, m)) < 0.3] = 0.0
        threshold = [0.0, 0.3, 0.5][trial % 3]
        rows, cols = geo.greedy_match(score, threshold)
        want_r, want_c = _python_greedy(score, threshold)
        order = np.argsort(want_r)
        assert rows.tolist() == np.array(want_r, int)[order].tolist()
        assert cols.tolist() == np.array(want_c, int)[order].tolist()


# ----------------------------------------------------------------------------- CSR rewards


def _random_detection_batch(rng, n_cand, rotated, max_pred=6, max_gt=5):
    make = _rand_rotated if rotated else _rand_xyxy
    n_gt = rng.integers(0, max_gt + 1, n_cand)
    gt, gt_off, gt_list = _csr(rng, n_gt, make)
    preds = []
    for boxes in gt_list:
        k = int(rng.integers(0, max_pred + 1))
        near = _jitter(rng, boxes[rng.integers(0, len(boxes), k)], 0.4) if len(boxes) else None
        fresh = make(rng, k)
        pick = rng.uniform(size=k) < 0.7
        preds.append(np.where(pick[:, None], near, fresh) if near is not None else fresh)
    counts = np.array([len(p) for p in preds])
    pred = np.concatenate(preds, axis=0)
    pred_off = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return pred, pred_off, preds, gt, gt_off, gt_list


def _oracle_multibox(pred_boxes, gt_boxes, cap=100):
    n, m = len(pred_boxes), len(gt_boxes)
    if n == 0 and m == 0:
        return 1.0
    if n == 0 or m == 0:
        return 0.0
    iou = _oracle_matrix(pred_boxes[:cap], gt_boxes)
    r, c = linear_sum_assignment(iou, maximize=True)
    return iou[r, c].sum() / max(n, m)


@pytest.mark.parametrize("rotated", [False, True])
def test_multibox_reward_matches_scipy_oracle(rotated):
    rng = np.random.default_rng(15 + rotated)
    pred, pred_off, preds, gt, gt_off, gts = _random_detection_batch(rng, 90, rotated)
    got = geo.multibox_reward(pred, pred_off, gt, gt_off)
    want = [_oracle_multibox(p, g) for p, g in zip(preds, gts, strict=True)]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
    assert np.all((got >= 0) & (got <= 1))
    capped = geo.multibox_reward(pred, pred_off, gt, gt_off, max_pred_boxes=2)
    want = [_oracle_multibox(p, g, cap=2) for p, g in zip(preds, gts, strict=True)]
    np.testing.assert_allclose(capped, want, rtol=0, atol=1e-9)


def test_multibox_reward_cannot_be_raised_by_extra_boxes():
    rng = np.random.default_rng(17)
    gt = _rand_xyxy(rng, 3, spread=50.0)
    gt_off = np.array([0, 3])
    good = _jitter(rng, gt, 0.2)
    base = geo.multibox_reward(good, np.array([0, 3]), gt, gt_off)[0]
    far = _rand_xyxy(rng, 40) + 1000.0
    spam = np.concatenate([good, far])
    offs = np.array([0, 3, 4, 13, 43])
    rewards = geo.multibox_reward(
        np.concatenate([spam[:4], spam[:13], spam]),
        np.array([0, 4, 17, 60]),
        np.concatenate([gt, gt, gt]),
        np.array([0, 3, 6, 9]),
    )
    assert np.all(np.diff(np.concatenate([[base], rewards])) < 0)
    for k in offs[1:]:
        assert geo.multibox_reward(spam[:k], np.array([0, k]), gt, gt_off)[0] <= 3 / k + 1e-15
    # Many copies of a perfect box against one target: 1 / copies.
    copies = np.tile(gt[:1], (7, 1))
    assert geo.multibox_reward(copies, np.array([0, 7]), gt[:1], np.array([0, 1]))[0] == (
        pytest.approx(1 / 7, abs=1e-15)
    )


def test_sample_index_shares_ground_truth():
    rng = np.random.default_rng(18)
    pred, pred_off, preds, gt, gt_off, gts = _random_detection_batch(rng, 12, rotated=True)
    sample_index = rng.integers(0, 12, 12)
    got = geo.multibox_reward(pred, pred_off, gt, gt_off, sample_index=sample_index)
    want = [_oracle_multibox(p, gts[s]) for p, s in zip(preds, sample_index, strict=True)]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
    rep = np.concatenate([gts[s].reshape(-1, 5) for s in sample_index])
    rep_off = np.concatenate([[0], np.cumsum([len(gts[s]) for s in sample_index])])
    np.testing.assert_allclose(geo.multibox_reward(pred, pred_off, rep, rep_off), got, atol=0)


@pytest.mark.parametrize("rotated", [False, True])
def test_first_box_iou(rotated):
    rng = np.random.default_rng(19 + rotated)
    pred, pred_off, preds, gt, gt_off, gts = _random_detection_batch(rng, 60, rotated)
    got = geo.first_box_iou(pred, pred_off, gt, gt_off)
    want = [
        _oracle_matrix(p[:1], g[:1])[0, 0] if len(p) and len(g) else 0.0
        for p, g in zip(preds, gts, strict=True)
    ]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)


@pytest.mark.parametrize(("rotated", "threshold"), [(False, 0.5), (True, 0.5), (False, 0.3)])
def test_detection_prf_matches_greedy_reference(rotated, threshold):
    rng = np.random.default_rng(21 + rotated)
    pred, pred_off, preds, gt, gt_off, gts = _random_detection_batch(rng, 80, rotated)
    precision, recall, f1 = geo.detection_prf(pred, pred_off, gt, gt_off, threshold)
    for c, (p, g) in enumerate(zip(preds, gts, strict=True)):
        if len(p) == 0 and len(g) == 0:
            assert (precision[c], recall[c], f1[c]) == (1.0, 1.0, 1.0)
            continue
        if len(p) == 0 or len(g) == 0:
            assert (precision[c], recall[c], f1[c]) == (0.0, 0.0, 0.0)
            continue
        tp = len(_python_greedy(_oracle_matrix(p, g), threshold)[0])
        assert precision[c] == pytest.approx(tp / len(p), abs=1e-15)
        assert recall[c] == pytest.approx(tp / len(g), abs=1e-15)
        pr = precision[c] + recall[c]
        assert f1[c] == pytest.approx(2 * precision[c] * recall[c] / pr if pr else 0.0, abs=1e-12)


def _coco_ap(pred_xyxy, scores, gt_xyxy, threshold, max_dets):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def ann(k, box):
        x1, y1, x2, y2 = (float(v) for v in box)
        return {
            "id": k + 1,
            "image_id": 1,
            "category_id": 1,
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "area": (x2 - x1) * (y2 - y1),
            "iscrowd": 0,
        }

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = {
            "images": [{"id": 1}],
            "categories": [{"id": 1}],
            "annotations": [ann(k, b) for k, b in enumerate(gt_xyxy)],
        }
        coco_gt.createIndex()
        dets = [
            dict(ann(k, b), score=float(s))
            for k, (b, s) in enumerate(zip(pred_xyxy, scores, strict=True))
        ]
        coco_dt = coco_gt.loadRes(dets)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.params.iouThrs = np.array([threshold])
        ev.params.maxDets = [max_dets]
        ev.params.areaRng = [[0.0, 1e10]]
        ev.params.areaRngLbl = ["all"]
        ev.evaluate()
        ev.accumulate()
    precision = ev.eval["precision"][0, :, 0, 0, 0]
    return precision[precision > -1].mean()


@pytest.mark.parametrize(("threshold", "max_dets"), [(0.5, 100), (0.75, 100), (0.5, 3)])
def test_average_precision_matches_pycocotools(threshold, max_dets):
    rng = np.random.default_rng(23 + int(threshold * 100) + max_dets)
    pred, pred_off, preds, gt, gt_off, gts = _random_detection_batch(rng, 40, False, 9, 6)
    scores = np.round(rng.uniform(0, 1, len(pred)), 1)  # ties exercise the stable sort
    got = geo.average_precision(pred, scores, pred_off, gt, gt_off, threshold, max_dets=max_dets)
    rotated = geo.average_precision(
        geo.xyxy_to_rotated(pred),
        scores,
        pred_off,
        geo.xyxy_to_rotated(gt),
        gt_off,
        threshold,
        max_dets=max_dets,
    )
    compared = 0
    for c, (p, g) in enumerate(zip(preds, gts, strict=True)):
        if len(p) and len(g):
            s = scores[pred_off[c] : pred_off[c + 1]]
            want = _coco_ap(p, s, g, threshold, max_dets)
            assert got[c] == pytest.approx(want, abs=1e-12)
            assert rotated[c] == pytest.approx(want, abs=1e-9)
            compared += 1
        else:
            assert got[c] == (1.0 if len(p) == len(g) else 0.0)
    assert compared > 20


def test_average_precision_breaks_iou_ties_like_pycocotools():
    # The first detection overlaps both targets equally (IoU 1/3); COCO gives it the later one,
    # which leaves the first target for the second detection: AP 1 instead of 0.5.
    gt = np.array([[0, 0, 2, 2], [2, 0, 4, 2]], float)
    pred = np.array([[1, 0, 3, 2], [0, 0, 2, 2]], float)
    scores = np.array([0.9, 0.8])
    got = geo.average_precision(pred, scores, np.array([0, 2]), gt, np.array([0, 2]), 0.3)
    assert got[0] == pytest.approx(_coco_ap(pred, scores, gt, 0.3, 100), abs=1e-12)
    assert got[0] == pytest.approx(1.0, abs=1e-12)


def test_average_precision_without_scores_uses_given_order():
    rng = np.random.default_rng(29)
    pred, pred_off, preds, gt, gt_off, gts = _random_detection_batch(rng, 20, False, 8, 5)
    ranked = -np.concatenate([np.arange(len(p), dtype=float) for p in preds])
    np.testing.assert_array_equal(
        geo.average_precision(pred, None, pred_off, gt, gt_off),
        geo.average_precision(pred, ranked, pred_off, gt, gt_off),
    )
    with_nan = ranked.copy()
    with_nan[pred_off[:-1][np.diff(pred_off) > 0]] = np.nan
    assert np.all(np.isfinite(geo.average_precision(pred, with_nan, pred_off, gt, gt_off)))


def test_huge_box_counts_stay_bounded():
    rng = np.random.default_rng(31)
    gt = _rand_xyxy(rng, 10, spread=100.0)
    flood = np.concatenate([_jitter(rng, gt, 0.3), _rand_xyxy(rng, 9990, spread=100.0)])
    reward = geo.multibox_reward(flood, np.array([0, 10_000]), gt, np.array([0, 10]))[0]
    assert reward == pytest.approx(_oracle_multibox(flood, gt), abs=1e-12)
    assert reward <= 10 / 10_000
    precision, recall, _ = geo.detection_prf(flood, np.array([0, 10_000]), gt, np.array([0, 10]))
    assert precision[0] <= 10 / 10_000 and 0 <= recall[0] <= 1
    many_gt = _rand_rotated(rng, 10_000, centre=50.0, spread=50.0)
    few = _jitter(rng, many_gt[:10], 0.2)
    got = geo.multibox_reward(few, np.array([0, 10]), many_gt, np.array([0, 10_000]))[0]
    assert 0.0 < got <= 10 / 10_000


def test_csr_input_validation():
    box = np.ones((2, 4)) * np.array([0, 0, 1, 1])
    with pytest.raises(ValueError, match="pred_offsets"):
        geo.multibox_reward(box, np.array([0, 1]), box, np.array([0, 2]))
    with pytest.raises(ValueError, match="pred_offsets"):
        geo.multibox_reward(box, np.array([0, 2, 1, 2]), box, np.array([0, 1, 1, 2]))
    with pytest.raises(ValueError, match="integer"):
        geo.multibox_reward(box, np.array([0.0, 2.0]), box, np.array([0, 2]))
    with pytest.raises(ValueError, match="sample_index"):
        geo.multibox_reward(box, np.array([0, 1, 2]), box, np.array([0, 2]))
    with pytest.raises(ValueError, match="sample_index"):
        geo.first_box_iou(box, np.array([0, 2]), box, np.array([0, 2]), sample_index=np.array([1]))
    with pytest.raises(ValueError, match="iou_threshold"):
        geo.detection_prf(box, np.array([0, 2]), box, np.array([0, 2]), 0.0)
    with pytest.raises(ValueError, match="pred_scores"):
        geo.average_precision(box, np.ones(3), np.array([0, 2]), box, np.array([0, 2]))
    with pytest.raises(ValueError, match="max_pred_boxes"):
        geo.multibox_reward(box, np.array([0, 2]), box, np.array([0, 2]), max_pred_boxes=0)
    with pytest.raises(ValueError, match=r"\[K, 4\]"):
        geo.iou_pairs(np.ones((2, 3)), np.ones((2, 3)))
    with pytest.raises(ValueError, match="as many boxes"):
        geo.iou_pairs(np.ones((2, 4)), np.ones((3, 4)))
    empty = geo.multibox_reward(np.array([]), np.array([0, 0]), box, np.array([0, 2]))
    assert empty.tolist() == [0.0]
    assert geo.iou_matrix(np.zeros((0, 5)), box).shape == (0, 2)


# ----------------------------------------------------------------------------- converters


def test_rotation_direction_matches_shapely_counter_clockwise():
    rng = np.random.default_rng(37)
    boxes = _rand_rotated(rng, 50)
    ours = shapely.polygons(geo.rotated_to_quad(boxes).reshape(-1, 4, 2))
    theirs = _shapely_rotated(boxes)
    assert np.all(shapely.area(shapely.symmetric_difference(ours, theirs)) < 1e-9)
    cw = geo.convert_rotated(boxes, src="deg_ccw", dst="deg_cw")
    mirrored = boxes.copy()
    mirrored[:, 4] = -cw[:, 4]
    np.testing.assert_allclose(mirrored, boxes, atol=0)


@pytest.mark.parametrize("src", geo.ANGLE_CONVENTIONS)
@pytest.mark.parametrize("dst", geo.ANGLE_CONVENTIONS)
def test_angle_conventions_round_trip_the_same_shape(src, dst):
    rng = np.random.default_rng(41)
    boxes = _rand_rotated(rng, 40)
    there = geo.convert_rotated(boxes, "deg_ccw", src)
    moved = geo.convert_rotated(there, src, dst)
    back = geo.convert_rotated(moved, dst, "deg_ccw")
    same = _shapely_iou(_shapely_rotated(boxes), _shapely_rotated(back))
    np.testing.assert_allclose(same, 1.0, atol=1e-9)
    if dst.startswith("le90"):
        half_turn = 90.0 if dst == "le90_deg" else math.pi / 2
        assert np.all(moved[:, 2] >= moved[:, 3])
        assert np.all((moved[:, 4] >= -half_turn) & (moved[:, 4] < half_turn))


def test_le90_matches_mmrotate_formula():
    # mmrotate: long side first, then norm_angle(a) = (a + pi/2) % pi - pi/2.
    boxes = np.array([[0, 0, 2, 5, 30.0], [0, 0, 5, 2, 100.0], [0, 0, 3, 3, -270.0]])
    le90 = geo.convert_rotated(boxes, "deg_ccw", "le90")
    want = np.array(
        [
            [0, 0, 5, 2, math.radians(-60)],
            [0, 0, 5, 2, math.radians(-80)],
            [0, 0, 3, 3, math.radians(-90)],
        ]
    )
    np.testing.assert_allclose(le90, want, atol=1e-12)
    with pytest.raises(ValueError, match="convention"):
        geo.convert_rotated(boxes, "degrees", "le90")


def test_hulls_match_shapely_bounds():
    rng = np.random.default_rng(43)
    boxes = _rand_rotated(rng, 80)
    boxes[:10, 4] = [0, 90, 180, 270, -90, 360, 720, 45, -45, 1e5]
    # shapely turns 1e5 degrees into radians unreduced; reduce exactly first for a fair oracle.
    want = shapely.bounds(_shapely_rotated(np.column_stack([boxes[:, :4], boxes[:, 4] % 360])))
    np.testing.assert_allclose(geo.rotated_to_xyxy(boxes), want, rtol=0, atol=1e-12)
    quads = geo.rotated_to_quad(boxes)
    np.testing.assert_allclose(geo.quad_to_xyxy(quads), want, rtol=0, atol=1e-12)
    xyxy = _rand_xyxy(rng, 9)
    np.testing.assert_allclose(geo.rotated_to_xyxy(geo.xyxy_to_rotated(xyxy)), xyxy, atol=1e-14)


def test_floor_gates_low_ious_and_leaves_the_rest_alone():
    gt = np.array([[40.0, 40.0, 60.0, 60.0]])
    # IoU 1/9 (a box 3x the side around it), 0.64 (shifted), 1.
    pred = np.array([[20.0, 20.0, 80.0, 80.0], [44.0, 40.0, 64.0, 60.0], [40.0, 40.0, 60.0, 60.0]])
    offsets, gt_off = np.array([0, 1, 2, 3]), np.array([0, 1])
    index = np.zeros(3, dtype=np.int64)
    chance = np.array([0.0])
    for fn in (geo.first_box_iou, geo.multibox_reward):
        plain = fn(pred, offsets, gt, gt_off, sample_index=index, chance=chance)
        gated = fn(pred, offsets, gt, gt_off, sample_index=index, chance=chance, floor=0.3)
        np.testing.assert_allclose(plain, [1 / 9, 16 / 24, 1.0])
        np.testing.assert_allclose(gated, [0.0, 16 / 24, 1.0])
        # Without chance (the plain IoU credit) there is no gate.
        np.testing.assert_allclose(fn(pred, offsets, gt, gt_off, sample_index=index, floor=0.3),
                                   plain)
        with pytest.raises(ValueError, match="floor must lie in"):
            fn(pred, offsets, gt, gt_off, sample_index=index, chance=chance, floor=1.5)
