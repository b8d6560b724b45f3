"""geovlm.rewards.text against its oracles: pycocoevalcap (BLEU, ROUGE-L, CIDEr-D and the Java
PTBTokenizer), rouge-score, python-Levenshtein, and a set-based Jaccard.

Inputs are real RSICD captions (a candidate against other captions of its scene category, a
fresh random draw each run: the seed is in every failure message), random token soups that stress
n-gram clipping and long sequences, and the edge cases of real bug reports.
"""

from __future__ import annotations

import secrets
import shutil

import Levenshtein
import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.cider.cider_scorer import CiderScorer
from pycocoevalcap.rouge.rouge import Rouge
from rouge_score import rouge_scorer

from geovlm.rewards import _text_tokenize, _text_words, text
from tests.test_rewards.rsicd import captions_by_category, sample_batch

EDGE_CANDIDATES = [
    "",
    "one",
    "a  ship   is  moored  near   the  dock .",
    "Café naïve résumé near the 北京 airport 🚀.",
    "the the the the the the the",
    "there's a tank.",
    "green",
    "...",
    "A large bridge over a river, with cars (many) on it!",
]
EDGE_REFERENCES = [
    ["a b", "many buildings"],
    ["one"],
    ["a ship is moored near the dock.", "ships near docks"],
    ["cafe naive resume near the airport", "Café near 北京"],
    ["the cat is on the mat", "there is a the the cat"],
    ["", "there is a tank"],
    [""],
    [""],
    ["a large bridge crosses the river with many cars on it.", "bridge (large)"],
]


def _joined(sentence: str) -> str:
    return " ".join(text.tokenize(sentence))


def _coco_inputs(candidates, references):
    res = {i: [_joined(c)] for i, c in enumerate(candidates)}
    gts = {i: [_joined(r) for r in refs] for i, refs in enumerate(references)}
    return gts, res


@pytest.fixture(scope="module")
def categories() -> dict[str, list[str]]:
    return captions_by_category()


@pytest.fixture(scope="module")
def batch(categories):
    """~300 RSICD candidates, each with 1..6 other captions of its category, then edge cases."""
    seed, candidates, references = sample_batch(301, 6, categories)
    return seed, candidates + EDGE_CANDIDATES, references + EDGE_REFERENCES


def _close(actual, expected, seed, tol=1e-9):
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    worst = int(np.argmax(np.abs(actual - expected))) if actual.size else 0
    np.testing.assert_allclose(
        actual, expected, rtol=0, atol=tol, err_msg=f"seed={seed}, worst index {worst}"
    )


# --------------------------------------------------------------------------- tokenizer


PTB_CASES = [
    "There's a lot of bare ground around the airport.",
    "I don't know, can't won't cannot gonna ain't",
    '"quoted" text (paren) [brack] {brace}',
    "a/b 50% $5 #tag @me a&b 3.5 km 1,000 x*y a+b a=b 12:30 2010-01-01 -5",
    "U.S. e.g. Mr. Smith end... ph.d. a.b. abc.d. ab.cd. etc. sq. no. 5 fig. 3",
    "well-known -- dash - and drop-shaped a--b twenty-one-",
    "It's 8 o'clock; it's great! really? yes: no !!! ?! ..",
    "tab\there  double  spaces UPPER Case MiXeD",
    "café naïve 北京 emoji 🚀 ok",
    "'single quoted' `back` ``double'' ship's boats' rest",
    "i'm you're we've they'll he'd ma'am 5'6\" '90s",
    "There are 3 cars.There is a tree. sq. km. approx.",
]


def test_tokenizer_matches_java_ptb_tokenizer(categories):
    if shutil.which("java") is None:
        pytest.fail("java is needed by pycocoevalcap's PTBTokenizer (the oracle)")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    sentences = PTB_CASES + [c for caps in categories.values() for c in caps]
    java = PTBTokenizer().tokenize({i: [{"caption": s}] for i, s in enumerate(sentences)})
    for i, sentence in enumerate(sentences):
        assert _joined(sentence) == java[i][0], sentence


def test_tokenize_is_a_fixed_point(batch):
    _, candidates, references = batch
    for sentence in candidates + [r for refs in references for r in refs] + PTB_CASES:
        tokens = text.tokenize(sentence)
        assert text.tokenize(" ".join(tokens)) == tokens
        assert all(t and not t.isspace() and " " not in t for t in tokens)


