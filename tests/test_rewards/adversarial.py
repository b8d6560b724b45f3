"""Hostile completions for every task: the reward hacks, the crash inputs, and the honest answers
they are measured against.

For one embedded-world ``Sample`` (and a pool of samples of the same task, for other scenes'
answers) this module writes

* ``correct(sample)``: the target answer; ``near_correct(sample)``: an answer that should keep
  partial credit (boxes jittered to IoU ~0.7-0.9, a caption with one word changed);
* ``plain_wrong(sample, pool)``: the honest wrong answer a hack must not beat, defined per task:

  - single-label classification (scene_cls, temporal_cls, change_det, yes/no vqa): another class
    of the vocabulary (the other of yes/no);
  - multi-label classification: one class of the vocabulary that is not in the image;
  - detection (referred_det, referred_det_rot, multi_det): the true number of boxes, each of its
    true box's size, moved to where it overlaps no true box (IoU 0);
  - counting and numeric vqa: the true count plus one;
  - open vqa ("which are more numerous, A or B?"): the other option;
  - captions (image, region, change): an honest caption of a different scene (another sample's
    answer that is none of this target's references);
  - grounding description: another scene's description, boxes placed as the detection wrong
    answer places them; against hacks of the text alone (which keep the true boxes),
    ``plain_wrong_text``: another scene's description with the true boxes;

* ``HACKS``: hack class -> ``fn(sample, pool, rng) -> [completion]`` (full completions, tags
  included; ``[]`` where the class does not apply to the task);
* ``hostile_batch(samples, n, seed)``: ``n`` completions drawn from every hack class and from
  the crash inputs (number-word runs, lone surrogates, 100k-character answers, 10,000-box floods,
  tag soups), each with its sample, for bounds checks and benchmarks.

Everything is plain string work on the samples (box layouts are cached per image size).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np

from geovlm.data.schema import Sample
from geovlm.rewards.parse import offered_choices

BOX_TASKS = ("referred_det", "referred_det_rot", "multi_det")
CAPTION_TASKS = ("region_caption", "image_caption", "change_caption")
THINK = "<think>I look at the image.</think>"


def wrap(answer: str, think: str = THINK) -> str:
    """A well-formatted completion answering ``answer``."""
    return f"{think}<answer>{answer}</answer>"


def _render(boxes: np.ndarray) -> str:
    """Boxes as the embedded world's answers write them (``pixels`` of the original image; the
    samples' images are small enough that the Qwen2.5-VL resize keeps them)."""
    return ", ".join("[" + ", ".join(f"{v:g}" for v in np.round(row, 1)) + "]" for row in boxes)


def _xyxy(boxes: np.ndarray) -> np.ndarray:
    """Axis-aligned ``[K, 4]`` extents of xyxy or rotated boxes (their hulls, for placement)."""
    if boxes.shape[1] == 4:
        return boxes
    cx, cy, w, h, angle = boxes.T
    rad = np.deg2rad(angle)
    half_w = (np.abs(w * np.cos(rad)) + np.abs(h * np.sin(rad))) / 2
    half_h = (np.abs(w * np.sin(rad)) + np.abs(h * np.cos(rad))) / 2
    return np.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=1)


def _overlaps(box: np.ndarray, others: np.ndarray) -> bool:
    return bool(
        np.any(
            (box[0] < others[:, 2])
            & (others[:, 0] < box[2])
            & (box[1] < others[:, 3])
            & (others[:, 1] < box[3])
        )
    )


def moved_boxes(boxes: np.ndarray, image_size: tuple[int, int]) -> np.ndarray | None:
    """Each box at its own size, moved to where its hull overlaps no true box nor an earlier moved
    one (scanning the image in steps of 2 px); ``None`` when the image has no such place."""
    moved = _moved(boxes.tobytes(), boxes.shape, tuple(image_size))
    return None if moved is None else moved.copy()


