"""Small prediction fixtures for the evaluation tests, with their targets.

Each ``*.jsonl`` line is ``{"id", "task", "prediction", "target": {Target fields}}``; images are
112 x 112 unless ``target.image_size`` says otherwise (112 is a multiple of 28, so Qwen2.5-VL
boxes are plain pixels). The expected metric values are computed by hand in the tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from geovlm.data.schema import Sample, Target

HERE = Path(__file__).parent


def load(name: str) -> list[tuple[str, str, str, Target]]:
    """``(id, task, prediction, target)`` rows of ``<name>.jsonl``."""
    rows = []
    for line in (HERE / f"{name}.jsonl").read_text().splitlines():
        record = json.loads(line)
        fields = dict(record["target"])
        fields["image_size"] = tuple(fields.get("image_size", (112, 112)))
        for key in ("labels", "classes", "captions"):
            if key in fields:
                fields[key] = tuple(fields[key])
        if "boxes" in fields:
            fields["boxes"] = np.asarray(fields["boxes"], dtype=np.float64)
        target = Target(task=record["task"], **fields)
        rows.append((record["id"], record["task"], record["prediction"], target))
    return rows


def samples(name: str) -> tuple[list[Sample], dict[str, str]]:
    """The rows of ``<name>.jsonl`` as Samples (a blank image each) and id -> prediction."""
    out, predictions = [], {}
    for sample_id, task, prediction, target in load(name):
        image = Image.new("RGB", target.image_size, (90, 120, 60))
        out.append(Sample(id=sample_id, task=task, images=[image], prompt=f"{task}?",
                          target=target, source=f"{name}.jsonl"))
        predictions[sample_id] = prediction
    return out, predictions