def _regex_spec_tokens(sentence: str) -> tuple[str, ...]:
    """ptb_tokens without its fast paths: the token regex on every whitespace-separated chunk."""
    tokens: list[str] = []
    chunks = sentence.lower().split()
    for i, chunk in enumerate(chunks):
        if chunk in ("no.", "fig.") and i + 1 < len(chunks) and chunks[i + 1][0].isdigit():
            tokens.append(chunk)
            continue
        for match in _text_tokenize._PTB_RE.finditer(chunk):
            kind, token = match.lastgroup, match.group()
            if kind == "word":
                tokens.extend(_text_tokenize._split_word(token))
            elif kind == "bracket":
                tokens.append(_text_tokenize._BRACKETS[token])
            elif kind != "drop":
                tokens.append(token)
    return tuple(tokens)


def _soup(seed: int, n: int) -> list[str]:
    """Random sentences over characters and words that hit every tokenizer branch."""
    rng = np.random.default_rng(seed)
    chars = list("abnstAB .,;:'\"-()[]!?\n\t\r0123\u00e9\u5317\u03a3") + ["\U0001f680"]
    words = ["etc", "mr", "cannot", "gonna", "st", "a", "b", ".", " ", "x.", "sept", "no", "5",
             "'s", "n't", "don't", "it's", "1990's", "'", "there", "u.s.", "fig.", "-", "the"]
    out = ["".join(rng.choice(chars, size=rng.integers(0, 30))) for _ in range(n)]
    for _ in range(n):
        parts = rng.choice(words, size=rng.integers(0, 7))
        out.append("".join(p + str(rng.choice(["", " ", ".", " ."])) for p in parts))
    return out


def test_tokenizer_fast_paths_agree_with_the_regex_spec():
    seed = secrets.randbits(32)
    for sentence in PTB_CASES + _soup(seed, 2000):
        assert text.tokenize(sentence) == list(_regex_spec_tokens(sentence)), (seed, sentence)


def test_batch_tokenizers_equal_the_per_sentence_ones(batch):
    seed, candidates, references = batch
    sentences = PTB_CASES + candidates + [r for refs in references for r in refs]
    sentences += _soup(seed, 1500) + ["a\nb", "", "  ", "see etc.", "see etc .", "we gonna."]
    lines = _text_tokenize.ptb_lines(sentences).split("\n")
    assert len(lines) == len(sentences)
    for sentence, line in zip(sentences, lines, strict=True):
        assert line.split() == text.tokenize(sentence), (seed, sentence)
    lines = _text_tokenize.rouge_lines(sentences).split("\n")
    for sentence, line in zip(sentences, lines, strict=True):
        assert tuple(line.split()) == _text_tokenize.rouge_tokens(sentence, False), (seed, sentence)


def test_word_ids_are_dense_in_order_of_first_appearance():
    seed = secrets.randbits(32)
    rng = np.random.default_rng(seed)
    vocab = ["a", "ab", "b", "\u00e9t\u00e9", "\u5317\u4eac", "x'y", "-lrb-", "\U0001f680"]
    lines = [" ".join(rng.choice(vocab, size=rng.integers(0, 9))) for _ in range(300)]
    lines += ["", "  a  ", ""]
    data = np.frombuffer("\n".join(lines).encode(), np.uint8)
    tokens, offsets, spans = _text_words.split_lines(data)
    expected: dict[str, int] = {}
    for u, line in enumerate(lines):
        ids = [expected.setdefault(w, len(expected)) for w in line.split()]
        assert tokens[offsets[u] : offsets[u + 1]].tolist() == ids, seed
    assert [data[a:b].tobytes().decode() for a, b in spans] == list(expected)


# --------------------------------------------------------------------------- pycocoevalcap


def test_bleu_matches_pycocoevalcap(batch):
    seed, candidates, references = batch
    gts, res = _coco_inputs(candidates, references)
    _, expected = Bleu(4).compute_score(gts, res, verbose=0)
    _close(text.bleu(candidates, references), np.array(expected).T, seed)


def test_rouge_l_matches_pycocoevalcap(batch):
    seed, candidates, references = batch
    gts, res = _coco_inputs(candidates, references)
    _, expected = Rouge().compute_score(gts, res)
    _close(text.rouge_l(candidates, references), expected, seed)


def test_cider_d_corpus_mode_matches_pycocoevalcap(batch):
    seed, candidates, references = batch
    gts, res = _coco_inputs(candidates, references)
    _, expected = Cider().compute_score(gts, res)
    _close(text.cider_d(candidates, references), expected, seed)


class _DocumentCount(list):
    """A list whose len() is the corpus size: pycocoevalcap's compute_cider takes its
    log(reference count) from len(self.crefs), which is the one thing fixed-idf CIDEr changes."""

    def __init__(self, items, n_documents):
        super().__init__(items)
        self.n_documents = n_documents

    def __len__(self):
        return self.n_documents


