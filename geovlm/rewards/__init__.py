"""Task-aware rewards of GeoVLM-R1: format + one accuracy reward per EO task, on CPU.

``score(tasks, completions, targets) -> RewardBatch`` is what the trainer and the evaluation call.
Importing this package needs numpy and numba only: the sentence-embedding model (torch) is loaded
on the first region / change caption scored with ``RewardOptions(use_embeddings=True)``.
"""

from geovlm.rewards.batch import COMPONENTS, RewardBatch, resolve_weights, score
from geovlm.rewards.format import format_reward, has_think_answer_format
from geovlm.rewards.parse import extract_answer, extract_think, parse_for_task
from geovlm.rewards.tasks import REGISTRY, RewardOptions, TaskSpec

__all__ = [
    "COMPONENTS",
    "REGISTRY",
    "RewardBatch",
    "RewardOptions",
    "TaskSpec",
    "extract_answer",
    "extract_think",
    "format_reward",
    "has_think_answer_format",
    "parse_for_task",
    "resolve_weights",
    "score",
]
