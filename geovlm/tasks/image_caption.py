"""image_caption: image captioning, a sentence about the whole scene.

* parse: the answer sentence.
* accuracy: the Levenshtein ratio (the paper's) or CIDEr-D (``RewardOptions.caption_metric``),
  through the caption guard.
* metrics: ROUGE-1, ROUGE-L, METEOR, BLEU-1..4 and CIDEr; headline ``rouge_l``.
* records: the answer is the first reference; ``captions`` / ``references`` add more.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from geovlm import earthdial_metrics
from geovlm.data.schema import Target
from geovlm.data.synthetic import COVER_CUES, SceneContext, inventory, scene_captions
from geovlm.metrics import MetricOptions, caption_metrics
from geovlm.rewards import text
from geovlm.rewards.accuracy import text_scores
from geovlm.rewards.options import RewardOptions
from geovlm.tasks._captions import caption_target, parse_caption
from geovlm.tasks.spec import TaskSpec


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
    Either is multiplied by the caption guard (``rewards.caption_guard``) unless
    ``options.caption_guard`` is off.
    """
    guard = options.caption_guard
    if options.caption_metric == "levenshtein":
        return text_scores(parsed, targets, text.levenshtein_ratio, guard)

    def cider(candidates: list[str], refs: list[list[str]]) -> np.ndarray:
        df = options.cider_document_frequency
        if df is None:
            # Each distinct reference list is one document: the G completions of a prompt share
            # theirs, and counting it G times would zero the idf of every n-gram it holds.
            distinct = list({tuple(r): None for r in refs})
            df = text.cider_document_frequency([list(r) for r in distinct])
        return text.cider_d_reward(candidates, refs, df)

    return text_scores(parsed, targets, cider, guard)


def full_caption_metrics(
    answers: Sequence[str | None],
    targets: Sequence[Target],
    options: MetricOptions | None = None,
) -> dict:
    """``rouge_1``, ``rouge_l``, ``meteor``, ``bleu_1..4``, ``cider`` (``caption_metrics``, full,
    as VRSBench reports image and change captioning)."""
    options = options or MetricOptions()
    return caption_metrics(answers, targets, full=True, meteor_backend=options.meteor_backend)


def generate(ctx: SceneContext) -> tuple[str, str, Target]:
    """Four captions of the scene (``scene_captions``)."""
    references = scene_captions(ctx)
    think = f"I see {COVER_CUES[ctx.cover]} with {inventory(ctx.objects)}."
    target = ctx.target(references[0], captions=references)
    return ctx.prompt(), think, target


IMAGE_CAPTION = TaskSpec(
    name="image_caption",
    description="image captioning: a sentence about the whole scene",
    parse=parse_caption,
    accuracy=image_caption_accuracy,
    metrics={
        "geovlm": full_caption_metrics,
        "earthdial": earthdial_metrics.caption_metrics,
    },
    headline="rouge_l",
    prompts={
        "default": (
            "Describe the image.",
            "Write a caption for the image.",
            "What does this image show?",
        )
    },
    generate=generate,
    from_record=caption_target,
    aliases=("caption", "captioning"),
    tags=("caption",),
)

SPECS = (IMAGE_CAPTION,)
