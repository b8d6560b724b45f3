"""Evaluation metrics against hand-computed values on fixture predictions and against oracles:
pycocotools (pooled AP), shapely (rotated IoU), rouge-score and pycocoevalcap (captions)."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
from shapely import affinity
from shapely.geometry import box as shapely_box

from geovlm import metrics as M
from geovlm.data.schema import Target
from geovlm.tasks._labels import label_correct
from geovlm.tasks.multilabel_cls import multilabel_metrics
from geovlm.tasks.vqa import vqa_correct
from tests.fixtures_eval import load

METEOR = "coco"  # pycocoevalcap's Java METEOR, the evaluation default


def _rows(name: str, task: str) -> tuple[list[str], list[Target]]:
    rows = [r for r in load(name) if r[1] == task]
    assert rows, f"no {task} rows in {name}"
    return [r[2] for r in rows], [r[3] for r in rows]


def _metrics(name: str, task: str, **kwargs) -> dict:
    completions, targets = _rows(name, task)
    return M.task_metrics(task, completions, targets, **kwargs)


# --------------------------------------------------------------------------- answers


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<think>a</think><answer> farmland </answer>", "farmland"),
        ("farmland", "farmland"),  # no tags at all: a plain answer
        ("<think>farmland</think>", None),  # tags but no answer block
        ("<think>x</think><answer>trunc", None),
        ("<answer>a</answer><answer>b</answer>", "b"),
        ("", ""),
    ],
)
def test_answer_text(completion, expected):
    assert M.answer_text(completion) == expected


def test_answer_text_skips_echoed_prompt_block():
    prompt = "Answer like <answer>forest</answer>."
    assert M.answer_text("<answer>forest</answer>", prompt) is None
    assert M.answer_text("<answer>forest</answer><answer>water</answer>", prompt) == "water"


# --------------------------------------------------------------------------- classification


def test_classification_fixture():
    # sc1 "Farmland" right; sc2 hedges "farmland or forest"; sc3 plain "forest" right;
    # sc4 only thinks: 2 / 4.
    assert _metrics("classification", "scene_cls") == {"accuracy": 0.5}
    # cd1 yes/yes, cd2 "No." for yes, cd3 no/no: 2 / 3.
    assert _metrics("classification", "change_det") == pytest.approx({"accuracy": 2 / 3})


def test_multilabel_fixture():
    # ml1 {ship, storage tank} exactly; ml2 {ship, plane, vehicle} for {ship}: P 1/3, R 1,
    # F1 2*1/(3+1) = 1/2; ml3 empty answer for {plane, vehicle}: 0 everywhere.
    got = _metrics("classification", "multilabel_cls")
    assert got == pytest.approx(
        {"precision": (1 + 1 / 3) / 3, "recall": 2 / 3, "f1": 0.5, "exact_match": 1 / 3}
    )


def test_counting_fixture():
    # 3/3 right, "two"/2 right, 5/4 wrong (error 1), "none"/0 right, "1 or 2" unanswered.
    got = _metrics("classification", "counting")
    assert got == pytest.approx({"accuracy": 3 / 5, "mae": 1 / 4, "answered": 4 / 5})


def test_vqa_fixture_by_question_type():
    # presence: Yes/yes right, yes/no wrong; comparison: "ship" for "ships" right, no/no right.
    got = _metrics("classification", "vqa")
    assert got == pytest.approx(
        {"accuracy": 3 / 4, "accuracy/presence": 1 / 2, "accuracy/comparison": 1.0}
    )


def test_vqa_open_answer_rules():
    target = Target(task="vqa", answer="3", image_size=(112, 112), label="3")
    assert vqa_correct("three", target)
    assert not vqa_correct("3 or 4", target)
    target = Target(task="vqa", answer="planes", image_size=(112, 112), label="planes")
    assert vqa_correct("Planes.", target)
    assert not vqa_correct("planes or ships", target)


# --------------------------------------------------------------------------- referred detection


def test_referred_detection_fixture():
    # rd1 small: IoU 80/100 -> hit. rd2 large: IoU 1200/3600 -> miss. rd3 medium, 2 gt boxes,
    # the answer repeats the first one: one-to-one TP 1 of max(2, 2) -> 0.5, but both predicted
    # boxes hit some gt (EarthDial: 2/2). rd4 large: thinks only -> no box -> 0, no prediction.
    got = _metrics("detection", "referred_det")
    assert got == pytest.approx(
        {
            "acc@0.5": (1 + 0 + 0.5 + 0) / 4,
            "acc@0.5/small": 1.0,
            "acc@0.5/medium": 0.5,
            "acc@0.5/large": 0.0,
            "acc@0.5/single": 1 / 3,
            "acc@0.5/multiple": 0.5,
            "box_precision@0.5": 3 / 4,
            "box_precision@0.5/small": 1.0,
            "box_precision@0.5/medium": 1.0,
            "box_precision@0.5/large": 0.0,
            "box_precision@0.5/single": 1 / 2,
            "box_precision@0.5/multiple": 1.0,
            # matched IoU over max(P, G): 0.8, 1/3, (1 + 0) / 2, no box 0.
            "mean_iou": (0.8 + 1 / 3 + 0.5 + 0) / 4,
        }
    )


def test_rotated_detection_uses_rotated_iou():
    # rr1: the gt box written with angle 225 = 45 + 180, the same rectangle -> IoU 1.
    # rr2: the axis-aligned hull of the 40x10 box at 45 degrees (side 50/sqrt 2): its hull IoU
    # would be 1, the rotated IoU is 400 / 1250 = 0.32 -> miss.
    got = _metrics("detection", "referred_det_rot")
    assert got["acc@0.5"] == pytest.approx(0.5)
    assert got["acc@0.5/medium"] == pytest.approx(0.5)
    completions, targets = _rows("detection", "referred_det_rot")
    answers = [M.answer_text(c) for c in completions]
    pred = M.predicted_boxes(answers[1], targets[1], "qwen25vl")
    from geovlm.rewards.geometry import iou_pairs

    assert iou_pairs(pred, targets[1].boxes)[0] == pytest.approx(400 / 1250, abs=1e-3)


def _shapely_rotated(box):
    cx, cy, w, h, angle = box
    return affinity.rotate(shapely_box(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), angle)


def test_rotated_acc_matches_shapely_on_random_boxes():
    rng = np.random.default_rng(7)
    completions, targets, expected = [], [], []
    for _ in range(23):
        gt = np.array([rng.uniform(30, 80), rng.uniform(30, 80), rng.uniform(8, 40),
                       rng.uniform(8, 40), rng.uniform(-90, 90)])
        pred = gt + np.array([*rng.normal(0, 4, 2), *rng.normal(0, 4, 2), rng.normal(0, 25)])
        pred[2:4] = np.abs(pred[2:4]) + 1
        text = "[" + ", ".join(f"{v:.4f}" for v in pred) + "]"
        completions.append(f"<answer>{text}</answer>")
        targets.append(Target(task="referred_det_rot", answer="", image_size=(112, 112),
                              boxes=gt[None], box_format="rotated"))
        a, b = _shapely_rotated(pred), _shapely_rotated(gt)
        expected.append(a.intersection(b).area / a.union(b).area >= 0.5)
    got = M.task_metrics("referred_det_rot", completions, targets)
    assert 0 < np.mean(expected) < 1
    assert got["acc@0.5"] == pytest.approx(np.mean(expected))


def _xyxy_iou(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union


def test_mean_iou_is_the_optimal_matching_over_the_larger_box_count():
    from scipy.optimize import linear_sum_assignment

    rng = np.random.default_rng(11)
    completions, targets, expected = [], [], []
    for n_gt, n_pred in [(1, 1)] * 6 + [(1, 2), (2, 1), (3, 3), (2, 3), (3, 2), (1, 0)]:
        gt = rng.uniform(0, 60, (n_gt, 2))
        gt = np.c_[gt, gt + rng.uniform(8, 40, (n_gt, 2))]
        pred = gt[rng.integers(0, n_gt, n_pred)] + rng.normal(0, 5, (n_pred, 4))
        pred = np.clip(np.c_[pred[:, :2], np.maximum(pred[:, 2:], pred[:, :2] + 1)], 0, 112)
        pred = np.round(pred, 3)  # what the answer text says
        text = ", ".join("[" + ", ".join(f"{v:.3f}" for v in box) + "]" for box in pred)
        completions.append(f"<answer>{text or 'none'}</answer>")
        targets.append(Target(task="referred_det", answer="", image_size=(112, 112),
                              boxes=gt, box_format="xyxy"))
        iou = np.array([[_xyxy_iou(p, g) for g in gt] for p in pred]).reshape(n_pred, n_gt)
        rows, cols = linear_sum_assignment(iou, maximize=True)
        expected.append(iou[rows, cols].sum() / max(n_pred, n_gt))
    got = M.task_metrics("referred_det", completions, targets)
    assert 0.2 < np.mean(expected) < 0.9
    assert got["mean_iou"] == pytest.approx(np.mean(expected), abs=1e-9)


def test_rotated_mean_iou_uses_rotated_iou():
    # rr1: the same rectangle -> 1; rr2: the hull of the rotated box -> 400 / 1250.
    got = _metrics("detection", "referred_det_rot")
    assert got["mean_iou"] == pytest.approx((1 + 400 / 1250) / 2, abs=1e-3)


def test_size_bucket_meta_then_area():
    def target(box, meta=None):
        return Target(task="referred_det", answer="", image_size=(200, 100),
                      boxes=np.array([box], float), box_format="xyxy", meta=meta or {})

    # Thresholds 1.5% and 4% of 20,000 px: 300 and 800 px.
    assert M.size_bucket(target([0, 0, 10, 29])) == "small"  # 290
    assert M.size_bucket(target([0, 0, 10, 31])) == "medium"  # 310
    assert M.size_bucket(target([0, 0, 10, 81])) == "large"  # 810
    assert M.size_bucket(target([0, 0, 10, 81], {"size": "small"})) == "small"


def test_no_gt_and_no_prediction_is_right():
    target = Target(task="referred_det", answer="none", image_size=(112, 112),
                    boxes=np.zeros((0, 4)), box_format="xyxy")
    got = M.task_metrics("referred_det", ["<answer>none</answer>", "<answer>[1, 1, 9, 9]</answer>"],
                         [target, target])
    assert got["acc@0.5"] == 0.5
    assert got["box_precision@0.5"] == 0.0


# --------------------------------------------------------------------------- detection mAP


def test_detection_fixture_map():
    # ship: md1 2 hits, md2 IoU 0.4 (miss at 0.5, hit at 0.25); plane: md3 no box.
    # AP@0.5 ship: ranked tp, tp, fp -> recall 1/3, 2/3, 2/3 at precision 1, 1, 2/3: the 67
    # recall points 0..0.66 read precision 1, the rest 0 -> 67/101. AP@0.25 ship: 1.
    # plane: no detection -> 0. f1@0.5: md1 1, md2 0, md3 0.
    got = _metrics("detection", "multi_det")
    assert got == pytest.approx({"mAP@0.5": 67 / 101 / 2, "mAP@0.25": 0.5, "f1@0.5": 1 / 3})


def _coco_ap(preds, scores, gts, threshold):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, annotations, detections = [], [], []
    for i, (pred, score, gt) in enumerate(zip(preds, scores, gts, strict=True)):
        images.append({"id": i + 1, "width": 200, "height": 200})
        for box in gt:
            annotations.append({
                "id": len(annotations) + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 0,
                "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                "area": float((box[2] - box[0]) * (box[3] - box[1])),
            })
        for box, s in zip(pred, score, strict=True):
            detections.append({"image_id": i + 1, "category_id": 1, "score": float(s),
                               "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = {"images": images, "annotations": annotations,
                        "categories": [{"id": 1, "name": "x"}]}
        coco.createIndex()
        result = coco.loadRes(detections)
        evaluator = COCOeval(coco, result, "bbox")
        evaluator.params.iouThrs = np.array([threshold])
        evaluator.params.maxDets = [1000]
        evaluator.params.areaRng = [[0, 1e10]]
        evaluator.params.areaRngLbl = ["all"]
        evaluator.evaluate()
        evaluator.accumulate()
    precision = evaluator.eval["precision"][0, :, 0, 0, 0]
    return float(precision.mean())


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("threshold", [0.5, 0.25])
@pytest.mark.parametrize("tied", [False, True])
def test_pooled_ap_matches_pycocotools(seed, threshold, tied):
    rng = np.random.default_rng(seed)
    preds, scores, gts = [], [], []
    for _ in range(9):
        n_gt = int(rng.integers(0, 5))
        gt = np.sort(rng.uniform(0, 190, (n_gt, 2, 2)), axis=1)
        gt = np.concatenate([gt[:, 0], gt[:, 0] + rng.uniform(6, 40, (n_gt, 2))], axis=1)
        n_pred = int(rng.integers(0, 6))
        if n_gt:
            base = gt[rng.integers(0, n_gt, n_pred)]
        else:
            base = rng.uniform(0, 150, (n_pred, 4))
        pred = base + rng.normal(0, 6, (n_pred, 4))
        pred[:, 2:] = np.maximum(pred[:, 2:], pred[:, :2] + 2)
        preds.append(pred)
        gts.append(gt)
        scores.append(np.ones(n_pred) if tied else rng.uniform(0, 1, n_pred))
    if sum(len(g) for g in gts) == 0:
        pytest.skip("no gt drawn")
    got = M.pooled_average_precision(preds, gts, threshold, None if tied else scores)
    assert 0 < got < 1
    assert got == pytest.approx(_coco_ap(preds, scores, gts, threshold), abs=1e-12)


def test_pooled_ap_without_gt_is_absent():
    assert M.pooled_average_precision([np.ones((1, 4))], [np.zeros((0, 4))], 0.5) is None


# --------------------------------------------------------------------------- captions


def test_region_caption_fixture_rouge_by_hand():
    # rc1 "a ship in water" vs "a red ship": 2 shared unigrams, P 2/4, R 2/3 -> F 4/7; the LCS
    # "a ship" gives the same ROUGE-L. rc2 has no answer: the empty sentence scores 0.
    got = _metrics("captions", "region_caption", meteor_backend=METEOR)
    assert set(got) == {"rouge_1", "rouge_l", "meteor"}
    assert got["rouge_1"] == pytest.approx(2 / 7)
    assert got["rouge_l"] == pytest.approx(2 / 7)
    # METEOR is the corpus score of exactly these sentences (rewards.meteor is tested against
    # pycocoevalcap's jar; starting a second Java process here would only repeat that).
    from geovlm.rewards.meteor import corpus_meteor

    expected = corpus_meteor(["a ship in water", ""], [["a red ship"], ["a white plane"]])
    assert 0 < got["meteor"] == pytest.approx(expected, abs=1e-12)


def test_grounding_fixture_boxes_and_text_by_hand():
    # gd1: both boxes exact; its text "a red ship near a tank" is a subsequence of the 7 stemmed
    # tokens of "a red ship near a storage tank": P 1, R 6/7 -> F 12/13 (ROUGE-1 and -L).
    # gd2: its box misses; "a ship" vs "a white plane": P 1/2, R 1/3 -> F 2/5.
    got = _metrics("captions", "grounding_desc", meteor_backend=METEOR)
    assert got["acc@0.5"] == got["acc@0.25"] == pytest.approx(0.5)
    assert got["box_precision@0.5"] == got["box_precision@0.25"] == pytest.approx(2 / 3)
    assert got["rouge_1"] == pytest.approx((12 / 13 + 2 / 5) / 2)
    assert got["rouge_l"] == pytest.approx((12 / 13 + 2 / 5) / 2)
    from geovlm.rewards.meteor import corpus_meteor

    expected = corpus_meteor(["a red ship near a tank", "a ship"],
                             [["a red ship near a storage tank"], ["a white plane"]])
    assert got["meteor"] == pytest.approx(expected, abs=1e-12)


def _rsicd(n_groups: int = 12, refs_per_group: int = 3):
    """Real captions: per RSICD scene category, one caption as the candidate and the next
    ``refs_per_group`` of the same category as its references."""
    import json
    from pathlib import Path

    pairs = json.loads(Path("/work/shared/data/rsicd_test_captions.json").read_text())["pairs"]
    by_category: dict[str, list[str]] = {}
    for pair in pairs:
        name = pair["image_filename"]
        if "_" in name:
            by_category.setdefault(name.rsplit("_", 1)[0], []).append(pair["caption"])
    groups = [v for _, v in sorted(by_category.items()) if len(v) > refs_per_group][:n_groups]
    candidates = [g[0] for g in groups]
    references = [g[1 : 1 + refs_per_group] for g in groups]
    return candidates, references


@pytest.fixture(scope="module")
def coco_tokenized():
    """The RSICD captions through pycocoevalcap's own Java PTBTokenizer (started once)."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    candidates, references = _rsicd()
    gts = {i: [{"caption": r} for r in refs] for i, refs in enumerate(references)}
    res = {i: [{"caption": c}] for i, c in enumerate(candidates)}
    with contextlib.redirect_stdout(io.StringIO()):
        tokenizer = PTBTokenizer()
        return tokenizer.tokenize(gts), tokenizer.tokenize(res)


