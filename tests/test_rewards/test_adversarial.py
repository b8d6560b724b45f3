"""The adversarial set (``tests/test_rewards/adversarial.py``): no hack class scores above a plain
wrong answer of its task, correct and near-correct answers keep their scores, and 100,000 hostile
completions score finite and bounded without raising.

"Above a plain wrong answer" is the total reward (format + accuracy, weights 1 and 1) of the
hack against ``adversarial.plain_wrong`` of the same sample: per sample for the tasks whose wrong
answer scores a fixed 1.0 (classification, detection, counting, vqa, grounding's boxes), and in
expectation over the samples for captions (and grounding's text), whose honest wrong caption
(another scene's) shares a varying number of words with the references: per sample a hack may
beat a wrong caption that shares none, but on average over scenes none of them may.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from geovlm.data.schema import Target
from geovlm.data.synthetic import generate_scenes, samples_from_scene
from geovlm.rewards import RewardOptions, score
from geovlm.rewards.parse import MAX_ANSWER_CHARS
from tests.test_rewards import adversarial as adv

OPTIONS = RewardOptions(use_embeddings=False)
SAMPLES = [s for scene in generate_scenes(3, 12) for s in samples_from_scene(scene)]
POOLS = {s.task: [p for p in SAMPLES if p.task == s.task] for s in SAMPLES}
CAPTION_TASKS = adv.CAPTION_TASKS


def _totals(sample, completions: list[str], options: RewardOptions = OPTIONS) -> np.ndarray:
    n = len(completions)
    batch = score(sample.task, completions, [sample.target] * n, prompts=[sample.prompt] * n,
                  options=options)
    for values in batch.components.values():
        assert np.all(np.isfinite(values)) and np.all((values >= 0) & (values <= 1))
    return batch.total


def _pool(sample):
    return [p for p in POOLS[sample.task] if p is not sample]


def _hack_table(name: str):
    """Per task: rows of (correct, near-correct, wrong, hack variants...) totals."""
    rng = np.random.default_rng(0)
    table: dict[str, list[np.ndarray]] = {}
    for sample in SAMPLES:
        pool = _pool(sample)
        hacks = adv.HACKS[name](sample, pool, rng)
        text_only = sample.task == "grounding_desc" and name in adv.TEXT_HACKS
        wrong = (adv.plain_wrong_text if text_only else adv.plain_wrong)(sample, pool)
        if not hacks or wrong is None:
            continue
        near = adv.near_correct(sample, rng)
        totals = _totals(sample, [adv.correct(sample), near, wrong, *hacks])
        key = f"{sample.task} (text)" if text_only else sample.task
        table.setdefault(key, []).append(totals)
    return table


@pytest.mark.parametrize("name", list(adv.HACKS))
def test_hack_class_scores_no_more_than_a_plain_wrong_answer(name):
    table = _hack_table(name)
    assert table, f"{name} applies to no sample"
    for task, rows in table.items():
        rows = np.array(rows)
        correct, near, wrong, hacks = rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3:]
        assert np.all(correct == 2.0), task
        if task in CAPTION_TASKS or task.endswith("(text)"):
            worst = hacks.mean(axis=0).max()
            assert worst <= wrong.mean() + 1e-9, (task, worst, wrong.mean())
            assert near.mean() > wrong.mean(), task
        else:
            margin = hacks.max(axis=1) - wrong
            assert margin.max() <= 1e-9, (task, margin.max(), rows[np.argmax(margin)])
            assert np.all(near > wrong), task


def test_correct_and_near_correct_answers_keep_their_scores():
    rng = np.random.default_rng(1)
    for sample in SAMPLES:
        wrong = adv.plain_wrong(sample, _pool(sample))
        correct, near = _totals(sample, [adv.correct(sample), adv.near_correct(sample, rng)])
        assert correct == 2.0, sample.task
        if wrong is not None and sample.task not in ("scene_cls", "counting", "vqa", "change_det"):
            # Partial credit: above the wrong answer, below the exact one unless it is one.
            assert _totals(sample, [wrong])[0] < near <= correct, sample.task


def test_hostile_batch_of_100k_completions_scores_bounded():
    completions, samples = adv.hostile_batch(SAMPLES, 100_000, seed=5)
    assert len(set(completions)) > 1000
    targets = [s.target for s in samples]
    batch = score([s.task for s in samples], completions, targets,
                  prompts=[s.prompt for s in samples], options=OPTIONS)
    for name, values in batch.components.items():
        assert values.shape == (100_000,)
        assert np.all(np.isfinite(values)) and np.all((values >= 0) & (values <= 1)), name


@pytest.mark.parametrize("run", ["hundred", "a dozen", "thousand", "one hundred and", "nine"])
def test_long_runs_of_number_words_do_not_overflow(run):
    sample = next(s for s in SAMPLES if s.task == "counting")
    completions = [adv.wrap(" ".join([run] * k)) for k in (1, 2, 160, 400, 5000)]
    totals = _totals(sample, completions)
    assert np.all(np.isfinite(totals))
    # A run worth more than any count is no count.
    assert totals[2:].max() <= 1.0


@pytest.mark.parametrize("use_embeddings", [False, True])
def test_lone_surrogates_in_captions_are_scored(use_embeddings):
    options = RewardOptions(use_embeddings=use_embeddings)
    for task in ("region_caption", "change_caption", "image_caption", "grounding_desc"):
        sample = next(s for s in SAMPLES if s.task == task)
        answer = sample.target.answer
        completions = [adv.wrap(f"{answer} \ud800"), adv.wrap("\udfff\ud83d"), adv.correct(sample),
                       f"<think>\udc80</think><answer>{answer}</answer>"]
        totals = _totals(sample, completions, options)
        assert totals[2] == pytest.approx(2.0)
        assert totals[3] > 1.5  # a stray surrogate in the think block costs nothing


def test_open_vqa_hedges_over_the_questions_options():
    """An RSVQA-style question: answering both options, in any wording, is no answer."""
    target = Target("vqa", "urban", (256, 256), label="urban")
    sample = type("S", (), {"task": "vqa", "target": target,
                            "prompt": "Is it a rural or an urban area?"})
    answers = ["urban", "rural", "rural or urban", "urban, rural", "an urban or a rural area",
               "either rural or urban", "urban/rural"]
    totals = _totals(sample, [adv.wrap(a) for a in answers])
    assert totals[0] == 2.0 and totals[1] == 1.0
    assert totals[2:].max() <= totals[1]


def test_non_string_completions_score_zero():
    sample = SAMPLES[0]
    batch = score(sample.task, [None, b"<answer>x</answer>", 3, {"content": "x"}],
                  [sample.target] * 4, options=OPTIONS)
    np.testing.assert_array_equal(batch.total, 0.0)


@pytest.mark.parametrize("task", ["referred_det", "multi_det", "referred_det_rot"])
@pytest.mark.parametrize("answer", ["[]", "[ ]", "```json\n[]\n```", "none", "{}"])
def test_empty_list_on_an_image_without_the_object_is_right(task, answer):
    width = 4 if task != "referred_det_rot" else 5
    fmt = "rotated" if width == 5 else "xyxy"
    target = Target(task, "none", (97, 61), boxes=np.zeros((0, width)), box_format=fmt)
    sample_like = type("S", (), {"task": task, "target": target, "prompt": "Find the ships."})
    totals = _totals(sample_like, [adv.wrap(answer), adv.wrap("[1, 2, 30, 40]")])
    np.testing.assert_array_equal(totals, [2.0, 1.0])


def test_oversized_answers_are_not_read():
    sample = next(s for s in SAMPLES if s.task == "image_caption")
    padded = sample.target.answer + " x" * MAX_ANSWER_CHARS
    totals = _totals(sample, [adv.wrap(padded), adv.wrap(sample.target.answer * 2)])
    assert totals[0] == 0.0
    assert math.isfinite(totals[1])
