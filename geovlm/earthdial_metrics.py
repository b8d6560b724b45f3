"""EarthDial's evaluation scripts (``src/earthdial/eval/rs_*/eval*.py``), re-implemented.

GeoVLM-R1's tables are computed with these scripts, so ``python -m geovlm.eval --protocol
earthdial`` computes each column as they do. What they call "accuracy" or "precision":

* **classification / VQA** (``rs_classification``, ``rs_vqa``, the change-detection
  classification sets): per sample, both texts lower-cased with every space removed, then split
  by NLTK's ``word_tokenize``; the score is ``|set(ref) & set(cand)| / len(ref tokens)`` (a token
  recall: 1 for "Forest." against "forest", 0 for "dense forest"), averaged over samples; VQA per
  ``vqa_type``, only ``presence``, ``comp`` and ``rural_urban``. Multi-label sets are scored the
  same way (a per-class recall in which the commas count as tokens).
* **referred detection** (``rs_detection``): boxes ``[x1, y1, x2, y2, θ]`` (0..100) are read
  with a regex that only sees non-negative integers; each predicted box is a hit when its
  rotated-polygon IoU with *some* ground-truth box is >= τ; precision = hits / predicted boxes,
  pooled over the samples of each ``size_group`` (small / medium / large) and of single /
  multiple ground-truth objects. A predicted box that is not five numbers is counted but never
  hits; an unreadable ground-truth box ends the search of every prediction that reaches it.
* **xBD detection** (``rs_change_detection/eval_detection.py``): the same pooled precision over
  the whole set, the predicted angle set to 0 first.
* **grounding description** (``rs_grounding_description``): the same precision over the boxes
  of the description (only five-integer boxes are found), ground truth from ``obj_ids``,
  samples with 50 or more ground-truth boxes left out; the description without its boxes scored
  like region captions.
* **captions**: rouge-score's ROUGE-1 / ROUGE-L F-measure (Porter stemmer) of the reference and
  the answer, averaged over a sample's references, then over samples; METEOR is NLTK's
  ``meteor_score`` per sample (best reference), averaged over samples. Region captions and
  grounding descriptions: the raw texts, METEOR tokens split on whitespace, one reference.
  Image and change captions: texts first split by ``word_tokenize``; the change-detection
  script takes ``caption0`` alone when ``caption1`` is empty, else all five, empty ones
  included.

Where a script is buggy, the default follows it and ``MetricOptions.earthdial_fixes`` corrects
it (``docs/evaluation.md`` lists each difference): boxes read with signed / decimal numbers and
four-number boxes read as axis-aligned, an unreadable ground-truth box skipped instead of ending
the search, punctuation tokens left out of the token recall (a set, not a list), every VQA type
reported, empty reference captions dropped.

Boxes are compared in EarthDial's frame (0..100 of each side, ``x1, y1, x2, y2, θ``), where its
vertices are ``c + (v - c) @ R(θ)``: that is the project's rotated box ``cx, cy, w, h, -θ``, so
the project's polygon IoU kernel gives the script's shapely IoU. EarthDial's own answers (read
with the ``"geochat"`` convention) are parsed with its regex; other answers (a Qwen model's
pixels) are read by the project's parser and moved into that frame.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import cache

import numpy as np

from geovlm.data.schema import Target
from geovlm.metrics import MetricOptions, sample_mean, size_bucket
from geovlm.rewards.parse import parse_boxes, strip_boxes

VQA_TYPES = ("presence", "comp", "rural_urban")
DETECTION_GROUPS = ("small", "medium", "large", "single", "multiple")
THRESHOLDS = (0.5, 0.25)
# rs_grounding_description/eval.py: samples with this many ground-truth boxes or more are skipped.
GROUNDING_MAX_BOXES = 50

_INT_LIST = re.compile(r"\[\s*(\d+(?:,\s*\d+)*)\s*\]")
_INT_BOX5 = re.compile(r"\[\s*(\d+),\s*(\d+),\s*(\d+),\s*(\d+),\s*(\d+)\s*\]")
_DESCRIPTION_MARKUP = re.compile(r"<box>\[\[.*?\]\]</box>|\[\[.*?\]\]")


# --------------------------------------------------------------------------- tokens


@cache
def _sentence_splitter():
    """NLTK's English Punkt model when its data is installed (``word_tokenize``'s), else an
    untrained Punkt splitter: the two differ only around abbreviations, initials and numbers
    ending a sentence."""
    import nltk
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
    except LookupError:
        return PunktSentenceTokenizer().tokenize
    return nltk.sent_tokenize


def word_tokenize(text: str) -> list[str]:
    """NLTK's ``word_tokenize``: Punkt sentences, each split by the Treebank word tokenizer."""
    from nltk.tokenize import NLTKWordTokenizer

    tokenizer = NLTKWordTokenizer()
    sentences = _sentence_splitter()(text)
    return [token for sentence in sentences for token in tokenizer.tokenize(sentence)]


