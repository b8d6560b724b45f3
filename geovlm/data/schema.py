"""The one sample schema every reader, the embedded world, the rewards and the trainer share.

A ``Sample`` is one instruction: one or two images (two for bi-temporal change tasks), a user
prompt, the SFT reasoning trace and the ``Target`` the rewards score against.

A task is a name of the task registry (``geovlm.tasks.registry``: the GeoVLM-R1 families of the
paper's Table 1, and any registered since); a Target checks its task against it.

Coordinates: every box inside the project is float64 *pixels of the original image*
(DESIGN.md, "Coordinates"): ``xyxy`` boxes are ``[K, 4]`` arrays ``x1, y1, x2, y2``; rotated boxes
are ``[K, 5]`` arrays ``cx, cy, w, h, angle_deg`` with the angle counter-clockwise in degrees.
Readers convert other conventions at the edges (``geovlm.data.boxes``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

BoxFormat = Literal["xyxy", "rotated"]


@dataclass
class Target:
    """Ground truth of one sample; a task uses the fields it needs and leaves the rest empty.

    Attributes:
        task: a registered task name (``geovlm.tasks.registry``).
        answer: the canonical answer text, exactly as the SFT target renders it inside
            ``<answer>...</answer>`` (boxes in the model's convention).
        image_size: ``(width, height)`` of the (first) original image, in pixels.
        label: the class of a single-label task (scene_cls, temporal_cls), or the yes/no of
            change_det, or the short answer of vqa.
        labels: the classes of multi-label classification.
        classes: the label vocabulary the answer is chosen from (for normalisation and to catch
            "A or B or C" answers).
        boxes: ``[K, 4]`` xyxy or ``[K, 5]`` rotated boxes, float64 pixels of the original image.
        box_format: ``"xyxy"`` or ``"rotated"`` when ``boxes`` is set.
        count: the number for counting.
        captions: reference sentences (captioning, region / change captioning, grounding).
        region: the ``[4]`` xyxy box a region caption is asked about, if any.
        meta: free-form facts for evaluation splits (e.g. ``{"size": "small", "n_objects": 1,
            "question_type": "presence"}``).
    """

    task: str
    answer: str
    image_size: tuple[int, int]
    label: str | None = None
    labels: tuple[str, ...] = ()
    classes: tuple[str, ...] = ()
    boxes: np.ndarray | None = None
    box_format: BoxFormat | None = None
    count: int | None = None
    captions: tuple[str, ...] = ()
    region: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        # The registry sits above this module (its tasks build Targets): looked up on use.
        from geovlm.tasks import registry

        registry.get(self.task)
        if self.boxes is not None:
            boxes = np.asarray(self.boxes, dtype=np.float64)
            if boxes.ndim == 1:
                boxes = boxes.reshape(1, -1) if boxes.size else boxes.reshape(0, 4)
            width = {"xyxy": 4, "rotated": 5}.get(self.box_format or "", None)
            if width is None or boxes.ndim != 2 or boxes.shape[1] != width:
                raise ValueError(
                    f"boxes of shape {boxes.shape} do not match box_format {self.box_format!r}"
                )
            self.boxes = boxes


@dataclass
class Sample:
    """One instruction sample.

    Attributes:
        id: unique, stable id (used to resume evaluation and to check split disjointness).
        task: a registered task name (``geovlm.tasks.registry``).
        images: PIL images or paths to them; two for bi-temporal tasks (before, after).
        prompt: the user's text (without image placeholders; collation inserts them).
        target: the ground truth.
        think: the SFT reasoning trace (the text inside ``<think>``); may be empty for real data.
        source: where the sample came from, e.g. ``"synthetic"`` or ``"file.json:17"``.
    """

    id: str
    task: str
    images: list[Image.Image | Path | str]
    prompt: str
    target: Target
    think: str = ""
    source: str = ""

    @property
    def response(self) -> str:
        """The SFT target: ``<think>trace</think><answer>answer</answer>``."""
        return f"<think>{self.think}</think><answer>{self.target.answer}</answer>"

    def load_images(self) -> list[Image.Image]:
        """The images as RGB PIL images; a missing file is an error naming the sample."""
        out = []
        for image in self.images:
            if isinstance(image, Image.Image):
                out.append(image.convert("RGB"))
                continue
            path = Path(image)
            if not path.is_file():
                raise FileNotFoundError(f"sample {self.id} ({self.source}): image {path} not found")
            with Image.open(path) as handle:
                out.append(handle.convert("RGB"))
        return out
