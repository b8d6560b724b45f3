"""Tokenizers of the text metrics: a regex stand-in for pycocoevalcap's pipeline, and rouge-score's.

``ptb_tokens(text)`` approximates what pycocoevalcap feeds its scorers: Stanford PTBTokenizer
3.4.1 run with ``-preserveLines -lowerCase``, then the tokens in ``PUNCTUATIONS`` dropped. It
lower-cases, splits clitics (``there's`` -> ``there 's``, ``don't`` -> ``do n't``,
``cannot`` -> ``can not``), turns brackets into ``-lrb-``-style tokens (lower-cased, so
pycocoevalcap keeps them), keeps hyphenated words, decimals, ``1,000``, ``12:30``, ``a/b``,
acronyms (``u.s.``, ``e.g.``), PTB's always-abbreviations (``mr.``, ``st.``, ``etc.``), ``#tag``
and ``@name`` whole, and drops ``.``, ``,``, ``:``, ``;``, ``-``/``--``, single ``!``/``?``,
``...`` and quotes. Its output is a fixed point: tokenizing ``" ".join(ptb_tokens(s))`` gives the
same tokens, so scores computed from already-tokenized text equal scores from the raw text.
Known differences from the Java lexer (rare in captions): PTB's context-dependent abbreviations
(``no. 5``, ``fig. 3``) are only kept before a number; ``<tag>``-like tokens, words with an inner
``!``/``?`` and ``'n'`` / ``'tis`` / ``y'all`` are split differently.

``rouge_tokens(text, use_stemmer)`` is rouge-score's ``tokenize.tokenize`` (lower-case, every run
of characters outside ``[a-z0-9]`` becomes a space, Porter-stem tokens longer than 3 characters)
reimplemented so that rouge-score stays a test-only dependency. Both are cached per string: in
GRPO the same references come back every epoch and G completions share them.
"""

from __future__ import annotations

import re
from functools import lru_cache

import numpy as np

from geovlm.rewards._text_words import plain_lines

# Tokens PTB keeps with their trailing period whatever follows (measured on the 3.4.1 jar).
_ALWAYS_ABBREVIATIONS = (
    "mrs|mr|ms|dr|prof|gen|rep|sen|st|jr|sr|inc|co|corp|ltd|plc|dept|univ|intl|sys|vs|etc|sq|tel"
    "|est|ext|ft|mt|ave|blvd|rd|jan|feb|mar|apr|jun|jul|aug|sept|sep|oct|nov|dec|mon|tue|wed|thu"
    "|fri|al|cf"
)
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_CLITICS = ("'s", "'m", "'d", "'re", "'ve", "'ll")
_CLITIC_TAILS = frozenset(c[1:] for c in _CLITICS)
_STANDALONE_CLITICS = frozenset((*_CLITICS, "n't"))
_SPLIT_WORDS = {
    "cannot": ("can", "not"),
    "gonna": ("gon", "na"),
    "gotta": ("got", "ta"),
    "wanna": ("wan", "na"),
    "lemme": ("lem", "me"),
    "gimme": ("gim", "me"),
}

# One alternative per token class, tried in this order at each position of a whitespace-free
# chunk (named groups say which). Chunks that are plain words never reach it (see ptb_tokens).
_PTB_RE = re.compile(
    r"""
    (?P<bracket_token>-[lr][rsc]b-)                            # already-escaped brackets
    | (?P<abbrev>(?<![\w.])(?:"""
    + _ALWAYS_ABBREVIATIONS
    + r""")\.(?!\w)|(?<![\w.])(?:no|fig)\.(?=\d))            # mr. etc. no.5
    | (?P<acronym>[^\W\d_]{1,2}(?:\.[^\W\d_]{1,2})*\.[^\W\d_]\.(?!\w))  # u.s. e.g. ph.d.
    | (?P<clitic>(?<!\w)(?:'(?:s|m|d|re|ve|ll)|n't)(?!\w))     # standalone 's n't
    | (?P<decade>(?<!\w)'\d\ds(?!\w))                          # '90s
    | (?P<number>(?<![\w-])-\d+(?:[.,:/]\d+)*)                 # -5 -3.5
    | (?P<word>[#@]?\w+(?:(?:[./]|-(?!-)|(?<=[^\W\d])'(?=[^\W\d])|(?<=\d)[,:](?=\d))\w+)*)
    | (?P<bracket>[()\[\]{}])
    | (?P<bangs>[!?]{2,})                                      # !!! ?! are kept by pycocoevalcap
    | (?P<drop>\.+|,+|:+|;+|-+|[!?]|["`']+)                    # PUNCTUATIONS and quotes
    | (?P<symbol>[^\s\U00010000-\U0010ffff])                   # % $ & + = ... one per token
    """,
    re.VERBOSE,
)
_ABBREVIATION_SET = frozenset(a + "." for a in _ALWAYS_ABBREVIATIONS.split("|"))
_NUMBER_ABBREVIATIONS = ("no.", "fig.")  # kept whole before a number only: "no. 5"
_PLAIN_RE = re.compile(r"([a-z0-9 ]*)(\. *)?")