def test_image_caption_metrics_match_pycocoevalcap_and_rouge_score(coco_tokenized):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from rouge_score import rouge_scorer

    candidates, references = _rsicd()
    targets = [Target(task="image_caption", answer=r[0], image_size=(224, 224), captions=tuple(r))
               for r in references]
    got = M.task_metrics("image_caption", [f"<answer>{c}</answer>" for c in candidates],
                         targets, meteor_backend=METEOR)
    gts, res = coco_tokenized
    with contextlib.redirect_stdout(io.StringIO()):
        bleu, _ = Bleu(4).compute_score(gts, res)
        cider, _ = Cider().compute_score(gts, res)

    for n in range(4):
        assert got[f"bleu_{n + 1}"] == pytest.approx(bleu[n], rel=1e-9, abs=1e-12)
    assert got["cider"] == pytest.approx(cider, rel=1e-9)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    per_sample = [[scorer.score(r, c) for r in refs] for c, refs in zip(candidates, references,
                                                                         strict=True)]
    for key, name in (("rouge1", "rouge_1"), ("rougeL", "rouge_l")):
        expected = np.mean([np.mean([s[key].fmeasure for s in row]) for row in per_sample])
        assert got[name] == pytest.approx(expected, rel=1e-12)
    assert 0 < got["bleu_4"] < got["bleu_1"] < 1
    assert got["cider"] > 0


