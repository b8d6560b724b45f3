"""The caption guard's factors against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from geovlm.rewards import caption_guard as guard

REFS = ("a red building on farmland", "there is one red building next to the fields")  # 5, 9 words


def test_allowed_words_and_verbosity_factor():
    assert guard.allowed_words(REFS) == math.ceil(1.25 * 9) + 1 == 13
    assert guard.verbosity_factor(13, 13) == 1.0
    assert guard.verbosity_factor(26, 13) == pytest.approx(math.exp(-3.0))
    assert guard.verbosity_factor(20, 13) == pytest.approx(math.exp(3 * (1 - 20 / 13)))


def test_repetition_factor_counts_repeated_trigrams_relative_to_the_references():
    once = guard.words("a red building on farmland")
    thrice = once * 3  # 15 words, 13 trigrams, 5 distinct
    assert guard.repetition_factor(once) == 1.0
    assert guard.repetition_factor(thrice) == pytest.approx((5 / 13 / 0.75) ** 2)
    # A reference that repeats itself lowers the bar to its own share.
    listing = "a gray tank and a gray tank and a red ship"  # 11 words, 9 trigrams, 6 distinct
    assert guard.distinct_trigram_share(guard.words(listing)) == pytest.approx(6 / 9)
    repeats = "a gray tank and a gray tank"  # 7 words, 5 trigrams, 4 distinct: share 0.8
    assert guard.repetition_factor(guard.words(repeats)) == 1.0
    low = ("tank tank tank tank tank",)  # share 1/3
    assert guard.repetition_factor(thrice, low) == 1.0


@pytest.mark.parametrize(
    "text, clashes",
    [
        ("a red building on farmland", 0),
        ("the two images show the same scene", 0),
        ("a the building white storage tank on there", 1),
        ("a an with and two the white building", 2),  # "a an" and "an with"
        ("a two appeared the and were added vehicle", 1),
    ],
)
def test_word_salad_factor(text, clashes):
    assert guard.word_salad_factor(guard.words(text)) == 0.5**clashes


def test_copies_question():
    assert guard.copies_question("Write a caption for the image.", "Write a caption for the image.")
    assert guard.copies_question("What is in the region?", "What is in the region [1, 2, 3, 4]?")
    assert not guard.copies_question("a red building", "What is in the region?")
    assert not guard.copies_question("the image", "Describe the image.")  # no content word
    assert not guard.copies_question("a red building", None)


def test_caption_guard_combines_the_factors():
    candidates = ["a red building on farmland", "the image", "a red building on farmland " * 3,
                  "a the red building"]
    out = guard.caption_guard(candidates, [REFS] * 4)
    thrice = guard.words(candidates[2])
    expected = [1.0, 0.0, guard.verbosity_factor(15, 13) * guard.repetition_factor(thrice, REFS),
                0.5]
    np.testing.assert_allclose(out, expected)
    # No content word is fine when the references have none either.
    assert guard.caption_guard(["the image"], [("the image",)])[0] == 1.0
    with pytest.raises(ValueError, match="2 candidates but 1"):
        guard.caption_guard(["a", "b"], [REFS])


def test_real_captions_keep_their_score():
    """RSICD test captions, each against (up to) 5 others of its scene category: the guard leaves
    honest captions alone but for a few long ones and two typos ("the is", "a a")."""
    from tests.test_rewards.rsicd import captions_by_category

    rng = np.random.default_rng(0)
    factors, salad = [], []
    for captions in captions_by_category().values():
        for i, caption in enumerate(captions):
            others = [c for j, c in enumerate(captions) if j != i] or [caption]
            refs = [others[k] for k in rng.choice(len(others), min(5, len(others)), False)]
            factors.append(guard.caption_guard([caption], [refs])[0])
            tokens = guard.words(caption)
            assert guard.repetition_factor(tokens, refs) == 1.0, caption
            if guard.word_salad_factor(tokens) < 1:
                salad.append(caption)
    assert len(factors) > 1000
    assert np.mean(factors) > 0.98 and np.mean(np.array(factors) < 1) < 0.05
    assert len(salad) == 2 and all(" the is " in f" {c} " or " a a " in f" {c} " for c in salad)
