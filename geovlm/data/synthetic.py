"""The embedded EO world as instruction samples: every registered task family from each scene.

``generate_scenes`` (re-exported from ``geovlm.data.scenes``) draws seeded bi-temporal scenes;
``samples_from_scene`` turns one scene's ground truth into one ``Sample`` per task, each made by
its task's generator (``TaskSpec.generate`` in ``geovlm.tasks``) from a ``SceneContext``: short
regular prompts (the task's templates), a templated ``<think>`` trace derived from the scene, and
a ``Target`` whose ``answer`` follows the project's answer contract (boxes in the model's
``convention``, rendered by ``geovlm.data.boxes.render_box``). Box-bearing answers list boxes in
reading order (by box centre: top to bottom, then left to right); ``Target.boxes`` and
``Target.region`` are the pixel boxes those rounded answers state (the scene keeps the exact
geometry).

This module holds what the generators share: the ``SceneContext`` (the scene, the task's seeded
random stream, box rendering) and the phrases that describe scenes (inventories, regions, land
covers, changes).

``embedded_splits`` gives disjoint train / val / test sets (scenes from disjoint seed streams);
``corpus`` collects their texts for tokenizer training.

``Target.meta`` always holds ``scene_id`` and ``land_cover``; detection and region tasks add
``size`` (``geovlm.data.splits.size_bucket`` of the mean axis-aligned box area), ``objects``
(``single`` / ``multiple``) and ``n_objects``; VQA adds ``question_type`` (``presence`` /
``comparison``); bi-temporal tasks add ``change`` (a ``CHANGE_KINDS`` label).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from geovlm.data.boxes import (
    CONVENTIONS,
    QWEN_RESIZE_FACTOR,
    from_pixels,
    qwen25vl_resized_size,
    render_box,
    to_pixels,
)
from geovlm.data.scenes import (
    CHANGE_KINDS,
    DEFAULT_WORLD,
    LAND_COVERS,
    OBJECT_CLASSES,
    PLURALS,
    Scene,
    SceneObject,
    SceneState,
    WorldSettings,
    generate_scenes,
)
from geovlm.data.schema import Sample, Target
from geovlm.data.splits import size_bucket

if TYPE_CHECKING:
    from geovlm.tasks.spec import TaskSpec

__all__ = [
    "CHANGE_KINDS",
    "COVER_CUES",
    "COVER_NOUN",
    "COVER_PLACE",
    "LAND_COVERS",
    "OBJECT_CLASSES",
    "REGION_PHRASE",
    "SceneContext",
    "WorldSettings",
    "change_summary",
    "class_counts",
    "colored_inventory",
    "corpus",
    "detection_meta",
    "embedded_splits",
    "generate_scenes",
    "inventory",
    "join_phrases",
    "noun",
    "objects_phrase",
    "reading_order",
    "region_of",
    "samples_from_scene",
    "scene_captions",
    "was_were",
]

# Qwen2.5-VL's default pixel budget (qwen_vl_utils). Within a budget, smart_resize keeps a size
# whose sides are multiples of 28 unchanged, which spares importing qwen_vl_utils (and torch).
_QWEN_MIN_PIXELS, _QWEN_MAX_PIXELS = 4 * 28 * 28, 16384 * 28 * 28

# How each land cover looks, is named and is a place ("ships on the water").
COVER_CUES: dict[str, str] = {
    "water": "dark blue water",
    "farmland": "striped crop fields",
    "forest": "dense tree crowns",
    "bare land": "brown bare soil",
    "urban": "a grid of roads and blocks",
}
COVER_NOUN: dict[str, str] = {
    "water": "open water",
    "farmland": "farmland",
    "forest": "a forest",
    "bare land": "bare land",
    "urban": "an urban area",
}
COVER_PLACE: dict[str, str] = {
    "water": "on the water",
    "farmland": "on farmland",
    "forest": "in the forest",
    "bare land": "on bare land",
    "urban": "in the city",
}
_REGIONS = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)
REGION_PHRASE: dict[str, str] = {
    "top left": "in the top left",
    "top": "at the top",
    "top right": "in the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "in the bottom left",
    "bottom": "at the bottom",
    "bottom right": "in the bottom right",
}
_NUMBER_WORDS = ("no", "a", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


# --------------------------------------------------------------------------------------------
# Phrases shared by the task generators


def join_phrases(parts: Sequence[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    if len(parts) <= 1:
        return "".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def noun(category: str, n: int) -> str:
    """The class name, plural unless ``n == 1``."""
    return category if n == 1 else PLURALS[category]


def _words(n: int) -> str:
    return _NUMBER_WORDS[n] if n < len(_NUMBER_WORDS) else str(n)


def _be(n: int) -> str:
    return "is" if n == 1 else "are"


def _there_be(objects: Sequence[SceneObject]) -> str:
    """``there is`` / ``there are``, agreeing with the first item of the inventory."""
    counts = class_counts(objects)
    return "there " + _be(next(iter(counts.values())) if counts else 0)


def objects_phrase(n: int) -> str:
    """``an object``, ``two objects``."""
    return "an object" if n == 1 else f"{_words(n)} objects"


def was_were(n: int) -> str:
    """``was`` for one, ``were`` otherwise."""
    return "was" if n == 1 else "were"


def class_counts(objects: Iterable[SceneObject]) -> dict[str, int]:
    """class -> number of objects, for the classes present, in ``OBJECT_CLASSES`` order."""
    counts = dict.fromkeys(OBJECT_CLASSES, 0)
    for obj in objects:
        counts[obj.category] += 1
    return {c: n for c, n in counts.items() if n}


def inventory(objects: Sequence[SceneObject], digits: bool = True) -> str:
    """``2 ships and 1 storage tank`` (digits) or ``two ships and a storage tank``."""
    counts = class_counts(objects)
    if not counts:
        return "no objects"
    return join_phrases([f"{n if digits else _words(n)} {noun(c, n)}" for c, n in counts.items()])


def colored_inventory(objects: Sequence[SceneObject]) -> str:
    """``two white ships and a red ship``, by (class, colour) in order of first appearance."""
    groups: dict[tuple[str, str], int] = {}
    for obj in sorted(objects, key=lambda o: OBJECT_CLASSES.index(o.category)):
        groups[(obj.category, obj.color)] = groups.get((obj.category, obj.color), 0) + 1
    return join_phrases(
        [f"{_words(n)} {color} {noun(c, n)}" for (c, color), n in groups.items()]
    )


def region_of(obj: SceneObject, image_size: tuple[int, int]) -> str:
    """Which ninth of the image the object's box centre is in (a key of ``REGION_PHRASE``)."""
    width, height = image_size
    x1, y1, x2, y2 = obj.xyxy
    col = min(2, max(0, int(3 * (x1 + x2) / 2 / width)))
    row = min(2, max(0, int(3 * (y1 + y2) / 2 / height)))
    return _REGIONS[row][col]


