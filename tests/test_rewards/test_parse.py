"""Answer extraction and typed parsing, against hand-computed values, shapely and smart_resize."""

from __future__ import annotations

import math

import numpy as np
import pytest
from qwen_vl_utils import smart_resize
from shapely import affinity
from shapely.geometry import box as shapely_box

from geovlm.data.schema import Target
from geovlm.rewards.parse import (
    MAX_BOXES,
    extract_answer,
    extract_think,
    is_number,
    named_choices,
    normalize_text,
    offered_choices,
    parse_boxes,
    parse_count,
    parse_for_task,
    parse_label,
    parse_labeled_boxes,
    parse_labels,
    parse_number,
    parse_yes_no,
    says_none,
    split_items,
    strip_boxes,
    valid_unicode,
)

SCENES = ("farmland", "forest", "residential", "dense residential", "harbor", "airplane")


# --------------------------------------------------------------------------- tags


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>r</think><answer>farmland</answer>", "farmland"),
        ("<think>r</think>\n<answer>\n  two\nlines \n</answer>\n", "two\nlines"),
        ("<answer>first</answer> then <answer>second</answer>", "second"),
        ("<answer>done</answer><answer>truncat", "done"),
        ("<answer>a</answer>b</answer>", "a"),
        ("<answer><answer>inner</answer></answer>", "inner"),
        ("<answer></answer>", ""),
        ("no tags at all", None),
        ("<answer>never closed", None),
        ("</answer> close before <answer>", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_skips_blocks_echoed_from_the_prompt():
    prompt = "Reply as <think>...</think><answer>your label</answer>. Which scene?"
    completion = "<think>fields</think><answer>farmland</answer> <answer>your label</answer>"
    assert extract_answer(completion) == "your label"
    assert extract_answer(completion, prompt=prompt) == "farmland"
    assert extract_answer("<answer>your label</answer>", prompt=prompt) is None


def test_extract_answer_non_string_is_none():
    assert extract_answer(None) is None
    assert extract_answer(b"<answer>x</answer>") is None


def test_extract_think():
    assert extract_think("<think> a\nb </think><answer>x</answer>") == "a\nb"
    assert extract_think("<think>one</think><think>two</think>") == "two"
    assert extract_think("<think>unclosed") is None


# --------------------------------------------------------------------------- labels


def test_normalize_text():
    assert normalize_text("  Dense_Residential-Area!! ") == "dense residential area"
    assert normalize_text("Café\tNoël") == "cafe noel"
    assert normalize_text("船") == ""


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("farmland", "farmland"),
        ("The scene is FARMLAND.", "farmland"),
        ("farmlands", "farmland"),
        ("dense residential", "dense residential"),  # longest match, not also "residential"
        ("Dense_Residential", "dense residential"),
        ("denseresidential", "dense residential"),
        ("residential", "residential"),
        ("harbour", "harbor"),
        ("aeroplane", "airplane"),
        ("planes", "airplane"),
        ("farmland or forest", None),
        ("farmland, forest, harbor", None),
        ("a desert", None),
        ("", None),
    ],
)
def test_parse_label(answer, expected):
    assert parse_label(answer, SCENES) == expected


def test_parse_label_exact_names_beat_synonyms_and_shared_synonyms_are_dropped():
    assert parse_label("plane", ("airplane", "plane")) == "plane"
    assert parse_label("aircraft", ("airplane", "plane")) is None
    assert parse_label("brook", ("creek",), synonyms=(("creek", "brook"),)) == "creek"


def test_parse_labels_and_split_items():
    classes = ("ship", "storage tank", "airplane", "harbor")
    assert parse_labels("Ships, storagetanks and planes; ship", classes) == [
        "ship",
        "storage tank",
        "airplane",
    ]
    assert parse_labels("nothing here", classes) == []
    assert split_items("ship, storage tank and plane / harbor;ship") == [
        "ship",
        "storage tank",
        "plane",
        "harbor",
    ]


# --------------------------------------------------------------------------- numbers, yes/no


