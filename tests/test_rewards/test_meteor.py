"""geovlm.rewards.meteor against pycocoevalcap's Meteor (same jar, same tokens: exact equality)
and NLTK's meteor_score, plus the Java process lifecycle and the WordNet set-up."""

from __future__ import annotations

import numpy as np
import pytest

from geovlm.rewards import _wordnet, meteor, text
from tests.test_rewards.rsicd import sample_batch


@pytest.fixture(scope="module")
def batch():
    """60 RSICD captions against 1..4 captions of their scene category, then edge cases."""
    seed, candidates, references = sample_batch(60, 4)
    candidates += ["", "one", "a ship ||| near  the\ndock", "Café near 北京"]
    references += [["a ship"], ["one"], ["a ship near the dock", ""], ["cafe near beijing"]]
    return seed, candidates, references


def _coco_oracle(candidates, references):
    from pycocoevalcap.meteor.meteor import Meteor

    # pycocoevalcap's pipeline (COCOEvalCap) tokenizes before scoring.
    def tok(s):
        return " ".join(text.tokenize(s))

    res = {i: [tok(c)] for i, c in enumerate(candidates)}
    gts = {i: [tok(r) for r in refs] for i, refs in enumerate(references)}
    scorer = Meteor()
    corpus, per_sentence = scorer.compute_score(gts, res)
    return np.array(per_sentence), corpus


def test_coco_backend_equals_pycocoevalcap_and_reuses_one_process(batch, monkeypatch):
    seed, candidates, references = batch
    expected, expected_corpus = _coco_oracle(candidates, references)
    with meteor.CocoMeteor() as scorer:
        pid = scorer.pid
        actual = meteor.meteor(candidates, references, scorer=scorer)
        corpus = meteor.corpus_meteor(candidates, references, scorer=scorer)
        # Without a scorer the module's shared process serves every call.
        monkeypatch.setattr(meteor, "_shared", scorer)
        shared = meteor.meteor(candidates[:5], references[:5])
        assert meteor.shared_coco_meteor() is scorer and scorer.pid == pid
        assert not scorer.closed
    assert scorer.closed
    np.testing.assert_array_equal(actual, expected, err_msg=f"seed={seed}")
    np.testing.assert_array_equal(shared, expected[:5], err_msg=f"seed={seed}")
    assert corpus == expected_corpus
    assert np.all((actual >= 0) & (actual <= 1))
    with pytest.raises(RuntimeError, match="closed"):
        scorer.score(["a"], [["a"]])
    scorer.close()  # idempotent


def test_shared_process_starts_once_and_closes_at_exit(monkeypatch):
    started, registered = [], []

    class FakeProcess:
        closed = False

        def __init__(self):
            started.append(self)

        def score(self, candidates, references):
            return np.full(len(candidates), 0.5), 0.25

        def close(self):
            self.closed = True

    monkeypatch.setattr(meteor, "CocoMeteor", FakeProcess)
    monkeypatch.setattr(meteor, "_shared", None)
    monkeypatch.setattr(meteor.atexit, "register", registered.append)
    assert meteor.meteor(["a", "b"], [["a"], ["c"]]).tolist() == [0.5, 0.5]
    assert meteor.corpus_meteor(["a"], [["a"]]) == 0.25
    assert len(started) == 1 and registered == [started[0].close]
    started[0].close()  # a closed shared process is replaced on next use
    meteor.meteor(["a"], [["a"]])
    assert len(started) == 2
    assert meteor.corpus_meteor([], []) == 0.0
    assert meteor.meteor([], []).shape == (0,)


@pytest.fixture(scope="module")
def wordnet():
    return _wordnet.load_wordnet()


def test_nltk_backend_equals_nltk_meteor_score(batch, wordnet):
    from nltk.translate.meteor_score import meteor_score

    seed, candidates, references = batch
    candidates, references = candidates[:25] + candidates[-4:], references[:25] + references[-4:]
    expected = [
        meteor_score([text.tokenize(r) for r in refs], text.tokenize(c), wordnet=wordnet)
        for c, refs in zip(candidates, references, strict=True)
    ]
    actual = meteor.meteor(candidates, references, backend="nltk")
    np.testing.assert_array_equal(actual, expected, err_msg=f"seed={seed}")
    assert meteor.corpus_meteor(candidates, references, backend="nltk") == pytest.approx(
        np.mean(expected), abs=1e-15
    )
    pairs = zip(candidates, references, strict=True)
    split = [meteor_score([r.split() for r in rs], c.split(), wordnet=wordnet) for c, rs in pairs]
    np.testing.assert_array_equal(
        meteor.meteor(candidates, references, backend="nltk", tokenizer=str.split), split
    )


def test_wordnet_is_wordnet_3_0(wordnet):
    assert len(wordnet.synsets("dog")) == 8
    assert wordnet.morphy("geese") == "goose"
    car = wordnet.synset("car.n.01")
    assert car.lemma_names() == ["car", "auto", "automobile", "machine", "motorcar"]
    assert car.lexname() == "noun.artifact"  # lexnames file, line 6
    assert wordnet.synset("run.v.01").lexname() == "verb.motion"
    assert wordnet.synset("red.s.01").lexname() == "adj.all"
    # The synonym stage: "auto" matches "car" only through WordNet.
    syn, plain = meteor.meteor(
        ["the auto is red", "the dog is red"], [["the car is red"]] * 2, backend="nltk"
    )
    assert syn > 0.95 and plain < 0.7


def test_assembled_wordnet_folder(tmp_path):
    if not _wordnet.DEBIAN_WORDNET.is_dir():
        pytest.fail(f"Debian's WordNet is not installed: {_wordnet.INSTALL_HINT}")
    target = _wordnet.assemble(_wordnet.DEBIAN_WORDNET, tmp_path / "wordnet")
    lexnames = (target / "lexnames").read_text().splitlines()
    assert len(lexnames) == 45
    assert lexnames[3].split("\t") == ["03", "noun.Tops", "1"]
    assert lexnames[44].split("\t") == ["44", "adj.ppl", "3"]
    for name in ("data.noun", "index.sense", "verb.exc"):
        assert (target / name).read_bytes() == (_wordnet.DEBIAN_WORDNET / name).read_bytes()
    assert _wordnet.assemble(_wordnet.DEBIAN_WORDNET, target) == target  # already complete


def test_missing_wordnet_is_a_clear_error(tmp_path, monkeypatch):
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    with pytest.raises(_wordnet.WordNetMissingError, match="apt-get install -y"):
        _wordnet.load_wordnet.__wrapped__(tmp_path / "no-wordnet")
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "data.noun").write_text("")
    with pytest.raises(_wordnet.WordNetMissingError, match="missing cntlist.rev"):
        _wordnet.assemble(tmp_path / "partial", tmp_path / "out")


def test_bad_arguments():
    with pytest.raises(ValueError, match="backend must be"):
        meteor.meteor(["a"], [["a"]], backend="java")
    with pytest.raises(ValueError, match="reference lists"):
        meteor.meteor(["a", "b"], [["a"]])
    with pytest.raises(TypeError, match="wrap a single reference"):
        meteor.corpus_meteor(["a"], ["a"], backend="nltk")
