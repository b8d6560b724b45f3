"""Numba word ids: split a UTF-8 buffer of lines into space-separated words, one id per word.

``split_lines(data [B] uint8) -> (tokens [T], offsets [U+1], spans [V, 2])``: the buffer holds U
lines separated by ``\\n``; the words of line u (maximal runs of bytes other than space and
newline) get ids ``tokens[offsets[u]:offsets[u+1]]``, dense in order of first appearance; word v
is the bytes ``data[spans[v, 0]:spans[v, 1]]`` of its first occurrence. Words are compared byte
for byte (FNV-1a hashes only choose the slot), so ids are exact.

``plain_lines(data, split_words, ..., abbreviations, ...) -> [U]`` tells which lines are plain
for the PTB-style tokenizer: bytes in ``[a-z0-9 ]`` only, except at most one ``.`` followed by
nothing but spaces, no word from ``split_words`` (``cannot``: PTB splits it) and no word from
``abbreviations`` before that period (``etc.``: PTB keeps it whole). Word lists are a byte blob
and its offsets.

These replace a Python loop over strings and a dict lookup per word: the text of a whole batch
is lower-cased, cleaned and encoded by single C-level string operations, then split here.
"""

from __future__ import annotations

import numba
import numpy as np

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
_SPACE = 32
_NEWLINE = 10
_PERIOD = 46


@numba.njit(cache=True)
def split_lines(data: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """See the module docstring."""
    n_lines = 1
    n_words = 0
    previous = _SPACE
    for i in range(data.size):
        b = data[i]
        if b == _NEWLINE:
            n_lines += 1
        elif b != _SPACE and (previous == _SPACE or previous == _NEWLINE):
            n_words += 1
        previous = b
    slots = 16
    while slots < 2 * n_words:
        slots *= 2
    table = np.full(slots, -1, np.int64)
    hashes = np.empty(slots, np.uint64)
    spans = np.empty((max(n_words, 1), 2), np.int64)
    tokens = np.empty(n_words, np.int64)
    offsets = np.zeros(n_lines + 1, np.int64)
    mask = slots - 1
    n_ids = 0
    t = 0
    line = 0
    i = 0
    while i < data.size:
        b = data[i]
        if b == _NEWLINE:
            line += 1
            offsets[line] = t
            i += 1
            continue
        if b == _SPACE:
            i += 1
            continue
        start = i
        h = _FNV_OFFSET
        while i < data.size and data[i] != _SPACE and data[i] != _NEWLINE:
            h = (h ^ np.uint64(data[i])) * _FNV_PRIME
            i += 1
        s = np.int64((h ^ (h >> np.uint64(32))) & np.uint64(mask))
        while True:
            v = table[s]
            if v < 0:
                table[s] = n_ids
                hashes[s] = h
                spans[n_ids, 0] = start
                spans[n_ids, 1] = i
                tokens[t] = n_ids
                n_ids += 1
                break
            if hashes[s] == h and _same_bytes(data, spans[v, 0], spans[v, 1], data, start, i):
                tokens[t] = v
                break
            s = (s + 1) & mask
        t += 1
    offsets[n_lines] = t
    return tokens, offsets, spans[:n_ids]


@numba.njit(cache=True)
def _listed(data: np.ndarray, start: int, end: int, blob: np.ndarray, offsets: np.ndarray) -> bool:
    for k in range(offsets.size - 1):
        if _same_bytes(data, start, end, blob, offsets[k], offsets[k + 1]):
            return True
    return False


@numba.njit(cache=True, inline="always")
def _same_bytes(a: np.ndarray, a0: int, a1: int, b: np.ndarray, b0: int, b1: int) -> bool:
    if a1 - a0 != b1 - b0:
        return False
    for i in range(a1 - a0):
        if a[a0 + i] != b[b0 + i]:
            return False
    return True


@numba.njit(cache=True)
def plain_lines(data, split_words, split_offsets, abbreviations, abbreviation_offsets):
    """See the module docstring: which lines of ``data`` are plain, ``[U]`` bool."""
    n_lines = 1
    for i in range(data.size):
        if data[i] == _NEWLINE:
            n_lines += 1
    plain = np.ones(n_lines, np.bool_)
    line = 0
    word_start = -1
    word_end = -1
    in_word = False
    period = False
    for i in range(data.size + 1):
        b = _NEWLINE if i == data.size else data[i]
        is_alnum = (97 <= b <= 122) or (48 <= b <= 57)
        if in_word and not is_alnum:
            in_word = False
            word_end = i
            if _listed(data, word_start, word_end, split_words, split_offsets):
                plain[line] = False
        if b == _NEWLINE:
            line += 1
            word_start = -1
            period = False
            continue
        if not plain[line]:
            continue
        if period:
            if b != _SPACE:  # something after the period
                plain[line] = False
        elif is_alnum:
            if not in_word:
                in_word = True
                word_start = i
        elif b == _PERIOD:
            period = True
            if word_start >= 0 and _listed(
                data, word_start, word_end, abbreviations, abbreviation_offsets
            ):
                plain[line] = False
        elif b != _SPACE:
            plain[line] = False
    return plain
