"""multilabel_cls: multi-label classification, every object class present in the image.

* parse: the distinct classes of ``Target.classes`` named (``[]`` for an explicit "none"), with
  the count of listed items that name none of them; without a vocabulary the listed items, each
  mapped onto a ``Target.labels`` class it spells.
* accuracy: informedness (true-positive rate minus false-positive rate over the vocabulary), so
  naming every class scores 0, and an item that names no class ("two vehicles", free text) or
  repeats one counts as a false positive; ``RewardOptions.multilabel`` selects F1 or the
  paper's recall.
* metrics: precision, recall, F1 and exact match of the class sets; headline ``f1``.
* records: the answer lists the labels, separated by ``,`` ``;`` or "and".
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from geovlm import earthdial_metrics
from geovlm.data.readers import Exchange, as_label
from geovlm.data.scenes import OBJECT_CLASSES
from geovlm.data.schema import Target
from geovlm.data.synthetic import SceneContext, class_counts, inventory
from geovlm.metrics import MetricOptions, canonical_label, sample_mean
from geovlm.rewards.options import RewardOptions
from geovlm.rewards.parse import (
    ParseOptions,
    label_matcher,
    normalize_text,
    parse_labels,
    says_none,
    split_items,
)
from geovlm.tasks.spec import TaskSpec


class ClassList(list):
    """The classes a list answer names (a ``list[str]``) and ``unnamed``: how many of the answer's
    items (``split_items``) name no class of the vocabulary as a whole ("two vehicles",
    "a vehicle", a sentence around a class name) or repeat a class already named.

    Without it a GRPO policy drifts into lists like "building, vehicle and two vehicles" at no
    cost: the classes are found inside the junk and the junk itself is free.
    """

    def __init__(self, labels=(), unnamed: int = 0):
        super().__init__(labels)
        self.unnamed = unnamed


def parse(answer: str, target: Target, options: ParseOptions) -> ClassList | None:
    """``ClassList`` of the classes named, empty for "none", else ``None``."""
    if target.classes:
        labels = parse_labels(answer, target.classes, options.synonyms)
        matcher = label_matcher(tuple(target.classes), tuple(options.synonyms))
        items = [matcher.exact(item) for item in split_items(answer, distinct=False)]
        # Every item but the first naming of each class is junk: no class, or a repeat.
        unnamed = len(items) - len({name for name in items if name is not None})
    else:
        matcher = label_matcher(tuple(target.labels), tuple(options.synonyms))
        labels = list(dict.fromkeys(matcher.exact(i) or i for i in split_items(answer)))
        unnamed = 0  # every item is a guess of its own, counted against the true labels
    if labels:
        return ClassList(labels, unnamed)
    return ClassList() if says_none(answer) else None


def multilabel_accuracy(
    parsed: Sequence[list[str] | None], targets: Sequence[Target], options: RewardOptions
) -> np.ndarray:
    """Multi-label classification: the named classes ``P`` against the true ones ``G``, out of the
    vocabulary ``V = Target.classes`` (``options.multilabel``):

    * ``"informedness"`` (default): ``|P ∩ G| / |G| - (|P - G| + U) / |V - G|`` clipped at 0,
      the true-positive rate minus the false-positive rate (Youden's J), ``U`` the listed items
      that name no class (``ClassList.unnamed``), each a false positive. Any answer chosen
      without looking at the image, naming every class included, scores 0 in expectation, like a
      wrong one. With every class true (``V = G``) it is the recall, less ``U / |V|``; without a
      vocabulary the false-positive rate counts the extra items against ``|G|`` (as many
      negatives as positives, capped at 1).
    * ``"f1"``: ``2 |P ∩ G| / (|P| + U + |G|)``; naming every class scores
      ``2 |G| / (|V| + |G|)``.
    * ``"recall"``: ``|P ∩ G| / |G|``, GeoVLM-R1's reward, which naming every class maximises.

    No true class (``G`` empty) scores 1 for an answer that names none ("none") and 0 otherwise.
    """
    out = np.zeros(len(parsed))
    for i, (pred, t) in enumerate(zip(parsed, targets, strict=True)):
        if pred is None:
            continue
        vocabulary = tuple(t.classes) or tuple(t.labels)
        matcher = label_matcher(vocabulary, tuple(options.synonyms))
        truth = {normalize_text(matcher.exact(label) or label) for label in t.labels}
        guess = {normalize_text(label) for label in pred}
        unnamed = getattr(pred, "unnamed", 0)
        hit = len(truth & guess)
        if not truth:
            out[i] = float(not guess and not unnamed)
        elif options.multilabel == "f1":
            out[i] = 2.0 * hit / (len(truth) + len(guess) + unnamed)
        elif options.multilabel == "recall":
            out[i] = hit / len(truth)
        else:
            if t.classes:
                classes = {normalize_text(matcher.exact(c) or c) for c in t.classes}
                negatives = len(classes - truth)
            else:
                negatives = len(truth)
            wrong = len(guess - truth) + unnamed
            if negatives:
                false_rate = min(wrong / negatives, 1.0)
            else:  # every class is true (V = G): only junk items can be wrong
                false_rate = min(unnamed / len(truth), 1.0)
            out[i] = max(hit / len(truth) - false_rate, 0.0)
    return out


def multilabel_metrics(
    answers: Sequence[str | None],
    targets: Sequence[Target],
    options: MetricOptions | None = None,
) -> dict:
    """multilabel_cls: per-sample set comparison of the named classes with ``Target.labels``.

    With P the predicted set (``parse_labels`` over ``Target.classes``; without a vocabulary
    the comma-separated items, each folded onto a gold label it spells) and G the gold set:
    ``precision`` = |P∩G|/|P|, ``recall`` = |P∩G|/|G| (EarthDial's "accuracy" for multi-label
    sets), ``f1`` = 2|P∩G|/(|P|+|G|), ``exact_match`` = [P == G]; an empty set on both sides
    scores 1, an empty set on one side 0. Means over samples. The headline is ``f1``: recall
    alone is maximised by naming every class.
    """
    rows = []
    for answer, target in zip(answers, targets, strict=True):
        if target.classes:
            gold = {canonical_label(label, target.classes) for label in target.labels}
            pred = set(parse_labels(answer, target.classes)) if answer else set()
        else:
            # No vocabulary: each listed item is a gold label (up to plurals / synonyms) or an
            # extra class of its own, so extra items still cost precision.
            matcher = label_matcher(tuple(target.labels))
            gold = {canonical_label(label, tuple(target.labels)) for label in target.labels}
            items = split_items(answer) if answer else []
            pred = {matcher.exact(item) or item for item in items}
        hit = len(pred & gold)
        if not pred and not gold:
            rows.append((1.0, 1.0, 1.0, 1.0))
            continue
        precision = hit / len(pred) if pred else 0.0
        recall = hit / len(gold) if gold else 0.0
        f1 = 2.0 * hit / (len(pred) + len(gold))
        rows.append((precision, recall, f1, float(pred == gold)))
    arr = np.asarray(rows, dtype=np.float64).reshape(-1, 4)
    names = ("precision", "recall", "f1", "exact_match")
    return {name: sample_mean(arr[:, i]) for i, name in enumerate(names)}


def from_record(exchange: Exchange) -> Target:
    classes = exchange.string_list("classes", "options", "choices")
    parts = re.split(r",|;|\band\b", exchange.plain_answer())
    labels = tuple(p for p in (as_label(x) for x in parts) if p)
    if not labels:
        raise exchange.error("no labels in the answer")
    return Target(
        task="multilabel_cls",
        answer=", ".join(labels),
        image_size=exchange.image_size,
        labels=labels,
        classes=classes,
    )


def generate(ctx: SceneContext) -> tuple[str, str, Target]:
    """The object classes of the scene, in ``OBJECT_CLASSES`` order."""
    labels = tuple(class_counts(ctx.objects))
    think = f"I see {inventory(ctx.objects)}."
    target = ctx.target(", ".join(labels), labels=labels, classes=OBJECT_CLASSES)
    return ctx.prompt(), think, target


MULTILABEL_CLS = TaskSpec(
    name="multilabel_cls",
    description="multi-label classification: every object class present",
    parse=parse,
    accuracy=multilabel_accuracy,
    metrics={
        "geovlm": multilabel_metrics,
        "earthdial": earthdial_metrics.classification_metrics,
    },
    headline="f1",
    prompts={
        "default": (
            "Which object classes are in the image?",
            "List the object classes in the image.",
        )
    },
    generate=generate,
    from_record=from_record,
    aliases=("multilabel", "multi_label_classification"),
)

SPECS = (MULTILABEL_CLS,)
