"""Numba n-gram kernels: n-gram ids and counts per sentence, BLEU, CIDEr-D, ROUGE-1, Jaccard.

N-gram ids are exact (no hashing loss) and hierarchical: a unigram's id is its word id
(``0 <= id < V``); the n-gram ``g + w`` (prefix n-gram ``g``, last word ``w``) gets the next free id
``>= V`` the first time the key ``(id(g) << 32) | w`` is seen, in an open-addressing table.
Because a prefix is always inserted before its extensions, ``prefix[i] < i``.

``sentence_ngrams(tokens [T], offsets [U+1], V, max_n)`` returns, per sentence u, its distinct
n-grams of order 1..max_n as ids ``ngrams[noff[u]:noff[u+1]]`` with their counts, in order of
first appearance, unigrams first (ids < V); plus ``order``/``prefix``/``last`` ``[n_ids]`` and the
key table ``[slots, 2]`` (key, id).

Candidates and references are addressed as in ``_text_encode``: ``cand [C]`` string index,
``ref_offsets [C+1]`` / ``refs [R]`` string indices. A candidate is matched against a reference
by scattering its n-grams into an id-indexed scratch array (``mark[id] == c`` and ``slot[id]``)
and streaming the reference's n-grams through it: no sorting, O(|candidate| + |reference|).
Scores are float64.
"""

from __future__ import annotations

import math

import numba
import numpy as np

_EMPTY = -1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@numba.njit(cache=True, inline="always")
def _slot(key: int, mask: int) -> int:
    return np.int64((np.uint64(key) * _GOLDEN) >> np.uint64(32)) & mask


@numba.njit(cache=True)
def table_find(table: np.ndarray, key: int) -> int:
    """The id stored under ``key`` in an open-addressing ``table [cap, 2]`` (key, id), or -1."""
    mask = table.shape[0] - 1
    s = _slot(key, mask)
    while True:
        k = table[s, 0]
        if k == key:
            return table[s, 1]
        if k == _EMPTY:
            return -1
        s = (s + 1) & mask


@numba.njit(cache=True)
def _table_grow(table: np.ndarray) -> np.ndarray:
    new = np.full((table.shape[0] * 2, 2), _EMPTY, np.int64)
    mask = new.shape[0] - 1
    for i in range(table.shape[0]):
        if table[i, 0] != _EMPTY:
            s = _slot(table[i, 0], mask)
            while new[s, 0] != _EMPTY:
                s = (s + 1) & mask
            new[s, 0] = table[i, 0]
            new[s, 1] = table[i, 1]
    return new


# The key table holds at most 70% of its slots; it starts large enough for a reward batch but at
# most this big, so that a large corpus (cider_document_frequency) grows it instead.
_MAX_INITIAL_SLOTS = 1 << 22


@numba.njit(cache=True)
def sentence_ngrams(tokens: np.ndarray, offsets: np.ndarray, vocab_size: int, max_n: int):
    """See the module docstring. Returns (ngrams, counts, noff, order, prefix, last, table)."""
    n_sent = offsets.size - 1
    longer = 0
    longest = 0
    for u in range(n_sent):
        length = offsets[u + 1] - offsets[u]
        longest = max(longest, length)
        for k in range(2, max_n + 1):
            longer += max(length - k + 1, 0)
    total = tokens.size + longer
    ngrams = np.empty(total, np.int64)
    counts = np.empty(total, np.int64)
    noff = np.zeros(n_sent + 1, np.int64)
    prev = np.empty(max(longest, 1), np.int64)

    slots = 16
    while 10 * longer > 7 * slots and slots < _MAX_INITIAL_SLOTS:
        slots *= 2
    table = np.full((slots, 2), _EMPTY, np.int64)
    used = 0
    # At most one new id per position of order >= 2.
    capacity = vocab_size + longer
    order = np.ones(capacity, np.int64)
    prefix = np.full(capacity, -1, np.int64)
    last = np.arange(capacity)
    seen = np.full(capacity, -1, np.int64)  # last sentence holding the id
    where = np.empty(capacity, np.int64)  # its entry there
    n_ids = vocab_size

    out = 0
    for u in range(n_sent):
        start = offsets[u]
        length = offsets[u + 1] - start
        for i in range(length):
            g = tokens[start + i]
            prev[i] = g
            if seen[g] == u:
                counts[where[g]] += 1
            else:
                seen[g] = u
                where[g] = out
                ngrams[out] = g
                counts[out] = 1
                out += 1
        for k in range(2, max_n + 1):
            for i in range(length - k + 1):
                word = tokens[start + i + k - 1]
                key = (prev[i] << 32) | word
                mask = table.shape[0] - 1
                s = _slot(key, mask)
                while table[s, 0] != _EMPTY and table[s, 0] != key:
                    s = (s + 1) & mask
                if table[s, 0] == key:
                    g = table[s, 1]
                else:
                    g = n_ids
                    n_ids += 1
                    table[s, 0] = key
                    table[s, 1] = g
                    order[g] = k
                    prefix[g] = prev[i]
                    last[g] = word
                    used += 1
                    if 10 * used > 7 * table.shape[0]:
                        table = _table_grow(table)
                prev[i] = g
                if seen[g] == u:
                    counts[where[g]] += 1
                else:
                    seen[g] = u
                    where[g] = out
                    ngrams[out] = g
                    counts[out] = 1
                    out += 1
        noff[u + 1] = out
    return (
        ngrams[:out],
        counts[:out],
        noff,
        order[:n_ids],
        prefix[:n_ids],
        last[:n_ids],
        table,
    )


