"""Readers for LLaVA/GeoChat JSON and VLM-R1 JSONL (geovlm/data/readers.py).

Oracles: boxes converted by hand from the fixture files' conventions and image sizes (written
next to each value), and the embedded world written out in both formats and read back.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from geovlm.data.readers import read_samples
from geovlm.data.synthetic import generate_scenes, samples_from_scene

FIXTURES = Path(__file__).parent / "fixtures"
IMAGES = FIXTURES / "images"
# harbor.png is 200x100: Qwen2.5-VL resizes it to (196, 112) (round(200/28)=7, round(100/28)=4),
# so qwen25vl = pixels * (0.98, 1.12). field.png is 150x120 -> (140, 112): * (14/15, 14/15).


def _by_id(samples):
    return {s.id: s for s in samples}


def test_geochat_json_pixels():
    samples = _by_id(read_samples(FIXTURES / "geochat.json", convention="pixels"))
    assert list(samples) == [
        "P0001_0003-0",
        "P0001_0003-1",
        "P0001_0003",
        "P0002_0001",
        "P0002_0002-0",
        "P0002_0002-1",
        "P0002_0003",
    ]
    # [refer] with an angle: GeoChat corners (10, 20, 30, 40) of 100 on 200x100 -> x 20..60,
    # y 20..40 -> cx 40, cy 30, w 40, h 20, angle 45.
    refer = samples["P0001_0003-0"]
    assert refer.task == "referred_det_rot" and refer.target.box_format == "rotated"
    np.testing.assert_allclose(refer.target.boxes, [[40, 30, 40, 20, 45]])
    assert refer.target.answer == "[40, 30, 40, 20, 45]"
    assert refer.prompt == "[refer] give me the location of the ship"
    assert refer.images == [IMAGES / "harbor.png"]
    assert refer.source == "geochat.json:0" and refer.think == ""
    # [identify] {<50><50><70><90>} -> region 100, 50, 140, 90 px, re-rendered in the prompt.
    identify = samples["P0001_0003-1"]
    assert identify.task == "region_caption"
    assert identify.prompt == "[identify] [100, 50, 140, 90]"
    np.testing.assert_allclose(identify.target.region, [100, 50, 140, 90])
    assert identify.target.answer == "A white storage tank."
    assert identify.target.captions == ("A white storage tank.",)
    grounding = samples["P0001_0003"]
    assert grounding.task == "grounding_desc"
    # The rotated plane (cx 40, cy 30, w 40, h 20, 90 deg) is boxed by its enclosing box:
    # half-width (40|cos 90| + 20|sin 90|) / 2 = 10, half-height 20 -> 30, 10, 50, 50.
    assert grounding.target.answer == (
        "A ship [20, 20, 60, 40] is moored near a storage tank [100, 50, 140, 90]; "
        "a plane [30, 10, 50, 50] waits."
    )
    np.testing.assert_allclose(
        grounding.target.boxes, [[20, 20, 60, 40], [100, 50, 140, 90], [30, 10, 50, 50]]
    )
    assert grounding.target.captions == ("A ship is moored near a storage tank; a plane waits.",)
    # field.png 150x120: (0, 10, 20, 35) -> 0, 12, 30, 42 and (60, 10, 80, 30) -> 90, 12, 120, 36.
    buildings = samples["P0002_0001"]
    assert (
        buildings.task == "referred_det" and buildings.prompt == "[refer] where are the buildings?"
    )
    np.testing.assert_allclose(buildings.target.boxes, [[0, 12, 30, 42], [90, 12, 120, 36]])
    assert buildings.target.answer == "[0, 12, 30, 42], [90, 12, 120, 36]"
    assert (
        buildings.target.meta["objects"] == "multiple" and buildings.target.meta["n_objects"] == 2
    )
    vqa = samples["P0002_0002-0"]
    assert (vqa.task, vqa.target.label, vqa.target.answer) == ("vqa", "no", "no")
    caption = samples["P0002_0002-1"]
    assert caption.task == "image_caption" and caption.prompt == "[caption] Describe the image."
    assert caption.target.answer == "Green fields with a few buildings."
    counting = samples["P0002_0003"]
    assert (counting.task, counting.target.count, counting.target.answer) == ("counting", 3, "3")


def test_geochat_json_in_qwen25vl_convention():
    samples = _by_id(read_samples(FIXTURES / "geochat.json"))
    # 40*0.98=39.2, 30*1.12=33.6, 40*0.98=39.2, 20*1.12=22.4 (angle unchanged).
    assert samples["P0001_0003-0"].target.answer == "[39, 34, 39, 22, 45]"
    # Internal boxes stay in original pixels whatever the model's convention.
    np.testing.assert_allclose(samples["P0001_0003-0"].target.boxes, [[40, 30, 40, 20, 45]])
    # 100*0.98=98, 50*1.12=56, 140*0.98=137.2, 90*1.12=100.8.
    assert samples["P0001_0003-1"].prompt == "[identify] [98, 56, 137, 101]"
    # 150x120 -> 140x112, factor 14/15: 90 -> 84, 12 -> 11.2, 120 -> 112, 36 -> 33.6.
    assert samples["P0002_0001"].target.answer == "[0, 11, 28, 39], [84, 11, 112, 34]"
    geochat = _by_id(read_samples(FIXTURES / "geochat.json", convention="geochat"))
    assert geochat["P0001_0003-0"].target.answer == "{<10><20><30><40>|<45>}"
    assert geochat["P0002_0001"].target.answer == "{<0><10><20><35>}, {<60><10><80><30>}"


def test_vlmr1_jsonl():
    samples = _by_id(read_samples(FIXTURES / "vlmr1.jsonl", convention="pixels"))
    assert list(samples) == [str(i) for i in range(1, 11)]
    rec = samples["1"]
    assert rec.task == "referred_det" and rec.think == "The ship is on the left."
    assert rec.target.answer == "[20, 20, 60, 40]" and rec.source == "vlmr1.jsonl:0"
    change = samples["2"]
    assert change.task == "change_det" and change.target.label == "yes"
    assert [Path(p).name for p in change.images] == ["before.png", "after.png"]
    assert change.prompt == "Has anything changed?"
    caption = samples["3"]
    assert caption.task == "change_caption" and len(caption.images) == 2
    assert caption.target.captions == ("two buildings were added", "new buildings appeared")
    labels = samples["4"].target
    assert labels.labels == ("building", "vehicle", "storage tank")
    assert labels.answer == "building, vehicle, storage tank"
    scene = samples["5"].target
    assert (scene.label, scene.classes) == ("farmland", ("farmland", "forest", "urban"))
    rotated = samples["6"].target
    assert rotated.box_format == "rotated" and rotated.answer == "[50, 40, 30, 10, 30]"
    assert samples["7"].target.count == 3
    det = samples["8"].target
    np.testing.assert_allclose(det.boxes, [[10, 12, 30, 20], [40, 50, 60, 70]])
    assert det.answer == "[10, 12, 30, 20], [40, 50, 60, 70]"
    assert samples["9"].target.label == "objects added"
    region = samples["10"]
    np.testing.assert_allclose(region.target.region, [30, 24, 60, 60])
    assert region.target.answer == "a red building"
    # In qwen25vl: harbor (200x100 -> 196x112): 20*0.98=19.6, 20*1.12=22.4, 58.8, 44.8.
    qwen = _by_id(read_samples(FIXTURES / "vlmr1.jsonl"))
    assert qwen["1"].target.answer == "[20, 22, 59, 45]"
    # field (150x120 -> 140x112): 30, 24, 60, 60 -> 28, 22.4, 56, 56.
    assert qwen["10"].prompt == "Describe the object in [28, 22, 56, 56]."


def test_source_convention_pixel_budget_and_image_root(tmp_path):
    record = {
        "id": "q",
        "image": "harbor.png",
        "problem": "Locate the ship.",
        "solution": "<answer>[100, 200, 300, 400]</answer>",
        "task": "referred_det",
    }
    data = tmp_path / "data.txt"
    data.write_text(json.dumps(record) + "\n")
    # Qwen2-VL 0..1000 on 200x100 -> 20, 20, 60, 40 px; a non-.jsonl file needs fmt="vlmr1".
    (sample,) = read_samples(
        data, image_root=IMAGES, fmt="vlmr1", source_convention="qwen2vl", convention="pixels"
    )
    np.testing.assert_allclose(sample.target.boxes, [[20, 20, 60, 40]])
    assert sample.images == [IMAGES / "harbor.png"]
    # max_pixels 10000: beta = sqrt(20000 / 10000); floor(70.7/28)*28 = 56, floor(141.4/28)*28
    # = 140 -> (140, 56): 20*0.7, 20*0.56, 60*0.7, 40*0.56 = 14, 11.2, 42, 22.4.
    (small,) = read_samples(
        data, image_root=IMAGES, fmt="vlmr1", source_convention="qwen2vl", max_pixels=10000
    )
    assert small.target.answer == "[14, 11, 42, 22]"
    # An absolute image path ignores the root; an explicit task overrides the record's.
    record.update(image=str(IMAGES / "field.png"), solution="fields")
    data.write_text(json.dumps([record]))
    (caption,) = read_samples(data, image_root=tmp_path, fmt="llava", task="image_caption")
    assert caption.task == "image_caption" and caption.target.captions == ("fields",)
    # The no_task fixture reads once the task is given.
    (given,) = read_samples(FIXTURES / "malformed/no_task.json", task="image_caption")
    assert given.target.answer == "Fields."


def _write_world(tmp_path: Path, convention: str):
    """The embedded world as files: VLM-R1 JSONL with a task field, PNGs under images/."""
    (tmp_path / "images").mkdir()
    samples = []
    for scene in generate_scenes(9, 3):
        names = []
        for tag, state in (("a", scene.before), ("b", scene.after)):
            name = f"images/{scene.id}-{tag}.png"
            state.image.save(tmp_path / name)
            names.append(name)
        for sample in samples_from_scene(scene, convention=convention):
            samples.append((sample, names[: len(sample.images)]))
    lines = [
        json.dumps(
            {
                "id": s.id,
                "image": names if len(names) > 1 else names[0],
                "problem": s.prompt,
                "solution": s.response,
                "task": s.task,
                "captions": list(s.target.captions),
            }
        )
        for s, names in samples
    ]
    (tmp_path / "world.jsonl").write_text("\n".join(lines) + "\n")
    return [s for s, _ in samples]


@pytest.mark.parametrize("convention", ["qwen25vl", "geochat"])
def test_embedded_world_round_trips_through_the_reader(tmp_path, convention):
    written = _write_world(tmp_path, convention)
    read = read_samples(
        tmp_path / "world.jsonl", convention=convention, source_convention=convention
    )
    assert len(read) == len(written)
    for original, sample in zip(written, read, strict=True):
        a, b = original.target, sample.target
        assert (sample.id, sample.task, sample.prompt) == (
            original.id,
            original.task,
            original.prompt,
        )
        assert sample.think == original.think and b.answer == a.answer
        assert (b.label, b.labels, b.count) == (a.label, a.labels, a.count)
        assert b.image_size == a.image_size
        if a.boxes is not None:
            assert b.box_format == a.box_format
            # The embedded world's targets are what its answers state: read back exactly.
            np.testing.assert_allclose(b.boxes, a.boxes, rtol=0, atol=1e-9)
        if a.region is not None:
            np.testing.assert_allclose(b.region, a.region, rtol=0, atol=1e-9)
        if a.captions:
            assert set(b.captions) == set(a.captions)
        loaded = sample.load_images()
        assert [im.size for im in loaded] == [im.size for im in original.images]
        assert np.array_equal(np.asarray(loaded[-1]), np.asarray(original.images[-1]))


@pytest.mark.parametrize(
    ("name", "error", "parts"),
    [
        (
            "missing_image.jsonl",
            FileNotFoundError,
            ["record 1 (line 2)", "id 'b'", "field 'image'", "no_such_file.png"],
        ),
        ("bad_line.jsonl", ValueError, ["record 1 (line 2)", "invalid JSON"]),
        ("corrupt_image.jsonl", ValueError, ["record 0 (line 1)", "field 'image'", "corrupt.png"]),
        (
            "degenerate_box.json",
            ValueError,
            ["record 1", "id 'flat'", "field 'conversations[1] (box 1)'", "degenerate"],
        ),
        ("no_task.json", ValueError, ["record 0", "id 'q1'", "field 'task'", "task="]),
        ("not_a_list.json", ValueError, ["JSON list"]),
        ("truncated.json", ValueError, ["invalid JSON at line"]),
    ],
)
def test_malformed_fixture_files(name, error, parts):
    path = FIXTURES / "malformed" / name
    with pytest.raises(error) as info:
        read_samples(path)
    message = str(info.value)
    assert name in message
    for part in parts:
        assert part in message, message


GOOD = {
    "id": "r",
    "image": "field.png",
    "conversations": [
        {"from": "human", "value": "<image>\nHow many buildings?"},
        {"from": "gpt", "value": "2"},
    ],
    "task": "counting",
}


def _turn(k, key, value):
    def edit(record):
        record["conversations"][k][key] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "field", "what"),
    [
        (lambda r: r.pop("conversations"), "conversations", "missing"),
        (lambda r: r.update(conversations="hi"), "conversations", "non-empty list"),
        (lambda r: r["conversations"].__setitem__(0, "hi"), "conversations[0]", "object"),
        (_turn(0, "from", "robot"), "conversations[0].from", "unknown role"),
        (_turn(1, "from", "human"), "conversations[1]", "two human turns"),
        (_turn(0, "from", "gpt"), "conversations[0]", "without a human turn"),
        (lambda r: r["conversations"].pop(), "conversations", "no answer"),
        (_turn(1, "value", ["2"]), "conversations[1].value", "expected a string"),
        (lambda r: r["conversations"][1].pop("value"), "conversations[1]", "missing 'value'"),
        (_turn(1, "value", "several"), "conversations[1]", "no number"),
        (_turn(1, "value", "-2"), "conversations[1]", "non-negative"),
        (_turn(0, "value", "<image><image>How many?"), "conversations", "2 <image> placeholders"),
        (lambda r: r.pop("image"), "image", "at least one image"),
        (lambda r: r.update(image=""), "image", "non-empty path"),
        (lambda r: r.update(image=[]), "image", "empty image list"),
        (lambda r: r.update(images=["field.png"]), "images", "both"),
        (lambda r: r.update(task="segmentation"), "task", "unknown task"),
        (lambda r: r.update(task=None), "task", "unknown task"),
        (lambda r: r.update(task="multi_det"), "conversations[1]", "no box"),
        (lambda r: r.update(task="change_det"), "conversations[1]", "yes or no"),
        (lambda r: r.update(task="scene_cls", classes="farmland"), "classes", "list of strings"),
        (
            lambda r: r.update(task="image_caption", captions=[1, 2]),
            "captions",
            "list of strings",
        ),
        (
            lambda r: (r.pop("conversations"), r.update(problem="Count.", solution=None)),
            "solution",
            "expected a string",
        ),
        (lambda r: (r.pop("conversations"), r.update(problem="Count.")), "solution", "missing"),
    ],
)
def test_malformed_records_name_file_record_and_field(tmp_path, edit, field, what):
    good = json.loads(json.dumps(GOOD))
    bad = json.loads(json.dumps(GOOD))
    bad["id"] = "bad"
    edit(bad)
    shutil.copy(IMAGES / "field.png", tmp_path / "field.png")
    path = tmp_path / "records.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(ValueError) as info:
        read_samples(path)
    message = str(info.value)
    assert str(path) in message and "record 1 (line 2)" in message, message
    assert f"field {field!r}" in message and what in message, message


def test_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="not_here.json"):
        read_samples(tmp_path / "not_here.json")
    with pytest.raises(ValueError, match="unknown format"):
        read_samples(FIXTURES / "geochat.json", fmt="csv")
    with pytest.raises(ValueError, match="unknown convention"):
        read_samples(FIXTURES / "geochat.json", convention="xywh")
    with pytest.raises(ValueError, match="unknown source_convention"):
        read_samples(FIXTURES / "geochat.json", source_convention="xywh")
    with pytest.raises(ValueError, match="unknown task"):
        read_samples(FIXTURES / "geochat.json", task="segmentation")
    path = tmp_path / "list.jsonl"
    path.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match=r"record 0 \(line 1\): expected a JSON object"):
        read_samples(path)