def reading_order(objects: Iterable[SceneObject]) -> list[SceneObject]:
    """Objects sorted by box centre: top to bottom, then left to right."""
    return sorted(objects, key=lambda o: ((o.xyxy[1] + o.xyxy[3]) / 2, (o.xyxy[0] + o.xyxy[2]) / 2))


def detection_meta(objects: Sequence[SceneObject], size: tuple[int, int]) -> dict:
    """``size`` bucket of the mean box area, ``objects`` (single / multiple) and ``n_objects``."""
    return {
        "size": size_bucket(float(np.mean([o.area for o in objects])), size),
        "objects": "single" if len(objects) == 1 else "multiple",
        "n_objects": len(objects),
    }


# --------------------------------------------------------------------------------------------
# Building one sample


class SceneContext:
    """What a task's generator gets: the scene, the task's seeded random stream, its prompt
    templates and the model's box convention.

    The stream is seeded by the scene and the task's registry position, so that a task's sample
    does not depend on which other tasks are generated. ``objects`` / ``cover`` are the "before"
    image's. ``after`` is the state the second image of a bi-temporal sample shows:
    ``scene.after``, unless the generator shows ``scene.unchanged_after()`` instead (a no-change
    pair made from a changed scene).
    """

    def __init__(
        self,
        scene: Scene,
        task: str,
        stream: int,
        prompts: Mapping[str, tuple[str, ...]],
        convention: str,
        budget: tuple[int | None, int | None] = (None, None),
    ) -> None:
        self.scene = scene
        self.task = task
        self.prompts = prompts
        self.convention = convention
        self.min_pixels = _QWEN_MIN_PIXELS if budget[0] is None else budget[0]
        self.max_pixels = _QWEN_MAX_PIXELS if budget[1] is None else budget[1]
        self.size = scene.image_size
        self.rng = np.random.default_rng([0x7A5C, *scene.seed, stream])
        self.cover = scene.before.land_cover
        self.objects = scene.before.objects
        self.after: SceneState = scene.after
        self._resized: tuple[int, int] | None = None

    @property
    def change(self) -> str:
        """The change the sample's image pair shows (a ``CHANGE_KINDS`` label)."""
        return self.scene.change if self.after is self.scene.after else "no change"

    def choice(self, options: Sequence):
        """One of ``options``, drawn from the task's stream."""
        return options[int(self.rng.integers(len(options)))]

    def prompt(self, kind: str = "default", **fields: str) -> str:
        """A template of the task's ``prompts[kind]``, drawn from the stream, filled with fields."""
        return self.choice(self.prompts[kind]).format(**fields)

    def resized(self) -> tuple[int, int] | None:
        """Qwen2.5-VL's resized input size of the scene (``None`` for other conventions)."""
        if self.convention != "qwen25vl":
            return None
        if self._resized is None:
            width, height = self.size
            exact = width % QWEN_RESIZE_FACTOR == 0 and height % QWEN_RESIZE_FACTOR == 0
            if exact and self.min_pixels <= width * height <= self.max_pixels:
                self._resized = self.size
            else:
                self._resized = qwen25vl_resized_size(self.size, self.min_pixels, self.max_pixels)
        return self._resized

    def render(self, boxes: np.ndarray) -> tuple[list[str], np.ndarray]:
        """Box texts in the model's convention, and the pixel boxes those texts say.

        Targets hold the latter: like a real annotation, the truth is what the answer states,
        so the SFT answer itself scores a perfect IoU.
        """
        converted = from_pixels(boxes, self.convention, self.size, self.resized())
        # render_box rounds half to even, as np.round does.
        snapped = to_pixels(np.round(converted), self.convention, self.size, self.resized())
        return [render_box(box, self.convention) for box in converted], snapped

    def target(self, answer: str, **fields) -> Target:
        """The task's Target on the scene's image, with ``scene_id`` / ``land_cover`` in meta."""
        meta = {"scene_id": self.scene.id, "land_cover": self.cover, **fields.pop("meta", {})}
        return Target(task=self.task, answer=answer, image_size=self.size, meta=meta, **fields)


