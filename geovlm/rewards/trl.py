"""geovlm's rewards as TRL reward functions: ``GRPOTrainer(reward_funcs=reward_funcs(), ...)``.

TRL calls each reward function as ``fn(prompts=..., completions=..., completion_ids=...,
**columns)`` with one entry per completion, the dataset's other columns repeated for every
completion of a prompt (plus ``trainer_state``, ``log_extra``, ``log_metric``), and logs each
function's mean under ``rewards/<fn.__name__>``. ``reward_funcs(options)`` gives two of them,
one per component of ``geovlm.rewards.score``:

* ``geovlm_format``: the format reward (``<think>...</think><answer>...</answer>`` with a usable
  answer), in {0, 1};
* ``geovlm_accuracy``: the task's accuracy reward, in [0, 1].

Weight them with ``GRPOConfig(reward_weights=[1.0, 1.0])`` (the paper's). Both read the sample's
ground truth from a ``target`` column: a JSON object written by ``target_to_json`` (or the dict
it encodes). Prompts and completions may be plain strings or conversations (lists of
``{"role", "content"}`` messages, ``content`` a string or a list of ``{"type": "text", "text"}``
parts): the completion is the text of its messages, the prompt the text of its last user message
(vqa reads the options a question offers from it; an answer block copied from it is ignored).

The two functions share one ``score`` call per batch: the second call with the same completions,
prompts and targets reuses the first's result. A completion that is neither a string nor a
conversation scores 0; a missing or unreadable ``target`` is a ``ValueError`` that names the row.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from geovlm.data.schema import Target
from geovlm.rewards.batch import RewardBatch, score
from geovlm.rewards.options import RewardOptions

TARGET_COLUMN = "target"
_FIELDS = {f.name: f for f in dataclasses.fields(Target)}
_ARRAY_FIELDS = ("boxes", "region")
_TUPLE_FIELDS = ("image_size", "labels", "classes", "captions")


def target_to_json(target: Target) -> str:
    """``target`` as one JSON object (arrays and tuples as lists; ``meta`` must be JSON-able and
    comes back with JSON's types); ``target_from_json`` reads it."""
    record: dict[str, Any] = {}
    for name in _FIELDS:
        value = getattr(target, name)
        if isinstance(value, np.ndarray):
            value = value.tolist()
        elif isinstance(value, tuple):
            value = list(value)
        record[name] = value
    return json.dumps(record)


def target_from_json(value: str | dict) -> Target:
    """The ``Target`` a ``target_to_json`` string (or its decoded dict) describes; equal strings
    give the same object, so the G completions of one prompt share their ground truth."""
    if isinstance(value, dict):
        return _target_from_record(value)
    if not isinstance(value, str):
        raise ValueError(f"a target must be a JSON string or a dict, got {type(value).__name__}")
    return _target_from_string(value)


@lru_cache(maxsize=4096)
def _target_from_string(text: str) -> Target:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"target is not JSON: {err}") from None
    if not isinstance(record, dict):
        raise ValueError(f"target must be a JSON object, got {type(record).__name__}")
    return _target_from_record(record)


def _target_from_record(record: dict) -> Target:
    unknown = sorted(set(record) - set(_FIELDS))
    if unknown:
        raise ValueError(f"target has unknown fields {unknown}; known: {sorted(_FIELDS)}")
    for name in ("task", "answer", "image_size"):
        if name not in record:
            raise ValueError(f"target has no {name!r}")
    kwargs = dict(record)
    for name in _TUPLE_FIELDS:
        if kwargs.get(name) is not None:
            kwargs[name] = tuple(kwargs[name])
    for name in _ARRAY_FIELDS:
        if kwargs.get(name) is not None:
            kwargs[name] = np.asarray(kwargs[name], dtype=np.float64)
    if kwargs.get("meta") is None:
        kwargs.pop("meta", None)
    return Target(**kwargs)


def _message_text(content: object) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if all(isinstance(p, str) for p in parts):
            return "".join(parts)
    return None


def completion_text(completion: object) -> str | None:
    """The text of a completion: the string, or the concatenated contents of a conversation's
    messages; ``None`` for anything else (scored 0)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if isinstance(completion, list) and all(isinstance(m, dict) for m in completion):
        texts = [_message_text(m.get("content")) for m in completion]
        if all(t is not None for t in texts):
            return "".join(texts)
    return None


def prompt_text(prompt: object) -> str | None:
    """The question of a prompt: the string, or the text of a conversation's last user message."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        users = [m for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        if users:
            return _message_text(users[-1].get("content"))
    return None


class _SharedScore:
    """One ``score`` call per batch, shared by the component functions."""

    def __init__(self, options: RewardOptions):
        self.options = options
        self._key: tuple | None = None
        self._batch: RewardBatch | None = None

    def __call__(self, prompts: Sequence[object] | None, completions: Sequence[object],
                 kwargs: dict) -> RewardBatch:
        column = kwargs.get(TARGET_COLUMN)
        if column is None:
            raise ValueError(
                f"geovlm rewards need a {TARGET_COLUMN!r} dataset column "
                "(geovlm.rewards.trl.target_to_json of each sample's Target)"
            )
        if len(column) != len(completions):
            raise ValueError(f"{len(column)} targets for {len(completions)} completions")
        texts = [completion_text(c) for c in completions]
        questions = [prompt_text(p) for p in prompts] if prompts is not None else None
        raw = tuple(c if isinstance(c, str) else json.dumps(c, sort_keys=True) for c in column)
        key = (tuple(texts), tuple(questions) if questions else None, raw)
        if key != self._key:
            targets = []
            for row, value in enumerate(column):
                try:
                    targets.append(target_from_json(value))
                except (ValueError, TypeError) as err:
                    raise ValueError(f"{TARGET_COLUMN!r} column, row {row}: {err}") from None
            tasks = [t.task for t in targets]
            self._batch = score(tasks, texts, targets, options=self.options, prompts=questions)
            self._key = key
        return self._batch


def reward_funcs(options: RewardOptions | None = None) -> list[Callable[..., list[float]]]:
    """``[geovlm_format, geovlm_accuracy]``: TRL reward functions (module docstring) scoring with
    ``options`` (``RewardOptions()``: the defaults of a geovlm run)."""
    shared = _SharedScore(options if options is not None else RewardOptions())

    def component(name: str) -> Callable[..., list[float]]:
        def reward(prompts=None, completions=(), **kwargs) -> list[float]:
            return shared(prompts, completions, kwargs).components[name].tolist()

        reward.__name__ = reward.__qualname__ = f"geovlm_{name}"
        reward.__doc__ = f"geovlm's {name} reward per completion (geovlm.rewards.trl)."
        return reward

    return [component("format"), component("accuracy")]
