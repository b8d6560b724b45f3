"""Per-candidate text metrics for captioning rewards and evaluation, on Numba kernels.

Every metric takes ``candidates: list[str]`` (C) and ``references: list[list[str]]`` (one non-empty
list per candidate) and returns float64 scores, one row per candidate, computed exactly as the
established implementation defines them:

- ``bleu -> [C, 4]``: pycocoevalcap's per-sentence BLEU-1..4 ("closest" reference length, its
  1e-15 / 1e-9 smoothing);
- ``rouge_l -> [C]``: pycocoevalcap's ROUGE-L (beta 1.2, max precision and max recall over
  the references);
- ``cider_d -> [C]``: pycocoevalcap's CIDEr-D (raw, in [0, 10]), with the document frequencies of
  the batch itself (pycocoevalcap's corpus mode: each candidate's reference list is a document)
  or fixed ones from ``cider_document_frequency(training_references)``; ``cider_d_reward``
  divides by ``scale`` and clips to [0, 1];
- ``rouge_1_f1``, ``rouge_l_f1 -> [C]``: rouge-score's F-measures (its own tokenizer, Porter
  stemmer on by default as in the EarthDial evaluation), best reference (``score_multi``) or mean
  over references;
- ``levenshtein_ratio -> [C]``: python-Levenshtein's ``ratio`` on the raw strings, best reference;
- ``token_jaccard -> [C]``: |A & B| / |A | B| of the token sets, best reference (1 when both empty).

The pycocoevalcap metrics, the Jaccard index and ``tokenize`` share the regex tokenizer of
``_text_tokenize`` (pycocoevalcap's PTBTokenizer pipeline, without Java); its output is a fixed
point, so feeding pycocoevalcap ``" ".join(tokenize(s))`` gives identical scores.

Each call validates its inputs, keeps each distinct string once, tokenizes the whole batch with a
few C-level string passes (``_text_tokenize.ptb_lines``; unusual sentences go through the full,
cached tokenizer), numbers the words in Numba (``_text_words``) and runs the kernels of
``_text_ngrams`` / ``_text_lcs`` on flat arrays.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Literal

import numpy as np

from geovlm.rewards import _text_lcs, _text_ngrams
from geovlm.rewards._text_encode import TokenBatch, encode_chars, encode_ptb, encode_rouge
from geovlm.rewards._text_tokenize import ptb_tokens

Candidates = Sequence[str]
References = Sequence[Sequence[str]]
Reduce = Literal["max", "mean"]

_MAX_N = 4


def tokenize(text: str) -> list[str]:
    """pycocoevalcap-style tokens: lower-cased, clitics split, punctuation removed."""
    if not isinstance(text, str):
        raise TypeError(f"tokenize expects str, got {type(text).__name__}")
    return list(ptb_tokens(text))


def _lengths(batch: TokenBatch) -> np.ndarray:
    return np.diff(batch.offsets)


def _ngrams(batch: TokenBatch, max_n: int):
    return _text_ngrams.sentence_ngrams(batch.tokens, batch.offsets, batch.vocab_size, max_n)


def _segment_max(values: np.ndarray, ref_offsets: np.ndarray) -> np.ndarray:
    if ref_offsets.size == 1:
        return np.zeros(0, np.float64)
    return np.maximum.reduceat(values, ref_offsets[:-1])


def _reduce(values: np.ndarray, ref_offsets: np.ndarray, reduce: Reduce) -> np.ndarray:
    if reduce == "max":
        return _segment_max(values, ref_offsets)
    if reduce == "mean":
        if ref_offsets.size == 1:
            return np.zeros(0, np.float64)
        return np.add.reduceat(values, ref_offsets[:-1]) / np.diff(ref_offsets)
    raise ValueError(f"reduce must be 'max' or 'mean', got {reduce!r}")


def _pairs(batch: TokenBatch) -> tuple[np.ndarray, np.ndarray]:
    """Candidate length and reference length of every (candidate, reference) pair ``[R]``."""
    s = batch.strings
    lengths = _lengths(batch)
    per_pair_cand = np.repeat(s.candidate, np.diff(s.ref_offsets))
    return lengths[per_pair_cand], lengths[s.refs]


def _fmeasure(precision: np.ndarray, recall: np.ndarray) -> np.ndarray:
    # rouge-score's scoring.fmeasure: 2PR / (P + R), 0 when P + R == 0.
    total = precision + recall
    safe = np.where(total > 0, total, 1.0)
    return np.where(total > 0, 2 * precision * recall / safe, 0.0)


def bleu(candidates: Candidates, references: References) -> np.ndarray:
    """pycocoevalcap BLEU-1..4 of each candidate, ``[C, 4]`` float64 in [0, 1]."""
    batch = encode_ptb(candidates, references)
    ngrams, counts, noff, order, *_ = _ngrams(batch, _MAX_N)
    s = batch.strings
    return _text_ngrams.bleu(
        ngrams, counts, noff, order, _lengths(batch), s.candidate, s.ref_offsets, s.refs, _MAX_N
    )


def rouge_l(candidates: Candidates, references: References, beta: float = 1.2) -> np.ndarray:
    """pycocoevalcap ROUGE-L of each candidate, ``[C]`` float64 in [0, 1]."""
    batch = encode_ptb(candidates, references)
    s = batch.strings
    lcs = _text_lcs.pair_lcs(
        batch.tokens, batch.offsets, batch.vocab_size, s.candidate, s.ref_offsets, s.refs
    )
    len_c, len_r = _pairs(batch)
    # pycocoevalcap splits on " ": an empty sentence is one empty token, equal only to another.
    lcs = np.where((len_c == 0) & (len_r == 0), 1, lcs)
    precision = lcs / np.maximum(len_c, 1).astype(np.float64)
    recall = lcs / np.maximum(len_r, 1).astype(np.float64)
    p = _segment_max(precision, s.ref_offsets)
    r = _segment_max(recall, s.ref_offsets)
    ok = (p != 0) & (r != 0)
    b2 = beta**2
    denominator = np.where(ok, r + b2 * p, 1.0)
    return np.where(ok, ((1 + b2) * p * r) / denominator, 0.0)


def rouge_1_f1(
    candidates: Candidates,
    references: References,
    use_stemmer: bool = True,
    reduce: Reduce = "max",
) -> np.ndarray:
    """rouge-score ROUGE-1 F-measure of each candidate, ``[C]`` float64 in [0, 1].

    ``reduce="max"`` is rouge-score's ``score_multi``; ``"mean"`` averages over the references
    (the EarthDial image-captioning evaluation).
    """
    batch = encode_rouge(candidates, references, use_stemmer)
    ngrams, counts, noff, *_ = _ngrams(batch, 1)
    s = batch.strings
    overlap, _ = _text_ngrams.unigram_overlap(
        ngrams, counts, noff, batch.vocab_size, s.candidate, s.ref_offsets, s.refs
    )
    len_c, len_r = _pairs(batch)
    precision = overlap / np.maximum(len_c, 1).astype(np.float64)
    recall = overlap / np.maximum(len_r, 1).astype(np.float64)
    return _reduce(_fmeasure(precision, recall), s.ref_offsets, reduce)


def rouge_l_f1(
    candidates: Candidates,
    references: References,
    use_stemmer: bool = True,
    reduce: Reduce = "max",
) -> np.ndarray:
    """rouge-score ROUGE-L F-measure of each candidate, ``[C]`` float64 in [0, 1]."""
    batch = encode_rouge(candidates, references, use_stemmer)
    s = batch.strings
    lcs = _text_lcs.pair_lcs(
        batch.tokens, batch.offsets, batch.vocab_size, s.candidate, s.ref_offsets, s.refs
    )
    len_c, len_r = _pairs(batch)
    precision = lcs / np.maximum(len_c, 1).astype(np.float64)
    recall = lcs / np.maximum(len_r, 1).astype(np.float64)
    f = np.where((len_c > 0) & (len_r > 0), _fmeasure(precision, recall), 0.0)
    return _reduce(f, s.ref_offsets, reduce)


@dataclass(frozen=True, eq=False)
class CiderDocumentFrequency:
    """CIDEr-D document frequencies of a fixed corpus (e.g. the training references).

    ``counts[i]`` is the number of documents containing n-gram id i; ids follow
    ``_text_ngrams.sentence_ngrams`` over the corpus vocabulary ``word_ids``, and ``table`` is its
    n-gram key table.
    """

    n_documents: int
    word_ids: dict[str, int]
    table: np.ndarray
    counts: np.ndarray


def cider_document_frequency(documents: References) -> CiderDocumentFrequency:
    """Document frequencies of 1..4-grams over ``documents`` (each a list of reference sentences
    of one image), counted as pycocoevalcap does: once per document that contains the n-gram."""
    if len(documents) == 0:
        raise ValueError("cider_document_frequency needs at least one document")
    # Empty candidates only to reuse the batch layout: their n-grams are never counted.
    batch = encode_ptb([""] * len(documents), documents)
    ngrams, _, noff, order, _, _, table = _ngrams(batch, _MAX_N)
    s = batch.strings
    counts = _text_ngrams.document_frequency(ngrams, noff, s.ref_offsets, s.refs, order.size)
    return CiderDocumentFrequency(
        len(documents), {w: i for i, w in enumerate(batch.words)}, table, counts
    )


def cider_d(
    candidates: Candidates,
    references: References,
    document_frequency: CiderDocumentFrequency | None = None,
    sigma: float = 6.0,
) -> np.ndarray:
    """pycocoevalcap CIDEr-D of each candidate, ``[C]`` float64 in [0, 10].

    ``document_frequency=None`` takes the idf from this batch (pycocoevalcap's definition: each
    candidate's reference list is a document, so scores depend on the whole batch); pass
    ``cider_document_frequency(training_references)`` for batch-independent rewards.
    """
    batch = encode_ptb(candidates, references)
    s = batch.strings
    if s.candidate.size == 0:
        return np.zeros(0, np.float64)
    ngrams, counts, noff, order, prefix, last, _ = _ngrams(batch, _MAX_N)
    if document_frequency is None:
        df = _text_ngrams.document_frequency(ngrams, noff, s.ref_offsets, s.refs, order.size)
        ref_len = math.log(float(s.candidate.size))
    else:
        corpus = document_frequency
        word_map = np.fromiter(
            map(corpus.word_ids.get, batch.words, repeat(-1)), np.int64, batch.vocab_size
        )
        df = _text_ngrams.translate_document_frequency(
            order, prefix, last, batch.vocab_size, word_map, corpus.table, corpus.counts
        )
        ref_len = math.log(float(corpus.n_documents))
    return _text_ngrams.cider_d(
        ngrams,
        counts,
        noff,
        order,
        s.candidate,
        s.ref_offsets,
        s.refs,
        df,
        ref_len,
        float(sigma),
    )


def cider_d_reward(
    candidates: Candidates,
    references: References,
    document_frequency: CiderDocumentFrequency | None = None,
    scale: float = 10.0,
) -> np.ndarray:
    """CIDEr-D divided by ``scale`` and clipped to [0, 1] (10 is CIDEr-D's maximum)."""
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    raw = cider_d(candidates, references, document_frequency)
    return np.clip(raw / scale, 0.0, 1.0)


def levenshtein_ratio(candidates: Candidates, references: References) -> np.ndarray:
    """python-Levenshtein ``ratio`` (1 - indel distance / total length) against the best
    reference, on the raw strings, ``[C]`` float64 in [0, 1]."""
    batch = encode_chars(candidates, references)
    s = batch.strings
    lcs = _text_lcs.pair_lcs(
        batch.tokens, batch.offsets, batch.vocab_size, s.candidate, s.ref_offsets, s.refs
    )
    len_c, len_r = _pairs(batch)
    total = len_c + len_r
    distance = total - 2 * lcs
    ratio = np.where(total > 0, 1.0 - distance / np.maximum(total, 1).astype(np.float64), 1.0)
    return _segment_max(ratio, s.ref_offsets)


def token_jaccard(candidates: Candidates, references: References) -> np.ndarray:
    """Jaccard index of the candidate's and the best reference's token sets, ``[C]`` in [0, 1]."""
    batch = encode_ptb(candidates, references)
    ngrams, counts, noff, *_ = _ngrams(batch, 1)
    s = batch.strings
    vocab = batch.vocab_size
    _, shared = _text_ngrams.unigram_overlap(
        ngrams, counts, noff, vocab, s.candidate, s.ref_offsets, s.refs
    )
    distinct = _text_ngrams.distinct_unigrams(ngrams, noff, vocab)
    per_pair_cand = np.repeat(s.candidate, np.diff(s.ref_offsets))
    union = distinct[per_pair_cand] + distinct[s.refs] - shared
    jaccard = np.where(union > 0, shared / np.maximum(union, 1).astype(np.float64), 1.0)
    return _segment_max(jaccard, s.ref_offsets)