def token_recall(reference: str, candidate: str, fixed: bool = False) -> float:
    """EarthDial's classification / VQA score of one answer (module docstring). ``fixed``: word
    tokens only (no punctuation), as sets."""
    ref = word_tokenize(reference.strip().lower().replace(" ", ""))
    cand = word_tokenize(candidate.strip().lower().replace(" ", ""))
    if fixed:
        ref = list(dict.fromkeys(t for t in ref if any(ch.isalnum() for ch in t)))
        cand = [t for t in cand if any(ch.isalnum() for ch in t)]
    common = set(ref) & set(cand)
    return len(common) / len(ref) if common else 0.0


def parse_description(text: str) -> str:
    """A grounding description without ``<ref>`` tags and ``[[..]]`` / ``<box>[[..]]</box>``
    boxes (rs_grounding_description's ``parse_description``)."""
    return _DESCRIPTION_MARKUP.sub("", re.sub(r"</?ref>", "", text))


# --------------------------------------------------------------------------- boxes


def script_boxes(text: str) -> list[list[float]]:
    """rs_detection's ``parse_bboxes``: every ``[n, n, ...]`` list of non-negative integers."""
    return [[float(v) for v in group.split(",")] for group in _INT_LIST.findall(text or "")]


def script_boxes5(text: str) -> list[list[float]]:
    """rs_grounding_description's ``parse_bboxes``: ``[n, n, n, n, n]`` boxes of non-negative
    integers only."""
    return [[float(v) for v in box] for box in _INT_BOX5.findall(text or "")]


def to_frame(boxes: np.ndarray, image_size: tuple[int, int]) -> list[list[float]]:
    """Pixel boxes (``[K, 4]`` xyxy or ``[K, 5]`` cx, cy, w, h, angle) -> EarthDial's frame rows
    ``x1, y1, x2, y2, θ`` on 0..100."""
    arr = np.asarray(boxes, dtype=np.float64).reshape(len(boxes), -1)
    sx, sy = 100.0 / image_size[0], 100.0 / image_size[1]
    rows = []
    for box in arr:
        if len(box) == 5:
            cx, cy, w, h, angle = box
            x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
        else:
            (x1, y1, x2, y2), angle = box, 0.0
        rows.append([x1 * sx, y1 * sy, x2 * sx, y2 * sy, float(angle)])
    return rows


def frame_iou(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> np.ndarray:
    """IoU ``[N, M]`` of frame rows as EarthDial computes it: the shapely polygons of
    ``get_rotated_box_vertices`` (0 for a degenerate box)."""
    from geovlm.rewards.geometry import iou_matrix

    def rotated(rows):
        arr = np.asarray(rows, dtype=np.float64).reshape(-1, 5)
        x1, y1, x2, y2, theta = arr.T
        return np.stack([(x1 + x2) / 2, (y1 + y2) / 2, np.abs(x2 - x1), np.abs(y2 - y1), -theta], 1)

    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)))
    return np.asarray(iou_matrix(rotated(a), rotated(b)))


def count_hits(
    preds: Sequence[Sequence[float]], gts: Sequence[Sequence[float]], tau: float,
    fixed: bool = False,
) -> int:
    """Predicted boxes with IoU >= ``tau`` against some ground-truth box. As the scripts: a
    prediction that is not five numbers never hits, and a ground-truth box that is not five
    numbers ends the search (``fixed``: it is skipped)."""
    valid_gt = [g for g in gts if len(g) == 5]
    if not fixed:
        bad = next((k for k, g in enumerate(gts) if len(g) != 5), len(gts))
        valid_gt = list(gts[:bad])
    valid_pred = [p for p in preds if len(p) == 5]
    if not valid_pred or not valid_gt:
        return 0
    return int((frame_iou(valid_pred, valid_gt).max(axis=1) >= tau).sum())


def _earthdial(target: Target) -> dict:
    value = target.meta.get("earthdial")
    return value if isinstance(value, dict) else {}


def _script_reading(options: MetricOptions) -> bool:
    """EarthDial's regexes read the answers: they are its own (0..100, the ``"geochat"``
    convention) and the script's bugs are kept."""
    return options.convention == "geochat" and not options.earthdial_fixes


