"""One accuracy reward per EO task family, and the registry that maps task names to rewards.

Every accuracy function takes the typed answers of one task (``parse.parse_for_task`` output, one
per completion, ``None`` when the completion gave no usable answer), their ``Target`` s and the
``RewardOptions``, and returns ``[C]`` float64 in ``[0, 1]``; ``None`` scores 0. A batch of one task
is scored in one call of the geometry / text kernels (CSR boxes, lists of strings).

``REGISTRY`` maps each task of ``geovlm.data.schema.TASKS`` to a ``TaskSpec``: its accuracy
function and the weights of the format and accuracy components in the total reward
(GeoVLM-R1: ``R = R_format + R_accuracy``, both weights 1). Override a task with
``dataclasses.replace(REGISTRY[task], ...)`` in a copy passed to ``score(..., registry=...)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from geovlm.data.schema import Target
from geovlm.rewards import geometry, semantic, text
from geovlm.rewards.parse import (
    label_matcher,
    normalize_text,
    parse_yes_no,
    strip_boxes,
)


@dataclass(frozen=True)
class RewardOptions:
    """Choices of the accuracy rewards; the defaults follow GeoVLM-R1.

    Attributes:
        convention: the box convention of the model's answers (``geovlm.data.boxes``).
        min_pixels, max_pixels: the Qwen2.5-VL processor's pixel budget, which fixes the resized
            input size that ``"qwen25vl"`` boxes are relative to (``None``: processor defaults).
        synonyms: extra synonym groups for class names (``parse.SYNONYM_GROUPS`` always apply).
        rotated_iou: ``"hbb"`` scores rotated boxes with the paper's axis-aligned IoU on each
            box's axis-aligned hull; ``"rotated"`` with the exact IoU of the rotated rectangles.
        referred_reward: ``"multibox"`` (matched IoU over ``max(n_pred, n_gt)``, equal to the IoU
            for one box each) or ``"first_box"`` (IoU of the first predicted and first true box).
        counting: ``"exact"`` or ``"smooth"`` (see ``counting_accuracy``).
        vqa: ``"jaccard"`` (token-set Jaccard) or ``"exact"`` (normalised match) for open answers.
        caption_metric: ``"levenshtein"`` (the paper's image-captioning reward) or ``"cider_d"``.
        use_embeddings: region / change captioning use the hybrid embedding + lexical reward;
            ``False`` scores them with the lexical metric alone (no torch, no model load).
        embedding_device: the torch device of the sentence-embedding model.
        semantic_weight: weight of the embedding similarity in the hybrid caption reward.
        lexical: the lexical metric of the hybrid and grounding rewards
            (``semantic.LEXICAL_METRICS``).
        grounding_text_weight: weight of the lexical score in the grounding-description reward.
        max_pred_boxes: predicted boxes matched per answer (more still count as extras).
        cider_document_frequency: the idf table of the ``"cider_d"`` caption reward.
    """

    convention: str = "qwen25vl"
    min_pixels: int | None = None
    max_pixels: int | None = None
    synonyms: tuple[tuple[str, ...], ...] = ()
    rotated_iou: Literal["hbb", "rotated"] = "hbb"
    referred_reward: Literal["multibox", "first_box"] = "multibox"
    counting: Literal["exact", "smooth"] = "exact"
    vqa: Literal["jaccard", "exact"] = "jaccard"
    caption_metric: Literal["levenshtein", "cider_d"] = "levenshtein"
    use_embeddings: bool = True
    embedding_device: str = "cpu"
    semantic_weight: float = 0.5
    lexical: str = "rouge_l_f1"
    grounding_text_weight: float = 0.5
    max_pred_boxes: int = 100
    cider_document_frequency: text.CiderDocumentFrequency | None = None

    def __post_init__(self) -> None:
        choices = {
            "rotated_iou": ("hbb", "rotated"),
            "referred_reward": ("multibox", "first_box"),
            "counting": ("exact", "smooth"),
            "vqa": ("jaccard", "exact"),
            "caption_metric": ("levenshtein", "cider_d"),
            "lexical": tuple(semantic.LEXICAL_METRICS),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"RewardOptions.{name}={getattr(self, name)!r}; one of {allowed}")
        for name in ("semantic_weight", "grounding_text_weight"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"RewardOptions.{name} must lie in [0, 1]")
        if int(self.max_pred_boxes) != self.max_pred_boxes or self.max_pred_boxes < 1:
            raise ValueError("RewardOptions.max_pred_boxes must be a positive integer")


Accuracy = Callable[[Sequence[object], Sequence[Target], RewardOptions], np.ndarray]


@dataclass(frozen=True)
class TaskSpec:
    """A task's accuracy reward and the weights of its components in the total."""

    accuracy: Accuracy
    format_weight: float = 1.0
    accuracy_weight: float = 1.0


# --------------------------------------------------------------------------- helpers


def _scatter(n: int, index: np.ndarray, values) -> np.ndarray:
    out = np.zeros(n)
    if len(index):
        out[index] = np.asarray(values, dtype=np.float64)
    return out


def references(target: Target) -> list[str]:
    """Reference sentences: the target's captions, else its answer (boxes stripped)."""
    if target.captions:
        return [strip_boxes(c) for c in target.captions]
    ref = strip_boxes(target.answer)
    return [ref] if ref else []


def _text_scores(
    parsed_text: Sequence[str | None],
    targets: Sequence[Target],
    metric: Callable[[list[str], list[list[str]]], np.ndarray],
) -> np.ndarray:
    """``metric`` on the answers that parsed and have references; 0 elsewhere."""
    index, candidates, refs = [], [], []
    for i, (answer, target) in enumerate(zip(parsed_text, targets, strict=True)):
        target_refs = references(target)
        if answer and target_refs:
            index.append(i)
            candidates.append(answer)
            refs.append(target_refs)
    if not index:
        return np.zeros(len(parsed_text))
    return _scatter(len(parsed_text), np.array(index, dtype=np.int64), metric(candidates, refs))


def _box_csr(boxes: Sequence[np.ndarray], width: int) -> tuple[np.ndarray, np.ndarray]:
    counts = np.array([len(b) for b in boxes], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    flat = (
        np.concatenate([np.asarray(b, dtype=np.float64).reshape(-1, width) for b in boxes])
        if boxes
        else np.zeros((0, width))
    )
    return flat.reshape(-1, width), offsets


def _gt_csr(targets: Sequence[Target], width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ground-truth CSR with one copy per distinct Target, and each candidate's sample index."""
    slot: dict[int, int] = {}
    unique: list[np.ndarray] = []
    sample_index = np.empty(len(targets), dtype=np.int64)
    for i, t in enumerate(targets):
        key = id(t)
        if key not in slot:
            slot[key] = len(unique)
            unique.append(_target_boxes(t, width))
        sample_index[i] = slot[key]
    flat, offsets = _box_csr(unique, width)
    return flat, offsets, sample_index


def _target_boxes(target: Target, width: int) -> np.ndarray:
    if target.boxes is None:
        return np.zeros((0, width))
    boxes = np.asarray(target.boxes, dtype=np.float64)
    if width == 4 and boxes.shape[1] == 5:
        return geometry.rotated_to_xyxy(boxes) if len(boxes) else np.zeros((0, 4))
    if width == 5 and boxes.shape[1] == 4:
        return geometry.xyxy_to_rotated(boxes) if len(boxes) else np.zeros((0, 5))
    return boxes


def _box_reward(
    pred: Sequence[np.ndarray],
    targets: Sequence[Target],
    options: RewardOptions,
    kind: Literal["multibox", "first_box"],
    width: int,
) -> np.ndarray:
    """Box reward of every candidate; an answer without usable boxes (``None``) scores 0."""
    boxes = [np.zeros((0, width)) if p is None else _pred_width(p, width) for p in pred]
    flat, offsets = _box_csr(boxes, width)
    gt, gt_offsets, sample_index = _gt_csr(targets, width)
    if kind == "first_box":
        out = geometry.first_box_iou(flat, offsets, gt, gt_offsets, sample_index=sample_index)
    else:
        out = geometry.multibox_reward(
            flat,
            offsets,
            gt,
            gt_offsets,
            sample_index=sample_index,
            max_pred_boxes=options.max_pred_boxes,
        )
    # An answer without usable boxes is not the claim "nothing here", even where nothing is.
    out[[p is None for p in pred]] = 0.0
    return out


def _pred_width(boxes: np.ndarray, width: int) -> np.ndarray:
    if boxes.shape[1] == width:
        return boxes
    return geometry.rotated_to_xyxy(boxes) if len(boxes) else np.zeros((0, width))


# --------------------------------------------------------------------------- classification


def classification_accuracy(
    parsed: Sequence[str | None], targets: Sequence[Target], options: RewardOptions
) -> np.ndarray:
    """Scene / temporal classification: the recall of the one true class, ``1[pred == label]``.

    ``pred`` is the single class the answer names; an answer naming several classes ("A or B")
    parses to nothing and scores 0, so hedging cannot collect the recall of every class.
    """
    out = np.zeros(len(parsed))
    for i, (pred, t) in enumerate(zip(parsed, targets, strict=True)):
        if pred is None or not t.label:
            continue
        matcher = label_matcher(tuple(t.classes) or (t.label,), tuple(options.synonyms))
        truth = matcher.exact(t.label) or t.label
        out[i] = float(normalize_text(pred) == normalize_text(truth))
    return out


def multilabel_accuracy(
    parsed: Sequence[list[str] | None], targets: Sequence[Target], options: RewardOptions
) -> np.ndarray:
    """Multi-label classification: F1 of the named classes ``P`` against the true ones ``G``.

    ``F1 = 2 |P ∩ G| / (|P| + |G|)`` (1 when both are empty). Naming every class of a vocabulary
    ``V`` scores ``2 |G| / (|V| + |G|)``, not 1: recall alone would pay for listing everything.
    """
    out = np.zeros(len(parsed))
    for i, (pred, t) in enumerate(zip(parsed, targets, strict=True)):
        if pred is None:
            continue
        matcher = label_matcher(tuple(t.classes) or tuple(t.labels), tuple(options.synonyms))
        truth = {normalize_text(matcher.exact(label) or label) for label in t.labels}
        guess = {normalize_text(label) for label in pred}
        if not truth and not guess:
            out[i] = 1.0
        else:
            out[i] = 2.0 * len(truth & guess) / (len(truth) + len(guess))
    return out


def yes_no_accuracy(
    parsed: Sequence[bool | None], targets: Sequence[Target], options: RewardOptions
) -> np.ndarray:
    """Change detection: ``1[answer == truth]`` for the yes/no of ``target.label``."""
    out = np.zeros(len(parsed))
    for i, (pred, t) in enumerate(zip(parsed, targets, strict=True)):
        truth = parse_yes_no(t.label or t.answer)
        out[i] = float(pred is not None and truth is not None and pred == truth)
    return out


# --------------------------------------------------------------------------- detection


def referred_detection_accuracy(
    parsed: Sequence[np.ndarray | None], targets: Sequence[Target], options: RewardOptions
) -> np.ndarray:
    """Referred detection (axis-aligned): IoU of the answer's box with the referred object's.

    ``"multibox"`` (default): ``sum IoU over the optimal one-to-one matching / max(n_pred,
    n_gt)``, which is the IoU for one box each and divides by the box count when the answer
    floods boxes; ``"first_box"``: ``IoU(first predicted box, first true box)``.
    """
    return _box_reward(parsed, targets, options, options.referred_reward, 4)


def rotated_detection_accuracy(
    parsed: Sequence[np.ndarray | None], targets: Sequence[Target], options: RewardOptions
) -> np.ndarray:
    """Referred detection with rotated boxes: ``referred_detection_accuracy`` on

    * ``"hbb"`` (default): the axis-aligned hulls of predicted and true boxes, the paper's
      axis-aligned IoU reward;
    * ``"rotated"``: the rotated rectangles themselves (exact polygon IoU).
    """
    if options.rotated_iou == "hbb":
        return _box_reward(parsed, targets, options, options.referred_reward, 4)
    return _box_reward(parsed, targets, options, options.referred_reward, 5)


def multi_detection_accuracy(
    parsed: Sequence[np.ndarray | None], targets: Sequence[Target], options: RewardOptions
) -> np.ndarray:
    """Multi-object detection: the multi-box reward

    ``R = sum of IoU over the optimal (Hungarian) one-to-one matching / max(n_pred, n_gt)``:
    a missed object adds 0 to the sum, an extra box adds 1 to the divisor (so flooding cannot
    pay), and no boxes against no objects scores 1.
    """
    return _box_reward(parsed, targets, options, "multibox", 4)


# --------------------------------------------------------------------------- counting, VQA


def counting_accuracy(
    parsed: Sequence[float | None], targets: Sequence[Target], options: RewardOptions
) -> np.ndarray:
    """Counting with true count ``n`` and answer ``k``.

    ``"exact"`` (default): ``1[k == n]``; ``"smooth"``: ``max(0, 1 - |k - n| / max(n, 1))``,
    partial credit falling linearly to 0 at an error of ``n`` (of 1 for ``n = 0``).
    """
    out = np.zeros(len(parsed))
    for i, (k, t) in enumerate(zip(parsed, targets, strict=True)):
        if k is None or t.count is None:
            continue
        n = float(t.count)
        if options.counting == "exact":
            out[i] = float(k == n)
        else:
            out[i] = max(0.0, 1.0 - abs(k - n) / max(n, 1.0))
    return out


def vqa_accuracy(
    parsed: Sequence[bool | str | None], targets: Sequence[Target], options: RewardOptions
) -> np.ndarray:
    """Visual question answering against the short answer ``a = target.label``.

    Yes/no questions: ``1[answer == a]``. Open answers: ``"jaccard"`` (default) the Jaccard index
    of the token sets, ``|T(answer) ∩ T(a)| / |T(answer) ∪ T(a)|``, so padding the answer with
    words (or echoing the question) lowers it; ``"exact"``: ``1[normalised answer == a]`` up to
    plural forms and synonyms.
    """
    out = np.zeros(len(parsed))
    open_index = []
    for i, (pred, t) in enumerate(zip(parsed, targets, strict=True)):
        if pred is None:
            continue
        if isinstance(pred, bool):
            out[i] = float(pred == parse_yes_no(t.label or t.answer))
        elif options.vqa == "exact":
            truth = t.label or t.answer
            out[i] = float(label_matcher((truth,), tuple(options.synonyms)).exact(pred) is not None)
        else:
            open_index.append(i)
    if open_index:
        index = np.array(open_index, dtype=np.int64)
        values = text.token_jaccard(
            [parsed[i] for i in index], [[targets[i].label or targets[i].answer] for i in index]
        )
        out[index] = values
    return out


# --------------------------------------------------------------------------- captions


def image_caption_accuracy(
    parsed: Sequence[str | None], targets: Sequence[Target], options: RewardOptions
) -> np.ndarray:
    """Image captioning.

    ``"levenshtein"`` (default, the paper's): ``max over references r of 1 - d(c, r) /
    (|c| + |r|)`` with ``d`` the insertion/deletion edit distance (``Levenshtein.ratio``);
    ``"cider_d"``: CIDEr-D against the references divided by its maximum 10 and clipped to
    [0, 1] (``text.cider_d_reward``). Its idf comes from ``options.cider_document_frequency``
    (e.g. ``text.cider_document_frequency(training_references)``), else from the batch's distinct
    reference lists, which is degenerate (idf 0) when the batch holds a single prompt.
    """
    if options.caption_metric == "levenshtein":
        return _text_scores(parsed, targets, text.levenshtein_ratio)

    def cider(candidates: list[str], refs: list[list[str]]) -> np.ndarray:
        df = options.cider_document_frequency
        if df is None:
            # Each distinct reference list is one document: the G completions of a prompt share
            # theirs, and counting it G times would zero the idf of every n-gram it holds.
            distinct = list({tuple(r): None for r in refs})
            df = text.cider_document_frequency([list(r) for r in distinct])
        return text.cider_d_reward(candidates, refs, df)

    return _text_scores(parsed, targets, cider)


def hybrid_caption_accuracy(
    parsed: Sequence[str | None], targets: Sequence[Target], options: RewardOptions
) -> np.ndarray:
    """Region and change captioning: ``w * S + (1 - w) * L``.

    ``S`` is the largest cosine similarity (clipped to [0, 1]) of the sentence embeddings of the
    answer and a reference (MiniLM), ``L`` the lexical metric ``options.lexical`` (ROUGE-L F1 by
    default), ``w = options.semantic_weight``. With ``use_embeddings=False`` the reward is ``L``.
    """
    if not options.use_embeddings:
        return _text_scores(parsed, targets, semantic.LEXICAL_METRICS[options.lexical])

    def hybrid(candidates: list[str], refs: list[list[str]]) -> np.ndarray:
        # The embedder (torch + MiniLM) loads here, on the first caption that needs it.
        return semantic.hybrid_caption_reward(
            candidates,
            refs,
            semantic_weight=options.semantic_weight,
            lexical=options.lexical,
            embedder=semantic.get_embedder(options.embedding_device),
        )

    return _text_scores(parsed, targets, hybrid)


def grounding_accuracy(
    parsed: Sequence[tuple[str, np.ndarray] | None],
    targets: Sequence[Target],
    options: RewardOptions,
) -> np.ndarray:
    """Grounding description: ``(1 - v) * B + v * L``.

    ``B`` is the multi-box reward of the boxes in the answer against the grounded objects (see
    ``multi_detection_accuracy``), ``L`` the lexical metric ``options.lexical`` of the answer's
    text (boxes removed) against the reference descriptions, ``v = grounding_text_weight``.
    """
    boxes = [None if p is None else p[1] for p in parsed]
    words = [None if p is None else p[0] for p in parsed]
    box_score = _box_reward(boxes, targets, options, "multibox", 4)
    text_score = _text_scores(words, targets, semantic.LEXICAL_METRICS[options.lexical])
    v = options.grounding_text_weight
    return (1.0 - v) * box_score + v * text_score


REGISTRY: dict[str, TaskSpec] = {
    "scene_cls": TaskSpec(classification_accuracy),
    "multilabel_cls": TaskSpec(multilabel_accuracy),
    "referred_det": TaskSpec(referred_detection_accuracy),
    "referred_det_rot": TaskSpec(rotated_detection_accuracy),
    "multi_det": TaskSpec(multi_detection_accuracy),
    "counting": TaskSpec(counting_accuracy),
    "vqa": TaskSpec(vqa_accuracy),
    "region_caption": TaskSpec(hybrid_caption_accuracy),
    "grounding_desc": TaskSpec(grounding_accuracy),
    "image_caption": TaskSpec(image_caption_accuracy),
    "change_det": TaskSpec(yes_no_accuracy),
    "change_caption": TaskSpec(hybrid_caption_accuracy),
    "temporal_cls": TaskSpec(classification_accuracy),
}