def _split_word(word: str) -> tuple[str, ...]:
    if word in _SPLIT_WORDS:
        return _SPLIT_WORDS[word]
    if len(word) > 3 and word.endswith("n't"):
        return (word[:-3], "n't")
    for clitic in _CLITICS:
        if len(word) > len(clitic) and word.endswith(clitic):
            return (word[: -len(clitic)], clitic)
    return (word,)


@lru_cache(maxsize=1 << 16)
def ptb_tokens(text: str) -> tuple[str, ...]:
    """pycocoevalcap-style tokens of one sentence (lower-cased, punctuation removed)."""
    lowered = text.lower()
    # Most captions are plain words and spaces, maybe ending in a period: ~4x faster path.
    plain = _PLAIN_RE.fullmatch(lowered)
    if plain:
        words = plain.group(1).split()
        final_abbreviation = plain.group(2) and words and words[-1] + "." in _ABBREVIATION_SET
        if not final_abbreviation and _SPLIT_WORDS.keys().isdisjoint(words):
            return tuple(words)
    tokens: list[str] = []
    chunks = lowered.split()
    for i, chunk in enumerate(chunks):
        # The regex costs ~1 us a character; most chunks of a caption are plain words, or a
        # plain word and the comma or period after it.
        if chunk.isalnum():
            tokens.extend(_SPLIT_WORDS.get(chunk, (chunk,)))
            continue
        if chunk in _NUMBER_ABBREVIATIONS and i + 1 < len(chunks) and chunks[i + 1][0].isdigit():
            tokens.append(chunk)
            continue
        if chunk[-1] in ".,;:" and chunk[:-1].isalnum() and chunk not in _ABBREVIATION_SET:
            tokens.extend(_SPLIT_WORDS.get(chunk[:-1], (chunk[:-1],)))
            continue
        if chunk in _STANDALONE_CLITICS:  # already-tokenized text: "there 's", "do n't"
            tokens.append(chunk)
            continue
        head, quote, tail = chunk.partition("'")
        if quote and head.isalnum() and head[-1].isalpha():  # "there's", "don't"
            if tail in _CLITIC_TAILS:
                tokens += (head, quote + tail)
                continue
            if tail == "t" and head[-1] == "n" and len(head) > 1:
                tokens += (head[:-1], "n't")
                continue
        for match in _PTB_RE.finditer(chunk):
            kind = match.lastgroup
            token = match.group()
            if kind == "word":
                tokens.extend(_split_word(token))
            elif kind == "bracket":
                tokens.append(_BRACKETS[token])
            elif kind != "drop":
                tokens.append(token)
    return tuple(tokens)


_NON_ALNUM_RE = re.compile(r"[^a-z0-9]+")


@lru_cache(maxsize=1 << 16)
def porter_stem(word: str) -> str:
    return _stemmer().stem(word)


@lru_cache(maxsize=1)
def _stemmer():
    # rouge-score builds nltk's PorterStemmer in its default (NLTK_EXTENSIONS) mode.
    from nltk.stem import porter

    return porter.PorterStemmer()


@lru_cache(maxsize=1 << 16)
def rouge_tokens(text: str, use_stemmer: bool) -> tuple[str, ...]:
    """rouge-score's tokens of one text (its DefaultTokenizer)."""
    words = _NON_ALNUM_RE.sub(" ", text.lower()).split()
    if use_stemmer:
        words = [porter_stem(w) if len(w) > 3 else w for w in words]
    return tuple(words)


def _word_list(words) -> tuple[np.ndarray, np.ndarray]:
    encoded = [w.encode() for w in words]
    offsets = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum([len(w) for w in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), np.uint8), offsets


_SPLIT_WORD_LIST = _word_list(_SPLIT_WORDS)
_ABBREVIATION_LIST = _word_list(_ALWAYS_ABBREVIATIONS.split("|"))
_FINAL_PERIOD_RE = re.compile(r"\.(?= *(?:\n|\Z))")
_NON_ALNUM_LINE_RE = re.compile(r"[^a-z0-9\n]+")


def _joined(strings: list[str]) -> str:
    text = "\n".join(strings)
    if text.count("\n") != len(strings) - 1:  # some string holds a newline: make it a space
        text = "\n".join(s.replace("\n", " ") for s in strings)
    return text


def ptb_lines(strings: list[str]) -> str:
    """``"\\n".join(" ".join(ptb_tokens(s)) for s in strings)`` up to spacing, for the whole
    batch in a few C-level and Numba passes; only unusual lines go through ``ptb_tokens``."""
    lowered = _joined(strings).lower()
    data = np.frombuffer(lowered.encode("utf-8", "surrogatepass"), np.uint8)
    special = ~plain_lines(data, *_SPLIT_WORD_LIST, *_ABBREVIATION_LIST)
    out = _FINAL_PERIOD_RE.sub("", lowered)
    if not special.any():
        return out
    lines = out.split("\n")
    for i in np.flatnonzero(special).tolist():
        lines[i] = " ".join(ptb_tokens(strings[i]))
    return "\n".join(lines)


def rouge_lines(strings: list[str]) -> str:
    """``"\\n".join(" ".join(rouge_tokens(s, False)) for s in strings)`` up to spacing, for the
    whole batch at once (stemming is applied per distinct word by the caller)."""
    return _NON_ALNUM_LINE_RE.sub(" ", _joined(strings).lower())
