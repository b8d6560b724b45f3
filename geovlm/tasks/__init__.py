"""The EO task families: one module per task, one registry.

A task is a ``TaskSpec`` (``geovlm.tasks.spec``): its name, description, answer parser, accuracy
reward, evaluation metrics and headline, how its ``Target`` is read from a data record, its prompt
templates and its embedded-world generator. ``geovlm.tasks.registry`` maps names to specs; the
rewards (``geovlm.rewards.score``), the metrics (``geovlm.metrics.task_metrics``), the readers
(``geovlm.data.readers``), the embedded world (``geovlm.data.synthetic``), the trainer and the
evaluation find tasks only there.

Map of the package::

    spec.py            TaskSpec and the signatures of its hooks
    registry.py        register / get / names / resolve (aliases) / import_task_modules
    _labels.py         single-label parsing, reward, metrics and record reading
    _boxes.py          box parsing and record reading (the detection tasks)
    _captions.py       caption parsing, the hybrid caption reward, record reading
    scene_cls.py  multilabel_cls.py  referred_det.py (referred_det, referred_det_rot)
    multi_det.py  counting.py  vqa.py  region_caption.py  grounding_desc.py  image_caption.py
    change_det.py  change_caption.py  temporal_cls.py

Importing this package registers the built-in task modules below, in the order of the paper's
Table 1 (the order of tables and of the embedded world's random streams). ``docs/tasks.md`` says
how to add a task.
"""

from __future__ import annotations

from geovlm.tasks import registry
from geovlm.tasks.spec import TaskSpec

__all__ = ["BUILTIN_MODULES", "TaskSpec", "registry"]

BUILTIN_MODULES: tuple[str, ...] = (
    "scene_cls",
    "multilabel_cls",
    "referred_det",
    "multi_det",
    "counting",
    "vqa",
    "region_caption",
    "grounding_desc",
    "image_caption",
    "change_det",
    "change_caption",
    "temporal_cls",
)

registry.import_task_modules(f"{__name__}.{module}" for module in BUILTIN_MODULES)
