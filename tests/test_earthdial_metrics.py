"""The earthdial protocol (geovlm/earthdial_metrics.py) against hand-computed values, shapely
(EarthDial's own IoU: its vertex function + shapely polygons), rouge-score and NLTK's METEOR."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from geovlm import earthdial_metrics as E
from geovlm.data.earthdial import read_results
from geovlm.metrics import MetricOptions, task_metrics

RESULTS = Path(__file__).parent / "fixtures" / "earthdial"
SCRIPT = MetricOptions(convention="geochat")
FIXED = MetricOptions(convention="geochat", earthdial_fixes=True)


def _results(tmp_path, records, name="bench"):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return read_results(path)


def _score(samples, answers, options, task=None):
    task = task or samples[0].task
    return task_metrics(task, answers, [s.target for s in samples], convention=options.convention,
                        protocol="earthdial", earthdial_fixes=options.earthdial_fixes)


# --------------------------------------------------------------------------- token recall


@pytest.mark.parametrize(
    ("reference", "candidate", "script", "fixed"),
    [
        ("MediumResidential", "Medium Residential", 1.0, 1.0),  # spaces removed on both sides
        ("forest", "Forest.", 1.0, 1.0),  # "." is a token of its own
        ("yes", "no", 0.0, 0.0),
        # "a,b,c" -> a , b , c: the commas count (5 tokens, 3 in common); fixed: 2 of 3 classes
        ("a, b, c", "a, b", 0.6, 2 / 3),
        ("Arable land, Pastures", "Pastures", 1 / 3, 1 / 2),
        ("dense forest", "forest", 0.0, 0.0),  # "denseforest" is one token
    ],
)
def test_token_recall(reference, candidate, script, fixed):
    assert E.token_recall(reference, candidate) == pytest.approx(script)
    assert E.token_recall(reference, candidate, fixed=True) == pytest.approx(fixed)


def test_word_tokenize_splits_sentences_and_the_final_period():
    assert E.word_tokenize("A plane. A car.") == ["A", "plane", ".", "A", "car", "."]
    assert E.word_tokenize("a,b") == ["a", ",", "b"]


def test_classification_and_vqa_on_earthdial_results():
    samples, answers = read_results(RESULTS / "AID.jsonl")
    assert _score(samples, answers, SCRIPT) == {"accuracy": 1.0}
    samples, answers = read_results(RESULTS / "RSVQA_LR.jsonl")
    # presence / comp / rural_urban are right; the "count" record (427 for 403) is not scored.
    expected = {"accuracy/presence": 1.0, "accuracy/comp": 1.0, "accuracy/rural_urban": 1.0}
    assert _score(samples, answers, SCRIPT) == expected
    assert _score(samples, answers, FIXED) == {**expected, "accuracy/count": 0.0}


# --------------------------------------------------------------------------- boxes


def _earthdial_vertices(x1, y1, x2, y2, theta):
    """rs_detection/eval.py's get_rotated_box_vertices, the oracle's polygon."""
    c = np.array([(x1 + x2) / 2, (y1 + y2) / 2])
    rect = np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], dtype=np.float64)
    t = np.radians(theta)
    rotation = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    return (rect - c) @ rotation + c


def test_frame_iou_is_earthdials_shapely_iou():
    from shapely.geometry import Polygon

    rng = np.random.default_rng(17)
    a = np.column_stack([rng.uniform(0, 60, (300, 2)), rng.uniform(5, 40, (300, 2)),
                         rng.uniform(-180, 180, 300)])
    a[:, 2:4] += a[:, :2]
    b = a + np.column_stack([rng.normal(0, 6, (300, 4)), rng.uniform(-40, 40, 300)])
    got = np.array([E.frame_iou([p], [q])[0, 0] for p, q in zip(a, b, strict=True)])
    expected = []
    for p, q in zip(a, b, strict=True):
        pa, pb = Polygon(_earthdial_vertices(*p)), Polygon(_earthdial_vertices(*q))
        expected.append(pa.intersection(pb).area / pa.union(pb).area)
    np.testing.assert_allclose(got, expected, atol=1e-9)
    assert (np.array(expected) > 0.3).sum() > 30  # overlapping pairs, not only zeros
    # A degenerate box (zero height, as a few EarthDial boxes are) scores 0, as shapely's invalid
    # polygon does in the script.
    assert E.frame_iou([[53, 0, 56, 0, 0]], [[53, 0, 56, 0, 0]])[0, 0] == 0.0


def test_script_box_regexes():
    assert E.script_boxes("[[1, 2, 3, 4, 5]][[6,7,8,9]]") == [[1, 2, 3, 4, 5], [6, 7, 8, 9]]
    assert E.script_boxes("[[-1, 2, 3, 4, 5]] [[1.5, 2, 3, 4, 5]]") == []  # the regex's blind spot
    assert E.script_boxes5("[[1, 2, 3, 4], [5, 6, 7, 8, 9]]") == [[5, 6, 7, 8, 9]]


def test_count_hits_unreadable_ground_truth_ends_the_search():
    pred = [[0, 0, 10, 10, 0]]
    gts = [[1, 2, 3, 4], [0, 0, 10, 10, 0]]
    assert E.count_hits(pred, gts, 0.5) == 0
    assert E.count_hits(pred, gts, 0.5, fixed=True) == 1
    assert E.count_hits([[0, 0, 10, 10]], [[0, 0, 10, 10, 0]], 0.5) == 0  # 4 numbers never hit


def test_referred_detection_pooled_precision_by_group(tmp_path):
    q = "[refer] <image> \n Give me the location of <ref>x</ref>"
    records = [
        # small, single: 2 predictions, the first identical -> 1 hit
        {"question": q, "answer": "[[10, 10, 30, 30, 0]][[50, 50, 60, 60, 0]]",
         "gt_bbox": "[[10, 10, 30, 30, 0]]", "task_type": "ref", "size_group": "small"},
        # small, multiple: IoU 200 / 400 = 0.5 exactly -> a hit at 0.5
        {"question": q, "answer": "[[0, 0, 20, 10, 0]]",
         "gt_bbox": "[[0, 0, 20, 20, 0]][[40, 40, 60, 60, 0]]", "task_type": "ref",
         "size_group": "small"},
        # large, single: four numbers -> counted, never a hit (fixed: read axis-aligned, a hit)
        {"question": q, "answer": "[[10, 10, 50, 50]]", "gt_bbox": "[[10, 10, 50, 50, 0]]",
         "task_type": "ref", "size_group": "large"},
        # large: the gt's -2 hides it from the regex -> 0 gt boxes ("multiple"), no hit; fixed:
        # one gt box, IoU 40 * 40 / (42 * 40) -> a hit, "single"
        {"question": q, "answer": "[[0, 10, 40, 50, 0]]", "gt_bbox": "[[-2, 10, 40, 50, 0]]",
         "task_type": "ref", "size_group": "large"},
    ]
    samples, answers = _results(tmp_path, records)
    assert samples[2].target.meta["size"] == "large"  # size_group, not the area bucket
    script = _score(samples, answers, SCRIPT)
    for tau in ("0.5", "0.25"):
        assert script[f"precision@{tau}/small"] == pytest.approx(2 / 3)
        assert script[f"precision@{tau}/large"] == 0.0
        assert script[f"precision@{tau}/single"] == pytest.approx(1 / 3)
        assert script[f"precision@{tau}/multiple"] == pytest.approx(1 / 2)
        assert f"precision@{tau}/medium" not in script
    fixed = _score(samples, answers, FIXED)
    assert fixed["precision@0.5/small"] == pytest.approx(2 / 3)
    assert fixed["precision@0.5/large"] == 1.0
    assert fixed["precision@0.5/single"] == pytest.approx(3 / 4)
    assert fixed["precision@0.5/multiple"] == 1.0


def test_referred_detection_matches_the_script_on_real_results():
    """GeoChat's refer results: the script's loop (regex, vertices, shapely) as the oracle."""
    from shapely.geometry import Polygon

    samples, answers = read_results(RESULTS / "GeoChat_refer.jsonl")
    got = _score(samples, answers, SCRIPT)
    for tau in (0.5, 0.25):
        hits = preds = 0
        for sample, answer in zip(samples, answers, strict=True):
            gts = E.script_boxes(sample.target.meta["earthdial"]["boxes"])
            for p in E.script_boxes(answer):
                preds += 1
                poly = Polygon(_earthdial_vertices(*p))
                for g in gts:
                    other = Polygon(_earthdial_vertices(*g))
                    if poly.intersection(other).area / poly.union(other).area >= tau:
                        hits += 1
                        break
        assert got[f"precision@{tau:g}/small"] == pytest.approx(hits / preds)


def test_xbd_detection_zeroes_the_predicted_angle(tmp_path):
    q = "[refer] <image> <image> \\n Locate all large <ref>buildings</ref>."
    # 40 x 10 box against itself turned by 90 degrees: IoU 100 / 700; zeroed: identical.
    records = [{"question": q, "answer": "[[10, 10, 50, 20, 90]]",
                "caption0": "[[10, 10, 50, 20, 0]]", **{f"caption{k}": "" for k in range(1, 5)}}]
    samples, answers = _results(tmp_path, records)
    assert samples[0].task == "multi_det"
    assert _score(samples, answers, SCRIPT) == {"precision@0.5": 1.0, "precision@0.25": 1.0}


def test_grounding_precision_filter_and_description(tmp_path):
    many = "".join(f"[[{k}, 0, {k + 1}, 1, 0]]" for k in range(50))
    records = [
        {"question": "[grounding] <image> \n Describe the image.",
         "answer": "There is a ship [[10, 10, 30, 30, 0], [60, 60, 70, 70, 0]] at left.",
         "groundtruth": "There is <ref>a ship</ref> <box>[[[10, 10, 30, 30, 0]]]</box> at left.",
         "obj_ids": json.dumps(["[[10, 10, 30, 30, 0]]"]), "size_group": "[\"small\"]"},
        # 50 ground-truth boxes: left out of the precision and of the description scores
        {"question": "[grounding] <image> \n Describe the image.", "answer": "[[0, 0, 5, 5, 0]]",
         "groundtruth": f"Cars <box>{many}</box>.", "obj_ids": json.dumps([many]),
         "size_group": "[]"},
    ]
    samples, answers = _results(tmp_path, records)
    got = _score(samples, answers, SCRIPT)
    assert got["precision@0.5"] == 0.5 and got["precision@0.25"] == 0.5
    # "There is a ship  at left." on both sides: ROUGE 1; METEOR 6 matches in one chunk:
    # 1 - 0.5 * (1 / 6) ** 3
    assert got["rouge_1"] == 1.0 and got["rouge_l"] == 1.0
    assert got["meteor"] == pytest.approx(1 - 0.5 / 216)


# --------------------------------------------------------------------------- captions


def _nltk_meteor(references, candidate, tokenize):
    from nltk.translate.meteor_score import meteor_score

    from geovlm.rewards._wordnet import load_wordnet

    return meteor_score([tokenize(r) for r in references], tokenize(candidate),
                        wordnet=load_wordnet())


def test_region_caption_raw_texts(tmp_path):
    ref, cand = "1 gray small ship at the left", "1 ship at the left"
    records = [{"question": "[identify] <image> \\n what is in <box>[[1, 2, 30, 40, 0]]</box>",
                "answer": cand, "annotation": ref, "task_type": "ref", "size_group": "small"}]
    samples, answers = _results(tmp_path, records)
    assert samples[0].task == "region_caption"
    got = _score(samples, answers, SCRIPT)
    # 5 of the reference's 7 tokens, all 5 of the answer's: F = 2 * (5/7) / (1 + 5/7) = 5/6
    assert got["rouge_1"] == pytest.approx(5 / 6) and got["rouge_l"] == pytest.approx(5 / 6)
    assert got["meteor"] == pytest.approx(_nltk_meteor([ref], cand, str.split))


def test_caption_rouge_averages_over_references_and_change_caption_references(tmp_path):
    image = [{"question": " [caption] <image> \\n caption?", "answer": "a plane on the runway",
              "caption0": "a plane on the runway", "caption1": "many cars", "caption2": "many cars",
              "caption3": "many cars", "caption4": "many cars"}]
    samples, answers = _results(tmp_path, image, "img")
    got = _score(samples, answers, SCRIPT)
    assert got["rouge_1"] == pytest.approx(0.2) and got["rouge_l"] == pytest.approx(0.2)
    references = ["a plane on the runway"] + ["many cars"] * 4
    assert got["meteor"] == pytest.approx(
        _nltk_meteor(references, "a plane on the runway", E.word_tokenize))
    change = {"question": "[changedet] <image> <image> \\n changes?", "answer": "a road appeared"}
    alone = {**change, "caption0": "a road appeared", **{f"caption{k}": "" for k in range(1, 5)}}
    # caption1 given: all five references, the three empty ones included (fixed: dropped)
    five = {**alone, "caption1": "houses were built"}
    samples, answers = _results(tmp_path, [alone, five], "chg")
    assert {s.task for s in samples} == {"change_caption"}
    assert _score(samples, answers, SCRIPT)["rouge_1"] == pytest.approx((1 + 1 / 5) / 2)
    assert _score(samples, answers, FIXED)["rouge_1"] == pytest.approx((1 + 1 / 2) / 2)