@pytest.mark.parametrize(
    "answer, number, count",
    [
        ("3", 3.0, 3.0),
        ("3.5", 3.5, 3.5),
        ("There are 21 ships.", 21.0, 21.0),
        ("three", 3.0, 3.0),
        ("Twenty-One", 21.0, 21.0),
        ("one hundred and five", 105.0, 105.0),
        ("a dozen", 12.0, 12.0),
        ("two thousand three hundred", 2300.0, 2300.0),
        ("1,234", 1234.0, 1234.0),
        ("zero", 0.0, 0.0),
        ("3 or 4", None, None),
        ("three or four", None, None),
        ("3 and three", 3.0, 3.0),
        ("none", None, 0.0),
        ("There are no ships.", None, 0.0),
        ("-2", -2.0, None),
        ("1e400", None, None),
        ("1e300", 1e300, 1e300),
        ("many", None, None),
        ("", None, None),
    ],
)
def test_parse_number_and_count(answer, number, count):
    assert parse_number(answer) == number
    assert parse_count(answer) == count


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("yes", True),
        ("Yes, there is a ship.", True),
        ("NO.", False),
        ("no change", False),
        ("true", True),
        ("yes or no", None),
        ("maybe", None),
        ("", None),
    ],
)
def test_parse_yes_no(answer, expected):
    assert parse_yes_no(answer) is expected


@pytest.mark.parametrize(
    "answer, expected",
    [("none", True), ("No objects found.", True), ("[]", True), ("no ship", False), ("3", False),
     ("[ ]", True), ("{}", True), ("```json\n[]\n```", True), ("```\n[ ]```", True),
     ("[[]]", False), ("[] [1, 2, 3, 4]", False), ("```json\n[1]\n```", False)],
)
def test_says_none(answer, expected):
    assert says_none(answer) is expected


@pytest.mark.parametrize(
    "question, expected",
    [
        ("Which are more numerous, ships or storage tanks?", ("ships", "storage tanks")),
        ("Farmland, forest or water: which is it?", ("farmland", "forest", "water")),
        ("Which is larger, the harbor or the bridge? Be brief.", ("the harbor", "the bridge")),
        ("Is it a plane or a ship?", ("it a plane", "a ship")),
        ("Are there any ships?", ()),
        ("Count the ships (planes or not).", ("planes", "not")),
        (None, ()),
    ],
)
def test_offered_choices(question, expected):
    assert offered_choices(question) == expected


def test_named_choices_by_whole_choice_or_an_ending_no_other_shares():
    choices = ("ships", "storage tanks", "oil tanks")
    assert named_choices("storage tanks", choices) == {1}
    assert named_choices("ship", choices) == {0}
    assert named_choices("tanks", choices) == set()  # shared ending: names neither
    assert named_choices("ships and oil tanks", choices) == {0, 2}
    # A content word no other choice has names its choice; "an", "it" name nothing.
    rsvqa = offered_choices("Is it a rural or an urban area?")
    assert named_choices("urban", rsvqa) == {1} and named_choices("rural", rsvqa) == {0}
    assert named_choices("rural or urban", rsvqa) == {0, 1}
    assert named_choices("it is an area", rsvqa) == {1}


def test_valid_unicode_replaces_only_lone_surrogates():
    text = "caf\u00e9 \U0001f6f0"
    assert valid_unicode(text) is text
    assert valid_unicode("a\ud800b\udfff") == "a?b?"
    valid_unicode("\udc80" * 10).encode("utf-8")


@pytest.mark.parametrize(
    "text, expected",
    [("3", True), ("twenty-one", True), ("a dozen", True), ("3 ships", False), ("yes", False),
     ("", False), (None, False), ("one hundred and five", True)],
)
def test_is_number(text, expected):
    assert is_number(text) is expected


@pytest.mark.parametrize(
    "run, three, value_of_2000",
    [("hundred", 1e6, None), ("a dozen", 12.0**3, None), ("thousand", 3000.0, 2e6)],
)
def test_number_word_runs_stop_at_the_limit_instead_of_overflowing(run, three, value_of_2000):
    # A run worth more than 1e15 is no number; "thousand thousand ..." only adds up.
    assert parse_number(" ".join([run] * 3)) == three
    assert parse_number(" ".join([run] * 2000)) == value_of_2000
    assert parse_count(" ".join([run] * 2000)) == value_of_2000


# --------------------------------------------------------------------------- boxes