def test_cider_d_fixed_document_frequency_matches_pycocoevalcap(batch, categories):
    seed, candidates, references = batch
    rng = np.random.default_rng(seed)
    names = sorted(categories)
    corpus = []
    for _ in range(150):
        captions = categories[names[rng.integers(len(names))]]
        picks = rng.choice(len(captions), size=rng.integers(1, 6), replace=False)
        corpus.append([captions[i] for i in picks])
    corpus.append(["", "a storage tank"])

    train = CiderScorer()
    for refs in corpus:
        train += (None, [_joined(r) for r in refs])
    train.compute_doc_freq()
    oracle = CiderScorer()
    for cand, refs in zip(candidates, references, strict=True):
        oracle += (_joined(cand), [_joined(r) for r in refs])
    oracle.document_frequency = train.document_frequency
    oracle.crefs = _DocumentCount(oracle.crefs, len(corpus))
    expected = oracle.compute_cider()

    df = text.cider_document_frequency(corpus)
    assert df.n_documents == len(corpus)
    _close(text.cider_d(candidates, references, df), expected, seed)
    # Fixed idf makes each score independent of the rest of the batch (what RL needs).
    half = len(candidates) // 2
    _close(text.cider_d(candidates[:half], references[:half], df), expected[:half], seed)


def test_random_token_soups_match_pycocoevalcap():
    """Tiny vocabulary (repeated n-grams, clipping) and long sentences (more than 64 tokens:
    several machine words in the bit-parallel LCS, big per-sentence n-gram sorts)."""
    seed = secrets.randbits(32)
    rng = np.random.default_rng(seed)
    vocab = ["a", "b", "c", "d", "ship", "tank"]

    def sentence():
        n = int(rng.choice([0, 1, 2, 3, 5, 9, 17, 40, 70, 150]))
        return " ".join(vocab[i] for i in rng.integers(len(vocab), size=n))

    candidates = [sentence() for _ in range(97)]
    references = [[sentence() for _ in range(rng.integers(1, 5))] for _ in candidates]
    gts, res = _coco_inputs(candidates, references)
    _, bleu = Bleu(4).compute_score(gts, res, verbose=0)
    _, rouge = Rouge().compute_score(gts, res)
    _, cider = Cider().compute_score(gts, res)
    _close(text.bleu(candidates, references), np.array(bleu).T, seed)
    _close(text.rouge_l(candidates, references), rouge, seed)
    _close(text.cider_d(candidates, references), cider, seed)


# --------------------------------------------------------------------------- rouge-score


@pytest.mark.parametrize("use_stemmer", [True, False])
def test_rouge_score_f1_matches_rouge_score(batch, use_stemmer):
    seed, candidates, references = batch
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=use_stemmer)
    best = {"rouge1": [], "rougeL": []}
    mean = {"rouge1": [], "rougeL": []}
    for cand, refs in zip(candidates, references, strict=True):
        multi = scorer.score_multi(refs, cand)
        each = [scorer.score(r, cand) for r in refs]
        for key in best:
            best[key].append(multi[key].fmeasure)
            mean[key].append(sum(s[key].fmeasure for s in each) / len(refs))
    kw = {"use_stemmer": use_stemmer}
    _close(text.rouge_1_f1(candidates, references, **kw), best["rouge1"], seed)
    _close(text.rouge_l_f1(candidates, references, **kw), best["rougeL"], seed)
    _close(text.rouge_1_f1(candidates, references, reduce="mean", **kw), mean["rouge1"], seed)
    _close(text.rouge_l_f1(candidates, references, reduce="mean", **kw), mean["rougeL"], seed)


# --------------------------------------------------------------------------- others


def test_levenshtein_ratio_matches_python_levenshtein(batch):
    seed, candidates, references = batch
    rng = np.random.default_rng(seed)
    alphabet = list("ab c\u00e9\u5317") + ["\U0001f680"]
    long_c = ["".join(rng.choice(alphabet, size=rng.integers(0, 300))) for _ in range(40)]
    long_r = [["".join(rng.choice(alphabet, size=rng.integers(0, 300))) for _ in range(3)]]
    candidates = candidates + long_c + ["", "abc"]
    references = references + long_r * len(long_c) + [[""], ["", "abd"]]
    expected = [
        max(Levenshtein.ratio(c, r) for r in refs)
        for c, refs in zip(candidates, references, strict=True)
    ]
    _close(text.levenshtein_ratio(candidates, references), expected, seed, tol=1e-15)