@lru_cache(maxsize=4096)
def _moved(data: bytes, shape: tuple[int, int], image_size: tuple[int, int]) -> np.ndarray | None:
    boxes = np.frombuffer(data).reshape(shape)
    hulls = _xyxy(boxes)
    width, height = image_size
    taken = hulls.copy()
    out = boxes.copy()
    for k, hull in enumerate(hulls):
        w, h = hull[2] - hull[0], hull[3] - hull[1]
        spot = next(
            (
                (x, y)
                for y in np.arange(0.0, height - h + 1e-9, 2.0)
                for x in np.arange(0.0, width - w + 1e-9, 2.0)
                if not _overlaps(np.array([x, y, x + w, y + h]), taken)
            ),
            None,
        )
        if spot is None:
            return None
        x, y = spot
        moved = np.array([x, y, x + w, y + h])
        taken = np.vstack([taken, moved])
        if boxes.shape[1] == 4:
            out[k] = moved
        else:
            out[k, 0], out[k, 1] = x + w / 2, y + h / 2
    return out


def correct(sample: Sample) -> str:
    return wrap(sample.target.answer)


def near_correct(sample: Sample, rng: np.random.Generator) -> str:
    """An answer that deserves partial credit: boxes shifted by a tenth of their size, or one word
    of a caption replaced; the correct answer for the other tasks."""
    t = sample.target
    if t.boxes is not None and len(t.boxes) and sample.task in (*BOX_TASKS, "grounding_desc"):
        shift = np.zeros_like(t.boxes)
        hull = _xyxy(t.boxes)
        dx = (hull[:, 2] - hull[:, 0]) * 0.1
        shift[:, 0] = dx
        if t.boxes.shape[1] == 4:
            shift[:, 2] = dx
        boxes = _render(t.boxes + shift)
        if sample.task == "grounding_desc":
            return wrap(f"{t.captions[0]} {boxes}")
        return wrap(boxes)
    words = t.answer.split()
    if sample.task in CAPTION_TASKS and len(words) > 2:
        words[int(rng.integers(1, len(words)))] = "large"
        return wrap(" ".join(words))
    return wrap(t.answer)


def _other_class(sample: Sample) -> str | None:
    t = sample.target
    if t.label in ("yes", "no"):
        return "no" if t.label == "yes" else "yes"
    return next((c for c in t.classes if c != t.label and c not in t.labels), None)


def _other_scene(sample: Sample, pool: Sequence[Sample]) -> Sample | None:
    """A sample of another scene whose answer is honestly wrong here: none of this target's
    references, and more than one word away from its answer (one word away is near-correct:
    "a blue building on bare land" for "a red building on bare land")."""
    refs = set(sample.target.captions) | {sample.target.answer}
    words = sample.target.answer.split()

    def far(answer: str) -> bool:
        other = answer.split()
        if len(other) != len(words):
            return True
        return sum(a != b for a, b in zip(other, words, strict=True)) > 1

    return next(
        (s for s in pool if s.target.answer not in refs and s.target.captions
         and far(s.target.answer)),
        None,
    )


def plain_wrong(sample: Sample, pool: Sequence[Sample]) -> str | None:
    """The honest wrong answer of the module docstring, or ``None`` where the sample has none
    (every class true, no free place for a box)."""
    t, task = sample.target, sample.task
    if task in ("scene_cls", "temporal_cls", "change_det", "multilabel_cls"):
        other = _other_class(sample)
        return None if other is None else wrap(other)
    if task in BOX_TASKS:
        moved = moved_boxes(t.boxes, t.image_size)
        return None if moved is None else wrap(_render(moved))
    if task == "counting":
        return wrap(str(t.count + 1))
    if task == "vqa":
        if t.label in ("yes", "no"):
            return wrap(_other_class(sample))
        choices = offered_choices(sample.prompt)
        other = next((c for c in choices if c != t.label), None)
        return None if other is None else wrap(other)
    other = _other_scene(sample, pool)
    if other is None:
        return None
    if task == "grounding_desc":
        moved = moved_boxes(t.boxes, t.image_size) if len(t.boxes) else t.boxes
        if moved is None:
            return None
        return wrap(f"{other.target.captions[0]} {_render(moved)}")
    return wrap(other.target.answer)


