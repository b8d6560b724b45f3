"""The embedded EO world as instruction samples: every GeoVLM-R1 task family from each scene.

``generate_scenes`` (re-exported from ``geovlm.data.scenes``) draws seeded bi-temporal scenes;
``samples_from_scene`` turns one scene's ground truth into one ``Sample`` per task family:
short regular prompts (a few templates per task), a templated ``<think>`` trace derived from
the scene, and a ``Target`` whose ``answer`` follows the project's answer contract (boxes in the
model's ``convention``, rendered by ``geovlm.data.boxes.render_box``). Box-bearing answers list
boxes in reading order (by box centre: top to bottom, then left to right); ``Target.boxes`` and
``Target.region`` are the pixel boxes those rounded answers state (the scene keeps the exact
geometry).

``embedded_splits`` gives disjoint train / val / test sets (scenes from disjoint seed streams);
``corpus`` collects their texts for tokenizer training.

``Target.meta`` always holds ``scene_id`` and ``land_cover``; detection and region tasks add
``size`` (``geovlm.data.splits.size_bucket`` of the mean axis-aligned box area), ``objects``
(``single`` / ``multiple``) and ``n_objects``; VQA adds ``question_type`` (``presence`` /
``comparison``); bi-temporal tasks add ``change`` (a ``CHANGE_KINDS`` label).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

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
    LAND_COVERS,
    OBJECT_CLASSES,
    PLURALS,
    Scene,
    SceneObject,
    generate_scenes,
)
from geovlm.data.schema import TASKS, Sample, Target
from geovlm.data.splits import size_bucket

__all__ = [
    "CHANGE_KINDS",
    "LAND_COVERS",
    "OBJECT_CLASSES",
    "PROMPTS",
    "corpus",
    "embedded_splits",
    "generate_scenes",
    "samples_from_scene",
]

# Qwen2.5-VL's default pixel budget (qwen_vl_utils). Within a budget, smart_resize keeps a size
# whose sides are multiples of 28 unchanged, which spares importing qwen_vl_utils (and torch).
_QWEN_MIN_PIXELS, _QWEN_MAX_PIXELS = 4 * 28 * 28, 16384 * 28 * 28

PROMPTS: dict[str, tuple[str, ...]] = {
    "scene_cls": (
        "Classify the scene.",
        "What is the land cover in this image?",
        "Which scene class is this image?",
    ),
    "multilabel_cls": (
        "Which object classes are in the image?",
        "List the object classes in the image.",
    ),
    "referred_det": ("Locate {ref}.", "Find {ref}.", "Give the {box_word} of {ref}."),
    "referred_det_rot": (
        "Locate {ref} with {rot_word}.",
        "Give the rotated {box_word} of {ref}.",
    ),
    "multi_det": (
        "Detect all {plural}.",
        "Find every {singular}.",
        "Give the boxes of all {plural}.",
    ),
    "counting": (
        "How many {plural} are there?",
        "Count the {plural}.",
        "How many {plural} are in the image?",
    ),
    "vqa_presence": ("Is there a {singular} in the image?", "Are there any {plural}?"),
    "vqa_more": ("Are there more {plural_a} than {plural_b}?",),
    "vqa_which": ("Which are more numerous, {plural_a} or {plural_b}?",),
    "region_caption": ("Describe the object in {box}.", "What is in the region {box}?"),
    "grounding_desc": (
        "Describe the image and locate the objects.",
        "Give a grounded description of the image.",
    ),
    "image_caption": (
        "Describe the image.",
        "Write a caption for the image.",
        "What does this image show?",
    ),
    "change_det": (
        "Has anything changed between the two images?",
        "Is there any change between the images?",
    ),
    "change_caption": (
        "Describe the change between the two images.",
        "What changed between the images?",
    ),
    "temporal_cls": (
        "Classify the change: no change, objects added, objects removed or land cover change.",
        "Which kind of change is it: no change, objects added, objects removed or land cover "
        "change?",
    ),
}

_CUES = {
    "water": "dark blue water",
    "farmland": "striped crop fields",
    "forest": "dense tree crowns",
    "bare land": "brown bare soil",
    "urban": "a grid of roads and blocks",
}
_COVER_NP = {
    "water": "open water",
    "farmland": "farmland",
    "forest": "a forest",
    "bare land": "bare land",
    "urban": "an urban area",
}
_COVER_PREP = {
    "water": "on the water",
    "farmland": "on farmland",
    "forest": "in the forest",
    "bare land": "on bare land",
    "urban": "in the city",
}
_COVER_CHANGE = {
    ("forest", "bare land"): "the forest was cleared",
    ("forest", "farmland"): "the forest was turned into fields",
    ("farmland", "bare land"): "the fields were left bare",
    ("farmland", "urban"): "the fields were built over",
    ("bare land", "urban"): "the bare land was built up",
}
_REGIONS = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)
_REGION_PHRASE = {
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
# Small text helpers


def _join(parts: Sequence[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    if len(parts) <= 1:
        return "".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _noun(category: str, n: int) -> str:
    return category if n == 1 else PLURALS[category]


def _words(n: int) -> str:
    return _NUMBER_WORDS[n] if n < len(_NUMBER_WORDS) else str(n)


def _be(n: int) -> str:
    return "is" if n == 1 else "are"


def _there_be(objects: Sequence[SceneObject]) -> str:
    """``there is`` / ``there are``, agreeing with the first item of the inventory."""
    counts = _counts(objects)
    return "there " + _be(next(iter(counts.values())) if counts else 0)


def _objects(n: int) -> str:
    """``an object``, ``two objects``."""
    return "an object" if n == 1 else f"{_words(n)} objects"


def _was(n: int) -> str:
    return "was" if n == 1 else "were"


def _counts(objects: Iterable[SceneObject]) -> dict[str, int]:
    counts = dict.fromkeys(OBJECT_CLASSES, 0)
    for obj in objects:
        counts[obj.category] += 1
    return {c: n for c, n in counts.items() if n}


def _inventory(objects: Sequence[SceneObject], digits: bool = True) -> str:
    """``2 ships and 1 storage tank`` (digits) or ``two ships and a storage tank``."""
    counts = _counts(objects)
    if not counts:
        return "no objects"
    return _join([f"{n if digits else _words(n)} {_noun(c, n)}" for c, n in counts.items()])


def _colored_inventory(objects: Sequence[SceneObject]) -> str:
    """``two white ships and a red ship``, by (class, colour) in order of first appearance."""
    groups: dict[tuple[str, str], int] = {}
    for obj in sorted(objects, key=lambda o: OBJECT_CLASSES.index(o.category)):
        groups[(obj.category, obj.color)] = groups.get((obj.category, obj.color), 0) + 1
    return _join([f"{_words(n)} {color} {_noun(c, n)}" for (c, color), n in groups.items()])


def _region(obj: SceneObject, image_size: tuple[int, int]) -> str:
    width, height = image_size
    x1, y1, x2, y2 = obj.xyxy
    col = min(2, max(0, int(3 * (x1 + x2) / 2 / width)))
    row = min(2, max(0, int(3 * (y1 + y2) / 2 / height)))
    return _REGIONS[row][col]


def _reading_order(objects: Iterable[SceneObject]) -> list[SceneObject]:
    return sorted(objects, key=lambda o: ((o.xyxy[1] + o.xyxy[3]) / 2, (o.xyxy[0] + o.xyxy[2]) / 2))


# --------------------------------------------------------------------------------------------
# Building one sample


class _Context:
    """What every task builder needs: the scene, its RNG stream and the box convention."""

    def __init__(
        self, scene: Scene, task: str, convention: str, budget: tuple[int | None, int | None]
    ) -> None:
        self.scene = scene
        self.convention = convention
        self.min_pixels = _QWEN_MIN_PIXELS if budget[0] is None else budget[0]
        self.max_pixels = _QWEN_MAX_PIXELS if budget[1] is None else budget[1]
        self.size = scene.image_size
        self.rng = np.random.default_rng([0x7A5C, *scene.seed, list(TASKS).index(task)])
        self.cover = scene.before.land_cover
        self.objects = scene.before.objects
        self._resized: tuple[int, int] | None = None

    def choice(self, options: Sequence):
        return options[int(self.rng.integers(len(options)))]

    def prompt(self, key: str, **fields: str) -> str:
        return self.choice(PROMPTS[key]).format(**fields)

    def resized(self) -> tuple[int, int] | None:
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

    def target(self, task: str, answer: str, **fields) -> Target:
        meta = {"scene_id": self.scene.id, "land_cover": self.cover, **fields.pop("meta", {})}
        return Target(task=task, answer=answer, image_size=self.size, meta=meta, **fields)


def _detection_meta(objects: Sequence[SceneObject], size: tuple[int, int]) -> dict:
    return {
        "size": size_bucket(float(np.mean([o.area for o in objects])), size),
        "objects": "single" if len(objects) == 1 else "multiple",
        "n_objects": len(objects),
    }


def _scene_cls(ctx: _Context) -> tuple[str, str, Target]:
    think = f"I see {_CUES[ctx.cover]}. The scene is {ctx.cover}."
    target = ctx.target("scene_cls", ctx.cover, label=ctx.cover, classes=LAND_COVERS)
    return ctx.prompt("scene_cls"), think, target


def _multilabel_cls(ctx: _Context) -> tuple[str, str, Target]:
    labels = tuple(_counts(ctx.objects))
    think = f"I see {_inventory(ctx.objects)}."
    target = ctx.target("multilabel_cls", ", ".join(labels), labels=labels, classes=OBJECT_CLASSES)
    return ctx.prompt("multilabel_cls"), think, target


def _referring_expressions(
    objects: Sequence[SceneObject], size: tuple[int, int]
) -> list[tuple[str, list[SceneObject], str]]:
    """Every expression that picks out exactly a set of objects: ``(text, referents, kind)``."""
    out: list[tuple[str, list[SceneObject], str]] = []
    by_class: dict[str, list[SceneObject]] = {}
    for obj in objects:
        by_class.setdefault(obj.category, []).append(obj)
    for category, members in by_class.items():
        out.append((f"the {_noun(category, len(members))}", members, "class"))
        colors = {o.color for o in members}
        if len(colors) > 1:
            for color in sorted(colors):
                group = [o for o in members if o.color == color]
                out.append((f"the {color} {_noun(category, len(group))}", group, "color"))
        if len(members) > 1:
            regions = [_region(o, size) for o in members]
            for obj, region in zip(members, regions, strict=True):
                if regions.count(region) == 1:
                    out.append((f"the {category} {_REGION_PHRASE[region]}", [obj], "position"))
    return out


def _referred(ctx: _Context, task: str) -> tuple[str, str, Target]:
    expressions = _referring_expressions(ctx.objects, ctx.size)
    # Single-object expressions are drawn twice as often: most referring benchmarks are singular.
    weights = np.array([2.0 if len(refs) == 1 else 1.0 for _, refs, _ in expressions])
    pick = int(ctx.rng.choice(len(expressions), p=weights / weights.sum()))
    text, referents, kind = expressions[pick]
    referents = _reading_order(referents)
    rotated = task == "referred_det_rot"
    boxes = np.array([o.rbox if rotated else o.xyxy for o in referents], dtype=np.float64)
    n = len(referents)
    fields = {
        "ref": text,
        "box_word": "box" if n == 1 else "boxes",
        "rot_word": "a rotated box" if n == 1 else "rotated boxes",
    }
    where = [_REGION_PHRASE[_region(o, ctx.size)] for o in referents]
    if n == 1:
        think = f"I see a {referents[0].color} {referents[0].category} {where[0]}"
        think += f", turned {round(referents[0].rbox[4])} degrees." if rotated else "."
    else:
        think = f"I find {n} of them: {_join(where)}."
    meta = {
        **_detection_meta(referents, ctx.size),
        "category": referents[0].category,
        "expression": kind,
    }
    texts, snapped = ctx.render(boxes)
    target = ctx.target(
        task,
        ", ".join(texts),
        boxes=snapped,
        box_format="rotated" if rotated else "xyxy",
        meta=meta,
    )
    return ctx.prompt(task, **fields), think, target


def _multi_det(ctx: _Context) -> tuple[str, str, Target]:
    present = list(_counts(ctx.objects))
    if len(present) > 1 and ctx.rng.random() < 0.25:
        picked = sorted(
            ctx.rng.choice(present, size=2, replace=False).tolist(), key=OBJECT_CLASSES.index
        )
        prompt = f"Detect all {PLURALS[picked[0]]} and {PLURALS[picked[1]]}."
    else:
        picked = [ctx.choice(present)]
        prompt = ctx.prompt("multi_det", plural=PLURALS[picked[0]], singular=picked[0])
    found = _reading_order(o for o in ctx.objects if o.category in picked)
    boxes = np.array([o.xyxy for o in found], dtype=np.float64)
    think = f"I find {_inventory(found)}."
    meta = {**_detection_meta(found, ctx.size), "categories": tuple(picked)}
    texts, snapped = ctx.render(boxes)
    target = ctx.target("multi_det", ", ".join(texts), boxes=snapped, box_format="xyxy", meta=meta)
    return prompt, think, target


def _counting(ctx: _Context) -> tuple[str, str, Target]:
    counts = _counts(ctx.objects)
    absent = [c for c in OBJECT_CLASSES if c not in counts]
    category = ctx.choice(absent if absent and ctx.rng.random() < 0.15 else list(counts))
    members = _reading_order(o for o in ctx.objects if o.category == category)
    n = len(members)
    if n == 0:
        think = f"I see no {PLURALS[category]}."
    else:
        think = (
            f"I see {n} {_noun(category, n)}: "
            + ", ".join(_region(o, ctx.size) for o in members)
            + "."
        )
    target = ctx.target("counting", str(n), count=n, meta={"category": category})
    return ctx.prompt("counting", plural=PLURALS[category]), think, target


def _vqa(ctx: _Context) -> tuple[str, str, Target]:
    counts = _counts(ctx.objects)
    absent = [c for c in OBJECT_CLASSES if c not in counts]
    if ctx.rng.random() < 0.5:
        category = ctx.choice(list(counts) if ctx.rng.random() < 0.5 or not absent else absent)
        n = counts.get(category, 0)
        answer = "yes" if n else "no"
        prompt = ctx.prompt("vqa_presence", singular=category, plural=PLURALS[category])
        think = f"I see {n} {_noun(category, n)}." if n else f"I see no {PLURALS[category]}."
        return (
            prompt,
            think,
            ctx.target("vqa", answer, label=answer, meta={"question_type": "presence"}),
        )
    first = ctx.choice(list(counts))
    second = ctx.choice([c for c in OBJECT_CLASSES if c != first])
    a, b = (first, second) if ctx.rng.random() < 0.5 else (second, first)
    na, nb = counts.get(a, 0), counts.get(b, 0)
    fields = {"plural_a": PLURALS[a], "plural_b": PLURALS[b]}
    if na != nb and ctx.rng.random() < 0.5:
        answer = PLURALS[a] if na > nb else PLURALS[b]
        prompt = ctx.prompt("vqa_which", **fields)
    else:
        answer = "yes" if na > nb else "no"
        prompt = ctx.prompt("vqa_more", **fields)
    think = f"I count {na} {_noun(a, na)} and {nb} {_noun(b, nb)}."
    return (
        prompt,
        think,
        ctx.target("vqa", answer, label=answer, meta={"question_type": "comparison"}),
    )


def _region_caption(ctx: _Context) -> tuple[str, str, Target]:
    obj = ctx.choice(ctx.objects)
    (text,), (region,) = ctx.render(np.array([obj.xyxy], dtype=np.float64))
    where = _REGION_PHRASE[_region(obj, ctx.size)]
    size = size_bucket(obj.area, ctx.size)
    captions = (
        f"a {obj.color} {obj.category} {_COVER_PREP[ctx.cover]}",
        f"a {size} {obj.color} {obj.category}",
        f"a {obj.category} {where} of the image",
        f"there is a {obj.color} {obj.category} {where}",
    )
    think = f"The box is {where}. Inside it I see a {obj.color} {obj.category}."
    meta = {**_detection_meta([obj], ctx.size), "category": obj.category}
    target = ctx.target("region_caption", captions[0], captions=captions, region=region, meta=meta)
    return ctx.prompt("region_caption", box=text), think, target


def _caption_references(ctx: _Context) -> tuple[str, ...]:
    objects, cover = ctx.objects, ctx.cover
    inventory, n = _inventory(objects, digits=False), len(objects)
    return (
        f"an aerial view of {_COVER_NP[cover]} with {inventory}",
        f"{_there_be(objects)} {inventory} {_COVER_PREP[cover]}",
        f"{_colored_inventory(objects)} {_COVER_PREP[cover]}",
        f"{_COVER_NP[cover]} with {_objects(n)}",
    )


def _grounding_desc(ctx: _Context) -> tuple[str, str, Target]:
    ordered = _reading_order(ctx.objects)
    boxes = np.array([o.xyxy for o in ordered], dtype=np.float64)
    rendered, snapped = ctx.render(boxes)
    phrases = [f"a {o.color} {o.category}" for o in ordered]
    answer = f"{_COVER_NP[ctx.cover]} with " + _join(
        [f"{p} {b}" for p, b in zip(phrases, rendered, strict=True)]
    )
    plain = f"{_COVER_NP[ctx.cover]} with " + _join(phrases)
    think = f"I see {_COVER_NP[ctx.cover]} with {_inventory(ordered)}."
    target = ctx.target(
        "grounding_desc",
        answer,
        boxes=snapped,
        box_format="xyxy",
        captions=(plain, *_caption_references(ctx)[:2]),
        meta=_detection_meta(ordered, ctx.size),
    )
    return ctx.prompt("grounding_desc"), think, target


def _image_caption(ctx: _Context) -> tuple[str, str, Target]:
    references = _caption_references(ctx)
    think = f"I see {_CUES[ctx.cover]} with {_inventory(ctx.objects)}."
    target = ctx.target("image_caption", references[0], captions=references)
    return ctx.prompt("image_caption"), think, target


def _change_summary(ctx: _Context) -> str:
    before, after = ctx.scene.before, ctx.scene.after
    return (
        f"First: {_inventory(before.objects)} {_COVER_PREP[before.land_cover]}. "
        f"Second: {_inventory(after.objects)} {_COVER_PREP[after.land_cover]}."
    )


def _change_references(ctx: _Context) -> tuple[str, ...]:
    scene = ctx.scene
    if scene.change == "no change":
        return ("nothing has changed", "the two images show the same scene", "there is no change")
    if scene.change == "land cover change":
        old, new = scene.before.land_cover, scene.after.land_cover
        return (f"the {old} changed to {new}", f"{old} became {new}", _COVER_CHANGE[(old, new)])
    if scene.change == "objects added":
        changed = [o for o in scene.after.objects if o not in scene.before.objects]
        verb, verb2, where = "added", "appeared", _COVER_PREP[ctx.cover]
    else:
        changed = [o for o in scene.before.objects if o not in scene.after.objects]
        verb, verb2, where = "removed", "disappeared", "from the scene"
    n = len(changed)
    return (
        f"{_inventory(changed, digits=False)} {_was(n)} {verb}",
        f"{_colored_inventory(changed)} {verb2}",
        f"{_objects(n)} {verb2} {where}",
    )


def _change_det(ctx: _Context) -> tuple[str, str, Target]:
    changed = ctx.scene.change != "no change"
    answer = "yes" if changed else "no"
    think = _change_summary(ctx) + (" They differ." if changed else " They match.")
    target = ctx.target(
        "change_det", answer, label=answer, classes=("yes", "no"), meta={"change": ctx.scene.change}
    )
    return ctx.prompt("change_det"), think, target


def _change_caption(ctx: _Context) -> tuple[str, str, Target]:
    references = _change_references(ctx)
    target = ctx.target(
        "change_caption", references[0], captions=references, meta={"change": ctx.scene.change}
    )
    return ctx.prompt("change_caption"), _change_summary(ctx), target


def _temporal_cls(ctx: _Context) -> tuple[str, str, Target]:
    kind = ctx.scene.change
    target = ctx.target(
        "temporal_cls", kind, label=kind, classes=CHANGE_KINDS, meta={"change": kind}
    )
    return ctx.prompt("temporal_cls"), _change_summary(ctx), target


_BUILDERS: dict[str, Callable[[_Context], tuple[str, str, Target]]] = {
    "scene_cls": _scene_cls,
    "multilabel_cls": _multilabel_cls,
    "referred_det": lambda ctx: _referred(ctx, "referred_det"),
    "referred_det_rot": lambda ctx: _referred(ctx, "referred_det_rot"),
    "multi_det": _multi_det,
    "counting": _counting,
    "vqa": _vqa,
    "region_caption": _region_caption,
    "grounding_desc": _grounding_desc,
    "image_caption": _image_caption,
    "change_det": _change_det,
    "change_caption": _change_caption,
    "temporal_cls": _temporal_cls,
}
BITEMPORAL_TASKS: frozenset[str] = frozenset({"change_det", "change_caption", "temporal_cls"})


def _check_tasks(tasks: Iterable[str] | None) -> list[str]:
    if tasks is None:
        return list(TASKS)
    if isinstance(tasks, str):
        tasks = [tasks]
    chosen = list(tasks)
    unknown = [t for t in chosen if t not in TASKS]
    if unknown or not chosen:
        raise ValueError(f"unknown or no tasks {unknown or chosen}; known: {list(TASKS)}")
    return chosen


def samples_from_scene(
    scene: Scene,
    tasks: Iterable[str] | None = None,
    convention: str = "qwen25vl",
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> list[Sample]:
    """One ``Sample`` per task of ``tasks`` (default: every task family), in that order.

    A task's sample does not depend on which other tasks are asked for. Single-image tasks show
    the scene's "before" image; bi-temporal ones show ``[before, after]``. ``min_pixels`` /
    ``max_pixels`` are the processor's pixel budget for the ``"qwen25vl"`` resize (default:
    qwen_vl_utils'), which leaves the default 112x112 images unchanged.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown box convention {convention!r}; known: {CONVENTIONS}")
    out = []
    for task in _check_tasks(tasks):
        ctx = _Context(scene, task, convention, (min_pixels, max_pixels))
        prompt, think, target = _BUILDERS[task](ctx)
        images = [scene.before.image]
        if task in BITEMPORAL_TASKS:
            images.append(scene.after.image)
        out.append(Sample(f"{scene.id}-{task}", task, images, prompt, target, think, "synthetic"))
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
) -> dict[str, list[Sample]]:
    """Train / val / test samples from ``n_train`` / ``n_val`` / ``n_test`` scenes each.

    Every scene gives one sample per task (``samples_from_scene``). Split ``k`` (0 train, 1 val,
    2 test) draws its scenes from the stream ``3 * seed + k``, so no two splits of any seeds share
    a scene.
    """
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    chosen = _check_tasks(tasks)
    out: dict[str, list[Sample]] = {}
    for k, (name, n) in enumerate((("train", n_train), ("val", n_val), ("test", n_test))):
        scenes = generate_scenes(3 * int(seed) + k, n, image_size)
        out[name] = [
            sample
            for scene in scenes
            for sample in samples_from_scene(scene, chosen, convention, min_pixels, max_pixels)
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