def predicted_rows(
    answer: str | None, target: Target, options: MetricOptions, five_only: bool = False
) -> list[list[float]]:
    """The answer's boxes in EarthDial's frame (the regex's lists, or the project's parse)."""
    if not answer:
        return []
    if _script_reading(options):
        return script_boxes5(answer) if five_only else script_boxes(answer)
    from geovlm.metrics import _resized_size

    resized = None
    if options.convention == "qwen25vl" and options.pixel_budget is not None:
        resized = _resized_size(tuple(target.image_size), tuple(options.pixel_budget))
    boxes = parse_boxes(answer, target.image_size, rotated=True, convention=options.convention,
                        resized_size=resized)
    return to_frame(boxes, target.image_size)


def gt_rows(target: Target, options: MetricOptions, five_only: bool = False) -> list[list[float]]:
    """The ground-truth boxes in EarthDial's frame: the script's parse of the record's text
    when there is one (and the fixes are off), else the target's boxes."""
    text = _earthdial(target).get("boxes")
    if isinstance(text, str) and not options.earthdial_fixes:
        return script_boxes5(text) if five_only else script_boxes(text)
    if target.boxes is None:
        return []
    return to_frame(target.boxes, target.image_size)


def _precision(hits: np.ndarray, n_pred: np.ndarray, mask: np.ndarray) -> float:
    pooled = int(n_pred[mask].sum())
    return float(hits[mask].sum()) / pooled if pooled else 0.0


def detection_metrics(
    answers: Sequence[str | None],
    targets: Sequence[Target],
    options: MetricOptions | None = None,
    *,
    by_group: bool = True,
) -> dict:
    """Referred detection (``by_group``: ``precision@τ/<group>`` per size group and single /
    multiple objects, rs_detection) and xBD detection (``precision@τ`` over the set, the
    predicted angle zeroed: samples whose record came through the change-detection script) at
    τ = 0.5 and 0.25."""
    options = options or MetricOptions()
    preds = [predicted_rows(a, t, options) for a, t in zip(answers, targets, strict=True)]
    gts = [gt_rows(t, options) for t in targets]
    change = np.array([_earthdial(t).get("script") == "rs_change" for t in targets], dtype=bool)
    for i in np.flatnonzero(change):
        preds[i] = [[*p[:4], 0.0] if len(p) == 5 else p for p in preds[i]]
    n_pred = np.array([len(p) for p in preds], dtype=np.int64)
    groups: dict[str, np.ndarray] = {}
    if by_group:
        sizes = [t.meta.get("size") or size_bucket(t) for t in targets]
        n_gt = np.array([len(g) for g in gts])
        for name in DETECTION_GROUPS[:3]:
            groups[name] = np.array([s == name for s in sizes]) & ~change
        groups["single"] = (n_gt == 1) & ~change
        groups["multiple"] = (n_gt != 1) & ~change
    out: dict[str, float] = {}
    for tau in THRESHOLDS:
        hits = np.array([count_hits(p, g, tau, options.earthdial_fixes)
                         for p, g in zip(preds, gts, strict=True)], dtype=np.int64)
        if change.any() or not by_group:
            whole = change if by_group else np.ones(len(targets), dtype=bool)
            out[f"precision@{tau:g}"] = _precision(hits, n_pred, whole)
        for name, mask in groups.items():
            if mask.any():
                out[f"precision@{tau:g}/{name}"] = _precision(hits, n_pred, mask)
    return out


def multi_detection_metrics(
    answers: Sequence[str | None], targets: Sequence[Target], options: MetricOptions | None = None
) -> dict:
    """Multi-object detection: ``precision@τ`` over the whole set (xBD's script)."""
    return detection_metrics(answers, targets, options, by_group=False)


# --------------------------------------------------------------------------- labels


def _reference_label(target: Target) -> str:
    label = _earthdial(target).get("label")
    if isinstance(label, str):
        return label
    if target.labels:
        return ", ".join(target.labels)
    return target.label if target.label is not None else target.answer


def classification_metrics(
    answers: Sequence[str | None], targets: Sequence[Target], options: MetricOptions | None = None
) -> dict:
    """``accuracy``: the mean token recall of the answers (module docstring)."""
    fixed = bool(options and options.earthdial_fixes)
    scores = [token_recall(_reference_label(t), a or "", fixed)
              for a, t in zip(answers, targets, strict=True)]
    return {"accuracy": sample_mean(scores)}


def vqa_metrics(
    answers: Sequence[str | None], targets: Sequence[Target], options: MetricOptions | None = None
) -> dict:
    """``accuracy/<vqa_type>``: the mean token recall per question type (``presence``, ``comp``,
    ``rural_urban``; with the fixes every type, ``count`` too)."""
    fixed = bool(options and options.earthdial_fixes)
    by_type: dict[str, list[float]] = {}
    for answer, target in zip(answers, targets, strict=True):
        qtype = str(target.meta.get("question_type") or "")
        if qtype in VQA_TYPES or (fixed and qtype):
            score = token_recall(_reference_label(target), answer or "", fixed)
            by_type.setdefault(qtype, []).append(score)
    order = [t for t in VQA_TYPES if t in by_type] + sorted(set(by_type) - set(VQA_TYPES))
    return {f"accuracy/{qtype}": sample_mean(by_type[qtype]) for qtype in order}


