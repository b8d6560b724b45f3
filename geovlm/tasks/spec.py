"""``TaskSpec``: everything the project knows about one EO task family, in one object.

The trainer, the rewards, the metrics, the readers and the embedded world find a task only
through its spec in the registry (``geovlm.tasks.registry``). The hooks, with ``C`` answers of one
task at a time:

* ``parse(answer, target, options) -> typed answer | None``: the answer text (never blank) read
  into what the accuracy reward scores (a class, boxes, a number, ...); ``None`` when the answer
  does not give one (the format reward then pays 0 too). Never raises on model output.
* ``accuracy(parsed [C], targets [C], options) -> [C]`` float64 in [0, 1]: the accuracy reward
  (``None`` answers score 0; ``score`` clips whatever comes back into [0, 1]).
* ``metrics[protocol](answers [C], targets [C], options) -> {name: float}``: the evaluation
  metrics of a protocol (``"geovlm"``: GeoVLM-R1's tables); ``answers`` are answer texts or
  ``None`` for no answer. ``headline`` names the one metric summaries show.
* ``from_record(exchange) -> Target``: the ground truth of one human -> assistant exchange of a
  data file (``geovlm.data.readers.Exchange``; ``exchange.format`` says which file format).
* ``generate(context) -> (prompt, think, Target)``: one embedded-world sample of a scene
  (``geovlm.data.synthetic.SceneContext``), its prompt drawn from ``prompts``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from geovlm.data.readers import Exchange
    from geovlm.data.schema import Target
    from geovlm.data.synthetic import SceneContext
    from geovlm.metrics import MetricOptions
    from geovlm.rewards.options import RewardOptions
    from geovlm.rewards.parse import ParseOptions

Parser = Callable[[str, "Target", "ParseOptions"], Any]
Accuracy = Callable[[Sequence[Any], Sequence["Target"], "RewardOptions"], np.ndarray]
Metrics = Callable[[Sequence["str | None"], Sequence["Target"], "MetricOptions"], dict[str, float]]
RecordReader = Callable[["Exchange"], "Target"]
Generator = Callable[["SceneContext"], tuple[str, str, "Target"]]

_NAME = re.compile(r"[a-z][a-z0-9_]*")


@dataclass(frozen=True, eq=False)
class TaskSpec:
    """One EO task family.

    Attributes:
        name: the registry key and the ``task`` of every Sample / Target of it (``[a-z0-9_]``).
        description: one line on what is asked and what the answer is.
        parse: answer text -> typed answer or ``None`` (module docstring).
        accuracy: the accuracy reward of a batch of typed answers.
        metrics: protocol -> the evaluation metrics of that protocol; ``"geovlm"`` is required.
        headline: the metric of ``metrics["geovlm"]`` that summaries report.
        prompts: the embedded world's prompt templates, by question kind (``"default"`` for a
            task with one kind); ``str.format`` fields are filled by ``generate``.
        generate: the embedded-world generator; ``None``: the task has no synthetic samples.
        from_record: the data-file reader hook; ``None``: the task cannot be read from files.
        aliases: other names of the task in a record's ``task`` / ``type`` field ("rec").
        tags: GeoChat task tags (``[refer]`` -> ``"refer"``) that select the task.
        bitemporal: the task is asked on a (before, after) image pair.
        format_weight, accuracy_weight: weights of the two reward components in the total
            (GeoVLM-R1: ``R = R_format + R_accuracy``).
    """

    name: str
    description: str
    parse: Parser
    accuracy: Accuracy
    metrics: Mapping[str, Metrics]
    headline: str
    prompts: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    generate: Generator | None = None
    from_record: RecordReader | None = None
    aliases: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    bitemporal: bool = False
    format_weight: float = 1.0
    accuracy_weight: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ValueError(f"task name {self.name!r} must match [a-z][a-z0-9_]*")
        where = f"task {self.name!r}"
        for hook in ("parse", "accuracy"):
            if not callable(getattr(self, hook)):
                raise ValueError(f"{where}: {hook} must be callable")
        for hook in ("generate", "from_record"):
            if getattr(self, hook) is not None and not callable(getattr(self, hook)):
                raise ValueError(f"{where}: {hook} must be callable or None")
        if "geovlm" not in self.metrics or not all(map(callable, self.metrics.values())):
            raise ValueError(f"{where}: metrics must map protocols ('geovlm' too) to callables")
        if not self.headline:
            raise ValueError(f"{where}: headline must name a metric")
        for kind, templates in self.prompts.items():
            if not isinstance(templates, tuple) or not templates:
                raise ValueError(f"{where}: prompts[{kind!r}] must be a non-empty tuple")
        for name in ("format_weight", "accuracy_weight"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{where}: {name} must be finite and >= 0, got {value!r}")
