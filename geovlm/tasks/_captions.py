"""What the captioning tasks share (region_caption, image_caption, change_caption; grounding_desc
reads its references likewise): the answer is a sentence.

* parse: the answer text (at least one word, not only the question's words).
* accuracy: ``hybrid_caption_accuracy`` (region and change captioning); image captioning has its
  own. Both go through the caption guard (``rewards.caption_guard``).
* records: the answer without boxes is the first reference; a ``captions`` / ``references`` field
  adds more.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from geovlm.data.readers import Exchange
from geovlm.data.schema import Target
from geovlm.rewards import semantic
from geovlm.rewards.accuracy import text_scores
from geovlm.rewards.caption_guard import copies_question
from geovlm.rewards.options import RewardOptions
from geovlm.rewards.parse import ParseOptions, normalize_text


def parse_caption(answer: str, target: Target, options: ParseOptions) -> str | None:
    """The answer sentence, stripped, or ``None`` when it has no word or only copies the question
    (``caption_guard.copies_question``)."""
    if not normalize_text(answer) or copies_question(answer, options.prompt):
        return None
    return answer.strip()


def hybrid_caption_accuracy(
    parsed: Sequence[str | None], targets: Sequence[Target], options: RewardOptions
) -> np.ndarray:
    """Region and change captioning: ``g * (w * S + (1 - w) * L)``.

    ``S`` is the largest cosine similarity (clipped to [0, 1]) of the sentence embeddings of the
    answer and a reference (MiniLM), ``L`` the lexical metric ``options.lexical`` (ROUGE-L F1 by
    default), ``w = options.semantic_weight``. With ``use_embeddings=False`` the reward is
    ``g * L``. ``g`` is the caption guard (``rewards.caption_guard``: 0 without a content word,
    less for an answer longer than its references), 1 with ``options.caption_guard=False``.
    """
    guard = options.caption_guard
    if not options.use_embeddings:
        return text_scores(parsed, targets, semantic.LEXICAL_METRICS[options.lexical], guard)

    def hybrid(candidates: list[str], refs: list[list[str]]) -> np.ndarray:
        # The embedder (torch + MiniLM) loads here, on the first caption that needs it.
        return semantic.hybrid_caption_reward(
            candidates,
            refs,
            semantic_weight=options.semantic_weight,
            lexical=options.lexical,
            embedder=semantic.get_embedder(options.embedding_device),
        )

    return text_scores(parsed, targets, hybrid, guard)


def record_captions(exchange: Exchange, plain: str) -> tuple[str, ...]:
    """``plain`` (the answer without boxes), then the record's other references."""
    references = exchange.string_list("captions", "references")
    return (plain, *[r for r in references if r != plain])


def caption_target(exchange: Exchange, region: np.ndarray | None = None) -> Target:
    """The Target of a record whose answer is a caption (of the ``region`` box, if given)."""
    plain = exchange.plain_answer()
    if not plain:
        raise exchange.error("empty answer")
    return Target(
        task=exchange.task,
        answer=plain,
        image_size=exchange.image_size,
        captions=record_captions(exchange, plain),
        region=region,
    )
