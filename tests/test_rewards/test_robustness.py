"""Any model output gives finite rewards in [0, 1] without raising; known reward hacks do not pay.

Property-based (hypothesis): random unicode, tag soups with truncated and nested tags, huge,
tiny and non-finite numbers, box literals of every convention, floods of 10,000 boxes and empty
answers, for every task. Embeddings are off (the lexical caption reward), except where noted.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from geovlm.data.schema import Target
from geovlm.data.synthetic import generate_scenes, samples_from_scene
from geovlm.rewards import RewardOptions, score
from geovlm.rewards.parse import (
    extract_answer,
    extract_think,
    parse_boxes,
    parse_count,
    parse_for_task,
    parse_label,
    parse_labeled_boxes,
    parse_labels,
    parse_number,
    parse_yes_no,
    strip_boxes,
)
from geovlm.tasks import registry

OPTIONS = RewardOptions(use_embeddings=False)
SETTINGS = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

SAMPLES = [s for scene in generate_scenes(1, 2) for s in samples_from_scene(scene)]
EXTRA_TARGETS = [
    Target("multi_det", "none", (97, 61), boxes=np.zeros((0, 4)), box_format="xyxy"),
    Target("referred_det_rot", "", (300, 200), boxes=[[50, 60, 30, 10, 33]], box_format="rotated"),
    Target("counting", "0", (64, 64), count=0),
    Target("multilabel_cls", "", (64, 64), labels=()),
    Target("scene_cls", "", (64, 64), label="forest"),
    Target("grounding_desc", "a field", (64, 64), boxes=np.zeros((0, 4)), box_format="xyxy"),
]
TARGETS = [s.target for s in SAMPLES] + EXTRA_TARGETS

NUMBERS = st.one_of(
    st.integers(-(10**30), 10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["1e400", "-1e400", "1e-400", "nan", "inf", "-0", ".5", "5.", "1,000", "NaN"]),
)


@st.composite
def box_literal(draw) -> str:
    values = draw(st.lists(NUMBERS, min_size=3, max_size=6))
    kind = draw(st.sampled_from(["list", "tuple", "geochat", "json"]))
    if kind == "geochat":
        angle = f"|<{values[-1]}>" if draw(st.booleans()) else ""
        return "{" + "".join(f"<{v}>" for v in values[:4]) + angle + "}"
    body = ", ".join(values)
    if kind == "tuple":
        return f"({body})"
    if kind == "json":
        return '{"bbox_2d": [' + body + '], "label": "' + draw(st.text(max_size=5)) + '"}'
    return f"[{body}]"


PIECES = st.one_of(
    st.text(max_size=30),
    st.sampled_from(
        ["<think>", "</think>", "<answer>", "</answer>", "<answer", "answer>", "\n", " or ", ", "]
    ),
    NUMBERS,
    box_literal(),
    st.sampled_from(
        ["yes", "no", "none", "farmland", "storage tanks", "ship", "three", "a dozen", "hundred"]
    ),
)


@st.composite
def completion(draw) -> str:
    text = "".join(draw(st.lists(PIECES, max_size=14)))
    if draw(st.booleans()):
        text = f"<think>{draw(st.text(max_size=20))}</think><answer>{text}</answer>"
    if draw(st.booleans()):
        text = text[: draw(st.integers(0, len(text)))]  # truncated generation
    return text


def assert_bounded(batch, n: int) -> None:
    for name, values in batch.components.items():
        assert values.shape == (n,) and values.dtype == np.float64, name
        assert np.all(np.isfinite(values)) and np.all((values >= 0) & (values <= 1)), name
    assert np.all(np.isfinite(batch.total)) and np.all((batch.total >= 0) & (batch.total <= 2))


@st.composite
def near_miss(draw, target: Target) -> str:
    """The true answer, edited: pieces spliced in, a cut, a repeat; usually well formatted."""
    answer = target.answer
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(answer)))
        answer = answer[:at] + draw(PIECES) + answer[at:]
    if draw(st.booleans()):
        answer = answer[: draw(st.integers(0, len(answer)))]
    if draw(st.booleans()):
        answer = f"{answer}, {answer}"
    if draw(st.integers(0, 3)):
        return f"<think>{draw(st.text(max_size=10))}</think><answer>{answer}</answer>"
    return answer


@st.composite
def scored_batch(draw) -> tuple[list[str], list[Target]]:
    targets = draw(st.lists(st.sampled_from(TARGETS), min_size=1, max_size=8))
    completions = [draw(st.one_of(completion(), near_miss(t))) for t in targets]
    return completions, targets


@SETTINGS
@given(scored_batch())
def test_any_completion_scores_finite_and_bounded(batch):
    completions, targets = batch
    out = score([t.task for t in targets], completions, targets, options=OPTIONS)
    assert_bounded(out, len(completions))


@SETTINGS
@given(completion(), st.sampled_from(["qwen25vl", "qwen2vl", "pixels", "geochat"]))
def test_parsers_never_raise(text, convention):
    extract_answer(text, prompt=text[: len(text) // 2])
    extract_think(text)
    for rotated in (False, True):
        boxes = parse_boxes(text, (37, 1001), rotated=rotated, convention=convention)
        assert boxes.shape[1] == (5 if rotated else 4) and np.all(np.isfinite(boxes))
        assert np.all(boxes[:, 0] >= 0) and np.all(boxes[:, 0] <= 37)
        labeled, labels = parse_labeled_boxes(text, (37, 1001), rotated=rotated)
        assert len(labeled) == len(labels)
    for value in (parse_number(text), parse_count(text)):
        assert value is None or np.isfinite(value)
    parse_yes_no(text)
    parse_label(text, ("farmland", "storage tank", "ship"))
    parse_labels(text, ("farmland", "storage tank", "ship"))
    strip_boxes(text)
    for target in TARGETS:
        parse_for_task(text, target, convention=convention)


@pytest.mark.parametrize("task", sorted(registry.names()))
def test_empty_whitespace_and_missing_answers_score_zero(task):
    targets = [t for t in TARGETS if t.task == task][:1] * 5
    completions = [
        "<think>x</think><answer></answer>",
        "<think>x</think><answer> \n\t </answer>",
        "<think>x</think>",
        "",
        "<think>x</think><answer>",
    ]
    batch = score(task, completions, targets, options=OPTIONS)
    np.testing.assert_array_equal(batch.total, 0.0)


@pytest.mark.parametrize(
    "task", ["referred_det", "referred_det_rot", "multi_det", "grounding_desc"]
)
def test_ten_thousand_boxes_flood_is_bounded_and_does_not_pay(task):
    sample = next(s for s in SAMPLES if s.task == task)
    boxes = ", ".join(f"[{i % 97}, {i % 89}, {i % 97 + 9}, {i % 89 + 9}]" for i in range(10_000))
    answer = sample.target.answer + ", " + boxes
    if task == "grounding_desc":
        answer = sample.target.answer + " " + boxes
    batch = score(task, [f"<think>x</think><answer>{answer}</answer>"], [sample.target])
    assert_bounded(batch, 1)
    # parse reads MAX_BOXES = 1000 of them: the box reward is at most n_true / 1000.
    box_bound = len(sample.target.boxes) / 1000
    bound = 0.5 + 0.5 * box_bound if task == "grounding_desc" else box_bound
    assert batch.components["accuracy"][0] <= bound + 1e-12


def test_huge_answer_of_random_unicode():
    rng = np.random.default_rng(0)
    blob = "".join(map(chr, rng.integers(32, 0x2FFF, 300_000)))
    completions = [f"<think>{blob[:1000]}</think><answer>{blob}</answer>", blob]
    targets = [SAMPLES[0].target] * 2
    assert_bounded(score(SAMPLES[0].task, completions, targets, options=OPTIONS), 2)


# --------------------------------------------------------------------------- reward hacks


def _sample(task: str):
    return next(s for s in SAMPLES if s.task == task)


def _acc(task: str, answers: list[str], target: Target) -> np.ndarray:
    completions = [f"<think>x</think><answer>{a}</answer>" for a in answers]
    return score(task, completions, [target] * len(answers), options=OPTIONS).components["accuracy"]


@pytest.mark.parametrize("task", ["scene_cls", "temporal_cls"])
def test_hedging_over_classes_does_not_pay(task):
    target = _sample(task).target
    others = [c for c in target.classes if c != target.label]
    hedges = [
        f"{target.label} or {others[0]}",
        " or ".join(target.classes),
        ", ".join(target.classes),
        f"either {others[-1]} or {target.label}",
    ]
    np.testing.assert_array_equal(_acc(task, hedges, target), 0.0)
    assert _acc(task, [target.label], target)[0] == 1.0


def test_listing_every_class_in_multilabel_scores_no_more_than_a_wrong_answer():
    target = _sample("multilabel_cls").target
    wrong = [c for c in target.classes if c not in target.labels][:1]
    truth, everything, other = _acc(
        "multilabel_cls", [target.answer, ", ".join(target.classes), wrong[0]], target
    )
    assert truth == 1.0
    assert everything == other == 0.0


def test_hedging_numbers_and_yes_no_does_not_pay():
    count = _sample("counting").target
    hedges = [f"{count.count} or {count.count + 1}", " ".join(str(i) for i in range(30))]
    np.testing.assert_array_equal(_acc("counting", hedges, count), 0.0)
    for task in ("change_det", "vqa"):
        target = _sample(task).target
        np.testing.assert_array_equal(_acc(task, ["yes or no", "yes/no", "no, yes"], target), 0.0)


@pytest.mark.parametrize("task", sorted(registry.names()))
def test_echoing_the_question_does_not_pay(task):
    sample = _sample(task)
    echo, truth = _acc(task, [sample.prompt, sample.target.answer], sample.target)
    assert echo < truth
    if task in ("region_caption", "image_caption", "change_caption", "grounding_desc"):
        assert echo < 0.5
    else:
        assert echo == 0.0


def test_format_examples_echoed_from_the_prompt_are_not_answers():
    sample = _sample("scene_cls")
    prompt = f"{sample.prompt} Reply as <think>...</think><answer>{sample.target.label}</answer>."
    completion = f"<think>...</think><answer>{sample.target.label}</answer>"
    batch = score("scene_cls", [completion], [sample.target], prompts=[prompt], options=OPTIONS)
    np.testing.assert_array_equal(batch.total, 0.0)