def test_token_jaccard_matches_set_oracle(batch):
    seed, candidates, references = batch
    expected = []
    for cand, refs in zip(candidates, references, strict=True):
        a = set(text.tokenize(cand))
        best = 0.0
        for ref in refs:
            b = set(text.tokenize(ref))
            best = max(best, len(a & b) / len(a | b) if a | b else 1.0)
        expected.append(best)
    _close(text.token_jaccard(candidates, references), expected, seed, tol=1e-15)


def test_hand_values():
    same = ["a ship is moored near the dock"]
    refs = [["a ship is moored near the dock", "nothing"]]
    np.testing.assert_allclose(text.bleu(same, refs), 1.0, atol=1e-8)
    assert text.rouge_l(same, refs)[0] == pytest.approx(1.0, abs=1e-12)
    assert text.rouge_1_f1(same, refs)[0] == 1.0
    assert text.levenshtein_ratio(same, refs)[0] == 1.0
    assert text.token_jaccard(["b a a"], [["a b"]])[0] == 1.0
    # BLEU-2 of "a b" vs "a c": p1 = 1/2, p2 = 0 -> (1/2 * ~0) ** (1/2) ~ 0; brevity 1.
    assert text.bleu(["a b"], [["a c"]])[0, 0] == pytest.approx(0.5, abs=1e-8)
    # ROUGE-L (pycocoevalcap) "a b c" vs "a c": lcs 2, P = 2/3, R = 1, beta 1.2.
    p, r, b2 = 2 / 3, 1.0, 1.2**2
    assert text.rouge_l(["a b c"], [["a c"]])[0] == pytest.approx((1 + b2) * p * r / (r + b2 * p))
    # An empty sentence equals only an empty sentence.
    assert text.rouge_l([""], [[""]])[0] == 1.0
    assert text.rouge_l([""], [["a"]])[0] == 0.0
    assert text.token_jaccard([""], [[""]])[0] == 1.0
    assert text.levenshtein_ratio([""], [[""]])[0] == 1.0
    # CIDEr-D of a single candidate in corpus mode: log(1) idf, so 0 (pycocoevalcap's definition).
    assert text.cider_d(same, refs)[0] == 0.0


def test_scores_are_finite_and_bounded(batch):
    _, candidates, references = batch
    for name in ("rouge_l", "rouge_1_f1", "rouge_l_f1", "levenshtein_ratio", "token_jaccard"):
        values = getattr(text, name)(candidates, references)
        assert values.shape == (len(candidates),) and values.dtype == np.float64, name
        assert np.all(np.isfinite(values) & (values >= 0) & (values <= 1)), name
    b = text.bleu(candidates, references)
    assert b.shape == (len(candidates), 4) and np.all((b >= 0) & (b <= 1))
    cider = text.cider_d(candidates, references)
    assert np.all(np.isfinite(cider) & (cider >= 0) & (cider <= 10))
    reward = text.cider_d_reward(candidates, references, scale=2.0)
    np.testing.assert_allclose(reward, np.clip(cider / 2.0, 0, 1), rtol=0, atol=0)


def test_empty_batch():
    for name in ("rouge_l", "rouge_1_f1", "rouge_l_f1", "levenshtein_ratio", "token_jaccard"):
        assert getattr(text, name)([], []).shape == (0,)
    assert text.bleu([], []).shape == (0, 4)
    assert text.cider_d([], []).shape == (0,)


@pytest.mark.parametrize(
    ("candidates", "references", "error", "match"),
    [
        (["a"], [["a"], ["b"]], ValueError, "1 candidates but 2 reference lists"),
        (["a"], [[]], ValueError, r"references\[0\] is empty"),
        (["a"], ["a"], TypeError, "wrap a single reference in a list"),
        ([None], [["a"]], TypeError, r"candidates\[0\] is NoneType"),
        (["a"], [["a", 3]], TypeError, r"references\[0\]\[1\] is int"),
        (["a"], [[["a"]]], TypeError, r"references\[0\]\[0\] is list"),
        ("a", [["a"]], TypeError, "candidates must be a list of str"),
    ],
)
def test_bad_input_is_a_clear_error(candidates, references, error, match):
    for name in ("bleu", "rouge_l", "cider_d", "rouge_l_f1", "levenshtein_ratio"):
        with pytest.raises(error, match=match):
            getattr(text, name)(candidates, references)


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="reduce must be"):
        text.rouge_l_f1(["a"], [["a"]], reduce="median")
    with pytest.raises(ValueError, match="scale must be positive"):
        text.cider_d_reward(["a"], [["a"]], scale=0.0)
    with pytest.raises(ValueError, match="at least one document"):
        text.cider_document_frequency([])
    with pytest.raises(TypeError, match="tokenize expects str"):
        text.tokenize(None)
