"""Candidates and their references as flat integer arrays (CSR), the input of the text kernels.

Every distinct string of a batch is stored once (in GRPO the G completions of a prompt share
their references, and references repeat across prompts):

- ``strings``: the U distinct strings, candidates first in order of appearance;
- ``candidate``: int64 ``[C]``, the string index of each candidate;
- ``ref_offsets``: int64 ``[C+1]`` and ``refs``: int64 ``[R]``, the string indices of candidate c's
  references are ``refs[ref_offsets[c]:ref_offsets[c+1]]``;
- ``tokens``: int64 ``[T]`` and ``offsets``: int64 ``[U+1]``, the token ids of string u are
  ``tokens[offsets[u]:offsets[u+1]]``; ``words[i]`` is the token of id i. Ids are dense, in order of
  first appearance, so ``len(words)`` bounds them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np


@dataclass(frozen=True)
class StringBatch:
    strings: list[str]
    candidate: np.ndarray
    ref_offsets: np.ndarray
    refs: np.ndarray


@dataclass(frozen=True)
class TokenBatch:
    strings: StringBatch
    tokens: np.ndarray
    offsets: np.ndarray
    words: list[str]


def _check(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if isinstance(candidates, str) or not isinstance(candidates, Sequence):
        raise TypeError(f"candidates must be a list of str, got {type(candidates).__name__}")
    if isinstance(references, str) or not isinstance(references, Sequence):
        raise TypeError(
            f"references must be a list of lists of str, got {type(references).__name__}"
        )
    if len(candidates) != len(references):
        raise ValueError(
            f"{len(candidates)} candidates but {len(references)} reference lists: one list each"
        )
    for c, cand in enumerate(candidates):
        if not isinstance(cand, str):
            raise TypeError(f"candidates[{c}] is {type(cand).__name__}, not str")
    for c, refs in enumerate(references):
        if isinstance(refs, str) or not isinstance(refs, Sequence):
            raise TypeError(
                f"references[{c}] must be a list of str, got {type(refs).__name__}"
                + (" (wrap a single reference in a list)" if isinstance(refs, str) else "")
            )
        if len(refs) == 0:
            raise ValueError(f"references[{c}] is empty: every candidate needs a reference")
        for j, ref in enumerate(refs):
            if not isinstance(ref, str):
                raise TypeError(f"references[{c}][{j}] is {type(ref).__name__}, not str")


def encode_strings(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> StringBatch:
    """Validate the inputs and index their distinct strings (see the module docstring)."""
    # Fast path for well-formed input; anything odd goes through _check for a precise error.
    if (
        isinstance(candidates, str)
        or isinstance(references, str)
        or not isinstance(candidates, Sequence)
        or not isinstance(references, Sequence)
        or len(candidates) != len(references)
        or any(isinstance(r, str) for r in references)
    ):
        _check(candidates, references)
    try:
        counts = np.fromiter(map(len, references), np.int64, len(references))
        strings = list(dict.fromkeys(chain(candidates, chain.from_iterable(references))))
        index = {s: i for i, s in enumerate(strings)}
        candidate = np.fromiter(map(index.__getitem__, candidates), np.int64, len(candidates))
        ref_offsets = np.zeros(len(references) + 1, np.int64)
        np.cumsum(counts, out=ref_offsets[1:])
        refs = np.fromiter(
            map(index.__getitem__, chain.from_iterable(references)), np.int64, int(ref_offsets[-1])
        )
    except (TypeError, ValueError):
        _check(candidates, references)
        raise
    if (counts.size and counts.min() == 0) or not all(isinstance(s, str) for s in strings):
        _check(candidates, references)
    return StringBatch(strings, candidate, ref_offsets, refs)


def encode_tokens(
    candidates: Sequence[str],
    references: Sequence[Sequence[str]],
    tokenizer: Callable[[str], tuple[str, ...]],
) -> TokenBatch:
    """Validate, tokenize each distinct string once and map its tokens to dense ids."""
    strings = encode_strings(candidates, references)
    tokenized = [tokenizer(s) for s in strings.strings]
    lengths = np.fromiter(map(len, tokenized), np.int64, len(tokenized))
    offsets = np.zeros(len(tokenized) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = list(chain.from_iterable(tokenized))
    vocab = {w: i for i, w in enumerate(dict.fromkeys(flat))}
    tokens = np.fromiter(map(vocab.__getitem__, flat), np.int64, len(flat))
    return TokenBatch(strings, tokens, offsets, list(vocab))


def encode_chars(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> TokenBatch:
    """Like ``encode_tokens`` with one token per Unicode code point (for edit-distance metrics)."""
    strings = encode_strings(candidates, references)
    lengths = np.fromiter(map(len, strings.strings), np.int64, len(strings.strings))
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    # surrogatepass: a lone surrogate in model output is a code point like any other here.
    joined = "".join(strings.strings).encode("utf-32-le", "surrogatepass")
    points = np.frombuffer(joined, np.uint32)
    alphabet, tokens = np.unique(points, return_inverse=True)
    return TokenBatch(strings, tokens.astype(np.int64), offsets, [chr(p) for p in alphabet])
