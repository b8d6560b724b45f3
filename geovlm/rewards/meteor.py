"""METEOR for evaluation: pycocoevalcap's METEOR 1.5 (Java) or NLTK's ``meteor_score``.

``meteor(candidates [C], references [C][*], backend) -> [C]`` per-sentence scores and
``corpus_meteor(...) -> float``:

- ``backend="coco"``: the METEOR 1.5 jar that pycocoevalcap ships, run exactly as its ``Meteor``
  class runs it (``-stdio -l en -norm``, one ``SCORE`` line per candidate, then one ``EVAL``
  line): per-sentence scores are the jar's segment scores, the corpus score is the jar's
  aggregate over the summed statistics (pycocoevalcap's reported METEOR), not their mean.
  Sentences are first tokenized as pycocoevalcap's pipeline does (``text.tokenize``).
  The Java process starts once: ``CocoMeteor`` is a context manager, and without one the
  module keeps a shared process that is closed at interpreter exit.
- ``backend="nltk"``: ``nltk.translate.meteor_score.meteor_score`` (best reference), with WordNet
  from ``_wordnet.load_wordnet``; the corpus score is the mean of the sentence scores (the
  EarthDial evaluation scripts). Tokens are ``text.tokenize``'s unless ``tokenizer`` is given
  (EarthDial splits on whitespace or uses ``nltk.word_tokenize``).
"""

from __future__ import annotations

import atexit
import shutil
import subprocess
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from geovlm.rewards._text_encode import encode_strings
from geovlm.rewards._wordnet import load_wordnet
from geovlm.rewards.text import tokenize

Backend = Literal["coco", "nltk"]
Tokenizer = Callable[[str], list[str]]

# Lines per write/read round trip: the jar answers each SCORE line with one ~200-byte line, so
# a chunk's answers always fit the 64 KiB pipe and neither side can block the other.
_CHUNK = 128


def _jar() -> Path:
    import pycocoevalcap.meteor.meteor as coco_meteor

    return Path(coco_meteor.__file__).resolve().parent / "meteor-1.5.jar"


def _field(sentence: str) -> str:
    # The jar's protocol is line-based with " ||| " separators (pycocoevalcap removes "|||"
    # from hypotheses and collapses double spaces; references get the same here).
    flat = sentence.replace("\r", " ").replace("\n", " ").replace("|||", "")
    return flat.replace("  ", " ")


class CocoMeteor:
    """One METEOR 1.5 Java process, reused by every ``score`` call until ``close``."""

    def __init__(self, java: str = "java", memory: str = "2G"):
        jar = _jar()
        if shutil.which(java) is None:
            raise RuntimeError(f"METEOR 1.5 needs Java: {java!r} is not on PATH")
        if not jar.exists():
            raise RuntimeError(f"{jar} is missing: reinstall pycocoevalcap")
        self._lock = threading.Lock()
        self._process = subprocess.Popen(
            [java, "-jar", f"-Xmx{memory}", jar.name, "-", "-", "-stdio", "-l", "en", "-norm"],
            cwd=jar.parent,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def closed(self) -> bool:
        return self._process.poll() is not None

    def _readline(self) -> str:
        line = self._process.stdout.readline()
        if not line:
            code = self._process.wait()
            raise RuntimeError(f"the METEOR Java process exited (code {code})")
        return line.decode().strip()

    def _write(self, lines: list[str]) -> None:
        self._process.stdin.write("".join(f"{line}\n" for line in lines).encode())
        self._process.stdin.flush()

    def score(
        self, candidates: Sequence[str], references: Sequence[Sequence[str]]
    ) -> tuple[np.ndarray, float]:
        """Per-sentence scores ``[C]`` and the corpus score of already-tokenized sentences."""
        encode_strings(candidates, references)  # validation only
        if len(candidates) == 0:
            return np.zeros(0, np.float64), 0.0
        lines = [
            " ||| ".join(("SCORE", " ||| ".join(_field(r) for r in refs), _field(cand)))
            for cand, refs in zip(candidates, references, strict=True)
        ]
        with self._lock:
            if self.closed:
                raise RuntimeError("this CocoMeteor is closed")
            stats: list[str] = []
            for start in range(0, len(lines), _CHUNK):
                chunk = lines[start : start + _CHUNK]
                self._write(chunk)
                stats.extend(self._readline() for _ in chunk)
            self._write(["EVAL ||| " + " ||| ".join(stats)])
            per_sentence = np.array([float(self._readline()) for _ in stats], np.float64)
            corpus = float(self._readline())
        return per_sentence, corpus

    def close(self) -> None:
        """Stop the Java process (idempotent)."""
        with self._lock:
            if self._process.poll() is None:
                self._process.stdin.close()
                try:
                    self._process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._process.kill()
                    self._process.wait()
            self._process.stdout.close()

    def __enter__(self) -> CocoMeteor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_shared: CocoMeteor | None = None
_shared_lock = threading.Lock()


def shared_coco_meteor() -> CocoMeteor:
    """The module's METEOR process, started on first use and closed at interpreter exit."""
    global _shared
    with _shared_lock:
        if _shared is None or _shared.closed:
            _shared = CocoMeteor()
            atexit.register(_shared.close)
        return _shared


def _tokenized(sentences: Sequence[str], tokenizer: Tokenizer | None) -> list[list[str]]:
    tok = tokenizer or tokenize
    return [list(tok(s)) for s in sentences]


def _nltk_scores(candidates, references, tokenizer: Tokenizer | None) -> np.ndarray:
    from nltk.translate.meteor_score import meteor_score

    wordnet = load_wordnet()
    hyps = _tokenized(candidates, tokenizer)
    return np.array(
        [
            meteor_score(_tokenized(refs, tokenizer), hyp, wordnet=wordnet)
            for hyp, refs in zip(hyps, references, strict=True)
        ],
        np.float64,
    )


def _coco_scores(candidates, references, tokenizer, scorer) -> tuple[np.ndarray, float]:
    joined = [" ".join(t) for t in _tokenized(candidates, tokenizer)]
    joined_refs = [[" ".join(t) for t in _tokenized(refs, tokenizer)] for refs in references]
    return (scorer or shared_coco_meteor()).score(joined, joined_refs)


def _check_backend(backend: str) -> None:
    if backend not in ("coco", "nltk"):
        raise ValueError(f"backend must be 'coco' or 'nltk', got {backend!r}")


def meteor(
    candidates: Sequence[str],
    references: Sequence[Sequence[str]],
    backend: Backend = "coco",
    tokenizer: Tokenizer | None = None,
    scorer: CocoMeteor | None = None,
) -> np.ndarray:
    """Per-sentence METEOR of each candidate against its references, ``[C]`` float64 in [0, 1].

    ``scorer`` is the Java process of the coco backend (default: the module's shared one).
    """
    _check_backend(backend)
    encode_strings(candidates, references)
    if backend == "nltk":
        return _nltk_scores(candidates, references, tokenizer)
    return _coco_scores(candidates, references, tokenizer, scorer)[0]


def corpus_meteor(
    candidates: Sequence[str],
    references: Sequence[Sequence[str]],
    backend: Backend = "coco",
    tokenizer: Tokenizer | None = None,
    scorer: CocoMeteor | None = None,
) -> float:
    """Corpus METEOR: the jar's aggregate (coco) or the mean sentence score (nltk)."""
    _check_backend(backend)
    encode_strings(candidates, references)
    if len(candidates) == 0:
        return 0.0
    if backend == "nltk":
        return float(_nltk_scores(candidates, references, tokenizer).mean())
    return _coco_scores(candidates, references, tokenizer, scorer)[1]
