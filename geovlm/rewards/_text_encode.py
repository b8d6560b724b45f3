"""Candidates and their references as flat integer arrays (CSR), the input of the text kernels.

Every distinct string of a batch is stored once (in GRPO the G completions of a prompt share
their references, and references repeat across prompts):

- ``strings``: the U distinct strings, candidates first in order of appearance;
- ``candidate``: int64 ``[C]``, the string index of each candidate;
- ``ref_offsets``: int64 ``[C+1]`` and ``refs``: int64 ``[R]``, the string indices of candidate c's
  references are ``refs[ref_offsets[c]:ref_offsets[c+1]]``;
- ``tokens``: int64 ``[T]`` and ``offsets``: int64 ``[U+1]``, the token ids of string u are
  ``tokens[offsets[u]:offsets[u+1]]``; ids are dense below ``vocab_size``, and ``words[i]`` (decoded
  on first use) is the token of id i.

Word tokens come from one text of the whole batch, one line per string and its tokens separated
by spaces (``_text_tokenize.ptb_lines`` / ``rouge_lines``), split and numbered by the Numba
kernel of ``_text_words``: no Python work per string or per token on the common path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import chain

import numpy as np

from geovlm.rewards._text_lcs import dense_ids
from geovlm.rewards._text_tokenize import porter_stem, ptb_lines, rouge_lines
from geovlm.rewards._text_words import split_lines


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
    vocab_size: int
    decode: Callable[[], list[str]]

    @cached_property
    def words(self) -> list[str]:
        return self.decode()


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
        flat = list(chain.from_iterable(references))
        strings = list(dict.fromkeys([*candidates, *flat]))
        index = dict(zip(strings, range(len(strings)), strict=True))
        candidate = np.array(list(map(index.__getitem__, candidates)), np.int64)
        ref_offsets = np.zeros(len(references) + 1, np.int64)
        np.cumsum(counts, out=ref_offsets[1:])
        refs = np.array(list(map(index.__getitem__, flat)), np.int64)
    except (TypeError, ValueError):
        _check(candidates, references)
        raise
    if (counts.size and counts.min() == 0) or not all(isinstance(s, str) for s in strings):
        _check(candidates, references)
    return StringBatch(strings, candidate, ref_offsets, refs)


def _split(strings: StringBatch, text: str) -> TokenBatch:
    data = np.frombuffer(text.encode("utf-8", "surrogatepass"), np.uint8)
    tokens, offsets, spans = split_lines(data)

    def decode() -> list[str]:
        return [data[a:b].tobytes().decode("utf-8", "surrogatepass") for a, b in spans]

    return TokenBatch(strings, tokens, offsets, len(spans), decode)


def encode_ptb(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> TokenBatch:
    """Validate and map every distinct string to the ids of its ``ptb_tokens``."""
    strings = encode_strings(candidates, references)
    return _split(strings, ptb_lines(strings.strings))


def encode_rouge(
    candidates: Sequence[str], references: Sequence[Sequence[str]], use_stemmer: bool
) -> TokenBatch:
    """Validate and map every distinct string to the ids of its ``rouge_tokens``."""
    strings = encode_strings(candidates, references)
    batch = _split(strings, rouge_lines(strings.strings))
    if not use_stemmer:
        return batch
    # rouge-score stems tokens longer than 3 characters: once per distinct word here.
    stems = [porter_stem(w) if len(w) > 3 else w for w in batch.words]
    stem_ids = {w: i for i, w in enumerate(dict.fromkeys(stems))}
    remap = np.fromiter(map(stem_ids.__getitem__, stems), np.int64, len(stems))
    vocab = list(stem_ids)
    return TokenBatch(strings, remap[batch.tokens], batch.offsets, len(vocab), lambda: vocab)


def encode_chars(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> TokenBatch:
    """Validate and map every distinct string to dense ids of its Unicode code points."""
    strings = encode_strings(candidates, references)
    lengths = np.fromiter(map(len, strings.strings), np.int64, len(strings.strings))
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    # surrogatepass: a lone surrogate in model output is a code point like any other here.
    joined = "".join(strings.strings).encode("utf-32-le", "surrogatepass")
    tokens, alphabet = dense_ids(np.frombuffer(joined, np.uint32))
    return TokenBatch(strings, tokens, offsets, len(alphabet), lambda: list(map(chr, alphabet)))
