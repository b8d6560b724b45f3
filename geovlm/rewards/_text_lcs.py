"""Numba longest-common-subsequence lengths of every (candidate, reference) pair.

``pair_lcs(tokens [T], offsets [U+1], alphabet, cand [C], ref_offsets [C+1], refs [R]) -> [R]``
gives ``LCS(candidate c, reference r)`` for every reference r of every candidate c, on token ids
(words for ROUGE-L, code points for the Levenshtein ratio) below ``alphabet``.

It is the bit-parallel algorithm of Allison-Dix / Hyyro: with the candidate as the pattern
(m symbols, ``ceil(m / 64)`` machine words) and ``PM[a]`` the bitmask of the pattern positions
holding symbol a, each reference symbol updates ``V <- (V + (V & PM[a])) | (V & ~PM[a])`` with the
carry propagated across words; the LCS is the number of zero bits among the low m bits of V.
That is ``O(ceil(m / 64) * n)`` per pair instead of the ``O(m * n)`` dynamic programme.

``dense_ids(points [T]) -> (ids [T], alphabet [A])`` numbers Unicode code points densely (the
character alphabet of the Levenshtein ratio).
"""

from __future__ import annotations

import numba
import numpy as np

_ONES = np.uint64(0xFFFFFFFFFFFFFFFF)
_M1 = np.uint64(0x5555555555555555)
_M2 = np.uint64(0x3333333333333333)
_M4 = np.uint64(0x0F0F0F0F0F0F0F0F)
_H01 = np.uint64(0x0101010101010101)


@numba.njit(cache=True, inline="always")
def _popcount(x: np.uint64) -> int:
    x = x - ((x >> np.uint64(1)) & _M1)
    x = (x & _M2) + ((x >> np.uint64(2)) & _M2)
    x = (x + (x >> np.uint64(4))) & _M4
    return np.int64((x * _H01) >> np.uint64(56))


@numba.njit(cache=True)
def dense_ids(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Code points ``[T]`` -> dense ids ``[T]`` in order of first appearance, and the alphabet.

    A direct lookup table (256 KiB for the Basic Multilingual Plane) instead of a sort.
    """
    top = 0
    for i in range(points.size):
        top = max(top, np.int64(points[i]))
    table = np.full(max(top + 1, 1 << 16), -1, np.int32)
    ids = np.empty(points.size, np.int64)
    alphabet = np.empty(points.size, np.int64)
    n = 0
    for i in range(points.size):
        p = np.int64(points[i])
        if table[p] < 0:
            table[p] = n
            alphabet[n] = p
            n += 1
        ids[i] = table[p]
    return ids, alphabet[:n]


@numba.njit(cache=True)
def pair_lcs(tokens, offsets, alphabet, cand, ref_offsets, refs):
    """See the module docstring."""
    longest = 0
    for c in range(cand.size):
        longest = max(longest, offsets[cand[c] + 1] - offsets[cand[c]])
    n_words = max((longest + 63) // 64, 1)
    pm = np.zeros((max(alphabet, 1), n_words), np.uint64)
    v = np.empty(n_words, np.uint64)
    out = np.zeros(refs.size, np.int64)
    one = np.uint64(1)
    zero = np.uint64(0)
    for c in range(cand.size):
        c0 = offsets[cand[c]]
        m = offsets[cand[c] + 1] - c0
        if m == 0:
            continue
        words = (m + 63) // 64
        for i in range(m):
            pm[tokens[c0 + i], i // 64] |= one << np.uint64(i % 64)
        for r in range(ref_offsets[c], ref_offsets[c + 1]):
            ru = refs[r]
            v[:words] = _ONES
            for j in range(offsets[ru], offsets[ru + 1]):
                row = tokens[j]
                carry = zero
                for w in range(words):
                    x = v[w]
                    u = x & pm[row, w]
                    s = x + u
                    c1 = one if s < x else zero
                    s2 = s + carry
                    c2 = one if s2 < s else zero
                    carry = c1 | c2
                    v[w] = s2 | (x - u)
            zeros = 0
            for w in range(words):
                bits = 64 if w < words - 1 or m % 64 == 0 else m % 64
                x = v[w]
                if bits < 64:
                    x &= (one << np.uint64(bits)) - one
                zeros += bits - _popcount(x)
            out[r] = zeros
        for i in range(m):
            pm[tokens[c0 + i], i // 64] = zero
    return out
