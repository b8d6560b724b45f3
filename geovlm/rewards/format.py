"""The format reward: 1 for ``<think>...</think><answer>...</answer>`` with a usable answer, else 0.

``format_reward(completions, targets) -> [C]`` float64 in {0, 1}. A completion earns 1 when

* stripped of surrounding whitespace it is exactly one ``<think>`` block followed (whitespace
  allowed in between) by exactly one ``<answer>`` block, with no other tag anywhere, and
* the answer parses to the typed answer its task needs (``parse.parse_for_task``): one class for a
  classification, at least one box for a detection, a number for counting, yes/no for change
  detection, a non-empty sentence for captioning.

The think block may be empty: real SFT data has no reasoning traces (``Sample.think``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from geovlm.data.schema import Target
from geovlm.rewards.parse import (
    ANSWER_CLOSE,
    ANSWER_OPEN,
    TAGS,
    THINK_CLOSE,
    THINK_OPEN,
    extract_answer,
    parse_for_task,
)


def has_think_answer_format(completion: str) -> bool:
    """Whether ``completion`` is exactly ``<think>...</think>`` then ``<answer>...</answer>``."""
    if not isinstance(completion, str):
        return False
    text = completion.strip()
    if not (text.startswith(THINK_OPEN) and text.endswith(ANSWER_CLOSE)):
        return False
    if any(text.count(tag) != 1 for tag in TAGS):
        return False
    think_close = text.find(THINK_CLOSE)
    answer_open = text.find(ANSWER_OPEN)
    return (
        think_close < answer_open and not text[think_close + len(THINK_CLOSE) : answer_open].strip()
    )


def format_reward(
    completions: Sequence[str],
    targets: Sequence[Target],
    *,
    parsed: Sequence[object | None] | None = None,
    convention: str = "qwen25vl",
) -> np.ndarray:
    """``[C]`` float64: 1 where the completion has the format and a parseable answer, else 0.

    ``parsed`` (the ``parse_for_task`` result per completion) skips re-parsing when the caller
    already has it; otherwise answers are parsed here in ``convention``.
    """
    if len(completions) != len(targets):
        raise ValueError(f"{len(completions)} completions but {len(targets)} targets")
    if parsed is None:
        parsed = [
            parse_for_task(extract_answer(c), t, convention=convention)
            for c, t in zip(completions, targets, strict=True)
        ]
    elif len(parsed) != len(completions):
        raise ValueError(f"{len(parsed)} parsed answers for {len(completions)} completions")
    return np.array(
        [
            has_think_answer_format(c) and p is not None
            for c, p in zip(completions, parsed, strict=True)
        ],
        dtype=np.float64,
    )