def test_change_caption_fixture_has_the_full_set():
    got = _metrics("captions", "change_caption", meteor_backend=METEOR)
    assert set(got) == {"rouge_1", "rouge_l", "meteor", "bleu_1", "bleu_2", "bleu_3", "bleu_4",
                        "cider"}
    assert all(0 <= v <= 1 for k, v in got.items() if k != "cider")


def test_meteor_backend_is_routed():
    from geovlm.rewards.meteor import corpus_meteor

    got = _metrics("captions", "region_caption", meteor_backend="nltk")
    expected = corpus_meteor(["a ship in water", ""], [["a red ship"], ["a white plane"]],
                             backend="nltk")
    assert got["meteor"] == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="backend"):
        _metrics("captions", "region_caption", meteor_backend="bleu")


def test_label_without_vocabulary():
    target = Target(task="scene_cls", answer="Forest", image_size=(112, 112), label="Forest")
    assert label_correct("It is a forest.", target)
    assert label_correct("forests", target)
    assert not label_correct("farmland", target)


def test_multilabel_without_vocabulary():
    target = Target(task="multilabel_cls", answer="", image_size=(112, 112),
                    labels=("ship", "storage tank"))
    # "ships" and "storage tanks" are the two labels, "trees" an extra class: P 2/3, R 1.
    got = multilabel_metrics(["ships, storage tanks and trees"], [target])
    assert got == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "exact_match": 0})