def test_boxes_in_each_convention_hand_computed():
    size = (800, 600)
    pixels = parse_boxes("[10, 20, 30.5, 40]", size, convention="pixels")
    np.testing.assert_allclose(pixels, [[10, 20, 30.5, 40]])
    q2 = parse_boxes("[100, 200, 500, 1000]", size, convention="qwen2vl")
    np.testing.assert_allclose(q2, [[80, 120, 400, 600]])
    q25 = parse_boxes("[406, 294, 812, 588]", size, convention="qwen25vl", resized_size=(812, 588))
    np.testing.assert_allclose(q25, [[400, 300, 800, 600]])
    geo = parse_boxes("{<10><20><30><40>}", size, convention="pixels")
    np.testing.assert_allclose(geo, [[80, 120, 240, 240]])


def test_qwen25vl_default_resized_size_follows_smart_resize():
    size = (1000, 700)
    h_bar, w_bar = smart_resize(
        700, 1000, factor=28, min_pixels=4 * 28 * 28, max_pixels=16384 * 784
    )
    out = parse_boxes(f"[0, 0, {w_bar / 2}, {h_bar}]", size)
    np.testing.assert_allclose(out, [[0, 0, 500, 700]])


def test_geochat_rotated_box_and_its_enclosing_box_against_shapely():
    size = (800, 600)
    rot = parse_boxes("{<10><20><30><40>|<30>}", size, rotated=True)
    np.testing.assert_allclose(rot, [[160, 180, 160, 120, 30]])
    rect = affinity.rotate(shapely_box(80, 120, 240, 240), 30, origin="centroid")
    hbb = parse_boxes("{<10><20><30><40>|<30>}", size)
    np.testing.assert_allclose(hbb, [rect.bounds], atol=1e-9)


def test_rotated_list_read_in_convention_and_axis_aligned_box_gets_angle_zero():
    size = (500, 400)
    out = parse_boxes("[100, 100, 40, 20, -45]", size, rotated=True, convention="qwen2vl")
    np.testing.assert_allclose(out, [[50, 40, 20, 8, -45]])
    out = parse_boxes("[10, 20, 50, 30]", size, rotated=True, convention="pixels")
    np.testing.assert_allclose(out, [[30, 25, 40, 10, 0]])
    out = parse_boxes("[10, 20, 50, 30, 540]", size, rotated=True, convention="pixels")
    np.testing.assert_allclose(out, [[10, 20, 50, 30, -180]])


def test_floats_negatives_swapped_corners_and_clipping():
    size = (100, 50)
    out = parse_boxes("(-10.5, 60, 30.25, -5) and [90, 10, 500, 20]", size, convention="pixels")
    np.testing.assert_allclose(out, [[0, 0, 30.25, 50], [90, 10, 100, 20]])


def test_non_finite_and_malformed_boxes():
    size = (100, 100)
    assert parse_boxes("[1e400, 0, 10, 10]", size, convention="pixels").shape == (0, 4)
    assert parse_boxes("[1e300, 0, 10, 10]", size, convention="pixels").tolist() == [
        [10, 0, 100, 10]
    ]
    for text in ("[1, 2, 3]", "[1, 2, 3, 4, 5, 6]", "[nan, 1, 2, 3]", "[a, b, c, d]", "", None):
        assert parse_boxes(text, size, convention="pixels").shape == (0, 4)
    with pytest.raises(ValueError, match="convention"):
        parse_boxes("[1, 2, 3, 4]", size, convention="yolo")
    with pytest.raises(ValueError, match="image_size"):
        parse_boxes("[1, 2, 3, 4]", (0, 10))


def test_nested_lists_order_and_flood_cap():
    out = parse_boxes("[[1, 2, 3, 4], [5, 6, 7, 8]]", (10, 10), convention="pixels")
    np.testing.assert_allclose(out, [[1, 2, 3, 4], [5, 6, 7, 8]])
    flood = ", ".join(f"[{i % 7}, 1, {i % 7 + 2}, 3]" for i in range(MAX_BOXES + 50))
    assert parse_boxes(flood, (10, 10), convention="pixels").shape == (MAX_BOXES, 4)