def scene_captions(ctx: SceneContext) -> tuple[str, ...]:
    """Four reference captions of the "before" scene (image captioning, grounding)."""
    objects, cover = ctx.objects, ctx.cover
    listed, n = inventory(objects, digits=False), len(objects)
    return (
        f"an aerial view of {COVER_NOUN[cover]} with {listed}",
        f"{_there_be(objects)} {listed} {COVER_PLACE[cover]}",
        f"{colored_inventory(objects)} {COVER_PLACE[cover]}",
        f"{COVER_NOUN[cover]} with {objects_phrase(n)}",
    )


def change_summary(ctx: SceneContext) -> str:
    """The think trace of the bi-temporal tasks: what each of the two images shows, then what
    changed ("First: 2 ships on the water. Second: 3 ships on the water. 1 ship was added.")."""
    before, after = ctx.scene.before, ctx.after
    return (
        f"First: {inventory(before.objects)} {COVER_PLACE[before.land_cover]}. "
        f"Second: {inventory(after.objects)} {COVER_PLACE[after.land_cover]}. "
        f"{_what_changed(before, after)}."
    )


def _what_changed(before: SceneState, after: SceneState) -> str:
    """``1 ship was added`` / ``2 buildings were removed`` / ``farmland became urban`` /
    ``Nothing changed``: the one change of a scene's image pair."""
    if before.land_cover != after.land_cover:
        return f"{before.land_cover.capitalize()} became {after.land_cover}"
    added = [o for o in after.objects if o not in before.objects]
    removed = [o for o in before.objects if o not in after.objects]
    changed, verb = (added, "added") if added else (removed, "removed")
    if not changed:
        return "Nothing changed"
    return f"{inventory(changed)} {was_were(len(changed))} {verb}"