@numba.njit(cache=True)
def bleu(ngrams, counts, noff, order, lengths, cand, ref_offsets, refs, max_n):
    """pycocoevalcap's per-sentence BLEU-1..max_n ("closest" reference length), ``[C, max_n]``."""
    tiny = 1e-15
    small = 1e-9
    n_cand = cand.size
    out = np.empty((n_cand, max_n), np.float64)
    mark = np.full(order.size, -1, np.int64)
    slot = np.empty(order.size, np.int64)
    longest = 0
    for u in range(noff.size - 1):
        longest = max(longest, noff[u + 1] - noff[u])
    best = np.empty(max(longest, 1), np.int64)
    correct = np.empty(max_n, np.int64)
    for c in range(n_cand):
        cu = cand[c]
        c0 = noff[cu]
        nc = noff[cu + 1] - c0
        testlen = lengths[cu]
        for e in range(nc):
            g = ngrams[c0 + e]
            mark[g] = c
            slot[g] = e
            best[e] = 0
        reflen = -1
        for r in range(ref_offsets[c], ref_offsets[c + 1]):
            ru = refs[r]
            rl = lengths[ru]
            # min over (|l - testlen|, l): the shorter reference wins a tie.
            if reflen < 0 or abs(rl - testlen) < abs(reflen - testlen) or (
                abs(rl - testlen) == abs(reflen - testlen) and rl < reflen
            ):
                reflen = rl
            for j in range(noff[ru], noff[ru + 1]):
                g = ngrams[j]
                if mark[g] == c and counts[j] > best[slot[g]]:
                    best[slot[g]] = counts[j]
        correct[:] = 0
        for e in range(nc):
            k = order[ngrams[c0 + e]] - 1
            if k < max_n:
                correct[k] += min(counts[c0 + e], best[e])
        score = 1.0
        for k in range(max_n):
            guess = max(0, testlen - k)
            score *= (float(correct[k]) + tiny) / (float(guess) + small)
            out[c, k] = score ** (1.0 / (k + 1))
        ratio = (testlen + tiny) / (reflen + small)
        if ratio < 1:
            for k in range(max_n):
                out[c, k] *= math.exp(1 - 1 / ratio)
    return out


@numba.njit(cache=True)
def document_frequency(ngrams, noff, ref_offsets, refs, n_ids):
    """For each n-gram id, how many documents (candidates' reference lists) contain it."""
    df = np.zeros(n_ids, np.float64)
    stamp = np.full(n_ids, -1, np.int64)
    for c in range(ref_offsets.size - 1):
        for r in range(ref_offsets[c], ref_offsets[c + 1]):
            ru = refs[r]
            for e in range(noff[ru], noff[ru + 1]):
                g = ngrams[e]
                if stamp[g] != c:
                    stamp[g] = c
                    df[g] += 1.0
    return df


