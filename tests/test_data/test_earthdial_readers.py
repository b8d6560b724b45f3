"""EarthDial Arrow test sets, GeoChat benchmark JSONL, box layouts, reasoning traces and the
model's pixel budget (geovlm/data/earthdial.py, readers.py, sources.py).

Fixtures are written by the tests in each exact format: Arrow folders with
``datasets.Dataset.save_to_disk`` (the column names and value shapes of EarthDial's test scripts),
JSONL lines with GeoChat-Bench's fields. Boxes are converted by hand next to each value.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict

import numpy as np
import pytest
from PIL import Image

from geovlm.config import DataConfig, ModelConfig, TinyModelConfig
from geovlm.data.readers import read_samples
from geovlm.data.sources import load_splits, model_pixel_budget


def _png(size, color=(40, 90, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def _arrow(tmp_path, name, rows, image_columns=("jpg",)):
    import datasets

    features = {key: datasets.Value("string") for key in rows[0] if key not in image_columns}
    features.update({c: datasets.Image() for c in image_columns})
    table = {key: [row[key] for row in rows] for key in rows[0]}
    folder = tmp_path / name / "test"
    datasets.Dataset.from_dict(table, features=datasets.Features(features)).save_to_disk(folder)
    return folder


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GEOVLM_CACHE", str(tmp_path / "cache"))


def test_arrow_detection_reads_corners_and_size_group(tmp_path):
    image = {"bytes": _png((200, 100)), "path": None}
    rows = [{"jpg": image, "question": "[refer] [hr_rgb_0.5] <image> \\n Give me the location of "
             "<ref>1 ship</ref>", "groundtruth": "[[10, 20, 50, 60, 0]]", "ttype": "ref",
             "size_group": "small"}]
    folder = _arrow(tmp_path, "NWPU_VHR_10", rows)
    (sample,) = read_samples(folder, convention="pixels")
    assert sample.task == "referred_det_rot"
    # corners (10, 20) - (50, 60) of 100 on 200 x 100 -> x 20..100, y 20..60 -> centre (60, 40),
    # 80 x 40 (read as centre + angle it would have been cx 10, cy 20, w 50, h 60).
    np.testing.assert_allclose(sample.target.boxes, [[60, 40, 80, 40, 0]])
    assert sample.target.meta["size"] == "small"  # size_group, though the box is large
    assert sample.target.meta["task_type"] == "ref"
    assert sample.target.meta["benchmark"] == "NWPU_VHR_10"  # the folder above "test"
    assert sample.target.meta["earthdial"]["boxes"] == "[[10, 20, 50, 60, 0]]"
    assert sample.prompt == "[refer] [hr_rgb_0.5]\nGive me the location of <ref>1 ship</ref>"
    (path,) = sample.images
    assert path.is_file() and Image.open(path).size == (200, 100)
    assert str(tmp_path / "cache") in str(path)


def test_arrow_every_family(tmp_path):
    img = {"bytes": _png((64, 64)), "path": None}
    cls = _arrow(tmp_path, "AID", [{"jpg": img, "question": "Classify. Classes: Dense "
                                    "Residential, Medium Residential. ",
                                    "groundtruth": "MediumResidential"}])
    (s,) = read_samples(cls)
    assert (s.task, s.target.label) == ("scene_cls", "medium residential")
    assert s.target.classes == ("Dense Residential", "Medium Residential")
    vqa = _arrow(tmp_path, "RSVQA_LR", [{"jpg": img, "question": "Is there a road?",
                                         "groundtruth": "yes", "ttype": "presence"}])
    (s,) = read_samples(vqa)
    assert (s.task, s.target.meta["question_type"]) == ("vqa", "presence")
    caps = _arrow(tmp_path, "UCM_Captions", [{"jpg": img, "question": "[caption] <image>",
                                              **{f"groundtruth{k}": f"a farm {k}" for k in
                                                 range(5)}}])
    (s,) = read_samples(caps)
    assert s.task == "image_caption" and s.target.captions == tuple(f"a farm {k}" for k in range(5))
    pair = {"jpg_A": img, "jpg_B": {"bytes": _png((64, 64), (1, 2, 3)), "path": None}}
    change = _arrow(tmp_path, "xBD", [{**pair, "question": "[hr] <image> <image> \\n Are there "
                                       "buildings affected? Please answer yes or no.",
                                       "groundtruth": "yes"}], ("jpg_A", "jpg_B"))
    (s,) = read_samples(change)
    assert s.task == "change_det" and len(s.images) == 2 and s.target.label == "yes"
    grounding = _arrow(tmp_path, "HIT_UAV", [{
        "jpg": img, "question": "[grounding] <image> \\n Describe the image.",
        "groundtruth": "A <ref>car</ref> <box>[[[10, 10, 20, 20, 0]]]</box> at left.",
        "obj_ids": json.dumps(["[[10, 10, 20, 20, 0]]"]), "size_group": "[\"small\"]",
        "obj_location": "[\"left\"]", "obj_name": "[\"car\"]"}])
    (s,) = read_samples(grounding, convention="pixels")
    assert s.task == "grounding_desc"
    np.testing.assert_allclose(s.target.boxes, [[6.4, 6.4, 12.8, 12.8]])
    assert s.target.captions[0] == "A car at left."


def test_arrow_without_an_rgb_image_is_a_clear_error(tmp_path):
    import datasets

    folder = tmp_path / "BigEarthNet_S2"
    datasets.Dataset.from_dict({"question": ["q"], "groundtruth": ["a"], "tif_ms": ["x"]}
                               ).save_to_disk(folder)
    with pytest.raises(ValueError, match="RGB image column.*multispectral"):
        read_samples(folder)


def test_geochat_bench_jsonl(tmp_path):
    Image.new("RGB", (100, 50)).save(tmp_path / "P0003_0002.png")
    records = [
        {"question_id": 7, "image_id": "P0003_0002", "question": "the gray plane on the left",
         "ground_truth": "[[10, 20, 30, 40, 90]]", "type": "ref", "dataset": "dota",
         "obj_ids": [3], "size_group": "medium"},
        {"question_id": 8, "image_id": "P0003_0002", "question": "{<10><20><30><40>|<0>}",
         "ground_truth": "a gray plane", "type": "ref", "dataset": "dota", "obj_ids": [3],
         "size_group": "small"},
    ]
    path = tmp_path / "referring.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    det, region = read_samples(path, convention="pixels")
    assert det.id == "7" and det.task == "referred_det_rot"
    # corners 10..30 x 20..40 of 100 on 100 x 50 -> x 10..30, y 10..20: centre (20, 15), 20 x 10
    np.testing.assert_allclose(det.target.boxes, [[20, 15, 20, 10, 90]])
    assert det.target.meta["size"] == "medium" and det.images == [tmp_path / "P0003_0002.png"]
    assert region.task == "region_caption" and region.target.captions == ("a gray plane",)


@pytest.mark.parametrize(
    ("layout", "box"),
    [("corners", [30, 40, 40, 40, 0]), ("centre", [10, 20, 50, 60, 0])],
)
def test_box_layout_of_bracketed_five_numbers(tmp_path, layout, box):
    Image.new("RGB", (100, 100)).save(tmp_path / "a.png")
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"image": "a.png", "problem": "Locate it.", "task": "rotated_rec",
                                "solution": "[10, 20, 50, 60, 0]"}) + "\n")
    (s,) = read_samples(path, convention="pixels", box_layout=layout)
    np.testing.assert_allclose(s.target.boxes, [box])


def test_xyxy_layout_refuses_five_numbers(tmp_path):
    Image.new("RGB", (100, 100)).save(tmp_path / "a.png")
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"image": "a.png", "problem": "?", "task": "rec",
                                "solution": "[10, 20, 50, 60, 0]"}) + "\n")
    with pytest.raises(ValueError, match=r"record 0 \(line 1\), field 'solution'.*xyxy"):
        read_samples(path, box_layout="xyxy")


def test_reasoning_field_is_the_sft_think_trace(tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    path = tmp_path / "d.jsonl"
    record = {"image": "a.png", "problem": "Scene?", "task": "cls", "solution": "forest",
              "reasoning": "Dense trees everywhere."}
    path.write_text(json.dumps(record) + "\n")
    (s,) = read_samples(path)
    assert s.response == "<think>Dense trees everywhere.</think><answer>forest</answer>"


def test_training_boxes_use_the_models_pixel_budget(tmp_path):
    """The tiny model's processor caps images at 224 x 224: a 448 x 448 image's box
    [45, 90, 224, 269] px is [22.5, 45, 112, 134.5] of the model's input, rendered
    [22, 45, 112, 134] (half to even) in the SFT target, and the reward and the evaluation read it
    back in that same frame."""
    from geovlm.data.collate import pixel_budget
    from geovlm.metrics import task_metrics
    from geovlm.model import build_policy
    from geovlm.rewards import RewardOptions, score

    Image.new("RGB", (448, 448)).save(tmp_path / "big.png")
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"image": "big.png", "problem": "Locate the ship.", "task": "rec",
                                "solution": "[45, 90, 224, 269]"}) + "\n")
    model_config = ModelConfig()
    budget = model_pixel_budget(model_config)
    data = DataConfig(train=str(path), val=None, test=None)
    (sample,) = load_splits(data, "qwen25vl", budget)["train"]
    assert sample.target.answer == "[22, 45, 112, 134]"
    _, processor = build_policy(tokenizer_corpus=["Locate the ship."],
                                tiny=asdict(TinyModelConfig()))
    assert pixel_budget(processor) == budget
    completion = f"<think>a ship</think><answer>{sample.target.answer}</answer>"
    # The plain IoU (box_credit="iou"): the frame of the boxes is what is checked here.
    options = RewardOptions(convention="qwen25vl", min_pixels=budget[0], max_pixels=budget[1],
                            use_embeddings=False, box_credit="iou")
    reward = score(sample.task, [completion], [sample.target], options=options)
    # [22, 45, 112, 134] is [44, 90, 224, 268] px against [45, 90, 224, 269]: the intersection
    # is 179 x 178, the boxes 180 x 178 and 179 x 179.
    inter = 179 * 178
    expected = inter / (180 * 178 + 179 * 179 - inter)
    assert reward.components["accuracy"][0] == pytest.approx(expected)
    metrics = task_metrics(sample.task, [completion], [sample.target], pixel_budget=budget)
    assert metrics["acc@0.5"] == 1.0


def test_saved_pixel_budget_is_the_loaded_processors(tmp_path):
    from geovlm.data.boxes import saved_pixel_budget
    from geovlm.data.collate import pixel_budget
    from geovlm.model import build_policy

    tiny = {**asdict(TinyModelConfig()), "min_pixels": 28 * 28 * 5, "max_pixels": 28 * 28 * 90}
    _, processor = build_policy(tokenizer_corpus=["a b c"], tiny=tiny)
    processor.save_pretrained(tmp_path)
    assert saved_pixel_budget(tmp_path) == pixel_budget(processor) == (28 * 28 * 5, 28 * 28 * 90)
    assert model_pixel_budget(ModelConfig(path=str(tmp_path))) == (28 * 28 * 5, 28 * 28 * 90)
