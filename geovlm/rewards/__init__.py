"""Task-aware rewards of GeoVLM-R1: format + one accuracy reward per EO task, on CPU.

``score(tasks, completions, targets) -> RewardBatch`` is what the trainer and the evaluation call;
it finds each task's parser and accuracy reward in the task registry (``geovlm.tasks``). This
package holds the task-independent machinery: answer parsing, the format reward, geometry and text
kernels (numba), sentence embeddings. The names below load on first use, so that importing a light
submodule (``geovlm.rewards.options``, which ``geovlm.config`` needs) does not load numba; the
sentence-embedding model (torch) loads on the first region / change caption scored with
``RewardOptions(use_embeddings=True)``. ``geovlm.rewards.trl`` wraps ``score`` as TRL reward
functions; ``docs/rewards.md`` says what the rewards guarantee and how they resist hacking.
"""

from __future__ import annotations

import importlib

# name -> the submodule that defines it.
_EXPORTS: dict[str, str] = {
    "COMPONENTS": "batch",
    "RewardBatch": "batch",
    "resolve_weights": "batch",
    "score": "batch",
    "format_reward": "format",
    "has_think_answer_format": "format",
    "extract_answer": "parse",
    "extract_think": "parse",
    "parse_for_task": "parse",
    "RewardChoices": "options",
    "RewardOptions": "options",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