@numba.njit(cache=True)
def translate_document_frequency(order, prefix, last, vocab_size, word_map, df_table, df_counts):
    """Document frequencies of a batch's n-gram ids, looked up in a fixed corpus's key table.

    ``word_map[w]`` is the corpus id of batch word w (-1 if the corpus never saw it).
    """
    n_ids = order.size
    corpus_id = np.empty(n_ids, np.int64)
    df = np.zeros(n_ids, np.float64)
    for i in range(n_ids):
        if i < vocab_size:
            d = word_map[i]
        else:
            p = corpus_id[prefix[i]]
            w = word_map[last[i]]
            d = -1 if p < 0 or w < 0 else table_find(df_table, (p << 32) | w)
        corpus_id[i] = d
        if d >= 0:
            df[i] = df_counts[d]
    return df


@numba.njit(cache=True)
def cider_d(ngrams, counts, noff, order, cand, ref_offsets, refs, df, ref_len, sigma):
    """pycocoevalcap's CIDEr-D per candidate (n = 1..4, clipped tf-idf cosine, length penalty).

    As in pycocoevalcap, the length in the Gaussian penalty is the number of bigrams.
    """
    max_n = 4
    n_sent = noff.size - 1
    idf = np.empty(df.size, np.float64)
    for i in range(df.size):
        idf[i] = ref_len - math.log(max(1.0, df[i]))
    vec = np.empty(ngrams.size, np.float64)
    norms = np.zeros((n_sent, max_n), np.float64)
    length2 = np.zeros(n_sent, np.float64)
    for u in range(n_sent):
        for e in range(noff[u], noff[u + 1]):
            k = order[ngrams[e]] - 1
            vec[e] = float(counts[e]) * idf[ngrams[e]]
            norms[u, k] += vec[e] ** 2
            if k == 1:
                length2[u] += counts[e]
        for k in range(max_n):
            norms[u, k] = math.sqrt(norms[u, k])
    out = np.empty(cand.size, np.float64)
    val = np.empty(max_n, np.float64)
    score = np.empty(max_n, np.float64)
    mark = np.full(df.size, -1, np.int64)
    slot = np.empty(df.size, np.int64)
    for c in range(cand.size):
        cu = cand[c]
        for e in range(noff[cu], noff[cu + 1]):
            mark[ngrams[e]] = c
            slot[ngrams[e]] = e
        score[:] = 0.0
        for r in range(ref_offsets[c], ref_offsets[c + 1]):
            ru = refs[r]
            val[:] = 0.0
            for j in range(noff[ru], noff[ru + 1]):
                g = ngrams[j]
                if mark[g] == c:
                    val[order[g] - 1] += min(vec[slot[g]], vec[j]) * vec[j]
            delta = length2[cu] - length2[ru]
            penalty = math.e ** (-(delta**2) / (2 * sigma**2))
            for k in range(max_n):
                if norms[cu, k] != 0 and norms[ru, k] != 0:
                    val[k] /= norms[cu, k] * norms[ru, k]
                score[k] += val[k] * penalty
        mean = (((score[0] + score[1]) + score[2]) + score[3]) / max_n
        out[c] = mean / (ref_offsets[c + 1] - ref_offsets[c]) * 10.0
    return out


@numba.njit(cache=True)
def unigram_overlap(ngrams, counts, noff, vocab_size, cand, ref_offsets, refs):
    """Per (candidate, reference) pair ``[R]``: clipped unigram overlap and distinct shared words.

    Unigram ids are < vocab_size and come first in each sentence's list.
    """
    clipped = np.zeros(refs.size, np.int64)
    shared = np.zeros(refs.size, np.int64)
    mark = np.full(max(vocab_size, 1), -1, np.int64)
    slot = np.empty(max(vocab_size, 1), np.int64)
    for c in range(cand.size):
        cu = cand[c]
        for e in range(noff[cu], noff[cu + 1]):
            if ngrams[e] >= vocab_size:
                break
            mark[ngrams[e]] = c
            slot[ngrams[e]] = e
        for r in range(ref_offsets[c], ref_offsets[c + 1]):
            ru = refs[r]
            for j in range(noff[ru], noff[ru + 1]):
                g = ngrams[j]
                if g >= vocab_size:
                    break
                if mark[g] == c:
                    clipped[r] += min(counts[slot[g]], counts[j])
                    shared[r] += 1
    return clipped, shared


@numba.njit(cache=True)
def distinct_unigrams(ngrams, noff, vocab_size):
    """Number of distinct words of each sentence ``[U]``."""
    n_sent = noff.size - 1
    out = np.zeros(n_sent, np.int64)
    for u in range(n_sent):
        for e in range(noff[u], noff[u + 1]):
            if ngrams[e] >= vocab_size:
                break
            out[u] += 1
    return out
