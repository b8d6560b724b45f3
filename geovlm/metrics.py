"""Evaluation metrics: the project's (``"geovlm"`` protocol) and the dispatch to every protocol.

``task_metrics(task, completions [C], targets [C])`` reads each completion's answer
(``answer_text``) and calls the task's metric function for the protocol asked
(``TaskSpec.metrics[protocol]`` in the task registry, ``geovlm.tasks``), which takes the
``answers`` (``str`` or ``None`` for no answer, ``C`` of them, all of one task), their ``targets``
(``geovlm.data.schema.Target``) and the ``MetricOptions``. Outputs: a flat
``{metric name: float}`` dict, JSON-ready.

This module holds what the task modules' metrics are built from: answer extraction, label
canonicalisation, box matching (acc@τ, EarthDial's box precision, size splits, COCO-style AP) and
caption metrics (ROUGE, METEOR, BLEU, CIDEr-D). Answers are read with the reward package's parsers
(``geovlm.rewards.parse``), boxes compared with its numba IoU kernels (``geovlm.rewards.geometry``),
texts with its text kernels (``geovlm.rewards.text``, ``geovlm.rewards.meteor``), so evaluation and
reward read a completion the same way.

Each metric's definition sits next to its code. Dataset-level numbers are means over samples
unless the docstring says "pooled" (summed over the dataset before dividing) or "corpus".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from geovlm.data.boxes import qwen25vl_resized_size
from geovlm.data.schema import Target
from geovlm.data.splits import size_bucket as area_bucket
from geovlm.rewards.accuracy import references
from geovlm.rewards.parse import (
    TAGS,
    extract_answer,
    normalize_text,
    parse_boxes,
    parse_label,
    strip_boxes,
)

SIZES = ("small", "medium", "large")


@dataclass(frozen=True)
class MetricOptions:
    """How the metrics read answers.

    Attributes:
        convention: the box convention of the model's answers (``geovlm.data.boxes``).
        pixel_budget: the processor's ``(min_pixels, max_pixels)``, which fixes the resized input
            size ``"qwen25vl"`` boxes are relative to (``None``: Qwen2.5-VL's default budget).
        meteor_backend: ``"coco"`` (pycocoevalcap's Java METEOR 1.5) or ``"nltk"``.
        earthdial_fixes: the ``"earthdial"`` protocol corrects its scripts' bugs instead of
            reproducing them (``geovlm.earthdial_metrics``).
    """

    convention: str = "qwen25vl"
    pixel_budget: tuple[int, int] | None = None
    meteor_backend: str = "coco"
    earthdial_fixes: bool = False


# --------------------------------------------------------------------------- answers


def answer_text(completion: str, prompt: str | None = None) -> str | None:
    """The answer a completion gives (what every metric below reads).

    The text of its last complete ``<answer>...</answer>`` block; a completion with no tag at all
    is a plain answer (a base checkpoint evaluated zero-shot) and counts whole; one that has tags
    but no complete answer block (truncated, or only thinking) gives ``None``: a wrong answer.
    Answer blocks echoed verbatim from ``prompt`` are skipped, as the rewards skip them.
    """
    if not isinstance(completion, str):
        return None
    answer = extract_answer(completion, prompt)
    if answer is not None:
        return answer
    if any(tag in completion for tag in TAGS):
        return None
    return completion.strip()


def sample_mean(values: Sequence[float] | np.ndarray) -> float:
    """The mean over samples (0 for none)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()) if arr.size else 0.0


# --------------------------------------------------------------------------- labels


def canonical_label(label: str, classes: tuple[str, ...]) -> str:
    """``label`` spelled as its class in ``classes`` (case, plural, synonyms), else normalised."""
    if classes:
        found = parse_label(label, classes)
        if found is not None:
            return found
    return normalize_text(label)


# --------------------------------------------------------------------------- boxes


def _empty_boxes(width: int) -> np.ndarray:
    return np.zeros((0, width), dtype=np.float64)


def _width(target: Target) -> int:
    return 5 if target.box_format == "rotated" else 4


def gt_boxes(target: Target) -> np.ndarray:
    """The target's boxes, ``[K, 4]`` xyxy or ``[K, 5]`` rotated pixels (``K = 0`` if none)."""
    if target.boxes is None:
        return _empty_boxes(_width(target))
    return np.asarray(target.boxes, dtype=np.float64)


def predicted_boxes(
    answer: str | None,
    target: Target,
    convention: str,
    pixel_budget: tuple[int, int] | None = None,
) -> np.ndarray:
    """Boxes of an answer in original-image pixels, in the target's layout (rotated or xyxy).

    Read in the model's ``convention`` with the target's image size (``parse_boxes``); a rotated
    target reads every box as rotated (an axis-aligned answer gets angle 0), so rotated IoU is
    used wherever the ground truth is rotated. For ``"qwen25vl"``, ``pixel_budget`` (the
    processor's ``(min_pixels, max_pixels)``) gives the resized input size the model saw;
    without it Qwen2.5-VL's default budget is assumed.
    """
    rotated = target.box_format == "rotated"
    if not answer:
        return _empty_boxes(5 if rotated else 4)
    resized = None
    if convention == "qwen25vl" and pixel_budget is not None:
        resized = _resized_size(tuple(target.image_size), tuple(pixel_budget))
    return parse_boxes(
        answer, target.image_size, rotated=rotated, convention=convention, resized_size=resized
    )


def box_pairs(
    answers: Sequence[str | None],
    targets: Sequence[Target],
    convention: str,
    pixel_budget: tuple[int, int] | None,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Predicted and gt boxes of each sample, in the same layout."""
    pairs = zip(answers, targets, strict=True)
    preds = [predicted_boxes(a, t, convention, pixel_budget) for a, t in pairs]
    return preds, [gt_boxes(t) for t in targets]


@lru_cache(maxsize=4096)
def _resized_size(image_size: tuple[int, int], budget: tuple[int, int]) -> tuple[int, int]:
    return qwen25vl_resized_size(image_size, min_pixels=budget[0], max_pixels=budget[1])


def _csr(boxes: Sequence[np.ndarray], width: int) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(boxes) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(b) for b in boxes])
    flat = np.concatenate(list(boxes)) if offsets[-1] else _empty_boxes(width)
    return np.ascontiguousarray(flat, dtype=np.float64), offsets


def matched_counts(
    preds: Sequence[np.ndarray], gts: Sequence[np.ndarray], iou_threshold: float
) -> np.ndarray:
    """True positives of a one-to-one matching at ``iou_threshold``, per sample ``[C]`` int64.

    The matching is ``geometry.detection_prf``'s: greedy from the highest IoU down, each gt box
    taking at most one predicted box with IoU >= threshold (the first 100 predicted boxes are
    matched; the rest still count as predictions). Samples are batched per box layout.
    """
    from geovlm.rewards.geometry import detection_prf

    tp = np.zeros(len(preds), dtype=np.int64)
    for width in (4, 5):
        index = [i for i, g in enumerate(gts) if g.shape[1] == width]
        if not index:
            continue
        pred, pred_off = _csr([preds[i] for i in index], width)
        gt, gt_off = _csr([gts[i] for i in index], width)
        _, recall, _ = detection_prf(pred, pred_off, gt, gt_off, iou_threshold=iou_threshold)
        n_gt = np.diff(gt_off)
        tp[index] = np.rint(np.asarray(recall) * n_gt).astype(np.int64)
    return tp


def any_hits(pred: np.ndarray, gt: np.ndarray, iou_threshold: float) -> int:
    """Predicted boxes whose IoU with *some* gt box is >= ``iou_threshold`` (EarthDial's rule)."""
    from geovlm.rewards.geometry import iou_matrix

    if not len(pred) or not len(gt):
        return 0
    return int((np.asarray(iou_matrix(pred, gt)) >= iou_threshold).any(axis=1).sum())


def box_accuracy(tp: np.ndarray, n_pred: np.ndarray, n_gt: np.ndarray) -> np.ndarray:
    """Per-sample acc@τ = TP / max(P, G): 1 exactly when every gt box is found (IoU >= τ, one
    predicted box per gt box) and no extra box is given; for one gt box and one predicted box it
    is the usual [IoU >= τ]. A sample with no gt box scores 1 when nothing is predicted. Unlike
    EarthDial's box precision, a sample without a readable box counts as a miss and duplicates of
    one good box do not count twice.
    """
    denom = np.maximum(n_pred, n_gt)
    return np.where(denom > 0, tp / np.maximum(denom, 1), 1.0)


def size_bucket(target: Target) -> str | None:
    """``small`` / ``medium`` / ``large``: ``Target.meta["size"]`` when given, else the mean
    gt box area (a rotated box: ``w * h``) over the image area, bucketed at the project's
    thresholds (``geovlm.data.splits.size_bucket``, the one definition the embedded world and
    the readers also use); ``None`` without gt boxes.
    """
    size = target.meta.get("size")
    if size in SIZES:
        return size
    boxes = gt_boxes(target)
    if not len(boxes):
        return None
    if boxes.shape[1] == 5:
        areas = np.abs(boxes[:, 2] * boxes[:, 3])
    else:
        areas = np.abs((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    return area_bucket(float(areas.mean()), tuple(target.image_size))


def detection_splits(targets: Sequence[Target]) -> dict[str, np.ndarray]:
    """Boolean masks of the referred-detection splits: sizes, then single / multiple objects."""
    buckets = [size_bucket(t) for t in targets]
    n_gt = np.array([len(gt_boxes(t)) for t in targets])
    masks = {size: np.array([b == size for b in buckets], dtype=bool) for size in SIZES}
    masks["single"] = n_gt == 1
    masks["multiple"] = n_gt > 1
    return {name: mask for name, mask in masks.items() if mask.any()}


def box_metrics(
    preds: list[np.ndarray],
    gts: list[np.ndarray],
    thresholds: Sequence[float],
    splits: dict[str, np.ndarray] | None = None,
) -> dict:
    """acc@τ (``box_accuracy``, mean over samples) and box_precision@τ (EarthDial: predicted boxes
    with IoU >= τ against some gt box over all predicted boxes, pooled), overall and per split.
    """
    n_pred = np.array([len(p) for p in preds], dtype=np.int64)
    n_gt = np.array([len(g) for g in gts], dtype=np.int64)
    groups = {"": np.ones(len(preds), dtype=bool)}
    groups.update({f"/{name}": mask for name, mask in (splits or {}).items()})
    out: dict[str, float] = {}
    for tau in thresholds:
        acc = box_accuracy(matched_counts(preds, gts, tau), n_pred, n_gt)
        hits = np.array([any_hits(p, g, tau) for p, g in zip(preds, gts, strict=True)])
        for name, mask in groups.items():
            out[f"acc@{tau:g}{name}"] = sample_mean(acc[mask])
        for name, mask in groups.items():
            pooled = int(n_pred[mask].sum())
            precision = float(hits[mask].sum()) / pooled if pooled else 0.0
            out[f"box_precision@{tau:g}{name}"] = precision
    return out


def pooled_average_precision(
    preds: Sequence[np.ndarray],
    gts: Sequence[np.ndarray],
    iou_threshold: float,
    scores: Sequence[np.ndarray] | None = None,
) -> float | None:
    """AP of one class at one IoU threshold, pooled over images, as COCO computes it.

    Per image, predictions in descending score order each take the unmatched gt box of highest
    IoU >= threshold (ties: the later gt box, as pycocotools); all predictions of the dataset are
    then ranked by score (stable: image order, then box order), precision is made monotone and
    read at the 101 recall points 0, 0.01, ..., 1 (0 beyond the last recall reached); AP is their
    mean. A VLM gives no confidence, so without ``scores`` every box scores 1 and the ranking is
    the stable order. ``None`` when the class has no gt box (COCO's "absent category").
    """
    from geovlm.rewards.geometry import iou_matrix

    n_gt = int(sum(len(g) for g in gts))
    if n_gt == 0:
        return None
    all_scores, all_tp = [], []
    threshold = min(iou_threshold, 1.0 - 1e-10)
    for i, (pred, gt) in enumerate(zip(preds, gts, strict=True)):
        if not len(pred):
            continue
        score = np.ones(len(pred)) if scores is None else np.asarray(scores[i], dtype=np.float64)
        order = np.argsort(-score, kind="mergesort")
        tp = np.zeros(len(pred), dtype=bool)
        if len(gt):
            ious = np.asarray(iou_matrix(pred[order], gt))
            taken = np.zeros(len(gt), dtype=bool)
            for d in range(len(pred)):
                row = np.where(taken, -1.0, ious[d])
                best = row.max()
                if best >= threshold:
                    match = len(row) - 1 - int(np.argmax(row[::-1] == best))
                    taken[match] = True
                    tp[d] = True
        all_scores.append(score[order])
        all_tp.append(tp)
    if not all_tp:
        return 0.0
    order = np.argsort(-np.concatenate(all_scores), kind="mergesort")
    tps = np.concatenate(all_tp)[order]
    tp_sum = np.cumsum(tps, dtype=np.float64)
    fp_sum = np.cumsum(~tps, dtype=np.float64)
    recall = tp_sum / n_gt
    precision = tp_sum / (tp_sum + fp_sum + np.spacing(1))
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    points = np.searchsorted(recall, np.linspace(0.0, 1.0, 101), side="left")
    q = np.where(points < len(precision), precision[np.minimum(points, len(precision) - 1)], 0.0)
    return float(q.mean())


def mean_average_precision(
    preds: Sequence[np.ndarray],
    gts: Sequence[np.ndarray],
    classes: Sequence[str],
    iou_threshold: float,
) -> float | None:
    """mAP: the mean over classes (with at least one gt box) of ``pooled_average_precision``;
    a sample's boxes count for the class it asks for (``detection_class``).
    """
    values = []
    for cls in sorted(set(classes)):
        index = [i for i, c in enumerate(classes) if c == cls]
        ap = pooled_average_precision(
            [preds[i] for i in index], [gts[i] for i in index], iou_threshold
        )
        if ap is not None:
            values.append(ap)
    return float(np.mean(values)) if values else None


# --------------------------------------------------------------------------- captions


def corpus_bleu(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> np.ndarray:
    """Corpus BLEU-1..4 ``[4]`` as the COCO caption evaluation reports it (VRSBench's numbers).

    pycocoevalcap's ``Bleu(4)`` ("closest" reference length; n-gram matches and lengths summed
    over the corpus before the geometric mean) on the project's tokenization
    (``rewards.text.tokenize``, the regex stand-in for its PTBTokenizer step). The per-sentence
    kernel ``rewards.text.bleu`` cannot give this: corpus BLEU is not a mean of sentence BLEUs.
    """
    import contextlib
    import io

    from pycocoevalcap.bleu.bleu import Bleu

    from geovlm.rewards.text import tokenize

    if not candidates:
        return np.zeros(4)
    res = {i: [" ".join(tokenize(c))] for i, c in enumerate(candidates)}
    gts = {i: [" ".join(tokenize(r)) for r in refs] for i, refs in enumerate(references)}
    with contextlib.redirect_stdout(io.StringIO()):
        score, _ = Bleu(4).compute_score(gts, res)
    return np.clip(np.asarray(score, dtype=np.float64), 0.0, 1.0)


def caption_metrics(
    answers: Sequence[str | None],
    targets: Sequence[Target],
    *,
    full: bool = False,
    meteor_backend: str = "coco",
) -> dict:
    """region_caption / image_caption / change_caption (and grounding_desc's text part).

    Candidates are the answers with boxes stripped (no answer: the empty sentence); references
    ``rewards.accuracy.references`` (the rewards' references too). Samples without a reference
    are left out.

    * ``rouge_1``, ``rouge_l``: rouge-score F-measures (Porter stemmer) averaged over a sample's
      references, then over samples: EarthDial's definition (``rewards.text.rouge_1_f1`` /
      ``rouge_l_f1`` with ``reduce="mean"``; one reference: its plain F-measure).
    * ``meteor``: corpus METEOR 1.5 (``rewards.meteor.corpus_meteor``; pycocoevalcap's Java
      scorer with ``meteor_backend="coco"``, NLTK's with ``"nltk"``).
    * with ``full`` (image and change captioning, as VRSBench reports them): ``bleu_1`` ..
      ``bleu_4`` (``corpus_bleu``) and ``cider``: pycocoevalcap's CIDEr-D, the mean over samples
      with document frequencies from this evaluation's references (``rewards.text.cider_d``).
    """
    from geovlm.rewards.meteor import corpus_meteor
    from geovlm.rewards.text import cider_d, rouge_1_f1, rouge_l_f1

    pairs = zip(answers, targets, strict=True)
    rows = [(strip_boxes(a) if a else "", references(t)) for a, t in pairs]
    rows = [(c, refs) for c, refs in rows if refs]
    names = ["rouge_1", "rouge_l", "meteor"]
    if full:
        names += ["bleu_1", "bleu_2", "bleu_3", "bleu_4", "cider"]
    if not rows:
        return {name: 0.0 for name in names}
    candidates = [c for c, _ in rows]
    reference_lists = [refs for _, refs in rows]
    out = {
        "rouge_1": sample_mean(rouge_1_f1(candidates, reference_lists, reduce="mean")),
        "rouge_l": sample_mean(rouge_l_f1(candidates, reference_lists, reduce="mean")),
        "meteor": float(corpus_meteor(candidates, reference_lists, backend=meteor_backend)),
    }
    if full:
        for n, value in enumerate(corpus_bleu(candidates, reference_lists), start=1):
            out[f"bleu_{n}"] = float(value)
        out["cider"] = sample_mean(cider_d(candidates, reference_lists))
    return out


# --------------------------------------------------------------------------- dispatch


def task_metrics(
    task: str,
    completions: Sequence[str],
    targets: Sequence[Target],
    *,
    prompts: Sequence[str | None] | None = None,
    convention: str = "qwen25vl",
    pixel_budget: tuple[int, int] | None = None,
    meteor_backend: str = "coco",
    protocol: str = "geovlm",
    earthdial_fixes: bool = False,
) -> dict[str, float]:
    """The metrics of one task on ``completions`` [C] (all of ``task``) and ``targets``.

    ``prompts`` (one per completion) let ``answer_text`` skip answer blocks echoed from the
    prompt; ``convention`` / ``pixel_budget`` say how the model writes boxes; ``protocol`` picks
    the task's metric set (``TaskSpec.metrics``; ``"geovlm"``: the project's metrics,
    ``"earthdial"``: EarthDial's scripts, ``earthdial_fixes`` with their bugs corrected).
    """
    from geovlm.tasks import registry

    spec = registry.get(task)
    if protocol not in spec.metrics:
        raise ValueError(
            f"task {task!r} has no {protocol!r} metrics; protocols: {sorted(spec.metrics)}"
        )
    if len(completions) != len(targets):
        raise ValueError(f"{len(completions)} completions but {len(targets)} targets")
    prompts = list(prompts) if prompts is not None else [None] * len(completions)
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
    answers = [answer_text(c, p) for c, p in zip(completions, prompts, strict=True)]
    options = MetricOptions(convention, pixel_budget, meteor_backend, earthdial_fixes)
    return spec.metrics[protocol](answers, targets, options)
