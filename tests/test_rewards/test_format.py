"""The format reward: one think block, then one answer block, with an answer the task can use."""

from __future__ import annotations

import re

import numpy as np
import pytest

from geovlm.data.schema import Target
from geovlm.rewards.format import format_reward, has_think_answer_format

# The R1-style format regex (DeepSeek-R1 / open-r1), tightened to forbid stray tags: an oracle
# written independently of the scanning implementation.
_ORACLE = re.compile(
    r"\s*<think>((?:(?!</?think>|</?answer>).)*)</think>\s*"
    r"<answer>((?:(?!</?think>|</?answer>).)*)</answer>\s*",
    re.DOTALL,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>r</think><answer>a</answer>", True),
        ("  <think>\nr\n</think>\n\n<answer>\na\n</answer>\n", True),
        ("<think></think><answer>a</answer>", True),
        ("<answer>a</answer>", False),
        ("<think>r</think>", False),
        ("<think>r</think> text <answer>a</answer>", False),
        ("<answer>a</answer><think>r</think>", False),
        ("<think>r</think><answer>a</answer> trailing", False),
        ("lead <think>r</think><answer>a</answer>", False),
        ("<think>r</think><answer>a</answer><answer>b</answer>", False),
        ("<think>r<think>x</think></think><answer>a</answer>", False),
        ("<think>r</think><answer>a<answer>b</answer></answer>", False),
        ("<think>r</think><answer>a", False),
        ("<think>r <answer>x</answer></think><answer>a</answer>", False),
        ("<THINK>r</THINK><ANSWER>a</ANSWER>", False),
        ("", False),
    ],
)
def test_structure_matches_the_regex_oracle(text, expected):
    assert has_think_answer_format(text) is expected
    assert (_ORACLE.fullmatch(text) is not None) is expected


def test_structure_on_random_tag_soups_matches_the_oracle():
    rng = np.random.default_rng(3)
    pieces = ["<think>", "</think>", "<answer>", "</answer>", "x", " ", "\n", "<", ">", "/"]
    for _ in range(3000):
        text = "".join(rng.choice(pieces, size=rng.integers(0, 9)))
        assert has_think_answer_format(text) is (_ORACLE.fullmatch(text) is not None), text


def _t(task, **kw):
    kw.setdefault("answer", "")
    kw.setdefault("image_size", (100, 100))
    return Target(task=task, **kw)


def test_format_reward_needs_a_parseable_answer_for_the_task():
    cls = _t("scene_cls", label="forest", classes=("forest", "farmland"))
    det = _t("referred_det", boxes=np.array([[1.0, 2, 3, 4]]), box_format="xyxy")
    cnt = _t("counting", count=3)
    chg = _t("change_det", label="no")
    completions = [
        "<think>trees</think><answer>forest</answer>",
        "<think>trees</think><answer>forest or farmland</answer>",
        "<think>box</think><answer>[1, 2, 3, 4]</answer>",
        "<think>box</think><answer>top left</answer>",
        "<think>n</think><answer>three</answer>",
        "<think>n</think><answer>some</answer>",
        "<think>c</think><answer>No.</answer>",
        "<think>c</think><answer></answer>",
        "<answer>forest</answer>",
    ]
    targets = [cls, cls, det, det, cnt, cnt, chg, chg, cls]
    out = format_reward(completions, targets)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, [1, 0, 1, 0, 1, 0, 1, 0, 0])


def test_format_reward_uses_given_parses_and_checks_lengths():
    cls = _t("scene_cls", label="forest", classes=("forest",))
    text = "<think>r</think><answer>forest</answer>"
    np.testing.assert_array_equal(format_reward([text], [cls], parsed=[None]), [0.0])
    with pytest.raises(ValueError, match="targets"):
        format_reward([text, text], [cls])
    with pytest.raises(ValueError, match="parsed"):
        format_reward([text], [cls], parsed=[])
