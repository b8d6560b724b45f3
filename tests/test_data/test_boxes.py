"""Box conventions (geovlm/data/boxes.py) against hand-computed values, and their round trips."""

import numpy as np
import pytest

from geovlm.data.boxes import (
    CONVENTIONS,
    from_pixels,
    qwen25vl_resized_size,
    render_box,
    to_pixels,
)


@pytest.mark.parametrize(
    ("image_size", "kwargs", "expected"),
    [
        # round(500/28)=18 -> 504, round(1000/28)=36 -> 1008; within the default budget.
        ((1000, 500), {}, (1008, 504)),
        # 112 = 4 * 28 is kept as it is.
        ((112, 112), {}, (112, 112)),
        # (28, 28) is below 4*28*28 pixels: beta = sqrt(3136 / 200); ceil(10*beta/28)=2,
        # ceil(20*beta/28)=3.
        ((20, 10), {}, (84, 56)),
        # 2000x1000 with max 100 tokens: beta = sqrt(2e6 / 78400) ~ 5.05; floor(198/28)=7,
        # floor(396/28)=14.
        ((2000, 1000), {"max_pixels": 100 * 28 * 28}, (392, 196)),
        # Portrait: width and height are not swapped. round(100/28)=4 -> 112, round(300/28)=11.
        ((100, 300), {}, (112, 308)),
    ],
)
def test_qwen25vl_resized_size_hand_values(image_size, kwargs, expected):
    assert qwen25vl_resized_size(image_size, **kwargs) == expected


def test_to_pixels_hand_values_xyxy():
    size = (200, 100)
    # Qwen2-VL: 0..1000 of each side.
    np.testing.assert_allclose(
        to_pixels([[100, 200, 500, 1000]], "qwen2vl", size), [[20, 20, 100, 100]]
    )
    # GeoChat: 0..100 of each side.
    np.testing.assert_allclose(to_pixels([[10, 20, 30, 40]], "geochat", size), [[20, 20, 60, 40]])
    # Qwen2.5-VL: pixels of the resized (1008, 504) input of a (1000, 500) image.
    np.testing.assert_allclose(
        to_pixels([[1008, 504, 504, 252]], "qwen25vl", (1000, 500)), [[1000, 500, 500, 250]]
    )
    # An explicit resized size wins over the computed one.
    np.testing.assert_allclose(
        to_pixels([[10, 10, 20, 20]], "qwen25vl", (100, 50), resized_size=(200, 200)),
        [[5, 2.5, 10, 5]],
    )
    np.testing.assert_allclose(to_pixels([[1, 2, 3, 4]], "pixels", size), [[1, 2, 3, 4]])


def test_to_pixels_hand_values_rotated():
    size = (200, 100)
    # GeoChat rotated: corners of the unrotated box + angle -> cx, cy, w, h, angle.
    np.testing.assert_allclose(
        to_pixels([[10, 20, 30, 40, 45]], "geochat", size), [[40, 30, 40, 20, 45]]
    )
    # Other conventions carry cx, cy, w, h, angle: centre and sides scale per axis, angle stays.
    np.testing.assert_allclose(
        to_pixels([[500, 500, 100, 200, 30]], "qwen2vl", size), [[100, 50, 20, 20, 30]]
    )
    np.testing.assert_allclose(
        from_pixels([[40, 30, 40, 20, -90]], "geochat", size), [[10, 20, 30, 40, -90]]
    )


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("columns", [4, 5])
def test_round_trip_random_boxes(convention, columns):
    rng = np.random.default_rng(11 + columns)
    for image_size in [(37, 91), (113, 57), (640, 481)]:
        boxes = rng.uniform(0, min(image_size), (7, columns))
        resized = qwen25vl_resized_size(image_size) if convention == "qwen25vl" else None
        there = from_pixels(boxes, convention, image_size, resized)
        back = to_pixels(there, convention, image_size, resized)
        np.testing.assert_allclose(back, boxes, rtol=1e-12, atol=1e-9)
        # The conversion is a per-axis scale: independently computed here.
        if convention in ("qwen2vl", "geochat") and columns == 4:
            unit = 1000.0 if convention == "qwen2vl" else 100.0
            scale = np.array([image_size[0], image_size[1]] * 2) / unit
            np.testing.assert_allclose(there, boxes / scale, rtol=1e-12)


def test_inputs_are_not_modified_and_shapes_are_checked():
    boxes = np.array([[10.0, 20.0, 30.0, 40.0, 45.0]])
    copy = boxes.copy()
    to_pixels(boxes, "geochat", (200, 100))
    from_pixels(boxes, "geochat", (200, 100))
    np.testing.assert_array_equal(boxes, copy)
    assert to_pixels([1, 2, 3, 4], "pixels", (10, 10)).shape == (1, 4)
    assert to_pixels(np.zeros((0, 4)), "qwen2vl", (10, 10)).shape == (0, 4)
    with pytest.raises(ValueError, match="boxes must be"):
        to_pixels([[1, 2, 3]], "pixels", (10, 10))
    with pytest.raises(ValueError, match="unknown box convention"):
        to_pixels([[1, 2, 3, 4]], "xywh", (10, 10))


def test_render_box():
    assert render_box([12.4, 30.6, 40.2, 52.7], "qwen25vl") == "[12, 31, 40, 53]"
    assert render_box(np.array([1.0, 2.0, 3.0, 4.0, -30.2]), "pixels") == "[1, 2, 3, 4, -30]"
    assert render_box([10, 20, 30, 40], "geochat") == "{<10><20><30><40>}"
    assert render_box([10.2, 20, 30, 40, -90], "geochat") == "{<10><20><30><40>|<-90>}"
    assert render_box([[999.6, 0, 1, 2]], "qwen2vl") == "[1000, 0, 1, 2]"


def test_smart_resize_matches_qwen_vl_utils():
    from qwen_vl_utils import smart_resize as reference

    from geovlm.data.boxes import smart_resize

    rng = np.random.default_rng(7)
    sizes = [(112, 112), (1, 28), (27, 300), (4000, 3000), (500, 333), (28, 5000)]
    sizes += [tuple(int(v) for v in rng.integers(14, 3000, size=2)) for _ in range(200)]
    for height, width in sizes:
        for budget in ((4 * 784, 16384 * 784), (56 * 56, 224 * 224), (256 * 784, 1280 * 784)):
            want = reference(height, width, factor=28, min_pixels=budget[0], max_pixels=budget[1])
            assert smart_resize(height, width, 28, *budget) == tuple(want), (height, width, budget)


def test_render_box_rejects_non_finite_values():
    from geovlm.data.boxes import render_box

    with pytest.raises(ValueError, match="non-finite"):
        render_box([1.0, float("nan"), 3.0, 4.0], "qwen25vl")


def test_empty_box_list_converts_to_empty_array():
    from geovlm.data.boxes import to_pixels

    assert to_pixels([], "qwen2vl", (100, 50)).shape == (0, 4)