def _generators(tasks: Iterable[str] | None) -> list[tuple[TaskSpec, int]]:
    """``(spec, stream)`` of each of ``tasks`` (default: every registered task with a generator):
    its ``TaskSpec`` and its random stream, the task's registry position."""
    from geovlm.tasks import registry

    if tasks is None:
        chosen = [spec.name for spec in registry.specs() if spec.generate is not None]
    else:
        chosen = [tasks] if isinstance(tasks, str) else list(tasks)
        unknown = [t for t in chosen if t not in registry.names()]
        if unknown or not chosen:
            raise ValueError(
                f"unknown or no tasks {unknown or chosen}; known: {list(registry.names())}"
            )
    specs = [registry.get(task) for task in chosen]
    missing = [spec.name for spec in specs if spec.generate is None]
    if missing:
        raise ValueError(f"task(s) {missing} have no embedded-world generator (TaskSpec.generate)")
    return [(spec, registry.index(spec.name)) for spec in specs]


def samples_from_scene(
    scene: Scene,
    tasks: Iterable[str] | None = None,
    convention: str = "qwen25vl",
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> list[Sample]:
    """One ``Sample`` per task of ``tasks`` (default: every registered task with a generator), in
    that order.

    A task's sample does not depend on which other tasks are asked for. Single-image tasks show
    the scene's "before" image; bi-temporal ones show ``[before, after]``. ``min_pixels`` /
    ``max_pixels`` are the processor's pixel budget for the ``"qwen25vl"`` resize (default:
    qwen_vl_utils'), which leaves the default 112x112 images unchanged.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown box convention {convention!r}; known: {CONVENTIONS}")
    return _samples(scene, _generators(tasks), convention, (min_pixels, max_pixels))


def _samples(
    scene: Scene,
    generators: list[tuple[TaskSpec, int]],
    convention: str,
    budget: tuple[int | None, int | None],
) -> list[Sample]:
    out = []
    for spec, stream in generators:
        ctx = SceneContext(scene, spec.name, stream, spec.prompts, convention, budget)
        prompt, think, target = spec.generate(ctx)
        images = [scene.before.image]
        if spec.bitemporal:
            images.append(ctx.after.image)
        out.append(
            Sample(f"{scene.id}-{spec.name}", spec.name, images, prompt, target, think, "synthetic")
        )
    return out


def embedded_splits(
    seed: int = 0,
    n_train: int = 600,
    n_val: int = 24,
    n_test: int = 60,
    image_size: int | tuple[int, int] = 112,
    tasks: Iterable[str] | None = None,
    convention: str = "qwen25vl",
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    world: WorldSettings = DEFAULT_WORLD,
    n_test_by_task: Mapping[str, int] | None = None,
) -> dict[str, list[Sample]]:
    """Train / val / test samples from ``n_train`` / ``n_val`` / ``n_test`` scenes each.

    ``world``: the objects' scale and clutter (``WorldSettings``; default: the standard world).
    ``n_test_by_task``: other test-scene counts for some tasks (``{"referred_det": 300}``): the
    test stream's first ``n`` scenes give that task's samples; every task's samples of the first
    ``n_test`` scenes are the same as without it.

    Every scene gives one sample per task (``samples_from_scene``). Split ``k`` (0 train, 1 val,
    2 test) draws its scenes from the stream ``3 * seed + k``, so no two splits of any seeds share
    a scene.
    """
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown box convention {convention!r}; known: {CONVENTIONS}")
    generators = _generators(tasks)
    by_task = dict(n_test_by_task or {})
    unknown = sorted(set(by_task) - {spec.name for spec, _ in generators})
    if unknown:
        raise ValueError(f"n_test_by_task names tasks this world does not generate: {unknown}")
    out: dict[str, list[Sample]] = {}
    for k, (name, n) in enumerate((("train", n_train), ("val", n_val), ("test", n_test))):
        counts = by_task if name == "test" else {}
        scenes = generate_scenes(3 * int(seed) + k, max([n, *counts.values()]), image_size, world)
        out[name] = [
            sample
            for i, scene in enumerate(scenes)
            for sample in _samples(
                scene,
                [(spec, stream) for spec, stream in generators if i < counts.get(spec.name, n)],
                convention,
                (min_pixels, max_pixels),
            )
        ]
    return out


def corpus(samples: Iterable[Sample]) -> list[str]:
    """Texts for tokenizer training: each sample's prompt, SFT response and reference captions."""
    texts: list[str] = []
    for sample in samples:
        texts.append(sample.prompt)
        texts.append(sample.response)
        texts.extend(sample.target.captions)
    return texts
