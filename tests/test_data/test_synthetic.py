"""The embedded EO world (geovlm/data/scenes.py, synthetic.py).

Oracles: each object's pixels found by re-rendering its scene without it (the image difference),
checked against its boxes with shapely and a principal-axis fit; the answers parsed back with an
independent regex and compared with the scene's ground truth.
"""

import hashlib
import json
import math
import re

import numpy as np
import pytest
from shapely.geometry import Point, Polygon

from geovlm.data.boxes import to_pixels
from geovlm.data.scenes import (
    ALLOWED_CLASSES,
    CHANGE_KINDS,
    LAND_COVERS,
    OBJECT_CLASSES,
    SIZES,
    WorldSettings,
    generate_scene,
    make_object,
    render,
)
from geovlm.data.schema import Sample
from geovlm.data.splits import size_bucket
from geovlm.data.synthetic import corpus, embedded_splits, generate_scenes, samples_from_scene
from geovlm.tasks import registry

BOX = re.compile(r"\[(-?\d+(?:, -?\d+){3,4})\]")
RESPONSE = re.compile(r"<think>([^<]+)</think><answer>([^<]+)</answer>")


def _boxes(text: str) -> np.ndarray:
    return np.array([[float(v) for v in m.split(", ")] for m in BOX.findall(text)])