# --------------------------------------------------------------------------- captions


def _caption_scores(
    candidates: list[str], references: list[list[str]], tokenized: bool
) -> dict[str, float]:
    """ROUGE-1 / ROUGE-L F (mean over references, then samples) and NLTK METEOR (per sample,
    then the mean); ``tokenized``: texts first split by ``word_tokenize`` (else raw texts and
    whitespace tokens for METEOR)."""
    from geovlm.rewards.meteor import meteor
    from geovlm.rewards.text import rouge_1_f1, rouge_l_f1

    if not candidates:
        return {"rouge_1": 0.0, "rouge_l": 0.0, "meteor": 0.0}
    tokenizer = word_tokenize if tokenized else str.split
    if tokenized:
        cands = [" ".join(word_tokenize(c)) for c in candidates]
        refs = [[" ".join(word_tokenize(r)) for r in rs] for rs in references]
    else:
        cands, refs = candidates, references
    return {
        "rouge_1": sample_mean(rouge_1_f1(cands, refs, reduce="mean")),
        "rouge_l": sample_mean(rouge_l_f1(cands, refs, reduce="mean")),
        "meteor": sample_mean(meteor(candidates, references, backend="nltk", tokenizer=tokenizer)),
    }


def _script_references(target: Target, fixed: bool) -> list[str]:
    refs = _earthdial(target).get("references")
    if not isinstance(refs, list) or not refs:
        refs = list(target.captions) or [target.answer]
    if fixed:
        refs = [r for r in refs if r.strip()] or refs[:1]
    return [str(r) for r in refs]


def caption_metrics(
    answers: Sequence[str | None],
    targets: Sequence[Target],
    options: MetricOptions | None = None,
    *,
    tokenized: bool = True,
) -> dict:
    """``rouge_1``, ``rouge_l``, ``meteor`` of image / change captions (``tokenized``, every
    reference) or of region captions (``tokenized=False``: raw texts, the first reference)."""
    fixed = bool(options and options.earthdial_fixes)
    candidates = [a or "" for a in answers]
    references = [_script_references(t, fixed) for t in targets]
    if not tokenized:
        references = [r[:1] for r in references]
    return _caption_scores(candidates, references, tokenized)


def region_caption_metrics(
    answers: Sequence[str | None], targets: Sequence[Target], options: MetricOptions | None = None
) -> dict:
    """Region captioning (rs_region_captioning): raw texts against the one annotation."""
    return caption_metrics(answers, targets, options, tokenized=False)


def grounding_metrics(
    answers: Sequence[str | None], targets: Sequence[Target], options: MetricOptions | None = None
) -> dict:
    """Grounding description: ``precision@0.5`` / ``precision@0.25`` of the description's boxes
    and ``rouge_1`` / ``rouge_l`` / ``meteor`` of its text, on the samples with fewer than 50
    ground-truth boxes (counted in ``obj_ids`` for the boxes, in the description for the text,
    as the script does)."""
    options = options or MetricOptions()
    script = _script_reading(options)
    preds = [predicted_rows(a, t, options, five_only=True) for a, t in zip(answers, targets,
                                                                              strict=True)]
    gts = [gt_rows(t, options, five_only=True) for t in targets]
    kept = np.array([len(g) < GROUNDING_MAX_BOXES for g in gts], dtype=bool)
    n_pred = np.array([len(p) for p in preds], dtype=np.int64)
    out: dict[str, float] = {}
    for tau in THRESHOLDS:
        hits = np.array([count_hits(p, g, tau, options.earthdial_fixes)
                         for p, g in zip(preds, gts, strict=True)], dtype=np.int64)
        out[f"precision@{tau:g}"] = _precision(hits, n_pred, kept)
    candidates, references = [], []
    for answer, target, keep in zip(answers, targets, kept, strict=True):
        truth = _earthdial(target).get("groundtruth")
        if isinstance(truth, str) and not options.earthdial_fixes:
            if len(script_boxes5(truth)) >= GROUNDING_MAX_BOXES:
                continue
            reference = parse_description(truth)
        else:
            if not keep:
                continue
            reference = target.captions[0] if target.captions else strip_boxes(target.answer)
        answer = answer or ""
        candidates.append(parse_description(answer) if script else strip_boxes(answer))
        references.append([reference])
    out.update(_caption_scores(candidates, references, tokenized=False))
    return out