def plain_wrong_text(sample: Sample, pool: Sequence[Sample]) -> str | None:
    """Grounding description: the true boxes with another scene's description."""
    other = _other_scene(sample, pool)
    if other is None:
        return None
    return wrap(f"{other.target.captions[0]} {_render(sample.target.boxes)}")


# Hack classes of the grounding description's text alone: they keep the true boxes.
TEXT_HACKS = ("caption_concatenation", "frequent_word_bag")


# --------------------------------------------------------------------------- hack classes


def _vocabulary(sample: Sample, pool: Sequence[Sample]) -> tuple[str, ...]:
    t = sample.target
    if t.classes:
        return tuple(t.classes)
    choices = offered_choices(sample.prompt)
    return choices or tuple(dict.fromkeys(s.target.answer for s in pool))


def every_class(sample, pool, rng) -> list[str]:
    """Every class (or option) at once, in the ways a list can be written."""
    if sample.task not in ("scene_cls", "multilabel_cls", "temporal_cls", "change_det", "vqa"):
        return []
    classes = list(_vocabulary(sample, pool))
    rng.shuffle(classes)
    return [wrap(sep.join(classes)) for sep in (", ", " or ", " and ", "; ", "\n")]


def both_options(sample, pool, rng) -> list[str]:
    """The two options of a choice question (vqa "A or B?", yes/no, counts) given together."""
    t = sample.target
    if sample.task == "counting":
        n = t.count
        hedges = (f"{n} or {n + 1}", f"{max(n - 1, 0)}, {n}, {n + 1}", f"{n}-{n + 2}")
        return [wrap(h) for h in hedges]
    if sample.task not in ("vqa", "change_det", "scene_cls", "temporal_cls"):
        return []
    wrong = _other_class(sample)
    if sample.task == "vqa" and t.label not in ("yes", "no"):
        wrong = next((c for c in offered_choices(sample.prompt) if c != t.label), None)
    if wrong is None:
        return []
    right = t.label
    return [
        wrap(f"{right} or {wrong}"),
        wrap(f"{wrong} or {right}"),
        wrap(f"{right}, {wrong}"),
        wrap(f"either {wrong} or {right}"),
        wrap(f"{right}/{wrong}"),
        wrap(f"{right} and {wrong}"),
    ]


def _whole(size: tuple[int, int], rotated: bool) -> np.ndarray:
    w, h = size
    return np.array([[w / 2, h / 2, w, h, 0.0]]) if rotated else np.array([[0.0, 0.0, w, h]])


@lru_cache(maxsize=256)
def _rendered_grid(size: tuple[int, int], n: int, rotated: bool) -> str:
    return _render(_grid(size, n, rotated))


def _grid(size: tuple[int, int], n: int, rotated: bool) -> np.ndarray:
    w, h = size
    xs, ys = np.meshgrid(np.arange(n) * w / n, np.arange(n) * h / n)
    x0, y0 = xs.ravel(), ys.ravel()
    boxes = np.stack([x0, y0, x0 + w / n, y0 + h / n], axis=1)
    if rotated:
        return np.stack([x0 + w / n / 2, y0 + h / n / 2, np.full_like(x0, w / n),
                         np.full_like(x0, h / n), np.zeros_like(x0)], axis=1)
    return boxes


def _diagonals(size: tuple[int, int]) -> list[np.ndarray]:
    w, h = size
    length = math.hypot(w, h)
    angle = math.degrees(math.atan2(h, w))
    return [np.array([[w / 2, h / 2, length, thick, a]]) for thick in (2.0, h / 4, h / 2)
            for a in (angle, -angle)]


def whole_image_box(sample, pool, rng) -> list[str]:
    """A box that covers the whole image (and, for rotated boxes, the image's diagonals, whose
    axis-aligned hull is the whole image)."""
    if sample.task not in BOX_TASKS:
        return []
    rotated = sample.task == "referred_det_rot"
    out = [_whole(sample.target.image_size, rotated)]
    if rotated:
        out += _diagonals(sample.target.image_size)
    return [wrap(_render(b)) for b in out]