def test_random_boxes_round_trip_through_text():
    rng = np.random.default_rng(7)
    size = (640, 480)
    for convention, scale in (
        ("pixels", (1, 1)),
        ("qwen2vl", (0.64, 0.48)),
        ("geochat", (6.4, 4.8)),
    ):
        xs, ys = np.sort(rng.uniform(0, 100, size=(2, 9, 2)), axis=2)
        raw = np.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], axis=1)
        text = " ".join("[" + ", ".join(f"{v:.6f}" for v in row) + "]" for row in raw)
        if convention == "geochat":
            text = " ".join("{" + "".join(f"<{v:.6f}>" for v in row) + "}" for row in raw)
        expected = raw * np.array([scale[0], scale[1], scale[0], scale[1]])
        out = parse_boxes(text, size, convention=convention)
        np.testing.assert_allclose(out, expected, atol=1e-5)


def test_qwen25vl_json_boxes_with_labels():
    answer = (
        '```json\n[{"bbox_2d": [10, 20, 30, 40], "label": "ship"},\n'
        ' {"label": "storage tank", "bbox_2d": [-5, 2, 3000, 4]},\n'
        ' {"bbox_2d": [1e400, 2, 3, 4], "label": "lost"}]\n```, and [1, 2, 3, 4]'
    )
    boxes, labels = parse_labeled_boxes(answer, (800, 600), convention="pixels")
    np.testing.assert_allclose(boxes, [[10, 20, 30, 40], [0, 2, 800, 4], [1, 2, 3, 4]])
    assert labels == ["ship", "storage tank", None]


def test_strip_boxes():
    text = "a red ship [12, 30, 40, 52] is moored near a tank {<1><2><3><4>|<5>}."
    assert strip_boxes(text) == "a red ship is moored near a tank ."


# --------------------------------------------------------------------------- per task


def _target(task, **kw):
    kw.setdefault("answer", "")
    kw.setdefault("image_size", (100, 100))
    return Target(task=task, **kw)


def test_parse_for_task_classification():
    t = _target("scene_cls", label="forest", classes=SCENES)
    assert parse_for_task("It is a forest.", t) == "forest"
    assert parse_for_task("forest or farmland", t) is None
    no_vocab = _target("temporal_cls", label="new building")
    assert parse_for_task("New buildings", no_vocab) == "new building"
    assert parse_for_task("a new building appeared", no_vocab) is None
    ml = _target("multilabel_cls", labels=("ship",), classes=("ship", "harbor"))
    assert parse_for_task("harbour and ships", ml) == ["harbor", "ship"]
    assert parse_for_task("none", ml) == []
    assert parse_for_task("cars", ml) is None
    ml_no_vocab = _target("multilabel_cls", labels=("storage tank",))
    assert parse_for_task("storage tanks, cars", ml_no_vocab) == ["storage tank", "cars"]


def test_parse_for_task_boxes_numbers_and_text():
    det = _target("multi_det", boxes=np.array([[1.0, 2, 3, 4]]), box_format="xyxy")
    assert parse_for_task("[1, 2, 3, 4]", det, convention="pixels").shape == (1, 4)
    assert parse_for_task("No objects.", det).shape == (0, 4)
    assert parse_for_task("somewhere on the left", det) is None
    rot = _target("referred_det_rot", boxes=np.zeros((1, 5)), box_format="rotated")
    assert parse_for_task("[5, 5, 2, 2, 10]", rot, convention="pixels").shape == (1, 5)
    assert parse_for_task("seven", _target("counting", count=7)) == 7.0
    assert parse_for_task("Yes.", _target("change_det", label="yes")) is True
    assert parse_for_task("Yes.", _target("vqa", label="no")) is True
    assert parse_for_task("A Ship!", _target("vqa", label="ship")) == "a ship"
    assert parse_for_task("  A quiet harbor. ", _target("image_caption")) == "A quiet harbor."
    assert parse_for_task("...", _target("image_caption")) is None
    grounded = _target("grounding_desc", boxes=np.array([[1.0, 2, 3, 4]]), box_format="xyxy")
    text, boxes = parse_for_task("a ship [1, 2, 3, 4] at sea", grounded, convention="pixels")
    assert text == "a ship at sea" and boxes.tolist() == [[1, 2, 3, 4]]
    assert parse_for_task("a ship at sea", grounded) is None
    assert parse_for_task("   ", grounded) is None
    assert parse_for_task(None, grounded) is None
    assert math.isfinite(parse_for_task("1e300", _target("counting", count=1)))
