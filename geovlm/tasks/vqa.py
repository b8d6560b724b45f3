"""vqa: visual question answering (presence / comparison), a short answer.

* parse: yes/no (``bool``) when the reference is a yes or a no, one number (``float``) when it is a
  number, else the normalised answer; a hedge (both options of the question, "A or B") is none.
* accuracy: yes/no or number match; open answers by token-set Jaccard or exact match
  (``RewardOptions.vqa``).
* metrics: ``accuracy``, and ``accuracy/<question type>`` per ``Target.meta["question_type"]``.
* records: the answer is the label (as the single-label tasks read it).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from geovlm import earthdial_metrics
from geovlm.data.scenes import OBJECT_CLASSES, PLURALS
from geovlm.data.schema import Target
from geovlm.data.synthetic import SceneContext, class_counts, noun
from geovlm.metrics import MetricOptions, canonical_label, sample_mean
from geovlm.rewards import text
from geovlm.rewards.options import RewardOptions
from geovlm.rewards.parse import (
    ParseOptions,
    is_number,
    is_yes_no,
    label_matcher,
    named_choices,
    normalize_text,
    offered_choices,
    parse_label,
    parse_number,
    parse_yes_no,
    split_items,
)
from geovlm.tasks._labels import label_target
from geovlm.tasks.spec import TaskSpec


def parse(answer: str, target: Target, options: ParseOptions) -> bool | float | str | None:
    """The answer as the reference's kind: ``bool`` (yes/no), ``float`` (a number; "3 or 4" is
    none) or the normalised text of an open answer.

    An open answer is a hedge, hence ``None``, when it names two or more of the alternatives
    offered, ``Target.classes`` or else the question's "A or B" list (``offered_choices``); without
    alternatives, when it lists more items than the reference ("ships, tanks" for "ships").
    """
    gold = target.label or target.answer
    if is_yes_no(gold):
        return parse_yes_no(answer)
    if is_number(gold):
        return parse_number(answer)
    choices = tuple(target.classes) or offered_choices(options.prompt)
    if choices:
        if len(named_choices(answer, choices, options.synonyms)) > 1:
            return None
    elif len(split_items(answer)) > max(len(split_items(gold)), 1):
        return None
    return normalize_text(answer) or None


def vqa_accuracy(
    parsed: Sequence[bool | float | str | None], targets: Sequence[Target], options: RewardOptions
) -> np.ndarray:
    """Visual question answering against the short answer ``a = target.label``.

    Yes/no questions: ``1[answer == a]``; numbers: ``1[answer == a]``. Open answers: ``"jaccard"``
    (default) the Jaccard index of the token sets, ``|T(answer) ∩ T(a)| / |T(answer) ∪ T(a)|``, so
    padding the answer with words (or echoing the question) lowers it; ``"exact"``:
    ``1[normalised answer == a]`` up to plural forms and synonyms. A hedge over the question's
    options parses to nothing and scores 0 (``parse``).
    """
    out = np.zeros(len(parsed))
    open_index = []
    for i, (pred, t) in enumerate(zip(parsed, targets, strict=True)):
        if pred is None:
            continue
        if isinstance(pred, bool):
            out[i] = float(pred == parse_yes_no(t.label or t.answer))
        elif isinstance(pred, float):
            out[i] = float(pred == parse_number(t.label or t.answer))
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


def vqa_correct(answer: str | None, target: Target) -> bool:
    """A short VQA answer against ``Target.label`` (or ``Target.answer``).

    yes/no gold: yes/no comparison (``parse_yes_no``); gold from ``Target.classes``: the one
    class named (``parse_label``); otherwise the whole answer must be the gold answer up to case,
    punctuation, plural forms and synonyms (``LabelMatcher.exact``, as the reward's "exact" VQA
    mode), or give the same single number ("three" for "3").
    """
    if answer is None:
        return False
    gold = target.label if target.label is not None else target.answer
    norm = normalize_text(gold)
    if norm in ("yes", "no"):
        return parse_yes_no(answer) == (norm == "yes")
    if target.classes:
        return parse_label(answer, target.classes) == canonical_label(gold, target.classes)
    if label_matcher((gold,)).exact(answer) is not None:
        return True
    number = parse_number(gold)
    return number is not None and parse_number(answer) == number


def vqa_metrics(
    answers: Sequence[str | None],
    targets: Sequence[Target],
    options: MetricOptions | None = None,
) -> dict:
    """vqa: ``accuracy`` over all questions and ``accuracy/<type>`` per
    ``Target.meta["question_type"]`` (presence, comparison, rural/urban, ...), as the paper's
    LRBEN / HRBEN tables split them. Correctness is ``vqa_correct``.
    """
    pairs = zip(answers, targets, strict=True)
    correct = [vqa_correct(a, t) for a, t in pairs]
    out = {"accuracy": sample_mean(correct)}
    by_type: dict[str, list[bool]] = {}
    for ok, target in zip(correct, targets, strict=True):
        qtype = target.meta.get("question_type")
        if qtype:
            by_type.setdefault(str(qtype), []).append(ok)
    for qtype in sorted(by_type):
        out[f"accuracy/{qtype}"] = sample_mean(by_type[qtype])
    return out


def generate(ctx: SceneContext) -> tuple[str, str, Target]:
    """Half presence questions (is there a ...?), half comparisons of two classes' counts."""
    counts = class_counts(ctx.objects)
    absent = [c for c in OBJECT_CLASSES if c not in counts]
    if ctx.rng.random() < 0.5:
        category = ctx.choice(list(counts) if ctx.rng.random() < 0.5 or not absent else absent)
        n = counts.get(category, 0)
        answer = "yes" if n else "no"
        prompt = ctx.prompt("presence", singular=category, plural=PLURALS[category])
        think = f"I see {n} {noun(category, n)}." if n else f"I see no {PLURALS[category]}."
        return prompt, think, ctx.target(answer, label=answer, meta={"question_type": "presence"})
    first = ctx.choice(list(counts))
    second = ctx.choice([c for c in OBJECT_CLASSES if c != first])
    a, b = (first, second) if ctx.rng.random() < 0.5 else (second, first)
    na, nb = counts.get(a, 0), counts.get(b, 0)
    fields = {"plural_a": PLURALS[a], "plural_b": PLURALS[b]}
    if na != nb and ctx.rng.random() < 0.5:
        answer = PLURALS[a] if na > nb else PLURALS[b]
        prompt = ctx.prompt("which", **fields)
    else:
        answer = "yes" if na > nb else "no"
        prompt = ctx.prompt("more", **fields)
    think = f"I count {na} {noun(a, na)} and {nb} {noun(b, nb)}."
    return prompt, think, ctx.target(answer, label=answer, meta={"question_type": "comparison"})


VQA = TaskSpec(
    name="vqa",
    description="visual question answering (presence / comparison): a short answer",
    parse=parse,
    accuracy=vqa_accuracy,
    metrics={
        "geovlm": vqa_metrics,
        "earthdial": earthdial_metrics.vqa_metrics,
    },
    headline="accuracy",
    prompts={
        "presence": ("Is there a {singular} in the image?", "Are there any {plural}?"),
        "more": ("Are there more {plural_a} than {plural_b}?",),
        "which": ("Which are more numerous, {plural_a} or {plural_b}?",),
    },
    generate=generate,
    from_record=label_target,
    aliases=("visual_question_answering",),
    tags=("vqa",),
)

SPECS = (VQA,)