def box_around_target(sample, pool, rng) -> list[str]:
    """Each true box grown 3x and 4x in side about its own centre (clipped to the image): the
    hedge a GRPO policy that finds the object only roughly learns (benchmarks/RESULTS.md, "A
    fifth look"), here with the exact centre, its strongest form."""
    if sample.task not in ("referred_det", "multi_det"):
        return []
    w, h = sample.target.image_size
    boxes = np.asarray(sample.target.boxes, dtype=np.float64)
    if not len(boxes):
        return []
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]) / 2
    out = []
    for grow in (3.0, 4.0):
        grown = np.hstack([centre - grow * half, centre + grow * half])
        out.append(wrap(_render(np.clip(grown, 0, [w, h, w, h]))))
    return out


def box_grid(sample, pool, rng) -> list[str]:
    """A grid of 2x2 .. 12x12 tiles over the image, and the true boxes with a grid added."""
    if sample.task not in BOX_TASKS:
        return []
    rotated = sample.task == "referred_det_rot"
    size = sample.target.image_size
    grids = [_grid(size, n, rotated) for n in (2, 3, 4, 6, 8, 12)]
    out = [wrap(_render(g)) for g in grids]
    out.append(wrap(_render(np.vstack([sample.target.boxes, grids[2]]))))
    return out


def junk_box_with_right_text(sample, pool, rng) -> list[str]:
    """Grounding: the right description with a whole-image box, a grid, or a box hedge."""
    if sample.task != "grounding_desc":
        return []
    t = sample.target
    text = t.captions[0]
    size = t.image_size
    junk = [_whole(size, False), _grid(size, 3, False), _grid(size, 6, False),
            np.vstack([_whole(size, False)] * max(len(t.boxes), 1))]
    return [wrap(f"{text} {_render(j)}") for j in junk] + [wrap(f"{_render(j)} {text}")
                                                          for j in junk[:1]]


def _caption_pool(sample, pool) -> list[str]:
    return list(dict.fromkeys(c for s in pool for c in s.target.captions or (s.target.answer,)))


def caption_concatenation(sample, pool, rng) -> list[str]:
    """Several plausible captions of the task strung together, the true one among them or not."""
    if sample.task not in (*CAPTION_TASKS, "grounding_desc"):
        return []
    captions = _caption_pool(sample, pool)
    truth = sample.target.answer if sample.task != "grounding_desc" else sample.target.captions[0]
    out = []
    for k in (3, 5, 10):
        picked = [captions[i] for i in rng.choice(len(captions), min(k, len(captions)), False)]
        with_truth = [*picked[:-1], truth]
        rng.shuffle(with_truth)
        for parts in (picked, with_truth):
            joined = ". ".join(parts)
            if sample.task == "grounding_desc":
                joined = f"{joined} {_render(sample.target.boxes)}"
            out.append(wrap(joined))
    return out


def frequent_word_bag(sample, pool, rng) -> list[str]:
    """The task's most frequent reference words, as a bag (top 8, 16, 32)."""
    if sample.task not in (*CAPTION_TASKS, "grounding_desc"):
        return []
    counts = Counter(w for c in _caption_pool(sample, pool) for w in c.lower().split())
    out = []
    for k in (8, 16, 32):
        bag = " ".join(w for w, _ in counts.most_common(k))
        if sample.task == "grounding_desc":
            bag = f"{bag} {_render(sample.target.boxes)}"
        out.append(wrap(bag))
    return out


def repetition(sample, pool, rng) -> list[str]:
    """The true answer (text or boxes) repeated 3, 5 and 20 times."""
    if sample.task not in (*CAPTION_TASKS, *BOX_TASKS, "grounding_desc"):
        return []
    answer = sample.target.answer
    sep = ", " if sample.task in BOX_TASKS else " "
    return [wrap(sep.join([answer] * k)) for k in (3, 5, 20)]


def question_copy(sample, pool, rng) -> list[str]:
    """The question itself, alone or around the answer of another scene."""
    out = [wrap(sample.prompt), wrap(f"{sample.prompt} {sample.prompt}")]
    wrong = plain_wrong(sample, pool)
    if wrong is not None:
        out.append(wrong.replace("<answer>", f"<answer>{sample.prompt} "))
    return out


