"""Text rewards (``geovlm.rewards.text``, Numba) against pycocoevalcap, rouge-score and
python-Levenshtein on 1,024 RSICD candidates x 5 references.

Candidates are RSICD test captions (``tests/fixtures/rsicd_test_captions.json``); each one's 5
references are other captions of its scene category. Both sides get the same tokens: the
sentences are tokenized once with ``text.tokenize`` and joined with spaces, which is what
pycocoevalcap's scorers receive after its Java PTBTokenizer (not timed on either side).

pytest-benchmark groups (``make bench``, or ``pytest benchmarks/bench_rewards_text.py``): BLEU-1..4
(pycocoevalcap ``Bleu(4)``), ROUGE-L (pycocoevalcap ``Rouge``), CIDEr-D with the batch's
document frequencies (pycocoevalcap ``Cider``), ROUGE-L F1 with the Porter stemmer (rouge-score
``score_multi``), and the best Levenshtein ratio over the references (python-Levenshtein
``ratio`` in a loop). Ours is timed end to end from the strings (validation, dedup, tokenizer,
word ids, Numba kernels) twice: ``ours cold`` clears the per-sentence tokenizer caches before
every call, ``ours warm`` keeps them (references seen before, as in GRPO after the first epoch).
Every method's scores are checked against the anchor's before timing.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
from pathlib import Path

import Levenshtein
import numpy as np
import pytest
from _compare import Case, anchor, close, ours, time_method
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from rouge_score import rouge_scorer

from geovlm.rewards import text
from geovlm.rewards._text_tokenize import ptb_tokens, rouge_tokens

RSICD = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "rsicd_test_captions.json"
CANDIDATES, REFERENCES = 1024, 5
SHAPE = f"{CANDIDATES:,} x {REFERENCES} refs (RSICD)"
COLD_ROUNDS = 15


def rsicd_batch(n_candidates: int, n_refs: int, seed: int = 0):
    """``n_candidates`` captions, each with ``n_refs`` other captions of its scene category, all
    pre-tokenized (tokens joined by spaces)."""
    groups = collections.defaultdict(list)
    for pair in json.loads(RSICD.read_text())["pairs"]:
        if "_" in pair["image_filename"]:
            groups[pair["image_filename"].rsplit("_", 1)[0]].append(pair["caption"])
    rng = np.random.default_rng(seed)
    names = sorted(groups)
    candidates, references = [], []
    for _ in range(n_candidates):
        captions = groups[names[rng.integers(len(names))]]
        picks = rng.choice(len(captions), size=n_refs + 1, replace=False)
        candidates.append(" ".join(text.tokenize(captions[picks[0]])))
        references.append([" ".join(text.tokenize(captions[i])) for i in picks[1:]])
    return candidates, references


def clear_caches() -> None:
    ptb_tokens.cache_clear()
    rouge_tokens.cache_clear()


@pytest.fixture(scope="module")
def batch():
    cands, refs = rsicd_batch(CANDIDATES, REFERENCES)
    coco_res = {i: [c] for i, c in enumerate(cands)}
    coco_gts = {i: list(r) for i, r in enumerate(refs)}
    return cands, refs, coco_res, coco_gts


def text_case(group: str, fn, anchor_name: str, anchor_fn, anchor_rounds: int | None = None
              ) -> Case:
    return Case(group, SHAPE, {
        "ours cold": ours(fn, rounds=COLD_ROUNDS, setup=clear_caches),
        "ours warm": ours(fn),
        anchor_name: anchor(anchor_fn, rounds=anchor_rounds),
    }, close(atol=1e-12))


@pytest.fixture(scope="module")
def bleu(batch):
    cands, refs, res, gts = batch

    def coco_bleu():
        with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its ratios
            return np.array(Bleu(4).compute_score(gts, res, verbose=0)[1]).T

    return text_case("bleu (BLEU-1..4)", lambda: text.bleu(cands, refs),
                     "pycocoevalcap Bleu(4)", coco_bleu)


@pytest.mark.parametrize("method", ["ours cold", "ours warm", "pycocoevalcap Bleu(4)"])
def test_bleu(benchmark, bleu, method):
    time_method(benchmark, bleu, method)


@pytest.fixture(scope="module")
def rouge_l(batch):
    cands, refs, res, gts = batch
    return text_case("rouge_l", lambda: text.rouge_l(cands, refs),
                     "pycocoevalcap Rouge", lambda: Rouge().compute_score(gts, res)[1])


@pytest.mark.parametrize("method", ["ours cold", "ours warm", "pycocoevalcap Rouge"])
def test_rouge_l(benchmark, rouge_l, method):
    time_method(benchmark, rouge_l, method)


@pytest.fixture(scope="module")
def cider_d(batch):
    cands, refs, res, gts = batch
    return text_case("cider_d (batch document frequencies)", lambda: text.cider_d(cands, refs),
                     "pycocoevalcap Cider", lambda: np.asarray(Cider().compute_score(gts, res)[1]))


@pytest.mark.parametrize("method", ["ours cold", "ours warm", "pycocoevalcap Cider"])
def test_cider_d(benchmark, cider_d, method):
    time_method(benchmark, cider_d, method)


@pytest.fixture(scope="module")
def rouge_l_f1(batch):
    cands, refs, _, _ = batch
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return text_case(
        "rouge_l_f1 (Porter stemmer)", lambda: text.rouge_l_f1(cands, refs),
        "rouge-score score_multi",
        lambda: np.array([scorer.score_multi(r, c)["rougeL"].fmeasure
                          for c, r in zip(cands, refs, strict=True)]),
        anchor_rounds=3,  # about a second a call
    )


@pytest.mark.parametrize("method", ["ours cold", "ours warm", "rouge-score score_multi"])
def test_rouge_l_f1(benchmark, rouge_l_f1, method):
    time_method(benchmark, rouge_l_f1, method)


@pytest.fixture(scope="module")
def levenshtein_ratio(batch):
    cands, refs, _, _ = batch
    return text_case(
        "levenshtein_ratio (best reference)", lambda: text.levenshtein_ratio(cands, refs),
        "python-Levenshtein ratio loop",
        lambda: np.array([max(Levenshtein.ratio(c, x) for x in r)
                          for c, r in zip(cands, refs, strict=True)]),
    )


@pytest.mark.parametrize("method", ["ours cold", "ours warm", "python-Levenshtein ratio loop"])
def test_levenshtein_ratio(benchmark, levenshtein_ratio, method):
    time_method(benchmark, levenshtein_ratio, method)