def _hash(image) -> str:
    return hashlib.sha1(np.asarray(image).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def scenes():
    return generate_scenes(5, 48)


@pytest.fixture(scope="module")
def samples(scenes):
    return [s for scene in scenes for s in samples_from_scene(scene)]


def _rotated_polygon(cx, cy, w, h, angle_deg) -> Polygon:
    """The rotated box, built here from the documented convention (CCW as seen, y down)."""
    a = math.radians(angle_deg)
    ux, uy = math.cos(a), -math.sin(a)
    vx, vy = math.sin(a), math.cos(a)
    corners = [(sx * w / 2, sy * h / 2) for sx, sy in ((-1, -1), (1, -1), (1, 1), (-1, 1))]
    return Polygon([(cx + x * ux + y * vx, cy + x * uy + y * vy) for x, y in corners])


def _object_mask(scene, k):
    state = scene.before
    others = [o for j, o in enumerate(state.objects) if j != k]
    with_obj = np.asarray(
        render(state.land_cover, state.objects, scene.image_size, scene.background_seed, 1),
        dtype=np.int16,
    )
    without = np.asarray(
        render(state.land_cover, others, scene.image_size, scene.background_seed, 1),
        dtype=np.int16,
    )
    return np.abs(with_obj - without).sum(axis=2) > 0


def _object_mask_union(scene):
    state = scene.before
    return (
        np.abs(
            np.asarray(
                render(state.land_cover, state.objects, scene.image_size, scene.background_seed, 1),
                dtype=np.int16,
            )
            - np.asarray(
                render(state.land_cover, (), scene.image_size, scene.background_seed, 1),
                dtype=np.int16,
            )
        ).sum(axis=2)
        > 0
    )


def _referents(target, objects, tolerance=0.5 + 1e-9):
    """The scene object each target box is: its exact box is within ``tolerance`` (rounding),
    and its angle within half a degree (mod 180)."""

    def close(obj, box):
        exact = obj.rbox if target.box_format == "rotated" else obj.xyxy
        if np.max(np.abs(np.subtract(exact[:4], box[:4]))) > tolerance:
            return False
        turn = abs(exact[4] - box[4]) % 180 if len(box) == 5 else 0.0
        return min(turn, 180 - turn) <= 0.5 + 1e-9

    out = []
    for box in target.boxes:
        (obj,) = [o for o in objects if close(o, box)]
        out.append(obj)
    return out


def _reading_key(obj):
    x1, y1, x2, y2 = obj.xyxy
    return ((y1 + y2) / 2, (x1 + x2) / 2)


def test_generation_is_deterministic_and_seeded():
    a, b = generate_scenes(3, 4), generate_scenes(3, 4)
    for x, y in zip(a, b, strict=True):
        assert x.id == y.id and x.change == y.change
        assert x.before.objects == y.before.objects and x.after.objects == y.after.objects
        assert _hash(x.before.image) == _hash(y.before.image)
        assert _hash(x.after.image) == _hash(y.after.image)
        for s, t in zip(samples_from_scene(x), samples_from_scene(y), strict=True):
            assert (s.id, s.prompt, s.response, s.target.captions) == (
                t.id,
                t.prompt,
                t.response,
                t.target.captions,
            )
    other = generate_scenes(4, 4)
    assert {_hash(s.before.image) for s in a}.isdisjoint(_hash(s.before.image) for s in other)
    # Scene i of a stream does not depend on how many scenes were asked for.
    assert _hash(generate_scene(3, 3).before.image) == _hash(a[3].before.image)


def test_boxes_match_the_drawn_pixels(scenes):
    """Every object's pixels lie in its boxes; the boxes are tight; the angle is its long axis."""
    checked = 0
    for scene in scenes[:20]:
        for k, obj in enumerate(scene.before.objects):
            mask = _object_mask(scene, k)
            ys, xs = np.nonzero(mask)
            assert len(xs) > 20, obj
            # Pixel (i, j) covers [i, i+1): the drawn extent is within a pixel of the xyxy box.
            x1, y1, x2, y2 = obj.xyxy
            np.testing.assert_allclose([xs.min(), ys.min()], [x1, y1], atol=1.0)
            np.testing.assert_allclose([xs.max() + 1, ys.max() + 1], [x2, y2], atol=1.0)
            polygon = _rotated_polygon(*obj.rbox).buffer(1.0)
            inside = [
                polygon.contains(Point(x + 0.5, y + 0.5)) for x, y in zip(xs, ys, strict=True)
            ]
            assert all(inside), (obj.category, obj.rbox)
            # Rectangular shapes fill their rotated box.
            if obj.category in ("building", "vehicle"):
                assert len(xs) / _rotated_polygon(*obj.rbox).area > 0.75
            # Elongated shapes: the principal axis of the pixels is the box's angle (mod 180),
            # with the angle counter-clockwise as seen on the image (y flipped to point up).
            w, h = obj.rbox[2], obj.rbox[3]
            if obj.category in ("ship", "vehicle") and w > 1.4 * h:
                coords = np.stack([xs - xs.mean(), -(ys - ys.mean())])
                eigvals, eigvecs = np.linalg.eigh(np.cov(coords))
                major = eigvecs[:, np.argmax(eigvals)]
                measured = math.degrees(math.atan2(major[1], major[0])) % 180
                diff = abs(measured - obj.rbox[4]) % 180
                assert min(diff, 180 - diff) < 8, (obj.category, measured, obj.rbox)
            checked += 1
    assert checked > 40


def test_objects_are_visible_and_not_tiny(scenes):
    """Mean colour of each object's pixels vs. the background just around it (L1 over RGB)."""
    contrasts, small_sides = [], 0
    total = 0
    for scene in scenes[:24]:
        image = np.asarray(scene.before.image, dtype=np.float64)
        height, width = image.shape[:2]
        yy, xx = np.mgrid[0:height, 0:width]
        all_objects = _object_mask_union(scene)
        for k, obj in enumerate(scene.before.objects):
            total += 1
            x1, y1, x2, y2 = obj.xyxy
            small_sides += min(x2 - x1, y2 - y1) < 8
            mask = _object_mask(scene, k)
            near = (xx >= x1 - 4) & (xx < x2 + 4) & (yy >= y1 - 4) & (yy < y2 + 4)
            surround = near & ~all_objects
            contrast = np.abs(image[mask].mean(0) - image[surround].mean(0)).sum()
            contrasts.append(contrast)
            assert scene.before.land_cover in LAND_COVERS
            assert obj.category in ALLOWED_CLASSES[scene.before.land_cover]
            assert 0 <= x1 and 0 <= y1 and x2 <= width and y2 <= height
    assert min(contrasts) > 40, sorted(contrasts)[:5]
    assert small_sides / total < 0.1


def test_every_task_family_with_valid_targets(scenes, samples):
    by_scene = {scene.id: scene for scene in scenes}
    assert {s.task for s in samples} == set(registry.names())
    assert len({s.id for s in samples}) == len(samples)
    for sample in samples:
        scene = by_scene[sample.target.meta["scene_id"]]
        objects, target = scene.before.objects, sample.target
        think, answer = RESPONSE.fullmatch(sample.response).groups()
        assert answer == target.answer and think.strip() and sample.prompt.strip()
        assert len(sample.prompt.split()) <= 16, sample.prompt
        assert target.image_size == scene.image_size == sample.images[0].size
        counts = {c: sum(o.category == c for o in objects) for c in OBJECT_CLASSES}
        task = sample.task
        bitemporal = task in ("change_det", "change_caption", "temporal_cls")
        assert len(sample.images) == (2 if bitemporal else 1)
        if task == "scene_cls":
            assert answer == target.label == scene.before.land_cover
            assert target.label in target.classes
        elif task == "multilabel_cls":
            assert answer.split(", ") == [c for c in OBJECT_CLASSES if counts[c]]
        elif task in ("referred_det", "referred_det_rot", "multi_det", "grounding_desc"):
            parsed = _boxes(answer)
            assert parsed.shape == target.boxes.shape
            # qwen25vl at 112x112 is pixels: the answer states the target's boxes exactly, and
            # they are the objects' exact boxes rounded.
            np.testing.assert_allclose(parsed, target.boxes, rtol=0, atol=1e-9)
            referents = _referents(target, objects)
            area = np.mean([(o.xyxy[2] - o.xyxy[0]) * (o.xyxy[3] - o.xyxy[1]) for o in referents])
            assert target.meta["size"] == size_bucket(area, scene.image_size)
            assert target.meta["objects"] == ("single" if len(parsed) == 1 else "multiple")
            assert referents == sorted(referents, key=_reading_key), "boxes in reading order"
            if task in ("referred_det", "referred_det_rot"):
                assert len({o.category for o in referents}) == 1
                assert referents[0].category in sample.prompt
            if task == "multi_det":
                wanted = target.meta["categories"]
                assert sorted(referents, key=_reading_key) == sorted(
                    (o for o in objects if o.category in wanted), key=_reading_key
                )
            if task == "grounding_desc":
                assert sorted(referents, key=_reading_key) == sorted(objects, key=_reading_key)
                # Each box follows the phrase it grounds, e.g. "with a red ship [..]".
                phrases = re.findall(r"(?:with|,|and) a (\w+) ([a-z ]+?) \[", answer)
                assert phrases == [(o.color, o.category) for o in referents]
                assert target.captions and "[" not in target.captions[0]
        elif task == "counting":
            assert int(answer) == target.count == counts[target.meta["category"]]
        elif task == "vqa":
            kind = target.meta["question_type"]
            assert kind in ("presence", "comparison")
            if kind == "presence":
                named = [
                    c for c in OBJECT_CLASSES if c in sample.prompt or c + "s" in sample.prompt
                ]
                present = counts[max(named, key=len)] > 0
                assert answer == ("yes" if present else "no")
            elif answer not in ("yes", "no"):
                a, b = re.search(r"numerous, ([a-z ]+)s or ([a-z ]+)s\?", sample.prompt).groups()
                assert counts[answer[:-1]] == max(counts[a], counts[b]) and counts[a] != counts[b]
            else:
                a, b = re.search(r"more ([a-z ]+)s than ([a-z ]+)s\?", sample.prompt).groups()
                assert answer == ("yes" if counts[a] > counts[b] else "no")
        elif task == "region_caption":
            region = _boxes(sample.prompt)
            np.testing.assert_allclose(region[0], target.region, rtol=0, atol=1e-9)
            (obj,) = [o for o in objects if np.max(np.abs(np.subtract(o.xyxy, region[0]))) <= 0.5]
            assert obj.category in answer and obj.color in answer
            assert len(target.captions) >= 3 and answer == target.captions[0]
        elif task == "image_caption":
            assert len(set(target.captions)) >= 3 and answer == target.captions[0]
        elif task == "change_det":
            # The pair shows the scene's change, or no change: the first image beside the scene
            # imaged again without its change.
            shown = target.meta["change"]
            assert shown in (scene.change, "no change")
            assert answer == ("no" if shown == "no change" else "yes")
            second = scene.after if shown == scene.change else scene.unchanged_after()
            assert _hash(sample.images[1]) == _hash(second.image)
        elif task == "change_caption":
            assert len(target.captions) >= 3 and answer == target.captions[0]
        elif task == "temporal_cls":
            assert answer == target.label == scene.change and target.label in target.classes


def test_bitemporal_pairs_are_consistent(scenes):
    kinds = {scene.change for scene in scenes}
    assert kinds == set(CHANGE_KINDS)
    for scene in scenes:
        before, after = scene.before, scene.after
        diff = np.abs(
            np.asarray(before.image, dtype=np.float64) - np.asarray(after.image, dtype=np.float64)
        )
        assert diff.mean() > 0, "even an unchanged pair differs by illumination and noise"
        if scene.change == "no change":
            assert after.objects == before.objects and after.land_cover == before.land_cover
        elif scene.change == "objects added":
            assert set(before.objects) < set(after.objects)
            assert after.land_cover == before.land_cover
        elif scene.change == "objects removed":
            assert set(after.objects) < set(before.objects)
        else:
            assert after.land_cover != before.land_cover and after.objects == before.objects
            assert all(o.category in ALLOWED_CLASSES[after.land_cover] for o in after.objects)


def test_unchanged_after_is_the_first_state_under_the_second_images_illumination(scenes):
    for scene in scenes[:12]:
        unchanged = scene.unchanged_after()
        if scene.change == "no change":
            assert unchanged is scene.after
            continue
        assert unchanged.objects == scene.before.objects
        assert unchanged.land_cover == scene.before.land_cover
        again = render(scene.before.land_cover, scene.before.objects, scene.image_size,
                       scene.background_seed, scene.after_noise_seed, scene.after_gain)
        assert _hash(unchanged.image) == _hash(again)
        assert _hash(unchanged.image) != _hash(scene.before.image)


def test_answers_are_balanced_so_the_majority_answer_is_a_weak_policy():
    # Each change kind a quarter of the scenes; change detection's yes / no half each.
    splits = embedded_splits(seed=7, n_train=400, n_val=0, n_test=0,
                             tasks=["change_det", "temporal_cls", "vqa"])
    by_task = {}
    for sample in splits["train"]:
        by_task.setdefault(sample.task, []).append(sample.target.answer)

    def shares(task):
        answers = by_task[task]
        return {a: answers.count(a) / len(answers) for a in set(answers)}

    assert set(shares("temporal_cls")) == set(CHANGE_KINDS)
    assert max(shares("temporal_cls").values()) < 0.31
    assert min(shares("temporal_cls").values()) > 0.19
    assert abs(shares("change_det")["yes"] - 0.5) < 0.06
    assert max(shares("vqa").values()) < 0.5


def test_bitemporal_think_traces_say_what_changed(samples):
    for sample in samples:
        if sample.task not in ("change_det", "temporal_cls", "change_caption"):
            continue
        first, second, change = re.fullmatch(r"First: (.+)\. Second: (.+)\. (.+)\.",
                                             sample.think).groups()
        shown = sample.target.meta["change"]
        expected = {"no change": "Nothing changed", "objects added": " added",
                    "objects removed": " removed", "land cover change": " became "}[shown]
        assert expected in change, (shown, sample.think)
        assert (first == second) == (shown == "no change"), sample.think


def test_coverage_of_classes_and_meta(scenes, samples):
    assert {s.before.land_cover for s in scenes} == set(LAND_COVERS)
    assert {o.category for s in scenes for o in s.before.objects} == set(OBJECT_CLASSES)
    det = [s for s in samples if s.task == "referred_det"]
    assert {s.target.meta["objects"] for s in det} == {"single", "multiple"}
    referred = ("referred_det", "referred_det_rot")
    sizes = {s.target.meta["size"] for s in samples if s.task in referred}
    assert sizes == {"small", "medium", "large"}
    assert {s.target.meta["question_type"] for s in samples if s.task == "vqa"} == {
        "presence",
        "comparison",
    }
    assert 0 in {s.target.count for s in samples if s.task == "counting"}


def test_task_subset_gives_the_same_samples(scenes):
    full = {s.task: s for s in samples_from_scene(scenes[0])}
    for task in ("counting", "temporal_cls"):
        (alone,) = samples_from_scene(scenes[0], [task])
        assert alone.response == full[task].response and alone.prompt == full[task].prompt
    assert [s.task for s in samples_from_scene(scenes[0], ["vqa", "scene_cls"])] == [
        "vqa",
        "scene_cls",
    ]


@pytest.mark.parametrize("convention", ["qwen2vl", "geochat"])
def test_other_conventions_render_the_same_boxes(scenes, convention):
    for scene in scenes[:6]:
        for sample in samples_from_scene(scene, ["referred_det", "referred_det_rot"], convention):
            target = sample.target
            if convention == "geochat":
                groups = re.findall(r"\{((?:<-?\d+>){4})(?:\|<(-?\d+)>)?\}", target.answer)
                parsed = np.array(
                    [
                        [*map(float, re.findall(r"-?\d+", c)), *([float(t)] if t else [])]
                        for c, t in groups
                    ]
                )
            else:
                parsed = _boxes(target.answer)
            pixels = to_pixels(parsed, convention, scene.image_size)
            np.testing.assert_allclose(pixels, target.boxes, rtol=0, atol=1e-9)
            # One step of the convention's grid (a rotated GeoChat box's sides come from two
            # rounded corners, so they may be off by a whole step); angles round to degrees.
            unit = scene.image_size[0] / (1000 if convention == "qwen2vl" else 100)
            referents = _referents(target, scene.before.objects, tolerance=unit + 1e-9)
            assert len(referents) == len(target.boxes)


def test_non_square_and_odd_image_sizes():
    (scene,) = generate_scenes(2, 1, image_size=(168, 112))
    assert scene.before.image.size == (168, 112) and scene.after.image.size == (168, 112)
    for obj in scene.before.objects:
        assert obj.xyxy[2] <= 168 and obj.xyxy[3] <= 112
    # 100 px is not a multiple of 28: the Qwen2.5-VL input is 112 px, answers are scaled;
    # the targets are the boxes the answers state, within half a step of the exact geometry.
    (odd,) = generate_scenes(2, 1, image_size=100)
    (sample,) = samples_from_scene(odd, ["multi_det"])
    parsed = _boxes(sample.target.answer)
    np.testing.assert_allclose(parsed * 100 / 112, sample.target.boxes, rtol=0, atol=1e-9)
    assert len(_referents(sample.target, odd.before.objects, 0.5 * 100 / 112 + 1e-9)) == len(parsed)
    # A processor budget of 56x56 pixels halves a 112x112 image: the answer is in half pixels.
    square = generate_scene(2, 0)
    (halved,) = samples_from_scene(square, ["multi_det"], max_pixels=56 * 56)
    parsed = _boxes(halved.target.answer)
    np.testing.assert_allclose(parsed * 2, halved.target.boxes, rtol=0, atol=1e-9)
    assert len(_referents(halved.target, square.before.objects, 1.0 + 1e-9)) == len(parsed)


def test_splits_are_disjoint():
    splits = embedded_splits(seed=0, n_train=12, n_val=4, n_test=5, tasks=["scene_cls", "vqa"])
    assert [len(splits[k]) for k in ("train", "val", "test")] == [24, 8, 10]
    other = embedded_splits(seed=1, n_train=12, n_val=0, n_test=0, tasks=["scene_cls"])
    groups = [splits["train"], splits["val"], splits["test"], other["train"]]
    for i in range(len(groups)):
        for j in range(i + 1, len(groups)):
            a, b = groups[i], groups[j]
            assert {s.id for s in a}.isdisjoint(s.id for s in b)
            assert {s.target.meta["scene_id"] for s in a}.isdisjoint(
                s.target.meta["scene_id"] for s in b
            )
            assert {_hash(s.images[0]) for s in a}.isdisjoint(_hash(s.images[0]) for s in b)
    assert (
        embedded_splits(0, 12, 4, 5, tasks=["vqa"])["test"][0].response
        == next(s for s in splits["test"] if s.task == "vqa").response
    )


def test_more_test_scenes_for_one_task_leave_the_others_alone():
    tasks = ["scene_cls", "referred_det", "vqa"]
    plain = embedded_splits(seed=1, n_train=2, n_val=2, n_test=4, tasks=tasks)
    more = embedded_splits(
        seed=1, n_train=2, n_val=2, n_test=4, tasks=tasks, n_test_by_task={"referred_det": 9}
    )
    for split in ("train", "val"):
        assert [s.response for s in more[split]] == [s.response for s in plain[split]]
    count = {task: sum(s.task == task for s in more["test"]) for task in tasks}
    assert count == {"scene_cls": 4, "referred_det": 9, "vqa": 4}
    # The first 4 scenes' samples are exactly the plain split's; the extra ones continue the
    # test stream with new scenes.
    first = [s for s in more["test"] if int(s.target.meta["scene_id"].split("-")[-1]) < 4]
    assert [(s.id, s.response) for s in first] == [(s.id, s.response) for s in plain["test"]]
    det = [s for s in more["test"] if s.task == "referred_det"]
    assert len({s.target.meta["scene_id"] for s in det}) == 9
    fewer = embedded_splits(1, 0, 0, 4, tasks=tasks, n_test_by_task={"vqa": 0})["test"]
    assert {s.task for s in fewer} == {"scene_cls", "referred_det"}
    with pytest.raises(ValueError, match="does not generate"):
        embedded_splits(1, 0, 0, 4, tasks=["vqa"], n_test_by_task={"referred_det": 9})


def test_task_weights_repeat_a_tasks_samples_and_drop_nothing():
    from geovlm.data.sources import weigh_tasks

    samples = embedded_splits(2, 5, 0, 0, tasks=["scene_cls", "referred_det", "vqa"])["train"]
    weighted = weigh_tasks(samples, {"referred_det": 3, "vqa": 1})
    count = {t: sum(s.task == t for s in weighted) for t in ("scene_cls", "referred_det", "vqa")}
    assert count == {"scene_cls": 5, "referred_det": 15, "vqa": 5}
    assert {s.id for s in weighted} == {s.id for s in samples}
    assert weigh_tasks(samples, {}) == samples
    with pytest.raises(ValueError, match="ints >= 1"):
        weigh_tasks(samples, {"vqa": 0})


def test_corpus_holds_every_prompt_and_response(samples):
    texts = corpus(samples[:60])
    assert all(isinstance(t, str) and t for t in texts)
    for sample in samples[:60]:
        assert sample.prompt in texts and sample.response in texts
        assert set(sample.target.captions) <= set(texts)


def test_bad_arguments_are_clear_errors(scenes):
    with pytest.raises(ValueError, match="too small"):
        generate_scenes(0, 1, image_size=40)
    with pytest.raises(ValueError, match="image_size"):
        generate_scenes(0, 1, image_size=(112, 112, 3))
    with pytest.raises(ValueError, match="image_size"):
        generate_scenes(0, 1, image_size="112")
    assert generate_scenes(0, 1, image_size=np.int64(84))[0].image_size == (84, 84)
    with pytest.raises(ValueError, match="n must be"):
        generate_scenes(0, -1)
    with pytest.raises(ValueError, match="unknown or no tasks"):
        samples_from_scene(scenes[0], ["detection"])
    with pytest.raises(ValueError, match="unknown box convention"):
        samples_from_scene(scenes[0], convention="xywh")
    with pytest.raises(ValueError, match="seed"):
        embedded_splits(seed=-1)
    with pytest.raises(ValueError, match="no colour"):
        make_object("ship", "blue", 10, 10, 20, 8, 0)


def test_world_settings_scale_the_objects_and_bound_the_clutter():
    """object_scale multiplies every size range, max_objects caps both images of a pair; the
    default settings are the standard world itself."""
    default = generate_scenes(5, 30)
    assert generate_scenes(5, 30, 112, WorldSettings()) == default
    world = WorldSettings(object_scale=2.0, max_objects=3)
    scenes = generate_scenes(5, 60, 112, world)
    assert scenes != default
    lengths: dict[str, list[float]] = {}
    for scene in scenes:
        assert 1 <= len(scene.before.objects) <= 3  # "objects removed" may empty the second
        for state in (scene.before, scene.after):
            assert len(state.objects) <= 3
            for obj in state.objects:
                lengths.setdefault(obj.category, []).append(obj.length)
                x1, y1, x2, y2 = obj.xyxy
                assert 0 <= x1 and 0 <= y1 and x2 <= 112 and y2 <= 112
        assert scene.change != "objects added" or len(scene.after.objects) >= 2
    for category, values in lengths.items():
        low, high = SIZES[category][0]
        assert 2 * low <= min(values) and max(values) <= 2 * high, category
    # Twice the size on average (the range of each class doubles).
    mean_area = np.mean([o.area for s in scenes for o in s.before.objects])
    assert mean_area > 3 * np.mean([o.area for s in default for o in s.before.objects])
    # The samples of such a world: the referred boxes are the large objects'.
    split = embedded_splits(5, 8, 0, 0, tasks=["referred_det"], world=world)["train"]
    assert min((b[2] - b[0]) * (b[3] - b[1]) for s in split for b in s.target.boxes) > 150


def test_a_runs_data_settings_build_its_world():
    from geovlm.config import load_config
    from geovlm.data.sources import load_splits

    sizes = ["data.n_train_scenes=3", "data.n_val_scenes=0", "data.n_test_scenes=0"]
    overrides = [*sizes, "data.tasks=[referred_det]", "data.object_scale=2", "data.max_objects=3"]
    got = load_splits(load_config("tiny-cpu", overrides).data, "qwen25vl")["train"]
    world = WorldSettings(object_scale=2.0, max_objects=3)
    expected = embedded_splits(0, 3, 0, 0, tasks=["referred_det"], world=world)["train"]
    assert [s.target.answer for s in got] == [s.target.answer for s in expected]


def test_impossible_world_settings_are_clear_errors(monkeypatch):
    for bad in (0.0, -1.0, 4.5, "2"):
        with pytest.raises(ValueError, match="object_scale"):
            WorldSettings(object_scale=bad)
    for bad in (1, 13, 2.5):
        with pytest.raises(ValueError, match="max_objects"):
            WorldSettings(max_objects=bad)
    # Objects larger than the image, or too large for two of them to fit: an error, not a hang.
    with pytest.raises(ValueError, match="building at object_scale 4.0 spans .* 112 x 112"):
        generate_scenes(0, 40, 112, WorldSettings(object_scale=4.0))
    with pytest.raises(ValueError, match="lower object_scale or raise image_size"):
        generate_scenes(0, 40, 56, WorldSettings(object_scale=1.9))
    # A world where objects never find room: the redraws are bounded.
    import geovlm.data.scenes as scenes_module

    monkeypatch.setattr(scenes_module, "_place", lambda *args: [])
    with pytest.raises(ValueError, match=r"no room for 1 object\(s\) at object_scale 1.0"):
        generate_scene(0, 0)


def test_samples_are_plain_schema_objects(samples):
    sample = samples[0]
    assert isinstance(sample, Sample) and sample.source == "synthetic"
    assert [im.mode for im in sample.load_images()] == ["RGB"]


def _world_digest(samples) -> str:
    """sha256 over every sample's id, prompt, think trace, target fields and image pixels."""
    digest = hashlib.sha256()
    for s in samples:
        t = s.target
        record = {
            "id": s.id, "task": s.task, "prompt": s.prompt, "think": s.think, "answer": t.answer,
            "label": t.label, "labels": list(t.labels), "classes": list(t.classes),
            "count": t.count, "captions": list(t.captions), "box_format": t.box_format,
            "boxes": None if t.boxes is None else np.round(t.boxes, 6).tolist(),
            "region": None if t.region is None else np.round(t.region, 6).tolist(),
            "meta": {k: list(v) if isinstance(v, tuple) else v for k, v in t.meta.items()},
            "images": [_hash(image) for image in s.images],
        }
        digest.update(json.dumps(record, sort_keys=True).encode())
    return digest.hexdigest()


@pytest.mark.parametrize(
    "seed, convention, expected",
    [
        (0, "qwen25vl", "5cfbec690dbcfe2225db37843f7df4af1979ae0d5cc48717f73af3a664d46ee1"),
        (1, "pixels", "220fc5e39f360af4b3844495f0afb08ac08eb541bde33dbba364e31d90c58a35"),
        (2, "geochat", "b6a8aab0af38185b2264e23402ab67d2b2b2a990d991b5f611302d4387e632ae"),
        (5, "qwen2vl", "44e2f586d7cb10b0cf9572ff27212769d3474bf08d178e379d4c51cb9c365d2a"),
    ],
)
def test_the_world_is_the_recorded_one(seed, convention, expected):
    # A refactor must not change one id, prompt, trace, answer, box or pixel of the embedded
    # world. First recorded at fd5f0d1 (tasks moving into geovlm/tasks); re-recorded when the
    # world changes on purpose: issue #18 (balanced change kinds and yes / no answers, no-change
    # pairs, traces that say what changed).
    splits = embedded_splits(seed=seed, n_train=3, n_val=1, n_test=2, convention=convention)
    assert _world_digest(splits["train"] + splits["val"] + splits["test"]) == expected
