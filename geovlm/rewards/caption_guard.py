"""The caption guard: a factor that keeps text which games a caption metric from out-scoring an
honest caption.

Lexical overlap (ROUGE, Levenshtein) and sentence-embedding similarity both pay for text that is
*like* the references without describing the scene: several plausible captions strung together
(one of them is likely close to the truth), a caption repeated, a long bag of the words captions
use most, or the frame words alone ("a ... of the image"). An honest caption of another scene
names its content in about the references' length and scores below all of those. The guard
scales the caption reward by

``caption_guard(candidates [C], references [C][*]) -> [C]`` float64 in [0, 1]:

* ``0`` for a candidate without a content word (``FUNCTION_WORDS`` only: articles, prepositions,
  pronouns, auxiliaries, question words and the caption frame words "image", "view", "scene" ...),
  unless one of its references has none either;
* the verbosity factor: 1 up to ``allowed = ceil(1.25 L) + 1`` words, ``L`` the word count of the
  longest reference, then ``exp(3 (1 - n / allowed))`` for ``n`` words (0.34 at 1.36 x ``allowed``,
  0.05 at twice ``allowed``). An honest paraphrase a word or two longer than the references keeps
  its score; k captions strung together lose about ``exp(-3 (k - 1))``;
* the repetition factor ``min(1, u / t) ** 2``, ``u`` the share of distinct word trigrams
  (1 for a caption that repeats no phrase; about 0.1 for a caption said three times), ``t`` 0.75
  or the lowest share among the references;
* the word-salad factor ``0.5 ** k`` for ``k`` articles followed by a word no English phrase
  puts there ("a the", "the and", "an with"): a bag of the most frequent words, in any order but
  a sentence's, has several; an honest caption has none.

A caption that only copies the question (every content word of it is in the prompt) is no answer
at all: ``copies_question`` lets the caption parsers return ``None`` for it.

Words are rouge-score's tokens (lower-case ``[a-z0-9]`` runs); the factor of each distinct
(candidate, references) pair is computed once and cached.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from geovlm.rewards._text_tokenize import rouge_tokens

# Words that say nothing about a scene by themselves (and the clitic pieces "there's" and "don't"
# leave). Negations ("no", "not", "nothing") and numbers are content: "there is no change" and
# "two ships" say something.
FUNCTION_WORDS: frozenset[str] = frozenset(
    """
    a an the this that these those there here it its they them their he she his her we our you
    your i me my some any each every all both either neither such
    of in on at by for from to into onto over under above below near with within without about
    around across along among between behind beside besides beyond through toward towards upon
    off out up down than as like
    and or but nor so yet also then
    s t d ll re ve m
    is are was were be been being am has have had having do does did can could will would shall
    should may might must
    what which who whom whose where when why how
    image images picture pictures photo photos view scene scenes shown shows show showing seen
    visible appears appear aerial overhead
    """.split()
)

# The articles, and the words that never follow one directly ("this", "each" are left out: as
# pronouns they do take "is", "of": "this is a harbor", "each of them").
DETERMINERS: frozenset[str] = frozenset("a an the".split())
_NOT_AFTER_DETERMINER: frozenset[str] = DETERMINERS | frozenset(
    """
    of in on at by for from to into onto with within without about across along among between
    through and or but nor so yet is are was were be been am has have had do does did can could
    will would shall should may might must it its they them their he she his her we our you your
    i me my what which who whom whose where when why how there here
    """.split()
)
# Trigrams repeated below this share of distinct ones start to cost (a phrase said again).
_DISTINCT_TRIGRAMS = 0.75
# Words the verbosity factor allows beyond the longest reference: a quarter of it, plus one.
_SLACK_RATIO = 1.25
# How fast the factor falls beyond the allowed length: exp(-_DECAY) at twice the allowed length.
_DECAY = 3.0


def words(text: str) -> tuple[str, ...]:
    """rouge-score's tokens of ``text`` (lower-case, no stemming), cached."""
    return rouge_tokens(text, False)


def has_content(text: str) -> bool:
    """Whether ``text`` has a word outside ``FUNCTION_WORDS``."""
    return any(w not in FUNCTION_WORDS for w in words(text))


def allowed_words(references: Sequence[str]) -> int:
    """The word count up to which a caption of these references is not penalised."""
    longest = max((len(words(r)) for r in references), default=0)
    return math.ceil(_SLACK_RATIO * longest) + 1


def verbosity_factor(n_words: int, allowed: int) -> float:
    """1 up to ``allowed`` words, then ``exp(3 (1 - n_words / allowed))``."""
    if n_words <= allowed:
        return 1.0
    return math.exp(_DECAY * (1.0 - n_words / allowed))


def distinct_trigram_share(tokens: Sequence[str]) -> float:
    """The share of distinct word trigrams among the trigrams of ``tokens`` (1 for fewer than 3)."""
    trigrams = list(zip(tokens, tokens[1:], tokens[2:], strict=False))
    return len(set(trigrams)) / len(trigrams) if trigrams else 1.0


def repetition_factor(tokens: Sequence[str], references: Sequence[str] = ()) -> float:
    """``min(1, u / t) ** 2``: ``u`` the distinct-trigram share of ``tokens``, ``t`` 0.75 or the
    lowest share of a reference if lower (a grounded description that lists "a gray storage tank"
    twice repeats what its references repeat)."""
    floor = min([_DISTINCT_TRIGRAMS, *(distinct_trigram_share(words(r)) for r in references)])
    return min(1.0, distinct_trigram_share(tokens) / floor) ** 2


def word_salad_factor(tokens: Sequence[str]) -> float:
    """``0.5 ** k`` for ``k`` articles directly followed by a word that cannot follow one."""
    clashes = sum(
        a in DETERMINERS and b in _NOT_AFTER_DETERMINER
        for a, b in zip(tokens, tokens[1:], strict=False)
    )
    return 0.5**clashes


def copies_question(answer: str, question: str | None) -> bool:
    """Whether every content word of ``answer`` (there is at least one) is a word of
    ``question``: the question copied back, not a caption."""
    if not question:
        return False
    content = [w for w in words(answer) if w not in FUNCTION_WORDS]
    asked = set(words(question))
    return bool(content) and all(w in asked for w in content)


def caption_guard(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> np.ndarray:
    """``[C]`` factor in [0, 1] for the caption reward of each candidate (module docstring)."""
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
    out = np.empty(len(candidates))
    for i, (candidate, refs) in enumerate(zip(candidates, references, strict=True)):
        out[i] = _guard(candidate, tuple(refs))
    return out


@lru_cache(maxsize=1 << 16)
def _guard(candidate: str, refs: tuple[str, ...]) -> float:
    """The factor of one candidate (cached: a group's completions repeat)."""
    if not has_content(candidate) and all(map(has_content, refs)):
        return 0.0
    tokens = words(candidate)
    return (
        verbosity_factor(len(tokens), allowed_words(refs))
        * repetition_factor(tokens, refs)
        * word_salad_factor(tokens)
    )
