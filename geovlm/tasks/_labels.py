"""What the single-label tasks share (scene_cls, temporal_cls; vqa reads its records likewise):
the answer names one class of a vocabulary.

* parse: the one class of ``Target.classes`` named (a hedge "A or B" names none); without a
  vocabulary the whole answer must be a variant of ``Target.label``.
* accuracy: ``1[class == label]`` (the recall of the one true class).
* metrics: ``accuracy``, the fraction of answers that name the label (``label_correct``).
* records: the answer is the label, lower case without a trailing period; ``classes`` /
  ``options`` / ``choices`` give the vocabulary (the reader puts ``question_type`` into ``meta``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from geovlm.data.readers import Exchange, as_label
from geovlm.data.schema import Target
from geovlm.metrics import MetricOptions, canonical_label, sample_mean
from geovlm.rewards.options import RewardOptions
from geovlm.rewards.parse import (
    ParseOptions,
    label_matcher,
    normalize_text,
    parse_label,
    parse_yes_no,
)


def parse_single_label(answer: str, target: Target, options: ParseOptions) -> str | None:
    """The one class the answer names (``str``), or ``None``."""
    if target.classes:
        return parse_label(answer, target.classes, options.synonyms)
    vocab = (target.label,) if target.label else ()
    return label_matcher(vocab, tuple(options.synonyms)).exact(answer) if vocab else None


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


def label_correct(answer: str | None, target: Target) -> bool:
    """Whether a single-label answer names the target's label.

    yes/no labels compare as yes/no (``parse_yes_no``: "Yes, it changed." is yes). Otherwise the
    answer must name exactly one class of ``Target.classes`` and it must be the label
    (``parse_label``: case, plurals and synonyms folded, "A or B" is wrong); without a
    vocabulary the label is the only class, so "It is a forest." names "forest" (the reward's
    rule too).
    """
    if answer is None or target.label is None:
        return False
    gold = target.label
    if normalize_text(gold) in ("yes", "no"):
        return parse_yes_no(answer) == (normalize_text(gold) == "yes")
    classes = tuple(target.classes) or (gold,)
    return parse_label(answer, classes) == canonical_label(gold, classes)


def classification_metrics(
    answers: Sequence[str | None],
    targets: Sequence[Target],
    options: MetricOptions | None = None,
) -> dict:
    """scene_cls / temporal_cls / change_det.

    ``accuracy``: fraction of samples whose answer names the label (``label_correct``).
    """
    pairs = zip(answers, targets, strict=True)
    return {"accuracy": sample_mean([label_correct(a, t) for a, t in pairs])}


def label_target(exchange: Exchange) -> Target:
    """The Target of a record whose answer is one label."""
    classes = exchange.string_list("classes", "options", "choices")
    label = as_label(exchange.plain_answer())
    if not label:
        raise exchange.error("empty answer")
    return Target(
        task=exchange.task,
        answer=label,
        image_size=exchange.image_size,
        label=label,
        classes=classes,
    )