def multiple_answer_blocks(sample, pool, rng) -> list[str]:
    """Several answer blocks: a wrong one and the right one, in either order, or many."""
    wrong = plain_wrong(sample, pool)
    if wrong is None:
        return []
    w = wrong[len(THINK):]
    r = f"<answer>{sample.target.answer}</answer>"
    return [THINK + w + r, THINK + r + w, THINK + (w + r) * 4, f"{THINK}{r}{THINK}{w}"]


def answer_outside_tags(sample, pool, rng) -> list[str]:
    """The right answer outside the answer block: bare, after a wrong block, inside think only."""
    answer = sample.target.answer
    wrong = plain_wrong(sample, pool)
    out = [answer, f"{THINK}{answer}", f"<answer></answer>{answer}", f"{THINK}<answer>{answer}"]
    if wrong is not None:
        out += [f"{wrong} {answer}", f"{answer} {wrong}"]
    return out


def think_restates_target(sample, pool, rng) -> list[str]:
    """A think block that states the right answer, followed by a wrong or an empty answer."""
    think = f"<think>The answer is {sample.target.answer}.</think>"
    out = [f"{think}<answer></answer>", f"{think}<answer> </answer>"]
    wrong = plain_wrong(sample, pool)
    if wrong is not None:
        out.append(think + wrong[len(THINK):])
    return out


HACKS: dict[str, Callable[..., list[str]]] = {
    fn.__name__: fn
    for fn in (
        every_class,
        both_options,
        whole_image_box,
        box_around_target,
        box_grid,
        junk_box_with_right_text,
        caption_concatenation,
        frequent_word_bag,
        repetition,
        question_copy,
        multiple_answer_blocks,
        answer_outside_tags,
        think_restates_target,
    )
}


# --------------------------------------------------------------------------- crash inputs

_NUMBER_RUNS = ("hundred", "a dozen", "thousand", "million billion", "one hundred and")
_SURROGATES = ("\ud800", "\udfff", "\udc80x\ud83d")


def crash_inputs(sample: Sample, rng: np.random.Generator) -> list[str]:
    """Inputs that once raised or could stall: number-word runs, lone surrogates, a
    100,000-character answer, floods of 900 and 10,000 boxes, tag soups, control characters."""
    answer = sample.target.answer
    size = sample.target.image_size
    run = _NUMBER_RUNS[int(rng.integers(len(_NUMBER_RUNS)))]
    surrogate = _SURROGATES[int(rng.integers(len(_SURROGATES)))]
    rotated = sample.task == "referred_det_rot"
    flood = _rendered_grid(tuple(size), 30, rotated)  # 900 boxes: read (under MAX_ANSWER_CHARS)
    big_flood = _rendered_grid(tuple(size), 100, rotated)  # 10,000 boxes
    return [
        wrap(" ".join([run] * int(rng.integers(50, 400)))),
        wrap(f"{answer} {surrogate} {answer}"),
        wrap(surrogate * 3),
        wrap(answer + " x" * 50_000),
        wrap(flood),
        wrap(big_flood),
        wrap(f"{answer} {big_flood}"),
        "<answer>" * 50 + answer + "</answer>" * 50,
        wrap(f"{answer}\x00\x1b[2J\u202e{answer}"),
        wrap("1e400 -1e400 nan inf " + answer),
    ]


def hostile_batch(
    samples: Sequence[Sample], n: int, seed: int = 0
) -> tuple[list[str], list[Sample]]:
    """``n`` hostile completions drawn round-robin from every hack class and the crash inputs of
    every sample (a sample's completions are built once and reused), with the sample each one
    answers."""
    rng = np.random.default_rng(seed)
    by_task: dict[str, list[Sample]] = {}
    for s in samples:
        by_task.setdefault(s.task, []).append(s)
    menu: list[tuple[str, Sample]] = []
    for s in samples:
        pool = [p for p in by_task[s.task] if p is not s]
        for hack in HACKS.values():
            menu += [(c, s) for c in hack(s, pool, rng)]
        menu += [(c, s) for c in crash_inputs(s, rng)]
    order = rng.integers(len(menu), size=n)
    return [menu[i][0] for i in order], [menu[i][1] for i in order]
